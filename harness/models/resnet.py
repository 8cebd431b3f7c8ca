"""Residual backbones for 32x32 inputs (any size works: features are globally average-pooled).

One ``ResNet`` class covers the CIFAR ResNet-32 (He et al. 2016, option-A zero-padding shortcuts, as in
PyCIL), the GEM paper's reduced ResNet-18 (nf = 20) and ResNet-18/34 with a CIFAR stem (3x3 conv, no
max-pool). ResNet-12 is the few-shot/LibContinual variant with three convolutions per block.
"""

from __future__ import annotations

import torch
from torch import nn


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, pad_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif pad_shortcut:
            self.shortcut = PadShortcut(cout - cin, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], pad_shortcut: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1, pad_shortcut))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class Block12(nn.Module):
    """ResNet-12 block: three 3x3 convolutions, a 1x1 projected shortcut, then 2x2 max-pooling."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        convs = []
        for i in range(3):
            convs += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)]
            if i < 2:
                convs.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*convs)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(nn.functional.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        blocks, cin = [], in_channels
        for width in widths:
            blocks.append(Block12(cin, width))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


def resnet32(in_channels: int) -> ResNet:
    """CIFAR ResNet-32: 3 stages of 5 blocks, widths 16/32/64, ~0.46 M parameters, 64-d features."""
    return ResNet(in_channels, [16, 32, 64], [5, 5, 5], pad_shortcut=True)


def reduced_resnet18(in_channels: int, nf: int = 20) -> ResNet:
    """The GEM paper's ResNet-18 with widths nf, 2nf, 4nf, 8nf (nf = 20: ~1.1 M parameters, 160-d)."""
    return ResNet(in_channels, [nf, 2 * nf, 4 * nf, 8 * nf], [2, 2, 2, 2], pad_shortcut=False)


def resnet18(in_channels: int, nf: int = 64) -> ResNet:
    return ResNet(in_channels, [nf, 2 * nf, 4 * nf, 8 * nf], [2, 2, 2, 2], pad_shortcut=False)


def resnet34(in_channels: int, nf: int = 64) -> ResNet:
    return ResNet(in_channels, [nf, 2 * nf, 4 * nf, 8 * nf], [3, 4, 6, 3], pad_shortcut=False)


def resnet12(in_channels: int, widths: list[int] | None = None) -> ResNet12:
    return ResNet12(in_channels, widths or [64, 160, 320, 640])
