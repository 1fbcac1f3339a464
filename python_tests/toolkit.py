"""What the test files share; no test module imports another.

- Backends: the implementations of the dce schemas present here. The
  ``backend`` fixture (conftest.py) runs a test once per backend.
- The masked reference, shared by no code with dce_kernels: PyTorch's own
  F.conv2d on masked tensors for one op call (``masked_conv2d``,
  ``masked_dense``), and the original layers of a converted model, masked with
  the sparse layers' channel lists (``MaskedReference``).
- ``ConvCase``: one convolution of a case table, by field name;
  ``run_case`` / ``check_call`` check one through a backend against the reference.
- Random channel selections, synthetic data, tiny training configurations, and
  the number of parameters a channel selection keeps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

import dce_kernels
from dce_kernels import (ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseGroupNorm,
                         ChannelSparseLayerNorm,
                         ChannelSparseLinear)
from dce_kernels.optim import ActiveBlock

Size = Union[int, tuple]


# -- backends ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """The functional API of one implementation of the dce schemas, and the device
    its tensors live on."""

    name: str
    conv: Callable  # same signature as dce_kernels.channel_sparse_conv2d
    device: str
    namespace: str  # its ops are torch.ops.<namespace>.*, for tests that call them directly
    # The CUDA backend's implementation this backend stands for (dce_kernels.set_cuda_conv_impl),
    # set for the duration of each test by the ``backend`` fixture; None: not a CUDA backend.
    cuda_conv_impl: Optional[str] = None

    @contextlib.contextmanager
    def active(self):
        """Sets the CUDA implementation this backend stands for, restoring the previous one."""
        if self.cuda_conv_impl is None:
            yield self
            return
        previous = dce_kernels.get_cuda_conv_impl()
        dce_kernels.set_cuda_conv_impl(self.cuda_conv_impl)
        try:
            yield self
        finally:
            dce_kernels.set_cuda_conv_impl(previous)

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def implements(self, op_name: str) -> bool:
        """Whether ``torch.ops.<namespace>.<op_name>`` exists with a kernel for this
        backend's device."""
        key = "CUDA" if self.device == "cuda" else "CPU"
        return hasattr(self.ops, op_name) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{self.namespace}::{op_name}", key)

    def __str__(self) -> str:
        return self.name


def available_backends() -> list[Backend]:
    found = [Backend("cpu", dce_kernels.channel_sparse_conv2d, "cpu", "dce")]
    # The emulator exists wherever its fiber switch does (x86-64); there, a
    # missing or broken build must fail the suite, not skip it silently.
    if platform.machine().lower() in {"x86_64", "amd64"}:
        from dce_kernels import emulated

        found.append(Backend("emulated", emulated.channel_sparse_conv2d, "cpu", "dce_emu"))
        found.append(Backend("emulated-cudnn", emulated.cudnn_channel_sparse_conv2d, "cpu",
                             "dce_emu_cudnn"))
    if torch.cuda.is_available():
        # Both implementations of the CUDA backend: "cuda" is the default (cudnn) path.
        found.append(Backend("cuda", dce_kernels.channel_sparse_conv2d, "cuda", "dce", "cudnn"))
        found.append(Backend("cuda-igemm", dce_kernels.channel_sparse_conv2d, "cuda", "dce",
                             "igemm"))
    return found


BACKENDS = available_backends()


# -- the masked reference of one op call ---------------------------------------------------

