"""Images per second for one 50,000-image epoch of the notebook's ImageDataGenerator settings.

Compares, in the same run: cifarlab's batched augmentation on the CPU, eager and compiled (and
on a GPU where one is available), against the per-image scipy path that Keras'
ImageDataGenerator takes (random parameters per image, the same matrix,
``scipy.ndimage.affine_transform`` per channel, order 1, fill 'nearest', then the flip). The
scipy path here omits Keras' other per-image Python overhead, so the ratio is conservative.

Both start from the images as the data set holds them: scipy from float32 arrays already scaled
to [0, 1] (the notebook's ``x / 255``, done before timing), cifarlab from the uint8 images, scaling
inside the timed loop. The one-off compilation is timed and printed separately.

Usage: python benchmarks/augment_throughput.py [--images 50000] [--batch 512] [--data PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

from cifarlab import runtime
from cifarlab.augment import KERAS_NOTEBOOK, KerasAugment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def scipy_keras_epoch(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-image augmentation the way Keras does it (float32 HWC images in [0, 1])."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    offset = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]])
    reset = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    for i in range(len(x)):
        theta = np.deg2rad(rng.uniform(-40, 40))
        tx, ty = rng.uniform(-0.2, 0.2) * h, rng.uniform(-0.2, 0.2) * w
        zx, zy = rng.uniform(0.8, 1.2, 2)
        m = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        m = m @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]]) @ np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
        m = offset @ m @ reset
        m[:, [0, 1]] = m[:, [1, 0]]
        m[[0, 1]] = m[[1, 0]]
        img = np.stack([ndi.affine_transform(x[i, :, :, c], m[:2, :2], m[:2, 2], order=1, mode="nearest")
                        for c in range(x.shape[3])], axis=2)
        out[i] = img[:, ::-1] if rng.random() < 0.5 else img
    return out


def cifarlab_epoch(x: torch.Tensor, batch: int, device: torch.device, compiled: bool) -> tuple[float, float]:
    """Seconds to augment every image of ``x`` (uint8 NCHW, already on ``device``) once, and
    the seconds the warm-up took (compilation, for the compiled path)."""
    aug = KerasAugment(**KERAS_NOTEBOOK, compiled=compiled)
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    for size in sorted({batch, len(x) % batch} - {0}):  # every batch size the epoch will use
        aug(x[:size], g, input_scale=1 / 255)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        aug(x[s:s + batch], g, input_scale=1 / 255)
    if device.type == "cuda":
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, warmup
    return time.perf_counter() - t0, warmup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--scipy-images", type=int, default=None, help="images for the scipy path (default: all)")
    ap.add_argument("--data", default=str(SHARED))
    args = ap.parse_args()
    if Path(args.data).is_file():
        from cifarlab.data import load_dataset

        x = load_dataset(args.data).x_train[: args.images]
        src = f"{len(x):,} images of {args.data}"
    else:
        x = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        src = f"{len(x):,} random 32x32x3 images (data copy absent)"
    runtime.setup("cpu")  # as every cifarlab command does: threads, host memory reuse (both paths run under it)
    print(f"data: {src}; torch threads: {torch.get_num_threads()}")
    n_sp = args.scipy_images or len(x)
    xs = x[:n_sp].astype(np.float32) / 255
    t0 = time.perf_counter()
    scipy_keras_epoch(xs)
    t_sp = time.perf_counter() - t0
    rate_sp = n_sp / t_sp
    print(f"scipy per-image (Keras' path), CPU: {rate_sp:10,.0f} images/s ({n_sp:,} images in {t_sp:.2f} s)")
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        t, warm = cifarlab_epoch(xt, args.batch, torch.device("cpu"), compiled)
        note = f"; compiled once in {warm:.1f} s, not included" if compiled else ""
        print(f"cifarlab batched, CPU, {name + ':':9s}  {len(x) / t:10,.0f} images/s ({len(x):,} images in {t:.2f} s); "
              f"{len(x) / t / rate_sp:.1f}x the scipy path{note}")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for compiled in (False, True):
            t_gpu, _ = cifarlab_epoch(xt.to(dev), args.batch, dev, compiled)
            print(f"cifarlab batched, GPU ({torch.cuda.get_device_name(0)}, {'compiled' if compiled else 'eager'}): "
                  f"{len(x) / t_gpu:10,.0f} images/s ({t_gpu * 1000:.1f} ms per epoch); "
                  f"{len(x) / t_gpu / rate_sp:.0f}x the scipy path")
    else:
        print("GPU: not available, not measured")


if __name__ == "__main__":
    main()
