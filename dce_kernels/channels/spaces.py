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

import math
from dataclasses import dataclass, field

from .group import ChannelSpec, GroupSpec

__all__ = ["Spaces", "Member", "Analysis", "spec_from_analysis", "OUTPUT_REASON"]

# Why a space that reaches the model's output stays full.
OUTPUT_REASON = "reaches the model's output"


class Spaces:
    """Union-find over channel spaces (one per conv module) with a "keep full" mark.

    A space may be *refined* into a sequence of other spaces whose sizes add up
    to its own: its channels are theirs, in order (a conv whose output is added
    to a concatenation of groups, GhostNet's shortcut: ``cat([x1, dw(x1)]) +
    shortcut(x)`` makes the shortcut conv's channels x1's group twice). Only a
    space tied to nothing yet may be refined; :meth:`leaves` expands refined
    spaces, and every union and mark works on leaves.

    A class may need *blocks*: its channels split into that many equal runs, every
    selection activating equally many in each (a grouped conv reads or writes
    them). Tied classes need the least common multiple of their blocks, which
    divides their channel count, as every conv group count divides it."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.count: list[int] = []  # root -> spaces in its class
        self.reason: dict[int, str] = {}  # root -> why its channels must stay full
        self.parts: dict[int, tuple[int, ...]] = {}  # refined space -> what it consists of
        self.blocks: dict[int, int] = {}  # root -> the equal runs its selections fill equally

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.count.append(1)
        return len(self.parent) - 1

    def leaves(self, layout) -> tuple[int, ...]:
        """``layout`` with every refined space replaced by its parts, recursively."""
        out: list[int] = []
        for s in layout:
            out.extend(self.leaves(self.parts[s]) if s in self.parts else (s,))
        return tuple(out)

    def leaf_offsets(self, s: int, offset: int = 0) -> list[tuple[int, int]]:
        """``(leaf, offset)`` of every leaf of ``s`` whose first channel is at ``offset``."""
        out = []
        for leaf in self.leaves((s,)):
            out.append((leaf, offset))
            offset += self.size[leaf]
        return out

    def refinable(self, s: int) -> bool:
        # A space of blocks stays whole: its runs would not split with its parts.
        return (s not in self.parts and self.parent[s] == s and self.count[s] == 1
                and s not in self.blocks)

    def refine(self, s: int, parts: tuple[int, ...]) -> None:
        """``s`` consists of ``parts`` (leaves, none of them ``s``'s class)."""
        assert self.refinable(s) and sum(self.size[p] for p in parts) == self.size[s]
        self.parts[s] = parts
        why = self.reason.pop(s, None)
        if why is not None:
            for p in parts:
                self.keep_full(p, why)

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
        self.count[ra] += self.count[rb]
        if rb in self.blocks or ra in self.blocks:
            self.blocks[ra] = math.lcm(self.blocks.get(ra, 1), self.blocks.pop(rb, 1))
        if rb in self.reason and ra not in self.reason:
            self.reason[ra] = self.reason[rb]
        self.reason.pop(rb, None)

    def need_blocks(self, s: int, blocks: int) -> None:
        """``s`` (a leaf) is read or written by a conv of ``blocks`` conv groups."""
        root = self.find(s)
        self.blocks[root] = math.lcm(self.blocks.get(root, 1), blocks)

    def blocks_of(self, s: int) -> int:
        return self.blocks.get(self.find(s), 1)

    def keep_full(self, s: int, reason: str) -> None:
        for leaf in self.leaves((s,)):
            self.reason.setdefault(self.find(leaf), reason)

    def is_full(self, s: int) -> bool:
        """Whether all of ``s``'s channels stay full."""
        return all(self.find(leaf) in self.reason for leaf in self.leaves((s,)))

    def why_full(self, s: int) -> str:
        return next(self.reason[self.find(leaf)] for leaf in self.leaves((s,))
                    if self.find(leaf) in self.reason)


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


def _leaf_members(a: Analysis) -> list[Member]:
    """The members with refined spaces expanded: one per leaf, at its offset."""
    sp = a.spaces
    return [Member(m.layer, m.role, leaf, off, m.total) for m in a.members
            for leaf, off in sp.leaf_offsets(m.space, m.offset)]


def _keep_conflicts_full(a: Analysis, members: list[Member]) -> None:
    """A layer follows one channel list per role: the union of its groups'
    channels at their offsets, which must not overlap. Groups it cannot follow
    stay full: groups that overlap other channels it sees (a module called on
    several tensors), flattened maps of different sizes, and every group of a
    layer that is also called on a tensor of unknown channels. A group it sees
    at several offsets that do not overlap (after ``cat([x, dw(x)])``) is fine."""
    sp = a.spaces
    by_layer: dict[tuple[str, str], set[tuple[int, int, int, int]]] = {}
    for m in members:
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
            for i, (lo, hi, r, _) in enumerate(spans):
                for lo2, _, r2, _ in spans[i + 1:]:
                    if lo2 < hi and (r2 != r or lo2 != lo):
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
    leaf_members = _leaf_members(a)
    _keep_conflicts_full(a, leaf_members)
    # Per class: the convs whose output is exactly its channels, and the convs
    # (refined spaces) holding its channels at offsets.
    classes: dict[int, list[str]] = {}
    at_offsets: dict[int, dict[str, list[int]]] = {}
    for conv, space in a.space_of.items():
        if space not in sp.parts:
            classes.setdefault(sp.find(space), []).append(conv)
            continue
        for leaf, off in sp.leaf_offsets(space):
            at_offsets.setdefault(sp.find(leaf), {}).setdefault(conv, []).append(off)
    groups = []
    for root, convs in classes.items():
        if root in sp.reason:
            continue
        linears = a.linear_producers | a.map_linears
        # A conv produces the group if one does (a Linear over a map may be tied to it).
        convs = sorted(convs, key=lambda n: (n in linears, a.order.index(n)))
        members: dict[str, list[str]] = {"norms": [], "consumers": [], "linears": [],
                                         "depthwise": [], "scales": []}
        offsets: dict[str, set[int]] = {}
        linear_channels: dict[str, int] = {}
        for m in leaf_members:
            if sp.find(m.space) != root:
                continue
            names = members[m.role]
            if m.layer not in names:
                names.append(m.layer)
            offsets.setdefault(m.layer, set()).add(m.offset)
            if m.role == "linears":
                linear_channels[m.layer] = m.total
        if convs[0] in linears and (len(convs) > 1 or at_offsets.get(root) or any(
                names for role, names in members.items() if role != "linears")):
            sp.keep_full(root, f"{convs[0]}: a Linear's output features are read by convs, "
                               "norms or scales, or added to another Linear's")
            continue
        tied, tied_offsets = convs[1:], []
        for conv, offs in sorted(at_offsets.get(root, {}).items(),
                                 key=lambda item: a.order.index(item[0])):
            tied.append(conv)
            tied_offsets.extend((conv, off) for off in sorted(offs))
        pairs = tuple((layer, off) for layer, offs in offsets.items() for off in sorted(offs)
                      if offs != {0})
        # Traced: every reader of the group is known (norms, channel-wise ops,
        # consumers), so ChannelPlan may pack it where can_pack allows.
        groups.append(GroupSpec(convs[0], name=convs[0], tied=tuple(tied),
                                blocks=sp.blocks_of(root),
                                offsets=pairs, tied_offsets=tuple(tied_offsets),
                                linear_channels=tuple(linear_channels.items()),
                                readers_known=True, sole_readers=True,
                                **{role: tuple(names) for role, names in members.items()}))
    order = {name: i for i, name in enumerate(a.order)}
    groups.sort(key=lambda g: order[g.producer])
    # A Linear whose features reach the model's output is its classifier (the
    # logits): full by design, not worth a note. Convs are always noted.
    full = tuple((conv, sp.why_full(space)) for conv, space in a.space_of.items()
                 if sp.is_full(space) and not (conv in a.linear_producers
                                               and sp.why_full(space) == OUTPUT_REASON))
    return ChannelSpec(tuple(groups), full)