def channel_mask(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 at the channels (dim 1) of ``like`` that ``idx`` lists, 0 elsewhere, shaped to
    broadcast against ``like``, in its dtype and on its device."""
    mask = torch.zeros(like.shape[1], dtype=like.dtype, device=like.device)
    mask[idx.long().to(like.device)] = 1
    return mask.view(1, -1, *([1] * (like.dim() - 2)))


def masked_conv2d(x, w, b, in_idx, out_idx, stride=1, padding=0, dilation=1, groups=1):
    """The op contract, differentiable, in x's dtype and on its device:
    F.conv2d(x * mask_in, w, b) * mask_out."""
    h = F.conv2d(x * channel_mask(in_idx, x), w, b, stride, padding, dilation, groups)
    return h * channel_mask(out_idx, h)


@dataclass
class ReferenceResult:
    output: torch.Tensor
    grad_input: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None
    saliency: torch.Tensor


def masked_dense(input, weight, bias, in_idx, out_idx, grad_output, stride=1, padding=0,
                 dilation=1, groups=1) -> ReferenceResult:
    """``masked_conv2d`` in float64 on the CPU, its gradients for grad_output, and the
    saliency mean_n |mean_hw(dL/dh * h)| of the conv output h (from an autograd hook)."""
    x = input.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    b = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    m_in = channel_mask(in_idx, x)

    captured = {}
    h = F.conv2d(x * m_in, w, b, stride, padding, dilation, groups)
    h.register_hook(lambda g: captured.__setitem__("g", g))
    m_out = channel_mask(out_idx, h)
    y = h * m_out
    y.backward(grad_output.detach().double().cpu())

    g = captured["g"]
    saliency = (g * h.detach()).mean(dim=(2, 3)).abs().mean(dim=0) * m_out.view(-1)
    return ReferenceResult(
        output=y.detach(), grad_input=x.grad, grad_weight=w.grad,
        grad_bias=b.grad if b is not None else None, saliency=saliency)


def close_kwargs(dtype) -> dict:
    """rtol and atol of torch.testing.assert_close for an op result against masked_dense."""
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# Relative tolerance per dtype: the kernels accumulate in fp32 (fp64 for double)
# and round once on the way out; the bound is scaled by the largest reference value.
SCALED_TOLERANCE = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 4e-3,
                    torch.bfloat16: 2.5e-2}


def assert_close_scaled(got, want, dtype, what):
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to(torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() + 1.0
    err = (got - want).abs().max().item() if got.numel() else 0.0
    tol = SCALED_TOLERANCE[dtype]
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g}, {dtype})"


def complement(idx, n):
    """The channels of 0..n-1 that ``idx`` does not list, ascending."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


# -- convolution cases ---------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCase:
    """One convolution: the input's (batch, in_channels, height, width), the conv's
    geometry, and how many input and output channels are active (None: all)."""

    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    _: KW_ONLY
    kernel: Size = 3
    stride: Size = 1
    padding: Size = 1
    dilation: Size = 1
    groups: int = 1
    bias: bool = True
    active_in: Optional[int] = None
    active_out: Optional[int] = None
    name: str = ""  # the test id, when the generated one would not say why the case is there

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel

    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def tensors(self, dtype, device):
        """Random input, weight and (if the case has one) bias, drawn in ``dtype`` on
        ``device``."""
        x = torch.randn(self.batch, self.in_channels, self.height, self.width, dtype=dtype,
                        device=device)
        w = torch.randn(self.out_channels, self.in_channels // self.groups, *self.kernel_size,
                        dtype=dtype, device=device)
        b = torch.randn(self.out_channels, dtype=dtype, device=device) if self.bias else None
        return x, w, b

    def random_indices(self):
        """Random ``active_in`` input and ``active_out`` output channels, in random order."""
        in_idx = torch.randperm(self.in_channels)[:self.active_in or self.in_channels]
        out_idx = torch.randperm(self.out_channels)[:self.active_out or self.out_channels]
        return in_idx, out_idx

    def __str__(self) -> str:
        """The test id: ``name``, or the shape and every field not at its default."""
        if self.name:
            return self.name
        size = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
        parts = [f"N{self.batch}_ci{self.in_channels}_co{self.out_channels}_"
                 f"{self.height}x{self.width}"]
        for field, prefix in (("kernel", "k"), ("stride", "s"), ("padding", "p"),
                              ("dilation", "d"), ("groups", "g")):
            value = getattr(self, field)
            if value != _DEFAULTS[field]:
                parts.append(prefix + size(value))
        if not self.bias:
            parts.append("nobias")
        if self.active_in is not None or self.active_out is not None:
            parts.append(f"a{self.active_in or 'all'}-{self.active_out or 'all'}")
        return "_".join(parts)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConvCase)}


