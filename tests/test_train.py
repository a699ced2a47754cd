"""Training: a run folder with everything in it, exact resume after SIGKILL and Ctrl-C, NaN stop."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _link_kernels, count_calls, make_image_folder, tiny_config
from safetensors.torch import load_file

from cifarlab.config import load_run_config, resolve_config
from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.export import load_model
from cifarlab.train import NonFiniteLoss, fit

REPO = Path(__file__).resolve().parents[1]


def test_run_folder_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "architecture.json", "weights.safetensors", "history.json", "history.csv",
            "history.png", "metrics.json", "checkpoint.pt"} <= names
    hist = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) >= {"loss", "accuracy", "val_loss", "val_accuracy", "train_time_s"}
    m = json.loads((trained_run / "metrics.json").read_text())
    assert 0 <= m["test_accuracy"] <= 1 and m["versions"]["torch"] == torch.__version__
    assert isinstance(m["cpu"], str) and m["cpu"]  # the host CPU, which training times depend on
    assert (trained_run / "history.csv").read_text().startswith("epoch,loss,accuracy,val_loss,val_accuracy")
    assert (trained_run / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learns_an_easy_task(tmp_path):
    data = make_image_folder(tmp_path / "d", n_train=40, n_test=10)
    m = fit(tiny_config(str(data), str(tmp_path / "r"), epochs=4), log=lambda s: None)
    assert m["test_accuracy"] >= 0.9  # classes differ by colour: chance is 1/3


@pytest.mark.parametrize("kernels", [True, False])
def test_cpu_kernels_switch_is_recorded_and_both_paths_learn(tmp_path, monkeypatch, kernels):
    from cifarlab import cpu_kernels

    calls = count_calls(monkeypatch, cpu_kernels, "keras_rmsprop_", "relu_max_pool2d")
    data = make_image_folder(tmp_path / "d", n_train=40, n_test=10)
    m = fit(tiny_config(str(data), str(tmp_path / "r"), epochs=4, cpu_kernels=kernels), log=lambda s: None)
    assert m["test_accuracy"] >= 0.9
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["cpu_kernels"] is (kernels and cpu_kernels.load() is not None)
    assert bool(calls["keras_rmsprop_"]) is saved["cpu_kernels"]  # the optimizer's kernel follows the same switch
    # and the step's model, keras-shallow, has its ReLU joined to its pool (cpu_kernels.fuse)
    assert bool(calls["relu_max_pool2d"]) is saved["cpu_kernels"]
    assert saved["cpu_conv_kernel"] is (saved["cpu_kernels"] and cpu_kernels.conv_kernel_pays_off())


def test_bf16_autocast_training_on_the_cpu_uses_the_kernels_that_apply(tmp_path, monkeypatch):
    """Under bf16 autocast the step's dropout and ReLU-pool pairs (bfloat16) and the RMSprop update
    (float32 weights) take cifarlab's kernels; the float32-only one stays out of the way."""
    from cifarlab import cpu_kernels

    calls = count_calls(monkeypatch, cpu_kernels, "dropout", "keras_rmsprop_", "relu_max_pool2")
    data = make_image_folder(tmp_path / "d", n_train=40, n_test=10)
    fit(tiny_config(str(data), str(tmp_path / "r"), epochs=1, precision="bf16"), log=lambda s: None)
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["cpu_kernels"] is (cpu_kernels.load() is not None)
    assert saved["cpu_conv_kernel"] is False  # float32 only
    assert (calls["dropout"] > 0 and calls["keras_rmsprop_"] > 0 and calls["relu_max_pool2"] > 0) \
        is saved["cpu_kernels"]


def test_bf16_on_a_cpu_without_bfloat16_units_gets_a_note(tmp_path, image_folder, monkeypatch):
    from cifarlab import runtime

    cpu = torch.device("cpu")
    avx2 = frozenset("sse4_2 avx avx2 fma f16c".split())
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert "without bfloat16 units" in runtime.slow_bf16_note(cpu, "bf16", avx2)
    assert "--precision bf16-true" in runtime.slow_bf16_note(cpu, "bf16-true", avx2)
    assert runtime.slow_bf16_note(cpu, "bf16", avx2 | {"avx512_bf16"}) is None
    assert runtime.slow_bf16_note(cpu, "bf16", avx2 | {"amx_bf16", "amx_tile"}) is None
    assert runtime.slow_bf16_note(cpu, "fp32", avx2) is None
    assert runtime.slow_bf16_note(torch.device("meta"), "bf16", avx2) is None  # not a CPU
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")  # other flag names there
    assert runtime.slow_bf16_note(cpu, "bf16", frozenset({"fp", "asimd"})) is None
    # Training says it once, before the data load.
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: avx2)
    lines: list[str] = []
    fit(tiny_config(str(image_folder), str(tmp_path / "r"), precision="bf16"), log=lines.append)
    assert sum("without bfloat16 units" in x for x in lines) == 1 and "without bfloat16" in lines[0]


def test_precision_auto_resolves_by_the_cpu_and_the_run_records_it(tmp_path, image_folder, monkeypatch):
    """auto is bf16 on a CPU with bfloat16 units and fp32 on one without (or of unknown flags);
    training says which, and the run's config.yaml holds the resolved one, so a resumed run keeps it."""
    from cifarlab import runtime

    cpu = torch.device("cpu")
    avx2 = frozenset("sse4_2 avx avx2 fma f16c".split())
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.resolve_precision(cpu, "auto", avx2) == "fp32"
    assert runtime.resolve_precision(cpu, "auto", avx2 | {"avx512_bf16"}) == "bf16"
    assert runtime.resolve_precision(cpu, "auto", avx2 | {"amx_bf16"}) == "bf16"
    assert runtime.resolve_precision(cpu, "fp32", avx2 | {"amx_bf16"}) == "fp32"  # only auto is resolved
    assert runtime.resolve_precision(cpu, "bf16-true", avx2) == "bf16-true"
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")  # other flag names there
    assert runtime.resolve_precision(cpu, "auto", frozenset({"avx512_bf16"})) == "fp32"
    with pytest.raises(ConfigError, match="resolved"):  # unresolved, it reaches no autocast
        runtime.autocast(cpu, "auto")
    for native, want in ((True, "bf16"), (False, "fp32")):  # a GPU: bf16 from compute capability 8.0
        monkeypatch.setattr(runtime.torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: n and not including_emulation)
        assert runtime.resolve_precision(torch.device("cuda"), "auto") == want
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    for flags, want in ((avx2 | {"avx512_bf16"}, "bf16"), (avx2, "fp32")):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        out = tmp_path / want
        lines: list[str] = []
        fit(tiny_config(str(image_folder), str(out), precision="auto"), log=lines.append)
        said = "bf16 autocast, as this CPU computes bfloat16 natively" if want == "bf16" else \
            "fp32, as this CPU has no bfloat16 units known to cifarlab"
        assert [x for x in lines if x.startswith("precision auto")] == \
            [f"precision auto: {said} (AVX-512 BF16 or AMX)"]
        assert load_run_config(out / "config.yaml").train.precision == want
        assert json.loads((out / "metrics.json").read_text())["precision"] == want


_MAPPED_BYTES = """
import ctypes, torch
from cifarlab import runtime
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped_by(size):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(size, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before
print(mapped_by(48 << 20), mapped_by(160 << 20), runtime.keep_freed_memory(), mapped_by(48 << 20),
      mapped_by(160 << 20))
"""


def _glibc_version() -> tuple[int, ...]:
    """glibc's version, such as (2, 36), as runtime.keep_freed_memory tells glibc; () elsewhere."""
    lib, version = platform.libc_ver()
    return tuple(int(x) for x in version.split(".")[:2]) if lib == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="needs glibc 2.33 or newer (malloc settings read by mallinfo2)")
def test_training_serves_large_tensors_from_the_heap_not_fresh_mappings():
    """Under glibc's defaults a tensor over its mmap threshold is mapped on allocation and unmapped
    on free, so a step's large activations page-fault afresh every step; once training sets malloc
    up (runtime.keep_freed_memory), tensors of any size come from the heap, whose freed blocks are
    reused. Measured in a process of its own, as the setting is process-wide."""
    out = subprocess.run([sys.executable, "-c", _MAPPED_BYTES], capture_output=True, text=True, check=True)
    before_48, before_160, applied, after_48, after_160 = out.stdout.split()
    assert int(before_48) >= 48 << 20 and int(before_160) >= 160 << 20  # glibc's default: mapped
    assert applied == "True" and int(after_48) == int(after_160) == 0


@pytest.mark.parametrize("kernels", [True, False])
def test_cpu_kernels_switch_reaches_keras_augmentation(tmp_path, monkeypatch, kernels):
    """train.cpu_kernels also decides whether --augment keras warps with cifarlab's CPU kernel."""
    from cifarlab import cpu_kernels

    calls = count_calls(monkeypatch, cpu_kernels, "affine_warp")
    data = make_image_folder(tmp_path / "d", n_train=16, n_test=4)
    cfg = tiny_config(str(data), str(tmp_path / "r"), cpu_kernels=kernels)
    cfg.augment.preset = "keras"
    fit(cfg, log=lambda s: None)
    assert bool(calls["affine_warp"]) is (kernels and cpu_kernels.load() is not None)  # one call per batch


def test_load_model_predictions_are_bitwise_reproducible(trained_run, image_folder):
    """Reloaded models predict exactly what the trained model predicted at the end of training."""
    import torch.nn.functional as F

    from cifarlab.data import load_dataset

    ds = load_dataset(image_folder)
    a = load_model(trained_run).predict(ds.x_test)
    b = load_model(trained_run).predict(ds.x_test)
    assert (a == b).all() and a.shape == (9, 3)
    assert abs(a.sum(1) - 1).max() < 1e-5
    logits = torch.from_numpy(load_model(trained_run).logits(ds.x_test))
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert F.cross_entropy(logits, torch.from_numpy(ds.y_test)).item() == saved["test_loss"]


def test_existing_output_not_overwritten(trained_run, image_folder):
    before = (trained_run / "weights.safetensors").read_bytes()
    with pytest.raises(CifarlabError, match="already exists and is not empty.*--overwrite"):
        fit(tiny_config(str(image_folder), str(trained_run)), log=lambda s: None)
    assert (trained_run / "weights.safetensors").read_bytes() == before


def test_failed_setup_leaves_no_run_folder_behind(tmp_path):
    """Images too small for the model: the error names the size and the model's smallest, and
    the new run folder is removed (an empty one is emptied), so the corrected rerun with the same
    --out is not refused as 'not empty'."""
    small = make_image_folder(tmp_path / "small", size=(8, 8))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        cfg = tiny_config(str(small), str(out))
        cfg.model.name = "speednet"
        with pytest.raises(CifarlabError, match=r"'speednet' cannot take images of size \[8, 8\].*at least 9"):
            fit(cfg, log=lambda s: None)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    with pytest.raises(CifarlabError, match="drop_last leaves no full batch: 13 training images, batch size 64; .*"
                       "keep the last partial batch with .drop_last: false. under .train:. in a --config file"):
        fit(tiny_config(str(small), str(tmp_path / "new"), batch_size=64, drop_last=True), log=lambda s: None)
    assert fit(tiny_config(str(small), str(tmp_path / "new")), log=lambda s: None)["test_accuracy"] >= 0


def test_nan_loss_stops_with_epoch_step_and_lr(tmp_path, image_folder):
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), epochs=3)
    cfg.optim.lr = 1e30
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step \d+.*learning rate.*1e\+30"):
        fit(cfg, log=lambda s: None)


def test_weights_that_overflow_in_the_last_steps_are_not_kept(tmp_path, image_folder):
    """One step is enough to overflow: its loss, summed before the update, is finite, and the
    outputs of the weights it leaves are not. Found by the validation loss where there are
    validation images (the epoch's checkpoint is then not written), else by the test loss (the
    weights are then removed: no run that looks trained is left)."""
    cfg = tiny_config(str(image_folder), str(tmp_path / "v"), batch_size=64)  # one step an epoch
    cfg.optim.lr = 1e12
    with pytest.raises(NonFiniteLoss, match=r"the validation loss became NaN or infinite \(the model's outputs "
                                            r"overflow\) at epoch 1\..*try --lr 1e\+11"):
        fit(cfg, log=lambda s: None)
    assert not (tmp_path / "v" / "checkpoint.pt").exists() and not (tmp_path / "v" / "weights.safetensors").exists()
    cfg = tiny_config(str(image_folder), str(tmp_path / "t"), batch_size=64)
    cfg.optim.lr, cfg.data.val_split = 1e12, 0.0
    with pytest.raises(NonFiniteLoss, match="the test loss is NaN or infinite .* Its weights are not kept"):
        fit(cfg, log=lambda s: None)
    assert not (tmp_path / "t" / "weights.safetensors").exists() and not (tmp_path / "t" / "metrics.json").exists()


def test_a_diverged_run_with_a_finite_loss_gets_a_warning(tmp_path, image_folder):
    """A test loss of 100 nats or more (finite: the NaN checks pass it) is printed with a warning
    that the weights most likely diverged and the lr to lower; an overfit model's few nats, or a
    well-trained one's, get none."""
    from cifarlab.train import _divergence_hint

    lines: list[str] = []
    cfg = tiny_config(str(image_folder), str(tmp_path / "d"), batch_size=64)
    cfg.optim.lr = 100.0  # a test loss near 1.5e13 here, far from both the threshold and overflow
    metrics = fit(cfg, log=lines.append)
    assert math.isfinite(metrics["test_loss"]) and metrics["test_loss"] >= 100, metrics["test_loss"]
    warning = [ln for ln in lines if ln.startswith("warning: the test loss")]
    assert len(warning) == 1 and "is far above the 1.099 of a uniform guess over the 3 classes" in warning[0]
    assert warning[0].endswith("train again with a lower --lr than 100")
    assert _divergence_hint(cfg, 99.9, 2) is None and _divergence_hint(cfg, 7.1, 2) is None  # overfit on noise
    assert _divergence_hint(cfg, 100.0, 10) is not None


