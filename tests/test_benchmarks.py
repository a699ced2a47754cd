"""The benchmark scripts run end to end on tiny data (on the CPU), so time on a GPU goes to
measuring rather than debugging them. No timing is asserted: benchmarks print figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import count_calls, dirichlet_draws, needs_kernel

ROOT = Path(__file__).resolve().parents[1]


def _anchor_arrays(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    """Random train.npz / test.npz in the layout the anchor script writes (x: uint8 N,32,32,3; y)."""
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)


def test_gpu_speed_table_from_anchor_style_arrays(tmp_path):
    """``gpu_speed.py --npz`` reads the arrays the anchor script writes and prints one row per
    recipe entry with n runs, accuracies in [0, 1] and positive training times. (``fast`` in
    batches of 50 rather than its 1024, so that a hundred images make batches; no warm-up, which
    the test below keeps.)"""
    _anchor_arrays(tmp_path, 150, 30, seed=0)
    fast = "fast:train.batch_size=50"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--npz", str(tmp_path), "--device", "cpu",
           "--runs", "2", "--epochs", "1", "--warmup-epochs", "0", "--subset", "100", "--recipes", "keras-book", fast]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows = {}
    for line in p.stdout.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)" + r"\s+([\d.]+)s" * 4, line.strip())
        if m:
            rows[m[1]] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"keras-book", fast}, p.stdout
    for n, mean, lo, hi, t_mean, t_min, both_mean, both_min in rows.values():
        assert n == 2 and 0 <= lo <= mean <= hi <= 1 and t_mean >= t_min > 0
        assert both_mean > t_mean and both_min > t_min  # the test passes' time on top


def test_gpu_speed_refuses_an_unknown_switch(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--npz", str(tmp_path),
                        "--recipes", "fast:turbo"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1 and "unknown switch 'turbo' in 'fast:turbo'; valid: cuda-graph, compile" in p.stderr


def test_gpu_speed_reports_a_failing_entry_and_still_runs_the_others(tmp_path):
    """A CUDA-graph entry on the CPU fails: the benchmark names it with its error, still prints
    the row of the entry after it (warmed up for an epoch first), and exits non-zero so a script
    notices."""
    _anchor_arrays(tmp_path, 300, 20, seed=1)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--npz", str(tmp_path), "--device", "cpu",
           "--runs", "1", "--epochs", "1", "--warmup-epochs", "1", "--subset", "200",
           "--recipes", "keras-book:cuda-graph", "keras-book"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 1 and "1 of 2 entries failed" in p.stderr, p.stderr
    assert "keras-book:cuda-graph: FAILED" in p.stdout and "train.cuda_graph needs a CUDA device" in p.stdout
    assert re.search(r"^keras-book\s+1\s+[\d.]+", p.stdout, re.M), p.stdout


def test_gpu_speed_warms_a_compiled_entry_up_past_its_whitening_bias_switch(monkeypatch):
    """Compiled and with a whitening bias that stops training after 3 epochs: a 4-epoch warm-up,
    so the recompilation falls outside the timed runs; otherwise the asked-for epochs."""
    from cifarlab.config import resolve_config

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_speed import warmup_config

    def epochs(recipe: str, **train) -> int:
        return warmup_config(resolve_config(recipe, overrides={"train": train}), 1, "w").train.epochs

    assert epochs("fast-muon", compile=True) == 4 and epochs("fast", compile=True) == 4
    assert epochs("fast-muon") == 1 and epochs("keras-book", compile=True) == 1
    assert epochs("fast-muon", compile=True, epochs=2) == 2  # never longer than the run itself


def test_gpu_speed_sync_check_counts_synchronising_lines(monkeypatch, tmp_path):
    """The sync check turns CUDA sync debugging on for one epoch, counts the warnings it raises by
    code line, and turns it off again even when training fails (CUDA emulated: the check's
    bookkeeping is what runs here)."""
    import warnings

    import torch

    from cifarlab.config import resolve_config

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_speed

    modes, epochs = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def fake_fit(cfg, dataset, log):
        epochs.append(cfg.train.epochs)
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # one line, three times
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")

    monkeypatch.setattr(gpu_speed, "fit", fake_fit)
    _anchor_arrays(tmp_path, 1000, 10, seed=2)
    ds = gpu_speed.npz_dataset(tmp_path)
    cfg = resolve_config("keras-book", overrides={"train": {"device": "cuda"}})
    line = gpu_speed.sync_check(cfg, ds, str(tmp_path / "s"))  # 800 images after the 0.2 split, batch 128
    assert re.fullmatch(r"sync check, 1 epoch of about 7 steps: synchronising lines: "
                        r"test_benchmarks\.py:\d+ x3, test_benchmarks\.py:\d+ x1", line), line
    assert modes == ["warn", "default"] and epochs == [1]

    def failing_fit(cfg, dataset, log):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu_speed, "fit", failing_fit)
    with pytest.raises(RuntimeError):
        gpu_speed.sync_check(cfg, ds, str(tmp_path / "s2"))
    assert modes[-1] == "default"


def test_gpu_speed_entries_take_config_settings(monkeypatch):
    """``section.key=value`` switches set config values after the named switches; a bad one
    stops the benchmark before any training, naming the entry and what is valid."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_speed import entry_config

    cfg = entry_config("best:fp16-true:train.epochs=30:optim.lr=0.5:train.precision=bf16", "o", runs=2)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.precision, cfg.train.runs) == (30, 0.5, "bf16", 2)
    assert cfg.model.name == "speednet-wide"
    # The command line's options apply to every entry; an entry's own switches and settings win.
    cfg = entry_config("fast:fp16-true:train.epochs=3", "o", runs=1, precision="bf16", epochs=5)
    assert (cfg.train.precision, cfg.train.epochs) == ("fp16-true", 3)
    cfg = entry_config("fast", "o", runs=1, precision="bf16", epochs=5)
    assert (cfg.train.precision, cfg.train.epochs) == ("bf16", 5)
    # The speed recipes' own precision is auto; fp32 must be asked for by name.
    assert entry_config("fast", "o").train.precision == "auto"
    assert entry_config("fast:fp32", "o").train.precision == "fp32"
    for bad, message in [("fast:train.epochs", "unknown switch 'train.epochs' in 'fast:train.epochs'; valid: "
                                               "cuda-graph, compile"),
                         ("fast:train.epochs=", "must read section.key=value"),
                         ("fast:trian.epochs=3", "unknown section 'trian' (did you mean 'train'?); valid sections: "
                                                 "recipe, "),
                         ("fast:train.epochs=many", "train.epochs: 'many' is not valid; expected a whole number"),
                         ("fast:train.epochs=0", "entry 'fast:train.epochs=0': epochs = 0 is not valid")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            entry_config(bad, "o", runs=2)


def test_step_ops_counts_the_casts_autocast_adds(monkeypatch):
    """A keras-book step in bf16 autocast casts every weight and its gradient; with bf16 weights
    (bf16-true) those casts are gone and the step runs about as many operations as in fp32."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from step_ops import COPIES, count_step

    counts = {p: count_step("keras-book", p, batch=4) for p in ("fp32", "bf16", "bf16-true")}
    copies = {p: sum(c[k] for k in COPIES) for p, c in counts.items()}
    total = {p: sum(c.values()) for p, c in counts.items()}
    assert copies["fp32"] == 0 and copies["bf16-true"] <= 2 and copies["bf16"] >= 12  # 6 weights and 6 gradients
    assert total["bf16-true"] - copies["bf16-true"] == total["fp32"]
    assert counts["fp32"]["convolution_backward"] == 4 and counts["fp32"]["addmm"] >= 2


def test_gpu_profile_prints_a_table_of_the_profiled_epochs(tmp_path):
    """On the CPU, the profile of one keras-book epoch lists its convolutions by CPU time."""
    _anchor_arrays(tmp_path, 300, 20, seed=3)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--npz", str(tmp_path), "--device", "cpu",
           "--entry", "keras-book", "--epochs", "1", "--subset", "200", "--rows", "40"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^keras-book: 1 epochs profiled, training time [\d.]+ s", p.stdout, re.M), p.stdout
    assert "Self CPU" in p.stdout and "convolution" in p.stdout


def test_every_gpu_check_entry_resolves(monkeypatch):
    """Every recipe entry that gpu_check.sh hands to gpu_speed.py is a valid config here, so no
    GPU time is lost to a typo in an entry."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_speed import entry_config

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    entries = [e for m in re.finditer(r"--recipes ([^\n]+)", script) for e in m[1].split()]
    assert len(entries) >= 15 and "fast-muon:fp16-true:max-autotune" in entries
    for entry in entries:
        cfg = entry_config(entry, "o", runs=5)
        assert cfg.recipe == entry.split(":")[0]


def test_gpu_speed_table_widens_for_long_entries(monkeypatch, capsys):
    """An entry longer than the default column (``keras-book:cuda-graph:fp16-true:compile``)
    keeps every figure under its heading."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_speed import print_table

    stats = {"runs": 3, "test_accuracy": {"mean": 0.75, "min": 0.74, "max": 0.76},
             "train_time_s": {"mean": 4.61, "min": 4.6},
             "per_run": [{"train_time_s": t, "test_time_s": 0.25} for t in (4.6, 4.61, 4.62)]}
    print_table([("fast", stats), ("keras-book:cuda-graph:fp16-true:compile", stats)])
    header, *rows = capsys.readouterr().out.strip("\n").splitlines()
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    for r in rows:  # each figure ends where its heading ends
        assert r[:header.index(" n") + 2].rstrip().endswith("3")
        assert r.index("0.7500") + 6 == header.index("acc mean") + 8
        # training and test pass together, per run: mean 4.86 s, min 4.85 s
        assert r.index("4.86s") + 5 == header.index("with test mean") + 14
        assert r.endswith("4.85s") and header.endswith("with test min")


def test_gpu_check_open_part_keeps_to_its_budget(tmp_path):
    """The part ``open`` runs its steps in order while MIN_LEFT seconds or more of BUDGET are
    left, and names each step it leaves out (a stand-in ``python`` that takes 2 s per step, no GPU
    needed: with 8 s of budget and 5 s kept back, the first two steps run and the third finds
    at most 4 s left, whichever way the shell's whole seconds fall)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "ran: $*"\nsleep 2\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho stand-in GPU\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BUDGET": "8", "MIN_LEFT": "5"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "open", "5"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    ran = [line for line in p.stdout.splitlines() if line.startswith("ran: ")]
    skipped = [line for line in p.stdout.splitlines() if line.startswith("not run, ")]
    assert len(ran) == 2 and "fast-muon:fp16-true fast-muon:bf16" in ran[0] and ":compile" in ran[1]
    assert len(skipped) == 6 and "gpu_smoke.py" in skipped[0] and "best-select:bf16" in skipped[1]
    assert "--sync-check" in skipped[-2]
    assert "gpu_profile.py" in skipped[-1] and "keras-book:bf16" in skipped[-1]


def _tiny_linear():
    """A 4 -> 3 linear model with every weight at 1.5, and a batch of 8 for it (seed 0)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(1.5)
    return model, torch.randn(8, 4), torch.arange(8) % 3


def _half_storage_step(dtype, lr: float, steps: int = 3):
    """A tiny linear model trained ``steps`` times through HalfStorage (Keras RMSprop)."""
    from cifarlab.config import OptimConfig
    from cifarlab.train import train_step
    from half_storage import HalfStorage

    model, x, y = _tiny_linear()
    opt = HalfStorage(model, OptimConfig(lr=lr), dtype, scale=8.0)
    for _ in range(steps):
        train_step(model, opt, x, y)
    return model, opt


def test_half_storage_in_float32_steps_as_the_plain_optimizer(monkeypatch):
    """The emulation's plumbing (scale, round, unscale, update the masters, copy back) changes
    nothing when the storage is float32: the same weights, bit for bit, as the optimizer alone."""
    import torch

    from cifarlab.config import OptimConfig
    from cifarlab.optim import build_optimizer
    from cifarlab.train import train_step

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    emulated, _ = _half_storage_step(torch.float32, lr=1e-2)
    plain, x, y = _tiny_linear()
    opt = build_optimizer(plain.parameters(), OptimConfig(lr=1e-2))
    for _ in range(3):
        train_step(plain, opt, x, y)
    assert torch.equal(emulated.weight, plain.weight) and torch.equal(emulated.bias, plain.bias)
    assert not torch.equal(plain.weight, torch.full_like(plain.weight, 1.5))  # it did train


def test_half_storage_loses_updates_below_the_rounding_step(monkeypatch):
    """Keras RMSprop moves a weight by at most lr * 3.2 a step (lr * g / sqrt(0.1 g^2) at first);
    between 1 and 2, float16's rounding step is 2^-10 and bfloat16's 2^-7, so lr 1e-4 leaves
    weights of 1.5 where they were in both, while float16 keeps the steps of lr 1e-3 that
    bfloat16 loses; the masters and the optimizer state stay in their dtype."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for dtype, lr, moved in ((torch.float16, 1e-4, False), (torch.bfloat16, 1e-4, False),
                             (torch.float16, 1e-3, True), (torch.bfloat16, 1e-3, False),
                             (torch.float32, 1e-4, True)):
        model, opt = _half_storage_step(dtype, lr)
        assert bool((model.weight != 1.5).any()) == moved, (dtype, lr)
        assert all(m.dtype == dtype for m in opt.masters)
        assert all(v.dtype == dtype for v in (opt.inner.state[m]["velocity"] for m in opt.masters))


def test_half_storage_trains_keras_book_on_tiny_data_and_refuses_other_recipes(monkeypatch):
    """One epoch of keras-book on 200 random images in each storage dtype gives a test accuracy;
    a recipe with a learning-rate schedule is refused by name before any data is read."""
    from cifarlab.config import Config
    from cifarlab.data import Dataset
    from cifarlab.recipes import apply_recipe

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from half_storage import train

    rng = np.random.default_rng(0)
    ds = Dataset(rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), np.arange(200) % 10,
                 rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), np.arange(30) % 10,
                 [str(i) for i in range(10)], "random", "test")
    cfg = apply_recipe(Config(), "keras-book")
    cfg.train.epochs, lines = 1, []
    for storage in ("fp32", "fp16", "bf16"):
        r = train(cfg, ds, storage, lines.append)
        assert r["storage"] == storage and 0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0
    assert len(lines) == 3 and lines[1].startswith("fp16 epoch 1: loss ")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "half_storage.py"), "--recipe", "fast",
                        "--data", "/nonexistent"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1 and "recipe 'fast' is not valid here" in p.stderr


