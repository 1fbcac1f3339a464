"""FLOPs skipped and training-step time of torchvision models converted by
dce_kernels.convert, at active fraction p (default 0.5).

    .venv/bin/python bench/convert_models.py [--models resnet18,vgg11_bn] [--p 0.5]
        [--batch 32] [--size 32] [--rounds 7] [--threads 2]

Per model (untrained, float32, batch x 3 x size x size, 10 classes):

* FLOPs (torch.utils.flop_counter, convs and matmuls) of one forward and of one
  forward + backward, dense original vs converted with a random selection at p.
  groups > 1 convs (depthwise) count at full width, since they run the masked
  dense path.
* Step time: a full training step (forward, cross-entropy, backward, SGD step)
  of the original vs the converted model at p, the latter including what DCE
  adds per step (CUCB select, ChannelPlan.apply, MaskedOptimizer, selector
  update), and vs the converted model with all channels active (the cost of
  the sparse layers themselves). Rounds are interleaved and compared by the
  median, as in bench/timing.py: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import dce_kernels
from dce_kernels import CUCBSelector, count_flops
from dce_kernels.channels import plan_for
from dce_kernels.optim import MaskedOptimizer


def _step_fn(model, x, y, plan=None, selector=None, parts=None):
    """One training step; with ``parts`` (a dict of lists) the time of each part
    of it is recorded: selection, forward + backward, optimizer, selector update."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if plan is not None:
        opt = MaskedOptimizer(opt, plan.active_blocks)

    def step():
        t = [time.perf_counter()]
        if selector is not None:
            plan.apply(selector.select())
        t.append(time.perf_counter())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if selector is not None:
            selector.update(plan.saliency())
        t.append(time.perf_counter())
        if parts is not None:
            for key, a, b in zip(("select", "fwd_bwd", "opt", "update"), t, t[1:]):
                parts.setdefault(key, []).append(b - a)
    return step


def measure(name: str, p: float, batch: int, size: int, rounds: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None, num_classes=10)
    converted = dce_kernels.convert(original, copy=True)
    full = dce_kernels.convert(original, copy=True)  # all channels active, always
    plan = plan_for(converted)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    selector = CUCBSelector(plan.num_channels, fraction=p, tau=0, seed=0)
    plan.apply(selector.select())
    one = x[:1]
    flops = {"dense_fwd": count_flops(original, one), "sparse_fwd": count_flops(converted, one),
             "dense_fwd_bwd": count_flops(original, one, backward=True),
             "sparse_fwd_bwd": count_flops(converted, one, backward=True)}

    for m in (original, converted, full):
        m.train()
    dense_parts: dict = {}
    sparse_parts: dict = {}
    steps = {"dense": _step_fn(original, x, y, parts=dense_parts),
             "sparse": _step_fn(converted, x, y, plan, selector, parts=sparse_parts),
             "all_active": _step_fn(full, x, y, plan_for(full))}
    for step in steps.values():  # warm-up
        step()
    dense_parts.clear(), sparse_parts.clear()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "groups": len(plan.groups), **flops,
            "skipped_fwd": 1 - flops["sparse_fwd"] / flops["dense_fwd"],
            "skipped_fwd_bwd": 1 - flops["sparse_fwd_bwd"] / flops["dense_fwd_bwd"],
            "dense_ms": 1e3 * med["dense"], "sparse_ms": 1e3 * med["sparse"],
            "ratio": med["sparse"] / med["dense"],
            "all_active_ratio": med["all_active"] / med["dense"],
            "parts": {k: (1e3 * statistics.median(dense_parts[k]),
                          1e3 * statistics.median(sparse_parts[k]))
                      for k in ("select", "fwd_bwd", "opt", "update")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,vgg11_bn,mobilenet_v2,densenet121")
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"p={args.p}, batch {args.batch}, {args.size}x{args.size}, float32, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds\n")
    print("| model | groups | fwd FLOPs dense | skipped fwd | skipped fwd+bwd | dense step ms "
          "| DCE step / dense | all-active step / dense |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models.split(","):
        r = measure(name, args.p, args.batch, args.size, args.rounds)
        results.append(r)
        print(f"| {r['model']} | {r['groups']} | {r['dense_fwd'] / 1e6:.1f}M "
              f"| {100 * r['skipped_fwd']:.1f}% | {100 * r['skipped_fwd_bwd']:.1f}% "
              f"| {r['dense_ms']:.0f} | {r['ratio']:.2f} | {r['all_active_ratio']:.2f} |",
              flush=True)
    print("\nWhere the time goes (median ms, dense -> DCE at p):\n")
    print("| model | select + apply | forward + backward | optimizer step | selector update |")
    print("|---|---|---|---|---|")
    for r in results:
        cells = " | ".join(f"{d:.0f} -> {s:.0f}" for d, s in r["parts"].values())
        print(f"| {r['model']} | {cells} |")


if __name__ == "__main__":
    main()
