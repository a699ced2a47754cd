"""The residual networks He et al. built for CIFAR-10 ("Deep Residual Learning for Image
Recognition", 2016, section 4.2): a 3x3 convolution of 16 filters, three stages of ``n`` basic
blocks (two 3x3 convolutions with batch norm) of 16, 32 and 64 filters, the second and third
starting at stride 2, global average pooling and one dense layer: 6n + 2 layers. The paper
reports 8.75% test error for ResNet-20 (0.27 M parameters) and 6.97% for ResNet-56 (0.85 M).

Shortcuts are the paper's option A on CIFAR: identity, and where a stage halves the size and
doubles the filters, every second pixel with the new channels zero, so no shortcut has weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, ReLU between and after the sum with the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:  # option A: the new channels start at zero, so the shortcut has no weights
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images, as :mod:`cifarlab.models.resnet` describes."""

    def __init__(self, n: int, num_classes: int = 10, in_chans: int = 3, img_size=32,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths):
            for k in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage and k == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al.'s initialisation (their reference 13)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


# min_size: padded 3x3 convolutions and average pooling take any size, a 1x1 image too
@register_model("resnet20", min_size=1, about="He et al.'s ResNet-20 for CIFAR (0.27 M parameters)")
def resnet20(**kw) -> nn.Module:
    """ResNet-20 (n = 3): 8.75% test error on CIFAR-10 in He et al. (2016)."""
    return CifarResNet(3, **kw)


@register_model("resnet56", min_size=1, about="He et al.'s ResNet-56 for CIFAR (0.85 M parameters)")
def resnet56(**kw) -> nn.Module:
    """ResNet-56 (n = 9): 6.97% test error on CIFAR-10 in He et al. (2016)."""
    return CifarResNet(9, **kw)
