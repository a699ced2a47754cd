"""Time one keras-deep training epoch (the notebook's 40,000 images, batch 128) on the CPU.

Uses the same step as ``cifarlab train`` (preprocess, channels-last, ``train_step``) and prints
the median step time and the whole epoch's time. Usage:
    python benchmarks/cpu_epoch.py [--images 40000] [--threads N] [--no-channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cifarlab import runtime
from cifarlab.config import OptimConfig
from cifarlab.export import preprocess
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer
from cifarlab.train import train_step

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="keras-deep")
    ap.add_argument("--no-channels-last", action="store_true")
    args = ap.parse_args()
    runtime.setup("cpu", args.threads)
    runtime.seed_everything(0)
    if SHARED.is_file():
        from cifarlab.data import load_dataset

        ds = load_dataset(SHARED)
        x, y = ds.x_train[: args.images], ds.y_train[: args.images]
        src = "JPEG CIFAR-10 copy"
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, args.images)
        src = "random images (data copy absent)"
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))
    fmt = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = create_model(args.model).to(memory_format=fmt).train()
    opt = build_optimizer(model.parameters(), OptimConfig())
    prep = {"rescale": 1 / 255}
    perm = torch.randperm(len(xt))
    steps = []
    t_epoch = time.perf_counter()
    for s in range(0, len(xt), args.batch):
        idx = perm[s:s + args.batch]
        t0 = time.perf_counter()
        train_step(model, opt, preprocess(xt[idx], prep).contiguous(memory_format=fmt), yt[idx])
        steps.append(time.perf_counter() - t0)
    epoch = time.perf_counter() - t_epoch
    print(f"{args.model}, {len(xt):,} images ({src}), batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{'NCHW' if args.no_channels_last else 'channels-last'}: epoch {epoch:.1f} s, "
          f"median step {statistics.median(steps) * 1000:.0f} ms over {len(steps)} steps")


if __name__ == "__main__":
    main()