def test_a_model_whose_outputs_overflow_is_refused_where_it_is_used(trained_run, image_folder, capsys):
    """Weights that overflow (from an older cifarlab, or damaged) stop evaluate and predict with
    the reason, where evaluate raised a scikit-learn traceback and predict printed nan."""
    from safetensors.torch import save_file

    from cifarlab.cli import main

    state = _weights(trained_run)
    save_file({k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()},
              str(trained_run / "weights.safetensors"))
    image = next((image_folder / "test").rglob("*.png"))
    for argv in (["evaluate", str(trained_run)], ["predict", str(trained_run), str(image)]):
        assert main(argv) == 2, argv
        assert f"the model of {trained_run} gives NaN or infinite outputs for" in capsys.readouterr().err


def _cli(args, cache=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **({"CIFARLAB_CACHE": str(cache)} if cache else {})}
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _train_args(data, out, epochs=4):
    return ["train", "--data", str(data), "--model", "keras-shallow", "--epochs", str(epochs), "--batch-size", "4",
            "--val-split", "0.2", "--threads", "1", "--deterministic", "--seed", "3", "--out", str(out)]


def _weights(run):
    return load_file(str(run / "weights.safetensors"))


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "d", n_train=40, n_test=4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, resume_data, _shared_kernels):
    """The same run, never interrupted. A module's fixture runs before each test's isolated
    cache is set, so it names a cache of its own, or it would decode into the user's."""
    ref = tmp_path_factory.mktemp("resume") / "ref"
    cache = tmp_path_factory.mktemp("resume-cache")
    _link_kernels(cache, _shared_kernels)
    p = _cli(_train_args(resume_data, ref), cache=cache)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return ref


def _start_after_first_checkpoint(data, run, delay):
    """Start training, wait for the first end-of-epoch checkpoint, then ``delay`` seconds more."""
    p = _cli(_train_args(data, run))
    ckpt = run / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)  # into the second epoch
    return p, ckpt


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, resume_data, reference_run):
    run = tmp_path / "killed"
    p, ckpt = _start_after_first_checkpoint(resume_data, run, 0.15)
    first = ckpt.stat().st_mtime_ns
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)  # waits, and closes its pipes
    assert p.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (run / "weights.safetensors").exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] >= 1 and ckpt.stat().st_mtime_ns >= first
    r = _cli(["train", "--resume", str(run)])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "resuming" in out
    a, b = _weights(run), _weights(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = [(h["loss"], h["val_accuracy"]) for h in json.loads((run / "history.json").read_text())]
    hb = [(h["loss"], h["val_accuracy"]) for h in json.loads((reference_run / "history.json").read_text())]
    assert ha == hb


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_mid_epoch_checkpoint_and_resumes_exactly(tmp_path, resume_data, reference_run, sig):
    run = tmp_path / "int"
    p, ckpt = _start_after_first_checkpoint(resume_data, run, 0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f"stopped by {sig.name}" in err and "checkpoint was saved" in err and "--resume" in err
    assert "Traceback" not in err
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] > 0 or state["epoch"] > 1
    r = _cli(["train", "--resume", str(run)])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    a, b = _weights(run), _weights(reference_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_more_epochs_equals_the_longer_run(tmp_path, resume_data, reference_run):
    run = tmp_path / "short"
    p = _cli(_train_args(resume_data, run, epochs=2))
    assert p.communicate(timeout=600) and p.returncode == 0
    r = _cli(["train", "--resume", str(run), "--epochs", "4"])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "epochs 2 -> 4 (config.yaml updated)" in out and "resuming" in out and "Epoch 3/4" in out, out
    a, b = _weights(run), _weights(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run, reference_run))
    assert [(h["loss"], h["val_accuracy"]) for h in ha] == [(h["loss"], h["val_accuracy"]) for h in hb]
    assert "epochs: 4" in (run / "config.yaml").read_text()
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4


def test_resume_with_other_epochs_is_refused_where_it_would_change_the_run(trained_run):
    import yaml

    with pytest.raises(CifarlabError, match=r"--epochs 1 is not valid .* it has trained 2 epoch\(s\), so give "
                                            r"at least 2"):
        fit(resume=trained_run, epochs=1, log=lambda s: None)
    cfg_path = trained_run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["optim"].update(schedule="triangle", warmup_frac=0.2)
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CifarlabError, match=r"schedule \('triangle'\) is laid out over its 2 epochs"):
        fit(resume=trained_run, epochs=5, log=lambda s: None)
    assert yaml.safe_load(cfg_path.read_text())["train"]["epochs"] == 2  # left as it was
    cfg["optim"]["schedule"] = "constant"
    cfg["train"]["lookahead_every"] = 5
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CifarlabError, match=r"lookahead \(train.lookahead_every 5\) ramps up"):
        fit(resume=trained_run, epochs=5, log=lambda s: None)


def test_resume_errors(tmp_path):
    with pytest.raises(CifarlabError, match="no config.yaml"):
        fit(resume=tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    with pytest.raises(CifarlabError, match="no checkpoint.pt"):
        fit(resume=tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(CifarlabError, match="not a checkpoint cifarlab can read"):
        fit(resume=tmp_path)
    # A checkpoint that would run code when unpickled is refused, and the message does not pass
    # on torch's advice to load it with weights_only=False.
    marker = tmp_path / "ran"
    torch.save(_RunsCode(str(marker)), tmp_path / "checkpoint.pt")
    with pytest.raises(CifarlabError, match="not a checkpoint cifarlab can read") as e:
        fit(resume=tmp_path)
    assert "weights_only" not in str(e.value) and not marker.exists()


class _RunsCode:
    """Unpickles by calling a function: here one that creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_data_with_one_class_is_refused_and_leaves_no_run_folder(tmp_path):
    data = make_image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(CifarlabError, match=r"one has 1 class \(cat\); a classifier needs at least 2"):
        fit(tiny_config(str(data), str(tmp_path / "r")), log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_a_subset_larger_than_the_data_says_so_and_uses_every_image(tmp_path, image_folder):
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"))
    cfg.data.subset = 1000
    lines: list[str] = []
    m = fit(cfg, log=lines.append)
    assert any("--subset 1,000 is more than the 18 training images" in x for x in lines), lines
    assert m["data"]["train_images"] + m["data"]["val_images"] == 18


def test_a_subset_smaller_than_the_classes_says_how_many_classes_go_unseen(tmp_path, image_folder):
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"))
    cfg.data.subset, cfg.data.val_split = 2, 0.0
    lines: list[str] = []
    m = fit(cfg, log=lines.append)
    assert any("--subset 2 is fewer images than the 3 classes: training sees no image of 1 of them" in x for x in lines), lines
    assert m["data"]["train_images"] == 2


def test_resuming_a_finished_run_says_so_and_changes_no_weight(trained_run):
    before = _weights(trained_run)
    first = json.loads((trained_run / "metrics.json").read_text())
    lines: list[str] = []
    again = fit(resume=trained_run, log=lines.append)
    assert any("has trained all its 2 epochs; nothing to resume" in x for x in lines), lines
    assert not any(x.startswith("resuming") for x in lines)
    after = _weights(trained_run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert again["test_accuracy"] == first["test_accuracy"]


def test_out_of_memory_names_batch_size(tmp_path, image_folder, monkeypatch):
    import cifarlab.train as train_mod

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "train_step", oom)
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"))
    with pytest.raises(CifarlabError, match="ran out of memory with batch size 8; .* --batch-size 4"):
        fit(cfg, log=lambda s: None)


def test_keras_augmentation_with_featurewise_statistics(tmp_path, image_folder):
    """--augment keras with featurewise_std_normalization: the statistics come from the rescaled
    training images, are saved with the run, and standardise after the random transform."""
    cfg = tiny_config(str(image_folder), str(tmp_path / "run"))
    cfg.augment.preset = "keras"
    cfg.augment.featurewise_center = cfg.augment.featurewise_std_normalization = True
    fit(cfg, log=lambda s: None)
    prep = json.loads((tmp_path / "run" / "architecture.json").read_text())["preprocessing"]
    assert len(prep["mean"]) == 3 and len(prep["std"]) == 3
    assert all(0 < m < 1 for m in prep["mean"]) and all(0 < s < 1 for s in prep["std"])
    assert load_model(tmp_path / "run").prep == prep


@pytest.mark.parametrize("preset", ["keras", "crop-flip", "crop-flip-balanced", "crop-flip-mix", "crop-flip-policy",
                                    "crop-flip-ema", "fast-muon", "fast-muon-bf16-true", "best-select"])
def test_epochs_prepared_ahead_train_and_resume_mid_epoch_exactly(tmp_path, monkeypatch, preset):
    """train.prepare_ahead (the default on CUDA, forced here on the CPU) makes each epoch's
    augmented images at its start; a run stopped mid-epoch and resumed ends with the same weights
    as one never stopped, since the resumed epoch remakes the same images from its own generator.
    The fast-muon case also resumes Muon's state and the whitening bias's own schedule, which
    has reached zero in the second epoch; its bf16-true case, bf16 weights, optimizer state and
    prepared images. The best-select case also resumes the proxy that picks the examples (its
    weights, optimizer, schedule and step count: it trains every fourth step, on global step 20
    for the first time after the resume at step 18). The crop-flip-balanced case draws each
    epoch's images class-balanced, with replacement, from classes of 40, 40 and 10 images. The
    crop-flip-mix case also mixes each batch by MixUp or CutMix, drawn per step; the
    crop-flip-policy case runs RandAugment before the crop and flip; the crop-flip-ema case
    resumes the moving average of the weights, which the run ends on."""
    import cifarlab.train as train_mod
    from cifarlab.config import resolve_config
    from cifarlab.train import TrainingInterrupted

    true = preset.endswith("-bf16-true")
    data = make_image_folder(tmp_path / "d", n_train=40, n_test=4, size=(12, 12) if true else (32, 32))
    if preset == "crop-flip-balanced":
        for f in sorted((data / "train" / "frog").iterdir())[10:]:
            f.unlink()

    def cfg(out):
        if preset.startswith("fast-muon"):
            return resolve_config("fast-muon", overrides={
                "data": {"data": str(data)},
                "train": {"epochs": 2, "batch_size": 16, "out": str(tmp_path / out), "threads": 1,
                          "deterministic": True, "prepare_ahead": True, "whiten_bias_epochs": 1,
                          "precision": "bf16-true" if true else "fp32"}})
        if preset == "best-select":
            return resolve_config("best-select", overrides={
                "data": {"data": str(data)}, "model": {"name": "speednet"},
                "train": {"epochs": 2, "batch_size": 8, "out": str(tmp_path / out), "threads": 1,
                          "deterministic": True, "prepare_ahead": True, "whiten_bias_epochs": 1}})
        c = tiny_config(str(data), str(tmp_path / out), epochs=2, batch_size=4, prepare_ahead=True)
        c.augment.preset = "keras" if preset == "keras" else "crop-flip"  # the suffixes add to crop-flip
        if preset.endswith("-balanced"):
            c.train.sampling = "balanced"
        if preset.endswith("-mix"):
            c.augment.mixup, c.augment.cutmix = 0.4, 1.0
        if preset.endswith("-policy"):
            c.augment.auto_augment = "randaugment"
        if preset.endswith("-ema"):
            c.optim.ema_momentum = 0.9
        if preset == "keras":
            c.augment.rotation_range, c.augment.horizontal_flip = 30.0, True
        else:
            c.augment.crop_padding, c.augment.cutout, c.augment.alternating_flip = 2, 3, True
        return c

    calls = []
    real = train_mod._Loop.prepare_epoch
    monkeypatch.setattr(train_mod._Loop, "prepare_epoch", lambda self, *a: calls.append(0) or real(self, *a))
    fit(cfg("ref"), log=lambda s: None)
    assert len(calls) == 2  # once per epoch
    calls.clear()

    class StopInSecondEpoch(train_mod._Interrupts):
        """Reads as a SIGINT from the third step of the second epoch on."""

        @property
        def flag(self):
            if len(calls) < 2:
                return None
            calls[-1] += 1
            return "SIGINT" if calls[-1] >= 3 else None

        @flag.setter
        def flag(self, value):
            pass

    monkeypatch.setattr(train_mod, "_Interrupts", StopInSecondEpoch)
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 3;"):
        fit(cfg("cut"), log=lambda s: None)
    monkeypatch.undo()
    fit(resume=tmp_path / "cut", log=lambda s: None)
    a, b = _weights(tmp_path / "cut"), _weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if true:
        assert a["layers.1.conv1.weight"].dtype == torch.bfloat16


def test_runs_stopped_midway_resume_as_one_folder_and_train_longer(tmp_path, monkeypatch, capsys):
    """--runs 3 stopped by SIGINT in the second epoch of its second run: --resume on the parent
    folder keeps run 1, finishes run 2 from its checkpoint and trains run 3, each bit for bit the
    run never stopped, and writes the summary. --epochs there trains every run on, as single runs."""
    import cifarlab.train as train_mod
    from cifarlab.train import TrainingInterrupted

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=2)

    def cfg(out, epochs):
        c = tiny_config(str(data), str(tmp_path / out), epochs=epochs, batch_size=4)
        c.train.runs = 3
        return c

    ref = fit(cfg("ref", 2), log=lambda s: None)
    reads = []

    class StopInRun2(train_mod._Interrupts):
        """Reads as a SIGINT at the second step of the second run's second epoch (5 steps an epoch)."""

        def __init__(self):
            super().__init__()
            reads.append(0)

        @property
        def flag(self):
            reads[-1] += 1
            return "SIGINT" if len(reads) == 2 and reads[-1] >= 7 else None

        @flag.setter
        def flag(self, value):
            pass

    monkeypatch.setattr(train_mod, "_Interrupts", StopInRun2)
    with pytest.raises(TrainingInterrupted) as e:
        fit(cfg("cut", 2), log=lambda s: None)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert str(e.value) == ("training stopped by SIGINT at epoch 2, step 2 of run 2 of 3 (run-1); a checkpoint "
                            f"was saved. Resume with: cifarlab train --resume {cut}")
    assert (cut / "run-0" / "metrics.json").is_file() and not (cut / "run-1" / "metrics.json").exists()
    assert not (cut / "run-2").exists() and not (cut / "runs_summary.json").exists()
    before = (cut / "run-0" / "metrics.json").read_bytes()
    from cifarlab.cli import main

    for command in ("evaluate", "audit"):  # the set is refused whole, before any data is read
        assert main([command, str(cut), "--data", str(tmp_path / "absent")]) == 2
        err = capsys.readouterr().err
        assert f"'{cut}' has runs that have not trained all 2 epochs (run-1, run-2); finish them with: " \
               f"cifarlab train --resume {cut}" in err and not (cut / "run-0" / command).exists()
    lines: list[str] = []
    summary = fit(resume=cut, log=lines.append)
    assert any("run 1/3 (seed 0): finished" in x for x in lines) and any("resuming" in x for x in lines), lines
    assert (cut / "run-0" / "metrics.json").read_bytes() == before  # not trained again
    for k in range(3):
        a, b = _weights(cut / f"run-{k}"), _weights(tmp_path / "ref" / f"run-{k}")
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    assert [r["test_accuracy"] for r in summary["per_run"]] == [r["test_accuracy"] for r in ref["per_run"]]
    assert json.loads((cut / "runs_summary.json").read_text())["test_accuracy"] == ref["test_accuracy"]

    # Ctrl-C in the test of the ensemble, after the last run: the runs are kept, the summary waits for
    # --resume, which trains nothing and tests the ensemble.
    short = tmp_path / "short"

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_ensemble_test", ctrl_c)
    with pytest.raises(TrainingInterrupted) as e:
        fit(cfg("short", 1), log=lambda s: None)
    monkeypatch.undo()
    assert str(e.value) == (f"the test of their ensemble was interrupted; all 3 runs had finished and are kept. "
                            f"Resume with: cifarlab train --resume {short}")
    assert not (short / "runs_summary.json").exists()
    lines = []
    fit(resume=short, log=lines.append)
    assert sum("finished, test accuracy" in x for x in lines) == 3 and not any("epoch" in x for x in lines), lines
    assert "ensemble" in json.loads((short / "runs_summary.json").read_text())

    # 1 epoch per run, then --resume PARENT --epochs 2: every run is the 2-epoch run.
    with pytest.raises(CifarlabError, match=r"--epochs 0 is not valid for '.*run-0': it has trained 1 epoch"):
        fit(resume=short, epochs=0, log=lambda s: None)
    assert "epochs: 1" in (short / "config.yaml").read_text()  # refused before anything changed
    with pytest.raises(CifarlabError) as e:  # one run of a set alone would leave the set uneven
        fit(resume=short / "run-1", epochs=2, log=lambda s: None)
    assert str(e.value) == (f"'{short / 'run-1'}' is one of the 3 runs of '{short}', which all train 1 epoch(s); "
                            f"change every run's epochs together: cifarlab train --resume {short} --epochs 2")
    assert "epochs: 1" in (short / "run-1" / "config.yaml").read_text()
    longer = fit(resume=short, epochs=2, log=lines.append)
    assert any("epochs 1 -> 2 for all 3 runs" in x for x in lines)
    assert longer["test_accuracy"] == ref["test_accuracy"]
    for k in range(3):
        a, b = _weights(short / f"run-{k}"), _weights(tmp_path / "ref" / f"run-{k}")
        assert all(torch.equal(a[x], b[x]) for x in a)
        assert json.loads((short / f"run-{k}" / "metrics.json").read_text())["epochs"] == 2
    assert "epochs: 2" in (short / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(short / "run-2")]) == 0  # by hand: says the summary stays as it was
    assert f"note: '{short / 'run-2'}' is one of the 3 runs of '{short}', whose runs_summary.json this does " \
           f"not update; 'cifarlab train --resume {short}' finishes" in capsys.readouterr().out
    assert main(["train", "--resume", str(short)]) == 0
    assert "note:" not in capsys.readouterr().out


def test_prepared_epoch_holds_the_batches_the_steps_would_make(tmp_path):
    """prepare_epoch's rows are what batch() makes for the same images and generator state, in
    steps' order and memory format, also across chunk boundaries; with drop_last the unused tail
    is left out."""
    import cifarlab.train as train_mod
    from cifarlab.data import load_dataset
    from cifarlab.train import _build, _epoch_generator, make_arrays

    data = make_image_folder(tmp_path / "d", n_train=20, n_test=4)
    cfg = tiny_config(str(data), str(tmp_path / "r"), batch_size=8, drop_last=True)
    cfg.augment.preset, cfg.augment.crop_padding, cfg.augment.alternating_flip = "crop-flip", 2, True
    ds, dev = load_dataset(str(data)), torch.device("cpu")
    arrays = make_arrays(cfg, ds, dev)
    steps = len(arrays.x_train) // 8
    st = _build(cfg, ds, arrays, dev, steps)
    loop = train_mod._Loop(cfg, tmp_path / "r", st, arrays, dev, steps, False)
    perm = torch.randperm(len(arrays.x_train))
    got = loop.prepare_epoch(perm, _epoch_generator(0, 1, dev), 1, chunk=5)
    assert got.shape[0] == steps * 8 < len(perm) and got.is_contiguous(memory_format=torch.channels_last)
    gen, want = _epoch_generator(0, 1, dev), []
    for s in range(0, steps * 8, 5):
        want.append(loop.batch(perm[s:min(s + 5, steps * 8)], gen, 1)[0])
    assert torch.equal(got, torch.cat(want))


def test_compile_mode_reaches_torch_compile_and_needs_compile(tmp_path, image_folder, monkeypatch):
    """``--compile --compile-mode max-autotune`` hands the mode to ``torch.compile`` (recorded
    here instead of compiling); a mode without ``--compile`` is refused by name."""
    from cifarlab import runtime
    from cifarlab.cli import _parser, _train_overrides
    from cifarlab.config import resolve_config
    from cifarlab.errors import ConfigError

    modes: list = []
    monkeypatch.setattr(runtime.torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    args = _parser().parse_args(["train", "--compile", "--compile-mode", "max-autotune"])
    assert _train_overrides(args)["train"] == {"compile": True, "compile_mode": "max-autotune"}
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), compile=True, compile_mode="max-autotune",
                      cpu_kernels=False)
    fit(cfg, log=lambda s: None)
    assert modes == ["max-autotune"]
    with pytest.raises(ConfigError, match="train.compile_mode = 'max-autotune' is not valid; it takes effect only"):
        resolve_config(overrides={"train": {"compile_mode": "max-autotune"}})
    with pytest.raises(ConfigError, match="train.compile_mode = 'fastest' is not valid; choose default, reduce-overhead"):
        resolve_config(overrides={"train": {"compile": True, "compile_mode": "fastest"}})


