"""The methods of dce_kernels.experiments.train beyond the poster's: shrink, prune and
narrow; the learning-rate schedules, the levers (scale_init, rewind), BatchNorm
recalibration, training-cost accounting and resume of every method."""
import dataclasses
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dce_kernels import compact_model, count_flops, plan_for
from dce_kernels.experiments.train import (TrainConfig, full_model, narrow_model,
                                           recalibrate_batchnorm, scale_for_active_width, train)
from toolkit import synthetic_dataset

INFO = {"in_channels": 1, "num_classes": 3, "image_size": 10}
DATA = (synthetic_dataset(64, 11), synthetic_dataset(32, 12))
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(run_dir, **kw):
    base = dict(model="vgg11", width=0.25, dense_epochs=0, explore_epochs=2, finetune_epochs=1,
                batch_size=16, tau=2, fraction=0.5, lr=0.05, budget="layer",
                run_dir=str(run_dir), progress=False)
    base.update(kw)
    return TrainConfig(**base)


# -- narrow ---------------------------------------------------------------------------

@pytest.mark.parametrize("model,fraction", [("vgg11", 0.5), ("vgg11", 0.3), ("resnet20", 0.25)])
def test_narrow_architecture_equals_the_compact_model_of_the_budget(model, fraction):
    config = _config("unused", model=model, fraction=fraction)
    narrow, counts, totals = narrow_model(config, INFO)
    # The compact model a DCE run exports for the same budget, from any selection.
    full = full_model(config, INFO)
    plan = plan_for(full)
    assert totals == plan.num_channels
    assert counts == [max(1, round(fraction * c)) for c in plan.num_channels]
    g = torch.Generator().manual_seed(3)
    plan.apply([torch.sort(torch.randperm(c, generator=g)[:k]).values
                for c, k in zip(plan.num_channels, counts)])
    exported = compact_model(full, plan)
    assert {k: v.shape for k, v in narrow.state_dict().items()} == {
        k: v.shape for k, v in exported.state_dict().items()}
    x = torch.randn(2, 1, 10, 10)
    assert narrow.eval()(x).shape == exported.eval()(x).shape == (2, 3)


def test_narrow_weights_are_a_fresh_initialization_of_the_small_model():
    config = _config("unused", width=1.0, fraction=0.25)
    narrow, _, _ = narrow_model(config, INFO)
    full = full_model(config, INFO)
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    big = [m for m in full.modules() if isinstance(m, nn.Conv2d)]
    for small, wide in zip(convs[2:], big[2:]):  # layers with enough weights to measure
        fan_out = small.out_channels * small.kernel_size[0] * small.kernel_size[1]
        # He (fan-out) for the narrow layer: 2x the std of the 4x wider layer's weights.
        assert small.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert not torch.equal(small.weight, wide.weight[:small.out_channels,
                                                         :small.in_channels])


def test_narrow_run_trains_the_small_model_for_all_epochs_and_counts_its_flops(tmp_path):
    report = train(_config(tmp_path, method="narrow"), datasets=DATA)
    assert [h.phase for h in report.history] == ["train"] * 3
    assert report.compact.params < report.dense.params
    assert report.compact.test_acc == report.compact.sparse_test_acc
    narrow, _, _ = narrow_model(_config(tmp_path, method="narrow"), INFO)
    # Every step has the same shapes: the epoch's FLOPs are steps x one step's
    # forward + backward (counted here independently of the trainer's sampling).
    per_step = count_flops(narrow, DATA[0].tensors[0][:16], backward=True)
    steps = len(DATA[0]) // 16
    assert [h.train_flops for h in report.history] == [steps * per_step] * 3
    assert report.train_flops == 3 * steps * per_step
    assert report.train_seconds == pytest.approx(sum(h.train_seconds for h in report.history))


def test_narrow_under_a_global_budget_takes_the_widths_of_a_finished_run(tmp_path):
    source = train(_config(tmp_path / "dce", method="shrink", budget="global"), datasets=DATA)
    kept = source.selection.channels_kept
    narrow = train(_config(tmp_path / "narrow", method="narrow", budget="global",
                           widths_from=str(tmp_path / "dce")), datasets=DATA)
    assert narrow.selection.channels_kept == kept
    assert narrow.compact.params == source.compact.params
    assert narrow.compact.flops == source.compact.flops


@pytest.mark.parametrize("kw,message", [
    (dict(method="narrow", budget="global"), "needs the channel counts"),
    (dict(method="shrink", widths_from="x"), "means nothing to method 'shrink'"),
    (dict(lr_schedule="linear"), "unknown lr schedule 'linear'"),
    (dict(reward="mean"), "unknown reward 'mean'"),
    (dict(discount=1.5), "discount must lie in"),
])
def test_bad_method_options_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        _config("unused", **kw).validate()


