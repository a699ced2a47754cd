"""Time ``cifarlab duplicates``' search (:func:`cifarlab.duplicates.find_duplicates`) on the CPU,
plain and with mirror images, on the JPEG copy of CIFAR-10 (seeded random images where it is
absent), and print the seconds of each round with the number of test images found with a
training copy. Data loading is left out of the times; the run's predictions are not part of it.

Usage: python benchmarks/duplicates_speed.py [--data PATH] [--train 50000] [--test 10000]
[--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import SHARED, cpu_line

from cifarlab.data import Dataset
from cifarlab.duplicates import find_duplicates


def images(path: str, n_train: int, n_test: int) -> tuple[Dataset, str]:
    """The first ``n_train`` training and ``n_test`` test images of ``path`` as a data set, or
    seeded random ones where it does not exist (then every fourth test image is a shifted
    training image, so that the search has copies to find)."""
    if Path(path).is_file():
        from cifarlab.data import load_dataset

        ds = load_dataset(path)
        ds = Dataset(ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test], ds.y_test[:n_test], ds.classes,
                     ds.source, ds.kind)
        return ds, f"{len(ds.x_train):,} training and {len(ds.x_test):,} test images of {path}"
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    copies = np.arange(0, n_test, 4)
    x_test[copies] = np.roll(x_train[copies % n_train], 1, axis=2)
    ds = Dataset(x_train, rng.integers(0, 10, n_train), x_test, rng.integers(0, 10, n_test),
                 [str(c) for c in range(10)], "random", "memory")
    return ds, f"{n_train:,} training and {n_test:,} random test images (data copy absent), {len(copies):,} copies"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--train", type=int, default=50000, help="training images searched")
    ap.add_argument("--test", type=int, default=10000, help="test images looked up")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of plain and mirrored, alternating")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds, what = images(args.data, args.train, args.test)
    print(cpu_line())
    print(f"{what}; {torch.get_num_threads()} threads")
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for mirrored in (False, True):
            t0 = time.perf_counter()
            found = find_duplicates(ds, mirrored=mirrored)
            times[mirrored].append(time.perf_counter() - t0)
            copies = int((found["train_score"][:, 0] >= found["threshold"]).sum())
            print(f"round {r + 1}, {'mirrored' if mirrored else 'plain   '}: {times[mirrored][-1]:.1f} s, "
                  f"{copies:,} test images with a training copy")
    for mirrored, ts in times.items():
        print(f"{'mirrored' if mirrored else 'plain'}: median {statistics.median(ts):.1f} s "
              f"(min {min(ts):.1f}, max {max(ts):.1f}) over {len(ts)} rounds")


if __name__ == "__main__":
    main()
