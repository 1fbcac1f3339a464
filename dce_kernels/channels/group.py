"""A channel group: the output channels of a producer conv and the layers that follow them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn

import torch

from ..nn import CHANNEL_SPARSE_NORMS, ChannelSparseConv2d, ChannelSparseLinear, is_grouped

__all__ = ["ChannelGroup", "GroupSpec", "ChannelSpec", "SPEC_ATTR", "recorded_spec",
           "converted_groups"]

# The roles of a group's layers besides its producer (the ChannelGroup fields
# that list them) and the layer class each role holds.
MEMBER_ROLES = {"tied": (ChannelSparseConv2d, ChannelSparseLinear), "norms": CHANNEL_SPARSE_NORMS,
                "consumers": ChannelSparseConv2d, "linears": nn.Linear,
                "depthwise": ChannelSparseConv2d}
# What may produce a group: a conv's output channels or a Linear's output features.
PRODUCER_TYPES = (ChannelSparseConv2d, ChannelSparseLinear)


@dataclass(eq=False)
class ChannelGroup:
    """The output channels of ``producer`` and the layers that follow them.

    The producer is a conv, or a :class:`~dce_kernels.nn.ChannelSparseLinear`
    whose output features are the group's channels (hidden units of a
    classifier; then the readers are Linears in ``linears`` whose columns
    follow the features one to one, and there are no other roles).

    The first five fields are all a sequential network needs. The others
    describe graphs with skips and concatenations (:func:`dce_kernels.convert`
    fills them); their defaults mean "none" and leave the first five's meaning
    unchanged:

    * ``tied``: further convs whose output channels are the group's channels
      (their outputs are added to the producer's, e.g. residual branches): they
      activate the same output channels. A Linear over the channels of a
      channels-last map (ConvNeXt's MLP) may be tied too, as a 1x1 conv.
    * ``depthwise``: depthwise convs (``groups == in_channels == out_channels``)
      that carry the group's channels: their input *and* output channels follow.
    * ``offsets``: for a layer in ``norms``, ``consumers``, ``linears`` or
      ``depthwise`` that sees the group inside a wider tensor (after
      ``torch.cat``), the index of the group's first channel there (absent: 0),
      or a tuple of such indices where it sees the group more than once
      (GhostNet concatenates a conv's output with a depthwise conv of it).
    * ``tied_offsets``: for a conv in ``tied`` whose output is wider than the
      group, the indices where the group's channels lie in its output, once or
      more (a conv added to such a concatenation, GhostNet's shortcut; absent:
      the conv's output is exactly the group). Apart from ``offsets``: a conv
      may read the group at one place and write it at another.
    * ``linear_channels``: for a Linear in ``linears``, the number of channels
      of the map it reads flattened (absent: ``num_channels``). Column ``j`` of
      the Linear reads channel ``j // (in_features // linear_channels)``.
    * ``readers_known``: False when the layers after the producer are unknown
      (a model torch.fx could not trace): the selection still applies to the
      producers, but no compact model can be exported from a partial selection.
    * ``scales``: per-channel scales of the group's channels (ConvNeXt's layer
      scale, ``x * gamma.reshape(1, -1, 1, 1)``), as ``(module, attribute)``
      pairs naming a parameter or buffer with one entry per channel of the
      group: its entries follow the group (the compact model keeps the active
      ones, an optimizer steps only those).
    * ``blocks``: the group's channels are this many equal runs, and every
      selection activates equally many channels in each: a grouped conv (not
      depthwise) of ``g`` conv groups, ``blocks`` a multiple of ``g``, produces
      them or reads them as a consumer (the whole group, at offset 0), and runs
      and exports as a narrower conv of ``g`` groups. Default 1: any selection.
    * ``sole_readers``: the group's layers (through channel-wise ops) are the
      only readers of the producer's output, as a linker that has seen every
      reader establishes. Only then may a :class:`ChannelPlan` pass the group's
      activations packed (see :attr:`can_pack`); the default, False, keeps them
      full width.
    """

    producer: Union[ChannelSparseConv2d, ChannelSparseLinear]
    norms: list[nn.Module] = field(default_factory=list)  # of CHANNEL_SPARSE_NORMS
    consumers: list[ChannelSparseConv2d] = field(default_factory=list)
    linears: list[nn.Linear] = field(default_factory=list)
    name: str = ""
    tied: list[Union[ChannelSparseConv2d, ChannelSparseLinear]] = field(default_factory=list)
    depthwise: list[ChannelSparseConv2d] = field(default_factory=list)
    offsets: dict[nn.Module, int] = field(default_factory=dict)
    linear_channels: dict[nn.Linear, int] = field(default_factory=dict)
    readers_known: bool = True
    sole_readers: bool = False
    scales: list[tuple[nn.Module, str]] = field(default_factory=list)
    tied_offsets: dict[nn.Module, tuple[int, ...]] = field(default_factory=dict)
    blocks: int = 1

    @property
    def num_channels(self) -> int:
        if isinstance(self.producer, nn.Linear):
            return self.producer.out_features
        return self.producer.out_channels

    @property
    def producers(self) -> list[ChannelSparseConv2d]:
        """Every conv whose output channels are exactly this group's."""
        return [self.producer] + list(self.tied)

    def offset(self, layer: nn.Module) -> int:
        """The first of :meth:`offsets_of`."""
        return self.offsets_of(layer)[0]

    def offsets_of(self, layer: nn.Module) -> tuple[int, ...]:
        """Every index where ``layer`` sees the group's first channel."""
        return _as_offsets(self.offsets.get(layer, 0))

    def output_offsets(self, conv: nn.Module) -> tuple[int, ...]:
        """Every index of a tied conv's output where the group's channels begin."""
        return _as_offsets(self.tied_offsets.get(conv, 0))

    def total_channels(self, linear: nn.Linear) -> int:
        return int(self.linear_channels.get(linear, self.num_channels))

    @property
    def can_pack(self) -> bool:
        """Whether the group's activations may be packed: its layers are the sole
        readers and read exactly its channels (one producer, no Linear, no
        offsets, no scales (the model's own code multiplies by all of them),
        no depthwise producer or consumer outside the depthwise role (grouped convs
        pack: their blocks keep their lists balanced), norms, consumers and depthwise
        convs as wide as the group)."""
        c = self.num_channels
        return (self.sole_readers and self.readers_known and not self.linears and not self.tied
                and not self.offsets and not self.scales
                and isinstance(self.producer, ChannelSparseConv2d) and takes_packed(self.producer)
                and all(takes_packed(conv) and conv.in_channels == c for conv in self.consumers)
                and all(conv.in_channels == c for conv in self.depthwise)
                and all(bn.num_features == c for bn in self.norms))

    def validate(self) -> None:
        if not isinstance(self.producer, PRODUCER_TYPES):
            raise TypeError(f"group {self.name!r}: the producer must be a ChannelSparseConv2d or "
                            f"a ChannelSparseLinear, got {type(self.producer).__name__}")
        if isinstance(self.producer, nn.Linear) and (self.tied or self.norms or self.consumers
                                                     or self.depthwise):
            raise ValueError(f"group {self.name!r}: a Linear's output features can be read only "
                             "by Linears (the linears role), not by convs or norms")
        c = self.num_channels
        if int(self.blocks) != self.blocks or self.blocks < 1 or c % self.blocks:
            raise ValueError(f"group {self.name!r}: blocks must be a positive divisor of its "
                             f"{c} channels, got {self.blocks}")
        for conv in self.producers + list(self.consumers):
            if isinstance(conv, nn.Conv2d) and is_grouped(conv) and self.blocks % conv.groups:
                raise ValueError(f"group {self.name!r}: a grouped conv of {conv.groups} groups "
                                 f"reads or writes it, so its blocks ({self.blocks}) must be a "
                                 f"multiple of {conv.groups}")
        for norm in self.norms:
            if isinstance(norm, nn.GroupNorm) and (
                    self.blocks % norm.num_groups or norm.num_channels != c
                    or self.offsets_of(norm) != (0,)):
                raise ValueError(f"group {self.name!r}: a GroupNorm of {norm.num_groups} groups "
                                 f"must normalize exactly its {c} channels, and its blocks "
                                 f"({self.blocks}) be a multiple of {norm.num_groups}")
        members = (list(self.norms) + list(self.consumers) + list(self.linears)
                   + list(self.depthwise))
        for layer, off in list(self.offsets.items()) + list(self.tied_offsets.items()):
            if not any(layer is m for m in members + list(self.tied)):
                raise ValueError(f"group {self.name!r}: an offset is given for a "
                                 f"{type(layer).__name__} that is not in the group")
            offs = off if isinstance(off, (tuple, list)) else (off,)
            if not offs or any(int(o) != o or o < 0 for o in offs):
                raise ValueError(f"group {self.name!r}: offsets must be non-negative "
                                 f"integers, got {off}")
            if any(b - a < c for a, b in zip(sorted(offs), sorted(offs)[1:])):
                raise ValueError(f"group {self.name!r}: the offsets {tuple(offs)} of a "
                                 f"{type(layer).__name__} overlap (the group has {c} channels)")
        for conv in self.tied:
            width = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
            if width < max(self.output_offsets(conv)) + c or (
                    conv not in self.tied_offsets and width != c):
                raise ValueError(f"group {self.name!r}: tied {type(conv).__name__} has {width} "
                                 f"output channels, the producer {c} (at offsets "
                                 f"{self.output_offsets(conv)})")
        for bn in self.norms:
            if bn.num_features < max(self.offsets_of(bn)) + c:
                raise ValueError(f"group {self.name!r}: {type(bn).__name__} has {bn.num_features} "
                                 f"channels, its conv {c} (at offset {max(self.offsets_of(bn))})")
        for conv in self.consumers:
            grouped_whole = is_grouped(conv) and (conv.in_channels == c
                                                  and self.offsets_of(conv) == (0,))
            if conv.in_channels < max(self.offsets_of(conv)) + c or (
                    conv.groups != 1 and not grouped_whole):
                raise ValueError(f"group {self.name!r}: a consumer conv must have groups=1 "
                                 f"and {c} input channels (from offset "
                                 f"{max(self.offsets_of(conv))}), or be a grouped conv "
                                 f"reading exactly the group, got {conv.in_channels} input "
                                 f"channels (groups={conv.groups})")
        for conv in self.depthwise:
            if not (conv.groups == conv.in_channels == conv.out_channels) \
                    or conv.in_channels < max(self.offsets_of(conv)) + c:
                raise ValueError(f"group {self.name!r}: a depthwise member needs "
                                 "groups == in_channels == out_channels covering the group's "
                                 f"{c} channels, got in={conv.in_channels}, "
                                 f"out={conv.out_channels}, groups={conv.groups}")
        for owner, attr in self.scales:
            scale = getattr(owner, attr, None)
            if not torch.is_tensor(scale) or scale.numel() != c \
                    or sum(n != 1 for n in scale.shape) > 1:
                raise ValueError(f"group {self.name!r}: scale {attr!r} of a "
                                 f"{type(owner).__name__} must be a tensor of {c} entries along "
                                 f"one dim, got {getattr(scale, 'shape', scale)}")
        for lin in self.linears:
            total = self.total_channels(lin)
            if total < max(self.offsets_of(lin)) + c or lin.in_features % total:
                raise ValueError(f"group {self.name!r}: Linear in_features={lin.in_features} is "
                                 f"not a multiple of the {total} channels it reads")


@dataclass(frozen=True)
class GroupSpec:
    """A :class:`ChannelGroup` as plain data: its layers by module name (and
    numbers), so that a deep copy or a pickle of the model it was made for
    resolves to the copy's own layers. Fields as in :class:`ChannelGroup`;
    ``offsets`` and ``linear_channels`` are ``(module name, number)`` pairs (a
    name in several ``offsets`` pairs: a layer that sees the group more than once)."""

    producer: str
    norms: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    linears: tuple[str, ...] = ()
    name: str = ""
    tied: tuple[str, ...] = ()
    depthwise: tuple[str, ...] = ()
    offsets: tuple[tuple[str, int], ...] = ()
    linear_channels: tuple[tuple[str, int], ...] = ()
    readers_known: bool = True
    sole_readers: bool = False
    scales: tuple[str, ...] = ()  # dotted names of parameters or buffers
    tied_offsets: tuple[tuple[str, int], ...] = ()
    blocks: int = 1

    @classmethod
    def from_group(cls, group: ChannelGroup, model: nn.Module) -> GroupSpec:
        """The names of ``group``'s layers in ``model``."""
        names = {id(m): n for n, m in model.named_modules()}

        def name_of(layer: nn.Module) -> str:
            if id(layer) not in names:
                raise ValueError(f"group {group.name!r}: a {type(layer).__name__} of the group "
                                 "is not a module of the model")
            return names[id(layer)]

        return cls(name_of(group.producer), name=group.name,
                   offsets=tuple((name_of(m), off) for m in group.offsets
                                 for off in group.offsets_of(m)),
                   tied_offsets=tuple((name_of(m), off) for m in group.tied_offsets
                                      for off in group.output_offsets(m)),
                   linear_channels=tuple((name_of(m), int(c))
                                         for m, c in group.linear_channels.items()),
                   readers_known=group.readers_known, sole_readers=group.sole_readers,
                   blocks=group.blocks,
                   scales=tuple(_dotted(name_of(owner), attr) for owner, attr in group.scales),
                   **{role: tuple(map(name_of, getattr(group, role))) for role in MEMBER_ROLES})

    def resolve(self, model: nn.Module) -> ChannelGroup:
        """The :class:`ChannelGroup` of ``model``'s layers of these names."""
        def get(name, kind):
            try:
                m = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"converted model: module {name!r} of its channel groups is "
                                 "gone (was the model changed after convert?)") from e
            if not isinstance(m, kind):
                expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple)
                                                            else (kind,)))
                raise ValueError(f"converted model: {name!r} is a {type(m).__name__}, expected "
                                 f"{expected} (was the model changed after convert?)")
            return m

        members = {role: [get(n, kind) for n in getattr(self, role)]
                   for role, kind in MEMBER_ROLES.items()}
        by_name = {n: m for role in members for n, m in zip(getattr(self, role), members[role])}
        scales = []
        for dotted in self.scales:
            owner_name, _, attr = dotted.rpartition(".")
            owner = get(owner_name, nn.Module) if owner_name else model
            if not torch.is_tensor(getattr(owner, attr, None)):
                raise ValueError(f"converted model: the scale {dotted!r} of its channel groups "
                                 "is gone (was the model changed after convert?)")
            scales.append((owner, attr))

        def collect(pairs):
            offsets: dict[nn.Module, tuple[int, ...]] = {}
            for n, off in pairs:
                offsets[by_name[n]] = offsets.get(by_name[n], ()) + (off,)
            return offsets

        return ChannelGroup(get(self.producer, PRODUCER_TYPES), name=self.name,
                            offsets={m: offs[0] if len(offs) == 1 else offs
                                     for m, offs in collect(self.offsets).items()},
                            tied_offsets=collect(self.tied_offsets),
                            linear_channels={by_name[n]: c for n, c in self.linear_channels},
                            readers_known=self.readers_known, sole_readers=self.sole_readers,
                            blocks=self.blocks, scales=scales, **members)


