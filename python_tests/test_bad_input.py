"""Bad input, across the package: each kind gets an exception (or a CLI error, exit 2)
that names the problem, never a crash, a hang or a silently wrong result.

The table lists every kind the suite tries and where; the tests of this module are the
kinds no other module had (marked *). 63 kinds in all, plus the bad data files of
test_data.py (corrupt, wrong-format, truncated, mismatched counts, labels out of range:
21 more).

| # | where | bad input | what it raises | test |
|---|-------|-----------|----------------|------|
| 1 | op | index list of float or bool dtype | int64 or int32 | test_op_registration |
| 2 | op | index list of int16 | int64 or int32, got Short | * |
| 3 | op | index list not 1-D | must be a 1-D tensor | test_op_registration |
| 4 | op | a channel listed twice | contains channel c more than once | test_op_registration |
| 5 | op | index >= channels | out of range | test_op_registration |
| 6 | op | negative index | out of range | test_op_registration |
| 7 | op | empty index list | is empty | test_op_registration |
| 8 | op | more indices than channels | has n entries | test_op_registration |
| 9 | op | index list on another device | must be on the input's device | test_op_registration |
| 10 | op | input channels differ from the weight's | input has n channels but weight expects m | test_op_registration |
| 11 | op | weight dtype differs from the input's | weight dtype | test_op_registration |
| 12 | op | input not 4-D (or 3-D) | input must be 4-D | test_op_registration |
| 13 | op | bias of the wrong shape | bias must have shape | test_op_registration |
| 14 | op | input smaller than the dilated kernel | smaller than the dilated kernel | test_op_registration |
| 15 | op | integer input | floating point | test_op_registration |
| 16 | op | stride < 1 | stride must be >= 1 | test_op_registration |
| 17 | op | padding < 0 | padding must be >= 0 | test_op_registration |
| 18 | op | dilation < 1 | dilation must be >= 1 | * |
| 19 | op | groups < 1 | groups must be positive | * |
| 20 | op | out_channels not divisible by groups | not divisible by groups | * |
| 21 | op | padding='same' with a stride | not supported for strided | test_op_registration |
| 22 | op | unknown padding string | padding must be an int, a pair, 'same' or 'valid' | test_op_registration |
| 23 | op | saliency probe of the wrong shape | saliency_probe must have shape | test_op_registration |
| 24 | op | packed layout, unsorted in_idx / out_idx | ascending | test_op_packed |
| 25 | op | packed input width differs from len(in_idx) | packed input has n channels but in_idx lists m | test_op_packed |
| 26 | op | packed layout of a grouped conv whose lists are not balanced per conv group | or a grouped conv whose in_idx and out_idx both hold equally many | test_op_packed |
| 26b | op | packed input of a depthwise conv whose in_idx differs from out_idx | in_idx equal to out_idx | test_op_packed |
| 27 | backward op | grad_output of the wrong shape (spatial, channels, rank, packed width) | grad_output shape ... does not match | test_op_registration |
| 28 | backward op | grad_output or output of another dtype, output of another shape | differs from | test_op_registration |
| 29 | layer | channel list: duplicate, outside, empty, 2-D, float | more than once / outside / empty / 1-D / integer | test_nn_conv |
| 30 | layer | channel list that is not numbers (strings) | must be a list or tensor of integer channel indices | * |
| 31 | layer | input with the wrong number of channels | input has n channels but weight expects m | * |
| 32 | convert | not an nn.Module | expects an nn.Module | test_convert |
| 33 | convert | a model without nn.Conv2d | no nn.Conv2d | test_convert |
| 34 | convert | conversion_notes of an unconverted model | was not converted | test_convert |
| 35 | convert | a model whose convs all stay full | found no selectable channels | * |
| 36 | convert | a layer swapped after conversion | 'a1' is a Conv2d | test_convert |
| 37 | plan | a selection with an index outside its group | selection of group ... outside | test_convert |
| 38 | plan | a selection with the wrong number of groups | n entries for m channel groups | test_channels_plan |
| 39 | plan | a model without sparse convs; linking through a Linear | no ChannelSparseConv2d / cannot link | test_channels_plan |
| 40 | compact_model | a plan of another model | another model | test_compact |
| 41 | compact_model | something that is not a plan | needs the model's ChannelPlan | * |
| 42 | compact_model | channels removed where the readers are unknown | cannot be removed | test_convert |
| 43 | selector | fraction outside (0, 1], unknown budget, tau < 0, fractions per layer miscounted, a layer of 0 channels | fraction / budget / tau / fractions for / at least one channel | test_selectors |
| 44 | selector | no layers at all | needs at least one layer | * |
| 45 | selector | update() without select() | without a preceding select | test_selectors |
| 46 | selector | saliency of the wrong shape | shape | test_selectors |
| 47 | selector | saliency not finite (raised by the next check_saliency, best or state_dict; update leaves the step out) | not finite | test_selectors |
| 48 | selector | state of another kind of selector | saved for | test_selectors |
| 49 | selector | state of the same selector for another model | saved for ... num_channels | * |
| 50 | train | fraction outside (0, 1], unknown method, explore_epochs 0 | fraction / unknown method / explore_epochs | test_train |
| 51 | train | method options that contradict each other | (by name) | test_train_methods |
| 52 | train | widths_from a missing or mismatched run | no finished run / does not fit | test_train_methods |
| 53 | train | resume with other options (a mismatched checkpoint) | cannot resume ... other options | test_train |
| 54 | train | resume from a corrupt checkpoint | is not a readable checkpoint | * |
| 55 | train | a non-finite loss or saliency | phase, epoch, step and what to try | test_train |
| 56 | CLI train | --resume without a checkpoint | error, exit 2 | test_train |
| 57 | CLI train | --fraction outside (0, 1] | fraction must lie in (0, 1], exit 2 | * |
| 58 | CLI train | --resume from a corrupt checkpoint | not a readable checkpoint, exit 2 | * |
| 59 | CLI train | --threads 0 | --threads must be >= 1 | * |
| 60 | sweep / CLI sweep | fractions outside or NaN, duplicates, unknown method, negative seed, empty list | by name, before writing anything | test_sweep |
| 61 | CLI sweep | --collect-only without a sweep | no sweep at | test_sweep |
| 62 | CLI plot | no results | error, exit 2 | test_plot |
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dce_kernels
from dce_kernels import ChannelSparseConv2d, CUCBSelector, compact_model, convert, plan_for
from dce_kernels.experiments.cli import main
from dce_kernels.experiments.train import train
from toolkit import tiny_config, tiny_datasets


@pytest.mark.parametrize("overrides, message", [
    (dict(in_idx=torch.tensor([0, 3], dtype=torch.int16)), "in_idx must hold int64 or int32 "
                                                             "channel indices, got Short"),
    (dict(dilation=0), r"dilation must be >= 1, got \[0, 0\]"),
    (dict(groups=0), "groups must be positive, got 0"),
    (dict(input=torch.randn(1, 4, 5, 5), weight=torch.randn(5, 1, 3, 3), groups=4),
     "out_channels 5 is not divisible by groups 4"),
], ids=["int16 indices", "dilation 0", "groups 0", "groups not dividing"])
def test_op(backend, overrides, message):
    overrides = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                 for k, v in overrides.items()}
    base = {k: v.to(backend.device) for k, v in dict(
        input=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 4, 3, 3),
        in_idx=torch.tensor([0, 3]), out_idx=torch.tensor([1, 4])).items()}
    with pytest.raises(RuntimeError, match=message):
        backend.conv(**{**base, "bias": None, **overrides})


def test_layer_channel_list_of_strings():
    with pytest.raises(TypeError, match=r"in_idx must be a list or tensor of integer channel "
                                        r"indices, got \['a', 'b'\]"):
        ChannelSparseConv2d(3, 4, 3).set_active(in_idx=["a", "b"])


def test_layer_input_with_the_wrong_number_of_channels():
    layer = ChannelSparseConv2d(3, 4, 3)
    layer.set_active(in_idx=[0, 2])
    with pytest.raises(RuntimeError, match="input has 5 channels but weight expects 3"):
        layer(torch.randn(2, 5, 6, 6))


class _AllFull(nn.Module):
    """Its conv's output is added to the model's input: no channel of it may go."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_a_model_whose_convs_all_stay_full():
    model = convert(_AllFull())
    with pytest.raises(ValueError, match="found no selectable channels in _AllFull; "
                                         r"conversion_notes\(model\) says why"):
        plan_for(model)


