"""Images per second for one 50,000-image epoch of the notebook's ImageDataGenerator settings.

Compares, in the same run, cifarlab's batched augmentation on the CPU (its own warp kernel, the
default there; PyTorch's eager ops; the torch.compile'd transform, the GPU's path) and on a GPU
where one is available, against the per-image scipy path that Keras' ImageDataGenerator takes
(random parameters per image, the same matrix,
``scipy.ndimage.affine_transform`` per channel, order 1, fill 'nearest', then the flip). The
scipy path here omits Keras' other per-image Python overhead, so the ratio is conservative.

Both start from the images as the data set holds them: scipy from float32 arrays already scaled
to [0, 1] (the notebook's ``x / 255``, done before timing), cifarlab from the uint8 images, scaling
inside the timed loop. The one-off compilation is timed and printed separately. The scipy epoch
is timed in parts, each beside one epoch of every cifarlab path, and the ratio printed is the
median of the per-round ratios, so a machine whose speed drifts during the run does not favour
either side. On a GPU it also times one keras-deep training epoch (batch 128, eager fp32, no
augmentation) and prints the augmentation epoch, in batches of ``--batch`` and of 128 (the
notebook's, at which training augments each batch as it comes) and of 8192 (the chunks in which
training on CUDA prepares its epochs ahead, ``train.prepare_ahead``), as a share of it.

On a GPU machine, ``--skip-cpu`` leaves out the cifarlab CPU paths (measured on the CPU they are
meant for) and ``--scipy-images N`` times the scipy path on the first N images only, so the
GPU figures cost little time; every epoch of cifarlab still covers all ``--images``.

Usage: python benchmarks/augment_throughput.py [--images 50000] [--batch 512] [--rounds 5] [--data PATH]
       [--skip-cpu] [--scipy-images N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
from bench_common import SHARED, timed_epoch, training_images

from cifarlab import cpu_kernels, runtime
from cifarlab.augment import KERAS_NOTEBOOK, KerasAugment

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


def warmed_augmenter(x: torch.Tensor, batch: int, compiled: bool, cpu_kernel: bool = False
                     ) -> tuple[KerasAugment, torch.Generator, float]:
    """The notebook's augmenter, run once on every batch size an epoch of ``x`` uses (for the
    compiled path, that is when compilation happens; for the CPU kernel, when it is built or
    loaded); returns it, its generator and the seconds the warm-up took."""
    aug = KerasAugment(**KERAS_NOTEBOOK, compiled=compiled, cpu_kernel=cpu_kernel)
    g = torch.Generator(device=x.device).manual_seed(0)
    t0 = time.perf_counter()
    for size in sorted({batch, len(x) % batch} - {0}):
        aug(x[:size], g, input_scale=1 / 255)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return aug, g, time.perf_counter() - t0


def epoch_seconds(aug: KerasAugment, g: torch.Generator, x: torch.Tensor, batch: int) -> float:
    """Seconds to augment every image of ``x`` (uint8 NCHW, on its device) once, from uint8;
    CUDA events on a GPU."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        aug(x[s:s + batch], g, input_scale=1 / 255)
    if x.device.type == "cuda":
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    return time.perf_counter() - t0


