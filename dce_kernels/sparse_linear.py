"""The channel-sparse Linear as a function: only active output features are
computed, from only active input features, with the Taylor saliency of each
output feature reduced in its backward.

Pure PyTorch (an ``autograd.Function``): the work is two GEMMs over compact
operands (``torch.addmm``, i.e. MKL/oneDNN), and the gathers and scatters
around them touch ``O(batch * features)`` elements plus the compact weight,
which the backward reuses instead of gathering it again. The weight and bias
gradients keep the layer's full shape, zero outside the active block, as the
conv op's do; the weight's is written over its block only (blocks.block_gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from .blocks import block_gradient, gather_block

__all__ = ["channel_sparse_linear"]


def _block_args(weight: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor,
                out_all: bool, in_all: bool, in_run: int):
    """The weight and the rows and columns of its active block, for gather_block /
    scatter_block_: with ``in_run > 1`` the weight viewed as (out, in / run, run)
    and the active runs as columns, which copy as contiguous runs."""
    rows = None if out_all else out_idx
    if in_all:
        return weight, rows, None
    if in_run == 1:
        return weight, rows, in_idx
    view = weight.view(weight.shape[0], weight.shape[1] // in_run, in_run)
    return view, rows, in_idx[::in_run] // in_run


def _compact_weight(weight, out_idx, in_idx, out_all, in_all, in_run) -> torch.Tensor:
    if out_all and in_all:
        return weight
    src, rows, cols = _block_args(weight, out_idx, in_idx, out_all, in_all, in_run)
    return gather_block(src, rows, cols).reshape(out_idx.numel(), in_idx.numel())


class _ChannelSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, in_idx, out_idx, saliency_probe, packed_input, in_run):
        out_features, in_features = weight.shape
        in_all = in_idx.numel() == in_features
        out_all = out_idx.numel() == out_features
        lead = input.shape[:-1]
        x = input.reshape(-1, input.shape[-1])
        x_c = x if in_all or packed_input else x.index_select(1, in_idx)
        w_c = _compact_weight(weight, out_idx, in_idx, out_all, in_all, in_run)
        if bias is None:
            y_c = x_c @ w_c.t()
        else:
            y_c = torch.addmm(bias if out_all else bias.index_select(0, out_idx), x_c, w_c.t())
        if out_all:
            y = y_c
        else:
            y = y_c.new_zeros(x.shape[0], out_features).index_copy_(1, out_idx, y_c)
        ctx.want_saliency = saliency_probe is not None and ctx.needs_input_grad[5]
        ctx.has_bias = bias is not None
        # A packed input's gradient is packed too: "all" of its features are read.
        ctx.shapes = (tuple(input.shape), lead, in_all or packed_input, out_all)
        ctx.weight_shape = tuple(weight.shape)
        ctx.in_run = in_run
        ctx.save_for_backward(x_c, w_c, in_idx, out_idx, y_c if ctx.want_saliency else None,
                              weight)
        return y.reshape(*lead, out_features)

    @staticmethod
    def backward(ctx, grad_output):
        x_c, w_c, in_idx, out_idx, y_c, weight = ctx.saved_tensors
        input_shape, lead, in_all, out_all = ctx.shapes
        out_features, in_features = ctx.weight_shape
        g = grad_output.reshape(-1, out_features)
        g_c = g if out_all else g.index_select(1, out_idx)
        grad_input = grad_weight = grad_bias = saliency = None
        if ctx.needs_input_grad[0]:
            gi_c = g_c @ w_c
            grad_input = gi_c if in_all else \
                gi_c.new_zeros(g.shape[0], input_shape[-1]).index_copy_(1, in_idx, gi_c)
            grad_input = grad_input.reshape(input_shape)
        if ctx.needs_input_grad[1]:
            gw_c = g_c.t() @ x_c
            cols_all = in_idx.numel() == in_features
            if out_all and cols_all:
                grad_weight = gw_c
            else:
                view, rows, cols = _block_args(weight, out_idx, in_idx, out_all, cols_all,
                                               ctx.in_run)
                block = gw_c.contiguous()
                if cols is not None and view.dim() == 3:
                    block = block.view(block.shape[0], cols.numel(), ctx.in_run)
                grad_weight = block_gradient(weight, block, rows, cols, view.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb_c = g_c.sum(0)
            grad_bias = gb_c if out_all else \
                gb_c.new_zeros(out_features).index_copy_(0, out_idx, gb_c)
        if ctx.want_saliency:
            # The conv op's definition, mean_n |mean_space(g * y)|, where the
            # "space" of a Linear is every dim between the batch and the features
            # (none for (N, F) input; an unbatched (F,) input is one sample).
            samples = lead[0] if len(lead) else 1
            per_sample = (g_c * y_c).reshape(samples, -1, g_c.shape[1]).mean(1)
            s_c = per_sample.abs().mean(0)
            saliency = s_c if out_all else \
                s_c.new_zeros(out_features).index_copy_(0, out_idx, s_c)
        return grad_input, grad_weight, grad_bias, None, None, saliency, None, None


def channel_sparse_linear(input: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], in_idx: torch.Tensor,
                          out_idx: torch.Tensor,
                          saliency_probe: Optional[torch.Tensor] = None,
                          packed_input: bool = False, in_run: int = 1) -> torch.Tensor:
    """``F.linear(input * mask_in, weight, bias) * mask_out``, and its gradients,
    reading only the input features ``in_idx`` and computing only the output
    features ``out_idx`` (1-D int64 tensors of unique indices on the input's
    device; sorted lists read memory in order). Input ``(*, in_features)``;
    the result keeps the full width, inactive features zero.

    ``saliency_probe``: optional ``[out_features]`` leaf with
    ``requires_grad=True``; after backward its ``.grad`` holds the Taylor
    saliency ``mean_n |mean(dL/dy * y)|`` of each active output feature (the
    mean over the dims between batch and features, if any), zero for inactive
    ones: the conv op's saliency, so rewards of conv channels and hidden units
    are on one scale.

    ``packed_input``: the input holds only the features of ``in_idx``, in that
    order (``input.shape[-1] == len(in_idx)``), as a packed conv output
    flattened; its gradient is packed the same way.

    ``in_run``: ``in_idx`` lists whole runs of that many consecutive features,
    each starting at a multiple of it (the columns of active channels of a
    flattened (C, H, W) map, run = H * W): the weight block then moves in
    contiguous runs rather than single elements.
    """
    if weight.dim() != 2:
        raise ValueError(f"channel_sparse_linear: weight must be 2-D, got shape "
                         f"{tuple(weight.shape)}")
    width = in_idx.numel() if packed_input else weight.shape[1]
    if input.dim() == 0 or input.shape[-1] != width:
        what = "the packed input's" if packed_input else "the weight's"
        raise ValueError(f"channel_sparse_linear: input of shape {tuple(input.shape)} does not "
                         f"end in {what} {width} input features")
    for name, idx in (("in_idx", in_idx), ("out_idx", out_idx)):
        if idx.dim() != 1 or idx.dtype != torch.long or idx.device != input.device:
            raise ValueError(f"channel_sparse_linear: {name} must be a 1-D int64 tensor on the "
                             f"input's device, got {idx.dtype} of shape {tuple(idx.shape)} on "
                             f"{idx.device}")
    if in_run != 1:
        runs = in_idx.view(-1, in_run) if in_idx.numel() % in_run == 0 else None
        if (weight.shape[1] % in_run or runs is None or bool((runs[:, 0] % in_run).any())
                or not torch.equal(runs - runs[:, :1],
                                   torch.arange(in_run, device=in_idx.device).expand_as(runs))):
            raise ValueError(f"channel_sparse_linear: in_idx does not list whole runs of "
                             f"in_run={in_run} features")
    if saliency_probe is not None and saliency_probe.shape != (weight.shape[0],):
        raise ValueError(f"channel_sparse_linear: saliency_probe must have shape "
                         f"({weight.shape[0]},), got {tuple(saliency_probe.shape)}")
    return _ChannelSparseLinear.apply(input, weight, bias, in_idx, out_idx, saliency_probe,
                                      packed_input, in_run)
