"""dce_kernels.convert on timm families (untrained, 32x32 inputs, float64): RegNet
(BatchNormAct2d's functional F.batch_norm; grouped convs, whose groups select equally
many channels of every conv group), MobileNetV3
(squeeze-and-excitation gates with hard sigmoid, depthwise convs, timm's Linear),
RepVGG (three branches summed, a BatchNorm as the identity branch) and ConvNeXt
(LayerNorm2d over channels, layer scale, depthwise 7x7 convs, 1x1 conv MLPs).

Per model, on one converted instance: all channels active equals the original
(outputs in eval and train, input gradients); random selections equal the masked
original graph (toolkit.MaskedReference, which masks functional batch_norm outputs
too and runs functional layer_norm over the active channels only) and skip only
channels that are exactly zero there; CUCB training steps leave inactive weights
untouched; compact_model equals the sparse model in eval and keeps
timm's own layer classes; the compact model's ONNX file gives its logits in
onnxruntime. Also GhostNet (slices and concatenations of a conv with its cheap
depthwise op), EfficientNet-B0, ResNet-50 and DenseNet-121: every timm family of
bench/convert_models.py's table. ConvNeXt with conv_mlp=False
(nn.Linear MLPs over channels-last maps, as convnext_tiny) gets a test of its own."""
import copy

import pytest
import torch

from dce_kernels import (ChannelSparseBatchNorm2d, ChannelSparseLayerNorm, ChannelSparseNormAct,
                         convert)
from dce_kernels.channels import conversion_notes, plan_for
from dce_kernels.compact import compact_model, export_compact
from toolkit import (active_parameter_count, capture_original, check_against_reference,
                     cucb_steps_touch_only_active_blocks, random_selection, randomize_norms)

timm = pytest.importorskip("timm")

# What stays full, by the first words of the reason (every other conv is selectable).
KEPT_FULL = {"regnetx_002": None, "mobilenetv3_small_050": None, "repvgg_a0": None,
             "convnext_atto": None, "ghostnet_050": None, "efficientnet_b0": None,
             "resnet50": None, "densenet121": None}
# Sparse and masked reductions round differently, and batch statistics over 3 images at
# RegNet's 1x1 last stage amplify that: ~1e-10 of the outputs, ~1e-8 of the gradients.
TOL = 1e-7


def _converted(name, seed, **kwargs):
    """timm's ``name`` (float64, random norms and layer scales, training mode)
    converted, with the reference graph of the original and a copy of it."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).double()
    randomize_norms(model)  # BatchNormAct2d is a BatchNorm2d: random affine and statistics
    with torch.no_grad():  # ConvNeXt's layer scale starts at 1e-6, which would hide its blocks
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    model.train()
    reference = capture_original(model)
    original = copy.deepcopy(model)
    convert(model)
    return model, reference, original


@pytest.fixture(scope="module", params=list(KEPT_FULL))
def converted(request):
    return (request.param, *_converted(request.param, seed=0))


def _x(*shape, generator=None):
    return torch.randn(*shape, dtype=torch.float64, generator=generator)


def test_groups_found_and_what_stays_full(converted):
    name, model, _, _ = converted
    notes = conversion_notes(model)
    if KEPT_FULL[name] is None:
        assert notes == {}
    else:
        assert notes and all(KEPT_FULL[name] in why for why in notes.values())
    # timm's BatchNormAct2d (functional batch_norm), plain BatchNorm2d in its ResNets.
    norm = (ChannelSparseLayerNorm if name.startswith("convnext") else
            ChannelSparseBatchNorm2d if name == "resnet50" else ChannelSparseNormAct)
    assert any(isinstance(m, norm) for m in model.modules())
    sparse = sum(type(m).__name__ == "ChannelSparseConv2d" for m in model.modules())
    assert sparse >= 0.6 * sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_all_channels_equal_the_original(converted):
    _, model, reference, original = converted
    plan = plan_for(model)
    plan.apply(None)
    x = _x(2, 3, 32, 32)
    for training in (False, True):
        original.train(training), model.train(training)
        xo, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(0)
        out = model(xm)
        torch.manual_seed(0)
        want = original(xo)
        g = torch.randn_like(want)
        (gm,), (go,) = torch.autograd.grad(out, [xm], g), torch.autograd.grad(want, [xo], g)
        torch.testing.assert_close(out, want, rtol=TOL, atol=TOL)
        torch.testing.assert_close(gm, go, rtol=1e-8, atol=1e-8 * float(go.abs().max()))
    model.train()
    assert check_against_reference(model, reference, plan, x, atol=TOL) == []


def test_random_channels_equal_the_masked_original(converted):
    _, model, reference, _ = converted
    plan = plan_for(model)
    model.train()
    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(5),
                                blocks=plan.blocks))
    assert sum(c.in_idx.numel() < c.in_channels for c in plan.convs) >= len(plan.groups) // 2
    assert check_against_reference(model, reference, plan, _x(3, 3, 32, 32), atol=TOL) == []


def test_training_steps_then_compact_and_onnx(converted, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    name, model, _, original = converted
    plan = plan_for(model)
    model.train()
    selector = cucb_steps_touch_only_active_blocks(
        model, plan, 2, lambda gen: (_x(4, 3, 32, 32, generator=gen),
                                     torch.randint(0, 10, (4,), generator=gen)))

    plan.apply(selector.best())
    model.eval()
    compact = compact_model(model, plan).eval()
    # timm's own classes again (BatchNormAct2d with its activation), narrower.
    assert {type(m) for m in compact.modules()} <= {type(m) for m in original.modules()}
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact == active_parameter_count(model, plan)
    assert n_compact < 0.6 * sum(p.numel() for p in original.parameters())
    x = _x(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compact(x), expected, rtol=TOL, atol=TOL)
    if name != "mobilenetv3_small_050":
        return  # one ONNX round trip: the exporter is slow, and the path is model-independent
    compact = compact.float()
    paths = export_compact(compact, x.float(), str(tmp_path), format="onnx")
    session = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32)  # another batch size than exported with
    (logits,) = session.run(["logits"], {"input": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), compact(images),
                                   rtol=1e-4, atol=1e-4)


def test_convnext_with_linear_mlps_over_channels_last():
    """ConvNeXt built with conv_mlp=False (as convnext_tiny and larger): permute, timm's
    LayerNorm, nn.Linear MLP, permute back. Every conv and Linear follows the groups."""
    model, reference, original = _converted("convnext_atto", seed=1, conv_mlp=False)
    assert conversion_notes(model) == {}
    linears = [m for n, m in model.named_modules() if ".mlp.fc" in n]
    assert linears and all(type(m).__name__ == "ChannelSparseLinear" for m in linears)
    plan = plan_for(model)
    x = _x(2, 3, 32, 32)
    model.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=TOL, atol=TOL)
    model.train()
    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(3)))
    assert check_against_reference(model, reference, plan, x, atol=TOL) == []
    model.eval()
    compact = compact_model(model, plan).eval()
    assert sum(p.numel() for p in compact.parameters()) == active_parameter_count(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=TOL, atol=TOL)


def test_dce_train_model_hook_builds_timm_models():
    from dce_kernels.experiments.models import build_model

    model = build_model("timm:regnetx_002", in_channels=1, num_classes=7, image_size=28)
    assert len(plan_for(model).groups) > 0
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="timm has no model 'regnetx_7'"):
        build_model("timm:regnetx_7")
    with pytest.raises(ValueError, match="width scales our own models only"):
        build_model("timm:regnetx_002", width=0.5)
