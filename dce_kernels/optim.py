"""Optimizer steps that update only the weights of active channels.

Why not mask gradients: a zero gradient does not stop an optimizer from moving
a weight (momentum keeps pushing, weight decay shrinks it, Adam's moments
decay), and each optimizer applies those in its own way.

Why not step everything and restore the inactive part: that costs a full
optimizer step over every weight plus a copy of every inactive slice, which at
a quarter of the channels active is many times the work of the narrow
network's step.

Instead only the *active block* of each partly active parameter is stepped,
in one of two ways (dce_kernels/block_steps.py says which optimizer takes which):

- in place (torch.optim.SGD, Adam, AdamW on CPU float tensors): a fused
  kernel walks the contiguous runs of the block in the parameter, its gradient
  and its state, and applies the optimizer's own arithmetic there, bit for bit.
  Nothing is allocated per step and nothing outside the block is read.
- generic (any other optimizer whose state is elementwise, other devices): for
  the duration of ``step()`` the parameter, its gradient and every
  parameter-shaped state tensor (SGD's momentum buffer, Adam's moments) are
  swapped for compact copies of their active rows and columns; the optimizer
  does its ordinary (fused or foreach) step on those, and the results are
  written back.

Either way inactive weights and their state are never touched.

One per-tensor quantity cannot be per channel: Adam's step counter, which
drives its bias correction, counts the steps of the whole tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .block_steps import block_step_for, supports
from .blocks import gather_block, scatter_block_

__all__ = ["ActiveBlock", "MaskedOptimizer"]


@dataclass(frozen=True, eq=False)
class ActiveBlock:
    """The part of ``param`` that trains: ``rows`` of dim 0 and ``cols`` of
    dim 1 (None: all of that dim), of ``param`` viewed as ``view`` if given.

    ``view`` lets a Linear that reads a flattened (C, H, W) map select whole
    channels: its weight viewed as (out, C, H*W) has contiguous runs of H*W
    columns per channel, which copy far faster than single columns."""

    param: torch.Tensor
    rows: Optional[torch.Tensor] = None
    cols: Optional[torch.Tensor] = None
    view: Optional[tuple[int, ...]] = None

    def _viewed(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.view is None else full.view(self.view)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        return gather_block(self._viewed(full), self.rows, self.cols)

    def scatter(self, full: torch.Tensor, block: torch.Tensor) -> None:
        scatter_block_(self._viewed(full), self.rows, self.cols, block)


class MaskedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that each step updates only the active blocks
    that ``active()`` lists (e.g. :meth:`dce_kernels.channels.ChannelPlan.active_blocks`),
    with their optimizer state; parameters not listed are stepped whole.

    It is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own objects, so a
    ``torch.optim.lr_scheduler`` built on it sets the learning rate that the
    wrapped optimizer uses, and either ``state_dict()`` restores both.

    ``in_place=False`` steps every block by gather-step-scatter, also where
    the in-place kernels apply (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 active: Callable[[], list[ActiveBlock]], in_place: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MaskedOptimizer wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        # Optimizer.__init__ is not called: it would build param groups and state of
        # its own, and the wrapper must share the wrapped optimizer's. Only the hook
        # tables that Optimizer's methods read are set up.
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self.optimizer = optimizer
        self.active = active
        # in_place=False sends every block through the generic path (the
        # reference that the in-place kernels are tested against).
        self._block_step = block_step_for(optimizer) if in_place else None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            # The closure computes loss and gradients of the full tensors, which
            # cannot happen while they are swapped for blocks: run it first
            # (fine for one-evaluation optimizers such as SGD and Adam).
            with torch.enable_grad():
                loss = closure()
        in_place, generic = self._split(block for block in self.active()
                                        if block.param.grad is not None)
        # The wrapped optimizer skips parameters without a gradient: those
        # stepped in place hide theirs while it runs.
        hidden = [(block.param, block.param.grad) for block, _ in in_place]
        swapped = []
        try:
            for param, _ in hidden:
                param.grad = None
            swapped = [self._swap_in(block) for block in generic]
            self.optimizer.step()
        finally:
            for swap in reversed(swapped):
                self._swap_out(*swap)
            for param, grad in hidden:
                param.grad = grad
        for block, group in in_place:
            self._block_step(group, self.optimizer.state[block.param], block)
        return loss

    def _split(self, blocks):
        """(block, param group) pairs of the blocks stepped in place, and the
        blocks that take the generic gather-step-scatter."""
        in_place, generic = [], []
        if self._block_step is None:
            return in_place, list(blocks)
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        seen = set()
        for block in blocks:
            param = block.param
            group = group_of.get(id(param))
            # A parameter listed twice, or not the optimizer's, takes the generic path
            # (which the wrapped optimizer then treats as it would).
            if (group is not None and id(param) not in seen
                    and supports(group, self.optimizer.state.get(param, {}), param.data,
                                 param.grad)):
                in_place.append((block, group))
                seen.add(id(param))
            else:
                generic.append(block)
        return in_place, generic

    def _swap_in(self, block: ActiveBlock):
        param = block.param
        full_data, full_grad = param.data, param.grad
        state = self.optimizer.state.get(param, {})
        full_state = {k: v for k, v in state.items()
                      if torch.is_tensor(v) and v.shape == full_data.shape}
        param.data = block.gather(full_data)
        param.grad = block.gather(full_grad)
        for key, value in full_state.items():
            state[key] = block.gather(value)
        return block, full_data, full_grad, full_state

    def _swap_out(self, block: ActiveBlock, full_data, full_grad, full_state) -> None:
        param = block.param
        compact = param.data
        param.data = full_data
        block.scatter(full_data, compact)
        param.grad = full_grad
        state = self.optimizer.state.get(param, {})
        for key, value in list(state.items()):
            if key not in full_state and not (torch.is_tensor(value)
                                              and value.shape == compact.shape):
                continue
            # State created by this very step has no "before": its inactive
            # part starts at zero, as if those channels had not been seen.
            full = full_state.get(key)
            if full is None:
                full = torch.zeros_like(full_data, dtype=value.dtype)
            block.scatter(full, value)
            state[key] = full
