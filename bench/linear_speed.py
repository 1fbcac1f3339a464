"""Forward + backward of ChannelSparseLinear vs nn.Linear (a script, not part of
``make bench``): a classifier's hidden layer, its input and output features
both at active fraction p, against the dense layer, the physically narrow
layer (what the compact model runs), and the sparse layer with every feature
active. Saliency is tracked, as in training. Interleaved rounds, medians.

    .venv/bin/python bench/linear_speed.py [--features 4096] [--batch 64] [--p 0.5]
        [--rounds 21] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from dce_kernels import ChannelSparseLinear
from timing import interleaved_medians


def _fwd_bwd(layer: nn.Module, x: torch.Tensor):
    g = torch.randn(x.shape[0], layer.out_features)

    def run():
        layer.weight.grad = None
        if layer.bias is not None:
            layer.bias.grad = None
        layer(x).backward(g)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f, k = args.features, max(1, round(args.p * args.features))
    dense = nn.Linear(f, f)
    sparse = ChannelSparseLinear.from_dense(dense).train()
    sparse.set_active(torch.randperm(f)[:k], torch.randperm(f)[:k])
    all_active = ChannelSparseLinear.from_dense(dense).train()
    narrow = nn.Linear(k, k)
    x = torch.randn(args.batch, f, requires_grad=True)
    x_narrow = torch.randn(args.batch, k, requires_grad=True)
    med = interleaved_medians({"dense": _fwd_bwd(dense, x), "sparse": _fwd_bwd(sparse, x),
                               "all_active": _fwd_bwd(all_active, x),
                               "narrow": _fwd_bwd(narrow, x_narrow)}, rounds=args.rounds)
    print(f"{f}x{f}, batch {args.batch}, p={args.p} (in and out), {args.threads} thread(s), "
          f"forward + backward, median of {args.rounds} interleaved rounds\n")
    print("| dense ms | sparse ms | sparse / dense | narrow / dense | sparse / narrow "
          "| all active / dense |")
    print("|---|---|---|---|---|---|")
    d = med["dense"]
    print(f"| {1e3 * d:.2f} | {1e3 * med['sparse']:.2f} | {med['sparse'] / d:.2f} "
          f"| {med['narrow'] / d:.2f} | {med['sparse'] / med['narrow']:.2f} "
          f"| {med['all_active'] / d:.2f} |")


if __name__ == "__main__":
    main()