def training_epoch_seconds(x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    """Seconds of one keras-deep training epoch over uint8 ``x`` on its device with ``cifarlab
    train``'s step, after a warm-up epoch (CUDA events on a GPU): what augmentation is weighed
    against."""
    from cifarlab.config import OptimConfig
    from cifarlab.models import create_model
    from cifarlab.optim import build_optimizer

    fmt = torch.channels_last
    model = create_model("keras-deep").to(x.device, memory_format=fmt).train()
    opt = build_optimizer(model.parameters(), OptimConfig(), cpu_kernels=x.device.type == "cpu")
    timed_epoch(model, opt, x, y, batch, fmt)  # warm-up
    if x.device.type != "cuda":
        return timed_epoch(model, opt, x, y, batch, fmt)[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    timed_epoch(model, opt, x, y, batch, fmt)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of (a 1/rounds part of the scipy epoch, one epoch of each cifarlab path)")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--skip-cpu", action="store_true", help="leave out the cifarlab CPU paths")
    ap.add_argument("--scipy-images", type=int, default=None,
                    help="time the scipy path on the first N images only (default: all --images)")
    args = ap.parse_args()
    x, y, src = training_images(args.images, Path(args.data))
    runtime.setup("cpu")  # as every cifarlab command does: threads, host memory reuse (both paths run under it)
    print(f"data: {src}; torch threads: {torch.get_num_threads()}")
    # The scipy epoch is cut into --rounds parts, each timed right beside one epoch of each
    # cifarlab path: on a shared machine whose speed drifts, each ratio compares like with like.
    xs = x.astype(np.float32) / 255
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    variants = {"cpu kernel": (False, True), "eager": (False, False), "compiled": (True, False)}
    if args.skip_cpu:
        variants = {}
    elif cpu_kernels.load() is None:
        print(f"cpu kernel: unavailable here ({cpu_kernels.unavailable_reason()}), not measured")
        del variants["cpu kernel"]
    paths = {name: warmed_augmenter(xt, args.batch, compiled, kernel) for name, (compiled, kernel) in variants.items()}
    t_sp, rates = [], {name: [] for name in paths}
    ratios: dict[str, list[float]] = {name: [] for name in paths}
    n_sp = min(args.scipy_images or len(x), len(x))
    for r, part in enumerate(np.array_split(np.arange(n_sp), args.rounds)):
        t0 = time.perf_counter()
        scipy_keras_epoch(xs[part], seed=r)
        t_sp.append(time.perf_counter() - t0)
        for name, (aug, g, _) in paths.items():
            rates[name].append(len(x) / epoch_seconds(aug, g, xt, args.batch))
            ratios[name].append(rates[name][-1] / (len(part) / t_sp[-1]))
    rate_sp = n_sp / sum(t_sp)
    print(f"scipy per-image (Keras' path), CPU: {rate_sp:10,.0f} images/s ({n_sp:,} images in {sum(t_sp):.2f} s, "
          f"{args.rounds} parts)")
    for name, (_, _, warm) in paths.items():
        note = f"; compiled once in {warm:.1f} s, not included" if name == "compiled" else ""
        print(f"cifarlab batched, CPU, {name + ':':11s}  {statistics.median(rates[name]):10,.0f} images/s (median of "
              f"{args.rounds} epochs); {statistics.median(ratios[name]):.1f}x the scipy path (median of the rounds' "
              f"ratios; {min(ratios[name]):.1f}x to {max(ratios[name]):.1f}x){note}")
    if torch.cuda.is_available():
        xg = xt.to("cuda")
        t_train = training_epoch_seconds(xg, torch.from_numpy(y.astype(np.int64)).to("cuda"))
        print(f"keras-deep training epoch on the GPU without augmentation (batch 128, eager fp32): "
              f"{t_train:.3f} s")
        # --batch; 128, the notebook's batch, for training that augments each step's batch as it
        # comes; 8192, the chunk in which training on CUDA prepares whole epochs ahead.
        for batch in sorted({args.batch, 128, 8192}, reverse=True):
            for compiled in (False, True):
                aug, g, _ = warmed_augmenter(xg, batch, compiled)
                t_gpu = statistics.median(epoch_seconds(aug, g, xg, batch) for _ in range(args.rounds))
                print(f"cifarlab batched, GPU ({torch.cuda.get_device_name(0)}, "
                      f"{'compiled' if compiled else 'eager'}, batch {batch}): {len(x) / t_gpu:10,.0f} images/s "
                      f"({t_gpu * 1000:.1f} ms per epoch, median of {args.rounds}); {len(x) / t_gpu / rate_sp:.0f}x "
                      f"the scipy path; {100 * t_gpu / t_train:.1f}% of that training epoch")
    else:
        print("GPU: not available, not measured")


if __name__ == "__main__":
    main()
