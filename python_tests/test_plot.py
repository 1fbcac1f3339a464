"""dce plot: the aggregation over seeds (checked against numpy), the Markdown table,
and the two PNG files, from synthetic rows and from a tiny real sweep."""
import os
import random

import numpy as np
import pytest

from dce_kernels.experiments.cli import main
from dce_kernels.experiments.plot import ACCURACY_PNG, REDUCTION_PNG, plot_results
from dce_kernels.experiments.results import aggregate, markdown_table, read_results
from toolkit import tiny_config, tiny_datasets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs on one thread


def _rows(seed=0, seeds=(0, 1, 2), fractions=(0.25, 0.5, 0.75)):
    """Rows shaped like a results table, with random accuracies."""
    rng = random.Random(seed)
    rows = []
    for s in seeds:
        rows.append(dict(name=f"dense-p1.0-s{s}", method="dense", fraction=1.0, seed=s,
                         test_acc=rng.uniform(0.85, 0.9), params=1000, flops=50000,
                         param_reduction=1.0, flop_reduction=1.0,
                         seconds=rng.uniform(90, 110), train_flops=rng.uniform(9e9, 1.1e10)))
        for p in fractions:
            for sel in METHODS:
                kept = round(1000 * p * p)
                rows.append(dict(name=f"{sel}-p{p}-s{s}", method=sel, fraction=p, seed=s,
                                 test_acc=rng.uniform(0.5, 0.9), params=kept,
                                 flops=50 * kept, param_reduction=1000 / kept,
                                 flop_reduction=50000 / (50 * kept),
                                 seconds=rng.uniform(20, 60), train_flops=rng.uniform(1e9, 5e9)))
    return rows


METHODS = ("shrink", "cucb", "narrow")


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_aggregate_matches_numpy():
    rows = _rows(seed=7)
    cells = aggregate(rows)
    keys = {(r["method"], r["fraction"]) for r in rows}
    assert [(c["method"], c["fraction"]) for c in cells] == sorted(keys)
    for cell in cells:
        mine = [r for r in rows
                if r["method"] == cell["method"] and r["fraction"] == cell["fraction"]]
        acc = np.array([r["test_acc"] for r in mine])
        assert cell["n"] == len(mine) == 3 and cell["seeds"] == [0, 1, 2]
        assert cell["acc_mean"] == pytest.approx(acc.mean())
        assert cell["acc_std"] == pytest.approx(acc.std(ddof=1))
        assert (cell["acc_min"], cell["acc_max"]) == (acc.min(), acc.max())
        assert cell["param_reduction"] == pytest.approx(
            np.mean([r["param_reduction"] for r in mine]))
        assert cell["flops"] == pytest.approx(np.mean([r["flops"] for r in mine]))


def test_aggregate_one_seed_and_no_rows():
    cells = aggregate(_rows(seeds=(4,)))
    assert all(c["n"] == 1 and c["acc_std"] == 0.0 and c["acc_min"] == c["acc_max"]
               for c in cells)
    with pytest.raises(ValueError, match="no finished runs"):
        aggregate([])


def test_markdown_table_rows():
    rows = _rows(seed=3)
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + 3 * len(METHODS) + 1  # header, rule, fractions x methods, dense

    def column(method, p, key):
        return np.array([r[key] for r in rows if r["method"] == method and r["fraction"] == p])

    dense_seconds = column("dense", 1.0, "seconds").mean()
    dense_flops = column("dense", 1.0, "train_flops").mean()
    body = iter(lines[2:])
    for p in (0.25, 0.5, 0.75):
        narrow = column("narrow", p, "test_acc")
        for method in METHODS:  # DCE first, the baselines after it
            line = next(body)
            acc = column(method, p, "test_acc")
            assert line.startswith(f"| {100 * p:.0f}% | {method} |")
            assert f"{100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}" in line
            if method != "narrow":
                assert f"| {100 * (acc.mean() - narrow.mean()):+.2f} |" in line
            assert f"({1 / (round(1000 * p * p) / 1000):.2f}x fewer)" in line
            assert f"| {column(method, p, 'seconds').mean() / dense_seconds:.2f}x |" in line
            assert f"{column(method, p, 'train_flops').mean() / dense_flops:.2f}x |" in line
    dense = column("dense", 1.0, "test_acc")
    last = next(body)
    assert last.startswith("| 100% | dense |") and "[n=" not in "".join(lines)
    assert f"{100 * dense.mean():.2f} ± {100 * dense.std(ddof=1):.2f}" in last
    assert "| 1.00x | 1.00x |" in last


