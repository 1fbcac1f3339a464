"""Optimizer step time of VGG-16-BN (bench/step_cases.py's model) at active
fraction p: MaskedOptimizer's in-place block steps vs its generic
gather-step-scatter, next to the plain step of the dense model and of the
narrow model (physically p as wide). SGD (momentum, weight decay) and Adam.

    .venv/bin/python bench/optimizer_step.py [--p 0.5,0.25] [--threads 1,2] [--rounds 21]

Gradients are random and fixed; each call is one step() (the parameters
drift, which does not change the work). Rounds are interleaved, medians
compared (timing.py).
"""
from __future__ import annotations

import argparse

import torch

from dce_kernels.channels import plan_for
from dce_kernels.experiments.models import build_model
from dce_kernels.optim import MaskedOptimizer
from dce_kernels.selectors import CUCBSelector
from step_cases import CLASSES, MODEL, _plain
from timing import interleaved_medians, torch_threads

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4),
}


def _with_grads(model):
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def cases(fraction: float, make_opt) -> dict:
    torch.manual_seed(0)
    sparse = _with_grads(build_model(MODEL, 3, CLASSES, width=1.0))
    plan = plan_for(sparse)
    plan.apply(CUCBSelector(plan.num_channels, fraction, tau=0, seed=0).select())
    out = {}
    for name, model in (("dense", _with_grads(_plain(1.0, 0))),
                        ("narrow", _with_grads(_plain(fraction, 0)))):
        out[name] = make_opt(model.parameters()).step
    for name, in_place in (("in_place", True), ("generic", False)):
        # Separate copies of the parameters, so the two keep separate state.
        model = _with_grads(build_model(MODEL, 3, CLASSES, width=1.0))
        model.load_state_dict(sparse.state_dict())
        model_plan = plan_for(model)
        model_plan.apply(plan._selection)
        out[name] = MaskedOptimizer(make_opt(model.parameters()), model_plan.active_blocks,
                                    in_place=in_place).step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", default="0.5,0.25")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--optimizers", default="sgd,adam")
    args = ap.parse_args()
    print(f"VGG-16-BN optimizer step, median ms of {args.rounds} interleaved rounds\n")
    print("| optimizer | threads | p | dense | narrow | generic (gather-step-scatter) "
          "| in place | in place / generic | in place / narrow |")
    print("|---|---|---|---|---|---|---|---|---|")
    for opt_name in args.optimizers.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            for p in (float(x) for x in args.p.split(",")):
                with torch_threads(threads):
                    med = interleaved_medians(cases(p, OPTIMIZERS[opt_name]),
                                              rounds=args.rounds)
                ms = {k: 1e3 * v for k, v in med.items()}
                print(f"| {opt_name} | {threads} | {p} | {ms['dense']:.1f} | {ms['narrow']:.1f} "
                      f"| {ms['generic']:.1f} | {ms['in_place']:.1f} "
                      f"| {ms['in_place'] / ms['generic']:.2f} "
                      f"| {ms['in_place'] / ms['narrow']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
