"""Channel plumbing: which layers share a set of channels, and applying a selection.

Two separate steps:

* *Linking* (``sequential_groups`` or a model's own ``channel_groups()``): a
  :class:`ChannelGroup` is one selectable set of channels, the output channels
  of a producer ``ChannelSparseConv2d``, with every layer that must follow its
  selection: the channel-sparse BatchNorms after it, the convs that read it
  (their input channels) and a Linear that reads it after flattening.
* *Applying* (:class:`ChannelPlan`): given one index tensor per group, call
  ``set_active`` on every layer, and list the parameter blocks that are
  active (for :class:`dce_kernels.optim.MaskedOptimizer`).

A group whose producer output is read by nothing but the group's own layers
(``packed=True``, proven by the linker) can pass *packed* activations: the
producer emits only its active channels, the norms and channel-wise layers in
between run on those, and the consumers read them directly. That is what makes
a training step cost close to the physically narrower network's; full-width
groups stay correct for any graph.

Only sequential networks are linked automatically here; a later torch.fx pass
can build the same groups for arbitrary graphs without touching ``ChannelPlan``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .optim import ActiveBlock

__all__ = ["ChannelGroup", "ChannelPlan", "sequential_groups", "plan_for"]

# Layers that map a zero channel to a zero channel, channel by channel: an
# inactive channel stays inactive through them.
_PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
                nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


@dataclass(eq=False)
class ChannelGroup:
    """The output channels of ``producer`` and the layers that follow them."""

    producer: ChannelSparseConv2d
    norms: list[ChannelSparseBatchNorm2d] = field(default_factory=list)
    consumers: list[ChannelSparseConv2d] = field(default_factory=list)
    linears: list[nn.Linear] = field(default_factory=list)
    name: str = ""
    # Whether activations of this group may be packed (see the module doc):
    # only a linker that has seen every reader of the producer's output may set it.
    packed: bool = False

    @property
    def num_channels(self) -> int:
        return self.producer.out_channels

    @property
    def can_pack(self) -> bool:
        """Packing is on for this group and every layer in it supports it."""
        return (self.packed and not self.linears and self.producer.groups == 1
                and all(conv.groups == 1 for conv in self.consumers))

    def validate(self) -> None:
        c = self.num_channels
        for bn in self.norms:
            if bn.num_features != c:
                raise ValueError(f"group {self.name!r}: BatchNorm has {bn.num_features} "
                                 f"channels, its conv {c}")
        for conv in self.consumers:
            if conv.in_channels != c or conv.groups != 1:
                raise ValueError(f"group {self.name!r}: consumer conv must have groups=1 and "
                                 f"{c} input channels, got {conv.in_channels} (groups={conv.groups})")
        for lin in self.linears:
            if lin.in_features % c:
                raise ValueError(f"group {self.name!r}: Linear in_features={lin.in_features} is "
                                 f"not a multiple of the {c} channels it reads")


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
        producers = [g.producer for g in self.groups]
        if len(set(map(id, producers))) != len(producers):
            raise ValueError("a conv produces more than one channel group")
        self.convs = [m for m in model.modules() if isinstance(m, ChannelSparseConv2d)]
        self.norms = [m for m in model.modules() if isinstance(m, ChannelSparseBatchNorm2d)]
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
            for conv in self.convs:
                conv.set_active()
            for bn in self.norms:
                bn.set_active()
            return
        if len(selection) != len(self.groups):
            raise ValueError(f"selection has {len(selection)} entries for "
                             f"{len(self.groups)} channel groups")
        out_of: dict[int, torch.Tensor] = {}
        in_of: dict[int, torch.Tensor] = {}
        norm_of: dict[int, torch.Tensor] = {}
        for g, idx in zip(self.groups, selection):
            idx = torch.as_tensor(idx)
            out_of[id(g.producer)] = idx
            for conv in g.consumers:
                in_of[id(conv)] = idx
            for bn in g.norms:
                norm_of[id(bn)] = idx
        # One set_active per layer; layers outside every group run fully.
        for conv in self.convs:
            conv.set_active(out_of.get(id(conv)), in_of.get(id(conv)))
        for bn in self.norms:
            bn.set_active(norm_of.get(id(bn)))
        self._selection = [g.producer.out_idx.detach().cpu().clone() for g in self.groups]

    def saliency(self) -> list[torch.Tensor]:
        """The saliency each group's producer reported in the last backward."""
        return [g.producer.saliency for g in self.groups]

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
        for g in self.groups:
            if g.producer.out_idx.numel() == g.num_channels:
                continue
            for lin in g.linears:
                add(lin.weight, cols=linear_features(g.producer.out_idx, lin.in_features,
                                                     g.num_channels))
        return blocks


def linear_features(channels: torch.Tensor, in_features: int, num_channels: int) -> torch.Tensor:
    """Feature indices a Linear reads from ``channels`` of a flattened (C, H, W) map."""
    spatial = in_features // num_channels
    offsets = torch.arange(spatial, device=channels.device)
    return (channels.unsqueeze(1) * spatial + offsets).reshape(-1)


def plan_for(model: nn.Module, packed: bool = True) -> ChannelPlan:
    """The model's own ``channel_groups()`` if it has one, else sequential linking."""
    groups = model.channel_groups() if hasattr(model, "channel_groups") else sequential_groups(model)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no ChannelSparseConv2d to select channels of")
    return ChannelPlan(model, groups, packed=packed)
