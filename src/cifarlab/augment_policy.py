"""Policy augmentation: TrivialAugment and RandAugment as pure, batched tensor functions.

Both draw from one bank of 14 operations on images, the bank of AutoAugment (Cubuk et al., 2019)
with an identity: shears, translations and a rotation (filled with black), and the colour
operations of Pillow's ``ImageEnhance`` and ``ImageOps`` (brightness, colour, contrast, sharpness,
posterize, solarize, autocontrast, equalize).

* TrivialAugment (Müller and Hutter, 2021): each image gets one operation, picked uniformly, at a
  strength picked uniformly from 31 levels, in the paper's "wide" ranges. It has no settings.
* RandAugment (Cubuk et al., 2020): each image gets ``ops`` operations in turn, each picked
  uniformly, all at the one strength ``magnitude`` (of the levels 0 to 30), in the narrower
  ranges of RandAugment's paper.

The strengths and ranges are those of torchvision's ``TrivialAugmentWide`` and ``RandAugment``
(31 levels; a random sign for the signed operations), with translations as a fraction of the
image's size, so that they mean on other sizes what they mean on 32x32 images. Geometry samples
the nearest pixel, as those do by default, so pixel values stay whole numbers on the 0-255 scale
and the colour operations can work on them as Pillow works on 8-bit images.

A batch is transformed without a loop over its images, one geometric resampling serving all
five geometric operations. On a GPU each image takes its operation's result by ``torch.where``
from results for the whole batch, so that nothing makes the host wait for the device; on the
CPU each operation runs on the images that drew it (see :func:`apply_ops`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .augment import affine_sample
from .config import POLICIES
from .errors import ConfigError, did_you_mean

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
LEVELS = 31  # strengths 0 to 30, as both papers count them
_OP = {name: k for k, name in enumerate(OPS)}
_GEOMETRIC = {_OP[n] for n in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")}
_ENHANCE = {_OP[n] for n in ("brightness", "color", "contrast", "sharpness")}


@dataclass(frozen=True)
class Ranges:
    """The strength of each operation at the top level (30); level k gives k / 30 of it."""

    shear: float  # the shear factor (0.99: nearly 45 degrees)
    translate: float  # a fraction of the image's width or height
    rotate: float  # degrees
    enhance: float  # brightness, colour, contrast, sharpness: a factor of 1 plus or minus this
    posterize_bits: int  # bits kept at the top level (8 at level 0)


# TrivialAugment's wide ranges (translation: 32 pixels of a 32-pixel image) and RandAugment's.
WIDE = Ranges(shear=0.99, translate=1.0, rotate=135.0, enhance=0.99, posterize_bits=2)
STANDARD = Ranges(shear=0.3, translate=150 / 331, rotate=30.0, enhance=0.9, posterize_bits=4)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Grey levels (N, 1, H, W) as Pillow's conversion to mode L makes them (ITU-R 601-2 luma in
    its 16-bit fixed point, rounded); a one-channel image is its own grey."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True).round()
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # Exact in float32: the sum stays below 2 ** 24, and the division is by a power of two.
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor()


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """Pillow's SMOOTH filter (3x3, centre weight 5 of 13), rounded, the border pixels kept as
    they are (Pillow does not filter them): the image that sharpness moves away from."""
    # The 3x3 sum by shifted slices, rows then columns: a grouped convolution took 5.6 times as
    # long on the CPU (batches of 128).
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = ((box + 4 * x[:, :, 1:-1, 1:-1]) / 13).round()
    return out


def _geometry(x: torch.Tensor, op: torch.Tensor, signed: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    """Shear, translate or rotate each image whose ``op`` is one of those by its ``signed``
    strength (a fraction of the top level, sign included); the others pass through unchanged.
    One resampling for the batch: every image gets a matrix, the identity where its op is not
    geometric. Vacated pixels are black; the nearest pixel is sampled."""
    n, _, h, w = x.shape
    f = signed.double()
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    # Each image's map from output (row, col) to input (row, col): in_row = a00 row + a01 col + b0, etc.
    a00, a01, b0, a10, a11, b1 = one, zero, zero, zero, one, zero
    shear, theta = f * ranges.shear, torch.deg2rad(f * ranges.rotate)
    # Shears about the top-left corner (Pillow's affine origin), half a pixel above the first row.
    is_sx, is_sy = op == _OP["shear_x"], op == _OP["shear_y"]
    a10, b1 = torch.where(is_sx, shear, a10), torch.where(is_sx, shear * 0.5, b1)
    a01, b0 = torch.where(is_sy, shear, a01), torch.where(is_sy, shear * 0.5, b0)
    # Whole pixels, cut towards zero, as torchvision's int() of the magnitude.
    b1 = torch.where(op == _OP["translate_x"], -(f * ranges.translate * w).trunc(), b1)
    b0 = torch.where(op == _OP["translate_y"], -(f * ranges.translate * h).trunc(), b0)
    # Rotation about the image's centre.
    is_rot = op == _OP["rotate"]
    cy, cx, cos, sin = (h - 1) / 2, (w - 1) / 2, theta.cos(), theta.sin()
    a00, a01, a10, a11 = (torch.where(is_rot, v, a) for v, a in ((cos, a00), (-sin, a01), (sin, a10), (cos, a11)))
    b0 = torch.where(is_rot, cy - cos * cy + sin * cx, b0)
    b1 = torch.where(is_rot, cx - sin * cy - cos * cx, b1)
    mats = torch.stack([torch.stack([a00, a01, b0], -1), torch.stack([a10, a11, b1], -1),
                        torch.stack([zero, zero, one], -1)], -2)
    return affine_sample(x, mats, fill_mode="constant", cval=0.0, mode="nearest")


def _enhance(x: torch.Tensor, op: torch.Tensor, signed: torch.Tensor, ranges: Ranges,
             kinds: Iterable[int] = _ENHANCE) -> torch.Tensor:
    """Pillow's ``ImageEnhance`` operations, a blend ``d + factor (x - d)`` away from (factor
    above 1) or towards a degenerate image ``d``, clipped to 0-255: black for brightness, the
    grey image for colour, the grey image's mean for contrast, the smoothed image for sharpness.
    Only the degenerate images of ``kinds`` (the enhancements among ``op``) are made."""
    factor = (1 + signed * ranges.enhance).to(x.dtype).view(-1, 1, 1, 1)
    o = op.view(-1, 1, 1, 1)
    kinds = set(kinds)
    grey = _luma(x) if kinds & {_OP["color"], _OP["contrast"]} else None
    d = torch.zeros_like(x[:, :1, :1, :1])  # brightness's black
    if _OP["color"] in kinds:
        d = torch.where(o == _OP["color"], grey, d)
    if _OP["contrast"] in kinds:  # Pillow's: a flat image of the mean grey, rounded
        d = torch.where(o == _OP["contrast"], (grey.mean((1, 2, 3), keepdim=True) + 0.5).floor(), d)
    if _OP["sharpness"] in kinds:
        d = torch.where(o == _OP["sharpness"], _smoothed(x), d)
    # cut to whole levels as Pillow's integer cast does (the nudge: float32 can leave an exact
    # whole number a hair below itself)
    blended = (d + factor * (x - d) + 1e-3).floor().clamp(0, 255)
    enhancing = (op >= _OP["brightness"]) & (op <= _OP["sharpness"])
    return torch.where(enhancing.view(-1, 1, 1, 1), blended, x)


def _posterize(q: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` (per image) bits of each whole-number level ``q``."""
    drop = (2.0 ** (8 - bits)).to(q.dtype).view(-1, 1, 1, 1)
    return (q / drop).floor() * drop


