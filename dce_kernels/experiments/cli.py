"""The ``dce`` command: ``dce train`` runs the three-phase training and prints a summary;
``dce sweep`` runs a grid of them (fractions x selectors x seeds); ``dce plot`` draws it."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from ..atomic import write_atomic
from .files import CHECKPOINT, ERROR, REPORT, RESULTS_CSV, RESULTS_JSON

__all__ = ["main", "build_parser", "config_from_args", "summary_table"]


def _defaults():
    from .train import TrainConfig

    return TrainConfig()


def _add_run_options(p: argparse.ArgumentParser, d, sweep: bool) -> None:
    from ..selectors import REWARD_RULES
    from .choices import BUDGETS, LR_SCHEDULES, METHODS, OPTIMIZERS

    """The options of one run, shared by ``train`` and ``sweep`` (one source of truth).
    ``sweep``: leave out what the sweep sets per run (fraction, selector, seed, run
    directory, resume) and the dense phase (the sweep's baseline is its fraction-1.0 run)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model,
                   help="vgg11, vgg13, vgg16, vgg19 (with BatchNorm, CIFAR variant), "
                        "resnet20 or resnet56 (CIFAR ResNet; only inner block channels are "
                        "selected), torchvision:NAME (e.g. torchvision:resnet18, "
                        "torchvision:mobilenet_v2) or timm:NAME (e.g. timm:efficientnet_b0, "
                        "timm:regnetx_002; untrained, converted by dce_kernels.convert, stem "
                        "adapted to the images' channels, images under 32x32 zero-padded; "
                        "needs torchvision or timm)")
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
    g = p.add_argument_group("method and channel selection")
    if not sweep:
        g.add_argument("--fraction", type=float, default=d.fraction,
                       help="fraction of channels kept in the compact model (and active "
                            "during exploration, for cucb and random), in (0, 1]")
        g.add_argument("--method", "--selector", dest="method", choices=list(METHODS),
                       default=d.method, help=_METHOD_HELP)
    g.add_argument("--budget", choices=list(BUDGETS), default=d.budget,
                   help="layer: each layer keeps the fraction of its channels; global: "
                        "the fraction of all channels, shared among layers by rank (>= 1 each); "
                        "flops: the inference FLOPs of the uniformly narrow network at the "
                        "fraction, spent where the saliency per FLOP is highest")
    g.add_argument("--tau", type=int, default=d.tau,
                   help="cucb: warm-up steps with random channels before the bandit takes over")
    g.add_argument("--reward", choices=list(REWARD_RULES), default=d.reward,
                   help="per-step normalization of saliency into a reward (shrink, cucb): max "
                        "(the poster), l2 (Molchanov's per-layer L2), rank")
    g.add_argument("--flops-weight", type=float, default=d.flops_weight,
                   help="budget flops: drop channels by score / FLOPs saved ** this; 0 ranks "
                        "by score alone, 1 by score per FLOP")
    g.add_argument("--discount", type=float, default=d.discount,
                   help="shrink, cucb: rewards enter a channel's mean with weight "
                        "max(1/T, 1 - discount); 1 is the plain mean")
    g.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=d.anneal,
                   help="cucb: scale the confidence term down to 0 over the exploration, so "
                        "the bandit converges before fine-tuning")
    g.add_argument("--scale-init", action=argparse.BooleanOptionalAction, default=d.scale_init,
                   help="shrink, cucb, random: initialize conv weights for the active width "
                        "(x 1/sqrt(fraction))")
    g.add_argument("--rewind", action=argparse.BooleanOptionalAction, default=d.rewind,
                   help="reset the kept channels to their initial weights before fine-tuning")
    if not sweep:
        g.add_argument("--widths-from", default=d.widths_from,
                       help="narrow: take the per-layer channel counts from this finished "
                            "run's directory (needed under a global or flops budget)")
    g = p.add_argument_group("schedule")
    if not sweep:
        g.add_argument("--dense-epochs", type=int, default=d.dense_epochs,
                       help="epochs of the dense baseline (0 skips it)")
    g.add_argument("--explore-epochs", type=int, default=d.explore_epochs,
                   help="epochs of phase 1 (channel exploration)")
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="epochs of phase 3 (fine-tuning the kept channels)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="training batch size (the global batch: under torchrun, split evenly "
                        "among the processes)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=d.optimizer,
                   help="optimizer; inactive channels' weights and state never change")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate of the dense, exploration and narrow phases (cosine-"
                        "decayed to 0)")
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help="learning rate of the fine-tuning phase under --lr-schedule restart")
    g.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=d.lr_schedule,
                   help="restart: a cosine decay per phase (the poster); continuous: one decay "
                        "from --lr over exploration and fine-tuning together")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g = p.add_argument_group("run")
    if not sweep:
        g.add_argument("--seed", type=int, default=d.seed,
                       help="seed of initialization, batch order and channel selection")
    g.add_argument("--device", default=d.device,
                   help="torch device, e.g. cpu or cuda (under torchrun, cuda means each "
                        "process's cuda:LOCAL_RANK)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=d.sync_bn,
                   help="under torchrun: normalize by the BatchNorm statistics of the global "
                        "batch (channel-sparse SyncBatchNorm), so N processes train as one")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    if not sweep:
        g.add_argument("--run-dir", default=d.run_dir,
                       help="where checkpoint.pt, report.json and the exported model go")
        g.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its last checkpoint (same "
                            "options)")
        g.add_argument("--compare", type=_str_list, default=[],
                       help="after the run, train these methods with the same options and "
                            "epochs (in RUN_DIR/METHOD) and print all side by side, e.g. "
                            "narrow-uniform,narrow")
        g.add_argument("--stop-after-epochs", type=int, default=None,
                       help="stop after this many epochs in this invocation (continue later "
                            "with --resume)")
        g.add_argument("--nproc", type=int, default=None,
                       help="run in this many processes on this machine, through torchrun "
                            "(the same as torchrun --standalone --nproc_per_node N -m "
                            "dce_kernels.experiments.cli train ...)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress output: neither the bars (on a terminal) nor the one "
                        "line per epoch (when output goes to a file)")


