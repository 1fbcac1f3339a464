"""The results table of a sweep: one row per finished run, read from its report.json.

``collect`` builds the rows, ``write_results`` writes ``results.json`` (rows plus
the sweep's options and the runs still missing) and ``results.csv`` (rows only)
atomically, ``read_results`` reads either back, ``aggregate`` reduces the seeds of
each (selector, fraction) cell to mean / std / min / max, and ``markdown_table``
renders that for the README.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional, Sequence

from .files import REPORT, RESULTS_CSV, RESULTS_JSON, SWEEP_OPTIONS
from .report import RunReport

__all__ = ["COLUMNS", "collect", "write_results", "read_results", "aggregate",
           "markdown_table"]


# One row per run; the order is the CSV's column order.
COLUMNS = ("name", "selector", "fraction", "seed", "test_acc", "explore_test_acc",
           "params", "flops", "dense_params", "dense_flops", "param_reduction",
           "flop_reduction", "channels_kept", "channels_total", "epochs", "seconds")


def _row(spec, report: RunReport) -> dict:
    explore = [h.test_acc for h in report.history if h.phase == "explore"]
    return {
        "name": spec.name, "selector": spec.selector, "fraction": float(spec.fraction),
        "seed": spec.seed,
        # The exported compact model's accuracy (equal to the sparse model's).
        "test_acc": report.compact.test_acc,
        "explore_test_acc": explore[-1] if explore else None,
        "params": report.compact.params, "flops": report.compact.flops,
        "dense_params": report.dense.params, "dense_flops": report.dense.flops,
        "param_reduction": report.reduction.params,
        "flop_reduction": report.reduction.flops,
        "channels_kept": sum(report.selection.channels_kept),
        "channels_total": sum(report.selection.channels_total),
        "epochs": len(report.history),
        "seconds": sum(report.wall_clock_seconds.values()),
    }


def collect(root: str, runs: Sequence) -> tuple[list[dict], list[str]]:
    """Rows of the finished runs of ``runs`` (RunSpecs, in order) and names of the others."""
    rows, missing = [], []
    for spec in runs:
        path = os.path.join(root, spec.name, REPORT)
        if not os.path.exists(path):
            missing.append(spec.name)
            continue
        rows.append(_row(spec, RunReport.load(path)))
    return rows, missing


def _replace(path: str, write) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)  # readers never see a half-written table


def write_results(root: str, runs: Sequence) -> tuple[list[dict], list[str]]:
    rows, missing = collect(root, runs)
    options = None
    if os.path.exists(os.path.join(root, SWEEP_OPTIONS)):
        with open(os.path.join(root, SWEEP_OPTIONS)) as f:
            options = json.load(f)

    def write_json(f):
        json.dump({"options": options, "runs": rows, "missing": missing}, f, indent=2)

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    _replace(os.path.join(root, RESULTS_JSON), write_json)
    _replace(os.path.join(root, RESULTS_CSV), write_csv)
    return rows, missing


_INT_COLUMNS = {"seed", "params", "flops", "dense_params", "dense_flops", "channels_kept",
                "channels_total", "epochs"}


def read_results(path: str) -> list[dict]:
    """Rows from a ``results.json``, a ``results.csv``, or a sweep directory holding them."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results table at {path} (run `dce sweep` first)")
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)["runs"]
    if path.endswith(".csv"):
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row: dict = {}
                for key, value in raw.items():
                    if key in ("name", "selector"):
                        row[key] = value
                    elif value == "":
                        row[key] = None
                    else:
                        row[key] = int(value) if key in _INT_COLUMNS else float(value)
                rows.append(row)
        return rows
    raise ValueError(f"{path}: expected a results .json or .csv file")


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    # Sample standard deviation over seeds (0 for a single seed).
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One entry per (selector, fraction), sorted: n seeds, accuracy mean/std/min/max,
    and the mean parameter/FLOP counts and reductions."""
    if not rows:
        raise ValueError("aggregate: no finished runs in the results table")
    cells: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["selector"], float(row["fraction"])), []).append(row)
    out = []
    for (selector, fraction), group in sorted(cells.items()):
        acc = _stats([r["test_acc"] for r in group])
        entry = {"selector": selector, "fraction": fraction, "n": len(group),
                 "seeds": sorted(r["seed"] for r in group),
                 "acc_mean": acc["mean"], "acc_std": acc["std"],
                 "acc_min": acc["min"], "acc_max": acc["max"]}
        for key in ("params", "flops", "param_reduction", "flop_reduction"):
            entry[key] = _stats([float(r[key]) for r in group])["mean"]
        out.append(entry)
    return out


def _fmt_acc(cell: Optional[dict], seeds: int) -> str:
    if cell is None:
        return "-"
    text = (f"{100 * cell['acc_mean']:.2f} ± {100 * cell['acc_std']:.2f} "
            f"({100 * cell['acc_min']:.2f}–{100 * cell['acc_max']:.2f})")
    # A partial sweep: say which cells rest on fewer seeds than the others.
    return text if cell["n"] == seeds else f"{text} [n={cell['n']}]"


def markdown_table(rows: Sequence[dict]) -> str:
    """Accuracy (%) mean ± std (min–max over seeds) per fraction, CUCB vs random,
    with parameter and FLOP counts and reductions vs the dense network."""
    cells = {(a["selector"], a["fraction"]): a for a in aggregate(rows)}
    fractions = sorted({f for _, f in cells})
    seeds = max(a["n"] for a in cells.values())
    lines = ["| active channels | CUCB acc. % | random acc. % | CUCB − random (pts) "
             "| params | FLOPs / image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in fractions:
        cucb, rand, dense = cells.get(("cucb", p)), cells.get(("random", p)), cells.get(("dense", p))
        any_cell = cucb or rand or dense
        sizes = [f"{any_cell['params'] / 1e3:.1f}k", f"{any_cell['flops'] / 1e6:.2f}M"]
        if dense is not None:
            lines.append(f"| {100 * p:.0f}% (dense baseline) | {_fmt_acc(dense, seeds)} "
                         f"| (same run) | - | {sizes[0]} | {sizes[1]} |")
            continue
        sizes[0] += f" ({any_cell['param_reduction']:.2f}x fewer)"
        sizes[1] += f" ({any_cell['flop_reduction']:.2f}x fewer)"
        diff = ("-" if cucb is None or rand is None
                else f"{100 * (cucb['acc_mean'] - rand['acc_mean']):+.2f}")
        lines.append(f"| {100 * p:.0f}% | {_fmt_acc(cucb, seeds)} | {_fmt_acc(rand, seeds)} "
                     f"| {diff} | {sizes[0]} | {sizes[1]} |")
    return "\n".join(lines)
