"""Builds the emulated backend's library with AddressSanitizer and UBSan into
a directory of its own, for `make sanitize`. Run under the same LD_PRELOAD of
libasan as the tests: torch's builder loads the library after building it.

usage: build_sanitized.py OUT_DIR   (prints the path of the built library)
"""
import os
import sys

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ["csrc/emu/runtime.cpp", "csrc/emu/ops_emu.cpp", "csrc/emu/selftest.cpp",
           "csrc/emu/conv_args_emu.cpp"]
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
       "-fno-omit-frame-pointer", "-g"]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    cpp_extension.load(
        name="dce_emu_sanitized",
        sources=[os.path.join(ROOT, s) for s in SOURCES],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1", "-std=c++20", "-mfma", "-fvisibility=hidden"] + SAN,
        extra_ldflags=SAN,
        build_directory=out_dir,
        is_python_module=False,
        verbose=False,
    )
    print(os.path.join(out_dir, "dce_emu_sanitized.so"))


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
