"""Augmentation as pure, batched tensor functions that run on the batch's device.

Two families:

* :class:`KerasAugment` - Keras' legacy ``ImageDataGenerator`` (keras/src/legacy/preprocessing/
  image.py) with its option names and meanings: each image gets its own random rotation, shift,
  shear, zoom, flips, channel shift and brightness, sampled as Keras samples them, composed into
  the same matrix Keras builds, and applied with order-1 (bilinear) interpolation and scipy's
  boundary modes. Keras does this one image at a time with scipy; here one vectorised pass
  transforms the whole batch.
* :func:`crop_flip_cutout` - the fast augmentations of the speed records (airbench): random crop
  after reflect padding, random or alternating flips, cutout.

And, after either, the mixing of pairs of images within a batch (:func:`draw_mix`,
:func:`mix_batch`): MixUp and CutMix.

All randomness comes from an explicit ``torch.Generator``, so results are seeded and
reproducible, and resuming a run can restore the generator; the mixing's one draw per batch (a
mixing weight, a box) comes from a NumPy generator instead, as torch has no seeded Beta draw, and
stays on the host, so that it costs the device no synchronisation.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import cpu_kernels
from .errors import ConfigError, did_you_mean

FILL_MODES = ("nearest", "reflect", "wrap", "constant")
PRESETS = ("none", "keras", "crop-flip")
# The augment keys each preset reads (the policy and mixing keys apply under all of them): what
# config.unused_settings checks a config against. "none" takes Keras' fields as a refinement;
# augmenter_from_config hands those fields to KerasAugment.
_KERAS_KEYS = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
               "horizontal_flip", "vertical_flip", "fill_mode", "cval", "brightness_range", "channel_shift_range",
               "featurewise_center", "featurewise_std_normalization")
PRESET_KEYS: dict[str, tuple[str, ...]] = {"none": _KERAS_KEYS, "keras": _KERAS_KEYS,
                                           "crop-flip": ("crop_padding", "cutout", "alternating_flip")}

# The notebook's ImageDataGenerator settings.
KERAS_NOTEBOOK = dict(rotation_range=40.0, width_shift_range=0.2, height_shift_range=0.2, zoom_range=0.2,
                      horizontal_flip=True, fill_mode="nearest")
# What each preset sets where the config leaves a field at its default (crop-flip: airbench's
# 4-pixel crop, the speed records' usual padding).
PRESET_SETTINGS: dict[str, dict] = {"none": {}, "keras": KERAS_NOTEBOOK, "crop-flip": {"crop_padding": 4}}


def _shift(r, size: int, u: torch.Tensor | None, u_sign: torch.Tensor | None, zeros: torch.Tensor) -> torch.Tensor:
    """Keras' shift for a ``width_shift_range`` / ``height_shift_range`` of ``r``, from uniform
    [0, 1) draws ``u`` (and ``u_sign``): a float is uniform in [-r, r); an int is a whole number
    of pixels, ``choice(range(r))`` with a random sign (so 2 gives -1, 0 or 1, 0 twice as
    often); a list is one of its elements with a random sign. Fractions of the image ``size``
    when every value is under 1, else pixels."""
    if not r:
        return zeros
    if isinstance(r, float):
        v = u * (2 * r) - r
    else:
        if isinstance(r, int):
            v = (u * r).floor()
        else:  # a lookup by comparisons, not a table tensor: no host-to-device copy on a GPU
            k, v = (u * len(r)).floor(), zeros
            for j, value in enumerate(r):
                v = torch.where(k == j, value, v)
        v = torch.where(u_sign < 0.5, -v, v)
    peak = r if isinstance(r, (int, float)) else max(r)
    return v * size if peak < 1 else v


@dataclass
class KerasAugment:
    """Keras ``ImageDataGenerator`` semantics, batched. Images are float (N, C, H, W).

    Ranges are sampled per image as Keras does: rotation uniform in [-r, r] degrees; shifts
    (Keras' three forms) a float s uniform in [-s, s], an int s a whole number of pixels in
    (-s, s), a list one of its values with a random sign, each times the image size when under
    1, else in pixels; shear in degrees;
    ``zoom_range`` z means [1 - z, 1 + z], with independent x and y zooms; flips with probability
    0.5; ``channel_shift_range`` adds one uniform value to every channel, clipped to the image's
    range; ``brightness_range`` multiplies by a uniform factor. ``rescale`` and the featurewise
    statistics (see :meth:`fit`) are applied after the random transform, as in Keras.

    Differences from Keras, on purpose: brightness is a plain multiplication clipped to [0, 1]
    (Keras round-trips through 8-bit PIL images, which zeroes images already scaled to [0, 1]).
    """

    rotation_range: float = 0.0
    width_shift_range: float | int | tuple[float, ...] = 0.0
    height_shift_range: float | int | tuple[float, ...] = 0.0
    shear_range: float = 0.0
    zoom_range: float | list[float] | tuple[float, float] = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"
    cval: float = 0.0
    brightness_range: tuple[float, float] | list[float] | None = None
    channel_shift_range: float = 0.0
    featurewise_center: bool = False
    featurewise_std_normalization: bool = False
    rescale: float | None = None
    mean: torch.Tensor | None = field(default=None, repr=False)
    std: torch.Tensor | None = field(default=None, repr=False)
    # Not Keras options. cpu_kernel: on the CPU, run the transform with cifarlab's own kernel
    # (cpu_kernels.affine_warp) where it loads: the fastest path there, with no compilation wait.
    # compiled: elsewhere (a GPU), run it as one torch.compile'd kernel (see fused_transform).
    cpu_kernel: bool = True
    compiled: bool = False

    def __post_init__(self) -> None:
        def num(name: str, lo: float = 0.0) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise ConfigError(f"augmentation option {name}={v!r} is not valid; expected a number >= {lo}")

        for name in ("rotation_range", "shear_range", "channel_shift_range"):
            num(name)
        for name in ("width_shift_range", "height_shift_range"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if not v or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
                                    for e in v):
                    raise ConfigError(f"augmentation option {name}={v!r} is not valid; a list must hold numbers "
                                      "(a random one is drawn, with a random sign)")
                setattr(self, name, tuple(float(e) for e in v))
            else:
                num(name)
        if self.fill_mode not in FILL_MODES:
            raise ConfigError(f"augmentation option fill_mode={self.fill_mode!r} is not valid; "
                              f"choose one of {', '.join(FILL_MODES)}")
        z = self.zoom_range
        if isinstance(z, (int, float)) and not isinstance(z, bool):
            if not 0 <= z < 1:
                raise ConfigError(f"augmentation option zoom_range={z!r} is not valid; a single number must lie "
                                  "in [0, 1) (it means [1 - z, 1 + z]), or give [lower, upper]")
            self.zoom_range = (1.0 - z, 1.0 + z)
        elif isinstance(z, (list, tuple)) and len(z) == 2 and all(isinstance(v, (int, float)) for v in z) \
                and 0 < z[0] <= z[1]:
            self.zoom_range = (float(z[0]), float(z[1]))
        else:
            raise ConfigError(f"augmentation option zoom_range={z!r} is not valid; expected a float in [0, 1) "
                              "or [lower, upper] with 0 < lower <= upper")
        b = self.brightness_range
        if b is not None:
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and 0 <= b[0] <= b[1]):
                raise ConfigError(f"augmentation option brightness_range={b!r} is not valid; expected "
                                  "[lower, upper] with 0 <= lower <= upper")
            self.brightness_range = (float(b[0]), float(b[1]))
        if self.featurewise_std_normalization:
            self.featurewise_center = True  # as Keras: std normalisation implies centring

    # --- sampling -----------------------------------------------------------------------------
    def sample(self, n: int, h: int, w: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Draw per-image transform parameters, as Keras' ``get_random_transform`` does.

        Rotation, shear, zooms (x and y independently), channel shift and brightness are uniform
        over their ranges; flips have probability 0.5; shifts follow :func:`_shift`. Parameters
        an option leaves off are constants (0, or 1 for zooms).
        """
        return self.params_from_uniform(self._draw(n, generator, device), h, w)

    def _drawn(self) -> list[str]:
        """The parameters this augmenter draws at random, in the order of :meth:`_draw`'s rows."""
        hs, ws, (zlo, zhi) = self.height_shift_range, self.width_shift_range, self.zoom_range
        wanted = {"theta": self.rotation_range, "tx": hs, "tx_sign": hs and not isinstance(hs, float),
                  "ty": ws, "ty_sign": ws and not isinstance(ws, float), "shear": self.shear_range,
                  "zx": not zlo == zhi == 1, "zy": not zlo == zhi == 1, "flip_h": self.horizontal_flip,
                  "flip_v": self.vertical_flip, "channel_shift": self.channel_shift_range,
                  "brightness": self.brightness_range is not None}
        return [k for k, v in wanted.items() if v]

    def _draw(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
        # One draw of [0, 1) numbers for all parameters: per-call overhead, not arithmetic, is
        # what costs on small batches.
        return torch.rand(len(self._drawn()), n, generator=generator, device=device, dtype=torch.float64)

    def params_from_uniform(self, draws: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
        """The parameters :meth:`sample` makes of its uniform [0, 1) ``draws`` (one row per drawn
        parameter, one column per image) for ``h`` x ``w`` images: arithmetic only, so the
        compiled path runs it inside its kernel."""
        hs, ws, (zlo, zhi) = self.height_shift_range, self.width_shift_range, self.zoom_range
        zeros = draws.new_zeros(draws.shape[1])
        u = dict(zip(self._drawn(), draws))

        def uniform(name: str, lo: float, hi: float) -> torch.Tensor:
            return u[name] * (hi - lo) + lo if name in u else zeros

        p = {"theta": uniform("theta", -self.rotation_range, self.rotation_range),
             "tx": _shift(hs, h, u.get("tx"), u.get("tx_sign"), zeros),
             "ty": _shift(ws, w, u.get("ty"), u.get("ty_sign"), zeros),
             "shear": uniform("shear", -self.shear_range, self.shear_range),
             "zx": uniform("zx", zlo, zhi) if "zx" in u else zeros + 1,
             "zy": uniform("zy", zlo, zhi) if "zy" in u else zeros + 1,
             "channel_shift": uniform("channel_shift", -self.channel_shift_range, self.channel_shift_range)}
        for name in ("flip_h", "flip_v"):
            p[name] = u[name] < 0.5 if name in u else zeros.bool()
        if self.brightness_range is not None:
            p["brightness"] = uniform("brightness", *self.brightness_range)
        return p

    # --- applying -----------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor], input_scale: float = 1.0) -> torch.Tensor:
        """Apply sampled parameters ``p`` to the batch ``x`` (N, C, H, W), Keras' order.

        The result is that of augmenting ``x.float() * input_scale``; passing the uint8 images
        with ``input_scale=1/255`` lets the CPU kernel and the compiled path read bytes directly.
        Returns float32.
        """
        n = x.shape[0]
        kernel = self._use_cpu_kernel(x)
        # Rescaling is linear, so it can ride along inside the sampling kernel unless a
        # clipping step (channel shift, brightness) comes between them, as in Keras' order.
        fold = (kernel or self.compiled) and not self.channel_shift_range and "brightness" not in p
        out_scale = float(self.rescale) if (fold and self.rescale) else 1.0
        if kernel or not self.compiled:
            # Keras flips after the affine transform and the channel shift; flips commute with the
            # (per-image constant) shift and are folded into the sampling coordinates.
            mats = keras_matrices(p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], *x.shape[2:],
                                  flip_h=p["flip_h"], flip_v=p["flip_v"])
        if kernel:
            x = cpu_kernels.affine_warp(x, mats, self.fill_mode, float(self.cval), float(input_scale), out_scale)
        elif self.compiled:
            x = fused_transform(x, p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], p["flip_h"],
                                p["flip_v"], self.fill_mode, float(self.cval), float(input_scale), out_scale,
                                compiled=True)
        else:
            x = x.float() if input_scale == 1 else x.float() * input_scale
            x = affine_sample(x, mats, self.fill_mode, self.cval)
        if self.channel_shift_range:
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = torch.minimum(torch.maximum(x + p["channel_shift"].to(x.dtype).view(n, 1, 1, 1), lo), hi)
        if "brightness" in p:
            x = (x * p["brightness"].to(x.dtype).view(n, 1, 1, 1)).clamp(0, 1)
        return self.standardize(x, rescaled=fold)

    def _use_cpu_kernel(self, x: torch.Tensor) -> bool:
        return self.cpu_kernel and cpu_kernels.warp_takes(x) and cpu_kernels.load() is not None

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 input_scale: float = 1.0) -> torch.Tensor:
        """Randomly transform a batch: :meth:`sample` then :meth:`apply`, or on the compiled path
        both in one kernel (the same draws, so the same result)."""
        n, _, h, w = x.shape
        if self.compiled and not self._use_cpu_kernel(x) and not self.channel_shift_range \
                and self.brightness_range is None:
            # The draws stay outside the compiled code (it cannot take a generator); turning
            # them into parameters was a dozen tiny kernels per batch, which on a GPU cost more
            # than the warp itself, and now runs inside the warp's kernel.
            words = _word_view(x)
            src = x if words is None else words
            out = _compiled_warp(self._settings())(self._draw(n, generator, x.device), src, words is not None,
                                                   float(input_scale), float(self.rescale or 1.0))
            return self.standardize(out, rescaled=True)
        return self.apply(x, self.sample(n, h, w, generator, x.device), input_scale)

    def _settings(self) -> tuple:
        """The options that decide the random transform, hashable: augmenters with equal
        settings share one compiled kernel."""
        keep = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
                "horizontal_flip", "vertical_flip", "fill_mode", "cval")
        return tuple((k, getattr(self, k)) for k in keep)

    def _warp_from_uniform(self, draws: torch.Tensor, src: torch.Tensor, words: bool, in_scale: float,
                           out_scale: float) -> torch.Tensor:
        """Parameters from the draws, then :func:`_sample_gather`: the compiled path's body."""
        h, w = src.shape[2], src.shape[3] * (4 if words else 1)
        p = self.params_from_uniform(draws, h, w)
        return _sample_gather(src, p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], p["flip_h"],
                              p["flip_v"], self.fill_mode, float(self.cval), in_scale, out_scale, words)[0]

    def fit(self, x: torch.Tensor) -> "KerasAugment":
        """Compute per-channel mean and std of ``x`` (N, C, H, W) for the featurewise options."""
        x = x.float()
        if self.rescale:
            x = x * self.rescale
        self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.std = x.std(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
        return self

    def standardize(self, x: torch.Tensor, rescaled: bool = False) -> torch.Tensor:
        """``rescale`` (unless ``rescaled``) then featurewise centring and scaling, as Keras' ``standardize``."""
        if self.rescale and not rescaled:
            x = x * self.rescale
        if self.featurewise_center:
            if self.mean is None:
                raise ConfigError("featurewise_center is set but fit(x) was never called; call fit on training images")
            x = x - self.mean.to(x.device, x.dtype)
        if self.featurewise_std_normalization:
            x = x / (self.std.to(x.device, x.dtype) + 1e-6)
        return x


def keras_matrices(theta, tx, ty, shear, zx, zy, h: int, w: int, flip_h: torch.Tensor | None = None,
                   flip_v: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image (N, 3, 3) matrices exactly as Keras' ``apply_affine_transform`` builds them.

    Keras composes rotation @ shift @ shear @ zoom, moves the origin to the image centre
    (size / 2 - 0.5), then swaps the two axes because it builds the matrix in (x, y) order but
    hands scipy (row, col) arrays. The result maps output (row, col, 1) to input coordinates,
    which is what scipy's ``affine_transform`` takes. With ``flip_h`` / ``flip_v`` (bool, per
    image) the matrix also flips the output, as Keras does after the transform: flipping the
    output is sampling at mirrored output coordinates, so the flip is composed on the right.
    Computed in closed form, elementwise, in float64 (a chain of tiny 3x3 matmuls cost more
    than the sampling itself).
    """
    th, sh = torch.deg2rad(theta.double()), torch.deg2rad(shear.double())
    tx, ty, zx, zy = tx.double(), ty.double(), zx.double(), zy.double()
    c, s = th.cos(), th.sin()
    # R @ T: rotation then shift; @ S @ Z: shear [[1, -sin, 0], [0, cos, 0]] and zoom diag(zx, zy).
    a00, a01 = c * zx, (-c * sh.sin() - s * sh.cos()) * zy
    a10, a11 = s * zx, (-s * sh.sin() + c * sh.cos()) * zy
    b0, b1 = c * tx - s * ty, s * tx + c * ty
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    # offset @ M @ reset adds (I - A) @ centre to the translation.
    b0 = b0 + ox - a00 * ox - a01 * oy
    b1 = b1 + oy - a10 * ox - a11 * oy
    # The axis swap P M P: rows and columns 0 and 1 exchanged.
    rows = [[a11, a10, b1], [a01, a00, b0]]
    if flip_h is not None or flip_v is not None:
        # M @ F, F = [[1 - 2 fv, 0, fv (h - 1)], [0, 1 - 2 fh, fh (w - 1)], [0, 0, 1]]: output to pre-flip pixels
        fv = flip_v.double() if flip_v is not None else torch.zeros_like(th)
        fh = flip_h.double() if flip_h is not None else torch.zeros_like(th)
        rows = [[m0 * (1 - 2 * fv), m1 * (1 - 2 * fh), m2 + m0 * (fv * (h - 1)) + m1 * (fh * (w - 1))]
                for m0, m1, m2 in rows]
    one, zero = torch.ones_like(th), torch.zeros_like(th)
    return torch.stack([torch.stack(rows[0], -1), torch.stack(rows[1], -1), torch.stack([zero, zero, one], -1)], -2)


def _mm3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of (..., 3, 3) matrices by broadcasting: batched 3x3 matmuls are dominated by
    per-matrix call overhead on CPU; 27 elementwise products per pair are not."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _wrap_coords(c: torch.Tensor, n: int) -> torch.Tensor:
    """scipy's 'wrap' maps a coordinate outside [0, n - 1] back with period n - 1 (the first and
    last samples coincide); neighbours are then taken inside the image."""
    if n == 1:
        return torch.zeros_like(c)
    return torch.where((c >= 0) & (c <= n - 1), c, torch.remainder(c, n - 1))


def affine_sample(x: torch.Tensor, mats: torch.Tensor, fill_mode: str = "nearest", cval: float = 0.0,
                  mode: str = "bilinear") -> torch.Tensor:
    """Bilinearly sample ``x`` (N, C, H, W) at ``mats @ (row, col, 1)`` for every output pixel
    (or, with ``mode`` 'nearest', take the nearest pixel).

    Matches ``scipy.ndimage.affine_transform(channel, mats[i, :2, :2], mats[i, :2, 2], order=1,
    mode=fill_mode, cval=cval)`` per image and channel. One ``grid_sample`` call does the
    interpolation for the whole batch (a fused kernel on CPU and GPU); the boundary modes map to
    it as follows: scipy 'nearest' is grid_sample's 'border' (edge values, clamped coordinates),
    scipy 'reflect' (mirrored about -0.5) is 'reflection' with align_corners=False, scipy 'wrap'
    is a coordinate remap then 'border', and scipy 'constant' is 'border' with every point
    outside [0, n - 1] set to ``cval`` (scipy does not blend with ``cval`` there).
    """
    n, c, h, w = x.shape
    dev = x.device
    m = mats.to(dev, torch.float64)
    # Re-express the pixel-space (row, col) map in grid_sample's normalised (x, y) = (col, row)
    # space, where -1 and 1 are the outer pixel edges: theta = E_in @ P @ M @ P @ D_out. The
    # 3x3 algebra stays in float64; only the per-pixel grid is float32 (errors ~1e-6 pixel).
    d_out = torch.tensor([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64, device=dev)
    e_in = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64, device=dev)
    swap = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64, device=dev)
    theta = _mm3(_mm3(e_in @ swap, m), swap @ d_out).to(x.dtype)
    # The grid by broadcasting (two multiply-adds per pixel): affine_grid's batched matmul was
    # three times slower than the sampling itself on CPU.
    ux = ((2 * torch.arange(w, device=dev, dtype=x.dtype) + 1) / w - 1).view(1, 1, w)
    uy = ((2 * torch.arange(h, device=dev, dtype=x.dtype) + 1) / h - 1).view(1, h, 1)
    t = theta.view(n, 9, 1, 1)
    grid = torch.empty(n, h, w, 2, device=dev, dtype=x.dtype)
    torch.add(t[:, 0] * ux + t[:, 2], t[:, 1] * uy, out=grid[..., 0])
    torch.add(t[:, 3] * ux + t[:, 5], t[:, 4] * uy, out=grid[..., 1])
    if fill_mode in ("wrap", "constant"):
        sc = ((grid[..., 0] + 1) * w - 1) / 2  # back to pixel coordinates
        sr = ((grid[..., 1] + 1) * h - 1) / 2
        if fill_mode == "wrap":
            sr, sc = _wrap_coords(sr, h), _wrap_coords(sc, w)
            grid = torch.stack([(2 * sc + 1) / w - 1, (2 * sr + 1) / h - 1], dim=-1)
    pad = "reflection" if fill_mode == "reflect" else "border"
    out = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode=pad, align_corners=False)
    if fill_mode == "constant":
        # float32 grid: a point scipy puts exactly on the edge may land a hair outside; the
        # nearest pixel is inside for any point within half a pixel of the image
        eps = 0.5 if mode == "nearest" else 1e-4
        inside = (sr >= -eps) & (sr <= h - 1 + eps) & (sc >= -eps) & (sc <= w - 1 + eps)
        out = torch.where(inside.unsqueeze(1), out, torch.as_tensor(cval, dtype=x.dtype, device=dev))
    return out


def _reflect_coords(c: torch.Tensor, n: int) -> torch.Tensor:
    """scipy's 'reflect' mirrors about the outer pixel edges (-0.5 and n - 0.5), period 2n; a
    point left within half a pixel of the edge then reads the edge pixel, which clamping gives."""
    c = torch.remainder(c + 0.5, 2 * n)
    return torch.where(c >= n, 2 * n - c, c) - 0.5


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C <= 4 to int32 (N, H, W): channel k in bits 8k to 8k + 7."""
    n, c, h, w = x.shape
    if x.dtype != torch.uint8 or not 1 <= c <= 4:
        raise ValueError(f"pack_pixels needs uint8 images with 1 to 4 channels; got {x.dtype}, {c} channels")
    # Shifts and ors on whole planes: about twice as fast on the CPU as a channels-last copy.
    out = x[:, 0].to(torch.int32)
    for k in range(1, c):
        out = out | (x[:, k].to(torch.int32) << (8 * k))
    return out


