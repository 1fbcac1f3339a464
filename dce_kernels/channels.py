"""Channel plumbing: which layers share a set of channels, and applying a selection.

Two separate steps:

* *Linking* (``sequential_groups``, a model's own ``channel_groups()``, or
  :func:`dce_kernels.convert` for any model torch.fx can trace): a
  :class:`ChannelGroup` is one selectable set of channels, the output channels
  of a producer ``ChannelSparseConv2d``, with every layer that must follow its
  selection: the channel-sparse BatchNorms after it, the convs that read it
  (their input channels) and a Linear that reads it after flattening. For
  graphs with skips, a group also holds the convs *tied* to the producer (their
  outputs are added to its outputs), depthwise convs that carry the channels
  through, and the channel *offset* at which a layer sees the group inside a
  wider tensor (after a concatenation).
* *Applying* (:class:`ChannelPlan`): given one index tensor per group, call
  ``set_active`` on every layer, and list the parameter blocks that are
  active (for :class:`dce_kernels.optim.MaskedOptimizer`). A layer that
  several groups feed (a conv after a concatenation) gets the union of their
  offset-shifted selections; its channels that no group covers stay active.

A group whose producer output is read by nothing but the group's own layers
(``packed=True``, proven by the linker) can pass *packed* activations: the
producer emits only its active channels, the norms and channel-wise layers in
between run on those, and the consumers read them directly. That is what makes
a training step cost close to the physically narrower network's; full-width
groups stay correct for any graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d, _as_index
from .optim import ActiveBlock

__all__ = ["ChannelGroup", "ChannelPlan", "sequential_groups", "plan_for"]

# Layers that map a zero channel to a zero channel, channel by channel: an
# inactive channel stays inactive through them.
_PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
                nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


@dataclass(eq=False)
class ChannelGroup:
    """The output channels of ``producer`` and the layers that follow them.

    The first five fields are all a sequential network needs. The others
    describe graphs with skips and concatenations (:func:`dce_kernels.convert`
    fills them); their defaults mean "none" and leave the first five's meaning
    unchanged:

    * ``tied``: further convs whose output channels are the group's channels
      (their outputs are added to the producer's, e.g. residual branches): they
      activate the same output channels.
    * ``depthwise``: depthwise convs (``groups == in_channels == out_channels``)
      that carry the group's channels: their input *and* output channels follow.
    * ``offsets``: for a layer in ``norms``, ``consumers``, ``linears`` or
      ``depthwise`` that sees the group inside a wider tensor (after
      ``torch.cat``), the index of the group's first channel there (absent: 0).
    * ``linear_channels``: for a Linear in ``linears``, the number of channels
      of the map it reads flattened (absent: ``num_channels``). Column ``j`` of
      the Linear reads channel ``j // (in_features // linear_channels)``.
    * ``readers_known``: False when the layers after the producer are unknown
      (a model torch.fx could not trace): the selection still applies to the
      producers, but no compact model can be exported from a partial selection.
    """

    producer: ChannelSparseConv2d
    norms: list[ChannelSparseBatchNorm2d] = field(default_factory=list)
    consumers: list[ChannelSparseConv2d] = field(default_factory=list)
    linears: list[nn.Linear] = field(default_factory=list)
    name: str = ""
    tied: list[ChannelSparseConv2d] = field(default_factory=list)
    depthwise: list[ChannelSparseConv2d] = field(default_factory=list)
    offsets: dict[nn.Module, int] = field(default_factory=dict)
    linear_channels: dict[nn.Linear, int] = field(default_factory=dict)
    readers_known: bool = True
    # Whether activations of this group may be packed (see the module doc):
    # only a linker that has seen every reader of the producer's output may set it.
    packed: bool = False

    @property
    def num_channels(self) -> int:
        return self.producer.out_channels

    @property
    def producers(self) -> list[ChannelSparseConv2d]:
        """Every conv whose output channels are exactly this group's."""
        return [self.producer] + list(self.tied)

    def offset(self, layer: nn.Module) -> int:
        return int(self.offsets.get(layer, 0))

    def total_channels(self, linear: nn.Linear) -> int:
        return int(self.linear_channels.get(linear, self.num_channels))

    @property
    def can_pack(self) -> bool:
        """Packing is on for this group and its layers read exactly its channels:
        one producer, no Linear, no offsets, convs of groups == 1, norms and
        consumers as wide as the group."""
        c = self.num_channels
        return (self.packed and self.readers_known and not self.linears and not self.tied
                and not self.depthwise and not self.offsets and self.producer.groups == 1
                and all(conv.groups == 1 and conv.in_channels == c for conv in self.consumers)
                and all(bn.num_features == c for bn in self.norms))

    def validate(self) -> None:
        c = self.num_channels
        members = (list(self.norms) + list(self.consumers) + list(self.linears)
                   + list(self.depthwise))
        for layer, off in self.offsets.items():
            if not any(layer is m for m in members):
                raise ValueError(f"group {self.name!r}: an offset is given for a "
                                 f"{type(layer).__name__} that is not in the group")
            if int(off) != off or off < 0:
                raise ValueError(f"group {self.name!r}: offsets must be non-negative "
                                 f"integers, got {off}")
        for conv in self.tied:
            if conv.out_channels != c:
                raise ValueError(f"group {self.name!r}: tied conv has {conv.out_channels} "
                                 f"output channels, the producer {c}")
        for bn in self.norms:
            if bn.num_features < self.offset(bn) + c:
                raise ValueError(f"group {self.name!r}: BatchNorm has {bn.num_features} "
                                 f"channels, its conv {c} (at offset {self.offset(bn)})")
        for conv in self.consumers:
            if conv.in_channels < self.offset(conv) + c or conv.groups != 1:
                raise ValueError(f"group {self.name!r}: consumer conv must have groups=1 and "
                                 f"{c} input channels (from offset {self.offset(conv)}), got "
                                 f"{conv.in_channels} (groups={conv.groups})")
        for conv in self.depthwise:
            if not (conv.groups == conv.in_channels == conv.out_channels) \
                    or conv.in_channels < self.offset(conv) + c:
                raise ValueError(f"group {self.name!r}: a depthwise member needs "
                                 "groups == in_channels == out_channels covering the group's "
                                 f"{c} channels, got in={conv.in_channels}, "
                                 f"out={conv.out_channels}, groups={conv.groups}")
        for lin in self.linears:
            total = self.total_channels(lin)
            if total < self.offset(lin) + c or lin.in_features % total:
                raise ValueError(f"group {self.name!r}: Linear in_features={lin.in_features} is "
                                 f"not a multiple of the {total} channels it reads")


def sequential_groups(model: nn.Module) -> list[ChannelGroup]:
    """Links the layers of a sequential network, whose modules are registered
    in the order they run (as in VGG). Raises on layers it cannot see through.
    Between a conv and the next there are only channel-wise layers, so every
    group without a Linear reader may pass packed activations."""
    names = {m: n for n, m in model.named_modules()}
    groups: list[ChannelGroup] = []
    current: Optional[ChannelGroup] = None
    for module in model.modules():
        if any(True for _ in module.children()):
            continue  # containers: only leaves run
        if isinstance(module, ChannelSparseConv2d):
            if current is not None:
                current.consumers.append(module)
            current = ChannelGroup(module, name=names[module], packed=True)
            groups.append(current)
        elif isinstance(module, ChannelSparseBatchNorm2d):
            if current is None:
                raise ValueError(f"{names[module]}: a ChannelSparseBatchNorm2d must follow a "
                                 "ChannelSparseConv2d")
            current.norms.append(module)
        elif isinstance(module, _PASSTHROUGH):
            continue
        elif isinstance(module, nn.Linear):
            if current is not None:
                current.linears.append(module)
            current = None
        elif current is None:
            continue  # layers before the first sparse conv do not see its channels
        else:
            raise TypeError(f"cannot link channels through {names[module]} "
                            f"({type(module).__name__}); use ChannelSparse layers, a "
                            "channel-wise layer, or define channel_groups() on the model")
    for g in groups:
        g.validate()
    return groups


class _Uses:
    """Where the groups meet one layer in one role ("out"/"in" of a conv, the
    channels of a BatchNorm or of the map a Linear reads): ``(group index,
    offset)`` pairs, and the layer's channels no group covers (always active)."""

    __slots__ = ("size", "entries", "fixed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: list[tuple[int, int]] = []
        self.fixed: Optional[torch.Tensor] = None

    def finish(self, widths: Sequence[int], what: str) -> None:
        covered = torch.zeros(self.size, dtype=torch.bool)
        for g, off in self.entries:
            if covered[off:off + widths[g]].any():
                raise ValueError(f"{what}: two channel groups claim the same channels")
            covered[off:off + widths[g]] = True
        self.fixed = (~covered).nonzero().squeeze(1)

    def active(self, selection: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(self.entries) == 1 and self.entries[0][1] == 0 and self.fixed.numel() == 0:
            return selection[self.entries[0][0]]  # the common case: one group, whole layer
        parts = [self.fixed.to(selection[0].device)]
        parts += [selection[g] + off for g, off in self.entries]
        return torch.sort(torch.cat(parts)).values


class ChannelPlan:
    """Applies selections to a model whose channel groups are known.

    ``packed`` (default True) sets the packed layouts on the layers of every
    group that allows them, for as long as the plan's model is used; with
    ``packed=False`` every activation keeps its full width."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup],
                 packed: bool = True) -> None:
        self.model = model
        self.groups = list(groups)
        for g in self.groups:
            g.validate()
        producers = [p for g in self.groups for p in g.producers]
        if len(set(map(id, producers))) != len(producers):
            raise ValueError("a conv produces more than one channel group")
        self.convs = [m for m in model.modules() if isinstance(m, ChannelSparseConv2d)]
        self.norms = [m for m in model.modules() if isinstance(m, ChannelSparseBatchNorm2d)]
        self._uses = self._collect_uses()
        self._linear_active: dict[int, tuple[nn.Linear, torch.Tensor, int]] = {}
        self._selection: Optional[list[torch.Tensor]] = None
        self._set_layouts(packed)

    def _set_layouts(self, packed: bool) -> None:
        for conv in self.convs:
            conv.packed_input = conv.packed_output = False
        for bn in self.norms:
            bn.packed = False
        for g in self.groups:
            on = packed and g.can_pack
            g.producer.packed_output = on
            for conv in g.consumers:
                conv.packed_input = on
            for bn in g.norms:
                bn.packed = on

    def _collect_uses(self) -> dict[tuple[int, str], _Uses]:
        uses: dict[tuple[int, str], _Uses] = {}
        self._linears: list[nn.Linear] = []

        def use(layer, role, size, g, off):
            key = (id(layer), role)
            if key not in uses:
                uses[key] = _Uses(size)
                if isinstance(layer, nn.Linear):
                    self._linears.append(layer)
            elif uses[key].size != size:
                raise ValueError(f"channel groups disagree on how many channels a "
                                 f"{type(layer).__name__} sees: {uses[key].size} vs {size}")
            uses[key].entries.append((g, off))

        for i, g in enumerate(self.groups):
            for conv in g.producers:
                use(conv, "out", conv.out_channels, i, 0)
            for conv in g.consumers:
                use(conv, "in", conv.in_channels, i, g.offset(conv))
            for conv in g.depthwise:
                use(conv, "out", conv.out_channels, i, g.offset(conv))
                use(conv, "in", conv.in_channels, i, g.offset(conv))
            for bn in g.norms:
                use(bn, "norm", bn.num_features, i, g.offset(bn))
            for lin in g.linears:
                use(lin, "features", g.total_channels(lin), i, g.offset(lin))
        widths = self.num_channels
        names = {id(m): n for n, m in self.model.named_modules()}
        for (layer_id, role), u in uses.items():
            u.finish(widths, f"{names.get(layer_id, '?')} ({role})")
        return uses

    @property
    def num_channels(self) -> list[int]:
        return [g.num_channels for g in self.groups]

    @property
    def selection(self) -> Optional[list[torch.Tensor]]:
        """The applied selection (None: all channels active)."""
        return self._selection

    def apply(self, selection: Optional[Sequence[torch.Tensor]]) -> None:
        """Activates ``selection[i]`` channels of group i on every layer of the
        group; None activates every channel of every layer."""
        if selection is None:
            self._selection = None
            self._linear_active = {}
            for conv in self.convs:
                conv.set_active()
            for bn in self.norms:
                bn.set_active()
            return
        if len(selection) != len(self.groups):
            raise ValueError(f"selection has {len(selection)} entries for "
                             f"{len(self.groups)} channel groups")
        # Checked per group: with offsets, a bad index of one group could land
        # on another group's channels of a shared layer and pass the layer's check.
        device = self.groups[0].producer.weight.device if self.groups else None
        selection = [_as_index(idx, g.num_channels, device, f"selection of group {g.name!r}")
                     for g, idx in zip(self.groups, selection)]

        def active(layer, role):
            u = self._uses.get((id(layer), role))
            return None if u is None else u.active(selection)

        def checked(idx, size, device):
            # Group selections are checked above, and a union of them is sorted
            # and disjoint by construction (_Uses.finish): no per-layer check.
            return _as_index(None, size, device, "") if idx is None else idx.to(device)

        # One assignment per layer; layers outside every group run fully.
        for conv in self.convs:
            device = conv.weight.device
            conv._use_channels(checked(active(conv, "out"), conv.out_channels, device),
                               checked(active(conv, "in"), conv.in_channels, device))
        for bn in self.norms:
            bn._use_channels(checked(active(bn, "norm"), bn.num_features, bn.active_idx.device))
        self._linear_active = {
            id(lin): (lin, active(lin, "features"), self._uses[(id(lin), "features")].size)
            for lin in self._linears}
        self._selection = [g.producer.out_idx.detach().cpu().clone() for g in self.groups]

    def saliency(self) -> list[torch.Tensor]:
        """The saliency each group's producer reported in the last backward.

        A group whose channels several convs produce (tied producers, depthwise
        convs) reports the sum over those convs: removing the channel removes it
        from all of them, and each term is that conv's first-order loss change."""
        out = []
        for g in self.groups:
            if not g.tied and not g.depthwise:
                out.append(g.producer.saliency)
                continue
            total = g.producer.saliency.clone()
            for conv in g.tied:
                total += conv.saliency
            for conv in g.depthwise:
                off = g.offset(conv)
                total += conv.saliency[off:off + g.num_channels]
            out.append(total)
        return out

    def linear_columns(self) -> list[tuple[nn.Linear, torch.Tensor]]:
        """``(linear, active input features)`` of every Linear that reads a
        group's channels, for the applied selection."""
        return [(lin, linear_features(ch, lin.in_features, total))
                for lin, ch, total in self._linear_active.values()]

    def active_blocks(self) -> list[ActiveBlock]:
        """The trainable block of every parameter that has inactive channels:
        what an optimizer step may change (:class:`~dce_kernels.optim.MaskedOptimizer`)."""
        blocks = []

        def partial(active, size):
            return None if active.numel() == size else active

        def add(param, rows=None, cols=None):
            if param is not None and (rows is not None or cols is not None):
                blocks.append(ActiveBlock(param, rows, cols))

        for conv in self.convs:
            rows = partial(conv.out_idx, conv.out_channels)
            cols = partial(conv.in_idx, conv.in_channels) if conv.groups == 1 else None
            add(conv.weight, rows, cols)
            add(conv.bias, rows)
        for bn in self.norms:
            rows = partial(bn.active_idx, bn.num_features)
            add(bn.weight, rows)
            add(bn.bias, rows)
        for lin, channels, total in self._linear_active.values():
            if channels.numel() < total:
                # Whole channels of the flattened map: runs of in_features // total columns.
                blocks.append(ActiveBlock(lin.weight, cols=channels,
                                          view=(lin.out_features, total,
                                                lin.in_features // total)))
        return blocks


def linear_features(channels: torch.Tensor, in_features: int, num_channels: int) -> torch.Tensor:
    """Feature indices a Linear reads from ``channels`` of a flattened (C, H, W) map."""
    spatial = in_features // num_channels
    offsets = torch.arange(spatial, device=channels.device)
    return (channels.unsqueeze(1) * spatial + offsets).reshape(-1)


def plan_for(model: nn.Module, packed: bool = True) -> ChannelPlan:
    """The groups :func:`dce_kernels.convert` found (if the model was converted),
    else the model's own ``channel_groups()`` if it has one, else sequential linking.
    ``packed``: see :class:`ChannelPlan`."""
    from .convert import converted_groups  # convert imports this module

    groups = converted_groups(model)
    if groups == []:
        raise ValueError(f"dce_kernels.convert found no selectable channels in "
                         f"{type(model).__name__}; conversion_notes(model) says why")
    if groups is None:
        groups = (model.channel_groups() if hasattr(model, "channel_groups")
                  else sequential_groups(model))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no ChannelSparseConv2d to select channels of")
    return ChannelPlan(model, groups, packed=packed)
