"""The corruptions of ``cifarlab robustness``: each against its definition, on small batches."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from scipy.ndimage import zoom

from cifarlab.corruptions import CORRUPTIONS, PUBLISHED, SEVERITIES, _brightness, _clipped_zoom, _saturate, \
    corrupt, disk_kernel, plasma_fractal
from cifarlab.errors import ConfigError


def _photos(n: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth images with edges (gradients and a bright square), closer to photos than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31
    out = np.empty((n, 32, 32, 3), np.uint8)
    for k in range(n):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        img = np.stack([a * xx + (1 - a) * yy, b * (1 - xx), c * yy], -1)
        top, left = rng.integers(4, 20, 2)
        img[top:top + 8, left:left + 8] = rng.uniform(0.5, 1, 3)
        out[k] = np.round(img * 255)
    return out


RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "fog"]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_keeps_the_shape_changes_the_images_and_repeats_with_its_seed(name):
    x = _photos()
    for s in (1, 5):
        y = corrupt(x, name, s, seed=3)
        assert y.dtype == np.uint8 and y.shape == x.shape
        assert np.array_equal(y, corrupt(x, name, s, seed=3))
        assert not np.array_equal(y, x)
    if name in RANDOM:
        assert not np.array_equal(corrupt(x, name, 3, seed=3), corrupt(x, name, 3, seed=4))


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
                                  "zoom_blur", "fog", "contrast", "gaussian_blur"])
def test_a_higher_severity_moves_the_images_further(name):
    x = _photos()
    dist = [np.abs(corrupt(x, name, s, seed=1).astype(float) - x).mean() for s in SEVERITIES]
    assert all(b >= a * 0.98 for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] > dist[0] * 1.5


def test_gaussian_noise_has_the_severitys_spread_and_shot_noise_keeps_the_mean():
    x = np.full((200, 32, 32, 3), 128, np.uint8)
    d = corrupt(x, "gaussian_noise", 5).astype(float) - 128
    assert d.std() / 255 == pytest.approx(0.10, rel=0.03)  # severity 5's standard deviation
    assert abs(d.mean()) < 1  # truncation to uint8 lowers it by half a level at most
    s = corrupt(x, "shot_noise", 5).astype(float)
    assert s.mean() == pytest.approx(128 - 0.5, abs=0.6)
    assert (s - 128).std() / 255 == pytest.approx(np.sqrt(128 / 255 / 50), rel=0.05)  # Poisson: var = mean / c


def test_impulse_noise_turns_the_severitys_share_of_values_white_or_black():
    x = np.full((100, 32, 32, 3), 100, np.uint8)
    y = corrupt(x, "impulse_noise", 4)  # 5% of values
    assert set(np.unique(y)) == {0, 100, 255}
    assert (y != 100).mean() == pytest.approx(0.05, rel=0.1)
    assert (y == 255).mean() == pytest.approx((y == 0).mean(), rel=0.15)


def _hsv_reference(x: np.ndarray, change) -> np.ndarray:
    """Each pixel through the standard library's HSV conversion, ``change(h, s, v)`` in between."""
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:3]):
        out[idx] = colorsys.hsv_to_rgb(*change(*colorsys.rgb_to_hsv(*x[idx])))
    return out


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_and_saturate_match_the_hsv_definition(severity):
    rng = np.random.default_rng(severity)
    x = rng.random((2, 8, 8, 3))
    x[0, 0, 0] = (0.5, 0.5, 0.5)  # grey: hue 0, which a saturation shift turns red
    x[0, 0, 1] = 0  # black
    shift = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    want = _hsv_reference(x, lambda h, s, v: (h, s, min(1.0, v + shift)))
    np.testing.assert_allclose(_brightness(x, severity, None), want, atol=1e-9)
    scale, add = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
    want = _hsv_reference(x, lambda h, s, v: (h, min(1.0, s * scale + add), v))
    np.testing.assert_allclose(_saturate(x, severity, None), want, atol=1e-9)


