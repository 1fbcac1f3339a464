"""Models from other libraries, converted: ``build_model("torchvision:resnet18", ...)``,
``build_model("timm:efficientnet_b0", ...)``.

The model is built untrained (torchvision's ``weights=None``, timm's
``pretrained=False``: nothing is downloaded) with the requested number of
classes; its stem reads ``in_channels`` channels (torchvision: the first conv
is replaced by one that does when the image has another number of channels
than 3; timm: its own ``in_chans``); then :func:`dce_kernels.convert` makes it channel-sparse.
ImageNet models downsample 32x: images smaller than 32x32 (Fashion-MNIST's
28x28) are zero-padded to 32x32 by a ``ZeroPad2d`` in front of the model, so
that every model (VGG's five poolings, DenseNet's transitions) still runs.
With ``image_size``, a model torch.fx cannot trace as a whole (timm's VGG) is
linked in pieces from one random batch of that size (``convert``'s
``example_inputs``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ...channels import convert

__all__ = ["build_external", "MIN_IMAGE_SIZE"]

MIN_IMAGE_SIZE = 32


def _torchvision():
    try:
        import torchvision
    except ImportError as e:  # an optional dependency: say how to get it
        raise ValueError("torchvision models need torchvision: pip install "
                         "torchvision==0.29.1 (the version matching torch 2.14.1)") from e
    return torchvision


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Makes the first conv (in registration order: the stem in every
    torchvision classifier) read ``in_channels`` channels."""
    for parent in model.modules():
        for key, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                if child.groups != 1:
                    raise ValueError(f"the first conv of {type(model).__name__} is grouped; "
                                     "cannot change its input channels")
                stem = nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                 stride=child.stride, padding=child.padding,
                                 dilation=child.dilation, bias=child.bias is not None,
                                 padding_mode=child.padding_mode,
                                 device=child.weight.device, dtype=child.weight.dtype)
                nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
                if stem.bias is not None:
                    nn.init.zeros_(stem.bias)
                setattr(parent, key, stem)
                return
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d")


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ValueError("timm models need timm: pip install timm==1.0.31 (the version "
                         "tested, in dce-kernels[test])") from e
    return timm


def _build_torchvision(spec: str, name: str, in_channels: int, num_classes: int) -> nn.Module:
    tv = _torchvision()
    classifiers = tv.models.list_models(module=tv.models)
    if name not in classifiers:
        raise ValueError(f"{spec}: torchvision has no classification model {name!r}; "
                         f"choose from {', '.join(sorted(classifiers))}")
    model = tv.models.get_model(name, weights=None, num_classes=num_classes)
    _replace_stem(model, in_channels)
    return model


def _build_timm(spec: str, name: str, in_channels: int, num_classes: int) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"{spec}: timm has no model {name!r}"
                         + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels)


_LIBRARIES = {"torchvision": _build_torchvision, "timm": _build_timm}


def build_external(spec: str, in_channels: int, num_classes: int, width: float = 1.0,
                   image_size: Optional[int] = None) -> nn.Module:
    """``spec`` is ``"torchvision:NAME"`` (any classification model of
    ``torchvision.models.list_models()``) or ``"timm:NAME"`` (any model of
    ``timm.list_models()``)."""
    library, _, name = spec.partition(":")
    if library not in _LIBRARIES or not name:
        raise ValueError(f"unknown model {spec!r}: external models are named "
                         "'torchvision:NAME' or 'timm:NAME', e.g. torchvision:resnet18, "
                         "timm:efficientnet_b0")
    if width != 1.0:
        raise ValueError(f"{spec}: width scales our own models only; {library} models "
                         f"have their published widths (got width={width})")
    if in_channels < 1 or num_classes < 1:
        raise ValueError("in_channels and num_classes must be >= 1")
    model = _LIBRARIES[library](spec, name, in_channels, num_classes)
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        total = MIN_IMAGE_SIZE - image_size
        pad = (total // 2, total - total // 2) * 2
        model = nn.Sequential(OrderedDict(pad=nn.ZeroPad2d(pad), net=model))
    example = None if image_size is None else torch.randn(
        2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return convert(model, example_inputs=example)