@needs_kernel
@pytest.mark.parametrize("conv_kernel,pool_kernel", [(True, True), (False, False), (None, True)])
def test_cpu_epoch_timing_takes_the_kernels_as_asked(monkeypatch, conv_kernel, pool_kernel):
    """``timed_epoch`` (behind cpu_epoch.py and cpu_speed.py) trains with the convolution
    weight-gradient kernel on, off, or where the CPU makes it pay off, and with the ReLU-pool
    kernel on or off, so one machine can time each; dropout takes cifarlab's kernel in every case."""
    import torch

    from cifarlab import cpu_kernels
    from cifarlab.config import OptimConfig
    from cifarlab.models import create_model
    from cifarlab.optim import build_optimizer

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_common import timed_epoch

    calls = count_calls(monkeypatch, cpu_kernels, "conv3x3_weight_grad", "dropout", "relu_max_pool2")
    torch.manual_seed(0)
    model = create_model("keras-deep", img_size=8).to(memory_format=torch.channels_last).train()
    opt = build_optimizer(model.parameters(), OptimConfig())
    x, y = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 10
    steps, _ = timed_epoch(model, opt, x, y, 8, torch.channels_last, conv_kernel=conv_kernel,
                           pool_kernel=pool_kernel)
    assert len(steps) == 2
    want_conv = cpu_kernels.conv_kernel_pays_off() if conv_kernel is None else conv_kernel
    assert calls["conv3x3_weight_grad"] == (2 * 4 if want_conv else 0)  # all four convolutions have 32 or 64 filters
    assert calls["dropout"] == 2 * 3
    assert calls["relu_max_pool2"] == (2 * 2 if pool_kernel else 0)  # both ReLU-pool pairs of keras-deep


