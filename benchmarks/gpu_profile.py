"""Profile a few training epochs of one recipe entry with ``torch.profiler`` and print the
operations and kernels that take the most time: GPU time on a GPU, CPU time elsewhere. This is
how the profiles in docs/performance.md are taken (two epochs, after an untimed warm-up run, so
that cuDNN's kernel search and compilation fall outside them).

    python benchmarks/gpu_profile.py --npz .devicework/cifar10 --entry fast-muon:bf16 --epochs 2

The entry takes the same switches and settings as ``gpu_speed.py`` (``keras-book:cuda-graph``,
``best:fp16-true:train.epochs=30``). The profile covers data set-up and the final evaluation
too; the training time printed beside it is the run's own, from its clock.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from bench_common import SHARED
from gpu_speed import entry_config, npz_dataset, warmup_config
from torch.profiler import ProfilerActivity, profile

from cifarlab.data import load_dataset
from cifarlab.train import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="fast-muon:bf16", help="a recipe with switches, as gpu_speed.py takes")
    ap.add_argument("--epochs", type=int, default=2, help="epochs profiled")
    ap.add_argument("--npz", type=Path, help="folder with train.npz and test.npz")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--rows", type=int, default=28, help="rows of the table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = entry_config(args.entry, f"{tmp}/p", device=args.device, epochs=args.epochs, subset=args.subset)
        cfg.train.tta = "none"  # the evaluation is not what is profiled
        ds = npz_dataset(args.npz) if args.npz else load_dataset(args.data)
        fit(warmup_config(cfg, 1, f"{tmp}/w"), dataset=ds, log=lambda line: None)
        gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            m = fit(copy.deepcopy(cfg), dataset=ds, log=lambda line: None)
    print(f"{args.entry}: {args.epochs} epochs profiled, training time {m['train_time_s']:.3f} s "
          f"(under the profiler), test accuracy {m['test_accuracy']:.4f}")
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
