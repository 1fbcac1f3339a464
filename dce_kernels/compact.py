"""Export of the physically smaller network that a channel selection defines.

``compact_model`` copies a model whose channels have been selected (a
:class:`~dce_kernels.channels.ChannelPlan` applied) and replaces every
channel-sparse layer by a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
holding only the active channels (a Linear: its active output features and the
columns of the active channels it reads), and slices the other Linear layers
that read them. In eval mode
it computes what the sparse model computes (inactive channels there are exactly
zero, and nothing downstream reads them).

Converted models (:func:`dce_kernels.convert`) export the same way: producers
tied through a residual add all keep the same channel list, so both inputs of
the add shrink alike; a layer after a concatenation keeps the union of the
offset-shifted selections, in order, which is exactly the concatenation of the
compacted inputs (a group seen twice, GhostNet's ``cat([x1, cheap(x1)])``, at both
offsets, and a conv tied to such a concatenation likewise); a depthwise conv
keeps its active channels as a narrower depthwise conv, a grouped conv (equally many
active channels per conv group, as its groups' blocks ensure) as a narrower conv of
as many groups; a LayerNorm over channels
becomes its own class over the active channels, and a per-channel scale (layer
scale) keeps their entries. Slices, ``narrow`` and ``split`` run with the model's
own constants: convert keeps the channels before every position they cut at, so
they pick the same channels here.

``export_compact`` writes it as a ``state_dict`` and as a ``torch.export``
program (``.pt2``), which ``torch.export.load`` runs without dce_kernels, or
(``format="onnx"``) as an ONNX file made from that program by
``torch.onnx.export`` (needs ``onnxscript``), which onnxruntime runs.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import nn

from .atomic import write_atomic
from .channels.group import SPEC_ATTR
from .channels.plan import ChannelPlan
from .nn import (CHANNEL_SPARSE_NORMS, ChannelSparseBatchNorm2d, ChannelSparseConv2d,
                 ChannelSparseGroupNorm, ChannelSparseLayerNorm, ChannelSparseLinear,
                 ChannelSparseNormAct, grouped_columns, is_depthwise, is_grouped, run_counts)

__all__ = ["compact_model", "export_compact", "export_paths", "load_exported"]


def _balanced(idx: torch.Tensor, channels: int, groups: int) -> bool:
    """Ascending, with equally many channels of each of ``groups`` equal runs."""
    per_run = run_counts(idx, channels, groups)
    return bool((per_run == per_run[0]).all()) and bool((idx[1:] > idx[:-1]).all())


def _plain_conv(conv: ChannelSparseConv2d) -> nn.Conv2d:
    out_idx, in_idx = conv.out_idx.cpu(), conv.in_idx.cpu()
    groups = conv.groups
    partial = out_idx.numel() != conv.out_channels or in_idx.numel() != conv.in_channels
    if partial and is_depthwise(conv):
        if not torch.equal(out_idx, in_idx):
            raise ValueError("compacting a depthwise conv needs its active inputs and outputs "
                             "to agree")
        groups = out_idx.numel()  # still depthwise, over the active channels only
    elif partial and groups > 1 and not (_balanced(out_idx, conv.out_channels, groups)
                                         and _balanced(in_idx, conv.in_channels, groups)):
        raise ValueError(f"compacting a grouped conv (groups={groups}) needs equally many "
                         "active channels in every conv group, of its inputs and of its "
                         "outputs (a channel group's blocks)")
    plain = nn.Conv2d(in_idx.numel(), out_idx.numel(), conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        weight = conv.weight.index_select(0, conv.out_idx)
        if conv.groups == 1:
            weight = weight.index_select(1, conv.in_idx)
        elif is_grouped(conv):  # a narrower grouped conv of as many groups
            cols = grouped_columns(conv.in_idx, conv.out_idx, conv.in_channels, groups)
            weight = weight.gather(1, cols[:, :, None, None].expand(-1, -1, *weight.shape[2:]))
        plain.weight.copy_(weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias.index_select(0, conv.out_idx))
    plain.train(conv.training)
    return plain


def _plain_linear(lin: ChannelSparseLinear) -> nn.Linear:
    plain = nn.Linear(lin.in_idx.numel(), lin.out_idx.numel(), bias=lin.bias is not None,
                      device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(lin.weight.index_select(0, lin.out_idx).index_select(1, lin.in_idx))
        if lin.bias is not None:
            plain.bias.copy_(lin.bias.index_select(0, lin.out_idx))
    plain.train(lin.training)
    return plain


def _restored(layer: nn.Module, sparse_attrs: tuple[str, ...],
              buffers: tuple[str, ...] = ()) -> nn.Module:
    """``layer``'s original class again (its ``dense_type``), holding a copy of its
    state without the channel-sparse attributes (``dense_type``, ``packed``,
    ``sparse_attrs``, the ``active_idx`` buffer), its weight, bias and ``buffers``
    narrowed to the active channels. The caller sets the narrower size."""
    idx = layer.active_idx
    state = copy.deepcopy(layer).__dict__
    state["_buffers"].pop("active_idx")
    for attr in ("dense_type", "packed", *sparse_attrs):
        state.pop(attr)
    plain = layer.dense_type.__new__(layer.dense_type)
    plain.__dict__.update(state)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(layer, name) is not None:
                setattr(plain, name,
                        nn.Parameter(getattr(layer, name).index_select(0, idx).clone()))
        for name in buffers:
            if getattr(layer, name) is not None:
                setattr(plain, name, getattr(layer, name).index_select(0, idx).clone())
    return plain


def _restored_norm(bn: ChannelSparseNormAct) -> nn.BatchNorm2d:
    """The original class again (timm's BatchNormAct2d, with its activation), holding
    a copy of ``bn``'s state narrowed to the active channels."""
    plain = _restored(bn, ("after",), ("running_mean", "running_var"))
    plain.num_features = bn.active_idx.numel()
    return plain


def _plain_norm(bn: ChannelSparseBatchNorm2d) -> nn.BatchNorm2d:
    if isinstance(bn, ChannelSparseNormAct):
        return _restored_norm(bn)
    idx = bn.active_idx
    plain = nn.BatchNorm2d(idx.numel(), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats,
                           device=idx.device, dtype=(bn.weight.dtype if bn.weight is not None
                                                     else torch.float32))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(plain, name).copy_(src.index_select(0, idx))
        if bn.num_batches_tracked is not None:
            plain.num_batches_tracked.copy_(bn.num_batches_tracked)
    plain.train(bn.training)
    return plain


def _plain_group_norm(gn: ChannelSparseGroupNorm) -> nn.GroupNorm:
    """As many groups over the active channels (equally many of each group)."""
    idx = gn.active_idx
    plain = nn.GroupNorm(gn.num_groups, idx.numel(), eps=gn.eps, affine=gn.affine,
                         device=idx.device, dtype=gn.weight.dtype if gn.affine else None)
    if gn.affine:
        with torch.no_grad():
            plain.weight.copy_(gn.weight.index_select(0, idx))
            plain.bias.copy_(gn.bias.index_select(0, idx))
    plain.train(gn.training)
    return plain


def _plain_layer_norm(ln: ChannelSparseLayerNorm) -> nn.LayerNorm:
    """The LayerNorm's own class again (``dense_type``: nn.LayerNorm, timm's
    LayerNorm2d), over the active channels only: what the sparse layer computes."""
    plain = _restored(ln, ("channel_dim",))
    plain.normalized_shape = (ln.active_idx.numel(),)
    return plain


def _sliced_scale(scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The entries ``idx`` of a per-channel scale, in its own shape ([C] ->
    [k], [1, C, 1, 1] -> [1, k, 1, 1])."""
    dim = max(range(scale.dim()), key=lambda d: scale.shape[d]) if scale.dim() else 0
    shape = [1] * scale.dim()
    if shape:
        shape[dim] = idx.numel()
    return scale.detach().reshape(-1).index_select(0, idx).reshape(shape).clone()


def compact_model(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """A copy of ``model`` with only the active channels, of plain torch layers."""
    if not isinstance(plan, ChannelPlan):
        raise TypeError(f"compact_model needs the model's ChannelPlan (plan_for(model)), "
                        f"got {type(plan).__name__}")
    if plan.model is not model:
        raise ValueError("the plan belongs to another model")
    for g in plan.groups:
        if not g.readers_known and g.producer.out_idx.numel() != g.num_channels:
            raise ValueError(f"group {g.name!r}: the layers reading its channels are unknown "
                             "(the model was converted without a torch.fx graph), so its "
                             "channels cannot be removed")
    names = {id(m): n for n, m in model.named_modules()}
    compact = copy.deepcopy(model)
    # The copy is plain torch: the channel groups convert recorded no longer apply.
    compact.__dict__.pop(SPEC_ATTR, None)
    # Plain Linears (subclasses convert left alone) read the active columns.
    for lin, cols in plan.linear_columns():
        if isinstance(lin, ChannelSparseLinear):
            continue  # replaced below, with its own rows and columns
        target = compact.get_submodule(names[id(lin)])
        with torch.no_grad():
            target.weight = nn.Parameter(lin.weight.index_select(1, cols).clone())
        target.in_features = cols.numel()
    # Per-channel scales (layer scale) keep the entries of the active channels.
    for owner, attr, idx in plan.scale_channels():
        target = compact.get_submodule(names[id(owner)])
        scale = getattr(owner, attr)
        sliced = _sliced_scale(scale, idx)
        if isinstance(scale, nn.Parameter):
            setattr(target, attr, nn.Parameter(sliced, requires_grad=scale.requires_grad))
        else:
            setattr(target, attr, sliced)
    for name, module in list(model.named_modules()):
        if isinstance(module, ChannelSparseConv2d):
            plain = _plain_conv(module)
        elif isinstance(module, ChannelSparseLinear):
            plain = _plain_linear(module)
        elif isinstance(module, ChannelSparseBatchNorm2d):
            plain = _plain_norm(module)
        elif isinstance(module, ChannelSparseLayerNorm):
            plain = _plain_layer_norm(module)
        elif isinstance(module, ChannelSparseGroupNorm):
            plain = _plain_group_norm(module)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = compact.get_submodule(parent_name) if parent_name else compact
        setattr(parent, attr, plain)
    return compact


EXPORT_FORMATS = ("torch.export", "onnx")
_PROGRAM_FILE = {"torch.export": ("program", ".pt2"), "onnx": ("onnx", ".onnx")}


def export_paths(directory: str, stem: str = "compact",
                 format: str = "torch.export") -> dict[str, str]:
    """The files :func:`export_compact` writes: ``state_dict`` and, by ``format``,
    ``program`` (``.pt2``) or ``onnx`` (``.onnx``)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, "
                         f"got {format!r}")
    key, suffix = _PROGRAM_FILE[format]
    return {"state_dict": os.path.join(directory, f"{stem}_state_dict.pt"),
            key: os.path.join(directory, f"{stem}{suffix}")}


def export_compact(compact: nn.Module, example_input: torch.Tensor, directory: str,
                   stem: str = "compact", format: str = "torch.export") -> dict[str, str]:
    """Writes ``<stem>_state_dict.pt`` and the eval-mode program into
    ``directory`` and returns their paths: ``"state_dict"`` and, for ``format``
    ``"torch.export"``, ``"program"`` (``<stem>.pt2``), for ``"onnx"``, ``"onnx"``
    (``<stem>.onnx``: input ``"input"``, output ``"logits"``). The batch size
    is dynamic in both."""
    export_paths(directory, stem, format)  # refuses an unknown format before any work
    if any(isinstance(m, (ChannelSparseConv2d, ChannelSparseLinear) + CHANNEL_SPARSE_NORMS)
           for m in compact.modules()):
        raise ValueError("export_compact expects compact_model's result; this model still "
                         "has channel-sparse layers")
    os.makedirs(directory, exist_ok=True)
    was_training = compact.training
    compact.eval()
    try:
        paths = export_paths(directory, stem, format)
        state = compact.state_dict()
        write_atomic(paths["state_dict"], lambda f: torch.save(state, f), binary=True)
        batch = torch.export.Dim("batch", min=1)
        example = (example_input[:2] if example_input.shape[0] >= 2
                   else example_input.repeat(2, 1, 1, 1))
        program = torch.export.export(compact, (example,), dynamic_shapes=({0: batch},))
        if format == "torch.export":
            write_atomic(paths["program"], lambda f: torch.export.save(program, f),
                         binary=True)
        else:
            # From the program already made: one graph capture, and the ONNX file
            # computes exactly what the .pt2 would.
            onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"],
                                             output_names=["logits"], verbose=False)
            data = onnx_program.model_proto.SerializeToString()
            write_atomic(paths["onnx"], lambda f: f.write(data), binary=True)
    finally:
        compact.train(was_training)
    return paths


def load_exported(path: str, device: Optional[str] = None) -> nn.Module:
    """The exported program as a module (what a user without dce_kernels does:
    ``torch.export.load(path).module()``)."""
    module = torch.export.load(path).module()
    return module.to(device) if device is not None else module
