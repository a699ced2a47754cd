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

All randomness comes from an explicit ``torch.Generator``, so results are seeded and
reproducible, and resuming a run can restore the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

FILL_MODES = ("nearest", "reflect", "wrap", "constant")
PRESETS = ("none", "keras", "crop-flip")

# The notebook's ImageDataGenerator settings.
KERAS_NOTEBOOK = dict(rotation_range=40.0, width_shift_range=0.2, height_shift_range=0.2, zoom_range=0.2,
                      horizontal_flip=True, fill_mode="nearest")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device, dtype=torch.float64) * (hi - lo) + lo


@dataclass
class KerasAugment:
    """Keras ``ImageDataGenerator`` semantics, batched. Images are float (N, C, H, W).

    Ranges are sampled per image as Keras does: rotation uniform in [-r, r] degrees; shifts
    uniform in [-s, s] times the image size when s < 1, else in pixels; shear in degrees;
    ``zoom_range`` z means [1 - z, 1 + z], with independent x and y zooms; flips with probability
    0.5; ``channel_shift_range`` adds one uniform value to every channel, clipped to the image's
    range; ``brightness_range`` multiplies by a uniform factor. ``rescale`` and the featurewise
    statistics (see :meth:`fit`) are applied after the random transform, as in Keras.

    Differences from Keras, on purpose: brightness is a plain multiplication clipped to [0, 1]
    (Keras round-trips through 8-bit PIL images, which zeroes images already scaled to [0, 1]).
    """

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
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

    def __post_init__(self) -> None:
        def num(name: str, lo: float = 0.0) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise ConfigError(f"augmentation option {name}={v!r} is not valid; expected a number >= {lo}")

        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
                     "channel_shift_range"):
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
        """Draw per-image transform parameters, as Keras' ``get_random_transform`` does."""
        zeros = torch.zeros(n, dtype=torch.float64, device=device)
        p: dict[str, torch.Tensor] = {}
        r = self.rotation_range
        p["theta"] = _uniform(n, -r, r, generator, device) if r else zeros
        hs, ws = self.height_shift_range, self.width_shift_range
        p["tx"] = _uniform(n, -hs, hs, generator, device) * (h if hs < 1 else 1) if hs else zeros
        p["ty"] = _uniform(n, -ws, ws, generator, device) * (w if ws < 1 else 1) if ws else zeros
        s = self.shear_range
        p["shear"] = _uniform(n, -s, s, generator, device) if s else zeros
        lo, hi = self.zoom_range
        if lo == 1 and hi == 1:
            p["zx"] = p["zy"] = zeros + 1
        else:
            p["zx"] = _uniform(n, lo, hi, generator, device)
            p["zy"] = _uniform(n, lo, hi, generator, device)
        coin = lambda: torch.rand(n, generator=generator, device=device) < 0.5  # noqa: E731
        p["flip_h"] = coin() if self.horizontal_flip else torch.zeros(n, dtype=torch.bool, device=device)
        p["flip_v"] = coin() if self.vertical_flip else torch.zeros(n, dtype=torch.bool, device=device)
        c = self.channel_shift_range
        p["channel_shift"] = _uniform(n, -c, c, generator, device) if c else zeros
        if self.brightness_range is not None:
            p["brightness"] = _uniform(n, *self.brightness_range, generator, device)
        return p

    # --- applying -----------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply sampled parameters ``p`` to the batch ``x`` (float N, C, H, W), Keras' order."""
        n, c, h, w = x.shape
        mats = keras_matrices(p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], h, w)
        x = affine_sample(x, mats.to(x.device), self.fill_mode, self.cval)
        if self.channel_shift_range:
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = torch.minimum(torch.maximum(x + p["channel_shift"].to(x.dtype).view(n, 1, 1, 1), lo), hi)
        x = torch.where(p["flip_h"].view(n, 1, 1, 1), x.flip(3), x)
        x = torch.where(p["flip_v"].view(n, 1, 1, 1), x.flip(2), x)
        if "brightness" in p:
            x = (x * p["brightness"].to(x.dtype).view(n, 1, 1, 1)).clamp(0, 1)
        return self.standardize(x)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Randomly transform a batch: :meth:`sample` then :meth:`apply`."""
        n, _, h, w = x.shape
        return self.apply(x, self.sample(n, h, w, generator, x.device))

    def fit(self, x: torch.Tensor) -> "KerasAugment":
        """Compute per-channel mean and std of ``x`` (N, C, H, W) for the featurewise options."""
        x = x.float()
        if self.rescale:
            x = x * self.rescale
        self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.std = x.std(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
        return self

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``rescale`` then featurewise centring and scaling, as Keras' ``standardize``."""
        if self.rescale:
            x = x * self.rescale
        if self.featurewise_center:
            if self.mean is None:
                raise ConfigError("featurewise_center is set but fit(x) was never called; call fit on training images")
            x = x - self.mean.to(x.device, x.dtype)
        if self.featurewise_std_normalization:
            x = x / (self.std.to(x.device, x.dtype) + 1e-6)
        return x


