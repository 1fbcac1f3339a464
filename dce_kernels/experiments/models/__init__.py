"""Model registry: ``build_model(name, in_channels, num_classes, width=1.0)``.

Our own models by name (``vgg11``, ``resnet20``, ...), and models of other
libraries converted by :func:`dce_kernels.convert` (``torchvision:resnet18``,
``timm:efficientnet_b0``, see :mod:`dce_kernels.experiments.models.external`).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .resnet import ResNet
from .vgg import VGG

__all__ = ["VGG", "ResNet", "build_model", "MODELS"]

MODELS = {
    "vgg11": lambda **kw: VGG(11, **kw),
    "vgg13": lambda **kw: VGG(13, **kw),
    "vgg16": lambda **kw: VGG(16, **kw),
    "vgg19": lambda **kw: VGG(19, **kw),
    "resnet20": lambda **kw: ResNet(20, **kw),
    "resnet56": lambda **kw: ResNet(56, **kw),
}


def build_model(name: str, in_channels: int = 3, num_classes: int = 10,
                width: float = 1.0, image_size: Optional[int] = None) -> nn.Module:
    """A model of the registry, built from channel-sparse layers.

    ``image_size`` (the side of the square input images) matters only for
    external models, which pad images smaller than they can take."""
    if ":" in name:
        from .external import build_external  # imports torchvision/timm: only when asked

        return build_external(name, in_channels, num_classes, width, image_size)
    key = name.lower().replace("-", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, "
                         "or torchvision:NAME, timm:NAME")
    return MODELS[key](in_channels=in_channels, num_classes=num_classes, width=width)
