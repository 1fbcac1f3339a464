"""Weight initialization shared by our models."""
from __future__ import annotations

from torch import nn


def init_conv_weights(model: nn.Module) -> None:
    """He initialization (fan-out, ReLU) of every conv, as in the CIFAR VGG and
    ResNet papers; BatchNorm and Linear keep torch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def reinitialize(model: nn.Module) -> None:
    """A fresh initialization of a model of any architecture, as our models get theirs:
    every module's own ``reset_parameters`` (BatchNorm statistics included), then He
    initialization of the convs."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init_conv_weights(model)
