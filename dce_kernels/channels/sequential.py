"""Linking a sequential network (modules registered in the order they run)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .group import ChannelGroup
from .optable import ELEMENTWISE_MODULES, SPATIAL_MODULES

__all__ = ["sequential_groups"]

# An inactive channel stays inactive through these. A sequential network
# flattens only on the way into its Linear, so Flatten passes too.
_PASSES_CHANNELS = ELEMENTWISE_MODULES + SPATIAL_MODULES + (nn.Flatten,)


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
            current = ChannelGroup(module, name=names[module], sole_readers=True)
            groups.append(current)
        elif isinstance(module, ChannelSparseBatchNorm2d):
            if current is None:
                raise ValueError(f"{names[module]}: a ChannelSparseBatchNorm2d must follow a "
                                 "ChannelSparseConv2d")
            current.norms.append(module)
        elif isinstance(module, _PASSES_CHANNELS):
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
