"""keras-deep training epochs on the CPU: cifarlab against the notebook run in Keras 3 with the
TensorFlow backend, in the same benchmark run, same model, batch 128, same images.

Each framework trains in its own process (neither inherits the other's threads or allocator
settings), and the processes alternate ``--rounds`` times so that slow phases of a shared machine
hit both. Each process trains one warm-up epoch, then ``--epochs`` timed epochs of ``--batches``
batches: Keras with ``model.fit`` as the notebook trains (data in float32 already scaled to
[0, 1]); cifarlab with its training step, scaling the uint8 images inside the timed step. Every
step is timed; printed are the median (and 10th and 90th percentile) milliseconds per step of
each and the ratio of the medians. cifarlab is timed twice: as ``cifarlab train`` runs (with
its own CPU kernels for convolution weight gradients and dropout, :mod:`cifarlab.cpu_kernels`)
and with PyTorch's kernels only (``--no-cpu-kernels``). Keras is also timed twice: as the notebook runs it, and
with the host-memory setting cifarlab applies to itself (glibc's mmap and trim thresholds), to
show how much of the difference that setting is.

``--precision bf16`` times both in bfloat16 mixed precision instead (on CPUs with bfloat16 units,
AMX or AVX512-BF16): cifarlab with ``--precision bf16`` autocast (its kernels where they apply
there: dropout, ReLU-pool and RMSprop) against Keras with its ``mixed_bfloat16`` policy;
``--precision fp32 bf16`` times both precisions in one run. The notebook itself trains in
float32, so Keras' float32 run is the notebook; with both, the last lines compare cifarlab in
bf16 with it too (a change of arithmetic: its accuracy is a separate measurement, in
docs/performance.md).

Keras/TensorFlow is a benchmark-only extra (``pip install tensorflow-cpu``), looked for in
``--keras-python`` (default: this interpreter); without it only cifarlab is timed. That
interpreter needs numpy and Keras only: this process decodes the images once and hands every
worker the same arrays in a temporary ``.npz``.
Usage: python benchmarks/cpu_speed.py [--batches 40] [--epochs 3] [--rounds 2] [--precision fp32 [bf16]]
    [--keras-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import cpu_line, timed_epoch, training_images

BATCH = 128


def steps_cifarlab(x: np.ndarray, y: np.ndarray, epochs: int, threads: int | None,
                   kernels: bool = True, precision: str = "fp32") -> tuple[list, list]:
    """Seconds of each step of the timed epochs (after one warm-up epoch), and of each epoch;
    ``kernels=False`` trains with PyTorch's kernels only (``--no-cpu-kernels``); ``precision``
    as ``cifarlab train --precision`` takes it on the CPU."""
    import torch

    from cifarlab import runtime
    from cifarlab.config import OptimConfig
    from cifarlab.models import create_model
    from cifarlab.optim import build_optimizer

    device = runtime.setup("cpu", threads)
    autocast = runtime.autocast(device, precision)
    runtime.seed_everything(0)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))
    model = create_model("keras-deep").to(memory_format=torch.channels_last).train()
    opt = build_optimizer(model.parameters(), OptimConfig(), cpu_kernels=kernels)
    out, epoch_s = [], []
    for epoch in range(epochs + 1):
        steps, seconds = timed_epoch(model, opt, xt, yt, BATCH, torch.channels_last, kernels=kernels,
                                     autocast=autocast)
        if epoch:
            out += steps
            epoch_s.append(seconds)
    return out, epoch_s


def steps_keras(x: np.ndarray, y: np.ndarray, epochs: int, precision: str = "fp32") -> tuple[list, list]:
    """Seconds of each step of the timed epochs of one ``model.fit`` call (after one warm-up
    epoch), and of each epoch, from a callback's timestamps; in bf16 under Keras'
    ``mixed_bfloat16`` policy (float32 weights, bfloat16 arithmetic, the softmax in float32)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    if precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, padding="same"), layers.Activation("relu"),
        layers.Conv2D(32, 3, padding="same"), layers.Activation("relu"),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Conv2D(64, 3, padding="same"), layers.Activation("relu"),
        layers.Conv2D(64, 3, padding="same"), layers.Activation("relu"),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Flatten(), layers.Dense(512), layers.Activation("relu"), layers.Dropout(0.5),
        layers.Dense(10), layers.Activation("softmax", dtype="float32")])
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.RMSprop(), metrics=["accuracy"])
    xf = x.astype("float32") / 255
    yo = np.eye(10, dtype="float32")[y]
    stamps: list[float] = []
    epoch_s: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            stamps.clear()
            stamps.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if epoch:  # the first epoch is the warm-up (graph tracing)
                epoch_s.append(time.perf_counter() - stamps[0])
                out.extend(b - a for a, b in zip(stamps, stamps[1:]))

    out: list[float] = []
    # One fit call for all epochs, as the notebook trains: its one-off set-up is not charged
    # to any epoch, its per-epoch work (shuffling, iterators) is.
    model.fit(xf, yo, batch_size=BATCH, epochs=epochs + 1, shuffle=True, verbose=0, callbacks=[Clock()])
    return out, epoch_s


