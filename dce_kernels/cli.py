"""The ``dce`` command: ``dce train ...`` runs the three-phase training and prints a summary."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "summary_table"]


def _defaults():
    from .train import TrainConfig

    return TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    d = _defaults()
    parser = argparse.ArgumentParser(
        prog="dce", description="Dynamic Channel Execution: train compact CNNs from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="explore channels with a bandit, keep the most salient, fine-tune, export",
        description=(
            "Phase 0 (optional): train the dense model as a baseline. Phase 1: train with only "
            "--fraction of each conv layer's channels active per step, chosen by --selector "
            "from the Taylor saliency the layers report. Phase 2: keep the channels of highest "
            "mean saliency. Phase 3: fine-tune them. Then export the physically smaller model "
            "(RUN_DIR/compact.pt2, loadable with torch.export.load and no dce_kernels) and write "
            "RUN_DIR/report.json. A checkpoint is written after every epoch."))
    g = t.add_argument_group("model and data")
    g.add_argument("--model", default=d.model,
                   help="vgg11, vgg13, vgg16, vgg19 (with BatchNorm, CIFAR variant), "
                        "resnet20 or resnet56 (CIFAR ResNet; only inner block channels are "
                        "selected), or torchvision:NAME (e.g. torchvision:resnet18, "
                        "torchvision:mobilenet_v2; untrained, converted by "
                        "dce_kernels.convert, stem adapted to the images' channels, images "
                        "under 32x32 zero-padded; needs torchvision)")
    g.add_argument("--width", type=float, default=d.width,
                   help="multiplier of every layer's channel count (e.g. 0.25 for a quick run)")
    g.add_argument("--dataset", default=d.dataset,
                   help="fashion-mnist, cifar10, cifar100 or svhn (read from local files)")
    g.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the dataset files (default: $DCE_DATA_DIR, else the "
                        "dataset's system location, e.g. Debian's dataset-fashion-mnist)")
    g.add_argument("--train-limit", type=int, default=d.train_limit,
                   help="use only the first N training images (default: all)")
    g.add_argument("--test-limit", type=int, default=d.test_limit,
                   help="use only the first N test images (default: all)")
    g = t.add_argument_group("channel selection")
    g.add_argument("--fraction", type=float, default=d.fraction,
                   help="fraction of channels active during exploration and kept in the "
                        "compact model, in (0, 1]")
    g.add_argument("--selector", choices=["cucb", "random"], default=d.selector,
                   help="cucb: combinatorial UCB over normalized saliency; random: uniform "
                        "random channels every step and at the end (the paper's baseline)")
    g.add_argument("--budget", choices=["layer", "global"], default=d.budget,
                   help="layer: each layer keeps --fraction of its channels; global: "
                        "--fraction of all channels, shared among layers by rank (>= 1 each)")
    g.add_argument("--tau", type=int, default=d.tau,
                   help="warm-up steps with random channels before CUCB takes over")
    g = t.add_argument_group("schedule")
    g.add_argument("--dense-epochs", type=int, default=d.dense_epochs,
                   help="epochs of the dense baseline (0 skips it)")
    g.add_argument("--explore-epochs", type=int, default=d.explore_epochs,
                   help="epochs of phase 1 (channel exploration)")
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="epochs of phase 3 (fine-tuning the kept channels)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=d.optimizer,
                   help="optimizer; inactive channels' weights and state never change")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate of the dense and exploration phases (cosine-decayed to "
                        "0 within each phase)")
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help="learning rate of the fine-tuning phase (cosine-decayed)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g = t.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of initialization, batch order and channel selection")
    g.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--run-dir", default=d.run_dir,
                   help="where checkpoint.pt, report.json and the exported model go")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint (same options)")
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop after this many epochs in this invocation (continue later with "
                        "--resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_acc(a: Optional[float]) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def _fmt_s(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.1f}s"


def summary_table(report: dict) -> str:
    """Dense vs compact: accuracy, parameters, FLOPs, time per epoch."""
    d, c, r = report["dense"], report["compact"], report["reduction"]
    change = r["accuracy_change"]
    rows = [
        ("", "dense", "compact", "change"),
        ("test accuracy", _fmt_acc(d["test_acc"]), _fmt_acc(c["test_acc"]),
         "-" if change is None else f"{100 * change:+.2f} pts"),
        ("parameters", _fmt_count(d["params"]), _fmt_count(c["params"]),
         f"{r['params']:.2f}x fewer"),
        ("FLOPs / image (fwd)", _fmt_count(d["flops"]), _fmt_count(c["flops"]),
         f"{r['flops']:.2f}x fewer"),
        ("time / epoch", _fmt_s(d["seconds_per_epoch"]), _fmt_s(c["seconds_per_epoch"]),
         "(compact: fine-tune phase)"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    phases = report["phases"]
    lines.append("")
    lines.append("phases: " + ", ".join(
        f"{p} {v['epochs']} ep {v['seconds']:.1f}s (test {_fmt_acc(v['test_acc'])})"
        for p, v in phases.items()))
    sel = report.get("selection")
    if sel:
        lines.append(f"channels kept: {sum(sel['channels_kept'])}/{sum(sel['channels_total'])} "
                     f"({report['config']['selector']}, budget {report['config']['budget']})")
    lines.append(f"exported: {report['export']['program']} (accuracy equals the sparse "
                 f"model's: {report['export']['accuracy_matches_sparse']})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        import torch

        from .train import TrainConfig, train

        if args.threads is not None:
            if args.threads < 1:
                raise SystemExit("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        config = TrainConfig(
            model=args.model, dataset=args.dataset, data_dir=args.data_dir, width=args.width,
            fraction=args.fraction, budget=args.budget, selector=args.selector, tau=args.tau,
            explore_epochs=args.explore_epochs, finetune_epochs=args.finetune_epochs,
            dense_epochs=args.dense_epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, finetune_lr=args.finetune_lr,
            momentum=args.momentum, weight_decay=args.weight_decay,
            train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed,
            device=args.device, run_dir=args.run_dir, progress=not args.no_progress)
        try:
            report = train(config, resume=args.resume, stop_after_epochs=args.stop_after_epochs)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"dce train: error: {e}", file=sys.stderr)
            return 2
        if report is None:
            print(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume "
                  f"--run-dir {args.run_dir}")
            return 0
        print(summary_table(report))
        print(f"report: {args.run_dir}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
