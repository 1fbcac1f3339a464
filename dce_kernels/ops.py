"""Python face of the ``torch.ops.dce`` operators: the functional API, fake
kernels (for torch.compile / FakeTensor) and autograd registration.

The schemas live in csrc/op_schemas.h; the kernels in csrc/cpu (and csrc/cuda).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import _C  # noqa: F401  (loads the shared library, which registers the ops)
from .blocks import block_gradient, gather_block, scatter_block_

__all__ = ["channel_sparse_conv2d", "call_conv_op", "register_python_parts", "gather_block",
           "set_cuda_conv_impl", "get_cuda_conv_impl", "CUDA_CONV_IMPLS",
           "scatter_block_"]

_IntOrPair = Union[int, Sequence[int]]


def _argument_names(op: torch._ops.OpOverload) -> tuple[str, ...]:
    return tuple(argument.name for argument in op._schema.arguments)


# The arguments of the conv op and of its backward op, in schema order, read
# from the registered schemas (csrc/op_schemas.h defines them once for every
# namespace). This module and flops.py find arguments by these names, never by
# position; test_op_registration checks every namespace's schemas against
# these tuples, and the Python signatures that mirror them (the functional
# API, call_conv_op, the fakes) against the schemas.
CONV_ARGS = _argument_names(torch.ops.dce.channel_sparse_conv2d.default)
CONV_BACKWARD_ARGS = _argument_names(torch.ops.dce.channel_sparse_conv2d_backward.default)


def _resolve_padding(input, weight, stride, padding, dilation):
    """Turns nn.Conv2d-style string padding into ints, padding the input
    explicitly when 'same' needs more on one side than the other (even kernels)."""
    if not isinstance(padding, str):
        return input, _pair(padding)
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError("padding='same' is not supported for strided convolutions")
    left, right = [], []
    for d, k in zip(dilation, weight.shape[2:]):
        total = d * (k - 1)
        left.append(total // 2)
        right.append(total - total // 2)
    if left == right:
        return input, tuple(left)
    # F.pad takes (W_left, W_right, H_left, H_right).
    input = F.pad(input, [left[1], right[1], left[0], right[0]])
    return input, (0, 0)


def channel_sparse_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    stride: _IntOrPair = 1,
    padding: Union[_IntOrPair, str] = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    saliency_probe: Optional[torch.Tensor] = None,
    packed_input: bool = False,
    packed_output: bool = False,
    compact_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """2-D convolution over lists of active channels.

    Equals ``F.conv2d(input * mask_in, weight, bias, ...) * mask_out`` (bias only
    on active outputs), and so do its gradients, but reads only the input
    channels in ``in_idx`` and computes only the output channels in ``out_idx``.
    The result keeps the full channel width; inactive output channels are zero.

    ``in_idx`` / ``out_idx``: 1-D integer tensors of unique channel indices on the
    input's device. ``saliency_probe``: optional ``[out_channels]`` leaf tensor
    with ``requires_grad=True``; after backward its ``.grad`` holds the batch-mean
    Taylor saliency ``mean_n |mean_{h,w}(dL/dy * y)|`` of each active output
    channel (zero for inactive ones), reduced inside the backward kernel.
    Accepts batched (N, C, H, W) and unbatched (C, H, W) input, like F.conv2d.

    Packed layouts (``groups=1`` or a depthwise conv, ascending index lists):
    with ``packed_input`` the input holds only the channels of ``in_idx``, in that
    order (``input.shape[1] == len(in_idx)``; a depthwise conv needs ``in_idx``
    equal to ``out_idx`` for it); with ``packed_output`` the result holds only the
    channels of ``out_idx``. Chained layers that agree on a list pass
    narrow activations, as a physically narrower network would; the weight and
    all parameter gradients keep the layer's full shape either way.

    ``compact_weight`` (groups=1 or a depthwise conv): the weight's active block
    ``weight[out_idx][:, in_idx]`` (depthwise: ``weight[out_idx]``), if the caller
    already holds it, as ``ChannelSparseConv2d`` does: forward and backward use it
    instead of gathering it each. Its values are trusted to be that block; leave it
    None otherwise.
    """
    return call_conv_op(torch.ops.dce.channel_sparse_conv2d.default, input=input,
                        weight=weight, bias=bias, in_idx=in_idx, out_idx=out_idx, stride=stride,
                        padding=padding, dilation=dilation, groups=groups,
                        saliency_probe=saliency_probe, packed_input=packed_input,
                        packed_output=packed_output, compact_weight=compact_weight)


def call_conv_op(op, input, weight, bias, in_idx, out_idx, stride=1, padding=0, dilation=1,
                 groups=1, saliency_probe=None, packed_input=False, packed_output=False,
                 compact_weight=None):
    """Normalizes F.conv2d-style arguments (ints or pairs, string padding,
    unbatched input) and calls ``op``, any library's channel_sparse_conv2d."""
    stride, dilation = _pair(stride), _pair(dilation)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    input, padding = _resolve_padding(input, weight, stride, padding, dilation)
    # By keyword: the schema, not this call, decides the order.
    out = op(input=input, weight=weight, bias=bias, in_idx=in_idx, out_idx=out_idx,
             stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups,
             saliency_probe=saliency_probe, packed_input=packed_input,
             packed_output=packed_output, compact_weight=compact_weight)
    return out.squeeze(0) if unbatched else out


