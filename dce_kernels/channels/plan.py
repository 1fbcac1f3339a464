"""Applying a selection: :class:`ChannelPlan` sets the active channels of every
layer of the channel groups, and lists the parameter blocks that are active."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import (CHANNEL_SPARSE_NORMS, ChannelSparseConv2d, ChannelSparseLinear, _as_index,
                  grouped_columns, is_grouped, run_counts)
from ..optim import ActiveBlock
from .group import ChannelGroup, converted_groups, takes_packed
from .sequential import sequential_groups

__all__ = ["ChannelPlan", "plan_for", "linear_features"]


class _LayerIndex:
    """One channel index of one layer as the groups fill it (a conv's
    ``out_idx`` or ``in_idx``, a BatchNorm's ``active_idx``, the channels of the
    map a Linear reads): ``(group index, offset)`` pairs, and the layer's
    channels no group covers (always active)."""

    __slots__ = ("size", "entries", "fixed", "_fixed_on")

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: list[tuple[int, int]] = []
        self.fixed: Optional[torch.Tensor] = None
        # ``fixed`` on the selections' device, copied there once, not at every apply.
        self._fixed_on: dict[torch.device, torch.Tensor] = {}

    def finish(self, widths: Sequence[int], what: str) -> None:
        covered = torch.zeros(self.size, dtype=torch.bool)
        for g, off in self.entries:
            if covered[off:off + widths[g]].any():
                raise ValueError(f"{what}: two channel groups claim the same channels")
            covered[off:off + widths[g]] = True
        self.fixed = (~covered).nonzero().squeeze(1)
        self.entries.sort(key=lambda entry: entry[1])

    def active(self, selection: Sequence[torch.Tensor], shifted) -> torch.Tensor:
        """The layer's active channels for sorted group selections; ``shifted(g, off)``
        is ``selection[g] + off``, which the readers of one concatenation share."""
        if len(self.entries) == 1 and self.entries[0][1] == 0 and self.fixed.numel() == 0:
            return selection[self.entries[0][0]]  # the common case: one group, whole layer
        parts = [shifted(g, off) for g, off in self.entries]
        if self.fixed.numel() == 0:
            # Disjoint ranges in offset order, each sorted: so is their concatenation.
            return torch.cat(parts)
        device = selection[0].device
        if device not in self._fixed_on:
            self._fixed_on[device] = self.fixed.to(device)
        return torch.sort(torch.cat([self._fixed_on[device]] + parts)).values


class ChannelPlan:
    """Applies selections to a model whose channel groups are known.

    ``pack`` (default True) sets the packed layouts (``packed_input``,
    ``packed_output``, ``packed`` of a BatchNorm) on the layers of every group
    that may pack (:meth:`packable_groups`), for as long as the plan's model is
    used; with ``pack=False`` every activation keeps its full width."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup],
                 pack: bool = True) -> None:
        self.model = model
        self.groups = list(groups)
        for g in self.groups:
            g.validate()
        # A tied conv may hold several groups at offsets (their channels must not
        # overlap: _LayerIndex.finish); otherwise a conv produces one group.
        producers = [p for g in self.groups for p in g.producers if p not in g.tied_offsets]
        if len(set(map(id, producers))) != len(producers):
            raise ValueError("a conv produces more than one channel group")
        self.convs = [m for m in model.modules() if isinstance(m, ChannelSparseConv2d)]
        self.norms = [m for m in model.modules() if isinstance(m, CHANNEL_SPARSE_NORMS)]
        self.sparse_linears = [m for m in model.modules() if isinstance(m, ChannelSparseLinear)]
        self._indices = self._collect_indices()
        self._linear_active: dict[int, tuple[nn.Linear, torch.Tensor, int]] = {}
        self._scale_active: list[tuple[nn.Module, str, torch.Tensor]] = []
        # The applied selection on the layers' device, and its host copy once read.
        self._selection: Optional[list[torch.Tensor]] = None
        self._selection_host: Optional[list[torch.Tensor]] = None
        self._set_layouts(pack)

    def _set_layouts(self, pack: bool) -> None:
        for conv in self.convs:
            conv.packed_input = conv.packed_output = False
        for bn in self.norms:
            bn.packed = False
        for lin in self.sparse_linears:
            lin.packed_input = False
        packable = self.packable_groups() if pack else set()
        for i, g in enumerate(self.groups):
            on = i in packable
            g.producer.packed_output = on
            for conv in g.consumers:
                conv.packed_input = on
            for conv in g.depthwise:  # reads and writes the group's channels: one list
                conv.packed_input = conv.packed_output = on
            for bn in g.norms:
                bn.packed = on
            for lin in g.linears:
                lin.packed_input = on

    def packable_groups(self) -> set[int]:
        """The groups whose activations may be packed: those that ``can_pack``,
        and the groups read together after a concatenation (DenseNet), which
        pack as one: a layer reading several groups at offsets sees the
        concatenation of their packed outputs, which is exactly its active
        channels in order (a Linear after flattening: its active columns), so it can read it packed when every group it reads
        packs and no channel of its input is outside the groups. Such groups
        therefore pack all together or none of them."""
        n = len(self.groups)
        parent = list(range(n))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        ok = [g.sole_readers and g.readers_known and not g.tied and not g.scales
              and all(isinstance(lin, ChannelSparseLinear) for lin in g.linears)
              and all(d.in_channels == g.num_channels and g.offsets_of(d) == (0,)
                      for d in g.depthwise)
              and isinstance(g.producer, ChannelSparseConv2d)
              and takes_packed(g.producer) and all(map(takes_packed, g.consumers))
              for g in self.groups]
        for (_, index), u in self._indices.items():
            if index not in ("in_idx", "active_idx", "in_channels"):
                continue
            readers = [g for g, _ in u.entries]
            if u.fixed.numel():  # channels of no group: their layout is not ours to pack
                for g in readers:
                    ok[g] = False
            for g in readers[1:]:
                parent[find(g)] = find(readers[0])
        whole = {}
        for i in range(n):
            whole[find(i)] = whole.get(find(i), True) and ok[i]
        return {i for i in range(n) if whole[find(i)]}

    def _collect_indices(self) -> dict[tuple[int, str], _LayerIndex]:
        """Every layer index a group fills, keyed by (layer id, index name)."""
        indices: dict[tuple[int, str], _LayerIndex] = {}
        self._linears: list[nn.Linear] = []

        def cover(layer, index, size, g, off):
            key = (id(layer), index)
            if key not in indices:
                indices[key] = _LayerIndex(size)
                if index == "in_channels":
                    self._linears.append(layer)
            elif indices[key].size != size:
                raise ValueError(f"channel groups disagree on how many channels a "
                                 f"{type(layer).__name__} sees: {indices[key].size} vs {size}")
            indices[key].entries.append((g, off))

        for i, g in enumerate(self.groups):
            cover(g.producer, "out_idx", g.num_channels, i, 0)
            for conv in g.tied:  # a conv, or a Linear over channels last (ConvNeXt)
                width = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
                for off in g.output_offsets(conv):
                    cover(conv, "out_idx", width, i, off)
            for conv in g.consumers:
                for off in g.offsets_of(conv):
                    cover(conv, "in_idx", conv.in_channels, i, off)
            for conv in g.depthwise:
                for off in g.offsets_of(conv):
                    cover(conv, "out_idx", conv.out_channels, i, off)
                    cover(conv, "in_idx", conv.in_channels, i, off)
            for bn in g.norms:
                for off in g.offsets_of(bn):
                    cover(bn, "active_idx", bn.num_features, i, off)
            for lin in g.linears:
                for off in g.offsets_of(lin):
                    cover(lin, "in_channels", g.total_channels(lin), i, off)
            for owner, attr in g.scales:
                cover(owner, _SCALE + attr, g.num_channels, i, 0)
        widths = self.num_channels
        names = {id(m): n for n, m in self.model.named_modules()}
        for (layer_id, index), u in indices.items():
            u.finish(widths, f"{names.get(layer_id, '?')} ({index})")
        return indices

    @property
    def num_channels(self) -> list[int]:
        return [g.num_channels for g in self.groups]

    @property
    def blocks(self) -> list[int]:
        """Each group's equal runs that a selection must fill equally (1: any
        selection; see :class:`ChannelGroup`): a selector's ``blocks=``."""
        return [g.blocks for g in self.groups]

    def leading_channels(self, counts: Sequence[int]) -> list[torch.Tensor]:
        """A selection of ``counts[i]`` channels of group ``i``: the first ones of each
        of its blocks' runs (the first ``counts[i]`` without blocks), for when only
        the widths matter (a narrow architecture, its FLOPs)."""
        device = self.groups[0].producer.weight.device
        out = []
        for g, k in zip(self.groups, counts):
            if k % g.blocks or not 0 < k <= g.num_channels:
                raise ValueError(f"group {g.name!r}: {k} channels is not a positive multiple "
                                 f"of its {g.blocks} blocks up to {g.num_channels}")
            run = g.num_channels // g.blocks
            out.append((torch.arange(k // g.blocks, device=device)
                        + run * torch.arange(g.blocks, device=device).unsqueeze(1)).view(-1))
        return out

    @property
    def selection(self) -> Optional[list[torch.Tensor]]:
        """The applied selection, on the host (None: all channels active). Copied
        from the device when first read after an :meth:`apply`, not at every step."""
        if self._selection is not None and self._selection_host is None:
            self._selection_host = [s.detach().cpu().clone() for s in self._selection]
        return self._selection_host

    def apply(self, selection: Optional[Sequence[torch.Tensor]], validate: bool = True) -> None:
        """Activates ``selection[i]`` channels of group i on every layer of the
        group; None activates every channel of every layer.

        ``validate=False`` skips the checks of each group's list (sorted, unique, in
        range), which read the lists back to the host: for lists in that form already,
        on the layers' device, such as a selector of :mod:`dce_kernels.selectors`
        returns. Nothing of this method then waits for the device."""
        self._selection_host = None
        if selection is None:
            self._selection = None
            self._linear_active = {}
            self._scale_active = []
            for conv in self.convs:
                conv.set_active()
            for bn in self.norms:
                bn.set_active()
            for lin in self.sparse_linears:
                lin.set_active()
            return
        if len(selection) != len(self.groups):
            raise ValueError(f"selection has {len(selection)} entries for "
                             f"{len(self.groups)} channel groups")
        # Checked per group: with offsets, a bad index of one group could land
        # on another group's channels of a shared layer and pass the layer's check.
        device = self.groups[0].producer.weight.device if self.groups else None
        if validate:
            selection = [_as_index(idx, g.num_channels, device,
                                   f"selection of group {g.name!r}")
                         for g, idx in zip(self.groups, selection)]
            for g, idx in zip(self.groups, selection):
                _check_blocks(g, idx)
        else:
            selection = [idx.to(device) for idx in selection]

        cache: dict[tuple[int, int], torch.Tensor] = {}

        def shifted(g, off):
            if (g, off) not in cache:
                cache[(g, off)] = selection[g] + off if off else selection[g]
            return cache[(g, off)]

        def active(layer, index):
            u = self._indices.get((id(layer), index))
            return None if u is None else u.active(selection, shifted)

        def checked(idx, size, device):
            # Group selections are checked above, and a union of them is sorted
            # and disjoint by construction (_LayerIndex.finish): no per-layer check.
            return _as_index(None, size, device, "") if idx is None else idx.to(device)

        # One assignment per layer; layers outside every group run fully.
        for conv in self.convs:
            device = conv.weight.device
            conv._use_channels(checked(active(conv, "out_idx"), conv.out_channels, device),
                               checked(active(conv, "in_idx"), conv.in_channels, device))
        for bn in self.norms:
            bn._use_channels(checked(active(bn, "active_idx"), bn.num_features,
                                     bn.active_idx.device))
        self._linear_active = {
            id(lin): (lin, active(lin, "in_channels"), self._indices[(id(lin), "in_channels")].size)
            for lin in self._linears}
        for lin in self.sparse_linears:
            device = lin.weight.device
            read = self._linear_active.get(id(lin))
            cols = None if read is None else linear_features(read[1], lin.in_features, read[2])
            lin._use_channels(checked(active(lin, "out_idx"), lin.out_features, device),
                              checked(cols, lin.in_features, device),
                              1 if read is None else lin.in_features // read[2])
        self._scale_active = [(owner, attr, active(owner, _SCALE + attr))
                              for g in self.groups for owner, attr in g.scales]
        self._selection = [g.producer.out_idx for g in self.groups]

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
            for conv in g.tied:  # each copy of the group's channels
                for off in g.output_offsets(conv):
                    total += conv.saliency[off:off + g.num_channels]
            for conv in g.depthwise:
                for off in g.offsets_of(conv):
                    total += conv.saliency[off:off + g.num_channels]
            out.append(total)
        return out

    def linear_columns(self) -> list[tuple[nn.Linear, torch.Tensor]]:
        """``(linear, active input features)`` of every Linear that reads a
        group's channels, for the applied selection."""
        return [(lin, linear_features(ch, lin.in_features, total))
                for lin, ch, total in self._linear_active.values()]

    def scale_channels(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """``(module, attribute, active channels)`` of every per-channel scale of
        a group (its entries to keep), for the applied selection."""
        return list(self._scale_active)

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
            if is_grouped(conv) and conv.in_idx.numel() < conv.in_channels:
                # Each active output reads its own conv group's active inputs: with
                # the weight as (out * in / groups, kH * kW), those are single rows.
                per_group = conv.in_channels // conv.groups
                cols = grouped_columns(conv.in_idx, conv.out_idx, conv.in_channels, conv.groups)
                blocks.append(ActiveBlock(
                    conv.weight, rows=(conv.out_idx.unsqueeze(1) * per_group + cols).view(-1),
                    view=(conv.out_channels * per_group, conv.weight[0, 0].numel())))
            else:
                cols = partial(conv.in_idx, conv.in_channels) if conv.groups == 1 else None
                add(conv.weight, rows, cols)
            add(conv.bias, rows)
        for bn in self.norms:
            rows = partial(bn.active_idx, bn.num_features)
            add(bn.weight, rows)
            add(bn.bias, rows)
        reads = {id(lin): (channels, total) for lin, channels, total in self._linear_active.values()}
        listed = {id(lin) for lin in self._linears}
        for lin in self._linears + [m for m in self.sparse_linears if id(m) not in listed]:
            channels, total = reads.get(id(lin), (None, lin.in_features))
            rows = (partial(lin.out_idx, lin.out_features)
                    if isinstance(lin, ChannelSparseLinear) else None)
            cols = None if channels is None else partial(channels, total)
            if rows is None and cols is None:
                continue
            # Whole channels of the flattened map: runs of in_features // total columns.
            blocks.append(ActiveBlock(lin.weight, rows=rows, cols=cols,
                                      view=(lin.out_features, total, lin.in_features // total)))
            add(lin.bias, rows)
        for owner, attr, active in self._scale_active:
            scale = getattr(owner, attr)
            if isinstance(scale, nn.Parameter) and active.numel() < scale.numel():
                # One entry per channel, whatever the shape ([C], [1, C, 1, 1]).
                blocks.append(ActiveBlock(scale, rows=active, view=(scale.numel(),)))
        return blocks


def _check_blocks(group: ChannelGroup, idx: torch.Tensor) -> None:
    """A selection of a group with blocks fills every run equally (one host read:
    the checks of ``apply(validate=True)`` read the lists anyway)."""
    if group.blocks == 1:
        return
    per_run = run_counts(idx, group.num_channels, group.blocks)
    if not (per_run == per_run[0]).all():
        raise ValueError(f"selection of group {group.name!r}: its {group.num_channels} "
                         f"channels are {group.blocks} blocks (a grouped conv reads or writes "
                         f"them) and a selection needs equally many of each, got "
                         f"{per_run.tolist()}")


# The key of a scale's channel index among a module's indices: "scale:" + attribute.
_SCALE = "scale:"


def linear_features(channels: torch.Tensor, in_features: int, num_channels: int) -> torch.Tensor:
    """Feature indices a Linear reads from ``channels`` of a flattened (C, H, W) map."""
    spatial = in_features // num_channels
    offsets = torch.arange(spatial, device=channels.device)
    return (channels.unsqueeze(1) * spatial + offsets).reshape(-1)


def plan_for(model: nn.Module, pack: bool = True) -> ChannelPlan:
    """The groups :func:`dce_kernels.convert` found (if the model was converted),
    else the model's own ``channel_groups()`` if it has one, else sequential linking.
    ``pack``: see :class:`ChannelPlan`."""
    groups = converted_groups(model)
    if groups == []:
        raise ValueError(f"dce_kernels.convert found no selectable channels in "
                         f"{type(model).__name__}; conversion_notes(model) says why")
    if groups is None:
        groups = (model.channel_groups() if hasattr(model, "channel_groups")
                  else sequential_groups(model))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no ChannelSparseConv2d to select channels of")
    return ChannelPlan(model, groups, pack=pack)