# The kernels' cases: every geometry the launchers handle, on few active channels.
KERNEL_CASES = [
    ConvCase(2, 5, 6, 7, 6, active_in=3, active_out=4),
    ConvCase(3, 17, 13, 11, 9, stride=2, active_in=11, active_out=7),
    ConvCase(1, 7, 5, 8, 10, kernel=(1, 3), stride=(2, 1), padding=(0, 1), bias=False,
             active_in=7, active_out=5),
    ConvCase(2, 8, 6, 9, 7, padding=2, dilation=2, groups=2, active_in=5, active_out=4),
    ConvCase(2, 6, 6, 9, 9, groups=6, active_in=4, active_out=3),
    ConvCase(1, 4, 9, 5, 5, kernel=5, padding=2, active_in=1, active_out=1),
    ConvCase(3, 3, 2, 6, 11, kernel=2, stride=3, padding=0, active_in=2, active_out=2),
    ConvCase(2, 9, 12, 10, 10, stride=2, padding=3, dilation=3, groups=3, bias=False,
             active_in=6, active_out=9),
]

# Shapes chosen to break the tiling of the csrc/kernels implicit GEMMs (block tile
# 64 x 64, K step 16; split-K for the weight gradient): sizes of 1, primes, exactly
# one tile, one short of and one past a tile, in every GEMM dimension of every kernel.
_POINTWISE = dict(kernel=1, padding=0)
TILING_CASES = [
    ConvCase(1, 1, 1, 1, 1, **_POINTWISE, active_in=1, active_out=1, name="all-ones"),
    ConvCase(1, 2, 67, 1, 1, **_POINTWISE, active_in=2, active_out=65,
             name="fwd/wgrad M one past a tile"),
    ConvCase(1, 2, 66, 1, 1, **_POINTWISE, bias=False, active_in=2, active_out=64,
             name="fwd/wgrad M exactly one tile"),
    ConvCase(1, 2, 64, 1, 1, **_POINTWISE, active_in=2, active_out=63,
             name="fwd/wgrad M one short"),
    ConvCase(1, 67, 2, 1, 1, **_POINTWISE, active_in=65, active_out=2,
             name="dgrad M and wgrad N one past a tile"),
    ConvCase(1, 3, 2, 5, 13, **_POINTWISE, active_in=3, active_out=2, name="fwd N = 65 pixels"),
    ConvCase(1, 3, 2, 8, 8, **_POINTWISE, active_in=3, active_out=2, name="fwd N = 64 pixels"),
    ConvCase(1, 3, 2, 7, 9, **_POINTWISE, active_in=3, active_out=2, name="fwd N = 63 pixels"),
    ConvCase(1, 17, 3, 5, 5, **_POINTWISE, active_in=17, active_out=3,
             name="fwd K = 17 (one past a K step)"),
    ConvCase(1, 16, 3, 5, 5, **_POINTWISE, active_in=16, active_out=3, name="fwd K = 16"),
    ConvCase(2, 3, 17, 4, 4, **_POINTWISE, active_in=2, active_out=17, name="dgrad K = 17"),
    ConvCase(4, 3, 5, 10, 10, active_in=2, active_out=3,
             name="wgrad split-K: 400 pixels, 3 splits"),
    ConvCase(3, 5, 7, 11, 11, active_in=3, active_out=5,
             name="wgrad 363 pixels: ragged last split"),
    ConvCase(1, 3, 2, 13, 11, kernel=7, stride=3, padding=2, active_in=2, active_out=2,
             name="prime spatial, stride 3, 7x7 kernel"),
    ConvCase(2, 5, 3, 11, 7, kernel=(1, 5), stride=(3, 2), padding=(0, 4), dilation=(1, 2),
             active_in=4, active_out=2, name="asymmetric everything"),
    ConvCase(1, 17, 17, 5, 7, groups=17, active_in=11, active_out=13,
             name="depthwise, 17 groups, prime"),
    ConvCase(1, 65, 3, 3, 3, active_in=65, active_out=3, name="wgrad N = 65*9 columns"),
]