def test_cpu_epoch_times_the_recipe_and_precision_asked(monkeypatch, capsys):
    """cpu_epoch.py --recipe fast --precision bf16 times the fast recipe's step: its model, its
    optimizer groups (batch-norm biases at 64 times the lr), its label smoothing, under bf16 autocast."""
    import torch

    import cifarlab.train as train_mod

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_epoch

    seen = []
    real = train_mod.train_step

    def spy(model, opt, x, y, label_smoothing=0.0, autocast=None, **k):
        seen.append((type(model).__name__, [g["lr"] for g in opt.param_groups], label_smoothing, autocast))
        return real(model, opt, x, y, label_smoothing, autocast=autocast, **k)

    monkeypatch.setattr(train_mod, "train_step", spy)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(cpu_epoch, "training_images", lambda n: (
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), f"{n} random images"))
    monkeypatch.setattr(sys, "argv", ["cpu_epoch.py", "--recipe", "fast", "--precision", "bf16", "--images", "16",
                                      "--batch", "8", "--threads", "1"])
    cpu_epoch.main()
    assert len(seen) == 2
    name, lrs, smoothing, autocast = seen[0]
    assert name == "SpeedNet" and smoothing == 0.2 and lrs[0] == pytest.approx(64 * lrs[1])
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16
    assert "fast's step, speednet, bf16, 16 random images, batch 8" in capsys.readouterr().out


