"""FLOPs skipped and training-step time of torchvision models converted by
dce_kernels.convert, at active fraction p (default 0.5).

    .venv/bin/python bench/convert_models.py [--models resnet18,vgg11_bn] [--p 0.5]
        [--batch 32] [--size 32] [--rounds 7] [--threads 2]
    .venv/bin/python bench/convert_models.py --shrink [--models ...] [--size 64]

``--shrink`` prints instead, per model (torchvision names, or timm:NAME; default:
four torchvision models and nine timm families), how far ``compact_model``
shrinks it at p: sparse convs / all convs, parameter and FLOP reduction of the
compact model (CUCB's first selection: p of every group), why convs stay full,
and next to it Torch-Pruning's DepGraph result on the same untrained model
(magnitude importance, pruning ratio p per group, classifier kept), measured in
the same run (needs the bench extra: torch-pruning).

Per model (untrained, float32, batch x 3 x size x size, 10 classes):

* FLOPs (torch.utils.flop_counter, convs and matmuls) of one forward and of one
  forward + backward, dense original vs converted with a random selection at p.
  Depthwise convs with some outputs inactive count their active planes (the
  narrower depthwise conv they run); other groups > 1 convs count at full width,
  since they run the masked dense path.
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
from dce_kernels import CUCBSelector, count_flops, count_params
from dce_kernels.channels import plan_for
from dce_kernels.optim import MaskedOptimizer

# Wall time by default; --clock cpu: this process's CPU time, steadier for one
# thread on a machine shared with other work (as bench/timing.py offers).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _step_fn(model, x, y, plan=None, selector=None, parts=None):
    """One training step; with ``parts`` (a dict of lists) the time of each part
    of it is recorded: selection, forward + backward, optimizer, selector update."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if plan is not None:
        opt = MaskedOptimizer(opt, plan.active_blocks)

    def step():
        t = [_clock()]
        if selector is not None:
            plan.apply(selector.select())
        t.append(_clock())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        t.append(_clock())
        opt.step()
        t.append(_clock())
        if selector is not None:
            selector.update(plan.saliency())
        t.append(_clock())
        if parts is not None:
            for key, a, b in zip(("select", "fwd_bwd", "opt", "update"), t, t[1:]):
                parts.setdefault(key, []).append(b - a)
    return step


def measure(name: str, p: float, batch: int, size: int, rounds: int) -> dict:
    original = _build(name).train()  # torchvision or timm:NAME
    converted = dce_kernels.convert(original, copy=True)
    full = dce_kernels.convert(original, copy=True)  # all channels active, always
    plan = plan_for(converted)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    selector = CUCBSelector(plan.num_channels, fraction=p, tau=0, seed=0, blocks=plan.blocks)
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
            t0 = _clock()
            step()
            times[k].append(_clock() - t0)
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


SHRINK_MODELS = ("resnet18,vgg11_bn,mobilenet_v2,densenet121,timm:regnetx_002,"
                 "timm:efficientnet_b0,timm:convnext_atto,timm:ghostnet_050,timm:repvgg_a0,"
                 "timm:mobilenetv3_small_050,timm:resnet50,timm:densenet121,timm:vgg11_bn")


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _torch_pruning(name: str, p: float, x: torch.Tensor) -> tuple[float, float]:
    """(parameter, FLOP) reduction of Torch-Pruning's DepGraph at ratio p."""
    import torch_pruning as tp

    model = _build(name)
    dense_params, dense_flops = count_params(model), count_flops(model, x)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=p, ignored_layers=[_classifier(model)])
    pruner.step()
    return dense_params / count_params(model), dense_flops / count_flops(model, x)


def shrink(name: str, p: float, size: int) -> dict:
    """How far compact_model shrinks ``name`` at p, and why convs stay full."""
    import collections
    import warnings

    from dce_kernels.channels import conversion_notes

    original = _build(name)
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dce_kernels.convert(original, copy=True, example_inputs=x)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    sparse = sum(isinstance(m, dce_kernels.ChannelSparseConv2d) for m in model.modules())
    modules = dict(model.named_modules())
    reasons = collections.Counter(why.split(": ", 1)[-1] for name, why in
                                  conversion_notes(model).items()
                                  if isinstance(modules.get(name), torch.nn.Conv2d))
    row = {"model": name, "sparse": sparse, "convs": convs, "params": 1.0, "flops": 1.0,
           "full": "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))}
    if caught:
        row["full"] = (row["full"] + "; " if row["full"] else "") + str(caught[0].message)[:90]
    try:
        plan = plan_for(model)
        plan.apply(CUCBSelector(plan.num_channels, fraction=p, tau=1, seed=0,
                                blocks=plan.blocks).select())
        compact = dce_kernels.compact_model(model, plan).eval()
        row["params"] = count_params(original) / count_params(compact)
        row["flops"] = count_flops(original, x) / count_flops(compact, x)
    except ValueError as e:
        row["full"] = f"{row['full']}; {e}"[:200]
    try:
        row["tp_params"], row["tp_flops"] = _torch_pruning(name, p, x)
    except Exception as e:  # report, do not stop the table
        row["tp_params"] = row["tp_flops"] = float("nan")
        row["full"] += f" (Torch-Pruning failed: {type(e).__name__})"
    return row


def main_shrink(args) -> None:
    print(f"p={args.p}, untrained, 1x3x{args.size}x{args.size}, float32\n")
    print("| model | sparse / all convs | params / compact (ours) | Torch-Pruning "
          "| FLOPs / compact (ours) | Torch-Pruning | why convs stay full |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = shrink(name, args.p, args.size)
        print(f"| {r['model']} | {r['sparse']} / {r['convs']} | {r['params']:.2f}x "
              f"| {r['tp_params']:.2f}x | {r['flops']:.2f}x | {r['tp_flops']:.2f}x "
              f"| {r['full'] or '-'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,vgg11_bn,mobilenet_v2,densenet121")
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier on a loaded machine)")
    ap.add_argument("--shrink", action="store_true",
                    help="the compact model's reduction next to Torch-Pruning's instead")
    args = ap.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    if args.shrink:
        if args.models == ap.get_default("models"):
            args.models = SHRINK_MODELS
        if args.size == ap.get_default("size"):
            args.size = 64
        main_shrink(args)
        return
    print(f"p={args.p}, batch {args.batch}, {args.size}x{args.size}, float32, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds, "
          f"{args.clock} clock\n")
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