def test_compact_model_of_something_that_is_not_a_plan():
    model = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    with pytest.raises(TypeError, match="needs the model's ChannelPlan .* got NoneType"):
        compact_model(model, None)


def test_selector_without_layers():
    with pytest.raises(ValueError, match="needs at least one layer"):
        CUCBSelector([])


def test_selector_state_of_another_model():
    with pytest.raises(ValueError, match=r"saved for .*'num_channels': \[4, 5\].* this "
                                         r"selector is .*'num_channels': \[4, 3\]"):
        CUCBSelector([4, 3]).load_state_dict(CUCBSelector([4, 5]).state_dict())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip"],
                         ids=["empty", "garbage", "truncated"])
def test_resume_from_a_corrupt_checkpoint(tmp_path, content, one_thread):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot resume: .*checkpoint.pt is not a readable "
                                         "checkpoint"):
        train(tiny_config(run_dir=str(tmp_path)), resume=True, datasets=tiny_datasets())


def test_resume_from_a_file_that_is_not_our_checkpoint(tmp_path, one_thread):
    torch.save([1, 2, 3], tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a checkpoint of dce train"):
        train(tiny_config(run_dir=str(tmp_path)), resume=True, datasets=tiny_datasets())


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.2", "nan"])
def test_cli_fraction_outside_0_1(tmp_path, capsys, fraction):
    code = main(["train", "--fraction", fraction, "--run-dir", str(tmp_path / "run"),
                 "--no-progress", "--data-dir", str(tmp_path)])
    assert code == 2
    assert f"fraction must lie in (0, 1], got {float(fraction)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_resume_from_a_corrupt_checkpoint(tmp_path, capsys, monkeypatch):
    # The data is not read before the checkpoint is: a synthetic dataset stands in.
    from dce_kernels.experiments import train as train_module

    monkeypatch.setattr(train_module, "load_data", lambda config: (
        *tiny_datasets(), {"in_channels": 1, "num_classes": 3, "image_size": 10}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80\x04garbage")
    code = main(["train", "--resume", "--run-dir", str(run), "--no-progress",
                 "--width", "0.125"])
    assert code == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_cli_threads_below_one(tmp_path):
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        main(["train", "--threads", "0", "--run-dir", str(tmp_path), "--no-progress"])
