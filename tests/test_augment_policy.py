"""TrivialAugment and RandAugment (cifarlab.augment_policy): each operation against Pillow's,
the geometry pixel by pixel, the policies' draws, their settings, and their place in training
and in ``cifarlab augment``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import cifarlab.augment_policy as ap
from cifarlab.augment_policy import OPS, STANDARD, WIDE, PolicyAugment, apply_ops
from cifarlab.config import ConfigError, resolve_config
from conftest import tiny_config


def _images(seed: int = 0) -> np.ndarray:
    """Eight images of noise and eight of 4x4 blocks (flat areas, a few levels), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    blocks = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
    return np.concatenate([noise, blocks])


def _apply(x: torch.Tensor, name: str, level: int, negative: int = 0, ranges=WIDE) -> torch.Tensor:
    n = len(x)
    return apply_ops(x, torch.full((n,), OPS.index(name)), torch.full((n,), level), torch.full((n,), negative), ranges)


@pytest.mark.parametrize("name", ["brightness", "color", "contrast", "sharpness", "posterize", "solarize", "equalize"])
def test_each_colour_operation_gives_pillows_levels_exactly(name, monkeypatch):
    """Against Pillow, one image at a time, as the throughput benchmark runs the policies with it
    (so that benchmark compares the same work), at both ranges."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from policy_throughput import pillow_op

    imgs = _images()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    for ranges in (WIDE, STANDARD):
        for level in (0, 4, 13, 22, 30):
            for negative in (0, 1):
                got = _apply(x, name, level, negative, ranges).permute(0, 2, 3, 1).numpy()
                want = np.stack([np.asarray(pillow_op(Image.fromarray(im), name, level, bool(negative), ranges))
                                 for im in imgs])
                assert np.array_equal(got, want.astype(np.float32)), (name, level, negative, ranges)


def test_autocontrast_stretches_each_channel_to_the_full_range_as_pillow_does():
    """Pillow's floating point sometimes leaves a channel's brightest level at 254; cifarlab
    gives 255 there, and Pillow's level everywhere else."""
    imgs = _images(1)
    imgs[0, ..., 1] = 7  # one flat channel: left as it is
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    got = _apply(x, "autocontrast", 17)
    want = torch.from_numpy(np.stack([np.asarray(ImageOps.autocontrast(Image.fromarray(im))) for im in imgs]))
    want = want.permute(0, 3, 1, 2).float()
    diff = (got - want).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert torch.equal(got[0, 1], x[0, 1])
    spread = [c for c in range(3) if c != 1]
    assert got[0, spread].amin((1, 2)).eq(0).all() and got[0, spread].amax((1, 2)).eq(255).all()


def test_translations_move_whole_pixels_and_fill_with_black():
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2).float()
    moved = _apply(x, "translate_x", 15)  # half of 32 pixels, to the right
    want = torch.zeros_like(x)
    want[..., 16:] = x[..., :16]
    assert torch.equal(moved, want)
    moved = _apply(x, "translate_y", 3, negative=1)  # 3/30 of 32 = 3.2: 3 pixels, up
    want = torch.zeros_like(x)
    want[:, :, :29] = x[:, :, 3:]
    assert torch.equal(moved, want)
    # RandAugment's range: 150/331 of the size at the top level
    moved = _apply(x, "translate_x", 30, ranges=STANDARD)
    assert torch.equal(moved[..., 14:], x[..., :18]) and moved[..., :14].eq(0).all()


def test_rotation_and_shear_map_pixels_exactly():
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2).float()
    assert torch.equal(_apply(x, "rotate", 20), torch.rot90(x, -1, (2, 3)))  # 20/30 of 135 degrees: 90
    assert torch.equal(_apply(x, "rotate", 20, negative=1), torch.rot90(x, 1, (2, 3)))
    sheared = _apply(x, "shear_x", 30)  # each row shifted by 0.99 (row + 0.5) pixels, to the nearest
    for row in (0, 10, 20):
        shift = round(0.99 * (row + 0.5))
        assert torch.equal(sheared[:, :, row, :32 - shift], x[:, :, row, shift:])
        assert sheared[:, :, row, 32 - shift:].eq(0).all()


@pytest.mark.parametrize("name", [n for n in OPS if n not in ("solarize", "autocontrast", "equalize")])
def test_the_lowest_level_changes_nothing(name):
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2).float()
    assert torch.equal(_apply(x, name, 0, negative=1), x)


def test_every_operation_keeps_whole_levels_in_range_on_one_and_three_channels():
    for channels in (1, 3):
        x = torch.from_numpy(_images()[..., :channels]).permute(0, 3, 1, 2).float()
        for name in OPS:
            out = _apply(x, name, 23, negative=1)
            assert out.shape == x.shape and out.dtype == torch.float32, name
            assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round()), name