_METHOD_HELP = ("shrink: DCE, all channels active at first, shrinking to the fraction by "
                "mean saliency over the exploration; shrink-random: the same, channels "
                "dropped in random order; cucb: DCE with the poster's CUCB bandit; "
                "random: DCE with uniformly random channels (the poster's baseline); prune: "
                "train dense, keep the channels of highest Taylor saliency, fine-tune; narrow: "
                "the compact architecture trained from scratch for the same epochs (under a "
                "global budget with the widths of --widths-from); narrow-uniform: the "
                "uniformly narrow network (each layer's fraction) from scratch")


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .choices import METHODS
    from .sweep import DEFAULT_FRACTIONS, DEFAULT_METHODS

    d = _defaults()
    parser = argparse.ArgumentParser(
        prog="dce", description="Dynamic Channel Execution: train compact CNNs from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a compact network by one method (DCE, pruning or narrow), export it",
        description=(
            "Phase 0 (optional, --dense-epochs): the dense model as a reference. Then, by "
            "--method: shrink/shrink-random/cucb/random (DCE) explore with only some channels "
            "active per step, chosen from the Taylor saliency the layers report, keep "
            "--fraction of them and fine-tune; prune trains dense, keeps the channels of "
            "highest saliency and fine-tunes; narrow/narrow-uniform train the compact "
            "architecture from scratch. Then export the physically smaller model "
            "(RUN_DIR/compact.pt2, loadable with torch.export.load and no dce_kernels) and write "
            "RUN_DIR/report.json with accuracy, sizes and the training cost. A checkpoint is "
            "written after every epoch."))
    _add_run_options(t, d, sweep=False)

    s = sub.add_parser(
        "sweep", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a grid of runs: every fraction x method x seed, with the dense baseline",
        description=(
            "Runs `dce train` (no dense phase) for every fraction below 1 x method x seed, "
            "plus once per seed the dense baseline: the fraction-1.0 run, the full network "
            "trained from scratch for the same epochs. Each run goes to "
            "OUT/<dataset>-<model>/<method>-p<fraction>-s<seed>/. Finished runs are skipped, "
            "interrupted ones resumed from their checkpoint; several processes may share OUT "
            "and split the runs (a lock file per run). The table of all finished runs is "
            "written to OUT/<dataset>-<model>/results.json and .csv; `dce plot` draws it."))
    g = s.add_argument_group("grid")
    g.add_argument("--fractions", type=_float_list,
                   default=list(DEFAULT_FRACTIONS),
                   help="comma-separated fractions of channels kept, in (0, 1]; 1.0 is the "
                        "dense baseline, run once per seed unless --no-baseline")
    g.add_argument("--methods", "--selectors", dest="methods", type=_str_list,
                   default=list(DEFAULT_METHODS),
                   help=f"comma-separated methods: {', '.join(METHODS)}")
    g.add_argument("--seeds", type=_int_list, default=[0, 1, 2],
                   help="comma-separated seeds (the paper runs every experiment 3 times)")
    g.add_argument("--no-baseline", action="store_true",
                   help="leave out the dense baseline runs (for an ablation beside a sweep "
                        "that has them)")
    g.add_argument("--out", default="runs/sweep", help="output directory (shareable)")
    g.add_argument("--max-runs", type=int, default=None,
                   help="start at most this many runs in this invocation")
    g.add_argument("--collect-only", action="store_true",
                   help="train nothing: rewrite the results table from the finished runs")
    _add_run_options(s, d, sweep=True)

    p = sub.add_parser(
        "plot", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="draw a sweep's results: accuracy vs active channels; size vs accuracy",
        description=(
            "Reads a sweep's results (results.json or .csv, or the directory holding them) and "
            "writes accuracy_vs_channels.png (test accuracy vs % channels kept, one line per "
            "method, mean and min..max over seeds, dense baseline as a line) and "
            "reduction_vs_accuracy.png (accuracy vs parameter and FLOP reduction), then prints "
            "the table (every method with its size and training cost) as Markdown."))
    p.add_argument("results", help="results.json, results.csv or the sweep directory")
    p.add_argument("--out-dir", default=None,
                   help="where the PNGs go (default: next to the results)")
    p.add_argument("--title", default=None, help="title of the accuracy figure")
    p.add_argument("--markdown", default=None, help="also write the Markdown table to this file")

    a = sub.add_parser(
        "ablation-table", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="one table of an ablation's variants (each a folder of runs)",
        description=(
            "Reads every finished run under OUT/<variant>/ (the sweeps of "
            "docs/ablation-fmnist/run.sh, or any folders of `dce train` runs) and prints one "
            "line per variant: accuracy mean ± std (min–max) over seeds, the difference to "
            "--reference, size and training cost relative to the variant named dense."))
    a.add_argument("out", help="the folder holding one folder per variant")
    a.add_argument("--reference", default="narrow", help="the variant the others are compared to")
    a.add_argument("--markdown", default=None, help="also write the table to this file")
    a.add_argument("--csv", default=None, help="also write every run's row to this CSV file")
    return parser


