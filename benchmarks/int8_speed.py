"""Time a run's float32 and int8 ONNX files (``cifarlab export`` and ``export --int8``) with ONNX
Runtime on the CPU: milliseconds per image at each batch size, the two files alternating round
by round so that a change in the machine's speed falls on both. The images are the JPEG copy's
test images (seeded random ones where it is absent); accuracy is not measured here (``export
--int8`` measures it on the whole test split).

Usage: python benchmarks/int8_speed.py RUN [--data PATH] [--batches 1,32,500] [--images 2000]
[--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import SHARED

from cifarlab.data import balanced_subset, load_dataset
from cifarlab.deploy import INPUT_NAME, OUTPUT_NAME, export_onnx
from cifarlab.quantize import quantize_file


def test_images(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration images (the first 1,000 training images, class-balanced) and ``n`` test
    images of ``path``, or seeded random images where it does not exist."""
    if Path(path).is_file():
        ds = load_dataset(path)
        return (ds.x_train[balanced_subset(ds.y_train, 1000, 0)], ds.x_test[:n],
                f"{len(ds.x_test[:n]):,} test images of {path}")
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), f"{n:,} random 32x32x3 images (data copy absent)")


def seconds(session, images: np.ndarray, batch: int) -> float:
    """Seconds to classify ``images`` in batches of ``batch``."""
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch]})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder of cifarlab train")
    ap.add_argument("--data", default=str(SHARED), help="the JPEG copy of CIFAR-10 (default: ../shared/...)")
    ap.add_argument("--batches", default="1,32,500", help="batch sizes, comma-separated")
    ap.add_argument("--images", type=int, default=2000, help="test images timed per round and batch size")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, the two files alternating")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime's intra-op threads (0: its default)")
    args = ap.parse_args()
    import onnxruntime as ort

    batches = [int(b) for b in args.batches.split(",")]
    calib, images, what = test_images(Path(args.data), args.images)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float32": Path(tmp) / "model.onnx", "int8": Path(tmp) / "model.int8.onnx"}
        export_onnx(args.run, paths["float32"], log=lambda _: None)
        quantize_file(paths["float32"], paths["int8"], calib)
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        for s in sessions.values():  # one untimed pass: first-run allocations
            seconds(s, images[:max(batches)], max(batches))
        times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in sessions for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                for k, s in sessions.items():
                    times[k, b].append(seconds(s, images, b) / len(images) * 1e3)
    print(f"{args.run}: {what}; onnxruntime {ort.__version__}, {args.threads or 'default'} threads, "
          f"{args.rounds} rounds; float32 {sizes['float32'] / 1e6:.1f} MB, int8 {sizes['int8'] / 1e6:.1f} MB")

    def cell(v: list[float], unit: str = "") -> str:
        return f"{statistics.median(v):.4f}{unit} ({min(v):.4f}-{max(v):.4f})"

    print(f"{'batch':>6}  {'float32 ms/image':<26}{'int8 ms/image':<26}int8 speed-up   (median, min-max)")
    for b in batches:
        f, q = times["float32", b], times["int8", b]
        ratios = [a / c for a, c in zip(f, q)]
        print(f"{b:>6}  {cell(f):<26}{cell(q):<26}{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