def worker(args: argparse.Namespace) -> None:
    x, y, _ = training_images(args.batches * BATCH, Path(args.npz))
    (precision,) = args.precision
    if args.worker == "keras":
        try:
            times, epochs = steps_keras(x, y, args.epochs, precision)
        except ImportError:
            times, epochs = None, None
    else:
        from cifarlab import cpu_kernels

        kernels = args.worker == "cifarlab"
        if kernels and cpu_kernels.load() is None:  # each process loads them anew
            raise SystemExit(f"cifarlab's CPU kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
        times, epochs = steps_cifarlab(x, y, args.epochs, args.threads, kernels=kernels, precision=precision)
    print(json.dumps({"times": times, "epochs": epochs}))


def run_worker(python: str, name: str, precision: str, args: argparse.Namespace, env: dict | None = None) -> dict:
    cmd = [python, __file__, "--worker", name, "--batches", str(args.batches), "--epochs", str(args.epochs),
           "--precision", precision, "--npz", args.npz]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"the {name} worker ({precision}) failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# glibc's documented environment form of the mallopt calls in cifarlab.runtime.keep_freed_memory.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}
OURS = ("cifarlab", "cifarlab-pytorch")
NAMES = (*OURS, "keras", "keras+malloc")


def measure(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """Per-step and per-epoch seconds of every (name, precision), the processes alternating
    round by round; Keras' entries are left out where it is not installed (its first worker
    says so, and no other is started)."""
    runs: dict[tuple[str, str], list[float]] = {}
    epoch_s: dict[tuple[str, str], list[float]] = {}
    x, y, src = training_images(args.batches * BATCH)
    with tempfile.TemporaryDirectory(prefix="cpu_speed-") as tmp:
        np.savez(Path(tmp) / "train.npz", x=x, y=y)
        args.npz = tmp
        _alternate(args, runs, epoch_s)
    return runs, epoch_s, src


def _alternate(args: argparse.Namespace, runs: dict, epoch_s: dict) -> None:
    """Every worker ``args.rounds`` times, in turn, adding their seconds to ``runs`` and ``epoch_s``."""
    have_keras = True
    for _ in range(args.rounds):
        for precision in args.precision:
            for name in NAMES:
                if name in OURS:
                    r = run_worker(sys.executable, name, precision, args)
                elif have_keras:
                    r = run_worker(args.keras_python, "keras", precision, args,
                                   TUNED_MALLOC if name == "keras+malloc" else None)
                    have_keras = r["times"] is not None
                if name in OURS or have_keras:
                    runs.setdefault((name, precision), []).extend(r["times"])
                    epoch_s.setdefault((name, precision), []).extend(r["epochs"])


LABELS = {"cifarlab": "cifarlab (channels-last, its CPU kernels)",
          "cifarlab-pytorch": "cifarlab with PyTorch's kernels only",
          "keras": "Keras 3 / TensorFlow, model.fit",
          "keras+malloc": "the same Keras, cifarlab's malloc setting"}


def report(runs: dict, epoch_s: dict, args: argparse.Namespace) -> None:
    """The table of medians, then the ratios: each precision against Keras in the same
    precision, and cifarlab's bf16 against the notebook as it is written (Keras, float32)."""
    def med(d, name, precision):
        return statistics.median(d[(name, precision)])

    for (name, precision), v in runs.items():
        p10, p90 = np.percentile(v, [10, 90]) * 1000
        e = epoch_s[(name, precision)]
        print(f"{LABELS[name]:44s} {precision:5s} {statistics.median(v) * 1000:6.0f} ms ({p10:.0f}, {p90:.0f}); "
              f"whole epoch {statistics.median(e):.1f} s (min {min(e):.1f}, max {max(e):.1f})")
    if not any(name == "keras" for name, _ in runs):
        print("Keras/TensorFlow: not installed there (pip install tensorflow-cpu), not measured")
        return
    for precision in args.precision:
        whose = "as the notebook runs it" if precision == "fp32" else "in the same precision (mixed_bfloat16)"
        for what, d in (("step", runs), ("whole epoch", epoch_s)):
            ours = med(d, "cifarlab", precision)
            print(f"{precision} per {what}: cifarlab is {med(d, 'keras', precision) / ours:.2f}x the speed of Keras "
                  f"{whose} ({med(d, 'keras+malloc', precision) / ours:.2f}x against Keras with the malloc setting; "
                  f"{med(d, 'keras', precision) / med(d, 'cifarlab-pytorch', precision):.2f}x with PyTorch's "
                  f"kernels only)")
    if {"fp32", "bf16"} <= set(args.precision):
        for what, d in (("step", runs), ("whole epoch", epoch_s)):
            print(f"bf16 against the notebook (Keras in float32) per {what}: cifarlab in bf16 is "
                  f"{med(d, 'keras', 'fp32') / med(d, 'cifarlab', 'bf16'):.2f}x its speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40, help="batches of 128 per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per process, after one warm-up epoch")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the processes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="float32 (the notebook) and/or bfloat16 mixed precision, both frameworks in each")
    ap.add_argument("--keras-python", default=sys.executable, help="interpreter with keras and tensorflow")
    ap.add_argument("--worker", choices=["cifarlab", "cifarlab-pytorch", "keras"], help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)  # a worker's images: the folder measure() writes
    args = ap.parse_args()
    args.precision = list(dict.fromkeys(args.precision))  # each once, in the order given
    if args.worker:
        if len(args.precision) != 1:
            ap.error(f"a worker times one precision; got {args.precision}")
        worker(args)
        return
    runs, epoch_s, src = measure(args)
    n = args.rounds * args.epochs
    print(cpu_line() + ("; in bf16 all but the weight-gradient kernel apply" if "bf16" in args.precision else ""))
    print(f"data: {src}; keras-deep, batch {BATCH}, {' and '.join(args.precision)}; {n} timed epochs of "
          f"{args.batches} steps per framework and precision ({args.rounds} alternating rounds); "
          f"ms per step: median (p10, p90)")
    report(runs, epoch_s, args)


if __name__ == "__main__":
    main()
