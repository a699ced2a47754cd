"""Train recipes N times on the JPEG CIFAR-10 copy and print one table (recipe, accuracy
mean/min/max, training time mean/min). Meant for a GPU machine, side by side with the published
baseline (airbench):

    bash .devicework/anchor_airbench.sh 5            # decodes to .devicework/cifar10/*.npz, times airbench94
    python benchmarks/gpu_speed.py --npz .devicework/cifar10 --runs 5 --recipes fast keras-book keras-book:cuda-graph

A recipe may carry training switches after colons (``keras-book:cuda-graph``,
``fast:compile:bf16``; ``nchw`` trains in channels-first memory), so one table compares a
recipe plain and with them, on the same seeds. A switch ``section.key=value`` sets any config
value (``best:fp16-true:train.epochs=30``, ``fast-muon:optim.muon_lr=0.3``), for quick sweeps.
An entry's switches and settings win over the flags that apply to every entry (``--precision``,
``--epochs``, ``--compile``).

``--npz DIR`` reads DIR/train.npz and DIR/test.npz (x: uint8 N,32,32,3; y: labels), the arrays the
anchor script writes, so nothing is decoded twice; otherwise ``--data`` is loaded as usual.
Training time excludes data loading and evaluation (CUDA events on a GPU); the columns "with
test" add each run's test pass with its test-time augmentation, timed the same way, since
airbench's published times count its final test-time-augmented evaluation (and its whitening
initialisation, which cifarlab's training time includes too): airbench's figures compare with
those columns, like with like. Before its timed
runs, each entry trains once for ``--warmup-epochs`` (untimed, unreported), as airbench warms up
before it times: cuDNN's kernel search and torch.compile's compilation then fall outside the
figures, since they are paid once per process, not once per run. An entry that fails is
reported with its error and the others still run.

``--sync-check`` replaces the timed runs by one untimed epoch per entry under PyTorch's CUDA
sync debugging, and prints each line of code that made the host wait for the GPU, with its
count: a count near the epoch's step count is a synchronisation inside the step loop, which
should have none (the training clock and the evaluation wait once per epoch).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from bench_common import SHARED

from cifarlab.config import Config, resolve_config
from cifarlab.data import Dataset, load_dataset
from cifarlab.data.cifar import CIFAR10_CLASSES
from cifarlab.errors import ConfigError
from cifarlab.train import fit, fit_runs, steps_per_epoch

# Training switches a recipe entry may carry after colons.
SWITCHES = {"cuda-graph": {"cuda_graph": True}, "compile": {"compile": True}, "fp32": {"precision": "fp32"},
            "bf16": {"precision": "bf16"},
            "fp16": {"precision": "fp16"}, "bf16-true": {"precision": "bf16-true"},
            "fp16-true": {"precision": "fp16-true"}, "nchw": {"channels_last": False},
            "max-autotune": {"compile": True, "compile_mode": "max-autotune"}}


def npz_dataset(folder: Path) -> Dataset:
    """A Dataset from train.npz / test.npz (as written by the anchor script)."""
    tr, te = np.load(folder / "train.npz"), np.load(folder / "test.npz")
    return Dataset(tr["x"], tr["y"].astype(np.int64), te["x"], te["y"].astype(np.int64), list(CIFAR10_CLASSES),
                   str(folder), "npz")


def entry_config(entry: str, out: str, *, runs: int = 1, device: str = "auto", compile: bool = False,
                 precision: str | None = None, epochs: int | None = None, subset: int | None = None) -> Config:
    """The config of one ``--recipes`` entry (a recipe, then switches after colons), trained
    ``runs`` times into ``out``; the other options, where given, apply to every entry as the
    command line's flags of the same names do, and the entry's own switches and settings win
    over them (``fast:fp16-true`` stays fp16-true under ``--precision bf16``)."""
    recipe, *switches = entry.split(":")
    train: dict = {"runs": runs, "out": out, "device": device, "compile": compile}
    if precision:
        train["precision"] = precision
    if epochs:
        train["epochs"] = epochs
    settings: dict = {}
    for sw in switches:
        if "=" in sw:
            key, _, value = sw.partition("=")
            section, _, name = key.partition(".")
            if not name or not value:
                raise SystemExit(f"setting '{sw}' in '{entry}' must read section.key=value, as in train.epochs=30")
            settings.setdefault(section, {})[name] = value
            continue
        if sw not in SWITCHES:
            raise SystemExit(f"unknown switch '{sw}' in '{entry}'; valid: {', '.join(SWITCHES)}, "
                             "or a setting section.key=value")
        train.update(SWITCHES[sw])
    over: dict = {"train": train}
    if subset:
        over["data"] = {"subset": subset}
    for section, values in settings.items():  # after the switches, so a setting wins
        over.setdefault(section, {}).update(values)
    try:
        return resolve_config(recipe, overrides=over)
    except ConfigError as e:
        raise SystemExit(f"entry '{entry}': {e}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["fast", "best", "keras-book", "keras-book:cuda-graph"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--npz", type=Path, help="folder with train.npz and test.npz")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (quick checks)")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--warmup-epochs", type=int, default=1,
                    help="epochs of one untimed run per entry before its timed runs (0: none)")
    ap.add_argument("--sync-check", action="store_true",
                    help="instead of timing, list the code lines that synchronise with the GPU in one epoch")
    args = ap.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        # Every entry is resolved before the data is loaded, so a typo fails at once.
        options = dict(runs=args.runs, device=args.device, compile=args.compile, precision=args.precision,
                       epochs=args.epochs, subset=args.subset)
        plans = [(entry, entry_config(entry, f"{tmp}/{k}", **options)) for k, entry in enumerate(args.recipes)]
        ds = npz_dataset(args.npz) if args.npz else load_dataset(args.data)
        for k, (entry, cfg) in enumerate(plans):
            try:
                if args.warmup_epochs > 0:
                    fit(warmup_config(cfg, args.warmup_epochs, f"{tmp}/warmup-{k}"), dataset=ds, log=lambda line: None)
                if args.sync_check:
                    print(f"{entry}: {sync_check(cfg, ds, f'{tmp}/sync-{k}')}", flush=True)
                    continue
                s = fit_runs(cfg, dataset=ds, log=lambda line: None)
            except Exception:  # one failing entry (say, a switch this GPU lacks) must not hide the others
                print(f"{entry}: FAILED\n{traceback.format_exc()}", flush=True)
                failed += 1
                continue
            rows.append((entry, s))
            a, t = s["test_accuracy"], s["train_time_s"]
            per_run = ", ".join(f"{r['test_accuracy']:.4f} in {r['train_time_s']:.2f} s + test {r['test_time_s']:.2f} s"
                                for r in s["per_run"])
            print(f"{entry}: n={s['runs']} acc mean {a['mean']:.4f} min {a['min']:.4f} max {a['max']:.4f}; "
                  f"time mean {t['mean']:.2f} s min {t['min']:.2f} s (runs: {per_run})", flush=True)
    if not args.sync_check:
        print_table(rows)
    if failed:
        raise SystemExit(f"{failed} of {len(plans)} entries failed (see above)")


def print_table(rows: list) -> None:
    """The summary table: one row per entry that trained, the entry column as wide as the longest."""
    w = max([24] + [len(recipe) + 2 for recipe, _ in rows])
    print(f"\n{'recipe':<{w}}{'n':>3}{'acc mean':>10}{'acc min':>9}{'acc max':>9}{'time mean':>11}{'time min':>10}"
          f"{'with test mean':>16}{'with test min':>15}")
    for recipe, s in rows:
        a, t = s["test_accuracy"], s["train_time_s"]
        both = [r["train_time_s"] + r["test_time_s"] for r in s["per_run"]]
        print(f"{recipe:<{w}}{s['runs']:>3}{a['mean']:>10.4f}{a['min']:>9.4f}{a['max']:>9.4f}"
              f"{t['mean']:>10.2f}s{t['min']:>9.2f}s{sum(both) / len(both):>15.2f}s{min(both):>14.2f}s")


def sync_check(cfg: Config, ds: Dataset, out: str) -> str:
    """One untimed epoch of ``cfg`` into ``out`` with CUDA sync debugging on; returns the code
    lines whose operations made the host wait for the GPU, most frequent first, beside the
    epoch's number of steps."""
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "sync check skipped: it needs a CUDA device"
    c = warmup_config(cfg, 1, out)
    c.train.epochs = 1  # the warm-up has run; no recompilation is expected now
    n = min(c.data.subset or len(ds.y_train), len(ds.y_train))
    steps = steps_per_epoch(n - round(n * c.data.val_split), c)  # about: the split rounds per class
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(c, dataset=ds, log=lambda line: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    found = ", ".join(f"{where} x{k}" for where, k in counts.most_common()) or "none"
    return f"sync check, 1 epoch of about {steps} steps: synchronising lines: {found}"


def warmup_config(cfg: Config, epochs: int, out: str) -> Config:
    """``cfg`` as one short run into ``out``: the untimed warm-up before an entry's timed runs.
    A compiled entry whose whitening bias stops training after ``whiten_bias_epochs`` warms up
    one epoch past that point, so that the recompilation the change of trainable parameters
    brings also falls in the warm-up (an H200 showed compiled fast-muon runs at 1.76 to 2.23 s
    against 1.67 to 1.75 s eager after a one-epoch warm-up)."""
    c = copy.deepcopy(cfg)
    if c.train.compile and c.train.whiten_bias_epochs:
        epochs = max(epochs, min(c.train.epochs, c.train.whiten_bias_epochs + 1))
    c.train.runs, c.train.epochs, c.train.out = 1, epochs, out
    return c


if __name__ == "__main__":
    main()
