"""Augmentation: Keras semantics checked against scipy directly, batched, seeded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from conftest import needs_kernel

from cifarlab import cpu_kernels
from cifarlab.augment import (CropFlipCutout, KerasAugment, affine_sample, alternating_flip, augmenter_from_config,
                              cutout, fused_transform, keras_matrices, pack_pixels, pack_words, random_crop)
from cifarlab.config import AugmentConfig
from cifarlab.errors import ConfigError

TOL = 1e-5  # float32 batched pass vs float64 scipy, images in [0, 1]; measured max ~1.5e-7


def _keras_reference(img_chw: np.ndarray, theta, tx, ty, shear, zx, zy, fill_mode, cval) -> np.ndarray:
    """Keras' apply_affine_transform for one channels-first image, rebuilt from its documented steps."""
    h, w = img_chw.shape[1:]
    t = np.deg2rad(theta)
    m = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    m = m @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    s = np.deg2rad(shear)
    m = m @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    m = m @ np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    m = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ m @ np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    m[:, [0, 1]] = m[:, [1, 0]]
    m[[0, 1]] = m[[1, 0]]
    return np.stack([ndi.affine_transform(ch, m[:2, :2], m[:2, 2], order=1, mode=fill_mode, cval=cval)
                     for ch in img_chw])


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_matches_scipy_per_image_for_each_fill_mode(fill_mode):
    rng = np.random.default_rng(1)
    x = rng.random((24, 3, 32, 32)).astype(np.float32)
    aug = KerasAugment(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=15,
                       zoom_range=0.2, fill_mode=fill_mode, cval=0.3)
    p = aug.sample(24, 32, 32, torch.Generator().manual_seed(3))
    mats = keras_matrices(p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], 32, 32)
    out = affine_sample(torch.from_numpy(x), mats, fill_mode, 0.3).numpy()
    ref = np.stack([_keras_reference(x[i].astype(np.float64), *(p[k][i].item() for k in
                                     ("theta", "tx", "ty", "shear", "zx", "zy")), fill_mode, 0.3) for i in range(24)])
    err = np.abs(out - ref).max()
    print(f"{fill_mode}: max abs error {err:.2e}")
    assert err < TOL


def _flipped_reference(x: np.ndarray, p: dict, fill_mode: str, cval: float) -> np.ndarray:
    """Keras' per-image transform followed by its flips, image by image."""
    out = []
    for i in range(len(x)):
        img = _keras_reference(x[i].astype(np.float64), *(p[k][i].item() for k in
                               ("theta", "tx", "ty", "shear", "zx", "zy")), fill_mode, cval)
        img = img[:, :, ::-1] if p["flip_h"][i] else img
        out.append(img[:, ::-1] if p["flip_v"][i] else img)
    return np.stack(out)


def _params(n: int, h: int, w: int, fill_mode: str, seed: int = 3):
    aug = KerasAugment(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=15,
                       zoom_range=0.2, horizontal_flip=True, vertical_flip=True, fill_mode=fill_mode, cval=0.3)
    p = aug.sample(n, h, w, torch.Generator().manual_seed(seed))
    return aug, p, [p[k] for k in ("theta", "tx", "ty", "shear", "zx", "zy", "flip_h", "flip_v")]