def _autocontrast(q: torch.Tensor) -> torch.Tensor:
    """Pillow's ``autocontrast`` without cut-off: each channel stretched so that its darkest
    level becomes 0 and its brightest 255 (levels cut to whole numbers); a flat channel stays."""
    lo, hi = q.amin((2, 3), keepdim=True), q.amax((2, 3), keepdim=True)
    stretched = ((q - lo) * (255 / (hi - lo).clamp_min(1)) + 1e-3).floor().clamp(0, 255)  # nudge: see _enhance
    return torch.where(hi > lo, stretched, q)


def _equalize(q: torch.Tensor) -> torch.Tensor:
    """Pillow's ``equalize``: each channel's levels mapped through its cumulative histogram, in
    Pillow's integer arithmetic (the step is the pixel count less the brightest level's,
    divided by 255); a channel of one level stays."""
    n, c, h, w = q.shape
    levels = q.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=q.device).scatter_add_(1, levels, torch.ones_like(levels))
    top = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)  # the brightest level present
    step = (h * w - hist.gather(1, top)) // 255
    below = hist.cumsum(1) - hist  # pixels darker than each level
    lut = ((below + step // 2) // step.clamp_min(1)).clamp_max(255)
    out = lut.gather(1, levels).to(q.dtype).view(n, c, h, w)
    return torch.where(step.view(n, c, 1, 1) > 0, out, q)


def apply_ops(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, negative: torch.Tensor,
              ranges: Ranges = WIDE) -> torch.Tensor:
    """Apply to each image of ``x`` (float (N, C, H, W) on the 0-255 scale, whole numbers) its
    operation ``op[i]`` (an index into :data:`OPS`) at strength ``level[i]`` (0 to 30) within
    ``ranges``, negated where ``negative[i]`` for the signed operations (shears, translations,
    rotation and the four enhancements). Returns float images of whole numbers on the 0-255
    scale.

    On a GPU every operation runs on the whole batch and each image takes its own result, so
    that nothing waits for the device; on the CPU, where waiting costs nothing, each operation
    runs on the images that drew it only (TrivialAugment's operations ran twice as fast so, in
    batches of 128 on 2 cores). The results are the same either way."""
    if x.ndim != 4:
        raise ValueError(f"apply_ops needs images (N, C, H, W); got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        return _apply(x, op, level, negative, ranges, range(len(OPS)))
    out = x.clone()
    for k in op.unique().tolist():
        if k != _OP["identity"]:
            idx = (op == k).nonzero().squeeze(1)
            out[idx] = _apply(x[idx], op[idx], level[idx], negative[idx], ranges, (k,))
    return out


def _apply(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, negative: torch.Tensor, ranges: Ranges,
           kinds: Iterable[int]) -> torch.Tensor:
    """:func:`apply_ops` by selection: each of the operations ``kinds`` (those among ``op``)
    on every image, each image keeping the result of its own."""
    kinds = set(kinds)
    frac = level.to(torch.float32) / (LEVELS - 1)
    signed = torch.where(negative.bool(), -frac, frac)
    if kinds & _GEOMETRIC:
        x = _geometry(x, op, signed, ranges)
    if kinds & _ENHANCE:
        x = _enhance(x, op, signed, ranges, kinds & _ENHANCE)
    o = op.view(-1, 1, 1, 1)
    if _OP["posterize"] in kinds:
        bits = 8 - (level.to(torch.float32) / ((LEVELS - 1) / (8 - ranges.posterize_bits))).round()
        x = torch.where(o == _OP["posterize"], _posterize(x, bits), x)
    if _OP["solarize"] in kinds:
        # it inverts the levels at or above the threshold; in this order, whole thresholds come out exact
        threshold = (255 * (LEVELS - 1 - level.to(torch.float32)) / (LEVELS - 1)).view(-1, 1, 1, 1)
        x = torch.where((o == _OP["solarize"]) & (x >= threshold), 255 - x, x)
    if _OP["autocontrast"] in kinds:
        x = torch.where(o == _OP["autocontrast"], _autocontrast(x), x)
    if _OP["equalize"] in kinds:
        x = torch.where(o == _OP["equalize"], _equalize(x), x)
    return x


@dataclass
class PolicyAugment:
    """TrivialAugment or RandAugment over a batch (see the module's description). ``ops`` and
    ``magnitude`` are RandAugment's N (operations per image) and M (their level, 0 to 30)."""

    policy: str = "trivialaugment"
    ops: int = 2
    magnitude: int = 9

    def __post_init__(self) -> None:
        if self.policy not in POLICIES[1:]:
            raise ConfigError(f"augment.auto_augment = {self.policy!r} is not valid"
                              f"{did_you_mean(self.policy, POLICIES)}; choose one of {', '.join(POLICIES)}")
        if self.ops < 1:
            raise ConfigError(f"augment.randaugment_ops = {self.ops!r} is not valid; it is the number of operations "
                              "each image gets: 1 or more")
        if not 0 <= self.magnitude < LEVELS:
            raise ConfigError(f"augment.randaugment_magnitude = {self.magnitude!r} is not valid; it is a level from 0 "
                              f"to {LEVELS - 1}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` (uint8, or float on the 0-255 scale, (N, C, H, W)); returns float32 on
        the 0-255 scale. The draws come from ``generator``, which must be on ``x``'s device."""
        x = x.to(torch.float32)
        n, dev = len(x), x.device

        def draw(high: int) -> torch.Tensor:
            return torch.randint(0, high, (n,), generator=generator, device=dev)

        if self.policy == "trivialaugment":
            return apply_ops(x, draw(len(OPS)), draw(LEVELS), draw(2), WIDE)
        level = torch.full((n,), self.magnitude, device=dev)
        for _ in range(self.ops):
            x = apply_ops(x, draw(len(OPS)), level, draw(2), STANDARD)
        return x


def policy_from_config(cfg) -> PolicyAugment | None:
    """The policy an :class:`~cifarlab.config.AugmentConfig` asks for (``auto_augment``), or None;
    :class:`ConfigError` where its values are not valid or it cannot go with the preset."""
    if cfg.auto_augment == "none":
        return None
    policy = PolicyAugment(cfg.auto_augment, cfg.randaugment_ops, cfg.randaugment_magnitude)
    if cfg.preset == "keras":
        raise ConfigError(f"augment.auto_augment = {cfg.auto_augment!r} is not valid with the keras preset, which "
                          "draws its own rotations, shifts and zooms from the 8-bit images that a policy would "
                          "have changed first; use it with the crop-flip or none preset")
    return policy