def keras_matrices(theta, tx, ty, shear, zx, zy, h: int, w: int) -> torch.Tensor:
    """Per-image (N, 3, 3) matrices exactly as Keras' ``apply_affine_transform`` builds them.

    Keras composes rotation @ shift @ shear @ zoom, moves the origin to the image centre
    (size / 2 - 0.5), then swaps the two axes because it builds the matrix in (x, y) order but
    hands scipy (row, col) arrays. The result maps output (row, col, 1) to input coordinates,
    which is what scipy's ``affine_transform`` takes.
    """
    th = torch.deg2rad(theta.double())
    sh = torch.deg2rad(shear.double())
    n = th.shape[0]
    one, zero = torch.ones_like(th), torch.zeros_like(th)

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rot = mat([[th.cos(), -th.sin(), zero], [th.sin(), th.cos(), zero], [zero, zero, one]])
    shift = mat([[one, zero, tx.double()], [zero, one, ty.double()], [zero, zero, one]])
    shear_m = mat([[one, -sh.sin(), zero], [zero, sh.cos(), zero], [zero, zero, one]])
    zoom = mat([[zx.double(), zero, zero], [zero, zy.double(), zero], [zero, zero, one]])
    m = rot @ shift @ shear_m @ zoom
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    offset = torch.tensor([[1, 0, ox], [0, 1, oy], [0, 0, 1]], dtype=torch.float64, device=th.device)
    reset = torch.tensor([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]], dtype=torch.float64, device=th.device)
    m = offset.expand(n, 3, 3) @ m @ reset.expand(n, 3, 3)
    return m[:, [1, 0, 2]][:, :, [1, 0, 2]]  # P M P with P swapping the first two axes


def _wrap_coords(c: torch.Tensor, n: int) -> torch.Tensor:
    """scipy's 'wrap' maps a coordinate outside [0, n - 1] back with period n - 1 (the first and
    last samples coincide); neighbours are then taken inside the image."""
    if n == 1:
        return torch.zeros_like(c)
    return torch.where((c >= 0) & (c <= n - 1), c, torch.remainder(c, n - 1))


def _boundary(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer sample positions outside [0, n) inside, as scipy.ndimage's ``mode`` does."""
    if mode == "reflect":  # d c b a | a b c d | d c b a: period 2n, mirrored about -0.5
        i = torch.remainder(i, 2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    return i.clamp(0, n - 1)  # nearest; wrap and constant were handled on the coordinates


def affine_sample(x: torch.Tensor, mats: torch.Tensor, fill_mode: str = "nearest", cval: float = 0.0) -> torch.Tensor:
    """Bilinearly sample ``x`` (N, C, H, W) at ``mats @ (row, col, 1)`` for every output pixel.

    Matches ``scipy.ndimage.affine_transform(channel, mats[i, :2, :2], mats[i, :2, 2], order=1,
    mode=fill_mode, cval=cval)`` per image and channel, in one batched gather.
    """
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev, dtype=torch.float64).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=dev, dtype=torch.float64).view(1, w).expand(h, w)
    grid = torch.stack([rows.reshape(-1), cols.reshape(-1), torch.ones(h * w, device=dev, dtype=torch.float64)])
    src = mats[:, :2, :].to(dev) @ grid  # (N, 2, H*W): input (row, col) per output pixel
    # Coordinates in float64 so that a 45-degree rotation lands on exact integers as in scipy.
    sr, sc = src[:, 0], src[:, 1]
    if fill_mode == "wrap":
        sr, sc = _wrap_coords(sr, h), _wrap_coords(sc, w)
    r0f, c0f = sr.floor(), sc.floor()
    fr, fc = (sr - r0f).to(x.dtype), (sc - c0f).to(x.dtype)
    r0, c0 = r0f.long(), c0f.long()
    flat = x.reshape(n, c, h * w)
    out = 0
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            ri = _boundary(r0 + dr, h, fill_mode)
            ci = _boundary(c0 + dc, w, fill_mode)
            idx = (ri * w + ci).unsqueeze(1).expand(n, c, h * w)
            out = out + flat.gather(2, idx) * (wr * wc).unsqueeze(1)
    if fill_mode == "constant":
        # scipy's 'constant' (not 'grid-constant'): no interpolation with cval; any point
        # outside the input's extent [0, n - 1] takes cval.
        inside = (sr >= 0) & (sr <= h - 1) & (sc >= 0) & (sc <= w - 1)
        out = torch.where(inside.unsqueeze(1), out, torch.as_tensor(cval, dtype=x.dtype, device=dev))
    return out.reshape(n, c, h, w)


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


@dataclass
class CropFlipCutout:
    """Random crop (reflect padding), random flip, optional cutout: the speed recipes' augmentation."""

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch (N, C, H, W)."""
        x = random_crop(x, self.crop_padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        return cutout(x, self.cutout, generator)


def augmenter_from_config(cfg) -> KerasAugment | CropFlipCutout | None:
    """The augmenter an :class:`~cifarlab.config.AugmentConfig` describes (None for 'none').

    The ``keras`` preset starts from the notebook's settings; fields set to non-default values
    in the config refine it.
    """
    if cfg.preset not in PRESETS:
        raise ConfigError(f"augmentation preset '{cfg.preset}' is not valid; choose one of {', '.join(PRESETS)}")
    if cfg.preset == "crop-flip":
        if cfg.crop_padding < 0 or cfg.cutout < 0:
            raise ConfigError(f"crop_padding={cfg.crop_padding} and cutout={cfg.cutout} must be 0 or more")
        return CropFlipCutout(crop_padding=cfg.crop_padding or 4, flip=True, cutout=cfg.cutout)
    keras_fields = dict(rotation_range=cfg.rotation_range, width_shift_range=cfg.width_shift_range,
                        height_shift_range=cfg.height_shift_range, shear_range=cfg.shear_range,
                        zoom_range=cfg.zoom_range, horizontal_flip=cfg.horizontal_flip,
                        vertical_flip=cfg.vertical_flip, fill_mode=cfg.fill_mode, cval=cfg.cval,
                        brightness_range=cfg.brightness_range, channel_shift_range=cfg.channel_shift_range)
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
