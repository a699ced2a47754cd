"""The two CNNs of the Keras-book CIFAR-10 notebook, layer for layer as Keras builds them.

Keras conventions kept here: 'same' padding, Glorot-uniform kernels and zero biases (Keras
defaults), Dropout as Keras applies it, and ``Flatten`` in channels-last order, so that the
first Dense kernel is interchangeable with a Keras model's (see
:func:`cifarlab.models.keras_layout.to_keras`). Outputs are logits; Keras' final softmax is
applied by the caller.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model


class FlattenChannelsLast(nn.Module):
    """Flatten (N, C, H, W) in Keras' (N, H, W, C) order, so Dense weights match Keras' layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def conv_same(cin: int, cout: int) -> nn.Conv2d:
    """A 3x3 convolution with Keras 'same' padding (stride 1: one pixel each side)."""
    return nn.Conv2d(cin, cout, 3, padding=1)


def keras_init_(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases, Keras' defaults for Conv2D and Dense."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class KerasShallow(nn.Sequential):
    """Conv 32 3x3 same, ReLU, MaxPool 2, Dropout .25, Flatten, Dense 512, ReLU, Dropout .5, Dense N."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32):
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        super().__init__(
            conv_same(in_chans, 32), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
            FlattenChannelsLast(),
            nn.Linear(32 * (h // 2) * (w // 2), 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        keras_init_(self)


class KerasDeep(nn.Sequential):
    """Two Conv 32, pool, dropout .25, two Conv 64, pool, dropout .25, Dense 512, dropout .5, Dense N."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32):
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        super().__init__(
            conv_same(in_chans, 32), nn.ReLU(), conv_same(32, 32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            conv_same(32, 64), nn.ReLU(), conv_same(64, 64), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            FlattenChannelsLast(),
            nn.Linear(64 * (h // 4) * (w // 4), 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        keras_init_(self)


@register_model("keras-shallow", min_size=2, about="the notebook's shallow CNN")  # one 2x2 pool
def keras_shallow(**kw) -> nn.Module:
    """The notebook's shallow CNN (4,200,842 parameters on 32x32x3, 10 classes)."""
    return KerasShallow(**kw)


@register_model("keras-deep", min_size=4, about="the notebook's deep CNN")  # two 2x2 pools
def keras_deep(**kw) -> nn.Module:
    """The notebook's deep CNN (2,168,362 parameters on 32x32x3, 10 classes)."""
    return KerasDeep(**kw)
