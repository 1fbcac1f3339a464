"""Build dce_kernels._C with torch.utils.cpp_extension.

CPU kernels are always built. CUDA sources (csrc/cuda, csrc/kernels) are added
when PyTorch is a CUDA build and nvcc is found, unless DCE_FORCE_CPU=1;
DCE_FORCE_CUDA=1 makes a missing toolkit an error instead of a silent CPU build.
"""
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _nvcc_reported_home(nvcc):
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in dry.stderr.splitlines() + dry.stdout.splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def _has_nvcc(home):
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))


def toolkit_behind_wrapper():
    """The CUDA toolkit, where torch.utils.cpp_extension would guess it wrong.

    cpp_extension finds the toolkit itself when it is imported (CUDA_HOME or
    CUDA_PATH, else the directory above the nvcc on PATH, else /usr/local/cuda),
    and that guess is what the rest of this file uses. It goes wrong in one case:
    the nvcc on PATH is a wrapper script or a link outside its toolkit (e.g.
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), where it would
    take /usr/local. nvcc itself knows where it lives; returns that home, or
    None when cpp_extension's own guess stands."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if not nvcc or os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)),
                                               "include", "cuda_runtime.h")):
        return None
    return _nvcc_reported_home(nvcc)


def wheel_math_headers():
    """Include dir of the CUDA math libraries (cusparse.h, cublas_v2.h, ...) that
    PyTorch's CUDA wheels install under site-packages/nvidia/cu13/include."""
    purelib = sysconfig.get_paths()["purelib"]
    for candidate in sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include"))):
        if os.path.exists(os.path.join(candidate, "cusparse.h")):
            return candidate
    return None


def cuda_build_requested(torch_module, cuda_home):
    if _flag("DCE_FORCE_CPU"):
        return False
    wanted = torch_module.version.cuda is not None and cuda_home is not None
    if _flag("DCE_FORCE_CUDA") and not wanted:
        sys.exit(
            "DCE_FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch_module.version.cuda!r}, CUDA toolkit={cuda_home!r}"
        )
    return wanted


_wrapped_home = toolkit_behind_wrapper()
if _wrapped_home:
    # cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = _wrapped_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# One toolkit for the whole build: the one cpp_extension compiles with, if it has an nvcc.
cuda_home = cpp_extension.CUDA_HOME if _has_nvcc(cpp_extension.CUDA_HOME) else None
with_cuda = cuda_build_requested(torch, cuda_home)
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
with_cuda = with_cuda and bool(cuda_sources)

sources = ["csrc/python_module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
# -fno-math-errno: nothing reads errno, and with it GCC cannot vectorize a loop
# that calls sqrt (csrc/cpu/block_steps.cpp's Adam step).
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fdiagnostics-color=always"]
define_macros = [("Py_LIMITED_API", "0x03090000")]
extension = CppExtension
extra_compile_args = {"cxx": cxx_flags}

if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    math_headers = wheel_math_headers()
    if math_headers and not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        include_dirs.append(math_headers)
    sources += cuda_sources
    extension = CUDAExtension
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]

# --- dce_kernels._emu: the csrc/kernels CUDA kernels compiled by g++ against the
# CPU emulator in csrc/emu (the `emulated` backend). Always built, never nvcc.
# (`make sanitize` builds its own ASan/UBSan copy: csrc/emu/build_sanitized.py.)
# The emulator's fiber switch is x86-64 assembly: elsewhere (e.g. aarch64 edge
# boards) the package builds without the emulated backend.
with_emulator = platform.machine().lower() in {"x86_64", "amd64"}
emu_cxx_flags = ["-O2", "-std=c++20", "-mfma", "-fvisibility=hidden", "-fdiagnostics-color=always"]
emu_extension = CppExtension(
    "dce_kernels._emu",
    ["csrc/emu/python_module.cpp", "csrc/emu/runtime.cpp", "csrc/emu/ops_emu.cpp",
     "csrc/emu/selftest.cpp", "csrc/emu/conv_args_emu.cpp"],
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=[("Py_LIMITED_API", "0x03090000")],
    extra_compile_args={"cxx": emu_cxx_flags},
    py_limited_api=True,
)

print(f"dce_kernels: building {'CPU+CUDA' if with_cuda else 'CPU-only'} extension"
      f" (torch {torch.__version__}, CUDA toolkit {cuda_home})")
if not with_cuda:
    # pip hides a build's output; stderr at least reaches `pip install -v` and the Makefile
    # prints `python -m dce_kernels` afterwards.
    print("dce_kernels: WARNING: no CUDA backend in this build (torch.version.cuda="
          f"{torch.version.cuda!r}, CUDA toolkit {cuda_home!r}); set DCE_FORCE_CUDA=1 to make "
          "this an error", file=sys.stderr)
# What `python -m dce_kernels` reports as "built against" (a build output, not in git).
with open(os.path.join(ROOT, "dce_kernels", "_build_info.json"), "w") as f:
    json.dump({"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
               "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
               "emulator": with_emulator}, f)

setup(
    packages=find_packages(include=["dce_kernels", "dce_kernels.*"]),
    package_data={"dce_kernels": ["_build_info.json"]},
    ext_modules=[
        extension(
            "dce_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        ),
    ] + ([emu_extension] if with_emulator else []),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
