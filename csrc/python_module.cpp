// Entry point of the Python extension dce_kernels._C. Importing it loads this
// shared object, whose static initializers run the TORCH_LIBRARY registrations
// (csrc/ops.cpp and the backends). The module itself is empty, so it needs only
// Python's limited API. C++ users link the same sources without this file.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