@needs_kernel
def test_cpu_epoch_compile_times_the_compiled_model_without_cifarlabs_kernels(monkeypatch, capsys):
    """cpu_epoch.py --compile runs as ``train --compile`` does: the model through
    runtime.maybe_compile (a stand-in here, as compiling takes minutes), none of cifarlab's
    kernels, and the first, compiling step kept out of the median."""
    from cifarlab import cpu_kernels, runtime

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_epoch

    asked = []
    monkeypatch.setattr(runtime, "maybe_compile", lambda model, enabled, mode="default": asked.append(enabled) or model)
    calls = count_calls(monkeypatch, cpu_kernels, "dropout", "relu_max_pool2", "keras_rmsprop_")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(cpu_epoch, "training_images", lambda n: (
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), f"{n} random images"))
    for flags in ([], ["--compile"]):
        monkeypatch.setattr(sys, "argv", ["cpu_epoch.py", "--images", "24", "--batch", "8", "--threads", "1", *flags])
        cpu_epoch.main()
    out = capsys.readouterr().out.splitlines()
    assert asked == [False, True]
    assert calls == {"dropout": 3 * 3, "relu_max_pool2": 3 * 2, "keras_rmsprop_": 3}  # the eager run's only
    assert "compiled" not in out[1] and out[1].endswith("over 3 steps")
    assert "PyTorch's kernels, compiled (first step " in out[3] and out[3].endswith("over 2 steps")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_speed_times_cifarlab_in_the_precision_asked(monkeypatch, precision):
    """cpu_speed.py's cifarlab worker: one timed step per 128 images after a warm-up epoch, with
    the precision's autocast in every step (none in fp32, bfloat16 in bf16)."""
    import torch

    import cifarlab.train as train_mod

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_speed

    seen = []
    real = train_mod.train_step

    def spy(*a, autocast=None, **k):
        seen.append(autocast)
        return real(*a, autocast=autocast, **k)

    monkeypatch.setattr(train_mod, "train_step", spy)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 128)
    times, epochs = cpu_speed.steps_cifarlab(x, y, 1, 1, kernels=False, precision=precision)
    assert len(times) == 1 and len(epochs) == 1 and len(seen) == 2  # the warm-up epoch is not reported
    if precision == "fp32":
        assert all(a is None or not isinstance(a, torch.autocast) for a in seen)
    else:
        assert all(isinstance(a, torch.autocast) and a.fast_dtype == torch.bfloat16 for a in seen)


