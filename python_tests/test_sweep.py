"""dce sweep: the grid, skipping finished runs, resuming killed ones, locks shared by
several processes, and the results table against the per-run report.json files."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dce_kernels.experiments import sweep as sweep_module
from dce_kernels.experiments.cli import build_parser, config_from_args, main
from dce_kernels.experiments.results import read_results
from dce_kernels.experiments.sweep import (BASELINE, RunSpec, plan_runs, release, run_config, run_sweep,
                               sweep_dir, try_claim)
from dce_kernels.experiments.train import train
from toolkit import tiny_config, tiny_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DATA = tiny_datasets()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def train_calls(monkeypatch):
    """Records (run name, resume) of every train() call the sweep makes."""
    calls = []

    def spy(config, resume=False, **kw):
        calls.append((os.path.basename(config.run_dir), resume))
        return train(config, resume=resume, **kw)

    monkeypatch.setattr(sweep_module, "train", spy)
    return calls


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the grid --------------------------------------------------------------------

def test_grid_is_seed_major_with_one_baseline_per_seed():
    runs = plan_runs([0.25, 1.0, 0.5], ["random", "cucb"], [3, 0])
    expected = []
    for seed in (3, 0):
        expected.append(f"dense-p1.0-s{seed}")
        for p in (0.25, 0.5):
            expected += [f"random-p{p}-s{seed}", f"cucb-p{p}-s{seed}"]
    assert [r.name for r in runs] == expected
    # Fraction 1.0 is the baseline alone, whether or not it is listed.
    assert plan_runs([0.5], ["cucb"], [0]) == [RunSpec(BASELINE, 1.0, 0),
                                               RunSpec("cucb", 0.5, 0)]
    # Narrow runs come after the others of their seed (they may need their widths).
    assert [r.method for r in plan_runs([0.5], ["narrow", "cucb"], [0])] == [
        BASELINE, "cucb", "narrow"]
    assert [r.method for r in plan_runs([0.5], ["cucb"], [0], baseline=False)] == ["cucb"]
    default = plan_runs()
    assert len(default) == 3 * (1 + 9 * 5)
    assert len({r.name for r in default}) == len(default)


@pytest.mark.parametrize("fractions,methods,seeds,message", [
    ([], ["cucb"], [0], "fractions: the list is empty"),
    ([0.5], [], [0], "methods: the list is empty"),
    ([0.5], ["cucb"], [], "seeds: the list is empty"),
    ([0.0], ["cucb"], [0], "fraction 0.0 is outside"),
    ([1.5], ["cucb"], [0], "fraction 1.5 is outside"),
    ([-0.25], ["cucb"], [0], "outside"),
    ([float("nan")], ["cucb"], [0], "outside"),
    ([0.5], ["greedy"], [0], "unknown method 'greedy'"),
    ([0.5, 0.5], ["cucb"], [0], "fractions: duplicate"),
    ([0.5], ["cucb", "cucb"], [0], "methods: duplicate"),
    ([0.5], ["cucb"], [1, 1], "seeds: duplicate"),
    ([0.5], ["cucb"], [-1], "seed -1"),
])
def test_bad_grids_are_refused_by_name(fractions, methods, seeds, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_runs(fractions, methods, seeds)


def test_baseline_is_the_full_network_from_scratch_for_the_total_epochs(tmp_path):
    # The dense baseline is what a user does without channel selection: the whole
    # architecture trained from scratch for as many epochs as every other method.
    base = tiny_config(explore_epochs=1, finetune_epochs=1)
    spec = RunSpec(BASELINE, 1.0, 0)
    config = run_config(base, spec, str(tmp_path / "a"))
    assert (config.method, config.fraction, config.dense_epochs) == ("narrow", 1.0, 0)
    a = train(config, datasets=DATA).to_dict()
    assert [h["phase"] for h in a["history"]] == ["train", "train"]
    assert a["compact"]["params"] == a["dense"]["params"]  # all channels kept
    assert a["compact"]["flops"] == a["dense"]["flops"]


def dataclass_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


# -- running, skipping, the table ------------------------------------------------

def test_sweep_runs_everything_once_and_tables_the_reports(tmp_path, train_calls):
    base = tiny_config()
    runs = plan_runs([0.5, 1.0], ["cucb", "random"], [0, 1])
    outcome = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    root = sweep_dir(str(tmp_path), base)
    assert root == str(tmp_path / "fashion-mnist-vgg11")
    assert sorted(outcome.ran) == sorted(r.name for r in runs)
    assert [name for name, _ in train_calls] == [r.name for r in runs]
    assert not any(resume for _, resume in train_calls)
    assert not outcome.failed and not outcome.busy

    for spec in runs:
        run_dir = os.path.join(root, spec.name)
        config = json.load(open(os.path.join(run_dir, "config.json")))
        assert (config["fraction"], config["seed"], config["dense_epochs"]) == (
            spec.fraction, spec.seed, 0)
        assert config["method"] == ("narrow" if spec.method == BASELINE else spec.method)
        assert not os.path.exists(os.path.join(run_dir, "lock"))

    # The table holds exactly what the reports say.
    rows = read_results(root)
    assert [r["name"] for r in rows] == [r.name for r in runs]
    for row in rows:
        report = json.load(open(os.path.join(root, row["name"], "report.json")))
        assert row["test_acc"] == report["compact"]["test_acc"]
        assert row["params"] == report["compact"]["params"]
        assert row["flops"] == report["compact"]["flops"]
        assert row["dense_params"] == report["dense"]["params"]
        assert row["param_reduction"] == pytest.approx(
            report["dense"]["params"] / report["compact"]["params"])
        assert row["flop_reduction"] == pytest.approx(
            report["dense"]["flops"] / report["compact"]["flops"])
        assert row["channels_kept"] == sum(report["selection"]["channels_kept"])
        assert row["epochs"] == 3 and row["seconds"] > 0
        if row["method"] == BASELINE:
            assert row["fraction"] == 1.0 and row["param_reduction"] == 1.0
        else:
            assert row["param_reduction"] > 1.5
    with open(os.path.join(root, "results.csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["name"] for r in csv_rows] == [r["name"] for r in rows]
    assert read_results(os.path.join(root, "results.csv")) == rows
    table = json.load(open(os.path.join(root, "results.json")))
    assert table["missing"] == [] and table["options"]["explore_epochs"] == 2

    # Everything is finished: a second sweep trains nothing.
    train_calls.clear()
    again = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    assert train_calls == [] and sorted(again.skipped) == sorted(r.name for r in runs)


def test_max_runs_then_continue(tmp_path, train_calls):
    base = tiny_config(explore_epochs=1, finetune_epochs=0)
    runs = plan_runs([0.5], ["cucb", "random"], [0])
    first = run_sweep(base, str(tmp_path), runs, datasets=DATA, max_runs=1)
    assert first.ran == [runs[0].name] and first.stopped == [r.name for r in runs[1:]]
    table = json.load(open(os.path.join(sweep_dir(str(tmp_path), base), "results.json")))
    assert [r["name"] for r in table["runs"]] == [runs[0].name]
    assert table["missing"] == [r.name for r in runs[1:]]
    second = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    assert second.skipped == [runs[0].name] and second.ran == [r.name for r in runs[1:]]
    assert [name for name, _ in train_calls] == [r.name for r in runs]


def test_killed_run_is_resumed_and_its_stale_lock_reclaimed(tmp_path, train_calls):
    base = tiny_config()
    runs = plan_runs([0.5], ["cucb"], [0])
    root = sweep_dir(str(tmp_path), base)
    victim = run_config(base, runs[1], root)
    # A process ran one epoch of the run, checkpointed, and died holding the lock.
    assert train(victim, datasets=DATA, stop_after_epochs=1) is None
    partial = torch.load(os.path.join(victim.run_dir, "checkpoint.pt"), weights_only=False)
    with open(os.path.join(victim.run_dir, "lock"), "w") as f:
        f.write(f"{_dead_pid()}@{sweep_module.socket.gethostname()}")

    outcome = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    assert outcome.resumed == [runs[1].name]
    assert (runs[1].name, True) in train_calls and (runs[0].name, False) in train_calls
    report = json.load(open(os.path.join(victim.run_dir, "report.json")))
    # The first epoch is the killed process's (resumed, not redone) ...
    assert report["history"][0] == partial["report"]["history"][0]
    # ... and the result equals an uninterrupted run's.
    reference = train(dataclass_replace(victim, run_dir=str(tmp_path / "ref")),
                      datasets=DATA).to_dict()
    strip = lambda h: [{k: v for k, v in r.items() if k != "train_seconds"} for r in h]
    assert strip(report["history"]) == strip(reference["history"])
    assert report["compact"]["test_acc"] == reference["compact"]["test_acc"]
    assert not os.path.exists(os.path.join(victim.run_dir, "lock"))


def test_live_locks_are_left_alone(tmp_path, train_calls):
    base = tiny_config(explore_epochs=1, finetune_epochs=0)
    runs = plan_runs([0.5], ["cucb"], [0])
    root = sweep_dir(str(tmp_path), base)
    held = {runs[0].name: f"{os.getppid()}@{sweep_module.socket.gethostname()}",  # alive
            runs[1].name: "1@some-other-host"}  # cannot be checked from here
    for name, owner in held.items():
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "lock"), "w") as f:
            f.write(owner)
    outcome = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    assert sorted(outcome.busy) == sorted(held) and train_calls == []
    for name, owner in held.items():
        assert open(os.path.join(root, name, "lock")).read() == owner
    assert json.load(open(os.path.join(root, "results.json")))["missing"] == [r.name for r in runs]


def test_claim_and_release(tmp_path):
    run_dir = str(tmp_path / "run")
    assert try_claim(run_dir)
    assert not try_claim(run_dir)  # held by a live process (this one)
    lock = os.path.join(run_dir, "lock")
    assert open(lock).read().startswith(f"{os.getpid()}@")
    release(run_dir)
    assert not os.path.exists(lock)
    with open(lock, "w") as f:  # a writer that died between create and write
        f.write("")
    assert try_claim(run_dir)
    with open(lock, "w") as f:
        f.write(f"{os.getppid()}@{sweep_module.socket.gethostname()}")
    release(run_dir)  # not ours: stays
    assert os.path.exists(lock)


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    base = tiny_config(explore_epochs=1, finetune_epochs=0)
    runs = plan_runs([0.5], ["cucb", "random"], [0])

    def flaky(config, resume=False, **kw):
        if config.method == "random":
            raise FloatingPointError("loss is nan")
        return train(config, resume=resume, **kw)

    monkeypatch.setattr(sweep_module, "train", flaky)
    outcome = run_sweep(base, str(tmp_path), runs, datasets=DATA)
    bad = "random-p0.5-s0"
    assert outcome.failed == {bad: "FloatingPointError: loss is nan"}
    assert sorted(outcome.ran) == sorted(r.name for r in runs if r.name != bad)
    root = sweep_dir(str(tmp_path), base)
    assert "loss is nan" in open(os.path.join(root, bad, "error.txt")).read()
    assert not os.path.exists(os.path.join(root, bad, "lock"))
    assert json.load(open(os.path.join(root, "results.json")))["missing"] == [bad]


def test_a_directory_holds_one_sweep(tmp_path):
    runs = plan_runs([0.5], ["cucb"], [0])
    run_sweep(tiny_config(), str(tmp_path), runs, datasets=DATA, max_runs=0)
    with pytest.raises(ValueError, match="explore_epochs"):
        run_sweep(tiny_config(explore_epochs=3), str(tmp_path), runs, datasets=DATA, max_runs=0)
    with pytest.raises(ValueError, match="max_runs"):
        run_sweep(tiny_config(), str(tmp_path), runs, datasets=DATA, max_runs=-1)


_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from toolkit import tiny_config, tiny_datasets
    from dce_kernels.experiments.sweep import plan_runs, run_sweep
    runs = plan_runs([0.25, 0.5], ["cucb", "random"], [0, 1])
    outcome = run_sweep(tiny_config(explore_epochs=1, finetune_epochs=0), {out!r}, runs,
                        datasets=tiny_datasets())
    print(json.dumps({{"ran": outcome.ran, "skipped": outcome.skipped, "busy": outcome.busy,
                      "failed": outcome.failed}}))
""")


