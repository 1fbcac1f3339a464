"""A tiny end-to-end run of all phases, resume equivalence, and the command line."""
import json

import pytest
import torch

from dce_kernels.experiments.cli import build_parser, main
from dce_kernels.experiments.train import TrainConfig, train
from toolkit import synthetic_dataset


def _config(run_dir, **kw):
    # The poster's algorithm (the defaults are the ablation's winner, tested elsewhere).
    base = dict(model="vgg11", width=0.125, dense_epochs=1, explore_epochs=2, finetune_epochs=1,
                batch_size=16, tau=4, fraction=0.5, run_dir=str(run_dir), progress=False,
                method="cucb", budget="layer", reward="max", lr_schedule="restart", lr=0.05,
                finetune_lr=0.01)
    base.update(kw)
    return TrainConfig(**base)


def test_three_phases_export_and_resume_equivalence(tmp_path):
    data = (synthetic_dataset(64, 1), synthetic_dataset(32, 2))
    full = train(_config(tmp_path / "full"), datasets=data).to_dict()

    assert [h["phase"] for h in full["history"]] == ["dense", "explore", "explore", "finetune"]
    kept = full["selection"]["channels_kept"]
    assert kept == [max(1, round(0.5 * c)) for c in full["selection"]["channels_total"]]
    assert full["compact"]["params"] < full["dense"]["params"]
    assert full["compact"]["flops"] < full["dense"]["flops"]
    assert full["compact"]["test_acc"] == full["compact"]["sparse_test_acc"]
    assert full["export"]["accuracy_matches_sparse"]
    on_disk = json.loads((tmp_path / "full" / "report.json").read_text())
    assert on_disk["compact"]["test_acc"] == full["compact"]["test_acc"]
    assert set(on_disk["wall_clock_seconds"]) == {"dense", "explore", "finetune"}
    program = torch.export.load(full["export"]["program"]).module()
    assert program(data[1].tensors[0][:5]).shape == (5, 3)

    # Interrupted after the dense epoch and the first exploration epoch, then resumed.
    cfg = _config(tmp_path / "split")
    assert train(cfg, datasets=data, stop_after_epochs=2) is None
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, datasets=data)
    resumed = train(cfg, datasets=data, resume=True).to_dict()
    strip = lambda h: [{k: v for k, v in r.items() if k != "train_seconds"} for r in h]
    assert strip(resumed["history"]) == strip(full["history"])
    assert resumed["selection"]["indices"] == full["selection"]["indices"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert resumed["compact"]["test_acc"] == full["compact"]["test_acc"]


def test_random_selector_resnet_global_budget_without_dense(tmp_path):
    data = (synthetic_dataset(32, 3), synthetic_dataset(16, 4))
    report = train(_config(tmp_path, model="resnet20", width=0.25, method="random",
                           budget="global", dense_epochs=0, explore_epochs=1,
                           finetune_epochs=1, optimizer="adam", lr=0.01, finetune_lr=0.005),
                   datasets=data).to_dict()
    assert report["dense"]["test_acc"] is None and "dense" not in report["phases"]
    sel = report["selection"]
    total = sum(sel["channels_total"])
    assert sum(sel["channels_kept"]) == round(0.5 * total) and min(sel["channels_kept"]) >= 1
    assert report["export"]["accuracy_matches_sparse"]


def test_resume_with_other_options_is_refused(tmp_path):
    data = (synthetic_dataset(32, 5), synthetic_dataset(16, 6))
    train(_config(tmp_path, dense_epochs=0, explore_epochs=2), datasets=data,
          stop_after_epochs=1)
    with pytest.raises(ValueError, match="fraction"):
        train(_config(tmp_path, dense_epochs=0, explore_epochs=2, fraction=0.25), datasets=data,
              resume=True)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="fraction"):
        TrainConfig(fraction=1.5).validate()
    with pytest.raises(ValueError, match="unknown method 'greedy'"):
        TrainConfig(method="greedy").validate()
    with pytest.raises(ValueError, match="explore_epochs"):
        TrainConfig(explore_epochs=0).validate()


def test_cli_help_explains_every_option(capsys):
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--fraction", "--method", "--budget", "--tau", "--resume", "--run-dir",
                   "--explore-epochs", "--finetune-epochs", "--dense-epochs", "--data-dir"):
        assert option in out


def test_cli_reports_missing_checkpoint(tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "none"), "--resume", "--no-progress",
                 "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "error" in capsys.readouterr().err


