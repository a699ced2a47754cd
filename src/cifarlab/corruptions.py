"""Common image corruptions at five severities, for measuring how a model copes with images
worse than its test split: noise, blur, weather and digital artefacts.

Each corruption follows the definition and severity parameters that Hendrycks and Dietterich
(2019, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations") used to
make CIFAR-10-C and CIFAR-100-C, as their generation script for 32x32 images sets them. They are
written here as batched functions of uint8 (N, H, W, C) arrays with a seeded random generator,
so the same seed gives the same corrupted images. The generated images are not the published
CIFAR-10-C files (other random draws, other source images where ``--data`` is not the official
archive), so their accuracies are comparable with each other, not with published CIFAR-10-C
figures; ``cifarlab robustness --corrupted-data`` reads the published files for those.

Eleven of the benchmark's fifteen corruptions are here, and three of its four held-out ones;
motion blur, snow, frost, elastic transform and spatter are not (the first two need ImageMagick,
frost its photographs of frost, the last two OpenCV's warps and edge maps).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, did_you_mean

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """One corruption: its category, and ``apply(x, severity, rng)``, which takes float images
    (N, H, W, C) in [0, 1] and returns them corrupted, in [0, 1]."""

    category: str
    apply: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
    benchmark: bool = True  # one of the benchmark's 15; else one of its held-out 4


def _level(values: tuple, severity: int):
    return values[severity - 1]


def _gaussian_noise(x, s, rng):
    return x + rng.normal(scale=_level((0.04, 0.06, 0.08, 0.09, 0.10), s), size=x.shape)


def _shot_noise(x, s, rng):
    # photon counts: Poisson with this many photons at full intensity
    c = _level((500, 250, 100, 75, 50), s)
    return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng):
    # salt and pepper on each channel value independently, half white, half black
    hit = rng.random(x.shape) < _level((0.01, 0.02, 0.03, 0.05, 0.07), s)
    white = rng.random(x.shape) < 0.5
    return np.where(hit, white.astype(x.dtype), x)


def _speckle_noise(x, s, rng):
    return x + x * rng.normal(scale=_level((0.06, 0.1, 0.12, 0.16, 0.2), s), size=x.shape)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image and channel, edges repeated, kernel cut at 4 sigma."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def _gaussian_blur(x, s, rng):
    return _gaussian(x, _level((0.4, 0.6, 0.7, 0.8, 1.0), s))


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """A defocus kernel: the disk of ``radius`` pixels on a 17x17 grid (larger for radii over
    8), smoothed by a 3x3 Gaussian of sigma ``alias_blur`` (5x5 beyond 8) against aliasing,
    summing to about 1."""
    from scipy.ndimage import correlate1d

    half, taps = (8, 3) if radius <= 8 else (int(np.ceil(radius)), 5)
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(taps) - taps // 2
    g = np.exp(-t ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    for axis in (0, 1):
        disk = correlate1d(disk, g, axis=axis, mode="mirror")
    return disk


def _defocus_blur(x, s, rng):
    from scipy.ndimage import correlate

    k = disk_kernel(*_level(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), s))
    # edges mirrored about the border pixel; the kernel is symmetric, so correlation is convolution
    return correlate(x, k[None, :, :, None], mode="mirror")


def _glass_blur(x, s, rng):
    sigma, delta, iterations = _level(((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), s)
    n, h, w = x.shape[:3]
    y = _to_uint8(_gaussian(x, sigma))
    rows = np.arange(n)
    for _ in range(iterations):
        # Bottom-right to top-left, one position at a time, each pixel takes the value of a
        # neighbour at offsets -delta to delta - 1 (up and to the left for delta 1, positions
        # this pass has not reached yet). The reference meant to swap the two pixels, but its
        # tuple swap of numpy views copies one way only, and the published images were made so.
        # All images step together.
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dy, dx = rng.integers(-delta, delta, size=(2, n))
                y[rows, i, j] = y[rows, i + dy, j + dx]
    return _gaussian(y / 255.0, sigma)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Each image's centre enlarged ``factor`` times and cut back to its size: scipy's
    ``ndimage.zoom`` of order 1 (bilinear, the output's corner pixels on the input's), as the
    reference calls it, computed by torch's bilinear resize with aligned corners, which maps
    pixels the same way and is many times quicker on a batch."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[1:3]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    size = (round(ch * factor), round(cw * factor))  # scipy's output size
    t = torch.from_numpy(np.ascontiguousarray(x[:, top:top + ch, left:left + cw])).permute(0, 3, 1, 2)
    big = F.interpolate(t, size=size, mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    return big[:, top:top + h, left:left + w]


def _zoom_blur(x, s, rng):
    # the image averaged with its centre zoomed by 1, 1.01, ..., up to the severity's last factor
    last = _level((1.06, 1.11, 1.16, 1.21, 1.26), s)
    factors = np.arange(1, last, 0.01)
    out = np.zeros_like(x)
    for f in factors:
        out += _clipped_zoom(x, f)
    return (x + out) / (len(factors) + 1)


def plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` random cloud height maps (size x size, ``size`` a power of two) by the diamond-square
    algorithm, each scaled to [0, 1]: the fog layer."""
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        m[:, half:size:step, half:size:step] = wibbled(square)
        centres = m[:, half:size:step, half:size:step]
        corners = m[:, 0:size:step, 0:size:step]
        m[:, 0:size:step, half:size:step] = wibbled(centres + np.roll(centres, 1, axis=1)
                                                    + corners + np.roll(corners, -1, axis=2))
        m[:, half:size:step, 0:size:step] = wibbled(centres + np.roll(centres, 1, axis=2)
                                                    + corners + np.roll(corners, -1, axis=1))
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _fog(x, s, rng):
    strength, decay = _level(((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), s)
    n, h, w = x.shape[:3]
    size = 1 << max(h, w, 2).bit_length() - 1
    size = size if size >= max(h, w) else size * 2
    brightest = x.max(axis=(1, 2, 3), keepdims=True)
    fogged = x + strength * plasma_fractal(n, size, decay, rng)[:, :h, :w, None]
    return fogged * brightest / (brightest + strength)


def _contrast(x, s, rng):
    mean = x.mean(axis=(1, 2), keepdims=True)  # each image's channel means
    return (x - mean) * _level((0.75, 0.5, 0.4, 0.3, 0.15), s) + mean


def _hsv_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value (max channel), saturation and each channel's place in its hue, so that any pixel is
    value * (1 - saturation * place): a change of value or saturation at the same hue is a change
    of one factor. A grey pixel has hue 0 (red), as in the HSV conversion the reference uses."""
    v = x.max(axis=-1, keepdims=True)
    chroma = v - x.min(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where(v > 0, chroma / v, 0.0)
        place = np.where(chroma > 0, (v - x) / chroma, np.array([0.0, 1.0, 1.0])[:x.shape[-1]])
    return v, sat, place


def _brightness(x, s, rng):
    v, sat, place = _hsv_parts(x)
    return np.clip(v + _level((0.05, 0.1, 0.15, 0.2, 0.3), s), 0, 1) * (1 - sat * place)


def _saturate(x, s, rng):
    scale, shift = _level(((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), s)
    v, sat, place = _hsv_parts(x)
    return v * (1 - np.clip(sat * scale + shift, 0, 1) * place)


def _per_image(x: np.ndarray, change: Callable) -> np.ndarray:
    from PIL import Image

    u8 = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)  # the source images, exactly
    return np.stack([np.asarray(change(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im)))
                     .reshape(im.shape) for im in u8]) / 255.0


def _jpeg(x, s, rng):
    quality = _level((80, 65, 58, 50, 40), s)

    def encode(im):
        from PIL import Image

        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(buf).convert(im.mode)

    return _per_image(x, encode)


def _pixelate(x, s, rng):
    from PIL import Image

    c = _level((0.95, 0.9, 0.85, 0.75, 0.65), s)

    def blocky(im):
        w, h = im.size
        return im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)

    return _per_image(x, blocky)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": Corruption("noise", _gaussian_noise),
    "shot_noise": Corruption("noise", _shot_noise),
    "impulse_noise": Corruption("noise", _impulse_noise),
    "defocus_blur": Corruption("blur", _defocus_blur),
    "glass_blur": Corruption("blur", _glass_blur),
    "zoom_blur": Corruption("blur", _zoom_blur),
    "fog": Corruption("weather", _fog),
    "brightness": Corruption("weather", _brightness),
    "contrast": Corruption("digital", _contrast),
    "pixelate": Corruption("digital", _pixelate),
    "jpeg_compression": Corruption("digital", _jpeg),
    "speckle_noise": Corruption("noise", _speckle_noise, benchmark=False),
    "gaussian_blur": Corruption("blur", _gaussian_blur, benchmark=False),
    "saturate": Corruption("digital", _saturate, benchmark=False),
}

# The published files' names (CIFAR-10-C, CIFAR-100-C), including the corruptions not generated here.
PUBLISHED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
             "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
             "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
PUBLISHED_BENCHMARK = PUBLISHED[:15]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    # truncated, not rounded, as the published files were made (numpy's uint8 of floats)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def check_corruption(name: str, severity: int) -> Corruption:
    """The corruption ``name`` after checking ``severity``; a clear error naming the valid ones."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption '{name}'{did_you_mean(name, CORRUPTIONS)}; valid: "
                          f"{', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r} is not valid; valid: 1 to 5")
    return CORRUPTIONS[name]


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0, chunk: int = 1000) -> np.ndarray:
    """``images`` (uint8, N x H x W x C) with the corruption ``name`` at ``severity`` (1 to 5),
    as uint8. Random corruptions draw from ``seed`` (the same seed, the same images), ``chunk``
    images at a time to bound the memory of the float copies."""
    c = check_corruption(name, severity)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
        shape = getattr(images, "shape", None)
        raise ConfigError(f"images must be a uint8 array (N, H, W, C); got {type(images).__name__} "
                          f"{getattr(images, 'dtype', '')} of shape {shape}")
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].astype(np.float64) / 255.0
        out[start:start + chunk] = _to_uint8(c.apply(x, severity, rng))
    return out