def test_cpu_speed_compares_both_precisions_and_bf16_with_the_float32_notebook(monkeypatch, capsys):
    """With --precision fp32 bf16 every framework runs in both precisions, the rounds alternate,
    and the last lines put cifarlab's bf16 against Keras' float32 run (the notebook)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_speed

    step = {("cifarlab", "fp32"): 0.080, ("cifarlab-pytorch", "fp32"): 0.100, ("keras", "fp32"): 0.090,
            ("keras+malloc", "fp32"): 0.088, ("cifarlab", "bf16"): 0.040, ("cifarlab-pytorch", "bf16"): 0.050,
            ("keras", "bf16"): 0.044, ("keras+malloc", "bf16"): 0.043}
    order = []
    x, y = np.full((4, 32, 32, 3), 7, np.uint8), np.arange(4)
    monkeypatch.setattr(cpu_speed, "training_images", lambda n: (x[:n], y[:n], "4 test images"))

    def fake(python, name, precision, args, env=None):
        name = "keras+malloc" if env else name
        order.append((name, precision))
        handed = np.load(Path(args.npz) / "train.npz")  # every worker reads the images decoded once
        assert np.array_equal(handed["x"], x) and np.array_equal(handed["y"], y)
        s = step[(name, precision)]
        return {"times": [s] * 4, "epochs": [s * 312] * 2}

    monkeypatch.setattr(cpu_speed, "run_worker", fake)
    monkeypatch.setattr(cpu_speed, "cpu_line", lambda: "CPU: test")
    monkeypatch.setattr(sys, "argv", ["cpu_speed.py", "--precision", "fp32", "bf16", "--rounds", "2"])
    cpu_speed.main()
    out = capsys.readouterr().out
    assert order == [*step] * 2  # both precisions in every round
    assert "bf16 per step: cifarlab is 1.10x the speed of Keras" in out  # 44 / 40
    assert "fp32 per whole epoch: cifarlab is 1.12x" in out  # 90 / 80
    assert "per step: cifarlab in bf16 is 2.25x its speed" in out  # Keras fp32 90 / cifarlab bf16 40
    assert out.count(" ms (") == len(step)
    assert "data: 4 test images;" in out


def test_cpu_speed_keras_worker_needs_neither_torch_nor_cifarlab(tmp_path):
    """The Keras worker runs in ``--keras-python``, an interpreter that may hold only numpy and
    Keras: it must start there (here Keras is absent too, so it reports nothing measured)."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'cifarlab', 'keras', 'tensorflow'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    np.savez(tmp_path / "train.npz", x=np.zeros((256, 32, 32, 3), np.uint8), y=np.arange(256) % 10)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_speed.py"), "--worker", "keras", "--batches", "2",
           "--epochs", "1", "--precision", "fp32", "--npz", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == '{"times": null, "epochs": null}'