def config_from_args(args: argparse.Namespace, **overrides):
    """A TrainConfig from parsed options: every field that has an option of the same
    name, the rest at their defaults, then ``overrides``."""
    from .train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values["progress"] = not args.no_progress
    values.update(overrides)
    return TrainConfig(**values)


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


def _text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned text lines, the first row a header with a rule below."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def summary_table(report) -> str:
    """Dense vs compact of a finished run (a RunReport): accuracy, parameters, FLOPs,
    time per epoch."""
    d, c, r = report.dense, report.compact, report.reduction
    change = r.accuracy_change
    rows = [
        ("", "dense", "compact", "change"),
        ("test accuracy", _fmt_acc(d.test_acc), _fmt_acc(c.test_acc),
         "-" if change is None else f"{100 * change:+.2f} pts"),
        ("parameters", _fmt_count(d.params), _fmt_count(c.params), f"{r.params:.2f}x fewer"),
        ("FLOPs / image (fwd)", _fmt_count(d.flops), _fmt_count(c.flops),
         f"{r.flops:.2f}x fewer"),
        ("time / epoch", _fmt_s(d.seconds_per_epoch), _fmt_s(c.seconds_per_epoch),
         "(compact: fine-tune phase)"),
    ]
    lines = _text_table(rows)
    lines.append("")
    lines.append("phases: " + ", ".join(
        f"{p} {v.epochs} ep {v.seconds:.1f}s (test {_fmt_acc(v.test_acc)})"
        for p, v in report.phases.items()))
    sel = report.selection
    if sel:
        lines.append(f"channels kept: {sum(sel.channels_kept)}/{sum(sel.channels_total)} "
                     f"({report.config['method']}, budget {report.config['budget']})")
    lines.append(f"exported: {report.export.program} (accuracy equals the sparse "
                 f"model's: {report.export.accuracy_matches_sparse})")
    return "\n".join(lines)


def _set_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    if threads < 1:
        raise SystemExit("--threads must be >= 1")
    import torch

    torch.set_num_threads(threads)


def comparison_table(reports: dict) -> str:
    """Method -> finished RunReport, side by side: what each gives and what it cost."""
    rows = [("method", "test accuracy", "parameters", "FLOPs / image", "channels kept",
             "training time", "training FLOPs")]
    for method, r in reports.items():
        rows.append((method, _fmt_acc(r.compact.test_acc), _fmt_count(r.compact.params),
                     _fmt_count(r.compact.flops),
                     "-".join(str(k) for k in r.selection.channels_kept),
                     _fmt_s(r.train_seconds), _fmt_count(r.train_flops)))
    return "\n".join(_text_table(rows))