def test_two_processes_share_a_directory_without_duplicating_work(tmp_path):
    out = str(tmp_path / "shared")
    script = _WORKER.format(tests=os.path.join(REPO, "python_tests"), out=out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)  # a hang guard, not a speed test
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    all_runs = [r.name for r in plan_runs([0.25, 0.5], ["cucb", "random"], [0, 1])]
    ran = results[0]["ran"] + results[1]["ran"]
    assert sorted(ran) == sorted(all_runs)  # every run exactly once
    assert not results[0]["failed"] and not results[1]["failed"]
    for mine, other in (results, results[::-1]):
        # What one process did not run, it found finished or held by the other.
        assert set(mine["skipped"]) | set(mine["busy"]) == set(all_runs) - set(mine["ran"])
        assert set(mine["busy"]) <= set(other["ran"])
    root = os.path.join(out, "fashion-mnist-vgg11")
    table = json.load(open(os.path.join(root, "results.json")))
    assert sorted(r["name"] for r in table["runs"]) == sorted(all_runs)  # the last writer's
    assert table["missing"] == []
    assert not [n for n in all_runs if os.path.exists(os.path.join(root, n, "lock"))]


# -- the command line ------------------------------------------------------------

def test_sweep_options_map_onto_train_config():
    parser = build_parser()
    args = parser.parse_args(["sweep", "--fractions", "0.1,0.5,1", "--selectors", "random",
                              "--seeds", "4,5", "--width", "0.25", "--explore-epochs", "3",
                              "--lr", "0.1", "--train-limit", "100", "--no-progress"])
    assert (args.fractions, args.methods, args.seeds) == ([0.1, 0.5, 1.0], ["random"], [4, 5])
    config = config_from_args(args)
    assert (config.width, config.explore_epochs, config.lr, config.train_limit) == (
        0.25, 3, 0.1, 100)
    assert config.progress is False
    # Every option the sweep shares with train has the same name, default and help.
    sub = parser._subparsers._group_actions[0].choices
    train_opts = {a.dest: a for a in sub["train"]._actions}
    sweep_opts = {a.dest: a for a in sub["sweep"]._actions}
    shared = set(train_opts) & set(sweep_opts) - {"help"}
    assert {"model", "width", "dataset", "tau", "explore_epochs", "lr", "threads"} <= shared
    for dest in shared:
        assert train_opts[dest].default == sweep_opts[dest].default, dest
        assert train_opts[dest].help == sweep_opts[dest].help, dest
    # What the sweep sets per run is not an option of the sweep.
    assert not {"fraction", "method", "seed", "run_dir", "resume", "dense_epochs",
                "widths_from"} & set(
        sweep_opts)
    for name in ("sweep", "plot"):
        for action in sub[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("argv,message", [
    (["--fractions", "0.5,1.5"], "fraction 1.5 is outside (0, 1]"),
    (["--fractions", ""], "fractions: the list is empty"),
    (["--methods", "cucb,greedy"], "unknown method 'greedy'"),
])
def test_cli_sweep_rejects_bad_grids(tmp_path, capsys, argv, message):
    assert main(["sweep", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_cli_sweep_collect_only(tmp_path, capsys):
    base = tiny_config(explore_epochs=1, finetune_epochs=0, dataset="fashion-mnist")
    runs = plan_runs([0.5], ["cucb"], [0])
    run_sweep(base, str(tmp_path), runs, datasets=DATA, max_runs=1)
    root = sweep_dir(str(tmp_path), base)
    os.remove(os.path.join(root, "results.json"))
    code = main(["sweep", "--collect-only", "--out", str(tmp_path), "--fractions", "0.5",
                 "--selectors", "cucb", "--seeds", "0", "--width", "0.125", "--explore-epochs",
                 "1", "--finetune-epochs", "0", "--batch-size", "16", "--tau", "2"])
    assert code == 0
    assert "1 finished, 1 missing" in capsys.readouterr().out
    table = json.load(open(os.path.join(root, "results.json")))
    assert [r["name"] for r in table["runs"]] == [runs[0].name]


def test_cli_collect_only_without_a_sweep(tmp_path, capsys):
    assert main(["sweep", "--collect-only", "--out", str(tmp_path / "none")]) == 2
    assert "no sweep at" in capsys.readouterr().err
