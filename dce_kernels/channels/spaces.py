"""Channel spaces: the output channels of each conv, tied into classes, with
the layers that read them; and the channel groups they make.

The torch.fx walk (:mod:`dce_kernels.channels.trace`) creates one space per
conv module, ties spaces that a sum adds together, marks spaces that must stay
full (and why), and records every layer that reads a space as a
:class:`Member`. :func:`spec_from_analysis` turns that into plain-data groups
(:class:`~dce_kernels.channels.group.GroupSpec`): one per class of tied spaces
that may be selected.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .group import ChannelSpec, GroupSpec

__all__ = ["Spaces", "Member", "Analysis", "spec_from_analysis", "OUTPUT_REASON"]

# Why a space that reaches the model's output stays full.
OUTPUT_REASON = "reaches the model's output"


class Spaces:
    """Union-find over channel spaces (one per conv module) with a "keep full" mark."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.reason: dict[int, str] = {}  # root -> why its channels must stay full

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.reason and ra not in self.reason:
            self.reason[ra] = self.reason[rb]
        self.reason.pop(rb, None)

    def keep_full(self, s: int, reason: str) -> None:
        self.reason.setdefault(self.find(s), reason)

    def is_full(self, s: int) -> bool:
        return self.find(s) in self.reason


@dataclass
class Member:
    """A layer that reads (or, for depthwise convs, also writes) a space at an offset."""

    layer: str
    role: str  # the ChannelGroup field it joins: "consumers", "depthwise", "norms", "linears",
    # "scales" (then ``layer`` is the dotted name of a parameter or buffer)
    space: int
    offset: int
    total: int = 0  # for linears: channels of the flattened map


@dataclass
class Analysis:
    """What the walk over a model's graphs found."""

    spaces: Spaces = field(default_factory=Spaces)
    space_of: dict[str, int] = field(default_factory=dict)  # conv name -> its output space
    members: list[Member] = field(default_factory=list)
    opaque_calls: set[str] = field(default_factory=set)  # layers also run on unknown channels
    order: list[str] = field(default_factory=list)  # conv names in the order they run
    linear_spaces: set[int] = field(default_factory=set)  # the spaces of Linears' outputs
    linear_producers: set[str] = field(default_factory=set)  # the Linears that have one
    # Linears over the channels of channels-last maps (their outputs are spaces that
    # sums may tie, as a 1x1 conv's)
    map_linears: set[str] = field(default_factory=set)


def _keep_conflicts_full(a: Analysis) -> None:
    """A layer follows one channel list per role. Groups it cannot follow stay
    full: a group it sees at two offsets, groups that overlap other channels it
    sees (a module called on several tensors), flattened maps of different sizes,
    and every group of a layer that is also called on a tensor of unknown channels."""
    sp = a.spaces
    by_layer: dict[tuple[str, str], set[tuple[int, int, int, int]]] = {}
    for m in a.members:
        by_layer.setdefault((m.layer, m.role), set()).add(
            (m.offset, m.offset + sp.size[m.space], m.space, m.total))
    changed = True
    while changed:
        changed = False
        for (layer, role), seen in by_layer.items():
            spans = sorted({(lo, hi, sp.find(s), t) for lo, hi, s, t in seen})
            bad = set()
            if layer in a.opaque_calls or len({t for *_, t in spans}) > 1:
                bad = {r for _, _, r, _ in spans}
            first: dict[int, int] = {}
            for i, (lo, hi, r, _) in enumerate(spans):
                if first.setdefault(r, lo) != lo:
                    bad.add(r)
                for lo2, _, r2, _ in spans[i + 1:]:
                    if lo2 < hi and r2 != r:
                        bad.update((r, r2))
            for r in bad:
                if r not in sp.reason:
                    # One layer of the role: "consumers" -> "consumer".
                    sp.keep_full(r, f"{layer} ({role.removesuffix('s')}) cannot follow one "
                                    "channel list for everything it reads")
                    changed = True


def spec_from_analysis(a: Analysis) -> ChannelSpec:
    """Plain-data channel groups: one per class of tied spaces that may be selected."""
    sp = a.spaces
    _keep_conflicts_full(a)
    classes: dict[int, list[str]] = {}
    for conv, space in a.space_of.items():
        classes.setdefault(sp.find(space), []).append(conv)
    groups = []
    for root, convs in classes.items():
        if root in sp.reason:
            continue
        linears = a.linear_producers | a.map_linears
        # A conv produces the group if one does (a Linear over a map may be tied to it).
        convs = sorted(convs, key=lambda n: (n in linears, a.order.index(n)))
        members: dict[str, list[str]] = {"norms": [], "consumers": [], "linears": [],
                                         "depthwise": [], "scales": []}
        offsets: dict[str, int] = {}
        linear_channels: dict[str, int] = {}
        for m in a.members:
            if sp.find(m.space) != root:
                continue
            names = members[m.role]
            if m.layer not in names:
                names.append(m.layer)
            if m.offset:
                offsets[m.layer] = m.offset
            if m.role == "linears":
                linear_channels[m.layer] = m.total
        if convs[0] in linears and (len(convs) > 1 or any(
                names for role, names in members.items() if role != "linears")):
            sp.keep_full(root, f"{convs[0]}: a Linear's output features are read by convs, "
                               "norms or scales, or added to another Linear's")
            continue
        # Traced: every reader of the group is known (norms, channel-wise ops,
        # consumers), so ChannelPlan may pack it where can_pack allows.
        groups.append(GroupSpec(convs[0], name=convs[0], tied=tuple(convs[1:]),
                                offsets=tuple(offsets.items()),
                                linear_channels=tuple(linear_channels.items()),
                                readers_known=True, sole_readers=True,
                                **{role: tuple(names) for role, names in members.items()}))
    order = {name: i for i, name in enumerate(a.order)}
    groups.sort(key=lambda g: order[g.producer])
    # A Linear whose features reach the model's output is its classifier (the
    # logits): full by design, not worth a note. Convs are always noted.
    full = tuple((conv, sp.reason[sp.find(space)]) for conv, space in a.space_of.items()
                 if sp.is_full(space) and not (conv in a.linear_producers
                                               and sp.reason[sp.find(space)] == OUTPUT_REASON))
    return ChannelSpec(tuple(groups), full)
