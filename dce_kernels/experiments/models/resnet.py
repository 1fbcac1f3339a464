"""CIFAR ResNet (He et al. 2016: 6n+2 layers, widths 16/32/64, parameter-free shortcuts).

Channel selection touches only the inner channels of each basic block: the
output channels of ``conv1`` (and so ``bn1`` and ``conv2``'s input channels).
The convs that write into the residual stream (the stem and every ``conv2``)
keep all their output channels. Why: the residual stream is shared by every
block through additions, so a channel switched off in one writer still flows
in from the others; selecting it per layer would break the channel
independence CUCB assumes (the poster notes skips hurt). This way every
selected channel can be physically removed in the exported model.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ...channels import ChannelGroup
from ...nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .init import init_conv_weights

__all__ = ["ResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ChannelSparseConv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = ChannelSparseBatchNorm2d(planes)
        self.conv2 = ChannelSparseConv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option A: zero channels appended on downsampling

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, ::self.stride, ::self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if in_channels < 1 or num_classes < 1 or width <= 0:
            raise ValueError("in_channels and num_classes must be >= 1 and width > 0")
        n = (depth - 2) // 6
        widths = [max(1, round(w * width)) for w in (16, 32, 64)]
        self.conv1 = ChannelSparseConv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        init_conv_weights(self)

    def channel_groups(self) -> list[ChannelGroup]:
        # Inside a block conv1's output reaches only bn1, a ReLU and conv2: packable.
        return [ChannelGroup(b.conv1, norms=[b.bn1], consumers=[b.conv2], name=f"layers.{i}.conv1",
                             sole_readers=True)
                for i, b in enumerate(self.layers)]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.classifier(self.flatten(self.pool(self.layers(x))))
