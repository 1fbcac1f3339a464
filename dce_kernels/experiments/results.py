"""The results table of a sweep: one row per finished run, read from its report.json.

``collect`` builds the rows, ``write_results`` writes ``results.json`` (rows plus
the sweep's options and the runs still missing) and ``results.csv`` (rows only)
atomically, ``read_results`` reads either back, ``aggregate`` reduces the seeds of
each (method, fraction) cell to mean / std / min / max, and ``markdown_table``
renders that for the README: every method side by side with its size and its training
cost relative to the dense baseline.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional, Sequence

from ..atomic import write_atomic
from .files import REPORT, RESULTS_CSV, RESULTS_JSON, SWEEP_OPTIONS
from .report import RunReport

__all__ = ["COLUMNS", "collect", "write_results", "read_results", "aggregate",
           "markdown_table", "variant_rows", "variant_table"]


# One row per run; the order is the CSV's column order.
COLUMNS = ("name", "method", "fraction", "seed", "test_acc", "explore_test_acc",
           "params", "flops", "dense_params", "dense_flops", "param_reduction",
           "flop_reduction", "channels_kept", "channels_total", "widths", "epochs", "seconds",
           "train_flops")
_TEXT_COLUMNS = {"name", "method", "widths"}


def _row(name: str, method: str, fraction: float, seed: int, report: RunReport) -> dict:
    explore = [h.test_acc for h in report.history if h.phase == "explore"]
    return {
        "name": name, "method": method, "fraction": float(fraction), "seed": seed,
        # The exported compact model's accuracy (equal to the sparse model's).
        "test_acc": report.compact.test_acc,
        "explore_test_acc": explore[-1] if explore else None,
        "params": report.compact.params, "flops": report.compact.flops,
        "dense_params": report.dense.params, "dense_flops": report.dense.flops,
        "param_reduction": report.reduction.params,
        "flop_reduction": report.reduction.flops,
        "channels_kept": sum(report.selection.channels_kept),
        "channels_total": sum(report.selection.channels_total),
        "widths": "-".join(str(k) for k in report.selection.channels_kept),
        "epochs": len(report.history),
        # The training cost: wall-clock and FLOPs of every training epoch.
        "seconds": report.train_seconds,
        "train_flops": report.train_flops,
    }


def collect(root: str, runs: Sequence) -> tuple[list[dict], list[str]]:
    """Rows of the finished runs of ``runs`` (RunSpecs, in order) and names of the others."""
    rows, missing = [], []
    for spec in runs:
        path = os.path.join(root, spec.name, REPORT)
        if not os.path.exists(path):
            missing.append(spec.name)
            continue
        rows.append(_row(spec.name, spec.method, spec.fraction, spec.seed,
                         RunReport.load(path)))
    return rows, missing


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

    # Under the sweep's mutex (write_table): one writer at a time.
    write_atomic(os.path.join(root, RESULTS_JSON), write_json)
    write_atomic(os.path.join(root, RESULTS_CSV), write_csv)
    return rows, missing


_INT_COLUMNS = {"seed", "params", "flops", "dense_params", "dense_flops", "channels_kept",
                "channels_total", "epochs", "train_flops"}


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
                    if key in _TEXT_COLUMNS:
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
    """One entry per (method, fraction), sorted: n seeds, accuracy mean/std/min/max,
    and the mean sizes, reductions and training costs."""
    if not rows:
        raise ValueError("aggregate: no finished runs in the results table")
    cells: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["method"], float(row["fraction"])), []).append(row)
    out = []
    for (method, fraction), group in sorted(cells.items()):
        acc = _stats([r["test_acc"] for r in group])
        entry = {"method": method, "fraction": fraction, "n": len(group),
                 "seeds": sorted(r["seed"] for r in group),
                 "acc_mean": acc["mean"], "acc_std": acc["std"],
                 "acc_min": acc["min"], "acc_max": acc["max"]}
        for key in ("params", "flops", "param_reduction", "flop_reduction", "seconds",
                    "train_flops"):
            values = [float(r[key]) for r in group if r.get(key) is not None]
            entry[key] = _stats(values)["mean"] if values else None
        out.append(entry)
    return out


def _fmt_acc(cell: dict, seeds: int) -> str:
    text = (f"{100 * cell['acc_mean']:.2f} ± {100 * cell['acc_std']:.2f} "
            f"({100 * cell['acc_min']:.2f}–{100 * cell['acc_max']:.2f})")
    # A partial sweep: say which cells rest on fewer seeds than the others.
    return text if cell["n"] == seeds else f"{text} [n={cell['n']}]"


def _ratio(value: Optional[float], reference: Optional[float]) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _diff(cell: dict, reference: Optional[dict]) -> str:
    """Accuracy points above ``reference`` (a cell of aggregate), or "-"."""
    if reference is None or cell is reference:
        return "-"
    return f"{100 * (cell['acc_mean'] - reference['acc_mean']):+.2f}"


def _costs(cell: dict, dense: Optional[dict]) -> str:
    """The training time and FLOPs columns, relative to the dense cell."""
    return (f"{_ratio(cell['seconds'], dense and dense['seconds'])} "
            f"| {_ratio(cell['train_flops'], dense and dense['train_flops'])}")


# The order of methods in tables and figures: DCE first, then what a user would do instead.
METHOD_ORDER = ("shrink", "shrink-random", "cucb", "random", "prune", "narrow", "narrow-uniform",
                "dense")


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def markdown_table(rows: Sequence[dict]) -> str:
    """Per fraction, every method: accuracy (%) mean ± std (min–max over seeds), the
    difference to the narrow network trained from scratch (the uniform one where the
    sweep has it: what a user builds without DCE), the compact model's size, and the
    training cost (wall-clock and training FLOPs) relative to the dense baseline."""
    cells = aggregate(rows)
    seeds = max(a["n"] for a in cells)
    dense = next((a for a in cells if a["method"] == "dense"), None)
    methods = {a["method"] for a in cells}
    reference = "narrow-uniform" if "narrow-uniform" in methods else "narrow"
    lines = [f"| kept | method | accuracy % | vs {reference} (pts) | params | FLOPs / image "
             "| training time (x dense) | training FLOPs (x dense) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fraction in sorted({a["fraction"] for a in cells}):
        here = sorted((a for a in cells if a["fraction"] == fraction),
                      key=lambda a: _method_rank(a["method"]))
        narrow = next((a for a in here if a["method"] == reference), None)
        for a in here:
            size = f"{a['params'] / 1e3:.1f}k"
            flops = f"{a['flops'] / 1e6:.2f}M"
            if a["method"] != "dense":
                size += f" ({a['param_reduction']:.2f}x fewer)"
                flops += f" ({a['flop_reduction']:.2f}x fewer)"
            lines.append(
                f"| {100 * fraction:.0f}% | {a['method']} | {_fmt_acc(a, seeds)} "
                f"| {_diff(a, narrow)} | {size} | {flops} | {_costs(a, dense)} |")
    return "\n".join(lines)


# -- ablations: variants of one comparison, each in a folder of its own ---------------

def variant_rows(out: str) -> list[dict]:
    """Rows of every finished run under ``out``, labelled by the first folder below it:
    ``out/<variant>/.../<run>/report.json`` becomes a row whose ``method`` is
    ``<variant>`` (an ablation runs each variant as a sweep of its own)."""
    if not os.path.isdir(out):
        raise FileNotFoundError(f"no ablation at {out}")
    rows = []
    for variant in sorted(os.listdir(out)):
        for folder, _, files in sorted(os.walk(os.path.join(out, variant))):
            if REPORT not in files:
                continue
            report = RunReport.load(os.path.join(folder, REPORT))
            rows.append(_row(os.path.basename(folder), variant, report.config["fraction"],
                             int(report.config["seed"]), report))
    if not rows:
        raise ValueError(f"no finished runs under {out}")
    return rows


def variant_table(rows: Sequence[dict], reference: str = "narrow") -> str:
    """One line per variant, in the order of ``rows``: accuracy mean ± std (min–max)
    over seeds, the difference to ``reference``, size and training cost."""
    cells = {a["method"]: a for a in aggregate(rows)}
    order = list(dict.fromkeys(r["method"] for r in rows))
    ref = cells.get(reference)
    dense = cells.get("dense")
    seeds = max(a["n"] for a in cells.values())
    lines = [f"| variant | accuracy % | vs {reference} (pts) | params | FLOPs / image "
             "| training time (x dense) | training FLOPs (x dense) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        a = cells[name]
        lines.append(f"| {name} | {_fmt_acc(a, seeds)} | {_diff(a, ref)} "
                     f"| {a['params'] / 1e3:.1f}k | {a['flops'] / 1e6:.2f}M | {_costs(a, dense)} |")
    return "\n".join(lines)