def _check_compact_weight_fake(compact_weight, weight, in_idx, out_idx, groups):
    if compact_weight is None:
        return
    torch._check(_has_weight_block(weight, groups),
                 lambda: "compact_weight needs groups == 1 or a depthwise conv")
    want = _compact_weight_shape(weight, in_idx, out_idx, groups)
    torch._check(tuple(compact_weight.shape) == tuple(want),
                 lambda: f"compact_weight shape {tuple(compact_weight.shape)} is not that of the "
                         f"active block {tuple(want)}")


def _forward_fake(input, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
                  saliency_probe, packed_input=False, packed_output=False, compact_weight=None):
    for name, idx in (("in_idx", in_idx), ("out_idx", out_idx)):
        torch._check(idx.dim() == 1, lambda: f"{name} must be a 1-D tensor of channel indices")
        # Without this, a meta index list would route a real call to this kernel.
        torch._check(idx.device == input.device,
                     lambda: f"{name} must be on the input's device ({input.device}), "
                             f"got {idx.device}")
    depthwise = _is_depthwise(weight, groups)
    _check_compact_weight_fake(compact_weight, weight, in_idx, out_idx, groups)
    if packed_input or packed_output:
        # Which grouped convs may pack depends on the lists' contents (equally many
        # channels of every conv group): the real kernel's to check, as a depthwise
        # conv's list equality is.
        torch._check(groups == 1 or depthwise or (in_idx.shape[0] % groups == 0
                                                  and out_idx.shape[0] % groups == 0),
                     lambda: "packed channel layouts need groups == 1, a depthwise conv or "
                             "a grouped conv with equally many channels of every conv group")
    if packed_input:
        torch._check(input.shape[1] == in_idx.shape[0],
                     lambda: f"packed input has {input.shape[1]} channels but in_idx lists "
                             f"{in_idx.shape[0]}")
        if depthwise:  # the lists' contents are the real kernel's to check
            torch._check(in_idx.shape[0] == out_idx.shape[0],
                         lambda: "a depthwise conv with packed_input needs in_idx equal to "
                                 "out_idx")
        # The full-width input the shape rule expects, built without touching data.
        input = input.new_empty((input.shape[0], weight.shape[1] * groups, *input.shape[2:]))
    # PyTorch's own conv shape rule (and its errors), evaluated on fake tensors.
    shape = list(F.conv2d(input, weight, None, stride, padding, dilation, groups).shape)
    if packed_output:
        shape[1] = out_idx.shape[0]
    return input.new_empty(shape)


def _is_depthwise(weight, groups) -> bool:
    return groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1


def _has_weight_block(weight, groups) -> bool:
    """Whether the active channels form a rectangular block of the weight (the C++
    has_weight_block): what compact_weight and compact_grad_weight hold."""
    return groups == 1 or _is_depthwise(weight, groups)


def _compact_weight_shape(weight, in_idx, out_idx, groups):
    """The shape of the weight's active block: compact_weight's, and compact_grad_weight's
    result's (op_schemas.h)."""
    return (out_idx.shape[0], in_idx.shape[0] if groups == 1 else weight.shape[1],
            *weight.shape[2:])


def _backward_fake(grad_output, input, weight, output, in_idx, out_idx, stride, padding,
                   dilation, groups, output_mask, packed_input=False, packed_output=False,
                   compact_grad_weight=False, compact_weight=None):
    want_input, want_weight, want_bias = output_mask
    _check_compact_weight_fake(compact_weight, weight, in_idx, out_idx, groups)
    torch._check(not compact_grad_weight or _has_weight_block(weight, groups),
                 lambda: "compact_grad_weight needs groups == 1 or a depthwise conv")
    weight_shape = (_compact_weight_shape(weight, in_idx, out_idx, groups)
                    if compact_grad_weight else weight.shape)
    return (
        input.new_empty(input.shape) if want_input else None,
        weight.new_empty(weight_shape) if want_weight else None,
        weight.new_empty(weight.shape[:1]) if want_bias else None,
        grad_output.new_empty(weight.shape[:1]) if output is not None else None,
    )