def _train(args, argv: Sequence[str]) -> int:
    from .choices import METHODS, check_choice
    from .launch import init_from_environment, torchrun_command, under_torchrun
    from .train import train

    if args.nproc is not None and not under_torchrun():
        import subprocess

        try:
            command = torchrun_command(args.nproc, _without_nproc(argv))
        except ValueError as e:
            print(f"dce train: error: {e}", file=sys.stderr)
            return 2
        return subprocess.call(command)
    _set_threads(args.threads)
    config = config_from_args(args, device=init_from_environment(args.device))
    # Rank 0 speaks for a torchrun job (errors come from every rank).
    say = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    try:
        for method in args.compare:
            check_choice("--compare method", method, METHODS)
        report = train(config, resume=args.resume, stop_after_epochs=args.stop_after_epochs)
        if report is None:
            say(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume "
                  f"--run-dir {args.run_dir}")
            return 0
        say(summary_table(report))
        say(f"report: {os.path.join(args.run_dir, REPORT)}")
        reports = {config.method: report}
        for method in args.compare:
            # The same options and epochs; a narrow network takes this run's widths.
            other = dataclasses.replace(
                config, method=method, dense_epochs=0,
                run_dir=os.path.join(config.run_dir, method),
                widths_from=config.run_dir if method == "narrow" else None)
            resume = args.resume and os.path.exists(os.path.join(other.run_dir, CHECKPOINT))
            say(f"\ntraining {method} for comparison ({other.run_dir})", flush=True)
            reports[method] = train(other, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"dce train: error: {e}", file=sys.stderr)
        return 2
    if len(reports) > 1:
        say("\n" + comparison_table(reports))
    return 0


def _sweep(args) -> int:
    from .sweep import plan_runs, run_sweep, sweep_dir, write_table

    _set_threads(args.threads)
    try:
        runs = plan_runs(args.fractions, args.methods, args.seeds,
                         baseline=not args.no_baseline)
        base = config_from_args(args)
        root = sweep_dir(args.out, base)
        if args.collect_only:
            rows, missing = write_table(root, runs)
            print(f"{len(rows)} finished, {len(missing)} missing; table: "
                  f"{os.path.join(root, RESULTS_JSON)}")
            return 0
        log = lambda message: print(message, flush=True)
        log(f"sweep: {len(runs)} runs into {root}")
        outcome = run_sweep(base, args.out, runs, max_runs=args.max_runs, log=log)
    except (ValueError, FileNotFoundError) as e:
        print(f"dce sweep: error: {e}", file=sys.stderr)
        return 2
    print(f"ran {len(outcome.ran)} ({len(outcome.resumed)} resumed), skipped "
          f"{len(outcome.skipped)} finished, {len(outcome.busy)} held by other processes, "
          f"{len(outcome.stopped)} left (--max-runs), {len(outcome.failed)} failed")
    for name, error in outcome.failed.items():
        print(f"  failed: {name}: {error} (see {os.path.join(root, name, ERROR)})")
    print(f"table: {os.path.join(root, RESULTS_JSON)}, {os.path.join(root, RESULTS_CSV)}; "
          f"draw it with: dce plot {root}")
    return 1 if outcome.failed else 0


def _plot(args) -> int:
    from .plot import plot_results
    from .results import markdown_table, read_results

    try:
        rows = read_results(args.results)
        out_dir = args.out_dir or (args.results if os.path.isdir(args.results)
                                   else os.path.dirname(os.path.abspath(args.results)))
        paths = plot_results(rows, out_dir, title=args.title)
        table = markdown_table(rows)
    except (ValueError, FileNotFoundError) as e:
        print(f"dce plot: error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        write_atomic(args.markdown, lambda f: f.write(table + "\n"))
    print(table)
    print("wrote " + ", ".join(paths))
    return 0


def _ablation_table(args) -> int:
    import csv

    from .results import COLUMNS, variant_rows, variant_table

    try:
        rows = variant_rows(args.out)
        table = variant_table(rows, reference=args.reference)
    except (ValueError, FileNotFoundError) as e:
        print(f"dce ablation-table: error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        write_atomic(args.markdown, lambda f: f.write(table + "\n"))
    if args.csv:
        def write_csv(f):
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

        write_atomic(args.csv, write_csv)
    print(table)
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args, argv)
    return {"sweep": _sweep, "plot": _plot, "ablation-table": _ablation_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