def test_plots_are_written(tmp_path):
    paths = plot_results(_rows(), str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == [ACCURACY_PNG, REDUCTION_PNG]
    for path in paths:
        width, height = _png_size(path)
        assert width > 300 and height > 200
    # A selector or the baseline missing (e.g. a partial sweep) still plots.
    partial = [r for r in _rows() if r["method"] == "cucb"]
    for path in plot_results(partial, str(tmp_path / "partial")):
        _png_size(path)


def test_plot_of_a_tiny_sweep_from_the_command_line(tmp_path, capsys):
    from dce_kernels.experiments.sweep import plan_runs, run_sweep, sweep_dir

    base = tiny_config(explore_epochs=1, finetune_epochs=0)
    runs = plan_runs([0.5], ["cucb", "random"], [0, 1])
    run_sweep(base, str(tmp_path), runs, datasets=tiny_datasets())
    root = sweep_dir(str(tmp_path), base)
    rows = read_results(root)
    assert len(rows) == len(runs)
    figs, md = str(tmp_path / "figs"), str(tmp_path / "table.md")
    assert main(["plot", os.path.join(root, "results.csv"), "--out-dir", figs,
                 "--markdown", md]) == 0
    out = capsys.readouterr().out
    assert open(md).read().strip() == markdown_table(rows) and markdown_table(rows) in out
    for name in (ACCURACY_PNG, REDUCTION_PNG):
        _png_size(os.path.join(figs, name))
    # Without --out-dir the PNGs go next to the results.
    assert main(["plot", root]) == 0
    assert os.path.exists(os.path.join(root, ACCURACY_PNG))


def test_plot_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no results table" in capsys.readouterr().err


def test_markdown_table_marks_cells_with_fewer_seeds():
    rows = [r for r in _rows(seed=5) if not (r["name"] == "cucb-p0.5-s2")]
    lines = markdown_table(rows).splitlines()
    marked = [line for line in lines if "[n=" in line]
    assert len(marked) == 1 and marked[0].startswith("| 50% | cucb |")
    assert marked[0].split(" | ")[2].endswith("[n=2]")


def _report(fraction, seed, acc, seconds, flops, kept):
    from dce_kernels.experiments.report import (CompactSummary, DenseSummary, EpochRecord,
                                                Reduction, RunReport, Selection)

    r = RunReport(config={"fraction": fraction, "seed": seed}, data={})
    r.record_epoch(EpochRecord("train", 1, 0.5, 0.8, acc, seconds, 0.0, flops))
    r.selection = Selection(channels_kept=kept, channels_total=[8, 8], indices=[])
    r.dense = DenseSummary(params=1000, flops=9000, test_acc=None, seconds_per_epoch=None)
    r.compact = CompactSummary(params=10 * sum(kept), flops=90 * sum(kept), test_acc=acc,
                               sparse_test_acc=acc, sparse_flops=0, seconds_per_epoch=seconds,
                               explore_seconds_per_epoch=seconds)
    r.reduction = Reduction(params=1000 / (10 * sum(kept)), flops=9000 / (90 * sum(kept)),
                            accuracy_change=None)
    return r


def test_ablation_table_of_variant_folders(tmp_path, capsys):
    rng = random.Random(4)
    truth = {}
    for variant, kept in (("dense", [8, 8]), ("narrow", [4, 4]), ("shrink-global", [6, 2])):
        for seed in range(3):
            acc, seconds, flops = rng.uniform(0.8, 0.9), rng.uniform(10, 90), rng.uniform(1, 9)
            truth.setdefault(variant, []).append((acc, seconds, flops))
            folder = tmp_path / variant / "fashion-mnist-vgg11" / f"run-s{seed}"
            folder.mkdir(parents=True)
            _report(0.5, seed, acc, seconds, flops, kept).save(str(folder / "report.json"))
    out = tmp_path / "table.md"
    assert main(["ablation-table", str(tmp_path), "--markdown", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert open(out).read().strip() == "\n".join(lines)
    mean = lambda v, i: np.mean([t[i] for t in truth[v]])  # noqa: E731
    for line, variant in zip(lines[2:], ("dense", "narrow", "shrink-global")):
        acc = np.array([t[0] for t in truth[variant]])
        assert line.startswith(
            f"| {variant} | {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}")
        if variant != "narrow":
            assert f"| {100 * (acc.mean() - mean('narrow', 0)):+.2f} |" in line
        assert f"| {mean(variant, 1) / mean('dense', 1):.2f}x |" in line
        assert line.endswith(f"| {mean(variant, 2) / mean('dense', 2):.2f}x |")
    assert main(["ablation-table", str(tmp_path / "none")]) == 2
