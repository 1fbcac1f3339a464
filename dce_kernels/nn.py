"""Layers built on the channel-sparse ops."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import gather_block
from .ops import channel_sparse_conv2d
from .sparse_linear import channel_sparse_linear

__all__ = ["ChannelSparseConv2d", "ChannelSparseLinear", "ChannelSparseBatchNorm2d",
           "ChannelSparseGroupNorm",
           "ChannelSparseNormAct", "ChannelSparseLayerNorm", "CHANNEL_SPARSE_NORMS"]

_Index = Optional[Union[torch.Tensor, Sequence[int]]]


def _as_index(idx: _Index, num_channels: int, device: torch.device, name: str) -> torch.Tensor:
    """Checks a user's channel list once, here, so that errors name the layer
    argument; the op checks again on every call (it cannot trust its caller)."""
    if idx is None:
        return torch.arange(num_channels, device=device)
    try:
        t = torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a list or tensor of integer channel indices, got "
                        f"{idx!r}") from e
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: at least one channel must stay active")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer channel indices, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.long)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_channels:
        raise ValueError(f"{name} has channel {lo if lo < 0 else hi}, outside [0, {num_channels})")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} contains a channel more than once")
    # Sorted lists keep the gathers walking memory forwards; order has no meaning.
    return torch.sort(t).values


class _TaylorSaliency(torch.autograd.Function):
    """The identity on a conv's output whose backward delivers the Taylor
    saliency ``mean_n |mean_{h,w}(dL/dy * y)|`` as the gradient of the layer's
    probe: what the sparse op's backward reduces in its kernel, for the layer's
    dense path (every channel active), which runs plain ``F.conv2d``."""

    @staticmethod
    def forward(ctx, output, probe):
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad):
        (output,) = ctx.saved_tensors
        per_sample = (grad * output).mean((-2, -1)).abs()
        return grad, per_sample.mean(0) if per_sample.dim() == 2 else per_sample




class _SaliencyDelivery:
    """The saliency probe of a channel-sparse layer with ``num_outputs`` outputs:
    a leaf whose gradient the backward fills with the saliency; a hook moves it
    into the ``saliency`` buffer so it never accumulates across steps."""

    _num_outputs: int

    def _make_probe(self) -> None:
        probe = torch.zeros(self._num_outputs, dtype=self.weight.dtype,
                            device=self.weight.device, requires_grad=True)
        probe.register_post_accumulate_grad_hook(self._store_saliency)
        self._saliency_probe = probe

    def _store_saliency(self, probe: torch.Tensor) -> None:
        with torch.no_grad():
            self.saliency.copy_(probe.grad)
        probe.grad = None

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild the probe tensor without its hook:
        # give the copy a probe of its own, or its saliency would never arrive.
        super().__setstate__(state)
        if self.weight.device.type != "meta":
            self._make_probe()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.weight.device.type != "meta":
            self._make_probe()
        return result


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Each output channel reads only its own input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def is_grouped(conv: nn.Conv2d) -> bool:
    """``groups > 1`` and not depthwise: each output reads the ``in_channels /
    groups`` inputs of its own conv group."""
    return conv.groups > 1 and not is_depthwise(conv)


def run_counts(idx: torch.Tensor, channels: int, runs: int) -> torch.Tensor:
    """How many of the channels ``idx`` lie in each of ``runs`` equal runs of
    ``channels`` (conv groups, GroupNorm groups, a channel group's blocks), on the
    host: a narrow grouped conv or GroupNorm needs them all equal."""
    return torch.bincount(idx.cpu() // (channels // runs), minlength=runs)


def grouped_columns(in_idx: torch.Tensor, out_idx: torch.Tensor, in_channels: int,
                    groups: int) -> torch.Tensor:
    """For a grouped conv whose ascending lists hold equally many channels of every
    conv group: ``[len(out_idx), len(in_idx) / groups]``, row ``k`` the columns of
    its conv group's weight (``0 .. in_channels / groups``) that output
    ``out_idx[k]`` reads from the active inputs. The narrow conv's weight is
    ``weight[out_idx]`` gathered at these columns (the op's composition does the
    same, csrc/common/compact_conv.h)."""
    per_in, per_out = in_idx.numel() // groups, out_idx.numel() // groups
    starts = torch.arange(groups, device=in_idx.device).unsqueeze(1) * (in_channels // groups)
    return (in_idx.view(groups, per_in) - starts).repeat_interleave(per_out, 0)


class ChannelSparseConv2d(_SaliencyDelivery, nn.Conv2d):
    """An ``nn.Conv2d`` that computes only over lists of active channels.

    Same constructor, parameters and ``state_dict`` keys as ``nn.Conv2d``; with
    all channels active (the default) it computes exactly what ``nn.Conv2d``
    computes, for every configuration ``nn.Conv2d`` accepts: padding modes,
    string padding, groups, unbatched input. ``set_active`` restricts the layer
    to some output and input channels; inactive output channels are zero and
    inactive input channels are never read.

    After each backward in training mode, :attr:`saliency` holds the batch-mean
    Taylor saliency ``mean_n |mean_{h,w}(dL/dy * y)|`` of every output channel
    (zero for inactive ones), computed inside the backward kernel. Saliency needs
    the layer's output as it was: do not modify it in place (e.g. an in-place
    ReLU directly after the conv); set ``track_saliency = False`` if you must.

    ``groups > 1``: a depthwise conv computes only its active output planes; a
    grouped conv whose lists hold equally many channels of every conv group
    (what a channel group's ``blocks`` give it) runs as a narrower grouped conv
    (:func:`grouped_columns`); other lists take a masked dense path (correct,
    no faster than dense). With every channel active the layer runs ``F.conv2d`` itself
    (and the saliency as a light autograd step): full activation costs what
    ``nn.Conv2d`` costs.

    Layouts: by default input and output keep the full channel width.
    ``packed_input`` / ``packed_output`` (set by a
    :class:`~dce_kernels.channels.ChannelPlan` on the layers of a channel group
    that nothing else reads) make the layer take and return only its active
    channels, in ascending channel order, so that activations between sparse
    layers are as narrow as in a physically narrower network.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.track_saliency = True
        self.packed_input = False
        self.packed_output = False
        self._init_channel_state()

    @property
    def _num_outputs(self) -> int:
        return self.out_channels

    def _init_channel_state(self) -> None:
        """All channels active, zero saliency and a fresh probe, on the weight's device."""
        device, dtype = self.weight.device, self.weight.dtype
        # Non-persistent: state_dict keys stay exactly nn.Conv2d's.
        self.register_buffer("in_idx", torch.arange(self.in_channels, device=device),
                             persistent=False)
        self.register_buffer("out_idx", torch.arange(self.out_channels, device=device),
                             persistent=False)
        self.register_buffer("saliency", torch.zeros(self.out_channels, dtype=dtype, device=device),
                             persistent=False)
        self._make_probe()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "ChannelSparseConv2d":
        """A ChannelSparseConv2d sharing ``conv``'s parameters (not copies), so
        an optimizer that holds them keeps training the same tensors."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device="meta", dtype=conv.weight.dtype)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_channel_state()  # built on "meta" above; now on the parameters' device
        layer.train(conv.training)
        return layer

    # -- active channels -------------------------------------------------------

    def set_active(self, out_idx: _Index = None, in_idx: _Index = None) -> None:
        """Activates the given output and input channels; None means all."""
        device = self.weight.device
        self._use_channels(_as_index(out_idx, self.out_channels, device, "out_idx"),
                           _as_index(in_idx, self.in_channels, device, "in_idx"))

    def _use_channels(self, out_idx: torch.Tensor, in_idx: torch.Tensor) -> None:
        # Lists already in _as_index's form (sorted, unique, in range, int64 on
        # the weight's device): ChannelPlan checks each group once per step and
        # need not have every layer check the same lists again. Straight into the buffer
        # table: Module.__setattr__'s generic checks cost more than the rest of a plan's
        # apply, at every layer of every step.
        self._buffers["out_idx"], self._buffers["in_idx"] = out_idx, in_idx

    @property
    def all_active(self) -> bool:
        return (self.out_idx.numel() == self.out_channels
                and self.in_idx.numel() == self.in_channels)

    @property
    def active_out_channels(self) -> int:
        return self.out_idx.numel()

    @property
    def active_in_channels(self) -> int:
        return self.in_idx.numel()

    # -- forward ---------------------------------------------------------------

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        probe = None
        if self.track_saliency and self.training and torch.is_grad_enabled():
            probe = self._saliency_probe
        padding = self.padding
        if self.padding_mode != "zeros":
            # As nn.Conv2d does: pad explicitly, then convolve without padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if self.all_active:
            # A packed layout of every channel is the full layout.
            out = F.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                           self.groups)
            return out if probe is None else _TaylorSaliency.apply(out, probe)
        return channel_sparse_conv2d(input, self.weight, self.bias, self.in_idx, self.out_idx,
                                     self.stride, padding, self.dilation, self.groups,
                                     saliency_probe=probe, packed_input=self.packed_input,
                                     packed_output=self.packed_output,
                                     compact_weight=self._active_weight())

    def _active_weight(self) -> Optional[torch.Tensor]:
        """The weight's active block, gathered once for forward and backward, when a
        backward will run; None where the op gathers what it needs itself (no
        backward, a grouped conv, or every channel listed)."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return None
        rows = self.out_idx if self.out_idx.numel() < self.out_channels else None
        if is_depthwise(self):
            return None if rows is None else gather_block(self.weight.detach(), rows, None)
        if self.groups != 1:
            return None
        cols = self.in_idx if self.in_idx.numel() < self.in_channels else None
        if rows is None and cols is None:
            return None
        # A list that holds every channel may still be in any order.
        return gather_block(self.weight.detach(), self.out_idx, self.in_idx)

    def extra_repr(self) -> str:
        packed = [side for side, on in (("input", self.packed_input),
                                         ("output", self.packed_output)) if on]
        return (super().extra_repr() + f", active_out={self.active_out_channels}"
                f", active_in={self.active_in_channels}"
                + (f", packed={'+'.join(packed)}" if packed else ""))


class ChannelSparseLinear(_SaliencyDelivery, nn.Linear):
    """An ``nn.Linear`` that computes only lists of active output and input features.

    The Linear counterpart of :class:`ChannelSparseConv2d`: same constructor,
    parameters and ``state_dict`` keys as ``nn.Linear``; with every feature
    active it computes what ``nn.Linear`` computes. ``set_active`` restricts it
    to some output features (the others are zero) and input features (the
    others are never read; with ``packed_input``, set by a
    :class:`~dce_kernels.channels.ChannelPlan` like a conv's, the input holds
    only them, in order). The hidden units of a classifier
    (``Linear -> ReLU -> Linear``) become a channel group this way, and a Linear
    reading a flattened conv map reads only the active channels' columns.

    After each backward in training mode, :attr:`saliency` holds the Taylor
    saliency ``mean_n |dL/dy * y|`` of every output feature (the conv layers'
    definition, whose spatial mean is over no dims here; zero for inactive
    features). Like the conv, it needs its output unmodified in backward.
    Input and output keep the full feature width.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.track_saliency = True
        self.packed_input = False
        self.in_run = 1
        self._init_channel_state()

    @property
    def _num_outputs(self) -> int:
        return self.out_features

    def _init_channel_state(self) -> None:
        device, dtype = self.weight.device, self.weight.dtype
        self.register_buffer("in_idx", torch.arange(self.in_features, device=device),
                             persistent=False)
        self.register_buffer("out_idx", torch.arange(self.out_features, device=device),
                             persistent=False)
        self.register_buffer("saliency", torch.zeros(self.out_features, dtype=dtype,
                                                     device=device), persistent=False)
        self._make_probe()

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "ChannelSparseLinear":
        """A ChannelSparseLinear sharing ``linear``'s parameters (not copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.packed_input = False
        layer.in_run = 1
        layer._init_channel_state()
        layer.train(linear.training)
        return layer

    def set_active(self, out_idx: _Index = None, in_idx: _Index = None) -> None:
        """Activates the given output and input features; None means all."""
        device = self.weight.device
        self._use_channels(_as_index(out_idx, self.out_features, device, "out_idx"),
                           _as_index(in_idx, self.in_features, device, "in_idx"))

    def _use_channels(self, out_idx: torch.Tensor, in_idx: torch.Tensor, in_run: int = 1
                      ) -> None:
        # Lists already in _as_index's form (see ChannelSparseConv2d._use_channels);
        # in_run: in_idx lists whole runs of that many features (a plan's channels).
        self.out_idx, self.in_idx, self.in_run = out_idx, in_idx, in_run

    @property
    def active_out_features(self) -> int:
        return self.out_idx.numel()

    @property
    def active_in_features(self) -> int:
        return self.in_idx.numel()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        probe = None
        if self.track_saliency and self.training and torch.is_grad_enabled():
            probe = self._saliency_probe
        return channel_sparse_linear(input, self.weight, self.bias, self.in_idx, self.out_idx,
                                     saliency_probe=probe, packed_input=self.packed_input,
                                     in_run=self.in_run)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", active_out={self.active_out_features}"
                f", active_in={self.active_in_features}"
                + (", packed=input" if self.packed_input else ""))