def takes_packed(conv: ChannelSparseConv2d) -> bool:
    """A producer or consumer conv that takes packed layouts: groups == 1, or a grouped
    conv (its lists hold equally many channels of every conv group, by the blocks)."""
    return conv.groups == 1 or is_grouped(conv)


def _dotted(owner: str, attr: str) -> str:
    return f"{owner}.{attr}" if owner else attr


def _as_offsets(off) -> tuple[int, ...]:
    return tuple(int(o) for o in off) if isinstance(off, (tuple, list)) else (int(off),)


# Where a linker records a model's groups (a ChannelSpec) on the model itself.
SPEC_ATTR = "_dce_channel_spec"


@dataclass(frozen=True)
class ChannelSpec:
    """The channel groups a linker found for a model, as plain data, and the
    convs whose output channels stay full with the reason (``(conv name, why)``).
    ``linked``: for a model fx traced in pieces, how each module it could not trace
    was linked (``(module name, how)``)."""

    groups: tuple[GroupSpec, ...]
    kept_full: tuple[tuple[str, str], ...] = ()
    linked: tuple[tuple[str, str], ...] = ()

    def resolve(self, model: nn.Module) -> list[ChannelGroup]:
        return [g.resolve(model) for g in self.groups]


def recorded_spec(model: nn.Module) -> Optional[ChannelSpec]:
    """The :class:`ChannelSpec` recorded on ``model`` (None: none was)."""
    return getattr(model, SPEC_ATTR, None)


def converted_groups(model: nn.Module) -> Optional[list[ChannelGroup]]:
    """The channel groups :func:`dce_kernels.convert` found for ``model``
    (None if it was not converted)."""
    spec = recorded_spec(model)
    return None if spec is None else spec.resolve(model)
