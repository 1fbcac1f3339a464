"""The choices a run offers by name: methods and their selectors, optimizers, budgets,
learning-rate schedules.

The CLI's ``choices=``, ``TrainConfig.validate()``, the sweep's grid and the
trainer's factories all read these tables, so a new entry is added once.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from ..selectors import (BUDGETS, CUCBSelector, RandomSelector, ShrinkSelector,
                         TaylorPruneSelector)

__all__ = ["METHODS", "DCE_METHODS", "NARROW_METHODS", "SELECTORS", "OPTIMIZERS", "BUDGETS",
           "LR_SCHEDULES",
           "phases_of", "check_choice"]

# The ways a run produces a compact network (see dce_kernels.experiments.train), and the
# phases each goes through ("dense" is the optional full-width baseline before them).
METHODS: Mapping[str, tuple[str, ...]] = {
    "shrink": ("dense", "explore", "finetune"),   # DCE, all channels shrinking to the budget
    "shrink-random": ("dense", "explore", "finetune"),  # the same, dropped in random order
    "cucb": ("dense", "explore", "finetune"),     # DCE, the poster's CUCB bandit
    "random": ("dense", "explore", "finetune"),   # DCE, uniformly random channels
    "prune": ("dense", "explore", "finetune"),    # train dense, prune by Taylor, fine-tune
    # The compact architecture from scratch: the budget's per-layer counts (under a global
    # budget, the counts a DCE run chose) ...
    "narrow": ("dense", "train"),
    # ... and the uniformly narrow network (each layer's fraction), whatever the budget:
    # what a user builds without DCE.
    "narrow-uniform": ("dense", "train"),
}
NARROW_METHODS = ("narrow", "narrow-uniform")
DCE_METHODS = ("shrink", "shrink-random", "cucb", "random")

LR_SCHEDULES = ("restart", "continuous")


def phases_of(method: str) -> tuple[str, ...]:
    check_choice("method", method, METHODS)
    return METHODS[method]


def _cucb(num_channels, c, steps_per_epoch, cost=None, blocks=None):
    return CUCBSelector(num_channels, c.fraction, tau=c.tau, budget=c.budget, seed=c.seed,
                        reward=c.reward, discount=c.discount, cost=cost, blocks=blocks,
                        flops_weight=c.flops_weight,
                        horizon=c.explore_epochs * steps_per_epoch if c.anneal else None)


# method -> factory(num_channels, config, steps_per_epoch, cost, blocks) of the selector that
# runs the explore phase (narrow has none); cost: the model's FlopsCost under
# budget="flops"; blocks: the channel groups' (grouped convs).
def _shrink(order):
    def factory(num_channels, c, steps_per_epoch, cost=None, blocks=None):
        return ShrinkSelector(num_channels, c.fraction, horizon=c.explore_epochs * steps_per_epoch,
                              budget=c.budget, seed=c.seed, reward=c.reward,
                              discount=c.discount, order=order, cost=cost, blocks=blocks,
                              flops_weight=c.flops_weight)
    return factory


SELECTORS: Mapping[str, Callable] = {
    "shrink": _shrink("saliency"),
    "shrink-random": _shrink("random"),
    "cucb": _cucb,
    "random": lambda num_channels, c, steps_per_epoch, cost=None, blocks=None: RandomSelector(
        num_channels, c.fraction, budget=c.budget, seed=c.seed, cost=cost, blocks=blocks,
        flops_weight=c.flops_weight),
    # Saliency of the last training epoch only (Molchanov et al. 2017 rank a trained net).
    "prune": lambda num_channels, c, steps_per_epoch, cost=None, blocks=None: TaylorPruneSelector(
        num_channels, c.fraction, budget=c.budget, seed=c.seed, cost=cost, blocks=blocks,
        flops_weight=c.flops_weight,
        accumulate_from=(c.explore_epochs - 1) * steps_per_epoch),
}

# name -> factory(params, lr, config) of the wrapped torch optimizer.
OPTIMIZERS: Mapping[str, Callable] = {
    "sgd": lambda params, lr, c: torch.optim.SGD(params, lr=lr, momentum=c.momentum,
                                                 weight_decay=c.weight_decay),
    "adam": lambda params, lr, c: torch.optim.Adam(params, lr=lr, weight_decay=c.weight_decay),
    "adamw": lambda params, lr, c: torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay),
}


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    """Raises ValueError naming the option, the bad value and the valid ones."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; choose from {', '.join(choices)}")