def test_duplicates_speed_times_both_searches_and_finds_the_planted_copies():
    """On random images (the path given does not exist) every fourth test image is a shifted
    training image; the benchmark times the plain and mirrored searches and finds all of them."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "duplicates_speed.py"), "--data", "/nonexistent/data",
           "--train", "400", "--test", "80", "--rounds", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    found = re.findall(r"round 1, (plain|mirrored)\s*: ([\d.]+) s, (\d+) test images with a training copy", p.stdout)
    assert [(kind, int(n)) for kind, _, n in found] == [("plain", 20), ("mirrored", 20)], p.stdout
    assert re.search(r"^plain: median [\d.]+ s \(min [\d.]+, max [\d.]+\) over 1 rounds$", p.stdout, re.M)


@needs_kernel
def test_conv_wgrad_rates_every_layer_beside_a_matrix_product():
    """Each of the notebook's four convolutions gets its backward times and, after them, its
    forward and backward rates; a matrix product's rate closes the report."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "conv_wgrad.py"), "--batch", "4", "--rounds", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    # the layers in the notebook's order, each with both rates (their size is the machine's, not
    # asserted: a loaded machine rounds a one-round rate of batch 4 down to 0)
    rates = re.findall(r"^conv +(\d+) -> (\d+) on (\d+)x\d+: forward \d+ GFLOP/s, PyTorch's backward \d+ GFLOP/s$",
                       p.stdout, re.M)
    assert [tuple(map(int, r)) for r in rates] == [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16)], p.stdout
    assert len(re.findall(r"^conv .* backward +[\d.]+ ms PyTorch", p.stdout, re.M)) == 4
    assert re.search(r"^a 2048 x 2048 float32 matrix product: \d+ GFLOP/s$", p.stdout, re.M), p.stdout


