"""VGG with BatchNorm, CIFAR variant (a single Linear classifier after global pooling)."""
from __future__ import annotations

from torch import nn

from ...nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .init import init_conv_weights

__all__ = ["VGG", "VGG_CONFIGS"]

VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-``depth`` built from channel-sparse layers.

    Every conv is a selectable channel group (the network is sequential, so
    :func:`dce_kernels.channels.sequential_groups` links it). ``width`` scales
    every layer's channel count (narrow networks for quick runs). Pools use
    ``ceil_mode`` so that any image size works: 32 -> 16 -> 8 -> 4 -> 2 -> 1 and
    Fashion-MNIST's 28 -> 14 -> 7 -> 4 -> 2 -> 1. ReLUs are not in place: the
    layers' saliency needs their outputs as they were.
    """

    def __init__(self, depth: int = 16, in_channels: int = 3, num_classes: int = 10,
                 width: float = 1.0) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        if in_channels < 1 or num_classes < 1 or width <= 0:
            raise ValueError("in_channels and num_classes must be >= 1 and width > 0")
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            w = max(1, round(v * width))
            layers += [ChannelSparseConv2d(c, w, 3, padding=1, bias=False),
                       ChannelSparseBatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        init_conv_weights(self)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))