def test_evaluation_accuracy_is_the_exact_fraction():
    """6 right of 18 is 1/3 in float64, as `evaluate` reports it, not float32's 0.33333334."""
    from cifarlab.train import evaluate_arrays

    class FirstClass(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()

    y = torch.arange(18) % 3
    loss, acc, logits = evaluate_arrays(FirstClass(), torch.zeros(18, 3, 4, 4, dtype=torch.uint8), y,
                                        {"rescale": 1 / 255})
    assert acc == 6 / 18 and logits.shape == (18, 3)


def test_default_run_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    """The folder is claimed by creating it: a folder made by another process after this one
    looked (simulated: exists() sees nothing) is not shared."""
    from datetime import datetime

    import cifarlab.train as train_mod
    from cifarlab import fsutil
    from cifarlab.config import resolve_config

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fsutil, "datetime", Frozen)  # where the run folder's name is made
    cfg = resolve_config(overrides={"model": {"name": "keras-shallow"}})
    first, before = train_mod._new_run_dir(cfg)
    assert first == Path("runs/keras-book-keras-shallow-20260102-030405") and before == Path("runs")  # runs/ made for it
    monkeypatch.setattr(Path, "exists", lambda self: False)
    second, _ = train_mod._new_run_dir(cfg)
    third, _ = train_mod._new_run_dir(cfg)
    assert second.name.endswith("-2") and third.name.endswith("-3") and second.is_dir() and third.is_dir()


def test_each_epoch_line_gives_that_epochs_training_time_as_keras_does(tmp_path, image_folder, monkeypatch):
    from cifarlab import train as train_mod

    monkeypatch.setattr(train_mod._Clock, "elapsed", lambda self: 10.0)  # every epoch trains 10 s
    lines: list[str] = []
    fit(tiny_config(str(image_folder), str(tmp_path / "r"), epochs=3), log=lines.append)
    assert [x.split(" - ")[1] for x in lines if x.startswith("Epoch ")] == ["10.0s"] * 3
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [h["train_time_s"] for h in history] == [10.0, 20.0, 30.0]  # the running total stays in the history


@pytest.mark.parametrize("monitor,values,best_epoch,stop", [
    # val_accuracy, higher is better, min_delta 0.01: 0.505, 0.525 and 0.528 are rises of 0.01 or
    # less, no improvement; patience 2 then stops after epoch 5 on epoch 3's 0.52
    ("val_accuracy", [0.50, 0.505, 0.52, 0.525, 0.528, 0.9], 3, 5),
    # val_loss, lower is better, same rule the other way
    ("val_loss", [1.0, 0.995, 0.98, 0.975, 0.972, 0.1], 3, 5),
])
def test_early_stopping_watches_either_figure_with_keras_min_delta(monitor, values, best_epoch, stop):
    """Keras' rule: an epoch improves when its figure beats the best by strictly more than
    min_delta, in the monitor's direction; the weights kept are a copy of the best epoch's."""
    from cifarlab.train import EarlyStopping

    model = torch.nn.Linear(1, 1)
    es = EarlyStopping(2, monitor, min_delta=0.01)
    stopped_at = None
    for epoch, v in enumerate(values, 1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # each epoch's weights, told apart
        if es.update(epoch, {"val_loss": math.nan, "val_accuracy": math.nan, monitor: v}, model):
            stopped_at = epoch
            break
    assert (stopped_at, es.best_epoch, es.best) == (stop, best_epoch, values[best_epoch - 1])
    assert es.best_state["weight"].item() == best_epoch
    assert es.summary() == {"patience": 2, "monitor": monitor, "min_delta": 0.01, "best_epoch": best_epoch,
                            f"best_{monitor}": values[best_epoch - 1], "stopped_after_epoch": stop}
    # Without min_delta every step the right way counts: it trains through all six epochs
    es0 = EarlyStopping(2, monitor)
    assert not any(es0.update(e, {monitor: v}, model) for e, v in enumerate(values, 1)) and es0.best_epoch == 6


def _script_validation(monkeypatch, figure: str, values: list[float]) -> list[float]:
    """Each epoch's validation pass runs as usual, but reports the next of ``values`` as its
    ``figure`` (val_loss or val_accuracy); returns ``values``, which the epochs empty (refill it
    between runs)."""
    import cifarlab.train as train_mod

    real = train_mod.evaluate_arrays

    def scripted(*args, desc="Evaluating", **kw):
        loss, acc, logits = real(*args, desc=desc, **kw)
        if desc == "Validation":
            loss, acc = (values.pop(0), acc) if figure == "val_loss" else (loss, values.pop(0))
        return loss, acc, logits

    monkeypatch.setattr(train_mod, "evaluate_arrays", scripted)
    return values


def test_early_stopping_on_validation_accuracy_in_a_run(tmp_path, monkeypatch, capsys):
    """Through the CLI's flags: the run watches the scripted validation accuracy, stops after two
    epochs without a higher one, and says so in its log and metrics."""
    from cifarlab.cli import main

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=4)
    accs = _script_validation(monkeypatch, "val_accuracy", [0.25, 0.5, 0.5, 0.25, 0.75])
    out = tmp_path / "acc"
    assert main(["train", "--data", str(data), "--model", "keras-shallow", "--epochs", "10", "--batch-size", "4",
                 "--val-split", "0.25", "--threads", "1", "--out", str(out), "--early-stopping", "2",
                 "--early-stopping-monitor", "val_accuracy"]) == 0
    assert accs == [0.75]  # four epochs: 0.5 again is no improvement
    assert "Epoch 4: early stopping (no higher val_accuracy for 2 epochs; the highest val_accuracy, 0.5000, was " \
           "epoch 2's)" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_trained"] == 4 and m["early_stopping"]["best_epoch"] == 2
    assert m["early_stopping"]["best_val_accuracy"] == 0.5 and m["early_stopping"]["monitor"] == "val_accuracy"
    assert "early_stopping_monitor: val_accuracy" in (out / "config.yaml").read_text()