@pytest.mark.parametrize("width", [20, 22])  # 20: read as 32-bit words; 22: pixel by pixel
@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_gather_formulation_matches_scipy_for_uint8_and_float(fill_mode, width):
    """The formulation written for torch.compile, run eagerly: uint8 images (packed pixels,
    scaled inside) and float images, each against scipy with Keras' flips."""
    rng = np.random.default_rng(4)
    xu = rng.integers(0, 256, (16, 3, 24, width), dtype=np.uint8)
    _, p, args = _params(16, 24, width, fill_mode)
    ref = _flipped_reference(xu / 255, p, fill_mode, 0.3)
    got_u8 = fused_transform(torch.from_numpy(xu), *args, fill_mode, 0.3, in_scale=1 / 255).numpy()
    got_f = fused_transform(torch.from_numpy(xu / 255).float(), *args, fill_mode, 0.3).numpy()
    assert got_u8.dtype == np.float32 and got_u8.shape == xu.shape
    assert np.abs(got_u8 - ref).max() < TOL and np.abs(got_f - ref).max() < TOL
    # out_scale multiplies last, after the fill: Keras' rescale comes after the transform.
    got_s = fused_transform(torch.from_numpy(xu), *args, fill_mode, 0.3, in_scale=1 / 255, out_scale=2.0).numpy()
    assert np.allclose(got_s, 2 * got_u8, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_gather_formulation_from_uint8_equals_float_for_any_channel_count(channels):
    """Packed pixels are unpacked right for every channel count (with four, the top byte
    reaches the sign bit of the packed integer)."""
    xu = torch.randint(0, 256, (6, channels, 16, 12), dtype=torch.uint8)
    xu[:, -1, :4] = 255
    _, _, args = _params(6, 16, 12, "nearest")
    got_u8 = fused_transform(xu, *args, "nearest", in_scale=1 / 255)
    got_f = fused_transform(xu.float() / 255, *args, "nearest")
    assert torch.allclose(got_u8, got_f, atol=1e-6)


def test_pack_pixels_layout_and_errors():
    x = torch.tensor([[[[1]], [[2]], [[3]]]], dtype=torch.uint8)  # one 1x1 RGB pixel
    assert pack_pixels(x).item() == 1 + (2 << 8) + (3 << 16)
    x4 = torch.randint(0, 256, (2, 4, 3, 3), dtype=torch.uint8)
    p = pack_pixels(x4)
    assert torch.equal(torch.stack([(p >> (8 * k)) & 255 for k in range(4)], 1).to(torch.uint8), x4)
    with pytest.raises(ValueError, match="5 channels"):
        pack_pixels(torch.zeros(1, 5, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pack_words_is_pack_pixels_in_byte_plane_order(channels):
    x = torch.randint(0, 256, (2, channels, 3, 8), dtype=torch.uint8)
    got = pack_words(x.view(torch.int32)).view(2, 4, 3, 2)  # [n, byte b, row, word j] = pixel (row, 4j + b)
    assert torch.equal(got.permute(0, 2, 3, 1).reshape(2, 3, 8), pack_pixels(x))


@needs_kernel
@pytest.mark.parametrize("channels", [1, 3, 4, 5])  # 5: too many to pack, read as float planes
@pytest.mark.parametrize("width", [32, 22])  # 22: columns left over from the eight-wide loop
@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_cpu_kernel_matches_scipy_for_uint8_and_float(fill_mode, width, channels):
    """cifarlab's CPU warp kernel through KerasAugment.apply (its default path on the CPU), from
    uint8 images with the notebook's 1/255 and from float images, against scipy with Keras' flips."""
    rng = np.random.default_rng(6)
    xu = rng.integers(0, 256, (16, channels, 24, width), dtype=np.uint8)
    aug, p, _ = _params(16, 24, width, fill_mode)
    assert aug.cpu_kernel and aug._use_cpu_kernel(torch.from_numpy(xu))
    ref = _flipped_reference(xu / 255, p, fill_mode, 0.3)
    got_u8 = aug.apply(torch.from_numpy(xu), p, input_scale=1 / 255).numpy()
    got_f = aug.apply(torch.from_numpy(xu / 255).float(), p).numpy()
    err = max(np.abs(got_u8 - ref).max(), np.abs(got_f - ref).max())
    print(f"cpu kernel {fill_mode}, width {width}, {channels} channels: max abs error {err:.2e}")
    assert got_u8.dtype == np.float32 and got_u8.shape == xu.shape
    assert err < 1e-6  # float64 coordinates as scipy's: tighter than the float32 paths' TOL


@needs_kernel
def test_cpu_kernel_edges_are_scipy_exactly():
    """Points exactly on the edge are inside for 'constant' (an identity or whole-pixel shift
    reproduces the image), and any point past it takes cval, as scipy decides."""
    x = torch.rand(3, 2, 6, 9)
    eye = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    assert torch.equal(cpu_kernels.affine_warp(x, eye, "constant", cval=-1.0), x)
    for shift in (1.0, 1e-6, -2.5):
        m = eye.clone()
        m[:, 1, 2] = shift
        ref = np.stack([[ndi.affine_transform(x[i, k].double().numpy(), m[i, :2, :2].numpy(), m[i, :2, 2].numpy(),
                                              order=1, mode="constant", cval=-1.0) for k in range(2)]
                        for i in range(3)])
        got = cpu_kernels.affine_warp(x, m, "constant", cval=-1.0).numpy()
        assert np.abs(got - ref).max() < 1e-6, shift


@needs_kernel
def test_cpu_kernel_does_not_depend_on_the_thread_count():
    lib = cpu_kernels.load()
    x = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    aug, p, _ = _params(7, 16, 16, "reflect")
    mats = keras_matrices(*(p[k] for k in ("theta", "tx", "ty", "shear", "zx", "zy")), 16, 16,
                          flip_h=p["flip_h"], flip_v=p["flip_v"])
    outs = []
    for threads in (1, 2, 5):
        out = torch.empty(x.shape)
        cpu_kernels._warp_into(lib, x, out, mats, "reflect", 0.0, 1 / 255, 1.0, threads=threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_cpu_kernel_rejects_what_it_does_not_take_naming_the_value():
    eye = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.affine_warp(torch.zeros(2, 3, 4, 4, dtype=torch.float64), eye)
    with pytest.raises(ValueError, match=r"\(3, 3, 3\)"):
        cpu_kernels.affine_warp(torch.zeros(2, 3, 4, 4), eye[:1].repeat(3, 1, 1))
    with pytest.raises(ValueError, match="fill_mode='mirror'"):
        cpu_kernels.affine_warp(torch.zeros(2, 3, 4, 4), eye, "mirror")


def test_without_the_cpu_kernel_augmentation_takes_the_pytorch_path(monkeypatch):
    """Switched off (or unavailable), KerasAugment runs on PyTorch's grid_sample, same result."""
    x = torch.randint(0, 256, (5, 3, 12, 16), dtype=torch.uint8)
    aug, p, _ = _params(5, 12, 16, "wrap")
    aug.cpu_kernel = False
    assert not aug._use_cpu_kernel(x)
    calls = []
    monkeypatch.setattr(cpu_kernels, "affine_warp", lambda *a, **k: calls.append(1))
    got = aug.apply(x, p, input_scale=1 / 255)
    ref = _flipped_reference(x.numpy() / 255, p, "wrap", 0.3)
    assert not calls and np.abs(got.numpy() - ref).max() < TOL
    aug.cpu_kernel = True
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    assert not aug._use_cpu_kernel(x)
    assert torch.equal(aug.apply(x, p, input_scale=1 / 255), got)


def test_keras_matrices_fold_flips_as_a_product_with_the_flip_would():
    """Flipping the output is sampling at mirrored output pixels: M @ F per image."""
    _, p, _ = _params(9, 10, 14, "nearest")
    args = [p[k] for k in ("theta", "tx", "ty", "shear", "zx", "zy")]
    flips = torch.eye(3, dtype=torch.float64).repeat(9, 1, 1)
    fv, fh = p["flip_v"].double(), p["flip_h"].double()
    flips[:, 0, 0], flips[:, 0, 2] = 1 - 2 * fv, fv * (10 - 1)
    flips[:, 1, 1], flips[:, 1, 2] = 1 - 2 * fh, fh * (14 - 1)
    want = keras_matrices(*args, 10, 14) @ flips
    got = keras_matrices(*args, 10, 14, flip_h=p["flip_h"], flip_v=p["flip_v"])
    assert p["flip_h"].any() and p["flip_v"].any() and torch.allclose(got, want, atol=1e-12, rtol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or c++) on PATH")
@pytest.mark.parametrize("fill_mode", ["nearest", "wrap"])
def test_compiled_augmenter_matches_scipy(fill_mode):
    """The compiled kernel (one per fill mode; compiling takes ~15 s here) against scipy,
    through KerasAugment.apply on uint8 images with the notebook's 1/255 scaling."""
    rng = np.random.default_rng(5)
    xu = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    aug, p, _ = _params(12, 32, 32, fill_mode)
    aug.compiled, aug.cpu_kernel = True, False  # on the CPU the kernel would otherwise take it
    got = aug.apply(torch.from_numpy(xu), p, input_scale=1 / 255).numpy()
    ref = _flipped_reference(xu / 255, p, fill_mode, 0.3)
    err = np.abs(got - ref).max()
    print(f"compiled {fill_mode}: max abs error {err:.2e}")
    assert err < TOL


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or c++) on PATH")
def test_compiled_call_makes_its_parameters_inside_the_kernel_with_the_same_draws():
    """On the compiled path a call draws, makes the parameters and warps in one compiled
    function: the result equals sample-then-apply (eager) from the same generator state,
    including pixel shifts with a random sign and Keras' rescale, and a second augmenter with
    the same settings reuses the compiled function."""
    import cifarlab.augment as A

    xu = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8))
    opts = dict(rotation_range=40.0, width_shift_range=3, height_shift_range=0.2, zoom_range=0.2,
                horizontal_flip=True, vertical_flip=True, fill_mode="reflect", rescale=0.5)
    fused = KerasAugment(**opts, compiled=True, cpu_kernel=False)
    eager = KerasAugment(**opts, compiled=False, cpu_kernel=False)
    got = fused(xu, torch.Generator().manual_seed(3), input_scale=1 / 255)
    want = eager.apply(xu, eager.sample(10, 32, 32, torch.Generator().manual_seed(3)), input_scale=1 / 255)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() < TOL
    before = A._compiled_warp.cache_info()
    again = KerasAugment(**opts, compiled=True, cpu_kernel=False)(xu, torch.Generator().manual_seed(3),
                                                                   input_scale=1 / 255)
    after = A._compiled_warp.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses and torch.equal(again, got)


def test_uint8_input_scale_equals_float_input():
    """apply(x_uint8, input_scale=s) means apply(x.float() * s), including Keras' rescale."""
    xu = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    aug = KerasAugment(rotation_range=20, zoom_range=0.1, horizontal_flip=True, rescale=0.5)
    p = aug.sample(6, 16, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(aug.apply(xu, p, input_scale=1 / 255), aug.apply(xu.float() / 255, p), atol=1e-6)


def test_non_square_images_match_scipy():
    x = np.random.default_rng(2).random((4, 1, 20, 28)).astype(np.float32)
    aug = KerasAugment(rotation_range=30, width_shift_range=3, height_shift_range=0.1, zoom_range=[0.8, 1.1])
    p = aug.sample(4, 20, 28, torch.Generator().manual_seed(0))
    mats = keras_matrices(p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], 20, 28)
    out = affine_sample(torch.from_numpy(x), mats, "nearest").numpy()
    ref = np.stack([_keras_reference(x[i].astype(np.float64), *(p[k][i].item() for k in
                                     ("theta", "tx", "ty", "shear", "zx", "zy")), "nearest", 0.0) for i in range(4)])
    assert np.abs(out - ref).max() < TOL


def test_sampling_ranges_follow_keras():
    aug = KerasAugment(rotation_range=40, width_shift_range=0.2, height_shift_range=4.0, zoom_range=0.2,
                       horizontal_flip=True)
    p = aug.sample(20000, 32, 48, torch.Generator().manual_seed(0))
    assert p["theta"].abs().max() <= 40 and p["theta"].abs().max() > 39.5
    assert p["ty"].abs().max() <= 0.2 * 48 and p["ty"].abs().max() > 0.19 * 48  # width fraction x width
    assert p["tx"].abs().max() <= 4 and p["tx"].abs().max() > 3.9  # a float >= 1 means pixels
    assert len(p["tx"].unique()) > 19000  # continuous
    assert 0.8 <= p["zx"].min() and p["zx"].max() <= 1.2 and not torch.equal(p["zx"], p["zy"])
    assert 0.48 < p["flip_h"].float().mean() < 0.52 and not p["flip_v"].any()


def test_int_and_list_shift_ranges_follow_keras():
    """Keras' other two forms: an int r is choice(range(r)) pixels with a random sign (so 0 has
    probability 1/r and each other value 1/(2r)); a list gives one of its values with a random
    sign, as a fraction of the image size when all are under 1."""
    n, g = 40000, torch.Generator().manual_seed(1)
    p = KerasAugment(width_shift_range=3, height_shift_range=[0.1, 0.25]).sample(n, 20, 40, g)
    values, counts = p["ty"].unique(return_counts=True)
    assert values.tolist() == [-2, -1, 0, 1, 2]
    freq = dict(zip(values.tolist(), (counts / n).tolist()))
    assert abs(freq[0] - 1 / 3) < 0.015 and all(abs(freq[v] - 1 / 6) < 0.015 for v in (-2, -1, 1, 2))
    assert sorted(p["tx"].unique().tolist()) == pytest.approx([-5, -2, 2, 5])  # 0.1 and 0.25 of 20 rows
    pixels = KerasAugment(width_shift_range=[2, 5]).sample(1000, 20, 40, g)["ty"]
    assert sorted(pixels.unique().tolist()) == [-5, -2, 2, 5]
    assert not KerasAugment(width_shift_range=1).sample(100, 8, 8, g)["ty"].any()  # range(1) is {0}


def test_shift_range_forms_reach_the_augmenter_from_a_config():
    from cifarlab.config import resolve_config

    for value, want in ((4, 4), (0.2, 0.2), ([1, 3], (1.0, 3.0))):
        cfg = resolve_config("keras-book", overrides={"augment": {"preset": "keras", "height_shift_range": value}})
        got = augmenter_from_config(cfg.augment).height_shift_range
        assert got == want and type(got) is type(want)
    with pytest.raises(ConfigError, match="height_shift_range"):
        KerasAugment(height_shift_range=[0.1, "a"])
    with pytest.raises(ConfigError, match="height_shift_range=-2"):
        KerasAugment(height_shift_range=-2)


def test_identity_is_exact_and_flip_is_last():
    x = torch.rand(5, 3, 8, 8)
    aug = KerasAugment(horizontal_flip=True)
    p = aug.sample(5, 8, 8, torch.Generator().manual_seed(0))
    p["flip_h"] = torch.tensor([True, False, True, False, False])
    out = aug.apply(x, p)
    assert torch.equal(out[1], x[1]) and torch.equal(out[0], x[0].flip(2))


def test_channel_shift_brightness_and_featurewise():
    x = torch.rand(6, 3, 8, 8) * 0.5 + 0.25
    aug = KerasAugment(channel_shift_range=0.1, brightness_range=[0.5, 0.5])
    out = aug(x, torch.Generator().manual_seed(0))
    lo = x.amin(dim=(1, 2, 3), keepdim=True) * 0.5
    hi = x.amax(dim=(1, 2, 3), keepdim=True) * 0.5
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    fw = KerasAugment(featurewise_std_normalization=True).fit(x)
    z = fw.standardize(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    with pytest.raises(ConfigError, match="fit"):
        KerasAugment(featurewise_center=True).standardize(x)


def test_seeded_and_batched_equals_one_by_one():
    x = torch.rand(8, 3, 16, 16)
    aug = KerasAugment(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, zoom_range=0.2,
                       horizontal_flip=True)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    p = aug.sample(8, 16, 16, torch.Generator().manual_seed(7))
    one = torch.cat([aug.apply(x[i:i + 1], {k: v[i:i + 1] for k, v in p.items()}) for i in range(8)])
    assert torch.allclose(one, a, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({"rotation_range": -5}, "rotation_range=-5"), ({"zoom_range": 1.5}, "zoom_range=1.5"),
    ({"zoom_range": [1.2, 0.8]}, "zoom_range"), ({"fill_mode": "mirror"}, "fill_mode='mirror'"),
    ({"brightness_range": [2]}, "brightness_range"), ({"width_shift_range": float("nan")}, "width_shift_range"),
])
def test_invalid_options_named(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        KerasAugment(**kw)


def test_presets():
    keras = augmenter_from_config(AugmentConfig(preset="keras"))
    assert (keras.rotation_range, keras.width_shift_range, keras.zoom_range, keras.horizontal_flip,
            keras.fill_mode) == (40, 0.2, (0.8, 1.2), True, "nearest")
    tuned = augmenter_from_config(AugmentConfig(preset="keras", rotation_range=10))
    assert tuned.rotation_range == 10 and tuned.width_shift_range == 0.2
    assert augmenter_from_config(AugmentConfig()) is None
    assert isinstance(augmenter_from_config(AugmentConfig(preset="crop-flip", cutout=8)), CropFlipCutout)


def test_random_crop_is_a_translation_of_reflect_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(torch.equal(out[i, 0], padded[i, 0, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))


def test_alternating_flip_alternates():
    x = torch.rand(64, 3, 4, 4)
    idx = torch.arange(64)
    e0, e1 = alternating_flip(x, idx, 0), alternating_flip(x, idx, 1)
    flipped0 = (e0 != x).flatten(1).any(1)
    flipped1 = (e1 != x).flatten(1).any(1)
    assert torch.equal(flipped0, ~flipped1) and 20 < flipped0.sum() < 44


def test_cutout_zeroes_one_square():
    x = torch.ones(10, 3, 16, 16)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 16).all() and (zeros >= 4).all()
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)


def test_draw_mix_draws_mixup_or_cutmix_shares_and_boxes_whose_area_is_the_share():
    from cifarlab.augment import draw_mix

    rng = np.random.default_rng(0)
    assert draw_mix(rng, 0.0, 0.0, (32, 32)) == (1.0, None)
    lams = [draw_mix(rng, 0.4, 0.0, (32, 32)) for _ in range(200)]
    assert all(box is None and 0 <= lam <= 1 for lam, box in lams)
    # Beta(0.4, 0.4) puts most of its mass near 0 and 1
    assert np.mean([min(lam, 1 - lam) < 0.1 for lam, _ in lams]) > 0.4
    both = [draw_mix(rng, 0.4, 1.0, (24, 20)) for _ in range(400)]
    boxes = [(lam, box) for lam, box in both if box is not None]
    assert 150 < len(boxes) < 250  # each step one of the two, at even chances
    for lam, (top, bottom, left, right) in boxes:
        assert 0 <= top <= bottom <= 24 and 0 <= left <= right <= 20
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (24 * 20))
    # seeded: the same generator state gives the same draws
    assert draw_mix(np.random.default_rng(5), 0.4, 1.0, (8, 8)) == draw_mix(np.random.default_rng(5), 0.4, 1.0, (8, 8))