# The op suite's cases, on every backend (the active channels are drawn per test).
OP_CASES = [
    ConvCase(1, 1, 1, 1, 1, kernel=1, padding=0, name="everything of size one"),
    ConvCase(2, 3, 5, 7, 7, name="the common 3x3 same-size conv"),
    ConvCase(3, 7, 4, 9, 6, stride=2, bias=False, name="stride 2, non-square input, no bias"),
    ConvCase(1, 5, 6, 8, 11, kernel=5, padding=2, name="5x5"),
    ConvCase(2, 4, 3, 10, 9, kernel=1, stride=3, padding=0, name="1x1, stride 3"),
    ConvCase(2, 6, 5, 11, 10, kernel=(3, 2), stride=(2, 1), padding=(1, 0),
             name="non-square kernel, mixed stride and padding"),
    ConvCase(1, 4, 4, 9, 9, padding=2, dilation=2, bias=False, name="dilation"),
    ConvCase(2, 3, 2, 3, 3, padding=0, name="output 1x1"),
    ConvCase(1, 2, 3, 2, 5, kernel=(2, 3), padding=(1, 0), dilation=(1, 2),
             name="tiny, everything odd"),
    ConvCase(3, 13, 11, 5, 7, name="prime channel counts"),
]


def run_case(conv, device, dtype, case: ConvCase, idx_dtype=torch.long):
    """Runs forward + backward (with saliency) of ``case`` through ``conv`` on random
    active channels and checks every result against the float64 masked reference."""
    in_idx, out_idx = case.random_indices()
    check_call(conv, device, dtype, case, in_idx, out_idx, idx_dtype=idx_dtype)


def check_call(conv, device, dtype, case: ConvCase, in_idx, out_idx, idx_dtype=torch.long,
               packed_input=False, packed_output=False):
    """Forward + backward (with saliency) of ``case`` through ``conv`` on the channels
    ``in_idx`` / ``out_idx`` (packed layouts as asked), every result checked against the
    float64 masked reference at full width, including the exact zeros."""
    cin, cout = case.in_channels, case.out_channels
    x64, w64, b64 = case.tensors(torch.float64, "cpu")
    x_full = x64.to(device, dtype)
    x = (x_full[:, in_idx.to(device)] if packed_input else x_full).detach().requires_grad_()
    w = w64.to(device, dtype).requires_grad_()
    b = b64.to(device, dtype).requires_grad_() if case.bias else None
    probe = torch.zeros(cout, device=device, dtype=dtype, requires_grad=True)
    y = conv(x, w, b, in_idx.to(device, idx_dtype), out_idx.to(device, idx_dtype), case.stride,
             case.padding, case.dilation, case.groups, saliency_probe=probe,
             packed_input=packed_input, packed_output=packed_output)
    gy64 = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy64.to(device, dtype))

    def full_width(t):  # a packed output-side tensor at the layer's full width
        if not packed_output:
            return t
        full = t.new_zeros(t.shape[0], cout, *t.shape[2:])
        full[:, out_idx] = t
        return full

    # The reference starts from the values the backend saw (rounded to dtype).
    xr = x_full.detach().cpu().double().requires_grad_()
    wr = w.detach().cpu().double().requires_grad_()
    br = b.detach().cpu().double().requires_grad_() if case.bias else None
    gyr = full_width(gy64.to(dtype).double())
    yr = masked_conv2d(xr, wr, br, in_idx, out_idx, **case.conv_args())
    yr.backward(gyr)
    # Saliency of h = the backend's own output, as the op contract defines it.
    h = full_width(y.detach().cpu().double())
    sal_ref = ((gyr * h).sum((2, 3)) / (yr.shape[2] * yr.shape[3])).abs().mean(0)

    assert_close_scaled(full_width(y.detach().cpu()), yr, dtype, "output")
    want_gx = xr.grad[:, in_idx] if packed_input else xr.grad
    assert_close_scaled(x.grad, want_gx, dtype, "grad_input")
    assert_close_scaled(w.grad, wr.grad, dtype, "grad_weight")
    if case.bias:
        assert_close_scaled(b.grad, br.grad, dtype, "grad_bias")
    assert_close_scaled(probe.grad, sal_ref, dtype, "saliency")

    off_out = complement(out_idx, cout).to(device)
    off_in = complement(in_idx, cin).to(device)
    if not packed_output:
        assert (y.detach()[:, off_out] == 0).all(), "inactive outputs must be exactly zero"
    if not packed_input:
        assert (x.grad[:, off_in] == 0).all(), "grad of inactive inputs must be exactly zero"
    assert (w.grad[off_out] == 0).all(), "grad of inactive weight rows must be exactly zero"
    if case.groups == 1:
        assert (w.grad[:, off_in] == 0).all(), "grad of inactive weight columns must be zero"
    assert (probe.grad[off_out] == 0).all(), "saliency of inactive outputs must be zero"
    if case.bias:
        assert (b.grad[off_out] == 0).all(), "grad_bias of inactive outputs must be zero"


