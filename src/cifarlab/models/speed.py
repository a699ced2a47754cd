"""Compact CNNs for the speed recipes, after airbench (Keller Jordan, 2024,
"94% on CIFAR-10 in 3.29 seconds on a single GPU"): a frozen whitening first layer computed
from the training images, three conv groups (conv, pool, batch norm, GELU, conv, batch norm,
GELU; airbench96's groups add a third conv and a residual connection), a global max pool and a
scaled linear head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model


class BatchNormNoScale(nn.BatchNorm2d):
    """Batch norm with a fixed unit scale and a learned shift (the scale is redundant before GELU
    under weight decay, and freezing it made the speed records' training more stable)."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class GlobalMaxPool(nn.Module):
    """The maximum over each channel's whole map, (N, C, H, W) to (N, C, 1, 1), as an ordinary
    max pool whose window is the map (airbench pools its final 3x3 map with MaxPool2d(3)).
    ``AdaptiveMaxPool2d(1)`` computes the same, but on an H200 its kernels took 36 of the fast
    recipe's 503 ms of GPU time over two epochs (bf16, channels-last; its backward scatters
    with atomics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=tuple(x.shape[-2:]))


class ConvGroup(nn.Module):
    """conv 3x3 -> max pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU; with ``depth`` 3, one more
    conv -> BN -> GELU and a residual connection around the last two (airbench96's group). With
    ``act_after_add`` the last GELU comes after the residual sum instead (airbench96's June 2024
    update, which trained to the same accuracy in fewer epochs). ``bn_momentum`` is PyTorch's
    (the weight of each batch in the running statistics)."""

    def __init__(self, cin: int, cout: int, depth: int = 2, act_after_add: bool = False, bn_momentum: float = 0.4):
        super().__init__()
        if depth not in (2, 3):
            raise ValueError(f"ConvGroup depth {depth} is not valid; choose 2 or 3")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNormNoScale(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = BatchNormNoScale(cout, bn_momentum)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False) if depth == 3 else None
        self.norm3 = BatchNormNoScale(cout, bn_momentum) if depth == 3 else None
        self.act = nn.GELU()
        self.act_after_add = act_after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        y = self.act(self.norm2(self.conv2(x)))
        if self.conv3 is None:
            return y
        if self.act_after_add:
            return self.act(x + self.norm3(self.conv3(y)))
        return x + self.act(self.norm3(self.conv3(y)))


class SpeedNet(nn.Module):
    """Whitening conv (2x2, frozen weights), three :class:`ConvGroup` of ``depth`` convolutions
    (``act_after_add`` and ``bn_momentum`` as there), max pool, linear / scale."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size=32,
                 widths: tuple[int, int, int] | list[int] = (64, 256, 256), scale: float = 1 / 9, depth: int = 2,
                 act_after_add: bool = False, bn_momentum: float = 0.4):
        super().__init__()
        self.whiten = nn.Conv2d(in_chans, 2 * in_chans * 4, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_whitening, never trained
        w1, w2, w3 = widths
        group = dict(depth=depth, act_after_add=act_after_add, bn_momentum=bn_momentum)
        self.layers = nn.Sequential(nn.GELU(), ConvGroup(2 * in_chans * 4, w1, **group), ConvGroup(w1, w2, **group),
                                    ConvGroup(w2, w3, **group))
        self.pool = GlobalMaxPool()
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                # Identity-like start for the first in_channels filters (a partial Dirac init), the
                # rest keep PyTorch's default: signals pass through the untrained net intact.
                nn.init.dirac_(m.weight[: m.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.whiten(x))
        return self.head(self.pool(x).flatten(1)) * self.scale

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of ``x`` (float N, C, H, W): the patches'
        covariance eigenvectors scaled by 1/sqrt(eigenvalue), and their negatives (so the GELU
        after it keeps both signs)."""
        c = x.shape[1]
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c, 2, 2).flatten(1).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        vals, vecs = torch.linalg.eigh(cov)
        filters = (vecs.T / torch.sqrt(vals + eps).view(-1, 1)).view(-1, c, 2, 2)
        w = torch.cat([filters, -filters]).to(self.whiten.weight)
        self.whiten.weight.copy_(w)
        self.whiten.bias.zero_()


# min_size: a 2x2 valid conv, then three 2x2 pools
@register_model("speednet", min_size=9, about="airbench94's net: whitening conv, batch norm, GELU")
def speednet(**kw) -> nn.Module:
    """airbench94-style net (widths 64/256/256); ~2 M parameters."""
    return SpeedNet(**kw)


@register_model("speednet-wide", min_size=9, about="airbench96's net: wider, residual groups")
def speednet_wide(**kw) -> nn.Module:
    """airbench96-style net for the ``best`` recipe: widths 128/512/512, three convolutions per
    group with a residual connection; 12.7 M parameters."""
    kw.setdefault("widths", (128, 512, 512))
    kw.setdefault("depth", 3)
    return SpeedNet(**kw)


@register_model("speednet-wide2", min_size=9, about="airbench96's June 2024 net (best-select)")
def speednet_wide2(**kw) -> nn.Module:
    """airbench96's June 2024 net, as its hard-example-selection variant (airbench96_faster)
    trains it: widths 128/384/512, three convolutions per group with the last GELU after the
    residual sum, batch-norm momentum 0.1 (PyTorch's default); 9.9 M parameters."""
    kw.setdefault("widths", (128, 384, 512))
    kw.setdefault("depth", 3)
    kw.setdefault("act_after_add", True)
    kw.setdefault("bn_momentum", 0.1)
    return SpeedNet(**kw)


@register_model("speednet-proxy", min_size=9, about="small proxy that picks hard examples")
def speednet_proxy(**kw) -> nn.Module:
    """A small speednet (widths 32/64/64, two convolutions per group, batch-norm momentum 0.1)
    that picks the examples a larger net trains on (``train.select_fraction``), as
    airbench96_faster's proxy; 0.15 M parameters."""
    kw.setdefault("widths", (32, 64, 64))
    kw.setdefault("bn_momentum", 0.1)
    return SpeedNet(**kw)