def test_mix_batch_pairs_each_image_with_the_batch_reversed():
    from cifarlab.augment import mix_batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3, 4])
    mixed, partners = mix_batch(x, y, 0.3)
    assert torch.equal(partners, torch.tensor([4, 3, 2, 1, 0]))
    assert torch.allclose(mixed, 0.3 * x + 0.7 * x.flip(0))
    mixed, partners = mix_batch(x, y, 0.75, (1, 4, 2, 5))
    inside = torch.zeros(6, 7, dtype=torch.bool)
    inside[1:4, 2:5] = True
    assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    assert torch.equal(x, x.clone())  # the input is left as it was
    assert torch.equal(partners, y.flip(0))


def test_preset_keys_are_the_ones_each_preset_reads():
    """PRESET_KEYS, which config.unused_settings relies on, says which augment keys change each
    preset's augmenter: every key listed changes it, every other one leaves it as it was."""
    from cifarlab.augment import KERAS_NOTEBOOK, PRESET_KEYS, PRESETS

    other = {"rotation_range": 10.0, "width_shift_range": 0.1, "height_shift_range": 0.1, "shear_range": 5.0,
             "zoom_range": 0.1, "horizontal_flip": True, "vertical_flip": True, "fill_mode": "reflect", "cval": 0.5,
             "brightness_range": [0.8, 1.2], "channel_shift_range": 0.1, "featurewise_center": True,
             "featurewise_std_normalization": True, "crop_padding": 2, "cutout": 8, "alternating_flip": True}
    assert set(other) == {k for keys in PRESET_KEYS.values() for k in keys} and set(PRESET_KEYS) == set(PRESETS)
    for preset in PRESETS:
        base = AugmentConfig(preset=preset)
        for key, value in other.items():
            changed = augmenter_from_config(AugmentConfig(preset=preset, **{key: value}))
            # the keras preset already flips as the notebook does
            read = key in PRESET_KEYS[preset] and not (preset == "keras" and KERAS_NOTEBOOK.get(key) == value)
            assert (changed == augmenter_from_config(base)) != read, (preset, key)
