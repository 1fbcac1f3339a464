"""dce_kernels.convert on real models no one here wrote: torchvision's resnet18,
vgg11_bn, mobilenet_v2 and densenet121 (untrained, 32x32 inputs, float64 but for vgg11_bn).

Per model, on one converted instance: all channels active equals the original
(outputs and gradients); random selections equal the masked original graph
(toolkit.MaskedReference) and skip only channels that are exactly zero there; a
few training steps with CUCB keep inactive weights untouched and report
saliency; the exported compact model equals the sparse one."""
import copy

import pytest
import torch

from dce_kernels import convert
from dce_kernels.channels import conversion_notes, plan_for
from dce_kernels.compact import compact_model, export_compact, load_exported
from toolkit import (active_parameter_count, capture_original, check_against_reference,
                     cucb_steps_touch_only_active_blocks, random_selection, randomize_norms, synthetic_dataset)

torchvision = pytest.importorskip("torchvision")

# Every conv's output channels are selectable in these four. The groups: the
# tied residual stages plus the 8 inner convs (resnet18); every conv and the two
# hidden layers of the classifier (vgg11_bn);
# the stem, the 7 tied projection chains of the inverted residuals, the 16
# expand convs (their depthwise convs follow them) and the last conv
# (mobilenet_v2); every conv (densenet121).
MODELS = {"resnet18": 12, "vgg11_bn": 10, "mobilenet_v2": 25, "densenet121": 120}
# vgg11_bn's classifier reads 512x7x7 features: 120M parameters, whose float64
# gradients, momentum and copies would take ~7 GB; it runs in float32.
DTYPES = {"vgg11_bn": torch.float32}
# Relative to each tensor's largest entry (toolkit._close). float64 gradients of
# mobilenet_v2's 52 layers with random BatchNorms differ from the masked graph's by
# up to ~1.1e-10 of their scale: the narrower convs sum in another order.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request):
    name = request.param
    torch.manual_seed(0)
    dtype = DTYPES.get(name, torch.float64)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).to(dtype)
    randomize_norms(model)
    reference = capture_original(model)  # the original layers, parameters shared
    original = copy.deepcopy(model)
    convert(model)
    return name, model, reference, original


def _input(model, *shape, generator=None):
    return torch.randn(*shape, dtype=next(model.parameters()).dtype, generator=generator)


def test_all_channels_equal_the_original(converted):
    name, model, reference, original = converted
    plan = plan_for(model)
    assert len(plan.groups) == MODELS[name]
    assert conversion_notes(model) == {}
    plan.apply(None)
    x = _input(model, 2, 3, 32, 32)
    tol = TOLERANCE[x.dtype]
    # Against a deep copy, not through fx at all (first: the forwards below
    # update the running statistics the reference shares).
    for training in (False, True):
        original.train(training), model.train(training)
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(x)
            torch.manual_seed(0)
            assert torch.allclose(out, original(x), atol=tol, rtol=tol)
    model.train()
    assert check_against_reference(model, reference, plan, x, atol=tol) == []


