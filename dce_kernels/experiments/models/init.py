"""Weight initialization shared by our models."""
from __future__ import annotations

from torch import nn


def init_conv_weights(model: nn.Module) -> None:
    """He initialization (fan-out, ReLU) of every conv, as in the CIFAR VGG and
    ResNet papers; BatchNorm and Linear keep torch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