def test_trivialaugment_draws_one_operation_and_level_per_image_uniformly(monkeypatch):
    drawn = []
    real = ap.apply_ops
    monkeypatch.setattr(ap, "apply_ops", lambda x, op, level, neg, ranges: drawn.append((op, level, neg, ranges))
                        or real(x, op, level, neg, ranges))
    x = torch.randint(0, 256, (7000, 3, 8, 8), dtype=torch.uint8)
    out = PolicyAugment("trivialaugment")(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(out, out.round())
    assert len(drawn) == 1 and drawn[0][3] is WIDE
    op, level, neg, _ = drawn[0]
    for values, k in ((op, len(OPS)), (level, 31), (neg, 2)):
        counts = torch.bincount(values, minlength=k).double()
        expected = len(x) / k
        assert len(counts) == k and ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    changed = (out != x.float()).flatten(1).any(1)
    assert changed[op != OPS.index("identity")].float().mean() > 0.5 and not changed[op == 0].any()


def test_the_cpus_operation_by_operation_path_gives_the_gpus_results():
    """The CPU runs each operation on the images that drew it; a GPU runs every operation on
    every image and selects (``_apply`` with all of them, which runs on any device)."""
    g = torch.Generator().manual_seed(1)
    x = torch.from_numpy(np.concatenate([_images(2), _images(3)])).permute(0, 3, 1, 2).float()
    x = torch.cat([x] * 20)  # 640 images: every operation at many levels and both signs
    op, level, neg = (torch.randint(0, k, (len(x),), generator=g) for k in (len(OPS), 31, 2))
    for ranges in (WIDE, STANDARD):
        assert torch.equal(apply_ops(x, op, level, neg, ranges), ap._apply(x, op, level, neg, ranges, range(14)))


def test_randaugment_applies_its_n_operations_at_its_magnitude(monkeypatch):
    drawn = []
    real = ap.apply_ops
    monkeypatch.setattr(ap, "apply_ops", lambda x, op, level, neg, ranges: drawn.append((op, level, ranges))
                        or real(x, op, level, neg, ranges))
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    PolicyAugment("randaugment", ops=3, magnitude=12)(x, torch.Generator().manual_seed(0))
    assert len(drawn) == 3 and all(r is STANDARD and level.eq(12).all() for _, level, r in drawn)
    assert not torch.equal(drawn[0][0], drawn[1][0])  # a new operation for each of the three


def test_the_draws_come_from_the_generator_alone():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    before = x.clone()
    for policy in ("trivialaugment", "randaugment"):
        aug = PolicyAugment(policy)
        a, b = (aug(x, torch.Generator().manual_seed(3)) for _ in range(2))
        c = aug(x, torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)


def test_policy_settings_are_checked_and_named():
    def cfg(**augment):
        return resolve_config("keras-book", overrides={"augment": augment})

    assert cfg(auto_augment="trivialaugment").augment.auto_augment == "trivialaugment"
    with pytest.raises(ConfigError, match=r"augment.auto_augment = 'trivial' is not valid \(did you mean "
                                          r"'trivialaugment'\?\); choose one of none, trivialaugment, randaugment"):
        cfg(auto_augment="trivial")
    with pytest.raises(ConfigError, match=r"augment.randaugment_ops = 3 is not valid; it only applies to RandAugment"):
        cfg(auto_augment="trivialaugment", randaugment_ops=3)
    with pytest.raises(ConfigError, match=r"augment.randaugment_magnitude = 31 is not valid; it is a level from 0 "
                                          r"to 30"):
        cfg(auto_augment="randaugment", randaugment_magnitude=31)
    with pytest.raises(ConfigError, match=r"augment.randaugment_ops = 0 is not valid; .* 1 or more"):
        cfg(auto_augment="randaugment", randaugment_ops=0)
    with pytest.raises(ConfigError, match=r"'randaugment' is not valid with the keras preset"):
        cfg(auto_augment="randaugment", preset="keras")


def test_training_runs_the_policy_on_every_batch_before_the_crop_and_flip(tmp_path, image_folder, monkeypatch):
    """Every training batch goes through the policy (uint8 in), and nothing else does (the
    validation and test images); a teacher then sees the augmented images in each step instead
    of its logits made once beforehand; the log says what the policy does."""
    import cifarlab.train as train_mod
    from cifarlab.train import fit

    seen = []
    real = PolicyAugment.__call__
    monkeypatch.setattr(PolicyAugment, "__call__", lambda self, x, g=None: seen.append(x.dtype) or real(self, x, g))
    said = []
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), epochs=2, batch_size=4)
    cfg.augment.preset, cfg.augment.auto_augment = "crop-flip", "trivialaugment"
    first = fit(cfg, log=said.append)
    assert seen == [torch.uint8] * (2 * math.ceil(13 / 4))
    assert "each training image gets one of 14 operations at a random strength (TrivialAugment), each drawn at " \
           "random, before the crop-flip preset" in said
    made = []
    monkeypatch.setattr(train_mod._Loop, "_teacher_logits", lambda loop: made.append(1))
    cfg = tiny_config(str(image_folder), str(tmp_path / "s"), teacher=first["run"])
    cfg.augment.auto_augment, cfg.augment.randaugment_ops = "randaugment", 1
    said.clear()
    fit(cfg, log=said.append)
    assert not made
    assert "each training image gets 1 of 14 operations in turn at level 9 of 30 (RandAugment), each drawn at " \
           "random" in said


def test_the_augment_command_previews_a_policy(tmp_path, image_folder, capsys):
    """--auto-augment alone leaves the notebook's preset out (it cannot go with a policy); the
    copies are the policy's, seeded."""
    from cifarlab.cli import main
    from cifarlab.data import load_dataset

    args = ["augment", "--data", str(image_folder), "--auto-augment", "randaugment", "--per-image", "3"]
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    x = load_dataset(image_folder).x_train
    assert a["x"].shape == (3 * len(x), *x.shape[1:]) and np.array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], x.repeat(3, 0))
    assert main([*args, "--augment", "keras", "--out", str(tmp_path / "c.npz")]) == 2
    assert "is not valid with the keras preset" in capsys.readouterr().err
