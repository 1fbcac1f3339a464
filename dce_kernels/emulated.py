"""The ``emulated`` backends: the CUDA kernels of csrc/kernels compiled by g++
and executed on the CPU by the fiber-based CUDA emulator in csrc/emu, on both
paths of the CUDA backend: ``channel_sparse_conv2d`` (the ``"igemm"`` path, every
step emulated) and ``cudnn_channel_sparse_conv2d`` (the ``"cudnn"`` path: the
emulated memory-pass kernels around ``at::convolution`` on the CPU).

Same signature as :func:`dce_kernels.channel_sparse_conv2d`, CPU tensors in and
out, autograd and saliency included. It exists so the GPU kernels and their
launch code are tested on machines without a GPU; it is slow by design (one
fiber per CUDA thread) and not meant for training.

``DCE_EMU_LIBRARY=/path/to/lib.so`` loads a differently built copy of the
emulated library instead of ``dce_kernels._emu`` (``make sanitize`` uses it for
the AddressSanitizer/UBSan build).
"""
from __future__ import annotations

import inspect
import os

import torch

from . import ops
from .ops import call_conv_op, register_python_parts

_library = os.environ.get("DCE_EMU_LIBRARY")
if _library:
    torch.ops.load_library(_library)
else:
    from . import _emu  # noqa: F401  (registers dce_emu and dce_emu_test)

register_python_parts("dce_emu")
register_python_parts("dce_emu_cudnn")

__all__ = ["channel_sparse_conv2d", "cudnn_channel_sparse_conv2d"]


def channel_sparse_conv2d(*args, **kwargs):
    """:func:`dce_kernels.channel_sparse_conv2d`, computed by the emulated CUDA kernels."""
    return call_conv_op(torch.ops.dce_emu.channel_sparse_conv2d.default, *args, **kwargs)


def cudnn_channel_sparse_conv2d(*args, **kwargs):
    """:func:`dce_kernels.channel_sparse_conv2d` as the CUDA backend's ``"cudnn"`` path
    computes it: the compact-conv composition with the emulated gather, scatter and
    grad_output kernels, and ``at::convolution`` on CPU tensors in cuDNN's place."""
    return call_conv_op(torch.ops.dce_emu_cudnn.channel_sparse_conv2d.default, *args, **kwargs)


# Its arguments are call_conv_op's, which are the production function's: shown as
# such to help() and inspect instead of being written out a third time.
channel_sparse_conv2d.__signature__ = inspect.signature(ops.channel_sparse_conv2d)
cudnn_channel_sparse_conv2d.__signature__ = inspect.signature(ops.channel_sparse_conv2d)
