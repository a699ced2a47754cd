"""keras-deep training steps on the CPU: cifarlab against the notebook run in Keras 3 with the
TensorFlow backend, in the same run, same model, batch 128, same images.

Keras/TensorFlow is a benchmark-only extra (``pip install tensorflow-cpu``); without it only
cifarlab is timed. Prints the median step time of each (after warm-up) and the ratio.
Usage: python benchmarks/cpu_speed.py [--steps 60] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def data(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if SHARED.is_file():
        from cifarlab.data import load_dataset

        ds = load_dataset(SHARED)
        return ds.x_train[:n], ds.y_train[:n], "JPEG CIFAR-10 copy"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), "random images"


def time_cifarlab(x: np.ndarray, y: np.ndarray, batch: int, steps: int, warmup: int, threads: int | None) -> list[float]:
    import torch

    from cifarlab import runtime
    from cifarlab.config import OptimConfig
    from cifarlab.export import preprocess
    from cifarlab.models import create_model
    from cifarlab.optim import build_optimizer
    from cifarlab.train import train_step

    runtime.setup("cpu", threads)
    runtime.seed_everything(0)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))
    model = create_model("keras-deep").to(memory_format=torch.channels_last).train()
    opt = build_optimizer(model.parameters(), OptimConfig())
    out = []
    for s in range(warmup + steps):
        i = (s * batch) % (len(xt) - batch)
        t0 = time.perf_counter()
        train_step(model, opt, preprocess(xt[i:i + batch], {"rescale": 1 / 255}).contiguous(
            memory_format=torch.channels_last), yt[i:i + batch])
        out.append(time.perf_counter() - t0)
    return out[warmup:]


def time_keras(x: np.ndarray, y: np.ndarray, batch: int, steps: int, warmup: int) -> list[float] | None:
    try:
        import keras
        from keras import layers
    except ImportError:
        return None
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, padding="same"), layers.Activation("relu"),
        layers.Conv2D(32, 3, padding="same"), layers.Activation("relu"),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Conv2D(64, 3, padding="same"), layers.Activation("relu"),
        layers.Conv2D(64, 3, padding="same"), layers.Activation("relu"),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Flatten(), layers.Dense(512), layers.Activation("relu"), layers.Dropout(0.5),
        layers.Dense(10), layers.Activation("softmax")])
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.RMSprop(), metrics=["accuracy"])
    xf = x.astype("float32") / 255
    yo = np.eye(10, dtype="float32")[y]
    out = []
    for s in range(warmup + steps):
        i = (s * batch) % (len(xf) - batch)
        t0 = time.perf_counter()
        model.train_on_batch(xf[i:i + batch], yo[i:i + batch])
        out.append(time.perf_counter() - t0)
    return out[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    x, y, src = data(args.batch * 40)
    ours = statistics.median(time_cifarlab(x, y, args.batch, args.steps, args.warmup, args.threads))
    print(f"data: {src}; keras-deep, batch {args.batch}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"cifarlab (PyTorch, channels-last): {ours * 1000:.0f} ms per step")
    theirs = time_keras(x, y, args.batch, args.steps, args.warmup)
    if theirs is None:
        print("Keras/TensorFlow: not installed (pip install tensorflow-cpu), not measured")
        return
    k = statistics.median(theirs)
    print(f"Keras 3 / TensorFlow:              {k * 1000:.0f} ms per step")
    print(f"cifarlab is {k / ours:.2f}x the speed of Keras here")


if __name__ == "__main__":
    main()
