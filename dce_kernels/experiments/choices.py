"""The choices a run offers by name: selectors, optimizers, budgets.

The CLI's ``choices=``, ``TrainConfig.validate()``, the sweep's grid and the
trainer's factories all read these tables, so a new entry is added once.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from ..selectors import BUDGETS, CUCBSelector, RandomSelector

__all__ = ["SELECTORS", "OPTIMIZERS", "BUDGETS", "check_choice"]

# name -> factory(num_channels, config) of a selector for the run's channel plan.
SELECTORS: Mapping[str, Callable] = {
    "cucb": lambda num_channels, c: CUCBSelector(num_channels, c.fraction, tau=c.tau,
                                                 budget=c.budget, seed=c.seed),
    "random": lambda num_channels, c: RandomSelector(num_channels, c.fraction, budget=c.budget,
                                                     seed=c.seed),
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