def test_policy_throughput_times_the_batched_policies_beside_pillows_per_image_path():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "policy_throughput.py"), "--data", "/nonexistent/data",
           "--images", "300", "--rounds", "1", "--batch", "64"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "300 random 32x32x3 images (data copy absent)" in p.stdout and "batches of 64, 1 rounds" in p.stdout
    rows = dict(re.findall(r"^(\S.*?)\s{2,}([\d,]+)(?:\s+[\d.]+x)?$", p.stdout, re.M))
    assert set(rows) == {"crop-flip (4-pixel crop, flip)", "trivialaugment", "randaugment",
                         "trivialaugment, Pillow per image", "randaugment, Pillow per image"}, p.stdout
    assert re.search(r"^trivialaugment, Pillow per image\s+[\d,]+\s+1\.0x$", p.stdout, re.M)


def test_int8_speed_times_both_files_at_each_batch_size(trained_run):
    pytest.importorskip("onnxscript", reason="the benchmark exports with PyTorch's ONNX exporter")
    pytest.importorskip("onnxruntime", reason="the benchmark times onnxruntime sessions")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "int8_speed.py"), str(trained_run), "--data", "/nonexistent/data",
           "--batches", "1,8", "--images", "24", "--rounds", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    head = re.search(r"24 random 32x32x3 images \(data copy absent\).*2 rounds; float32 ([\d.]+) MB, int8 ([\d.]+) MB",
                     p.stdout)
    assert head and float(head[2]) < float(head[1]) / 3, p.stdout
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+ \([\d.]+-[\d.]+\)\s+[\d.]+ \([\d.]+-[\d.]+\)\s+[\d.]+x \(", p.stdout, re.M)
    assert rows == ["1", "8"], p.stdout


def test_gpu_smoke_runs_a_step_with_the_runs_it_reads(tmp_path):
    """``gpu_smoke.py --only compare`` runs the steps whose run folders compare reads (resnet, then
    teacher, which reads resnet's) and compare, each ok, on anchor-style arrays sorted by class
    (the slice is class-balanced, or training on one class would be refused)."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("test", 100)):
        np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.sort(np.arange(n) % 10))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--npz", str(tmp_path),
                        "--device", "cpu", "--only", "compare", "--train-images", "200", "--test-images", "50"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [line.split()[:2] for line in p.stdout.splitlines()[1:-1]]
    assert steps == [["resnet", "ok"], ["teacher", "ok"], ["compare", "ok"]], p.stdout
    assert "200 training and 50 test images" in p.stdout and p.stdout.rstrip().endswith("3 steps ok, 0 failed, 0 not run")


def test_gpu_smoke_reports_a_failure_and_skips_what_reads_its_run(monkeypatch, capsys):
    """A failed step is FAILED with its error's line; the steps that read its run are not run,
    and the exit status counts the failures. A refusal by cifarlab or by argparse is a failure
    with its message, not a traceback."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_smoke

    ok, line = gpu_smoke.run_step(["evaluate", "/no/such/run"])
    assert not ok and line.startswith("cifarlab: error: run folder '/no/such/run' does not exist")
    ok, line = gpu_smoke.run_step(["train", "--epoch", "3"])
    assert not ok and "did you mean --epochs?" in line
    monkeypatch.setattr(gpu_smoke, "run_step", lambda argv: (argv[0] != "train", "refused"))
    failed = gpu_smoke.main(["--device", "cpu", "--only", "evaluate,teacher,lr-find", "--train-images", "20",
                             "--test-images", "10"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert failed == 2 and list(rows) == ["resnet", "teacher", "lr-find", "evaluate"]
    assert lines[-1] == "0 steps ok, 2 failed, 2 not run"

    assert rows["resnet"].split()[1] == "FAILED" and rows["resnet"].endswith("refused")
    assert "not run  (it reads step resnet's run, which did not finish)" in rows["evaluate"]
    with pytest.raises(SystemExit):
        gpu_smoke.main(["--device", "cpu", "--only", "evalute"])
    assert "unknown step(s) evalute" in capsys.readouterr().err


def test_set_methods_each_kind_keeps_its_coverage_over_fresh_draws(monkeypatch):
    """The adaptive sets set_methods.py sets beside cifarlab's keep their promise too, so its
    comparison is between valid sets: over fresh draws of 200 held-out and 500 new images, each
    kind's mean coverage is within a point of 0.8 or (APS without its draw, and a floor per class,
    both conservative by design) above it, and APS without the draw covers at least as often as with it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import set_methods

    rng = np.random.default_rng(5)
    held = {m: [] for m in set_methods.METHODS}
    for _ in range(60):
        (pf, yf), (pt, yt) = dirichlet_draws(rng, 200), dirichlet_draws(rng, 500)
        for m in set_methods.METHODS:
            sets = set_methods.fit_sets(m, pf, yf, 0.8, rng)(pt)
            held[m].append(sets[np.arange(len(yt)), yt].mean())
    cov = {m: float(np.mean(v)) for m, v in held.items()}
    for m in ("lac", "aps-random", "raps"):
        assert 0.79 <= cov[m] <= 0.81, cov
    assert cov["aps"] >= cov["aps-random"] and cov["lac-by-class"] >= 0.79, cov


def test_set_methods_table_on_a_tiny_run(trained_run, image_folder):
    """set_methods.py fits the five kinds on a run's validation images and prints a row for each."""
    from cifarlab.calibrate import calibrate_run
    from cifarlab.data import load_dataset

    calibrate_run(trained_run, load_dataset(str(image_folder)), device="cpu", log=lambda s: None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "set_methods.py"), str(trained_run),
                        "--data", str(image_folder), "--coverage", "0.75"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines()[2:]}
    assert list(rows) == ["lac", "lac-by-class", "aps", "aps-random", "raps"], p.stdout
    for values in rows.values():
        assert 0 <= float(values[0]) <= 1 and 0 <= float(values[1]) <= 3  # coverage, mean size of 3 classes
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "set_methods.py"), str(trained_run),
                        "--data", str(image_folder), "--coverage", "1.5"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "--coverage 1.5 is not valid" in p.stderr
