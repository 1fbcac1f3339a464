"""FLOP and parameter counts that see only the active channels.

Importing this module registers FLOP formulas for ``torch.ops.dce.*`` with
``torch.utils.flop_counter``, so any ``FlopCounterMode`` created afterwards
counts our ops (without a formula they would count as zero). Conventions are
PyTorch's own for convolutions: 2 FLOPs per multiply-accumulate of the
convolution proper; bias adds, masking, gathers/scatters and the saliency
reduction are not counted (PyTorch counts no elementwise work either).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from .nn import ChannelSparseConv2d
from .ops import CONV_ARGS, CONV_BACKWARD_ARGS  # (and the ops exist before formulas name them)

__all__ = ["count_flops", "count_params"]


def _active_shapes(x_shape, w_shape, out_shape, n_in, n_out):
    """The shapes of the dense conv that the groups == 1 path really runs: input,
    weight and output narrowed to the active channels."""
    x = [x_shape[0], n_in, *x_shape[2:]]
    w = [n_out, n_in, *w_shape[2:]]
    out = [out_shape[0], n_out, *out_shape[2:]]
    return x, w, out


def _conv_shapes(x_shape, w_shape, out_shape, in_idx_shape, out_idx_shape, groups):
    n_in, n_out, channels = in_idx_shape[0], out_idx_shape[0], w_shape[0]
    if groups > 1 and groups == channels and w_shape[1] == 1 and n_out < channels:
        # A depthwise conv on its active output planes (csrc/common/compact_conv.h)
        # is a depthwise conv of n_out channels, whatever its input list.
        x = [x_shape[0], n_out, *x_shape[2:]]
        return x, [n_out, 1, *w_shape[2:]], [out_shape[0], n_out, *out_shape[2:]]
    if groups > 1:
        # groups > 1 runs a masked dense conv (csrc/cpu): every channel is computed,
        # so counting fewer would understate the work actually done.
        return list(x_shape), list(w_shape), list(out_shape)
    return _active_shapes(x_shape, w_shape, out_shape, in_idx_shape[0], out_idx_shape[0])


def _by_name(names, args, kwargs):
    """The op's arguments as the flop counter passes them (tensors as their
    shapes, the rest as they are), by schema name. Arguments left at their
    defaults may be missing; the formulas below need none of those."""
    return {**dict(zip(names, args)), **kwargs}


@register_flop_formula(torch.ops.dce.channel_sparse_conv2d)
def _forward_flop(*args, out_shape, **kwargs) -> int:
    a = _by_name(CONV_ARGS, args, kwargs)
    # The active shapes come from the index lists, so both layouts count alike.
    x, w, out = _conv_shapes(a["input"], a["weight"], out_shape, a["in_idx"], a["out_idx"],
                             a["groups"])
    return conv_flop_count(x, w, out)


@register_flop_formula(torch.ops.dce.channel_sparse_conv2d_backward)
def _backward_flop(*args, out_shape, **kwargs) -> int:
    a = _by_name(CONV_BACKWARD_ARGS, args, kwargs)
    output_mask = a["output_mask"]
    x, w, g = _conv_shapes(a["input"], a["weight"], a["grad_output"], a["in_idx"], a["out_idx"],
                           a["groups"])

    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    # As torch's conv_backward_flop: grad_input is a transposed conv of grad_output
    # with the weight, grad_weight a conv of the input with grad_output.
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(g, w, x, transposed=True)
    if output_mask[1]:
        flops += conv_flop_count(t(x), t(g), t(w))
    return flops


def count_flops(model: nn.Module, example_input: torch.Tensor, backward: bool = False) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_input`` (plus the
    backward of ``output.sum()`` w.r.t. the parameters if ``backward``), counted by
    ``FlopCounterMode``. The model runs in eval mode (BatchNorm statistics are not
    updated; its mode is restored afterwards) and parameter ``.grad`` is left
    untouched. Only what runs inside counts: convs and matmuls, not elementwise ops.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            if not backward:
                with torch.no_grad():
                    model(example_input)
            else:
                out = model(example_input)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"count_flops(backward=True) needs a model returning one "
                                    f"tensor, got {type(out).__name__}")
                params = [p for p in model.parameters() if p.requires_grad]
                if not params:
                    raise ValueError("count_flops(backward=True): the model has no trainable "
                                     "parameters")
                # autograd.grad rather than .backward(): the caller's .grad stays as it was.
                torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out),
                                    allow_unused=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


_Index = Union[torch.Tensor, Sequence[int]]


def _sparse_conv_params(conv: ChannelSparseConv2d) -> dict[int, int]:
    """Active parameter counts of one layer: weights linking an active output to
    an active input channel of its group, and the bias of active outputs."""
    per_group_in = conv.in_channels // conv.groups
    per_group_out = conv.out_channels // conv.groups
    in_active = torch.zeros(conv.in_channels, dtype=torch.bool)
    in_active[conv.in_idx.cpu()] = True
    # Active inputs per group; an active output sees those of its own group only.
    in_per_group = in_active.view(conv.groups, per_group_in).sum(1)
    out_group = conv.out_idx.cpu() // per_group_out
    kernel = conv.weight[0, 0].numel()
    counts = {id(conv.weight): int(in_per_group[out_group].sum()) * kernel}
    if conv.bias is not None:
        counts[id(conv.bias)] = conv.out_idx.numel()
    return counts


def count_params(model: nn.Module, active_only: bool = True,
                 per_channel: Optional[Mapping[nn.Module, _Index]] = None) -> int:
    """Number of parameters of ``model``, each shared tensor counted once.

    With ``active_only``, a ChannelSparseConv2d counts only the parameters of its
    active channels (see ``_sparse_conv_params``); every other layer counts fully.
    This function does not follow channel dependencies: a BatchNorm after a sparse
    conv counts all its channels unless ``per_channel`` maps it to the channel
    indices that stay active, in which case only those rows (dim 0) of each of its
    parameters count. ``active_only=False`` counts everything.
    """
    per_channel = dict(per_channel or {})
    counted: dict[int, int] = {}
    for module in model.modules():
        direct = dict(module.named_parameters(recurse=False))
        if active_only and isinstance(module, ChannelSparseConv2d):
            active = _sparse_conv_params(module)
        elif active_only and module in per_channel:
            n = torch.as_tensor(per_channel[module]).numel()
            active = {id(p): (p.numel() // p.shape[0]) * n for p in direct.values()}
        else:
            active = {id(p): p.numel() for p in direct.values()}
        for key, n in active.items():
            counted.setdefault(key, n)
    return sum(counted.values())