# -- numbers that are not finite ---------------------------------------------------------

def _poisoned(dataset, value=float("nan")):
    """A copy of ``dataset`` with ``value`` in one pixel of one random sample."""
    x, y = (t.clone() for t in dataset.tensors)
    x[torch.randint(len(x), ()), 0, 0, 0] = value
    return torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_stops_the_run_by_phase_epoch_and_step_and_keeps_the_checkpoint(
        tmp_path, one_thread, value):
    from dce_kernels.experiments.train import NonFiniteError
    from toolkit import tiny_config, tiny_datasets

    train_ds, test_ds = tiny_datasets()
    config = tiny_config(run_dir=str(tmp_path))
    assert train(config, datasets=(train_ds, test_ds), stop_after_epochs=1) is None
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(NonFiniteError) as err:
        train(config, datasets=(_poisoned(train_ds, value), test_ds), resume=True)
    message = str(err.value)
    assert "the loss is nan" in message
    steps = len(train_ds) // config.batch_size
    assert f"phase explore, epoch 2/{config.explore_epochs}, step " in message
    step = int(message.split(", step ")[1].split("/")[0])
    assert 1 <= step <= steps and f"step {step}/{steps} " in message
    assert "--lr" in message and str(ckpt) in message and "intact" in message
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "report.json").exists()
    # The checkpoint is good: the clean data continues it to the end.
    assert train(config, datasets=(train_ds, test_ds), resume=True) is not None


def test_a_diverging_learning_rate_stops_the_run_and_says_what_to_try(tmp_path, one_thread):
    from dce_kernels.experiments.train import NonFiniteError
    from toolkit import tiny_config, tiny_datasets

    config = tiny_config(run_dir=str(tmp_path), lr=1e30, explore_epochs=3)
    with pytest.raises(NonFiniteError, match=r"in phase explore, epoch \d/3, step \d+/3 "
                       r"\(learning rate .*try a lower --lr \(now 1e\+30\)") as err:
        train(config, datasets=tiny_datasets())
    if "epoch 1/" in str(err.value):
        assert "no epoch had finished" in str(err.value)
        assert not (tmp_path / "checkpoint.pt").exists()


def test_a_non_finite_saliency_stops_the_run_and_names_its_step(tmp_path, one_thread,
                                                                         monkeypatch):
    from dce_kernels.channels import ChannelPlan
    from dce_kernels.experiments.train import NonFiniteError
    from toolkit import tiny_config, tiny_datasets

    real = ChannelPlan.saliency
    group = int(torch.randint(0, 3, ()))

    def spoilt(plan):
        values = [s.clone() for s in real(plan)]
        values[group][-1] = float("nan")
        return values

    monkeypatch.setattr(ChannelPlan, "saliency", spoilt)
    with pytest.raises(NonFiniteError, match=rf"saliency of channel group {group} is not "
                       r"finite \(1 of \d+ channels\) in phase explore, epoch 1/2, step 1/3"):
        train(tiny_config(run_dir=str(tmp_path)), datasets=tiny_datasets())


# -- progress output ------------------------------------------------------------------

@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_progress_is_one_line_per_epoch_unless_a_terminal_watches(tmp_path, capsys, one_thread,
                                                                  monkeypatch, terminal):
    from dce_kernels.experiments import train as train_module
    from toolkit import tiny_config, tiny_datasets

    monkeypatch.setattr(train_module, "_interactive", lambda: terminal)
    config = tiny_config(run_dir=str(tmp_path), progress=True)
    report = train(config, datasets=tiny_datasets())
    out, err = capsys.readouterr()
    lines = out.splitlines()
    epochs = [(h.phase, h.epoch) for h in report.history]
    assert len(lines) == len(epochs)
    for line, (phase, epoch), record in zip(lines, epochs, report.history):
        assert line.startswith(f"{phase} {epoch}/{config.epochs(phase)}: loss ")
        assert f"test acc {record.test_acc:.4f}" in line
    # The bar's in-place redraws only on a terminal.
    assert ("\r" in err) == terminal
    assert "\r" not in out


def test_no_progress_prints_nothing(tmp_path, capsys, one_thread):
    from toolkit import tiny_config, tiny_datasets

    train(tiny_config(run_dir=str(tmp_path), progress=False), datasets=tiny_datasets())
    assert capsys.readouterr() == ("", "")
