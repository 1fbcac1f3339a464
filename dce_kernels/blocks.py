"""Blocks of parameter-shaped tensors: the active rows (dim 0) and columns (dim 1)
with every trailing element. ``gather_block`` copies one out, ``scatter_block_``
writes one back, for the optimizer steps over active channels; ``block_gradient``
builds a layer's full-shape weight gradient from its block.

Why ``block_gradient`` keeps a buffer: the weight gradient of a channel-sparse
layer is zero outside its active block, and building it as a fresh zero tensor
and a scatter writes the parameter's whole size at every step, memory a narrow
network never touches (measured on VGG-16, about 5% of a step, within the
spread: bench/README.md). Instead each
parameter keeps one gradient buffer that is zero outside the block it last
held. A step zeroes that block, writes its own and hands autograd an alias of
the buffer, which autograd installs as ``param.grad`` without a copy (it takes
a gradient that nothing else holds). A step then writes only active memory, and
``param.grad`` reads as the exact full-shape gradient.

The buffer is written only while nothing but this module holds its memory,
which the storage's reference count tells exactly. Otherwise (``.grad`` still
holds the last step's gradient under gradient accumulation, a user kept a
reference to an old ``.grad``, the same weight is used twice in one backward)
the buffer is forgotten and a fresh gradient is built, as before. The same
fresh path serves gradients that are themselves differentiated
(``create_graph=True``), traced ones (torch.compile) and tensor subclasses.
Between steps the buffer holds the parameter's size of memory, as a ``.grad``
that is not set to None would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _C  # noqa: F401  (loads the shared library, which registers the ops)

__all__ = ["gather_block", "scatter_block_", "block_gradient"]


def gather_block(src: torch.Tensor, rows: Optional[torch.Tensor],
                 cols: Optional[torch.Tensor]) -> torch.Tensor:
    """``src[rows][:, cols]`` (None: all of that dim) as a new contiguous tensor.
    CPU tensors take our copy kernel; other devices ATen's index_select."""
    if src.device.type == "cpu":
        return torch.ops.dce.gather_block(src, rows, cols)
    block = src if rows is None else src.index_select(0, rows)
    return block if cols is None else block.index_select(1, cols)


def scatter_block_(dst: torch.Tensor, rows: Optional[torch.Tensor],
                   cols: Optional[torch.Tensor], block: torch.Tensor) -> None:
    """Writes ``block`` into ``dst[rows][:, cols]`` in place (the inverse of
    :func:`gather_block`); indices must be unique."""
    if dst.device.type == "cpu" and dst.is_contiguous():
        torch.ops.dce.scatter_block_(dst, rows, cols, block)
    elif rows is None:
        dst.index_copy_(1, cols, block)
    elif cols is None:
        dst.index_copy_(0, rows, block)
    else:
        dst.index_put_((rows.unsqueeze(1), cols), block)


@torch.library.register_fake("dce::gather_block")
def _gather_block_fake(src, rows, cols):
    shape = list(src.shape)
    if rows is not None:
        shape[0] = rows.shape[0]
    if cols is not None:
        shape[1] = cols.shape[0]
    return src.new_empty(shape)


@torch.library.register_fake("dce::scatter_block_")
def _scatter_block_fake(dst, rows, cols, block):
    return None


@dataclass
class _GradBuffer:
    grad: torch.Tensor                 # the parameter's shape, contiguous
    storage: torch.UntypedStorage      # held to read its reference count
    sole_refs: int                     # that count while only this entry holds it
    view: tuple                        # the shape the last block was written in
    rows: Optional[torch.Tensor]       # the last block (None: all, or nothing yet)
    cols: Optional[torch.Tensor]
    written: bool = False

    def fits(self, param: torch.Tensor) -> bool:
        g = self.grad
        return (g.shape == param.shape and g.dtype == param.dtype and g.device == param.device)

    def unshared(self) -> bool:
        return torch._C._storage_Use_Count(self.storage._cdata) == self.sole_refs


# One buffer per parameter, dropped with it (keyed by identity: tensors compare
# elementwise, so a plain weak dictionary cannot key them).
_BUFFERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _new_buffer(param: torch.Tensor) -> _GradBuffer:
    grad = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
    storage = grad.untyped_storage()
    return _GradBuffer(grad, storage, torch._C._storage_Use_Count(storage._cdata),
                       tuple(param.shape), None, None)


def _reuses_buffer(param: torch.Tensor, block: torch.Tensor) -> bool:
    # Gradients that are differentiated, traced or of a subclass take the fresh path.
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and type(param) in (torch.Tensor, torch.nn.Parameter)
            and type(block) is torch.Tensor and block.dtype == param.dtype
            and hasattr(torch._C, "_storage_Use_Count"))


def block_gradient(param: torch.Tensor, block: torch.Tensor, rows: Optional[torch.Tensor],
                   cols: Optional[torch.Tensor],
                   view: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The gradient of ``param`` (its full shape, contiguous) that is ``block`` at
    rows ``rows`` and columns ``cols`` of ``param`` viewed as ``view`` (default:
    its shape; None: all of that dim) and zero everywhere else. The result is
    for autograd to accumulate into ``param.grad``; see the module's text for
    when it is a reused buffer."""
    view = tuple(param.shape) if view is None else tuple(view)
    if not _reuses_buffer(param, block):
        grad = torch.zeros(param.shape, dtype=block.dtype, device=block.device)
        scatter_block_(grad.view(view), rows, cols, block)
        return grad
    entry = _BUFFERS.get(param)
    if entry is not None and not (entry.fits(param) and entry.unshared()):
        # Someone else holds its memory, or the parameter changed: forget it,
        # since what it holds outside the last block is no longer known.
        del _BUFFERS[param]
        entry = None
    if entry is None:
        entry = _BUFFERS[param] = _new_buffer(param)
    elif entry.written and not _same_block(entry, view, rows, cols):
        last = entry.grad.view(entry.view)
        shape = list(last.shape)
        if entry.rows is not None:
            shape[0] = entry.rows.numel()
        if entry.cols is not None:
            shape[1] = entry.cols.numel()
        scatter_block_(last, entry.rows, entry.cols, last.new_zeros(shape))
    scatter_block_(entry.grad.view(view), rows, cols, block)
    # Copies: a caller may refill its index tensors in place later.
    entry.view, entry.written = view, True
    entry.rows = None if rows is None else rows.clone()
    entry.cols = None if cols is None else cols.clone()
    return entry.grad.detach()  # an alias: autograd may take it as .grad


def _same_block(entry: _GradBuffer, view: tuple, rows, cols) -> bool:
    """Whether the last block is this one, so that writing it overwrites all of
    it. Compared on the CPU only: on a GPU the comparison would be a device
    read, and zeroing the last block costs less."""
    if entry.view != view:
        return False
    for last, now in ((entry.rows, rows), (entry.cols, cols)):
        if (last is None) != (now is None):
            return False
        if last is not None and not (last.is_cpu and now.is_cpu and torch.equal(last, now)):
            return False
    return True