def test_zoom_is_scipys_bilinear_zoom_of_the_centre():
    x = np.random.default_rng(0).random((3, 32, 32, 3))
    for f in (1.0, 1.03, 1.1, 1.17, 1.25):
        crop = int(np.ceil(32 / f))
        top = (32 - crop) // 2
        for im, got in zip(x, _clipped_zoom(x, f)):
            z = zoom(im[top:top + crop, top:top + crop], (f, f, 1), order=1)
            t = (z.shape[0] - 32) // 2
            np.testing.assert_allclose(got, z[t:t + 32, t:t + 32], atol=1e-12)


def test_the_defocus_kernel_is_a_normalised_symmetric_disk():
    small, large = disk_kernel(0.3, 0.4), disk_kernel(1.5, 0.1)
    for k in (small, large):
        assert k.shape == (17, 17)
        assert k.sum() == pytest.approx(1, abs=1e-9)
        np.testing.assert_allclose(k, k.T)
        np.testing.assert_allclose(k, k[::-1])
    assert small[8, 8] > 0.5  # radius 0.3: the centre pixel, slightly smoothed
    # radius 1.5 takes the 3x3 square (its corners lie sqrt(2) away), barely smoothed at 0.1
    np.testing.assert_allclose(large[7:10, 7:10], 1 / 9, rtol=1e-3)
    assert large[8, 10] < 1e-6


def test_glass_blur_moves_each_pixel_at_most_one_step_down_or_right():
    # at severity 1 the Gaussian's sigma (0.05) changes nothing, leaving the pixel moves alone:
    # each pixel of rows and columns 2 to 31 takes the value of itself or the one above, left or
    # above-left of it, as the original was before any move (the moves go bottom-right to top-left)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = corrupt(x, "glass_blur", 1)
    assert np.array_equal(y[:, :2], x[:, :2]) and np.array_equal(y[:, :, :2], x[:, :, :2])
    moved = 0
    for n in range(4):
        for i in range(2, 32):
            for j in range(2, 32):
                options = [x[n, i + dy, j + dx] for dy in (-1, 0) for dx in (-1, 0)]
                assert any(np.array_equal(y[n, i, j], o) for o in options)
                moved += not np.array_equal(y[n, i, j], x[n, i, j])
    assert moved > 0.5 * 4 * 30 * 30  # three of the four offsets move it


def test_plasma_fractal_maps_span_zero_to_one_and_differ_per_image():
    m = plasma_fractal(3, 32, 2.0, np.random.default_rng(0))
    assert m.shape == (3, 32, 32)
    np.testing.assert_allclose(m.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(m.max(axis=(1, 2)), 1)
    assert not np.allclose(m[0], m[1])


def test_contrast_keeps_each_images_channel_means():
    x = _photos(4)
    y = corrupt(x, "contrast", 5)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1.0)
    spread = [(a - a.mean(axis=(1, 2), keepdims=True)).std() for a in (y.astype(float), x.astype(float))]
    assert spread[0] == pytest.approx(0.15 * spread[1], rel=0.05)  # severity 5 keeps 0.15 of each deviation


def test_jpeg_and_pixelate_work_on_grey_images_and_other_sizes():
    x = np.random.default_rng(0).integers(0, 256, (3, 24, 40, 1), dtype=np.uint8)
    for name in ("jpeg_compression", "pixelate", "fog", "zoom_blur", "brightness"):
        y = corrupt(x, name, 5)
        assert y.shape == x.shape and not np.array_equal(y, x)


@pytest.mark.parametrize("bad, message", [
    (dict(name="snow"), "unknown corruption 'snow'"),
    (dict(severity=0), "severity 0 is not valid"),
    (dict(severity=6), "severity 6 is not valid"),
    (dict(severity=True), "severity True is not valid"),
    (dict(images=np.zeros((2, 32, 32, 3), np.float32)), "uint8 array"),
    (dict(images=np.zeros((32, 32, 3), np.uint8)), "shape (32, 32, 3)"),
])
def test_bad_arguments_are_refused_with_the_value_and_what_is_valid(bad, message):
    args = dict(images=_photos(2), name="fog", severity=1) | bad
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        corrupt(args["images"], args["name"], args["severity"])


def test_every_generated_corruption_has_a_published_name():
    assert set(CORRUPTIONS) <= set(PUBLISHED)
    assert sum(c.benchmark for c in CORRUPTIONS.values()) == 11