def pack_words(words: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images with C <= 4, viewed as int32 words (N, C, H, W / 4), to packed
    pixels (N, H * W) int32 in byte-plane order: pixel (r, 4j + b) at ``b * (H * W / 4) + r * W / 4 + j``.

    The same packing as :func:`pack_pixels`, but every load is a whole 32-bit word: the
    compiler's CPU kernels read single bytes eight at a time through a stack buffer, which made
    packing a quarter of the compiled transform's time. Bytes are taken little-endian.
    """
    n, c, h, w4 = words.shape
    planes = []
    for b in range(4):
        v = (words[:, 0] >> (8 * b)) & 255
        for k in range(1, c):
            v = v | (((words[:, k] >> (8 * b)) & 255) << (8 * k))
        planes.append(v.reshape(n, h * w4))
    return torch.cat(planes, 1)


def _word_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (uint8 NCHW) reinterpreted as float32 words (N, C, H, W / 4), or None where it
    cannot be: float32 rather than int32 because the compiler loads whole float vectors
    directly but copies int32 vectors through a stack buffer; only bits move, never values."""
    n, c, h, w = x.shape
    ok = (x.dtype == torch.uint8 and 1 <= c <= 4 and w % 4 == 0 and x.is_contiguous()
          and x.storage_offset() % 4 == 0 and sys.byteorder == "little")
    return x.view(torch.float32) if ok else None


def fused_transform(x: torch.Tensor, theta: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                    shear: torch.Tensor, zx: torch.Tensor, zy: torch.Tensor, flip_h: torch.Tensor,
                    flip_v: torch.Tensor, fill_mode: str = "nearest", cval: float = 0.0,
                    in_scale: float = 1.0, out_scale: float = 1.0, compiled: bool = False) -> torch.Tensor:
    """Keras' affine transform and flips for a batch, as plain gathers and arithmetic.

    Returns float32 ``out_scale * T(x * in_scale)`` where T is what :meth:`KerasAugment.apply`
    does with these parameters (``cval`` is in the units of ``x * in_scale``). Eagerly this is
    slower than :func:`affine_sample`; it is written for ``torch.compile`` (``compiled=True``),
    which fuses everything (matrices, coordinates, boundary mode, the four-neighbour gather,
    the uint8 to float conversion, both scales) into one kernel that writes each image once.
    uint8 images are first packed to one int32 per pixel, so each neighbour is one load.
    """
    fn = _compiled_sampler() if compiled else _sample_gather
    words = _word_view(x)
    src = x if words is None else words
    return fn(src, theta, tx, ty, shear, zx, zy, flip_h, flip_v, fill_mode, cval, in_scale, out_scale,
              words is not None)[0]


def _sample_gather(x: torch.Tensor, theta, tx, ty, shear, zx, zy, flip_h, flip_v, fill_mode: str,
                   cval: float, in_scale: float, out_scale: float, words: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of :func:`fused_transform`; ``words`` says ``x`` is :func:`_word_view`'s view of
    uint8 images. Also returns the gathered-from source (the packed pixels for uint8 images):
    as an output, the compiler stores it once instead of recomputing the packing inside each
    of the four gathers."""
    if words:
        wd = x.view(torch.int32)
        n, c, h, w = wd.shape[0], wd.shape[1], wd.shape[2], 4 * wd.shape[3]
        src = pack_words(wd)
    else:
        n, c, h, w = x.shape
        src = pack_pixels(x).view(n, h * w) if x.dtype == torch.uint8 and c <= 4 else x
    dev = x.device
    m = keras_matrices(theta, tx, ty, shear, zx, zy, h, w).to(torch.float32).view(n, 9, 1)
    # Pixels flattened to one axis from the start: every tensor below then has the same
    # (N, H * W) shape as the gathers, and the compiler fuses all of it into one loop.
    pix = torch.arange(h * w, device=dev)
    rows = (pix // w).to(torch.float32).view(1, h * w)
    cols = (pix % w).to(torch.float32).view(1, h * w)
    # Keras flips the output last: read the transform at mirrored output coordinates.
    r = torch.where(flip_v.view(n, 1), (h - 1) - rows, rows)
    q = torch.where(flip_h.view(n, 1), (w - 1) - cols, cols)
    sr = m[:, 0] * r + m[:, 1] * q + m[:, 2]
    sc = m[:, 3] * r + m[:, 4] * q + m[:, 5]
    inside = None
    if fill_mode == "constant":
        eps = 1e-4  # as in affine_sample: float32 coordinates may land a hair outside the edge
        inside = (sr >= -eps) & (sr <= h - 1 + eps) & (sc >= -eps) & (sc <= w - 1 + eps)
    elif fill_mode == "reflect":
        sr, sc = _reflect_coords(sr, h), _reflect_coords(sc, w)
    elif fill_mode == "wrap":
        sr, sc = _wrap_coords(sr, h), _wrap_coords(sc, w)
    # scipy 'nearest' (and every mode once remapped) reads edge pixels beyond the edge.
    sr, sc = sr.clamp(0, h - 1), sc.clamp(0, w - 1)
    r0f, c0f = sr.floor(), sc.floor()
    fr, fc = sr - r0f, sc - c0f
    # Flat neighbour indices in float32 (exact for any image under 2**24 pixels), converted
    # once each: 64-bit integer vector arithmetic costs twice as much on the CPU.
    r1f, c1f = (r0f + 1).clamp(max=h - 1), (c0f + 1).clamp(max=w - 1)
    if words:  # byte-plane order, see pack_words
        def col(cf):
            j = (cf * 0.25).floor()
            return (cf - 4 * j) * (h * w // 4) + j
        row_step = w // 4
    else:
        def col(cf):
            return cf
        row_step = w
    cols0, cols1 = col(c0f), col(c1f)
    idx = [(a * row_step + b).long() for a, b in ((r0f, cols0), (r0f, cols1), (r1f, cols0), (r1f, cols1))]
    if src.dim() == 2:
        corners = [torch.gather(src, 1, i) for i in idx]
        planes = [[((v >> (8 * k)) & 255).to(torch.float32) for v in corners] for k in range(c)]
    else:
        flat = src.reshape(n, c, h * w)
        planes = [[torch.gather(flat[:, k], 1, i).to(torch.float32) for i in idx] for k in range(c)]
    out = []
    # One output plane per channel, computed from the same coordinates: the compiler then
    # emits a single loop over pixels instead of recomputing the coordinates per channel.
    for v00, v01, v10, v11 in planes:
        # Interpolation as a + f * (b - a): two operations per blend instead of three.
        top = v00 + fc * (v01 - v00)
        val = (top + fr * ((v10 + fc * (v11 - v10)) - top)) * in_scale
        if inside is not None:
            val = torch.where(inside, val, cval)
        out.append(val * out_scale if out_scale != 1 else val)
    return torch.stack(out, 1).view(n, c, h, w), src


@functools.cache
def _compiled_sampler():
    """:func:`_sample_gather` through ``torch.compile``, built on first use (about 10 s on a
    2-core CPU; again for each new batch size or fill mode; cached on disk across processes)."""
    # Every index is clamped into the image before the gather, so the compiler's per-load
    # bounds check can never fire; dropping it makes the kernel markedly faster.
    return torch.compile(_sample_gather, dynamic=False, options={"assert_indirect_indexing": False})


@functools.cache
def _compiled_warp(settings: tuple):
    """:meth:`KerasAugment._warp_from_uniform` through ``torch.compile``, one per setting (so a
    new augmenter with the same options, as each run of ``--runs`` makes, compiles nothing)."""
    aug = KerasAugment(**dict(settings), cpu_kernel=False)
    # Indices are clamped into the image before every gather: see _compiled_sampler.
    return torch.compile(aug._warp_from_uniform, dynamic=False, options={"assert_indirect_indexing": False})


# --- airbench-style fast augmentations --------------------------------------------------------
def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``pad``-pixel translations: reflect-pad, then crop back to size at a random offset."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 0.5."""
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def alternating_flip(x: torch.Tensor, indices: torch.Tensor, epoch: int, seed: int = 0) -> torch.Tensor:
    """airbench's alternating flip: a fixed random half of the images is flipped on even
    epochs and the other half on odd ones, so every image is seen both ways every two epochs
    (less redundancy than independent coin flips). ``indices`` are the images' dataset indices."""
    # A cheap integer hash of (index, seed) picks each image's half, identically on any device.
    h = (indices.long() * 2654435761 + seed * 40503) % 4294967296
    flip = ((h >> 16) + epoch) % 2 == 1
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one random ``size`` x ``size`` square per image (centre anywhere in the image)."""
    if size <= 0:
        return x
    n, c, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=x.device)
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device).view(1, h, 1)
    col = torch.arange(w, device=x.device).view(1, 1, w)
    m = (r >= top) & (r < top + size) & (col >= left) & (col < left + size)
    return x * (~m).unsqueeze(1).to(x.dtype)


def draw_mix(rng: np.random.Generator, mixup: float, cutmix: float,
             size: tuple[int, int]) -> tuple[float, tuple[int, int, int, int] | None]:
    """One batch's mixing draw: ``(lam, box)``, the weight of each image's own label and, for
    CutMix, the box (top, bottom, left, right) of an image of ``size`` (H, W) that its partner
    fills; ``(1.0, None)`` where both are off.

    ``mixup`` and ``cutmix`` are the alphas of their Beta(alpha, alpha) draws of ``lam``
    (0: off; MixUp, Zhang et al., 2018; CutMix, Yun et al., 2019). With both set, each batch
    takes one of the two with equal chance, as timm's ``Mixup`` does by default. CutMix's box
    has sides of sqrt(1 - lam) times the image's, centred anywhere in it and cut off at its
    edges, and ``lam`` becomes the share of the image left outside the box, so that the labels
    weigh as much as the pixels."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0:
        return 1.0, None
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return lam, None
    h, w = size
    cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy - cut_h // 2 + cut_h, h)
    left, right = max(cx - cut_w // 2, 0), min(cx - cut_w // 2 + cut_w, w)
    return 1 - (bottom - top) * (right - left) / (h * w), (top, bottom, left, right)


def mix_batch(x: torch.Tensor, y: torch.Tensor, lam: float,
              box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image of the batch ``x`` (N, C, H, W) with its partner, the image at the same
    place in the batch reversed (the batch is in random order already, so this pairs at random
    without a permutation, as timm does): MixUp's ``lam * x + (1 - lam) * partner`` where
    ``box`` is None, else CutMix's image with the partner's pixels in ``box`` (:func:`draw_mix`).
    Returns the mixed images and the partners' labels; the loss weighs ``y`` by ``lam`` and the
    partners' labels by ``1 - lam``."""
    partner = x.flip(0)
    if box is None:
        mixed = x * lam + partner * (1 - lam)
    else:
        top, bottom, left, right = box
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return mixed, y.flip(0)


@dataclass
class CropFlipCutout:
    """Random crop (reflect padding), random flip, optional cutout: the speed recipes' augmentation."""

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    alternating: bool = False  # needs the images' dataset indices and the epoch

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 indices: torch.Tensor | None = None, epoch: int = 0, seed: int = 0) -> torch.Tensor:
        """Augment a float batch (N, C, H, W)."""
        x = random_crop(x, self.crop_padding, generator)
        if self.flip and self.alternating and indices is not None:
            x = alternating_flip(x, indices, epoch, seed)
        elif self.flip:
            x = random_flip(x, generator)
        return cutout(x, self.cutout, generator)


def augmenter_from_config(cfg) -> KerasAugment | CropFlipCutout | None:
    """The augmenter an :class:`~cifarlab.config.AugmentConfig` describes (None for 'none').

    The ``keras`` preset starts from the notebook's settings; fields set to non-default values
    in the config refine it (a field at its default keeps the preset's value: a config resolved
    by :func:`cifarlab.config.resolve_config` holds the preset's values themselves, and refuses a
    field given at its default where the preset's differs).
    """
    if cfg.preset not in PRESETS:
        raise ConfigError(f"augmentation preset '{cfg.preset}' is not valid{did_you_mean(cfg.preset, PRESETS)}; "
                          f"choose one of {', '.join(PRESETS)}")
    if cfg.preset == "crop-flip":
        if cfg.crop_padding < 0 or cfg.cutout < 0:
            raise ConfigError(f"crop_padding={cfg.crop_padding} and cutout={cfg.cutout} must be 0 or more")
        return CropFlipCutout(crop_padding=cfg.crop_padding or PRESET_SETTINGS["crop-flip"]["crop_padding"],
                              flip=True, cutout=cfg.cutout, alternating=cfg.alternating_flip)
    keras_fields = {k: getattr(cfg, k) for k in _KERAS_KEYS}  # the fields KerasAugment takes from the config
    if cfg.preset == "keras":
        defaults = KerasAugment.__dataclass_fields__
        merged = dict(KERAS_NOTEBOOK)
        for k, v in keras_fields.items():
            if v != defaults[k].default:
                merged[k] = v
        return KerasAugment(**merged)
    aug = KerasAugment(**keras_fields)  # validates even when unused
    identity = all(v == KerasAugment.__dataclass_fields__[k].default for k, v in keras_fields.items())
    return None if identity else aug
