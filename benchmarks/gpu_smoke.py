"""Run once each, on a small slice of CIFAR-10, the training options and commands whose CUDA path
the test suite cannot reach (it runs on CPUs), and print one line per step: ok or FAILED, its
seconds and its last line of figures (or its error). A check that they run on a GPU, and of
what they print there; not a timing and not an accuracy:

    python benchmarks/gpu_smoke.py --npz .devicework/cifar10     # on the GPU machine
    python benchmarks/gpu_smoke.py --device cpu                    # the same steps on this CPU
                                                                   # (without --cuda-graph, CUDA only)

Each step is ``cifarlab`` as a user types it, run in this process through the CLI's ``main``
(one CUDA context, one import of torch: the whole check takes a minute or two), with one epoch
where a recipe has many. A step whose run folder another step needs is marked, and a step
whose input failed is reported as not run rather than as a second failure. The exit status is
the number of failed steps (0: all ran).

``--npz DIR`` reads DIR/train.npz and DIR/test.npz (x: uint8 N,32,32,3; y: labels) as the anchor
script writes them; ``--data`` any source cifarlab reads; neither, seeded random images (the
steps run, their accuracies mean nothing). ``--train-images`` and ``--test-images`` of them,
class-balanced, are written to one .npz in a temporary folder, with the CIFAR-10 class names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# (name, the step whose run folder it reads or None, cifarlab's arguments). {data}, {dev} and
# {out} are filled in, and {run_NAME} becomes step NAME's run folder.
STEPS = [
    ("resnet", None, "train --recipe resnet --epochs 1 --data {data} --device {dev} --out {out}"),
    ("resnet56", None, "train --recipe resnet --model resnet56 --epochs 1 --data {data} --device {dev} --out {out}"),
    ("auto-precision", None, "train --recipe fast --epochs 1 --precision auto --batch-size 256 --data {data} "
                             "--device {dev} --out {out}"),
    ("graph-class-weight", None, "train --epochs 1 --cuda-graph --class-weight balanced --data {data} "
                                 "--device {dev} --out {out}"),
    ("graph-logit-adjust", None, "train --epochs 1 --cuda-graph --logit-adjustment 1 --data {data} "
                                 "--device {dev} --out {out}"),
    ("classes", None, "train --epochs 1 --classes cat,dog,ship --data {data} --device {dev} --out {out}"),
    ("teacher", "resnet", "train --model keras-shallow --epochs 1 --teacher {run_resnet} --data {data} "
                          "--device {dev} --out {out}"),
    ("lr-find", None, "train --lr-find --lr-find-steps 30 --data {data} --device {dev} --out {out}"),
    ("graph-ema", None, "train --epochs 1 --cuda-graph --ema 0.99 --data {data} --device {dev} --out {out}"),
    ("graph-adamw-clip", None, "train --epochs 1 --cuda-graph --optimizer adamw --weight-decay 0.004 "
                               "--global-clipnorm 1 --data {data} --device {dev} --out {out}"),
    ("mixing", None, "train --epochs 1 --mixup 0.2 --cutmix 1 --data {data} --device {dev} --out {out}"),
    # the policies inside the prepared epochs (fast), and in each step's batch
    ("trivialaugment", None, "train --recipe fast --epochs 1 --auto-augment trivialaugment --data {data} "
                             "--device {dev} --out {out}"),
    ("randaugment", None, "train --epochs 1 --augment crop-flip --auto-augment randaugment --data {data} "
                          "--device {dev} --out {out}"),
    ("evaluate", "resnet", "evaluate {run_resnet} --data {data} --device {dev}"),
    ("calibrate", "resnet", "calibrate {run_resnet} --data {data} --device {dev}"),
    ("audit", "resnet", "audit {run_resnet} --data {data} --device {dev}"),
    ("robustness", "resnet", "robustness {run_resnet} --data {data} --device {dev} --images 200 "
                             "--corruptions gaussian_noise,fog --severities 1,5"),
    ("explain", "resnet", "explain {run_resnet} --data {data} --device {dev}"),
    ("label-issues", "resnet", "label-issues {run_resnet} --data {data} --device {dev}"),
    ("ood", "resnet", "ood {run_resnet} --data {data} --device {dev}"),
    ("ood-held-out", "classes", "ood {run_classes} --data {data} --device {dev}"),
    ("duplicates", "resnet", "duplicates {run_resnet} --data {data} --device {dev}"),
    ("compare", "teacher", "compare {run_resnet} {run_teacher} --data {data} --device {dev}"),
    # one subset and validation split for both runs, so that 1,200 images are left for their ensemble's temperature
    ("runs", None, "train --epochs 1 --runs 2 --subset 1000 --split-seed 0 --data {data} --device {dev} --out {out}"),
    ("calibrate-runs", "runs", "calibrate {run_runs} --data {data} --device {dev}"),  # each run, then the ensemble
    ("evaluate-runs", "runs", "evaluate {run_runs} --data {data} --device {dev}"),  # with their ensemble
    ("ood-runs", "runs", "ood {run_runs} --data {data} --device {dev} --count 1000"),  # each run, then the ensemble
]

# the openings of the lines by which commands name the files they wrote, passed over for a line of figures
FILE_LINES = ("Report files", "wrote ", "written to ", "curve in ", "* differs", "summary in ")


def slice_data(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """``--train-images`` and ``--test-images`` of the chosen data, class-balanced, as one .npz in
    ``folder``, with a description of where they came from."""
    from cifarlab.data import balanced_subset
    from cifarlab.data.cifar import CIFAR10_CLASSES

    n_tr, n_te = args.train_images, args.test_images
    if args.npz:
        tr, te = np.load(args.npz / "train.npz"), np.load(args.npz / "test.npz")
        parts = tr["x"], tr["y"], te["x"], te["y"]
        source = f"{args.npz}/train.npz and test.npz"
    elif args.data:
        from cifarlab.data import load_dataset

        ds = load_dataset(args.data)
        parts = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        source = str(args.data)
    else:
        rng = np.random.default_rng(0)
        parts = (rng.integers(0, 256, (n_tr, 32, 32, 3), dtype=np.uint8), np.arange(n_tr) % 10,
                 rng.integers(0, 256, (n_te, 32, 32, 3), dtype=np.uint8), np.arange(n_te) % 10)
        source = "seeded random images (no data given)"
    x_tr, y_tr, x_te, y_te = parts
    # class-balanced slices: a copy sorted by class would give a first slice of one class
    y_tr, y_te = np.asarray(y_tr, np.int64).reshape(-1), np.asarray(y_te, np.int64).reshape(-1)
    tr, te = balanced_subset(y_tr, n_tr, 0), balanced_subset(y_te, n_te, 0)
    x_tr, y_tr, x_te, y_te = x_tr[tr], y_tr[tr], x_te[te], y_te[te]
    path = folder / "slice.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, classes=np.array(CIFAR10_CLASSES))
    return path, f"{len(x_tr):,} training and {len(x_te):,} test images of {source}"


def run_step(argv: list[str]) -> tuple[bool, str]:
    """``cifarlab ARGV`` in this process: whether it exited 0, and its last line of figures (not
    one that names the files written) or the last line of its error."""
    from cifarlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:  # argparse's refusal of an option
        code = e.code if isinstance(e.code, int) else 2
    except Exception:  # noqa: BLE001 - a traceback is what this check is for: report it and go on
        return False, traceback.format_exc().strip().splitlines()[-1]
    lines = [ln for ln in (err.getvalue() if code else out.getvalue()).splitlines()
             if ln.strip() and (code or not ln.startswith(FILE_LINES))]
    return code == 0, (lines[-1] if lines else "(no output)")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the number of failed steps."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", type=Path, help="folder with train.npz and test.npz")
    ap.add_argument("--data", help="any data source cifarlab reads (default: --npz, else random images)")
    ap.add_argument("--device", default="cuda", help="device of every step (default cuda)")
    ap.add_argument("--train-images", type=int, default=2000, help="training images of the slice (default 2000)")
    ap.add_argument("--test-images", type=int, default=1000, help="test images of the slice (default 1000)")
    ap.add_argument("--only", help="comma-separated step names to run (default all); the steps they read run too")
    args = ap.parse_args(argv)
    names = [s[0] for s in STEPS]
    chosen = set(names)
    if args.only:
        chosen = set(args.only.split(","))
        unknown = sorted(chosen - set(names))
        if unknown:
            ap.error(f"--only: unknown step(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        for name, needs, _ in reversed(STEPS):  # a step reads only earlier steps' runs: one pass back
            if name in chosen and needs:
                chosen.add(needs)
    import torch

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: CUDA is not available here; give --device cpu to check the steps")
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    failed, done = 0, {}
    with tempfile.TemporaryDirectory(prefix="cifarlab-smoke-") as tmp:
        data, about = slice_data(args, Path(tmp))
        print(f"data: {about}; device {args.device}")
        for name, needs, text in STEPS:
            if name not in chosen:
                continue
            if needs and not done.get(needs):
                print(f"{name:<20} not run  (it reads step {needs}'s run, which did not finish)")
                continue
            out = Path(tmp) / name
            fill = {"data": data, "dev": args.device, "out": out} | {f"run_{k}": Path(tmp) / k for k in names}
            argv = [word.format(**fill) for word in text.split()]  # split first: a path may hold spaces
            if not args.device.startswith("cuda") and "--cuda-graph" in argv:
                argv.remove("--cuda-graph")  # CUDA only: the rest of the step still runs
            start = time.perf_counter()
            ok, last = run_step(argv)
            done[name] = ok
            failed += not ok
            print(f"{name:<20} {'ok' if ok else 'FAILED':<7} {time.perf_counter() - start:6.1f} s  {last[:160]}")
    skipped = len(chosen) - len(done)
    print(f"{len(done) - failed} steps ok, {failed} failed, {skipped} not run")
    return failed


if __name__ == "__main__":
    sys.exit(main())
