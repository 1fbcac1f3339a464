"""``python -m dce_kernels``: which backends this installation has, and what it was built
against (the extension binds to the torch it was compiled with)."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys


def build_info() -> dict:
    """What setup.py recorded at build time (``_build_info.json``), or {} if missing."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def backends() -> dict[str, str]:
    """Backend name -> 'yes' or why not."""
    import torch

    from . import ops  # loads _C, which registers the ops

    op = "dce::channel_sparse_conv2d"
    found = {"cpu": "yes" if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
             else "no (the extension registered no CPU kernel)"}
    if importlib.util.find_spec("dce_kernels._emu") is None:
        found["emulated"] = ("no (not built: the emulator needs x86-64, this is "
                             f"{platform.machine()})")
    else:
        found["emulated"] = "yes"
    if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        impl = f" (implementation: {ops.get_cuda_conv_impl()}; DCE_CUDA_CONV=cudnn|igemm)"
        found["cuda"] = ("yes" if torch.cuda.is_available()
                         else "built, but no GPU is visible to torch") + impl
    else:
        found["cuda"] = "no (CPU-only build: torch without CUDA, no nvcc, or DCE_FORCE_CPU=1)"
    return found


def main() -> int:
    import torch

    info = build_info()
    print(f"dce_kernels {__import__('dce_kernels').__version__} at {os.path.dirname(__file__)}")
    print(f"built against: torch {info.get('torch', '?')}, CUDA {info.get('cuda') or 'none'}"
          f"{', archs ' + info['cuda_archs'] if info.get('cuda_archs') else ''}")
    print(f"running with:  torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
          f"Python {platform.python_version()}")
    for name, state in backends().items():
        print(f"  {name:9s} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
