"""Decoding image files into uint8 arrays, the one conversion used for training and prediction."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
# A small-image classifier never needs more than this many pixels in one file; larger files are
# refused before their pixels are decoded, so a decompression bomb costs nothing.
MAX_PIXELS = 8192 * 8192
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image_name(name: str) -> bool:
    """True when a file name has a common image suffix."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_visible_image(path: str) -> bool:
    """True for an image file (by suffix) of a /-separated path with no hidden part: neither it
    nor a folder above it starts with a dot (.DS_Store, .git/, a zip's ._ copies)."""
    return is_image_name(path) and not any(p.startswith(".") for p in path.split("/"))


def open_image(data: bytes, what: str) -> Image.Image:
    """Open and fully decode image bytes, refusing non-images, truncated files and bombs, and turn
    the image upright as its EXIF Orientation tag says (as image viewers show it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{what}: {w}x{h} pixels is larger than the {MAX_PIXELS:,}-pixel limit "
                                "(a decompression bomb or a photo far too large for this tool); skipped")
            im.load()
            im = _upright(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{what}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise DataError(f"{what}: not an image file (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what}: corrupt or truncated image ({e})") from None
    return im


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says. Cameras store portrait photos sideways with
    that tag, which viewers honour; without it, a phone photo would be classified lying on its
    side. A tag that cannot be read leaves the image as decoded, as viewers do."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data": the fallback below covers it
            return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block can fail in many ways; the pixels are fine
        return im


def is_gray(im: Image.Image) -> bool:
    """True for single-channel modes (including 16-bit and float)."""
    return im.mode in _GRAY_MODES


def to_array(im: Image.Image, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Convert any Pillow image to uint8 (H, W, channels), resized to ``size`` (H, W) if given.

    16-bit and 32-bit grayscale are scaled to 8 bits (not clipped); alpha is composited on
    black, as dropping it would; palettes are expanded.
    """
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 255.0 if im.mode == "F" and a.max(initial=0) <= 255 else 65535.0
        im = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    if channels == 1:
        im = im.convert("L")
    else:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        im = im.convert("RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