def test_widths_from_a_missing_or_mismatched_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        train(_config(tmp_path / "a", method="narrow", budget="global",
                      widths_from=str(tmp_path / "nothing")), datasets=DATA)
    train(_config(tmp_path / "vgg", method="shrink", budget="global"), datasets=DATA)
    with pytest.raises(ValueError, match="does not fit"):
        train(_config(tmp_path / "b", model="resnet20", method="narrow", budget="global",
                      widths_from=str(tmp_path / "vgg")), datasets=DATA)


# -- prune, shrink, the levers ----------------------------------------------------------

def test_prune_trains_dense_and_costs_more_than_dce(tmp_path):
    prune = train(_config(tmp_path / "p", method="prune"), datasets=DATA)
    shrink = train(_config(tmp_path / "s", method="shrink"), datasets=DATA)
    narrow = train(_config(tmp_path / "n", method="narrow"), datasets=DATA)
    dense_step = count_flops(full_model(_config(tmp_path), INFO), DATA[0].tensors[0][:16],
                             backward=True)
    steps = len(DATA[0]) // 16
    explore = [h.train_flops for h in prune.history if h.phase == "explore"]
    assert explore == [steps * dense_step] * 2
    assert prune.compact.params == shrink.compact.params == narrow.compact.params
    assert prune.train_flops > shrink.train_flops > narrow.train_flops


def test_continuous_schedule_runs_one_cosine_over_explore_and_finetune(tmp_path):
    report = train(_config(tmp_path, method="shrink", lr_schedule="continuous", lr=0.08),
                   datasets=DATA)
    steps = len(DATA[0]) // 16
    total = 3 * steps
    expected = [0.08 * 0.5 * (1 + math.cos(math.pi * (steps * (e + 1) - 1) / total))
                for e in range(3)]
    assert [h.lr_end for h in report.history] == pytest.approx(expected)
    restart = train(_config(tmp_path / "r", method="shrink", lr=0.08, finetune_lr=0.02,
                            lr_schedule="restart"), datasets=DATA)
    assert [h.lr_end for h in restart.history] == pytest.approx([
        0.08 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / (2 * steps))),
        0.08 * 0.5 * (1 + math.cos(math.pi * (2 * steps - 1) / (2 * steps))),
        0.02 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps))])


def test_scale_for_active_width_is_he_init_of_the_active_part():
    model = full_model(_config("unused"), INFO)
    before = [m.weight.clone() for m in model.modules() if isinstance(m, nn.Conv2d)]
    scale_for_active_width(model, 0.25)
    after = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    for b, a in zip(before, after):
        assert torch.allclose(a, 2.0 * b)


def test_rewind_restarts_the_kept_channels_from_their_initial_weights(tmp_path):
    config = _config(tmp_path, method="shrink", rewind=True, finetune_epochs=1)
    report = train(config, datasets=DATA, stop_after_epochs=2)
    assert report is None
    state = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=False)
    initial = full_model(config, INFO).state_dict()
    trained = state["model"]
    name = next(k for k in initial if k.endswith("weight") and initial[k].dim() == 4)
    assert not torch.equal(trained[name], initial[name])  # exploration trained it
    # The first fine-tuning step starts from the initial weights: run zero steps of it by
    # entering the phase through a resume and reading the model before any epoch.
    from dce_kernels.experiments.train import _Run

    run = _Run(config, DATA[0], DATA[1], INFO)
    run.load_state_dict(state)
    run.advance()  # the phase change into fine-tuning, no training step
    assert run.phase == "finetune"
    assert torch.equal(run.model.state_dict()[name], initial[name])


def test_recalibrated_batchnorm_holds_the_average_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    data = TensorDataset(torch.randn(40, 1, 6, 6) * 3 + 1, torch.zeros(40, dtype=torch.long))
    loader = DataLoader(data, batch_size=8)
    model[1].running_mean.fill_(100.0)  # stale statistics of another network
    recalibrate_batchnorm(model, loader, batches=3)
    with torch.no_grad():
        outs = [model[0](x) for x, _ in list(loader)[:3]]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    vars_ = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(model[1].running_mean, means, atol=1e-5)
    assert torch.allclose(model[1].running_var, vars_, atol=1e-4)
    assert model[1].momentum == 0.1  # restored


@pytest.mark.parametrize("method,stop,budget", [("shrink", 1, "layer"), ("prune", 2, "layer"),
                                                ("narrow", 1, "layer"), ("cucb", 2, "layer"),
                                                ("shrink", 1, "flops")])