# The forward's arguments that its backward op takes again: the tensors are
# saved for backward, the rest kept on ctx.
_SAVED_TENSORS = ("input", "weight", "in_idx", "out_idx", "compact_weight")
_KEPT_PARAMS = ("stride", "padding", "dilation", "groups", "packed_input", "packed_output")


def _needs_grad(ctx, name: str) -> bool:
    return ctx.needs_input_grad[CONV_ARGS.index(name)]


def _setup_context(ctx, inputs, output):
    # inputs holds every argument, defaults filled in, in schema order.
    args = dict(zip(CONV_ARGS, inputs))
    # The output is kept only when saliency is wanted: it is h in sum(g * h).
    ctx.want_saliency = args["saliency_probe"] is not None and _needs_grad(ctx, "saliency_probe")
    ctx.has_bias = args["bias"] is not None
    ctx.params = {name: args[name] for name in _KEPT_PARAMS}
    saved = [args[name] for name in _SAVED_TENSORS]
    if ctx.want_saliency:
        saved.append(output)
    ctx.save_for_backward(*saved)


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        tensors = dict(zip(_SAVED_TENSORS, saved))
        output = saved[len(_SAVED_TENSORS)] if ctx.want_saliency else None
        mask = [_needs_grad(ctx, "input"), _needs_grad(ctx, "weight"),
                ctx.has_bias and _needs_grad(ctx, "bias")]
        weight, groups = tensors["weight"], ctx.params["groups"]
        # The weight gradient comes back as its active block, which block_gradient
        # writes into the full shape without touching the rest (blocks.py).
        as_block = mask[1] and _has_weight_block(weight, groups)
        grad_input, grad_weight, grad_bias, saliency = backward_op(
            grad_output=grad_output, output=output, output_mask=mask, **tensors, **ctx.params,
            compact_grad_weight=as_block)
        if as_block:
            grad_weight = block_gradient(weight, grad_weight, tensors["out_idx"],
                                         tensors["in_idx"] if groups == 1 else None)
        # One gradient per argument of the schema (None for the non-differentiable ones);
        # the saliency is the gradient of the probe.
        grads = {"input": grad_input, "weight": grad_weight, "bias": grad_bias,
                 "saliency_probe": saliency}
        return tuple(grads.get(name) for name in CONV_ARGS)

    return backward


def register_python_parts(namespace: str) -> None:
    """Fake kernels and autograd for one library of the dce schemas. The
    production library is ``dce``; the emulated CUDA kernels register the same
    schemas under their own namespace and call this too."""
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::channel_sparse_conv2d")(_forward_fake)
    torch.library.register_fake(f"{namespace}::channel_sparse_conv2d_backward")(_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::channel_sparse_conv2d",
        _make_backward(ops.channel_sparse_conv2d_backward.default),
        setup_context=_setup_context)


register_python_parts("dce")


# -- which implementation the CUDA backend runs (csrc/common/cuda_conv_impl.h) -------------

CUDA_CONV_IMPLS = ("cudnn", "igemm")


@torch.compiler.disable  # a process-wide switch: runs eagerly, never traced into a graph
def set_cuda_conv_impl(impl: str) -> None:
    """Chooses how the CUDA backend computes :func:`channel_sparse_conv2d`.

    ``"cudnn"`` (the default): our kernels gather the active planes, cuDNN
    convolves the compact tensors (tensor cores: TF32 where
    ``torch.backends.cudnn.allow_tf32``, fp16/bf16 under ``torch.autocast``),
    our kernels scatter the result and make the fused bias-gradient + saliency
    pass. ``"igemm"``: our own implicit-GEMM kernels (no gather copies, no
    tensor cores), the emulator-verified reference. The choice starts as the
    environment variable ``DCE_CUDA_CONV`` (unset: ``"cudnn"``), holds for the
    whole process, and is read at every call of the op, so compiled graphs
    follow it without recompiling. CPU tensors are unaffected."""
    torch.ops.dce.set_cuda_conv_impl(impl)


def get_cuda_conv_impl() -> str:
    """The CUDA backend's current implementation: ``"cudnn"`` or ``"igemm"``
    (see :func:`set_cuda_conv_impl`)."""
    return torch.ops.dce.get_cuda_conv_impl()


@torch.library.register_fake("dce::sgd_block_step_")
def _sgd_block_step_fake(param, grad, momentum_buffer, rows, cols, lr, momentum, dampening,
                         weight_decay, nesterov, maximize, fresh_buffer):
    return None


@torch.library.register_fake("dce::adam_block_step_")
def _adam_block_step_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, rows, cols, lr,
                          beta1, beta2, weight_decay, decoupled_weight_decay, eps, step_size,
                          bias_correction2_sqrt, maximize):
    return None