def test_random_channels_equal_the_masked_original(converted):
    name, model, reference, _ = converted
    plan = plan_for(model)
    model.train()
    gen = torch.Generator().manual_seed(11)
    plan.apply(random_selection(plan.num_channels, generator=gen))
    partial_inputs = sum(c.in_idx.numel() < c.in_channels for c in plan.convs)
    assert partial_inputs >= len(plan.groups) // 2  # the test skips something
    x = _input(model, 3, 3, 32, 32)
    # A packed classifier input hands Dropout [N, active features] where the
    # masked graph has [N, all features]: the same seed draws other masks. Dropout
    # is elementwise, so it is off here (BatchNorm still in training mode).
    dropouts = [m for net in (model, reference) for m in net.modules()
                if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        assert check_against_reference(model, reference, plan, x,
                                       atol=TOLERANCE[x.dtype]) == []
    finally:
        for m, p in zip(dropouts, saved):
            m.p = p


def test_training_steps_with_cucb_then_export(converted, tmp_path):
    name, model, _, _ = converted
    plan = plan_for(model)
    model.train()
    def saliency_only_where_active(saliency, selection):
        for s, active in zip(saliency, selection):
            inactive = torch.ones(s.numel(), dtype=torch.bool)
            inactive[active] = False
            assert s[inactive].eq(0).all()
        assert sum(bool(s.gt(0).any()) for s in saliency) >= 0.9 * len(saliency)

    selector = cucb_steps_touch_only_active_blocks(
        model, plan, 3,
        lambda gen: (_input(model, 4, 3, 32, 32, generator=gen),
                     torch.randint(0, 10, (4,), generator=gen)),
        saliency_only_where_active)

    plan.apply(selector.best())
    model.eval()
    compact = compact_model(model, plan).eval()
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact == active_parameter_count(model, plan) < 0.6 * sum(
        p.numel() for p in model.parameters())
    x = _input(model, 3, 3, 32, 32)
    tol = TOLERANCE[x.dtype]
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(compact(x), expected, atol=tol, rtol=tol)
    if name == "resnet18":  # torch.export of residual adds; the path is model-independent
        paths = export_compact(compact, x, str(tmp_path))
        with torch.no_grad():
            assert torch.allclose(load_exported(paths["program"])(x), expected, atol=tol)


# -- the training pipeline: --model torchvision:NAME ---------------------------------------

def test_build_model_adapts_stem_classes_and_small_images():
    from dce_kernels.experiments.models import build_model

    # vgg11_bn's five poolings cannot take 28x28 (28 -> 0): the images are padded to 32.
    model = build_model("torchvision:vgg11_bn", in_channels=1, num_classes=7, image_size=28)
    assert model.net.features[0].in_channels == 1
    assert len(plan_for(model).groups) == MODELS["vgg11_bn"]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="no classification model 'resnet7'"):
        build_model("torchvision:resnet7")
    with pytest.raises(ValueError, match="width scales our own models only"):
        build_model("torchvision:resnet18", width=0.5)
    with pytest.raises(ValueError, match="'torchvision:NAME' or 'timm:NAME'"):
        build_model("keras:resnet18")


def test_dce_train_runs_a_torchvision_model_end_to_end(tmp_path):
    from dce_kernels.experiments.files import CHECKPOINT
    from dce_kernels.experiments.models import build_model
    from dce_kernels.experiments.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)

    def data(n):  # one channel, 28x28, three classes with a learnable signal
        return synthetic_dataset(n, g, size=28, patch=8)

    # The default method (shrink) at half of every group's channels.
    config = TrainConfig(model="torchvision:resnet18", dense_epochs=0, explore_epochs=1,
                         finetune_epochs=1, batch_size=16, tau=1, fraction=0.5, budget="layer",
                         lr=0.01, run_dir=str(tmp_path), progress=False)
    train_ds, test_ds = data(32), data(16)
    report = train(config, datasets=(train_ds, test_ds)).to_dict()
    sel = report["selection"]
    assert len(sel["channels_total"]) == MODELS["resnet18"]
    assert report["export"]["accuracy_matches_sparse"]
    assert report["compact"]["flops"] < 0.5 * report["dense"]["flops"]
    program = torch.export.load(report["export"]["program"]).module()
    assert program(torch.randn(3, 1, 28, 28)).shape == (3, 3)
    # The exported program computes the trained sparse model's logits, not only its accuracy.
    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    sparse = build_model("torchvision:resnet18", in_channels=1, num_classes=3, image_size=28)
    sparse.load_state_dict(checkpoint["model"])
    plan_for(sparse).apply(checkpoint["selection"])
    images = test_ds.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(program(images), sparse.eval()(images), rtol=1e-5, atol=1e-5)
    # The command line documents such names.
    from dce_kernels.experiments.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    model_help = next(a.help for a in train_parser._actions if "--model" in a.option_strings)
    assert "torchvision:resnet18" in model_help