def test_plateau_cuts_follow_keras_reduce_lr_on_plateau():
    """Patience 2, factor 0.5, floor 0.2: a fall of 1e-4 or less is no fall; each second epoch in
    a row without one halves the scale, down to the floor and no further."""
    from cifarlab.train import Plateau

    p = Plateau(2, 0.5, min_scale=0.2)
    losses = [1.0, 0.99995, 0.9, 0.95, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97]
    cuts = [p.update(v) for v in losses]
    assert [i + 1 for i, c in enumerate(cuts) if c] == [5, 7, 9]  # epochs after which it cut
    assert p.scale == 0.2 and p.best == 0.9  # 0.125 would pass the floor; at the floor it stops cutting
    q = Plateau(2, 0.5, 0.2)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict() and not Plateau(0).update(5.0)


@pytest.mark.parametrize("settings, values, scales", [
    # val_accuracy, min_delta 0.01, cooldown 2, floor 0.1: a rise of 0.01 or less is none, and the
    # two epochs after a cut count towards no cut
    ({"patience": 2, "factor": 0.5, "min_scale": 0.1, "monitor": "val_accuracy", "min_delta": 0.01, "cooldown": 2},
     [0.5, 0.505, 0.6, 0.6, 0.605, 0.61, 0.61, 0.62, 0.62, 0.62, 0.7, 0.7, 0.7, 0.7, 0.69, 0.69, 0.69],
     [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.1, 0.1]),
    # val_loss, patience 1, min_delta 0, cooldown 1: a new best in the cooldown still counts as one
    ({"patience": 1, "factor": 0.5, "monitor": "val_loss", "min_delta": 0.0, "cooldown": 1},
     [1.0, 1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.87, 0.7, 0.7, 0.7, 0.7],
     [1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.0625, 0.03125, 0.03125, 0.015625, 0.0078125, 0.00390625]),
])
def test_plateau_monitor_min_delta_and_cooldown_follow_keras(settings, values, scales):
    """The lr scale after each epoch, as Keras 3.15's ReduceLROnPlateau (mode min for val_loss,
    max for val_accuracy) set the lr of an optimizer starting at 1 for the same figures."""
    from cifarlab.train import Plateau

    p = Plateau(**settings)
    got = []
    for v in values:
        p.update(v)
        got.append(p.scale)
    assert got == pytest.approx(scales, rel=1e-6)
    q = Plateau(**settings)  # a checkpoint taken in a cooldown resumes in it
    for v in values[:5]:
        q.update(v)
    r = Plateau(**settings)
    r.load_state_dict(q.state_dict())
    assert [r.update(v) for v in values[5:]] == [q.update(v) for v in values[5:]]


def test_plateau_scales_every_group_of_any_schedule():
    """The cut multiplies each group's scheduled lr (triangle schedule, a whitening-bias group on
    a schedule of its own) from the next step on; the selector's proxy gets its schedule the same way."""
    from cifarlab.config import resolve_config
    from cifarlab.train import Plateau, _reapply, _scheduler

    cfg = resolve_config("fast", overrides={"optim": {"plateau_patience": 1, "plateau_factor": 0.5},
                                            "data": {"val_split": 0.1}})
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.4}, {"params": [b], "lr": 0.2, "schedule": "whiten_bias"}])
    plateau = Plateau(1, 0.5)
    sched = _scheduler(cfg, opt, steps_per_epoch=10, plateau=plateau)
    for _ in range(7):
        opt.step()
        sched.step()
    before = [g["lr"] for g in opt.param_groups]
    assert plateau.update(1.0) is False and plateau.update(1.0) is True and plateau.scale == 0.5
    _reapply(sched)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([x * 0.5 for x in before], rel=1e-12)
    opt.step()
    sched.step()  # and the schedule goes on, scaled
    plain = _scheduler(cfg, torch.optim.SGD([{"params": [w], "lr": 0.4},
                                              {"params": [b], "lr": 0.2, "schedule": "whiten_bias"}]), 10)
    assert [f(8) * 0.5 for f in plain.lr_lambdas] == pytest.approx([f(8) for f in sched.lr_lambdas], rel=1e-12)


def test_a_cosine_run_logs_each_epochs_last_lr(tmp_path, capsys):
    """--schedule cosine: the history's learning_rate is the lr of each epoch's last step, as
    Keras logs a scheduled lr; a constant-lr run has no such column."""
    import math

    from cifarlab.cli import main

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=4)  # 24 images, 18 trained: 5 steps of 4
    args = ["train", "--data", str(data), "--model", "keras-shallow", "--batch-size", "4", "--val-split", "0.25",
            "--threads", "1", "--deterministic", "--epochs", "3"]
    assert main(args + ["--schedule", "cosine", "--out", str(tmp_path / "cos")]) == 0
    history = json.loads((tmp_path / "cos" / "history.json").read_text())
    steps = 5  # step 0 at the full lr, then the decay over steps 1 to 15: epoch e ends on step 5e - 1
    want = [1e-3 * (1 + math.cos(math.pi * (e * steps - 2) / (3 * steps - 1))) / 2 for e in (1, 2, 3)]
    assert [h["learning_rate"] for h in history] == pytest.approx(want, rel=1e-9)
    assert "schedule: cosine" in (tmp_path / "cos" / "config.yaml").read_text()
    assert "muon_learning_rate" not in history[0]
    # Muon's filters have a rate of their own on the same schedule, logged beside the others'
    assert main(args + ["--schedule", "cosine", "--optimizer", "muon", "--lr", "0.01", "--out", str(tmp_path / "mu")]) == 0
    history = json.loads((tmp_path / "mu" / "history.json").read_text())
    assert [h["learning_rate"] for h in history] == pytest.approx([w * 10 for w in want], rel=1e-9)
    assert [h["muon_learning_rate"] for h in history] == pytest.approx([w * 240 for w in want], rel=1e-9)  # 0.24
    assert main(args + ["--out", str(tmp_path / "const")]) == 0
    assert "learning_rate" not in json.loads((tmp_path / "const" / "history.json").read_text())[0]
    capsys.readouterr()


def test_the_step_schedule_cuts_the_lr_at_its_milestones(tmp_path):
    """schedule step: the lr is multiplied by gamma from the first step at each milestone (a
    fraction of all steps) on, after any warm-up; the resnet recipe trains with it on the CPU and
    logs each epoch's last lr."""
    from cifarlab.config import resolve_config
    from cifarlab.train import _lr_lambda

    f = _lr_lambda(resolve_config(overrides={"optim": {"schedule": "step", "milestones": [0.3, 0.6],
                                                        "gamma": 0.5, "warmup_frac": 0.1, "start_lr_frac": 0.2}}),
                   100)
    assert [f(s) for s in (0, 5, 10, 29, 30, 59, 60, 99)] == pytest.approx([0.2, 0.6, 1, 1, 0.5, 0.5, 0.25, 0.25])
    data = make_image_folder(tmp_path / "d", n_train=8, n_test=2, size=(8, 8))
    cfg = resolve_config("resnet", overrides={"data": {"data": str(data), "val_split": 0.25},
                                              "train": {"epochs": 4, "batch_size": 6, "out": str(tmp_path / "r"),
                                                        "threads": 1}})
    m = fit(cfg, log=lambda s: None)
    assert 0 <= m["test_accuracy"] <= 1 and m["num_params"] == 269_722 - 65 * 7  # resnet20, 3 classes
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    # 18 training images, 3 steps an epoch, 12 in all: cuts at steps 6 and 9
    assert [h["learning_rate"] for h in history] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_reduce_lr_on_plateau_in_a_run_and_across_a_resume(tmp_path, monkeypatch, capsys):
    """Through the CLI's flags: with patience 1 and factor 0.5, validation losses 1.0, 1.1, 1.2, 0.5
    cut the lr after epochs 2 and 3; the history logs each epoch's lr, as Keras does. Trained 2
    epochs and then resumed to 4, the run ends on the same weights, so the cut and the lr are
    checkpointed."""
    import cifarlab.train as train_mod
    from cifarlab.cli import main

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=4)
    val_losses = _script_validation(monkeypatch, "val_loss", [])
    args = ["train", "--data", str(data), "--model", "keras-shallow", "--batch-size", "4", "--val-split", "0.25",
            "--threads", "1", "--deterministic", "--reduce-lr-on-plateau", "1", "--reduce-lr-factor", "0.5"]
    val_losses[:] = [1.0, 1.1, 1.2, 0.5]
    assert main(args + ["--epochs", "4", "--out", str(tmp_path / "whole")]) == 0
    out = capsys.readouterr().out
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.0005." in out
    assert "Epoch 3: ReduceLROnPlateau reducing learning rate to 0.00025." in out and "Epoch 4: Reduce" not in out
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4], rel=1e-12)

    val_losses[:] = [1.0, 1.1]
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "cut")]) == 0
    # the cut applies from the very next step: the checkpoint's optimizer already holds the new lr
    assert [g["lr"] for g in train_mod._load_checkpoint(tmp_path / "cut")["optimizer"]["param_groups"]] == \
        pytest.approx([5e-4], rel=1e-12)
    val_losses[:] = [1.2, 0.5]
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "4"]) == 0
    assert not val_losses
    a, b = _weights(tmp_path / "cut"), _weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the cuts changed the training: without them the weights differ
    val_losses[:] = [1.0, 1.1, 1.2, 0.5]
    plain = args[:args.index("--reduce-lr-on-plateau")]
    assert main(plain + ["--epochs", "4", "--out", str(tmp_path / "plain")]) == 0
    c = _weights(tmp_path / "plain")
    assert not all(torch.equal(c[k], b[k]) for k in b)
    # An epoch after which early stopping ends the run cuts nothing (the cut would never train)
    val_losses[:] = [1.0, 1.1]
    capsys.readouterr()
    assert main(args + ["--epochs", "4", "--early-stopping", "1", "--out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "Epoch 2: early stopping" in out and "ReduceLROnPlateau" not in out and not val_losses


def test_plateau_cuts_on_val_accuracy_with_a_cooldown_through_the_cli(tmp_path, monkeypatch, capsys):
    """--reduce-lr-monitor val_accuracy --reduce-lr-cooldown 2 --reduce-lr-min-delta 0.05, patience
    1: validation accuracies 0.5, 0.52, 0.4, 0.4, 0.4 cut after epoch 2 (0.52 is no rise by more
    than 0.05), not after epoch 3 (the cooldown: as in Keras, its first epoch is the cut's own
    next), then after epoch 4, not after 5; the model card says what was watched."""
    from cifarlab.cli import main

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=4)
    _script_validation(monkeypatch, "val_accuracy", [0.5, 0.52, 0.4, 0.4, 0.4])
    out = tmp_path / "r"
    assert main(["train", "--data", str(data), "--model", "keras-shallow", "--batch-size", "4", "--val-split", "0.25",
                 "--threads", "1", "--deterministic", "--epochs", "5", "--out", str(out), "--reduce-lr-on-plateau",
                 "1", "--reduce-lr-factor", "0.5", "--reduce-lr-monitor", "val_accuracy", "--reduce-lr-cooldown", "2",
                 "--reduce-lr-min-delta", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if "ReduceLROnPlateau" in line] == ["Epoch 2", "Epoch 4"]
    history = json.loads((out / "history.json").read_text())
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4], rel=1e-12)
    assert "plateau_monitor: val_accuracy" in (out / "config.yaml").read_text()
    assert main(["audit", str(out), "--bootstrap", "100"]) == 0
    assert "after every 1 epoch(s) without a higher validation accuracy, then 2 epoch(s) of cooldown" in \
        (out / "audit" / "MODEL_CARD.md").read_text()


