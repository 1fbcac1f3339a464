"""Optimizer steps that update only the weights of active channels.

Why a post-step restore rather than masking gradients: a zero gradient does not
stop an optimizer from moving a weight (momentum keeps pushing, weight decay
shrinks it, Adam's moments decay), and each optimizer applies those in its own
way. Instead, before the step we copy the inactive slices of every parameter
and of every parameter-shaped state tensor (SGD's momentum buffer, Adam's
moments), let the wrapped optimizer do its ordinary (fused or foreach) step, and
copy the slices back. This works for any optimizer with elementwise state,
costs one ``index_select`` and one ``index_copy_`` per slice (no loop over
channels), and leaves inactive weights and their state bit-for-bit unchanged.

One per-tensor quantity cannot be per channel: Adam's step counter, which
drives its bias correction, counts the steps of the whole tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["MaskedOptimizer"]

Slices = list[tuple[torch.Tensor, int, torch.Tensor]]


class MaskedOptimizer:
    """Wraps ``optimizer`` so that its steps leave the slices listed by
    ``frozen()`` (``(parameter, dim, indices)``, e.g.
    :meth:`dce_kernels.channels.ChannelPlan.frozen_slices`) untouched, with
    their optimizer state."""

    def __init__(self, optimizer: torch.optim.Optimizer, frozen: Callable[[], Slices]) -> None:
        self.optimizer = optimizer
        self.frozen = frozen

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        saved = []
        for param, dim, idx in self.frozen():
            state = self.optimizer.state.get(param, {})
            tensors = [param] + [s for s in state.values()
                                 if torch.is_tensor(s) and s.shape == param.shape]
            saved.append((param, dim, idx, [(t, t.index_select(dim, idx)) for t in tensors]))
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        for param, dim, idx, copies in saved:
            state = self.optimizer.state.get(param, {})
            for t, copy in copies:
                t.index_copy_(dim, idx, copy)
            # State created by this very step (first step) has no "before": its
            # inactive slices start at zero, as if the channel had not been seen.
            known = {id(t) for t, _ in copies}
            for s in state.values():
                if torch.is_tensor(s) and s.shape == param.shape and id(s) not in known:
                    s.index_fill_(dim, idx, 0)
        return loss