def test_every_method_resumes_exactly(tmp_path, method, stop, budget):
    kw = dict(method=method, lr_schedule="continuous", anneal=method == "cucb", budget=budget)
    full = train(_config(tmp_path / "full", **kw), datasets=DATA)
    cfg = _config(tmp_path / "split", **kw)
    assert train(cfg, datasets=DATA, stop_after_epochs=stop) is None
    resumed = train(cfg, datasets=DATA, resume=True)
    strip = lambda h: [dataclasses.replace(r, train_seconds=0.0) for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.selection == full.selection
    assert resumed.compact.test_acc == full.compact.test_acc


def test_a_checkpoint_made_before_an_option_existed_resumes(tmp_path):
    cfg = _config(tmp_path, method="cucb")
    assert train(cfg, datasets=DATA, stop_after_epochs=1) is None
    path = os.path.join(tmp_path, "checkpoint.pt")
    state = torch.load(path, weights_only=False)
    for option in ("reward", "discount", "anneal", "scale_init", "rewind", "lr_schedule"):
        del state["config"][option]  # at their defaults: as if saved by an older version
    torch.save(state, path)
    assert train(cfg, datasets=DATA, resume=True) is not None
    state["config"]["tau"] = 7
    torch.save(state, path)
    with pytest.raises(ValueError, match="tau"):
        train(cfg, datasets=DATA, resume=True)


def test_a_flops_budget_costs_what_the_uniform_network_costs_per_image(tmp_path):
    dce = train(_config(tmp_path / "dce", method="shrink", budget="flops", fraction=0.3),
                datasets=DATA)
    uniform = train(_config(tmp_path / "uniform", method="narrow-uniform", fraction=0.3),
                    datasets=DATA)
    assert dce.compact.flops <= uniform.compact.flops
    # Not by keeping the uniform widths: the FLOPs go where the saliency per FLOP is.
    assert dce.selection.channels_kept != uniform.selection.channels_kept
    with pytest.raises(ValueError, match="under a flops budget needs the channel counts"):
        _config(tmp_path / "n", method="narrow", budget="flops").validate()
    narrow = train(_config(tmp_path / "narrow", method="narrow", budget="flops", fraction=0.3,
                           widths_from=str(tmp_path / "dce")), datasets=DATA)
    assert narrow.compact.flops == dce.compact.flops


def test_narrow_uniform_ignores_a_global_budget(tmp_path):
    report = train(_config(tmp_path, method="narrow-uniform", budget="global"), datasets=DATA)
    totals = report.selection.channels_total
    assert report.selection.channels_kept == [max(1, round(0.5 * c)) for c in totals]


def test_sweep_narrow_of_a_global_budget_takes_the_dce_runs_widths(tmp_path):
    from dce_kernels.experiments.sweep import plan_runs, run_sweep, sweep_dir

    base = _config(tmp_path, budget="global", explore_epochs=1, finetune_epochs=1)
    runs = plan_runs([0.5], ["narrow", "narrow-uniform", "shrink"], [0], baseline=False)
    assert [r.method for r in runs] == ["shrink", "narrow", "narrow-uniform"]
    outcome = run_sweep(base, str(tmp_path / "out"), runs, datasets=DATA)
    assert not outcome.failed
    root = sweep_dir(str(tmp_path / "out"), base)
    load = lambda name: train_report(os.path.join(root, name))  # noqa: E731
    shrink, narrow, uniform = (load(r.name) for r in runs)
    assert narrow.selection.channels_kept == shrink.selection.channels_kept
    assert uniform.selection.channels_kept == [
        max(1, round(0.5 * c)) for c in uniform.selection.channels_total]
    assert narrow.config["widths_from"] == os.path.join(root, runs[0].name)
    # Without the DCE run in the grid, the narrow run fails with a reason, not silently.
    alone = run_sweep(base, str(tmp_path / "alone"), plan_runs([0.5], ["narrow"], [0],
                                                             baseline=False), datasets=DATA)
    assert "needs the channel counts of shrink-p0.5-s0" in alone.failed["narrow-p0.5-s0"]


def train_report(run_dir):
    from dce_kernels.experiments.report import RunReport

    return RunReport.load(os.path.join(run_dir, "report.json"))


def test_cli_compare_trains_the_baselines_alongside_and_prints_them(tmp_path, monkeypatch,
                                                                    capsys):
    from dce_kernels.experiments import train as train_module
    from dce_kernels.experiments.cli import main

    monkeypatch.setattr(train_module, "load_data",
                        lambda config: (DATA[0], DATA[1], {**INFO, "name": "synthetic"}))
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--no-progress", "--width", "0.25",
                 "--batch-size", "16", "--explore-epochs", "1", "--finetune-epochs", "1",
                 "--compare", "narrow-uniform,narrow"])
    assert code == 0
    out = capsys.readouterr().out
    reports = {m: train_report(str(d)) for m, d in [
        ("shrink", run_dir), ("narrow-uniform", run_dir / "narrow-uniform"),
        ("narrow", run_dir / "narrow")]}
    table = out[out.rindex("method"):].splitlines()
    assert [line.split()[0] for line in table[2:]] == list(reports)
    for line, report in zip(table[2:], reports.values()):
        assert f"{100 * report.compact.test_acc:.2f}%" in line
        assert "-".join(str(k) for k in report.selection.channels_kept) in line
    # The narrow network at DCE's widths (global budget by default) has its architecture.
    assert reports["narrow"].compact.params == reports["shrink"].compact.params
    assert main(["train", "--run-dir", str(tmp_path / "x"), "--compare", "tiny"]) == 2
    assert "unknown --compare method 'tiny'" in capsys.readouterr().err