class _ActiveChannels:
    """The list of active channels of a channel-sparse norm: ``active_idx``, a
    non-persistent buffer (state_dict keys stay the norm's own), all channels
    until :meth:`set_active` says otherwise."""

    num_features: int

    def _init_active(self, device) -> None:
        self.register_buffer("active_idx", torch.arange(self.num_features, device=device),
                             persistent=False)

    def set_active(self, idx: _Index = None) -> None:
        """Activates the given channels; None means all."""
        self._use_channels(_as_index(idx, self.num_features, self.active_idx.device, "idx"))

    def _use_channels(self, idx: torch.Tensor) -> None:
        # A list already in _as_index's form (see ChannelSparseConv2d._use_channels).
        self._buffers["active_idx"] = idx

    @property
    def active_channels(self) -> int:
        return self.active_idx.numel()

    @classmethod
    def _sharing(cls, module: nn.Module):
        """An instance of ``cls`` holding ``module``'s parameters, buffers, attributes
        and children (shared, not copied) in registries of its own, so that registering
        ``active_idx`` leaves ``module`` alone."""
        layer = cls.__new__(cls)
        state = dict(module.__dict__)
        for key, value in state.items():
            if key.startswith("_") and isinstance(value, dict):
                state[key] = type(value)(value)
        layer.__dict__.update(state)
        return layer


