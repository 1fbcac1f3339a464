// Entry point of dce_kernels._emu. Importing it loads this shared object, whose
// static initializers register the dce_emu operators (ops_emu.cpp) and the
// emulator self-test operators (selftest.cpp).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