def test_early_stopping_ends_on_the_best_epochs_weights_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Patience 2 with validation losses 1.0, 0.7, 0.9, 0.8: the run stops after epoch 4 and ends
    on epoch 2's weights, bit for bit those of the same run trained 2 epochs (constant lr). Trained
    3 epochs first and then resumed on to 10, it stops at the same point, its best weights kept
    in the checkpoint; a stopped run resumes to nothing and cannot be trained on."""

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=4)
    val_losses = _script_validation(monkeypatch, "val_loss", [])
    val_losses[:] = [1.0, 0.7]
    ref = fit(tiny_config(str(data), str(tmp_path / "ref"), epochs=2, batch_size=4), log=lambda s: None)

    val_losses[:] = [1.0, 0.7, 0.9, 0.8]
    lines: list[str] = []
    m = fit(tiny_config(str(data), str(tmp_path / "es"), epochs=10, batch_size=4, early_stopping=2),
            log=lines.append)
    assert not val_losses  # four epochs, no fifth
    assert "Epoch 4: early stopping (no lower val_loss for 2 epochs; the lowest val_loss, 0.7000, was epoch 2's)" \
        in lines[-5]
    assert "restoring the weights of epoch 2, the lowest val_loss (0.7000)" in lines
    assert m["early_stopping"] == {"patience": 2, "monitor": "val_loss", "min_delta": 0.0, "best_epoch": 2,
                                   "best_val_loss": 0.7, "stopped_after_epoch": 4}
    assert m["epochs_trained"] == 4 and m["epochs"] == 10 and m["test_accuracy"] == ref["test_accuracy"]
    assert m["test_loss"] == ref["test_loss"]
    a, b = _weights(tmp_path / "es"), _weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in json.loads((tmp_path / "es" / "history.json").read_text())] == [1.0, 0.7, 0.9, 0.8]

    val_losses[:] = [1.0, 0.7, 0.9]
    fit(tiny_config(str(data), str(tmp_path / "cut"), epochs=3, batch_size=4, early_stopping=2), log=lambda s: None)
    val_losses[:] = [0.8]
    m2 = fit(resume=tmp_path / "cut", epochs=10, log=lambda s: None)
    assert not val_losses and m2["early_stopping"] == m["early_stopping"] and m2["epochs_trained"] == 4
    a = _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)

    lines.clear()
    again = fit(resume=tmp_path / "es", log=lines.append)  # no validation pass: val_losses is empty
    assert any("stopped early after epoch 4; nothing to resume" in x for x in lines)
    assert again["test_accuracy"] == m["test_accuracy"] and again["epochs_trained"] == 4
    with pytest.raises(CifarlabError, match=r"stopped early after epoch 4, its validation loss no longer improving, "
                                            r"and ended on its best epoch's weights; it cannot train on"):
        fit(resume=tmp_path / "es", epochs=20, log=lambda s: None)

    # A --runs set whose runs stopped early is refused whole, before its config changes.
    c = tiny_config(str(data), str(tmp_path / "set"), epochs=10, batch_size=4, early_stopping=2)
    c.train.runs = 2
    val_losses[:] = [1.0, 0.7, 0.9, 0.8] * 2
    summary = fit(c, log=lambda s: None)
    assert not val_losses and summary["per_run"][0]["test_accuracy"] == ref["test_accuracy"]  # seed 0, as ref
    assert [r["epochs_trained"] for r in summary["per_run"]] == [4, 4]
    with pytest.raises(CifarlabError, match=r"run-0' stopped early after epoch 4"):
        fit(resume=tmp_path / "set", epochs=20, log=lambda s: None)
    assert "epochs: 10" in (tmp_path / "set" / "config.yaml").read_text()


def test_history_plot_adds_a_learning_rate_panel_where_the_rate_changes(tmp_path):
    from PIL import Image

    from cifarlab.plots import plot_history

    rows = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + e / 10, "val_loss": 1.1 / e, "val_accuracy": 0.5}
            for e in (1, 2, 3)]
    plot_history(rows, tmp_path / "plain.png")
    plot_history([{**r, "learning_rate": 1e-3 / 10 ** (r["epoch"] // 2)} for r in rows], tmp_path / "cut.png")
    plot_history([{**r, "learning_rate": 0.01 * (3 - r["epoch"]), "muon_learning_rate": 0.24 * (3 - r["epoch"])}
                  for r in rows], tmp_path / "to-zero.png")  # a rate that reaches 0: a linear axis
    def width(name: str) -> int:
        with Image.open(tmp_path / name) as im:
            return im.size[0]

    widths = [width(f) for f in ("plain.png", "cut.png", "to-zero.png")]
    assert widths[1] > widths[0] * 1.3 and widths[2] > widths[0] * 1.3, widths


def _yaml(tmp_path, text: str):
    path = tmp_path / "extra.yaml"
    path.write_text(text)
    return path


def test_init_from_copies_every_tensor_that_fits_and_keeps_the_source_runs_preprocessing(tmp_path, monkeypatch,
                                                                                          capsys):
    """A fine-tune: the run starts from the source run's weights, except the classifier, fresh for
    other classes, and the dense layer whose shape the smaller images change; it preprocesses as
    the source did (the source's normalisation statistics, not its own data's); the metrics and
    the model card say where it started; and resumed after the source is gone, it keeps that
    preprocessing."""
    import shutil

    import cifarlab.train as train_mod
    from cifarlab.cli import main

    src_data = make_image_folder(tmp_path / "src-data", n_train=8, n_test=2)
    # other classes, as many; smaller images
    new_data = make_image_folder(tmp_path / "new-data", classes=("bird", "ship", "deer"), n_train=8, n_test=2,
                                 size=(24, 24), seed=1)
    common = ["--model", "keras-shallow", "--batch-size", "4", "--val-split", "0.25", "--threads", "1",
              "--deterministic"]
    assert main(["train", "--data", str(src_data), *common, "--epochs", "1", "--out", str(tmp_path / "src"),
                 "--config", str(_yaml(tmp_path, "data: {normalize: true}"))]) == 0
    source = _weights(tmp_path / "src")
    src_prep = json.loads((tmp_path / "src" / "architecture.json").read_text())["preprocessing"]
    assert src_prep["mean"] is not None

    started: list[dict] = []
    real_build = train_mod._build

    def spy(*args, **kw):
        st = real_build(*args, **kw)
        started.append({k: v.detach().clone() for k, v in st.model.state_dict().items()})
        return st

    monkeypatch.setattr(train_mod, "_build", spy)
    capsys.readouterr()
    assert main(["train", "--data", str(new_data), *common, "--epochs", "1", "--out", str(tmp_path / "tuned"),
                 "--init-from", str(tmp_path / "src")]) == 0
    assert f"weights from {tmp_path / 'src'}; fresh: 8.weight, 8.bias (the classifier: {tmp_path / 'src'} was " \
           "trained on other classes, cat, dog, frog); 5.weight (other shapes there)" in capsys.readouterr().out
    first = started[-1]
    differs = [k for k in first if first[k].shape != source[k].shape or not torch.equal(first[k], source[k])]
    # the classifier, for other classes though its shape fits, and the dense layer that sees a
    # smaller image's features; the rest is the source's, the dense layer's bias included
    assert differs == ["5.weight", "8.weight", "8.bias"]
    arch = json.loads((tmp_path / "tuned" / "architecture.json").read_text())
    assert arch["preprocessing"] == src_prep and arch["classes"] == ["bird", "deer", "ship"]
    m = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert m["init_from"] == {"run": str(tmp_path / "src"), "model": "keras-shallow", "classes": ["cat", "dog", "frog"],
                              "data": str(src_data), "fresh": ["5.weight", "8.weight", "8.bias"],
                              "seen_validation_images": 0, "seen_test_images": 0}
    assert "init_from: " + str(tmp_path / "src") in (tmp_path / "tuned" / "config.yaml").read_text()
    assert main(["audit", str(tmp_path / "tuned"), "--bootstrap", "100"]) == 0
    card = (tmp_path / "tuned" / "audit" / "MODEL_CARD.md").read_text()
    assert f"- Started from: the weights of run `{tmp_path / 'src'}` (keras-shallow, trained on `{src_data}`" in card

    # Resumed (trained on to 2 epochs) after the source run is gone: the same preprocessing
    shutil.rmtree(tmp_path / "src")
    assert main(["train", "--resume", str(tmp_path / "tuned"), "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "tuned" / "architecture.json").read_text())["preprocessing"] == src_prep
    assert len(json.loads((tmp_path / "tuned" / "history.json").read_text())) == 2


def test_a_fine_tune_leaves_what_its_source_run_trained_on_out_of_its_calibration_and_says_so(tmp_path, capsys):
    """Fine-tuned on data that holds images the source run trained on, a run records them as
    learnt from: training says how many of its validation and test images they are (kept in
    init_from.json, and said by the model card), and its validation in training and its
    calibration leave those validation images out. The source's validation images are not among
    them: fine-tuned on the same data and split, a run keeps every validation image."""
    import shutil

    from cifarlab.calibrate import calibrate_run
    from cifarlab.cli import main
    from cifarlab.data import load_dataset, seen
    from cifarlab.train import run_split, split_indices

    a = make_image_folder(tmp_path / "a", n_train=8, n_test=2)
    b = make_image_folder(tmp_path / "b", n_train=8, n_test=2, seed=1)
    for c in ("cat", "dog", "frog"):  # four of each class's training images of a, among b's training images
        for k in range(4):
            shutil.copy(a / "train" / c / f"{k:04d}.png", b / "train" / c / f"from-a-{k}.png")
    common = ["--model", "keras-shallow", "--batch-size", "4", "--val-split", "0.25", "--threads", "1",
              "--deterministic", "--epochs", "1"]
    assert main(["train", "--data", str(a), *common, "--out", str(tmp_path / "src")]) == 0
    ds_a = load_dataset(a)
    src_tr, src_va = run_split(tmp_path / "src", ds_a)[1:]
    trained_a = set(seen.pixel_hashes(ds_a.x_train, src_tr.tolist()).tolist())
    # one image the source trained on among b's test images, and one it validated on: that one is no leak
    shutil.copy(a / ds_a.train_paths[src_tr[0]], b / "test" / "dog" / "from-a-trained.png")
    shutil.copy(a / ds_a.train_paths[src_va[0]], b / "test" / "dog" / "from-a-validated.png")
    capsys.readouterr()
    assert main(["train", "--data", str(b), *common, "--out", str(tmp_path / "tuned"), "--init-from",
                 str(tmp_path / "src")]) == 0
    out = capsys.readouterr().out

    ds = load_dataset(b)
    va = split_indices(load_run_config(tmp_path / "tuned" / "config.yaml"), ds.y_train)[1]
    shared = [i for i in va if seen.pixel_hashes(ds.x_train, [i])[0] in trained_a]
    assert 0 < len(shared) < len(va)
    start = json.loads((tmp_path / "tuned" / "init_from.json").read_text())
    assert start["seen_validation_images"] == len(shared) and start["seen_test_images"] == 1
    assert (f"note: {len(shared)} of the {len(va)} validation images have the pixels of an image that "
            f"{tmp_path / 'src'}'s weights learnt from: they are left out of training's validation figures, "
            "calibration and the thresholds of cifarlab ood; 1 of the 8 test images has too, and the test figures "
            "count it") in out
    # training validated on the others alone, as the metrics and history say
    assert f"; {len(ds.y_train) - len(va)} training, {len(va) - len(shared)} validation, 8 test images" in out
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["data"]["val_images"] == \
        len(va) - len(shared)
    assert set(seen.read(tmp_path / "tuned").inherited.tolist()) == trained_a

    _, _, fresh = run_split(tmp_path / "tuned", ds)
    assert sorted(fresh.tolist()) == sorted(set(va.tolist()) - set(shared))
    logged: list[str] = []
    entry = calibrate_run(tmp_path / "tuned", ds, log=logged.append)
    assert entry["validation_images"] == len(va) - len(shared)
    assert f"; {len(shared)} left out, as the weights it started from had learnt from them)" in logged[0]
    assert main(["audit", str(tmp_path / "tuned"), "--bootstrap", "100"]) == 0
    card = (tmp_path / "tuned" / "audit" / "MODEL_CARD.md").read_text()
    assert ("1 of this model's test images has the pixels of an image that run's weights learnt from: the test "
            "figures count it, and may flatter the model.") in card

    # the same data and split: the source validated on the run's validation images, and trained on none
    assert main(["train", "--data", str(a), *common, "--out", str(tmp_path / "again"), "--init-from",
                 str(tmp_path / "src")]) == 0
    start = json.loads((tmp_path / "again" / "init_from.json").read_text())
    assert start["seen_validation_images"] == 0 and start["seen_test_images"] == 0
    assert sorted(run_split(tmp_path / "again", ds_a)[2].tolist()) == sorted(src_va.tolist())
    # another seed, so another split of the same data: the note names the source's split seed, which keeps them all
    assert main(["train", "--data", str(a), *common, "--seed", "1", "--out", str(tmp_path / "reseeded"),
                 "--init-from", str(tmp_path / "src")]) == 0
    out = capsys.readouterr().out
    assert "validation images have the pixels of an image that" in out
    assert f"(--split-seed 0, as {tmp_path / 'src'} drew its split, would keep every validation image)" in out
    # a source without a record (an older cifarlab's): the counts are unknown, and the log says so
    (tmp_path / "src" / seen.FILE).unlink()
    capsys.readouterr()
    assert main(["train", "--data", str(b), *common, "--out", str(tmp_path / "blind"), "--init-from",
                 str(tmp_path / "src")]) == 0
    assert f"note: {tmp_path / 'src'} keeps no record of the images it trained on" in capsys.readouterr().out
    start = json.loads((tmp_path / "blind" / "init_from.json").read_text())
    assert start["seen_validation_images"] is None and start["seen_test_images"] is None
    assert len(seen.read(tmp_path / "blind").inherited) == 0 and len(run_split(tmp_path / "blind", ds)[2]) == len(va)
    # a source that trained on every image leaves no validation image: refused, and no run folder is left
    assert main(["train", "--data", str(a), *common, "--val-split", "0", "--out", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(a), *common, "--out", str(tmp_path / "none-left"), "--init-from",
                 str(tmp_path / "all")]) == 2
    assert (f"every validation image has the pixels of an image that the weights of model.init_from (--init-from) "
            f"'{tmp_path / 'all'}' learnt from, so none is left to validate on") in capsys.readouterr().err
    assert not (tmp_path / "none-left").exists()

    # resumed without its source's record, the fine-tune keeps those images out by its own record
    assert main(["train", "--resume", str(tmp_path / "tuned"), "--epochs", "2"]) == 0
    assert f"{len(va) - len(shared)} validation, 8 test images" in capsys.readouterr().out
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["data"]["val_images"] == \
        len(va) - len(shared)


def test_a_fine_tunes_note_on_what_its_starting_weights_learnt_from_says_only_what_there_is():
    from cifarlab.train import _seen_by_start_note, _Start

    start = _Start(Path("src"), {}, {}, 3, {})

    def note(v, t, hint=None):
        return _seen_by_start_note(start, {"seen_validation_images": v, "seen_test_images": t}, 90, 50, hint)

    assert note(0, 0) is None
    assert note(0, 2) == "2 of the 50 test images have the pixels of an image that src's weights learnt from: the " \
        "test figures count them"
    assert note(10, 0) == ("10 of the 100 validation images have the pixels of an image that src's weights learnt "
                           "from: they are left out of training's validation figures, calibration and the thresholds "
                           "of cifarlab ood")
    assert note(None, None).startswith("src keeps no record of the images it trained on")
    assert note(10, 0, "--split-seed 4, as src drew its split, would keep every validation image").endswith(
        "of cifarlab ood (--split-seed 4, as src drew its split, would keep every validation image)")


def test_a_split_hint_is_not_given_from_a_config_it_cannot_read(tmp_path):
    from cifarlab.train import _split_hint, _Start

    (tmp_path / "config.yaml").write_text("model: [not, a, config\n")
    cfg = tiny_config(str(tmp_path), str(tmp_path / "out"))
    assert _split_hint(_Start(tmp_path, {}, {}, 3, {}), np.zeros(1, np.uint64), cfg, None) is None


def test_init_from_is_checked_before_the_data_is_read_and_leaves_no_run_folder(tmp_path, trained_run, image_folder,
                                                                                monkeypatch, capsys):
    import cifarlab.train as train_mod
    from cifarlab.cli import main

    monkeypatch.setattr(train_mod, "_load_data", lambda *a: pytest.fail("data read for a bad --init-from"))
    base = ["train", "--data", str(image_folder), "--epochs", "1", "--out", str(tmp_path / "new")]
    for args, msg in [(["--init-from", str(trained_run)],  # a keras-shallow run; keras-book trains keras-deep
                       f"model.init_from (--init-from) '{trained_run}' holds a keras-shallow model and this run "
                       "trains keras-deep; set the model to keras-shallow (--model), or start from a keras-deep run"),
                      (["--model", "keras-shallow", "--init-from", str(tmp_path / "nope")],
                       f"model.init_from (--init-from): run folder '{tmp_path / 'nope'}' does not exist"),
                      (["--model", "keras-shallow", "--init-from", str(image_folder)],
                       f"model.init_from (--init-from): '{image_folder}' is not a cifarlab run folder"),
                      (["--runs", "2", "--init-from", str(trained_run)], "holds a keras-shallow model")]:
        assert main(base + args) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    monkeypatch.undo()  # and one found in the data: images of another number of channels
    grey = make_image_folder(tmp_path / "grey", mode="L", n_train=4, n_test=1)
    assert main(["train", "--data", str(grey), "--model", "keras-shallow", "--epochs", "1", "--init-from",
                 str(trained_run), "--out", str(tmp_path / "new")]) == 2
    assert f"'{trained_run}' takes 3-channel images and this data has 1-channel ones" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _frozen_fine_tune(tmp_path, model: str) -> tuple[dict, list[str]]:
    """A one-epoch source run of ``model`` on three classes, and its fine-tune on two others
    with --freeze-epochs 1 for one epoch into ``probe``; returns the source's weights and the
    fine-tune's command line without --epochs and --out."""
    from cifarlab.cli import main

    src_data = make_image_folder(tmp_path / "src-data", n_train=8, n_test=2)
    new_data = make_image_folder(tmp_path / "new-data", classes=("bird", "ship"), n_train=8, n_test=2, seed=1)
    common = ["--model", model, "--batch-size", "4", "--val-split", "0.25", "--threads", "1", "--deterministic"]
    assert main(["train", "--data", str(src_data), *common, "--epochs", "1", "--out", str(tmp_path / "src")]) == 0
    tune = ["train", "--data", str(new_data), *common, "--init-from", str(tmp_path / "src"), "--freeze-epochs", "1"]
    assert main(tune + ["--epochs", "1", "--out", str(tmp_path / "probe")]) == 0
    return _weights(tmp_path / "src"), tune