class ChannelSparseBatchNorm2d(_ActiveChannels, nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` that normalizes only a list of active channels.

    Same constructor and ``state_dict`` keys as ``nn.BatchNorm2d``. Active
    channels are normalized exactly as ``nn.BatchNorm2d`` would normalize them;
    inactive channels output zero (as the sparse conv before them does, so
    ReLU/pooling keep them zero), get no gradient, and their running statistics
    are left untouched: a channel that does not run is not measured.
    ``num_batches_tracked`` is one counter per layer, so with ``momentum=None``
    (cumulative averaging) channels share the layer's count.

    With ``packed`` (set by a :class:`~dce_kernels.channels.ChannelPlan`, like
    the conv layouts) input and output hold only the active channels, in
    ascending order.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed = False
        self._init_active(self.running_mean.device if self.running_mean is not None else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.active_idx.numel() == self.num_features:
            return super().forward(input)
        return self._forward_active(input)

    def _forward_active(self, input: torch.Tensor) -> torch.Tensor:
        """Normalizes the active channels (all of them, if all are active) with
        :meth:`_normalize` and keeps the running statistics of the others."""
        idx = self.active_idx
        full = idx.numel() == self.num_features
        self._check_input_dim(input)
        if input.dim() != 4:
            raise ValueError("ChannelSparseBatchNorm2d with inactive channels needs (N, C, H, W)")
        if self.packed and input.shape[1] != idx.numel():
            raise ValueError(f"packed input has {input.shape[1]} channels, but {idx.numel()} "
                             "are active")
        training = self.training or self.running_mean is None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        # Gathered copies of the active statistics: the normalization updates them
        # in place, and only they are written back.
        mean = var = None
        if self.running_mean is not None:
            mean, var = self.running_mean[idx], self.running_var[idx]
        weight = self.weight[idx] if self.weight is not None else None
        bias = self.bias[idx] if self.bias is not None else None
        active = self._normalize(input if self.packed or full else input.index_select(1, idx),
                                 mean, var, weight, bias, training, momentum)
        if self.training and mean is not None:
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, mean)
                self.running_var.index_copy_(0, idx, var)
        if self.packed or full:
            return active
        return input.new_zeros(input.shape).index_copy(1, idx, active)

    def _normalize(self, x: torch.Tensor, mean: Optional[torch.Tensor],
                   var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], training: bool, momentum: float) -> torch.Tensor:
        """Batch norm of the active channels ``x``; updates ``mean``/``var`` in place."""
        return F.batch_norm(x, mean, var, weight, bias, training, momentum, self.eps)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", active={self.active_channels}"
                + (", packed" if self.packed else ""))


class ChannelSparseNormAct(ChannelSparseBatchNorm2d):
    """A channel-sparse stand-in for a BatchNorm2d *subclass* of another library
    whose forward calls ``F.batch_norm`` on its own parameters and then runs some
    of its channel-wise children (timm's ``BatchNormAct2d``: ``drop``, ``act``).

    Made by :meth:`from_module` from the module itself: the same attributes,
    parameters, buffers and children (shared, not copied), so ``state_dict`` keys
    stay the original's. With every channel active it runs the original class's
    own forward; otherwise the channel-sparse normalization, then the children
    named in ``after``, in order (what :func:`dce_kernels.convert` read off the
    trace of that forward). ``dense_type`` is the original class, which
    :func:`dce_kernels.compact_model` exports again.
    """

    dense_type: type
    after: tuple[str, ...]

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, after: Sequence[str]) -> "ChannelSparseNormAct":
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected a BatchNorm2d subclass, got {type(bn).__name__}")
        missing = [n for n in after if n not in bn._modules]
        if missing:
            raise ValueError(f"{type(bn).__name__} has no child module {missing[0]!r}")
        layer = cls._sharing(bn)
        layer.dense_type = type(bn)
        layer.after = tuple(after)
        layer.packed = False
        device = bn.running_mean.device if bn.running_mean is not None else None
        layer.register_buffer("active_idx", torch.arange(bn.num_features, device=device),
                              persistent=False)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.active_idx.numel() == self.num_features:
            return self.dense_type.forward(self, input)
        out = super().forward(input)
        for name in self.after:
            out = self._modules[name](out)
        return out

    def extra_repr(self) -> str:
        return f"{self.dense_type.__name__}, " + super().extra_repr()


class ChannelSparseLayerNorm(_ActiveChannels, nn.LayerNorm):
    """A LayerNorm over the channels of a tensor that normalizes over a list of
    active channels only.

    A LayerNorm over channels mixes them: its mean and variance run over all of
    them. Here they run over the active channels alone, exactly as the compact
    model's LayerNorm, which holds only the active channels (with their weight
    and bias), computes them; inactive channels output zero and get no gradient.
    With every channel active it is the LayerNorm it was made from.

    ``channel_dim``: where the channels are. ``-1``: the last dim (``nn.LayerNorm(C)``
    on a channels-last (N, H, W, C) tensor; what the constructor, ``nn.LayerNorm``'s
    own, makes). ``1``: a (N, C, H, W) tensor, permuted to channels last, normalized
    and permuted back (timm's ``LayerNorm2d``). :meth:`from_module` makes one from
    an ``nn.LayerNorm`` or a subclass whose forward is one of those two (what
    :func:`dce_kernels.convert` establishes from the trace), sharing its parameters;
    ``dense_type`` is that module's class, which runs the all-active forward and
    which :func:`dce_kernels.compact_model` exports again.

    With ``packed`` (set by a :class:`~dce_kernels.channels.ChannelPlan`) input
    and output hold only the active channels, in ascending order.
    """

    dense_type: type
    channel_dim: int

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_sparse(nn.LayerNorm, -1)

    def _init_sparse(self, dense_type: type, channel_dim: int) -> None:
        if len(self.normalized_shape) != 1:
            raise ValueError("ChannelSparseLayerNorm normalizes over one dim (the channels), "
                             f"got normalized_shape={tuple(self.normalized_shape)}")
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (N, C, H, W) or -1 (channels last), "
                             f"got {channel_dim}")
        self.dense_type = dense_type
        self.channel_dim = channel_dim
        self.packed = False
        self._init_active(self.weight.device if self.weight is not None else None)

    @classmethod
    def from_module(cls, ln: nn.LayerNorm, channel_dim: int) -> "ChannelSparseLayerNorm":
        """The channel-sparse twin of ``ln`` (its parameters, attributes and
        children shared, not copied), whose forward normalizes over ``channel_dim``."""
        if not isinstance(ln, nn.LayerNorm):
            raise TypeError(f"expected an nn.LayerNorm or a subclass, got {type(ln).__name__}")
        layer = cls._sharing(ln)
        layer._init_sparse(type(ln), channel_dim)
        return layer

    @property
    def num_features(self) -> int:
        return self.normalized_shape[0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.active_idx.numel() == self.num_features and not self.packed:
            return self.dense_type.forward(self, input)
        idx = self.active_idx
        x = input if self.channel_dim == -1 else input.movedim(1, -1)
        if self.packed:
            if x.shape[-1] != idx.numel():
                raise ValueError(f"packed input has {x.shape[-1]} channels, but "
                                 f"{idx.numel()} are active")
            active = x
        else:
            if x.shape[-1] != self.num_features:
                raise ValueError(f"input has {x.shape[-1]} channels in dim {self.channel_dim}, "
                                 f"the LayerNorm {self.num_features}")
            active = x.index_select(-1, idx)
        weight = self.weight.index_select(0, idx) if self.weight is not None else None
        bias = self.bias.index_select(0, idx) if self.bias is not None else None
        out = F.layer_norm(active, (idx.numel(),), weight, bias, self.eps)
        if not self.packed:
            out = x.new_zeros(x.shape).index_copy(-1, idx, out)
        return out if self.channel_dim == -1 else out.movedim(-1, 1)

    def extra_repr(self) -> str:
        return (f"{self.dense_type.__name__}, " + super().extra_repr()
                + f", channel_dim={self.channel_dim}, active={self.active_channels}"
                + (", packed" if self.packed else ""))


# The channel-sparse norms: what the ``norms`` of a channel group hold (``active_idx``,
# ``set_active``, ``packed``, ``num_features``, per-channel ``weight`` and ``bias``).
class ChannelSparseGroupNorm(_ActiveChannels, nn.GroupNorm):
    """An ``nn.GroupNorm`` that normalizes each group over its active channels only.

    GroupNorm mixes the channels of a group: its mean and variance run over them
    all. Here they run over the active ones, exactly as the compact model's
    ``nn.GroupNorm(num_groups, active channels)`` computes them, which needs
    equally many active channels in every group, in ascending order: a channel
    group's ``blocks`` (a multiple of ``num_groups``) give a
    :class:`~dce_kernels.channels.ChannelPlan`'s lists that form, and
    :meth:`set_active` checks it. Inactive channels output zero and get no
    gradient. With every channel active it is ``nn.GroupNorm``.

    With ``packed`` (set by a :class:`~dce_kernels.channels.ChannelPlan`) input
    and output hold only the active channels, in ascending order.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed = False
        self._init_active(self.weight.device if self.weight is not None else None)

    @classmethod
    def from_module(cls, gn: nn.GroupNorm) -> "ChannelSparseGroupNorm":
        """A ChannelSparseGroupNorm sharing ``gn``'s parameters (not copies)."""
        if type(gn) is not nn.GroupNorm:
            raise TypeError(f"from_module expects an nn.GroupNorm, got {type(gn).__name__}")
        layer = cls(gn.num_groups, gn.num_channels, eps=gn.eps, affine=gn.affine,
                    device="meta", dtype=gn.weight.dtype if gn.affine else None)
        layer.weight, layer.bias = gn.weight, gn.bias
        layer._init_active(gn.weight.device if gn.affine else None)
        layer.train(gn.training)
        return layer

    @property
    def num_features(self) -> int:
        return self.num_channels

    def set_active(self, idx: _Index = None) -> None:
        """Activates the given channels (equally many of every group); None means all."""
        idx = _as_index(idx, self.num_features, self.active_idx.device, "idx")
        per_group = run_counts(idx, self.num_channels, self.num_groups)
        if not (per_group == per_group[0]).all():
            raise ValueError(f"a GroupNorm of {self.num_groups} groups needs equally many "
                             f"active channels in every group, got {per_group.tolist()}")
        self._use_channels(idx)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        idx = self.active_idx
        if idx.numel() == self.num_features and not self.packed:
            return super().forward(input)
        if self.packed:
            if input.shape[1] != idx.numel():
                raise ValueError(f"packed input has {input.shape[1]} channels, but "
                                 f"{idx.numel()} are active")
            active = input
        else:
            if input.shape[1] != self.num_features:
                raise ValueError(f"input has {input.shape[1]} channels, the GroupNorm "
                                 f"{self.num_features}")
            active = input.index_select(1, idx)
        weight = self.weight.index_select(0, idx) if self.weight is not None else None
        bias = self.bias.index_select(0, idx) if self.bias is not None else None
        out = F.group_norm(active, self.num_groups, weight, bias, self.eps)
        if self.packed:
            return out
        return input.new_zeros(input.shape).index_copy(1, idx, out)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", active={self.active_channels}"
                + (", packed" if self.packed else ""))


CHANNEL_SPARSE_NORMS = (ChannelSparseBatchNorm2d, ChannelSparseLayerNorm, ChannelSparseGroupNorm)