# -- the masked reference of a converted model ---------------------------------------------

# Masks applied to functional batch_norm outputs of a reference (norm name -> sparse twin),
# set while a MaskedReference is active.
_FUNCTIONAL_NORM_MASKS: dict = {}


def _functional_norm_mask(y, name):
    twin = _FUNCTIONAL_NORM_MASKS.get(name)
    return y if twin is None else y * channel_mask(twin.active_idx, y)


def _dim_mask(idx, like, dim):
    """channel_mask along ``dim`` (1: channels; -1: a Linear's features)."""
    mask = channel_mask(idx, like.movedim(dim, 1))
    return mask.movedim(1, dim)


def masked_layer_norm(x, weight, bias, eps, idx):
    """LayerNorm over the last dim of ``x`` whose mean and variance run over the
    entries ``idx`` only, written out (no F.layer_norm); the others output zero."""
    mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    mask[idx.long().to(x.device)] = 1
    count = mask.sum()
    mean = (x * mask).sum(-1, keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * mask


def masked_group_norm(x, num_groups, weight, bias, eps, idx):
    """GroupNorm of (N, C, H, W) ``x`` whose mean and variance in each group run over
    the channels ``idx`` of that group only, written out (no F.group_norm); the others
    output zero."""
    n, c = x.shape[:2]
    mask = torch.zeros(c, dtype=x.dtype, device=x.device)
    mask[idx.long().to(x.device)] = 1
    xg = x.reshape(n, num_groups, c // num_groups, -1)
    mg = mask.view(1, num_groups, c // num_groups, 1)
    count = mg.sum(2, keepdim=True) * xg.shape[-1]
    mean = (xg * mg).sum((2, 3), keepdim=True) / count
    var = (((xg - mean) * mg) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y * mask.view(shape)


def _functional_layer_norm_mask(x, normalized_shape, weight=None, bias=None, eps=1e-5,
                                name=""):
    twin = _FUNCTIONAL_NORM_MASKS.get(name)
    if twin is None:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return masked_layer_norm(x, weight, bias, eps, twin.active_idx)


def capture_original(model: nn.Module) -> torch.fx.GraphModule:
    """The model's graph over its current (original) layers, shared, not copied:
    conversion shares the parameter tensors, so this reference shares them too but
    none of dce_kernels' code. A ``F.batch_norm`` on a module's own weight (timm's
    BatchNormAct2d) gets a hook node after it, named by that module, where
    MaskedReference masks its outputs as it masks nn.BatchNorm2d's. A ``F.layer_norm``
    on a module's own weight (timm's LayerNorm2d) runs, while a MaskedReference is
    active, over that module's twin's active channels only (``masked_layer_norm``).
    The graph is traced in the model's current mode (functional norms keep it)."""
    gm = torch.fx.symbolic_trace(model)
    for node in list(gm.graph.nodes):
        weight = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None) \
            if node.op == "call_function" else None
        if (getattr(node.target, "__name__", "") == "layer_norm"
                and isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            node.target = _functional_layer_norm_mask
            node.kwargs = {**node.kwargs, "name": weight.target.rpartition(".")[0]}
        weight = node.kwargs.get("weight") if node.op == "call_function" else None
        if (getattr(node.target, "__name__", "") == "batch_norm"
                and isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            with gm.graph.inserting_after(node):
                hook = gm.graph.call_function(_functional_norm_mask,
                                              (node, weight.target.rpartition(".")[0]))
            node.replace_all_uses_with(hook, delete_user_cb=lambda u: u is not hook)
    gm.recompile()
    return gm


class MaskedReference:
    """Hooks on the original layers (plain nn.Conv2d, nn.BatchNorm2d, nn.Linear) that
    apply the sparse layers' channel lists: each conv's and sparse Linear's inputs and
    outputs, each BatchNorm's outputs. They also check what makes skipping legal, without trusting
    the channel analysis: every input channel a sparse conv skips, and every Linear
    column it drops, must already be exactly zero here (else: ``violations``)."""

    def __init__(self, reference: torch.fx.GraphModule, converted: nn.Module,
                 linear_columns=()) -> None:
        self.reference = reference
        sparse = dict(converted.named_modules())
        self.handles = []
        self.violations: list[str] = []
        for name, layer in reference.named_modules():
            twin = sparse.get(name)
            if isinstance(layer, nn.Conv2d) and hasattr(twin, "out_idx"):
                self.handles.append(layer.register_forward_pre_hook(self._conv_in(name, twin)))
                self.handles.append(layer.register_forward_hook(self._conv_out(twin)))
            elif isinstance(layer, nn.BatchNorm2d) and hasattr(twin, "active_idx"):
                self.handles.append(layer.register_forward_hook(self._norm_out(twin)))
            elif isinstance(layer, nn.GroupNorm) and hasattr(twin, "active_idx"):
                self.handles.append(layer.register_forward_hook(
                    lambda m, args, y, twin=twin: masked_group_norm(
                        args[0], m.num_groups, m.weight, m.bias, m.eps, twin.active_idx)))
            elif isinstance(layer, nn.LayerNorm) and hasattr(twin, "active_idx"):
                # An nn.LayerNorm leaf (channels last): over the active channels only.
                self.handles.append(layer.register_forward_hook(
                    lambda m, args, y, twin=twin: masked_layer_norm(
                        args[0], m.weight, m.bias, m.eps, twin.active_idx)))
            elif isinstance(layer, nn.Linear) and hasattr(twin, "out_idx"):
                # A channel-sparse Linear: its input and output features (the last dim,
                # also of a channels-last map), as a conv's channels.
                self.handles.append(layer.register_forward_pre_hook(
                    self._conv_in(name, twin, dim=-1)))
                self.handles.append(layer.register_forward_hook(self._conv_out(twin, dim=-1)))
        for name, twin in sparse.items():
            if hasattr(twin, "active_idx") and not isinstance(
                    dict(reference.named_modules()).get(name),
                    (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                _FUNCTIONAL_NORM_MASKS[name] = twin
        names = {id(m): n for n, m in converted.named_modules()}
        for lin, cols in linear_columns:
            layer = reference.get_submodule(names[id(lin)])
            self.handles.append(layer.register_forward_pre_hook(self._linear_in(
                names[id(lin)], cols)))

    def _check_zero(self, name, x, keep, dim):
        drop = torch.ones(x.shape[dim], dtype=torch.bool)
        drop[keep.cpu()] = False
        if drop.any():
            skipped = x.detach().index_select(dim, drop.nonzero().squeeze(1).to(x.device))
            if skipped.abs().max() != 0:
                self.violations.append(name)

    def _conv_in(self, name, twin, dim=1):
        def hook(module, args):
            x = args[0]
            self._check_zero(name, x, twin.in_idx, dim)
            return (x * _dim_mask(twin.in_idx, x, dim),)
        return hook

    def _conv_out(self, twin, dim=1):
        return lambda module, args, y: y * _dim_mask(twin.out_idx, y, dim)

    def _norm_out(self, twin):
        return lambda module, args, y: y * channel_mask(twin.active_idx, y)

    def _linear_in(self, name, cols):
        def hook(module, args):
            self._check_zero(name, args[0], cols, -1)  # features: the last dim
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        _FUNCTIONAL_NORM_MASKS.clear()


def inactive_mask(block):
    """True outside an ActiveBlock's active rows and columns (over the whole tensor)."""
    if block.view is not None:
        viewed = ActiveBlock(block.param.detach().view(block.view), block.rows, block.cols)
        return inactive_mask(viewed).reshape(block.param.shape)
    p = block.param
    rows = block.rows if block.rows is not None else torch.arange(p.shape[0])
    if p.dim() == 1:
        active = torch.zeros(p.shape[0], dtype=torch.bool)
        active[rows] = True
        return ~active
    cols = block.cols if block.cols is not None else torch.arange(p.shape[1])
    active = torch.zeros(p.shape[:2], dtype=torch.bool)
    active[rows.unsqueeze(1), cols] = True
    return (~active).reshape(*p.shape[:2], *([1] * (p.dim() - 2))).expand(p.shape)


def cucb_steps_touch_only_active_blocks(model, plan, steps, batch, check_saliency=None):
    """``steps`` CUCB training steps (p = 0.5, SGD with momentum and weight decay) on
    ``batch(generator)``'s ``(x, y)``: every step's loss is finite and leaves every weight
    outside the active blocks unchanged; ``check_saliency(saliency, selection)`` may
    check more before the selector learns. Returns the selector."""
    from dce_kernels import CUCBSelector, MaskedOptimizer

    selector = CUCBSelector(plan.num_channels, fraction=0.5, tau=1, seed=0, blocks=plan.blocks)
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                          weight_decay=1e-4), plan.active_blocks)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        plan.apply(selector.select())
        frozen = [(b.param, inactive_mask(b)) for b in plan.active_blocks()]
        before = [p.detach()[mask].clone() for p, mask in frozen]
        x, y = batch(gen)
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for (param, mask), kept in zip(frozen, before):
            assert torch.equal(param.detach()[mask], kept)
        saliency = plan.saliency()
        if check_saliency is not None:
            check_saliency(saliency, plan.selection)
        selector.update(saliency)
    return selector


def randomize_norms(model):
    # Default BatchNorms (weight 1, bias 0) map a zero channel to zero: a
    # BatchNorm left dense by mistake would go unnoticed. Random ones do not.
    # LayerNorms get random affine parameters too (a mistake in which channels'
    # weight applies is invisible with all weights 1).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def _grads(model, x, params, seed):
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, [x] + params, g, allow_unused=True)


def _close(a, b, tol):
    """Equal up to rounding, measured against the tensor's scale (gradients of
    deep networks with random BatchNorms reach 1e4, and elements that cancel
    out carry the rounding of the large ones)."""
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def check_against_reference(model, ref, plan, x, atol=1e-10):
    """Outputs and gradients (input and every parameter) of the sparse model equal
    the masked reference's; returns the reference's skip violations."""
    masked = MaskedReference(ref, model, plan.linear_columns())
    try:
        params = [p for p in model.parameters()]
        xs = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        out, grads = _grads(model, xs, params, 7)
        ref_out, ref_grads = _grads(ref, xr, params, 7)
    finally:
        masked.remove()
    assert _close(out, ref_out, atol)
    for a, b in zip(grads, ref_grads):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert _close(a, b, atol)
    return masked.violations


# -- channel selections and what they keep -------------------------------------------------

def random_index(num_channels: int, fraction: float, generator=None) -> torch.Tensor:
    """A random subset of channels (at least one), in random order."""
    k = max(1, round(num_channels * fraction))
    return torch.randperm(num_channels, generator=generator)[:k]


def balanced_index(channels: int, groups: int, per_group: int) -> torch.Tensor:
    """Ascending channels, ``per_group`` random ones of each of ``groups`` equal runs."""
    run = channels // groups
    return torch.cat([torch.randperm(run)[:per_group].sort().values + g * run
                      for g in range(groups)])


def random_selection(num_channels, fraction: Union[float, tuple[float, float]] = (0.3, 0.8),
                     generator=None, blocks=None) -> list[torch.Tensor]:
    """One random index list per channel group. ``fraction``: that share of every
    group (``random_index``), or a range (lo, hi) to draw a share from per group,
    keeping at least one channel and, where there are two, skipping at least one.
    ``blocks`` (a plan's): a group of ``b > 1`` blocks gets the same random number of
    random channels in each of its runs, ascending."""
    selection = []
    for c, b in zip(num_channels, blocks or [1] * len(num_channels)):
        if b > 1:
            run = c // b
            share = (float(torch.empty(1).uniform_(*fraction, generator=generator))
                     if isinstance(fraction, tuple) else fraction)
            k = max(1, min(run - 1, round(run * share))) if run > 1 else 1
            selection.append(torch.cat([torch.randperm(run, generator=generator)[:k].sort().values
                                        + r * run for r in range(b)]))
        elif isinstance(fraction, tuple):
            share = float(torch.empty(1).uniform_(*fraction, generator=generator))
            k = max(1, min(c - 1, round(c * share)))
            selection.append(torch.randperm(c, generator=generator)[:k])
        else:
            selection.append(random_index(c, fraction, generator))
    return selection


def active_parameter_count(model: nn.Module, plan) -> int:
    """The parameters of the active channels, counted from each sparse layer's index
    lists (no dce_kernels code): what the compact model of ``plan``'s selection holds."""
    columns = {id(lin): cols for lin, cols in plan.linear_columns()}
    # Per-channel scales (layer scale): the entries of the active channels.
    scales = {id(getattr(owner, attr)): idx.numel() for owner, attr, idx in plan.scale_channels()}
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, ChannelSparseConv2d):
            per_group_in = module.in_channels // module.groups
            per_group_out = module.out_channels // module.groups
            # Each active output reads the active inputs of its own group.
            inputs_per_group = torch.bincount(module.in_idx.cpu() // per_group_in,
                                              minlength=module.groups)
            reads = inputs_per_group[module.out_idx.cpu() // per_group_out].sum()
            total += int(reads) * module.weight[0, 0].numel()
            total += module.out_idx.numel() if module.bias is not None else 0
        elif isinstance(module, ChannelSparseBatchNorm2d):
            total += 2 * module.active_idx.numel() if module.affine else 0
        elif isinstance(module, (ChannelSparseLayerNorm, ChannelSparseGroupNorm)):
            total += module.active_idx.numel() * sum(
                p is not None for p in (module.weight, module.bias))
        elif isinstance(module, ChannelSparseLinear):
            total += module.out_idx.numel() * module.in_idx.numel()
            total += module.out_idx.numel() if module.bias is not None else 0
        elif id(module) in columns:
            total += module.out_features * columns[id(module)].numel()
            total += module.bias.numel() if module.bias is not None else 0
        else:
            fresh = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in fresh)
            total += sum(scales.get(id(p), p.numel()) for p in fresh)
    return total


# -- small models, synthetic data, tiny training runs --------------------------------------

def small_sparse_net(in_ch=3, widths=(6, 8, 5), classes=4) -> nn.Sequential:
    """Three sparse conv + sparse BatchNorm + ReLU stages (a max pool after the first,
    a bias in the second conv only), then pool, flatten, dropout and a Linear."""
    layers, c = [], in_ch
    for i, w in enumerate(widths):
        layers += [ChannelSparseConv2d(c, w, 3, padding=1, bias=(i == 1)),
                   ChannelSparseBatchNorm2d(w), nn.ReLU()]
        if i == 0:
            layers.append(nn.MaxPool2d(2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.0), nn.Linear(c * 4, classes)]
    return nn.Sequential(*layers)


def synthetic_dataset(n: int, seed: Union[int, torch.Generator], size: int = 10,
                      patch: int = 4, classes: int = 3) -> TensorDataset:
    """One-channel ``size`` x ``size`` noise images of ``classes`` classes with a
    learnable signal: the label added to the top-left ``patch`` x ``patch`` pixels.
    ``seed``: a seed, or a generator to draw from."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, size, size, generator=g)
    x[:, 0, :patch, :patch] += y.view(-1, 1, 1).float()
    return TensorDataset(x, y)


def tiny_datasets(train: int = 48, test: int = 24, seed: int = 1):
    """(train, test) synthetic datasets, seeded ``seed`` and ``seed + 1``."""
    return synthetic_dataset(train, seed), synthetic_dataset(test, seed + 1)


def tiny_config(**overrides):
    """The TrainConfig of a run small enough for a sweep of them in a test."""
    from dce_kernels.experiments.train import TrainConfig

    # The poster's options (the defaults are the ablation's winner, tested elsewhere).
    base = dict(model="vgg11", width=0.125, explore_epochs=2, finetune_epochs=1, batch_size=16,
                tau=2, progress=False, budget="layer", reward="max", lr_schedule="restart",
                lr=0.05, finetune_lr=0.01)
    return TrainConfig(**{**base, **overrides})


# -- host reads ---------------------------------------------------------------------

# The aten ops that read a tensor back to the host (or, on a GPU, wait for the device):
# item/bool/int/float, nonzero and what calls it (boolean indexing, masked_select), unique.
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive", "equal", "is_nonzero"}


class NoHostReads(TorchDispatchMode):
    """Raises on every op that reads a tensor to the host; ``tolist``/``numpy`` (which
    bypass the dispatcher on the CPU) are patched to count instead: ``reads``."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = []
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                self.reads.append((_name, t.numel()))
                return _real(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _HOST_READS or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else []))):
            raise AssertionError(f"a tensor was read to the host: aten.{name}")
        return func(*args, **(kwargs or {}))