def test_freeze_epochs_train_only_the_classifier_first_and_resume_across_the_thaw(tmp_path):
    """--freeze-epochs 1 after --init-from: in the first epoch only the fresh classifier moves,
    every other tensor stays the source run's bit for bit; in the second, all train. Stopped
    after the frozen epoch and resumed, the run ends as the whole one (the freeze follows the
    epoch, not the process); a freeze as long as the run is a linear probe."""
    from cifarlab.cli import main

    source, tune = _frozen_fine_tune(tmp_path, "keras-shallow")
    probe = _weights(tmp_path / "probe")
    body = [k for k in probe if not k.startswith("8.")]
    assert body and all(torch.equal(probe[k], source[k]) for k in body)
    assert main(tune + ["--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    whole = _weights(tmp_path / "whole")
    assert all(not torch.equal(whole[k], source[k]) for k in body if k.endswith("weight"))  # thawed in epoch 2
    assert main(["train", "--resume", str(tmp_path / "probe"), "--epochs", "2"]) == 0
    resumed = _weights(tmp_path / "probe")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert "freeze_epochs: 1" in (tmp_path / "whole" / "config.yaml").read_text()


def test_a_frozen_phase_keeps_the_batch_norms_running_statistics(tmp_path):
    """As Keras runs a frozen BatchNormalization in inference mode, the frozen epochs leave the
    batch norms' running statistics as the source run's, bit for bit; once thawed they move."""
    from cifarlab.cli import main

    source, tune = _frozen_fine_tune(tmp_path, "speednet-proxy")
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert stats
    probe = _weights(tmp_path / "probe")
    assert all(torch.equal(probe[k], source[k]) for k in stats)
    assert main(tune + ["--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    whole = _weights(tmp_path / "whole")
    assert all(not torch.equal(whole[k], source[k]) for k in stats)  # thawed in epoch 2


def _spied_skewed_training(tmp_path, monkeypatch, watch: str) -> tuple[list, list[str]]:
    """Training arguments for 10 cats, 10 dogs and 5 frogs, and the list that every training
    loss then appends its ``watch`` argument to (class_weight or logit_offset, as a list; None
    where absent), the other one checked to be absent."""
    import cifarlab.train as train_mod

    data = make_image_folder(tmp_path / "d", n_train=10, n_test=2)
    for f in sorted((data / "train" / "frog").iterdir())[5:]:
        f.unlink()
    seen: list = []
    real = train_mod.cross_entropy

    def spy(logits, y, label_smoothing=0.0, class_weight=None, logit_offset=None):
        args = {"class_weight": class_weight, "logit_offset": logit_offset}
        assert all(v is None for k, v in args.items() if k != watch)
        seen.append(None if args[watch] is None else args[watch].tolist())
        return real(logits, y, label_smoothing, class_weight, logit_offset)

    monkeypatch.setattr(train_mod, "cross_entropy", spy)
    return seen, ["--data", str(data), "--model", "keras-shallow", "--batch-size", "8", "--val-split", "0.2",
                  "--epochs", "1", "--threads", "1"]


def test_class_weight_balanced_weighs_each_step_and_is_recorded(tmp_path, monkeypatch, capsys):
    """--class-weight balanced: every training step's loss gets the weights n / (k x count) of
    the training split's classes; the log, metrics.json and the model card say so, and the card
    names the imbalance. Validation stays unweighted."""
    from cifarlab.cli import main

    seen, common = _spied_skewed_training(tmp_path, monkeypatch, "class_weight")
    assert main(["train", *common, "--class-weight", "balanced", "--out", str(tmp_path / "w")]) == 0
    counts = {"cat": 8, "dog": 8, "frog": 4}  # after the stratified validation split
    expected = [20 / (3 * n) for n in counts.values()]
    assert len(seen) == 3 and all(w == pytest.approx(expected) for w in seen)  # 20 images, batches of 8
    assert "loss weighted by class (balanced): cat 0.8333, dog 0.8333, frog 1.667" in capsys.readouterr().out
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert m["data"]["train_per_class"] == counts
    assert m["class_weight"] == {"setting": "balanced", "weights": {"cat": 0.8333333, "dog": 0.8333333,
                                                                    "frog": 1.666667}}
    assert main(["audit", str(tmp_path / "w"), "--bootstrap", "100"]) == 0
    card = (tmp_path / "w" / "audit" / "MODEL_CARD.md").read_text()
    assert "- Training images per class: from 4 (frog) to 8 (cat, dog), 2.0 times as many; classes with fewer" in card
    assert "- Training loss weighted by class (balanced, n_samples / (n_classes x count)): from 0.833 (cat) to " \
           "1.67 (frog)" in card
    assert "| class | accuracy | 95% CI | precision | training images |" in card
    audit = json.loads((tmp_path / "w" / "audit" / "audit.json").read_text())
    assert [r["train_images"] for r in audit["classes"]["per_class"]] == [8, 8, 4]
    assert "| frog | 2 | " in (tmp_path / "w" / "audit" / "audit.md").read_text()
    frog_rows = [line for line in (tmp_path / "w" / "audit" / "audit.md").read_text().splitlines()
                 if line.startswith("| frog |")]  # its accuracy, then its confidence when predicted
    assert len(frog_rows) == 2 and frog_rows[0].endswith(" 4 |")

    seen.clear()
    assert main(["train", *common, "--class-weight", "frog=3", "--out", str(tmp_path / "n")]) == 0
    assert seen == [[1.0, 1.0, 3.0]] * 3
    assert "loss weighted by class (as given, the others 1): cat 1, dog 1, frog 3" in capsys.readouterr().out
    seen.clear()
    assert main(["train", *common, "--out", str(tmp_path / "plain")]) == 0
    assert seen == [None] * 3
    assert "class_weight" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert main(["train", *common, "--class-weight", "lion=2", "--out", str(tmp_path / "bad")]) == 2
    assert "names class 'lion', which this data does not have; its classes are cat, dog, frog" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_logit_adjusted_loss_shifts_each_step_and_is_recorded(tmp_path, monkeypatch, capsys):
    """--logit-adjustment TAU: every training step's loss sees the logits plus TAU x log(the
    training split's class shares); the log, metrics.json and the model card say so; calibrate
    --balance-classes warns that the run already leans toward rare classes. It is refused with
    the other remedies, and for a negative TAU."""
    from cifarlab.cli import main

    seen, common = _spied_skewed_training(tmp_path, monkeypatch, "logit_offset")
    assert main(["train", *common, "--logit-adjustment", "0.5", "--out", str(tmp_path / "la")]) == 0
    want = (0.5 * np.log(np.array([8, 8, 4]) / 20)).tolist()  # the shares after the stratified validation split
    assert len(seen) == 3 and all(o == pytest.approx(want, rel=1e-6) for o in seen)
    out = capsys.readouterr().out
    assert "logit-adjusted loss (train.logit_adjustment 0.5): each logit plus 0.5 x log(its class's training " \
           "share), from -0.805 to -0.458" in out
    assert "--balance-classes" not in out  # the loss already balanced it
    m = json.loads((tmp_path / "la" / "metrics.json").read_text())
    assert m["logit_adjustment"]["tau"] == 0.5
    assert list(m["logit_adjustment"]["offsets"].values()) == pytest.approx(want, rel=1e-6)
    assert main(["audit", str(tmp_path / "la"), "--bootstrap", "100"]) == 0
    assert "- Logit-adjusted training loss (tau 0.5, Menon et al., 2021)" in \
        (tmp_path / "la" / "audit" / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "la"), "--balance-classes"]) == 0
    assert "warning: it trained with a logit-adjusted loss, so its predictions already lean toward rare " \
           "classes" in capsys.readouterr().out
    seen.clear()
    assert main(["train", *common, "--out", str(tmp_path / "plain")]) == 0
    assert seen == [None] * 3 and "logit_adjustment" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())
    for bad, why in ((["--logit-adjustment", "1", "--class-weight", "balanced"], "favoured twice over"),
                     (["--logit-adjustment", "1", "--sampling", "balanced"], "favoured twice over"),
                     (["--logit-adjustment", "-1"], "it must be a number of 0 or more")):
        assert main(["train", *common, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert f"train.logit_adjustment = {float(bad[1])!r} is not valid; " in (err := capsys.readouterr().err)
        assert why in err
    assert not (tmp_path / "bad").exists()


def test_balanced_sampling_draws_every_class_equally_often_and_is_recorded(tmp_path, capsys):
    """--sampling balanced: each epoch's order is as many draws as images, with replacement,
    classes equally likely (a seeded generator repeats it); shuffle is a permutation, as before.
    The log, metrics.json and the model card say which ran."""
    from cifarlab.cli import main
    from cifarlab.train import epoch_order

    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = epoch_order(y, "balanced", torch.Generator().manual_seed(0))
    assert len(order) == 1000 and torch.equal(order, epoch_order(y, "balanced", torch.Generator().manual_seed(0)))
    drawn = torch.bincount(y[order], minlength=3).tolist()
    assert all(abs(k - 1000 / 3) < 60 for k in drawn), drawn  # 5 standard deviations of a binomial count
    assert len(set(order[y[order] == 2].tolist())) <= 10  # the rare class's few images, each many times
    shuffled = epoch_order(y, "shuffle", torch.Generator().manual_seed(0))
    assert torch.equal(shuffled, torch.randperm(1000, generator=torch.Generator().manual_seed(0)))

    data = make_image_folder(tmp_path / "d", n_train=10, n_test=2)
    for f in sorted((data / "train" / "frog").iterdir())[5:]:
        f.unlink()
    assert main(["train", "--data", str(data), "--model", "keras-shallow", "--batch-size", "8", "--epochs", "1",
                 "--threads", "1", "--sampling", "balanced", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "each epoch draws 20 of the training images with replacement, every class equally likely " \
           "(train.sampling balanced): about 7 draws per class" in out
    assert "--balance-classes" not in out  # its sampling already leans toward the rare class
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["sampling"] == "balanced"
    assert main(["audit", str(tmp_path / "b"), "--bootstrap", "100"]) == 0
    assert "- Training images drawn class-balanced: each epoch as many draws as images" in \
        (tmp_path / "b" / "audit" / "MODEL_CARD.md").read_text()


def test_unequal_validation_classes_add_the_balanced_accuracy_which_early_stopping_can_watch(tmp_path, capsys):
    """Where the validation classes are unequally many, the history and the epoch line add
    val_balanced_accuracy (the mean per-class recall), which --early-stopping-monitor can
    watch; with equal classes it is left out unless a monitor watches it."""
    from sklearn.metrics import balanced_accuracy_score

    from cifarlab.cli import main
    from cifarlab.evaluate import balanced_accuracy

    y, pred = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 1, 0, 1, 2, 0])
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert balanced_accuracy(torch.tensor([0, 2, 2]), torch.tensor([0, 2, 1])) == pytest.approx(0.75)

    common = ["--model", "keras-shallow", "--batch-size", "8", "--threads", "1", "--val-split", "0.25"]
    equal = make_image_folder(tmp_path / "eq", n_train=8, n_test=2)  # 2 validation images a class
    assert main(["train", "--data", str(equal), *common, "--epochs", "1", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "val_balanced_accuracy" not in out and "--balance-classes" not in out
    assert "val_balanced_accuracy" not in json.loads((tmp_path / "e" / "history.json").read_text())[0]

    unequal = make_image_folder(tmp_path / "uneq", n_train=8, n_test=2)
    for f in sorted((unequal / "train" / "frog").iterdir())[4:]:
        f.unlink()  # 2, 2 and 1 validation images
    assert main(["train", "--data", str(unequal), *common, "--epochs", "3", "--early-stopping", "1",
                 "--early-stopping-monitor", "val_balanced_accuracy", "--out", str(tmp_path / "u")]) == 0
    out = capsys.readouterr().out
    history = json.loads((tmp_path / "u" / "history.json").read_text())
    values = [h["val_balanced_accuracy"] for h in history]
    assert f"val_accuracy: {history[0]['val_accuracy']:.4f} - val_balanced_accuracy: {values[0]:.4f}" in out
    assert ("note: its training classes were unequal (3 to 6 images); to predict as if they were equally likely, "
            f"as in a balanced test set: cifarlab calibrate {tmp_path / 'u'} --balance-classes") in out
    es = json.loads((tmp_path / "u" / "metrics.json").read_text())["early_stopping"]
    assert es["monitor"] == "val_balanced_accuracy" and es["best_val_balanced_accuracy"] == max(values)
    assert values.index(max(values)) + 1 == es["best_epoch"]
    assert main(["audit", str(tmp_path / "u"), "--bootstrap", "100"]) == 0
    assert "the highest validation balanced accuracy)" in (tmp_path / "u" / "audit" / "MODEL_CARD.md").read_text()

    # A run of a version without the column, trained on: its history keeps the columns it had.
    assert main(["train", "--data", str(unequal), *common, "--epochs", "1", "--out", str(tmp_path / "old")]) == 0
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    for row in ckpt["history"]:
        del row["val_balanced_accuracy"]
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    assert main(["train", "--resume", str(tmp_path / "old"), "--epochs", "2"]) == 0
    rows = json.loads((tmp_path / "old" / "history.json").read_text())
    assert len(rows) == 2 and not any("val_balanced_accuracy" in r for r in rows)


def test_a_run_keeps_hashes_of_the_images_it_trained_and_validated_on(trained_run, image_folder):
    """seen_images.safetensors: the 18 training images (13 trained on, 5 validated on) by their
    paths and pixels, and which it trained on, not the test images; a run without one (an older
    cifarlab's) gets it when resumed."""
    from cifarlab.data import load_dataset, seen

    from cifarlab.train import run_split

    ds = load_dataset(image_folder)
    pixels, paths, trained, inherited = seen.read(trained_run)
    assert sorted(paths.tolist()) == sorted(seen.path_hashes(ds.train_paths).tolist())
    assert sorted(pixels.tolist()) == sorted(seen.pixel_hashes(ds.x_train).tolist())
    tr = run_split(trained_run, ds)[1]
    assert len(tr) == 13 and sorted(trained.tolist()) == sorted(seen.pixel_hashes(ds.x_train, tr.tolist()).tolist())
    assert len(inherited) == 0  # it started from fresh weights
    assert all(p.startswith("train/") for p in ds.train_paths) and len(ds.train_paths) == 18
    assert not set(pixels.tolist()) & set(seen.pixel_hashes(ds.x_test).tolist())
    (trained_run / seen.FILE).unlink()
    fit(resume=trained_run, log=lambda s: None)
    assert sorted(seen.read(trained_run)[1].tolist()) == sorted(paths.tolist())


def test_a_sweep_stopped_mid_point_resumes_it_exactly(tmp_path, resume_data, reference_run):
    """Ctrl-C in a sweep's point leaves its checkpoint; --resume of the sweep resumes that point
    (not anew) and ends on the weights of the same run never stopped."""
    args = _train_args(resume_data, tmp_path / "sw")
    args[args.index("--seed"):args.index("--seed") + 2] = ["--sweep", "seed=3"]
    p = _cli(args)
    ckpt = tmp_path / "sw" / "seed=3" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "checkpoint was saved" in err, err
    r = _cli(["train", "--resume", str(tmp_path / "sw")])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "=== point 1/1: seed=3 (started) ===" in out and "resuming" in out, out
    a, b = _weights(tmp_path / "sw" / "seed=3"), _weights(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "sw" / "sweep_summary.json").is_file()


def test_a_teacher_of_weight_zero_changes_nothing_and_is_recorded(tmp_path, trained_run, image_folder):
    """Distillation with distill_weight 0 trains bit for bit as without a teacher (its forward
    pass leaves the model's random draws alone); the run records its teacher; the teacher stays
    frozen in eval mode."""
    from cifarlab.export import read_weights

    plain = fit(tiny_config(str(image_folder), str(tmp_path / "plain")), log=lambda s: None)
    said = []
    taught = fit(tiny_config(str(image_folder), str(tmp_path / "taught"), teacher=str(trained_run),
                             distill_weight=0.0), log=said.append)
    a, b = (read_weights(Path(m["run"]) / "weights.safetensors") for m in (plain, taught))
    assert all(torch.equal(a[k], b[k]) for k in a) and taught["test_loss"] == plain["test_loss"]
    t = json.loads((tmp_path / "taught" / "metrics.json").read_text())["teacher"]
    teacher_accuracy = json.loads((trained_run / "metrics.json").read_text())["test_accuracy"]
    assert t == {"run": str(trained_run), "model": "keras-shallow", "test_accuracy": teacher_accuracy,
                 "data": t["data"], "weight": 0.0, "temperature": 4.0}
    assert any(s.startswith(f"distilling from {trained_run} (keras-shallow, test accuracy") and
               "loss = 1 x cross-entropy + 0 x T^2 x KL to its softmax at T = 4" in s for s in said)
    from cifarlab.cli import main

    assert main(["audit", taught["run"]]) == 0
    card = (tmp_path / "taught" / "audit" / "MODEL_CARD.md").read_text()
    assert (f"- Distilled from: the predictions of run `{trained_run}` (keras-shallow, test accuracy "
            f"{teacher_accuracy:.4f}, trained on `{t['data']}`; 0 of the loss, at temperature 4)") in card


def test_a_taught_run_resumed_trains_as_one_uninterrupted(tmp_path, trained_run, image_folder):
    """The teacher is read again on resume: a taught run of 1 epoch trained on to 2 ends on the
    weights of a taught run of 2 epochs from the start."""
    from cifarlab.export import read_weights

    kw = {"teacher": str(trained_run), "distill_weight": 0.7}
    whole = fit(tiny_config(str(image_folder), str(tmp_path / "whole"), epochs=2, **kw), log=lambda s: None)
    fit(tiny_config(str(image_folder), str(tmp_path / "part"), epochs=1, **kw), log=lambda s: None)
    part = fit(resume=tmp_path / "part", epochs=2, log=lambda s: None)
    a, b = (read_weights(Path(m["run"]) / "weights.safetensors") for m in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a) and part["test_loss"] == whole["test_loss"]


@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_the_student_learns_the_teachers_answers(tmp_path, image_folder, augment):
    """A teacher trained to call every image 'frog' (its data labels them so) and a student taught
    by it alone (distill_weight 1) on the true labels: the student calls them frog too, with the
    teacher's logits computed once beforehand (no augmentation) or in every step (augmented)."""
    import shutil

    frogs = tmp_path / "frogs"
    shutil.copytree(image_folder, frogs)
    for split in ("train", "test"):  # every image in the frog folder, the other class folders kept, empty
        for c in ("cat", "dog"):
            for f in (frogs / split / c).iterdir():
                f.rename(frogs / split / "frog" / f"{c}-{f.name}")
    for c in ("cat", "dog"):  # a few images each, so that the classes exist
        for split, names in (("train", ("0000", "0001")), ("test", ("0000",))):
            for name in names:
                shutil.copy(image_folder / split / c / f"{name}.png", frogs / split / c / f"{name}.png")
    teacher = fit(tiny_config(str(frogs), str(tmp_path / "t"), epochs=3), log=lambda s: None)
    student = fit(tiny_config(str(image_folder), str(tmp_path / "s"), epochs=3, teacher=teacher["run"],
                              distill_weight=1.0, distill_temperature=1.0) if augment == "none" else
                  resolve_config("keras-book", overrides={
                      "data": {"data": str(image_folder), "val_split": 0.25}, "model": {"name": "keras-shallow"},
                      "augment": {"preset": augment},
                      "train": {"epochs": 3, "batch_size": 8, "out": str(tmp_path / "s"), "seed": 0, "threads": 1,
                                "deterministic": True, "teacher": teacher["run"], "distill_weight": 1.0,
                                "distill_temperature": 1.0}}), log=lambda s: None)
    from cifarlab.data import load_dataset

    ds = load_dataset(image_folder)
    pred = load_model(student["run"]).predict(ds.x_test).argmax(1)
    assert (pred == ds.classes.index("frog")).mean() > 0.8  # as the teacher, not as the labels (a third frogs)


def test_without_augmentation_the_teachers_logits_are_made_once_as_a_step_makes_them(tmp_path, trained_run,
                                                                                    image_folder, monkeypatch):
    import cifarlab.train as train_mod

    made = {}
    real = train_mod._Loop._teacher_logits

    def spy(loop):
        made["soft"] = real(loop)
        made["want"] = loop.st.teacher(preprocess(loop.arrays.x_train, loop.st.prep).contiguous(
            memory_format=torch.channels_last))
        return made["soft"]

    from cifarlab.export import preprocess

    monkeypatch.setattr(train_mod._Loop, "_teacher_logits", spy)
    fit(tiny_config(str(image_folder), str(tmp_path / "s"), teacher=str(trained_run)), log=lambda s: None)
    assert made["soft"].shape == (13, 3) and torch.allclose(made["soft"], made["want"], atol=1e-5)


def test_the_runs_of_a_runs_folder_teach_as_one_ensemble(tmp_path, image_folder):
    """A --runs 2 folder as the teacher: the mean of its runs' logits, recorded and carded as
    such; a folder with an unfinished run is refused before any data is read."""
    from cifarlab.cli import main
    from cifarlab.train import EnsembleLogits

    members = [torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)]
    x = torch.randn(4, 2)
    assert torch.allclose(EnsembleLogits(members)(x), (members[0](x) + members[1](x)) / 2)
    teachers = fit(tiny_config(str(image_folder), str(tmp_path / "t"), runs=2), log=lambda s: None)
    said = []
    fit(tiny_config(str(image_folder), str(tmp_path / "s"), teacher=str(tmp_path / "t")), log=said.append)
    t = json.loads((tmp_path / "s" / "metrics.json").read_text())["teacher"]
    mean = sum(r["test_accuracy"] for r in teachers["per_run"]) / 2
    assert t["runs"] == 2 and t["test_accuracy"] == pytest.approx(mean) and t["model"] == "keras-shallow"
    assert any(s.startswith(f"distilling from the 2 runs of {tmp_path / 't'} (keras-shallow, mean test accuracy")
               for s in said)
    assert main(["audit", str(tmp_path / "s")]) == 0
    card = (tmp_path / "s" / "audit" / "MODEL_CARD.md").read_text()
    assert f"- Distilled from: the predictions of the 2 runs of `{tmp_path / 't'}` (their logits averaged, " in card
    assert "those runs's data" not in card and "their model cards apply here as well" in card
    import shutil

    shutil.rmtree(tmp_path / "t" / "run-1")
    assert main(["train", "--data", str(image_folder), "--model", "keras-shallow", "--teacher", str(tmp_path / "t"),
                 "--out", str(tmp_path / "s2")]) == 2
    assert not (tmp_path / "s2").exists()


def test_a_teacher_takes_its_own_preprocessing():
    """The student's input, preprocessed its way, reaches the teacher preprocessed the teacher's."""
    from cifarlab.export import preprocess
    from cifarlab.train import TeacherLogits

    seen = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    probe = torch.nn.Sequential()
    probe.forward = lambda x: seen.append(x) or net(x)
    u = torch.randint(0, 256, (3, 3, 2, 2), dtype=torch.uint8)
    student = {"rescale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    own = {"rescale": 1 / 255, "mean": None, "std": None}
    teacher = TeacherLogits(probe, student, own)
    teacher(preprocess(u, student))
    assert torch.allclose(seen[0], preprocess(u, own), atol=1e-5)
    assert not TeacherLogits(probe, own, dict(own)).train().training  # it never trains
    same = TeacherLogits(probe, own, dict(own))
    x = preprocess(u, own)
    same(x)
    assert seen[-1] is x  # the same preprocessing: the input as it is


def test_teacher_settings_are_checked_before_the_data_is_read(tmp_path, trained_run, image_folder, monkeypatch,
                                                              capsys):
    import cifarlab.train as train_mod
    from cifarlab.cli import main

    base = ["train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1",
            "--out", str(tmp_path / "new")]
    monkeypatch.setattr(train_mod, "_load_data", lambda *a: pytest.fail("data read for a bad teacher"))
    for args, msg in [(["--teacher", str(tmp_path / "nope")],
                       f"train.teacher (--teacher): run folder '{tmp_path / 'nope'}' does not exist"),
                      (["--distill-weight", "0.3"], "train.distill_weight = 0.3 is not valid; it only applies with "
                                                    "a teacher: set train.teacher (--teacher) to a run folder too"),
                      (["--teacher", str(trained_run), "--distill-weight", "1.5"],
                       "train.distill_weight = 1.5 is not valid; it must lie in [0, 1]"),
                      (["--teacher", str(trained_run), "--distill-temperature", "0"],
                       "train.distill_temperature = 0.0 is not valid; it must be a number above 0"),
                      (["--teacher", str(trained_run), "--cuda-graph"], "the captured step does not run a teacher"),
                      (["--runs", "2", "--teacher", str(tmp_path / "nope")], "does not exist")]:
        assert main(base + args) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    monkeypatch.undo()  # and what only the data tells: a teacher of other classes
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog", "emu"), n_train=4, n_test=1)
    assert main(["train", "--data", str(other), "--model", "keras-shallow", "--epochs", "1", "--teacher",
                 str(trained_run), "--out", str(tmp_path / "new")]) == 2
    assert (f"train.teacher (--teacher) '{trained_run}' tells apart 3 classes (cat, dog, frog) and this run's "
            "data 3 (cat, dog, emu); a teacher needs the same classes in the same order") in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # or of another image size, named height first as --image-size takes it
    assert main(["train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1", "--teacher",
                 str(trained_run), "--image-size", "24x16", "--out", str(tmp_path / "new")]) == 2
    assert (f"train.teacher (--teacher) '{trained_run}' takes 32x32x3 images (HxWxC) and this run's are 24x16x3; "
            "give a teacher trained on images of this size (--image-size)") in capsys.readouterr().err


def test_a_run_is_resumed_only_on_the_images_it_started_with(tmp_path):
    """A folder edited after training started (an image changed, removed or added) is refused on
    --resume, naming how many images differ; restored, the run resumes."""
    import shutil

    from PIL import Image

    data = make_image_folder(tmp_path / "d", n_train=6, n_test=2)
    fit(tiny_config(str(data), str(tmp_path / "run")), log=lambda s: None)
    one = data / "train" / "cat" / "0000.png"
    shutil.copy(one, tmp_path / "kept.png")
    with Image.open(one) as im:
        pixels = np.array(im)
    pixels[0, 0, 0] ^= 1  # one level of one pixel
    Image.fromarray(pixels).save(one)
    with pytest.raises(CifarlabError) as e:
        fit(resume=tmp_path / "run", epochs=2, log=lambda s: None)
    assert str(e.value).startswith(f"'{tmp_path / 'run'}' cannot be resumed on this data: of the 18 training and "
                                   f"validation images it started with, 1 is not in {data} now, and of the 18 there "
                                   "now, 1 is new.")
    assert f"--model keras-shallow --init-from {tmp_path / 'run'}" in str(e.value)
    one.unlink()
    with pytest.raises(CifarlabError, match="of the 18 training and validation images it started with, 1 is not in "
                                            ".* and of the 17 there now, 0 are new"):
        fit(resume=tmp_path / "run", epochs=2, log=lambda s: None)
    shutil.copy(tmp_path / "kept.png", one)
    assert fit(resume=tmp_path / "run", epochs=2, log=lambda s: None)["epochs_trained"] == 2


def test_a_mixed_pair_is_trained_on_both_labels_by_their_shares():
    """train_step's loss for MixUp / CutMix images: the share lam of the cross-entropy of the
    images' own labels and 1 - lam of their partners', with label smoothing and class weights
    applied to both; an image is correct where it predicts the label of the larger share."""
    import torch.nn.functional as F

    from cifarlab.train import train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y, partners = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 1, 0, 2, 1, 0])
    weight = torch.tensor([1.0, 2.0, 0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the loss and count are of these weights
    logits = model(x).detach()

    def ce(target):
        return (F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none") * weight[target]).mean()

    for lam in (0.8, 0.3):
        loss, correct = train_step(model, opt, x, y, label_smoothing=0.1, class_weight=weight, mix=(partners, lam))
        assert float(loss) / 6 == pytest.approx(float(lam * ce(y) + (1 - lam) * ce(partners)), rel=1e-6)
        larger = y if lam >= 0.5 else partners
        assert int(correct) == int((logits.argmax(1) == larger).sum())
    plain, _ = train_step(model, opt, x, y, label_smoothing=0.1, class_weight=weight)
    assert float(plain) == pytest.approx(float(train_step(model, opt, x, y, label_smoothing=0.1, class_weight=weight,
                                                          mix=(partners, 1.0))[0]))


def test_mixup_and_cutmix_mix_every_step_of_a_run_and_of_the_lr_range_test(tmp_path, image_folder, monkeypatch):
    """With both set, each step of a run mixes its batch by one of the two (boxes for CutMix),
    the step trains on the partners' labels too, and a teacher runs on the mixed images rather
    than giving the unmixed images' logits made beforehand; the learning-rate range test steps
    as training does, mixed."""
    import cifarlab.augment as augment_mod
    import cifarlab.train as train_mod
    from cifarlab import lr_find

    boxes, mixes = [], []
    real_mix, real_step = train_mod.mix_batch, train_mod.train_step
    monkeypatch.setattr(train_mod, "mix_batch", lambda x, y, lam, box=None: boxes.append(box) or real_mix(x, y, lam,
                                                                                                           box))

    def step(*a, mix=None, **k):
        mixes.append(mix)
        return real_step(*a, mix=mix, **k)

    monkeypatch.setattr(train_mod, "train_step", step)
    def mixing(out, mixup=0.0, cutmix=0.0, **train):
        cfg = tiny_config(str(image_folder), str(tmp_path / out), **train)
        cfg.augment.mixup, cfg.augment.cutmix = mixup, cutmix
        return cfg

    said = []
    fit(mixing("m", 0.4, 1.0, epochs=3, batch_size=4), log=said.append)
    steps = 3 * math.ceil(13 / 4)  # 13 training images (the validation's held out) in batches of 4
    assert len(boxes) == len(mixes) == steps and all(m is not None and 0 <= m[1] <= 1 for m in mixes)
    assert any(b is None for b in boxes) and any(b is not None for b in boxes)
    assert "each step mixes pairs of its images by MixUp (alpha 0.4) or CutMix (alpha 1), one of the two at " \
           "random, and their labels by the same shares" in said
    assert not hasattr(augment_mod, "MIX_STREAM")  # the stream is training's, apart from the augmenters'

    made = []
    monkeypatch.setattr(train_mod._Loop, "_teacher_logits", lambda loop: made.append(1))
    mixes.clear()
    fit(mixing("s", 0.4, teacher=str(tmp_path / "m")), log=lambda s: None)
    assert not made and len(mixes) == math.ceil(13 / 8) and all(m is not None for m in mixes)

    mixes.clear()
    r = lr_find.find_lr(mixing("lr", cutmix=1.0, batch_size=4), 1e-4, 1e-2, 10, log=lambda _: None)
    assert len(mixes) == r["steps_run"] > 0 and all(m is not None for m in mixes)


def test_the_weight_average_is_keras_ema_kept_in_float32():
    """The first update takes the weights as they are (Keras' momentum 0 on its first step),
    then each moves the average by 1 - momentum; half-precision weights keep a float32 average,
    which the end copies back."""
    from cifarlab.train import WeightAverage

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg.update(first=True)
    assert avg.average[0].dtype == torch.float32 and torch.equal(avg.average[0], torch.ones(2, 3))
    for value in (2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        avg.update()
    want = (0.9 * 1.0 + 0.1 * 2.0) * 0.9 + 0.1 * 4.0  # 1.18; bf16 steps of 2 ** -7 near 1 could not hold it
    assert avg.average[0].sub(want).abs().max() < 1e-6
    avg.apply()
    assert model.weight.dtype == torch.bfloat16 and model.weight.float().sub(want).abs().max() < 1e-2


def test_a_run_with_ema_ends_on_the_average_of_every_steps_weights(tmp_path, image_folder, monkeypatch):
    """Each step's parameters, averaged as Keras averages them, are the weights the run saves
    and tests; the validation figures are those of the epochs' own weights, as in Keras."""
    from cifarlab.export import read_weights
    from cifarlab.train import WeightAverage

    snapshots = []
    real = WeightAverage.update
    monkeypatch.setattr(WeightAverage, "update", lambda self, first=False: snapshots.append(
        ([p.detach().clone() for p in self.params], first)) or real(self, first))
    said = []
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), epochs=2, batch_size=4)
    cfg.optim.ema_momentum = 0.5
    fit(cfg, log=said.append)
    assert len(snapshots) == 2 * math.ceil(13 / 4) and [f for _, f in snapshots] == [True] + [False] * 7
    want = snapshots[0][0]
    for params, _ in snapshots[1:]:
        want = [0.5 * a + 0.5 * p for a, p in zip(want, params)]
    saved = read_weights(tmp_path / "r" / "weights.safetensors")
    names = [n for n, _ in load_model(tmp_path / "r").model.named_parameters()]
    assert all(torch.allclose(saved[n], w, atol=1e-6) for n, w in zip(names, want))
    assert not torch.allclose(saved[names[0]], snapshots[-1][0][0])  # the average, not the last step's
    assert "ending on the moving average of the weights (optim.ema_momentum 0.5)" in said
    assert any(s.startswith("the run ends on a moving average of its weights, each step moving it by 0.5 (Keras' "
                            "use_ema, ema_momentum 0.5)") for s in said)


def test_a_run_clips_every_steps_gradients(tmp_path, image_folder, monkeypatch):
    """--global-clipnorm reaches each training step of a real run, after the backward pass and
    before the update, and the log says so."""
    from cifarlab import optim

    norms = []
    real = optim.clip_gradients_

    def watched(params, **clip):
        real(params, **clip)
        norms.append(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm().item())

    monkeypatch.setattr(optim, "clip_gradients_", watched)
    said = []
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), epochs=2, batch_size=4)
    cfg.optim.global_clipnorm = 0.01  # far under this tiny run's gradient norms
    fit(cfg, log=said.append)
    assert len(norms) == 2 * math.ceil(13 / 4) and all(n <= 0.01 * (1 + 1e-5) for n in norms)
    assert max(norms) > 0.0099
    assert "each step's gradients are clipped, all together to a norm of at most 0.01 (Keras' global_clipnorm)" in said


def test_a_run_notes_options_its_optimizer_does_not_use(tmp_path, image_folder):
    """A momentum left from another optimizer (as --recipe fast --optimizer adamw leaves fast's)
    trains, and the log says that adamw ignores it; so with a warm-up under a constant schedule."""
    said = []
    cfg = tiny_config(str(image_folder), str(tmp_path / "r"), epochs=1, batch_size=4)
    cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov = "adamw", 0.85, True
    fit(cfg, log=said.append)
    assert ("note: adamw does not use optim.momentum = 0.85, optim.nesterov = True (options of other optimizers, "
            "from the recipe or given; ignored)") in said
    said.clear()
    cfg = tiny_config(str(image_folder), str(tmp_path / "r2"), epochs=1, batch_size=4)
    cfg.optim.momentum = 0.5  # rmsprop's own
    fit(cfg, log=said.append)
    assert not [s for s in said if "does not use" in s]
    said.clear()
    cfg = tiny_config(str(image_folder), str(tmp_path / "r3"), epochs=1, batch_size=4)
    cfg.optim.warmup_frac, cfg.optim.final_lr_frac = 0.23, 0.07  # fast's, under a constant schedule
    fit(cfg, log=said.append)
    assert ("note: the constant schedule does not use optim.final_lr_frac = 0.07, optim.warmup_frac = 0.23 "
            "(options of other schedules, from the recipe or given; ignored)") in said


def test_ema_settings_are_checked():
    def cfg(**over):
        return resolve_config("keras-book", overrides=over)

    assert cfg(optim={"ema_momentum": 0.99}).optim.ema_momentum == 0.99
    with pytest.raises(ConfigError, match=r"optim.ema_momentum = 1.0 is not valid; it must lie in \[0, 1\)"):
        cfg(optim={"ema_momentum": 1.0})
    with pytest.raises(ConfigError, match=r"optim.ema_momentum = 0.9 is not valid; a run with early stopping ends"):
        cfg(optim={"ema_momentum": 0.9}, train={"early_stopping": 3})
    with pytest.raises(ConfigError, match=r"optim.ema_momentum = 0.9 is not valid; a run with lookahead ends"):
        cfg(optim={"ema_momentum": 0.9}, train={"lookahead_every": 5})
