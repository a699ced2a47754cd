"""Images per second of the augmentation policies (``--auto-augment``): cifarlab's batched
TrivialAugment and RandAugment, beside the crop and flip of ``--augment crop-flip``, against the
same policies applied one image at a time with Pillow (the way a per-image data loader runs
them: a random operation, Pillow's ``ImageEnhance`` / ``ImageOps`` / affine transform).

cifarlab's paths start from uint8 (N, C, H, W) images on ``--device`` and take batches of
``--batch``; the Pillow path starts from the uint8 HWC arrays and includes the conversions to and
from Pillow images. Each path is timed ``--rounds`` times over ``--images`` images, interleaved
round by round, and the median is printed, with its ratio to Pillow's median. On a GPU the
times are taken after a synchronisation.

Usage: python benchmarks/policy_throughput.py [--images 10000] [--batch 128] [--rounds 3]
[--device cpu] [--data PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_common import SHARED, cpu_line, training_images
from PIL import Image, ImageEnhance, ImageOps

from cifarlab.augment import CropFlipCutout
from cifarlab.augment_policy import LEVELS, OPS, STANDARD, WIDE, PolicyAugment, Ranges

_ENHANCERS = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
              "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}


def pillow_op(im: Image.Image, name: str, level: int, negative: bool, r: Ranges) -> Image.Image:
    """One operation of the bank on one image, with Pillow, at ``level`` of ``r``."""
    f = level / (LEVELS - 1) * (-1 if negative else 1)
    w, h = im.size
    if name in _ENHANCERS:
        return _ENHANCERS[name](im).enhance(1 + f * r.enhance)
    if name in ("shear_x", "shear_y"):
        data = (1, f * r.shear, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, f * r.shear, 1, 0)
        return im.transform(im.size, Image.AFFINE, data, resample=Image.NEAREST, fillcolor=0)
    if name in ("translate_x", "translate_y"):
        t = int(f * r.translate * (w if name == "translate_x" else h))
        data = (1, 0, -t, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, -t)
        return im.transform(im.size, Image.AFFINE, data, resample=Image.NEAREST, fillcolor=0)
    if name == "rotate":
        return im.rotate(f * r.rotate, resample=Image.NEAREST, fillcolor=0)
    if name == "posterize":
        return ImageOps.posterize(im, int(8 - round(level / ((LEVELS - 1) / (8 - r.posterize_bits)))))
    if name == "solarize":
        return ImageOps.solarize(im, 255 * (LEVELS - 1 - level) / (LEVELS - 1))
    if name == "autocontrast":
        return ImageOps.autocontrast(im)
    if name == "equalize":
        return ImageOps.equalize(im)
    return im


def pillow_epoch(x: np.ndarray, policy: str, rng: np.random.Generator) -> np.ndarray:
    """The policy over every image of ``x`` (uint8 NHWC), one image at a time."""
    out = np.empty_like(x)
    for i in range(len(x)):
        im = Image.fromarray(x[i])
        if policy == "trivialaugment":
            im = pillow_op(im, OPS[rng.integers(len(OPS))], int(rng.integers(LEVELS)), bool(rng.integers(2)), WIDE)
        else:
            for _ in range(2):
                im = pillow_op(im, OPS[rng.integers(len(OPS))], 9, bool(rng.integers(2)), STANDARD)
        out[i] = np.asarray(im)
    return out


def batched_epoch(aug, x: torch.Tensor, batch: int, g: torch.Generator) -> None:
    """``aug`` over every image of ``x`` (uint8 NCHW on its device), ``batch`` at a time."""
    for s in range(0, len(x), batch):
        part = x[s:s + batch]
        aug(part, g) if isinstance(aug, PolicyAugment) else aug(part.float() / 255, g)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x_np, _, what = training_images(args.images, args.data)
    dev = torch.device(args.device)
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(dev)
    print(what)
    print(cpu_line() if dev.type == "cpu" else f"device: {torch.cuda.get_device_name(dev)}")
    print(f"{torch.get_num_threads()} threads, batches of {args.batch}, {args.rounds} rounds")
    paths = {"crop-flip (4-pixel crop, flip)": CropFlipCutout(crop_padding=4),
             "trivialaugment": PolicyAugment("trivialaugment"), "randaugment": PolicyAugment("randaugment")}
    g = torch.Generator(device=dev).manual_seed(0)
    for aug in paths.values():  # warm-up: allocations, first calls
        batched_epoch(aug, x[:args.batch * 2], args.batch, g)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in [*paths, "trivialaugment, Pillow per image",
                                                         "randaugment, Pillow per image"]}
    for r in range(args.rounds):
        for name, aug in paths.items():
            t = time.perf_counter()
            batched_epoch(aug, x, args.batch, g)
            times[name].append(time.perf_counter() - t)
        for policy in ("trivialaugment", "randaugment"):
            t = time.perf_counter()
            pillow_epoch(x_np, policy, rng)
            times[f"{policy}, Pillow per image"].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{name.split(' (')[0]} {ts[-1]:.2f} s" for name, ts in times.items()),
              flush=True)
    print(f"{'path':<36}{'images/s (median)':>18}{'vs Pillow':>11}")
    for name, ts in times.items():
        rate = len(x) / statistics.median(ts)
        base = next((p for p in ("trivialaugment", "randaugment") if name.startswith(p)), None)
        ratio = f"{rate * statistics.median(times[f'{base}, Pillow per image']) / len(x):>10.1f}x" if base else ""
        print(f"{name:<36}{rate:>18,.0f}{ratio}")


if __name__ == "__main__":
    main()
