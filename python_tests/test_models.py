"""The model registry (dce_kernels.experiments.models): every model builds, runs
at any input size and class count, and exposes the channel groups it should."""
import pytest
import torch

from dce_kernels.channels import plan_for
from dce_kernels.experiments.models import build_model


@pytest.mark.parametrize("name,groups", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13),
                                         ("vgg19", 16), ("resnet20", 9), ("resnet56", 27)])
def test_models_build_and_run_any_channels_and_classes(name, groups):
    model = build_model(name, in_channels=2, num_classes=7, width=0.125)
    plan = plan_for(model)
    assert len(plan.groups) == groups
    x = torch.randn(2, 2, 28, 28)
    assert model(x).shape == (2, 7)
    plan.apply([torch.arange(0, c, 2) for c in plan.num_channels])
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 7)


def test_resnet_selects_only_inner_block_channels():
    model = build_model("resnet20", 3, 10, width=0.5)
    plan = plan_for(model)
    sel = [torch.arange(c // 2) for c in plan.num_channels]
    plan.apply(sel)
    block = model.layers[4]
    assert torch.equal(block.conv1.out_idx, sel[4])
    assert torch.equal(block.conv2.in_idx, sel[4])
    assert block.conv2.out_idx.numel() == block.conv2.out_channels  # residual stream intact
    assert model.conv1.out_idx.numel() == model.conv1.out_channels


def test_bad_model_names_and_sizes():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg12")
    with pytest.raises(ValueError, match="6n\\+2"):
        from dce_kernels.experiments.models import ResNet
        ResNet(21)
