"""The selector candidates: one exploration step's channel selection for VGG-16-BN's 13
channel groups (4,224 channels), without the forward and backward: ``select()``,
``ChannelPlan.apply`` and ``update(plan.saliency())``, with the saliency the layers hold
(random, filled in once: the selector's cost does not depend on the values).

``old``: the per-layer selectors as they were (python_tests/reference_selectors.py, a
frozen copy), with the plan checking every group's list (its only mode then). ``new``:
dce_kernels.selectors, whose lists need no check (``validate=False``, as DynamicChannels
applies them). ``new-no-apply``: select + update alone."""
from __future__ import annotations

import os
import sys

import torch

from dce_kernels import selectors
from dce_kernels.channels import plan_for
from dce_kernels.experiments.models import build_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python_tests"))
import reference_selectors  # noqa: E402

MODEL = "vgg16"


def _plan(seed: int):
    torch.manual_seed(seed)
    plan = plan_for(build_model(MODEL, 3, 10, width=1.0))
    for g in plan.groups:
        g.producer.saliency.copy_(torch.rand_like(g.producer.saliency))
    return plan


def _selector(module, kind: str, num_channels, fraction: float, seed: int):
    if kind == "cucb":  # tau 2: the timed steps run the bandit, a run's steady state
        return module.CUCBSelector(num_channels, fraction, tau=2, seed=seed)
    if kind == "cucb-global":
        return module.CUCBSelector(num_channels, fraction, tau=2, budget="global", seed=seed)
    if kind == "shrink-global":  # the trainer's default; mid-schedule, the set still moves
        return module.ShrinkSelector(num_channels, fraction, horizon=100_000, budget="global",
                                     seed=seed)
    raise ValueError(f"unknown selector kind {kind!r}")


def make_selector_cases(kind: str = "cucb", fraction: float = 0.5, seed: int = 0):
    """Callables for one step of each candidate (see the module docstring)."""
    def case(module, validate: bool, apply: bool):
        plan = _plan(seed)
        sel = _selector(module, kind, plan.num_channels, fraction, seed)
        for _ in range(3):  # past the warm-up
            plan.apply(sel.select(), validate=validate)
            sel.update(plan.saliency())

        def step():
            chosen = sel.select()
            if apply:
                plan.apply(chosen, validate=validate)
            sel.update(plan.saliency())
        return step

    return {"old": case(reference_selectors, validate=True, apply=True),
            "new": case(selectors, validate=False, apply=True),
            "new-no-apply": case(selectors, validate=False, apply=False)}
