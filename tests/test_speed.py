"""The speed recipes' parts, on CPU with tiny data: whitening, schedule, lookahead, TTA, --runs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from cifarlab.config import resolve_config
from cifarlab.export import tta_logits
from cifarlab.models import create_model
from cifarlab.train import GraphedStep, Lookahead, _lr_lambda, fit


# A value away from OptimConfig's default for each schedule key.
_OTHER_SCHEDULE_VALUE = {"warmup_frac": 0.3, "start_lr_frac": 0.5, "final_lr_frac": 0.25, "milestones": [0.6, 0.9],
                         "gamma": 0.5}


@pytest.mark.parametrize("schedule", ["constant", "triangle", "cosine", "step"])
def test_schedule_keys_are_the_ones_each_schedule_reads(schedule):
    """SCHEDULE_KEYS, which config.unused_settings relies on, says which keys move each
    schedule's learning rates: every key listed changes them, every other one leaves them."""
    from cifarlab.config import Config
    from cifarlab.optim import SCHEDULE_KEYS

    assert set(_OTHER_SCHEDULE_VALUE) == {k for keys in SCHEDULE_KEYS.values() for k in keys}
    cfg = Config()
    # a warm-up that starts low, for warmup_frac and start_lr_frac to act on under every schedule
    cfg.optim.schedule, cfg.optim.warmup_frac, cfg.optim.start_lr_frac = schedule, 0.1, 0.2
    ref = [_lr_lambda(cfg, 100)(s) for s in range(100)]
    for key, value in _OTHER_SCHEDULE_VALUE.items():
        moved = copy.deepcopy(cfg)
        setattr(moved.optim, key, value)
        same = [_lr_lambda(moved, 100)(s) for s in range(100)] == ref
        assert same == (key not in SCHEDULE_KEYS[schedule]), (schedule, key)


def test_whitening_layer_whitens_patches():
    torch.manual_seed(0)
    x = torch.randn(256, 3, 16, 16) @ torch.randn(16, 16) * 0.3 + 0.5  # correlated pixels
    m = create_model("speednet")
    m.init_whitening(x)
    out = m.whiten(x)[:, :12] - m.whiten.bias[:12].view(1, -1, 1, 1)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not m.whiten.weight.requires_grad


def test_triangle_schedule():
    cfg = resolve_config("fast")
    f = _lr_lambda(cfg, 100)
    assert f(0) == pytest.approx(0.2) and f(23) == pytest.approx(1.0) and f(100) == pytest.approx(0.07)
    assert _lr_lambda(resolve_config(), 100)(57) == 1.0


def test_cosine_schedule_warms_up_then_follows_half_a_cosine_to_its_floor():
    """fast's warm-up (0.2 of the lr at step 0, peak at step 23 of 100) then a cosine to 0.07;
    the notebook's recipe with --schedule cosine: from the lr to 0, half way at mid-run."""
    import math

    f = _lr_lambda(resolve_config("fast", overrides={"optim": {"schedule": "cosine"}}), 100)
    assert f(0) == pytest.approx(0.2) and f(23) == pytest.approx(1.0) and f(100) == pytest.approx(0.07)
    mid = 23 + 77 / 2
    assert f(round(mid)) == pytest.approx(0.07 + 0.93 * (1 + math.cos(math.pi * (round(mid) - 23) / 77)) / 2)
    decay = [f(k) for k in range(23, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    triangle = _lr_lambda(resolve_config("fast"), 100)
    assert f(30) > triangle(30) and f(90) < triangle(90)  # a cosine stays high longer, then falls lower
    g = _lr_lambda(resolve_config(overrides={"optim": {"schedule": "cosine"}}), 201)  # the decay: steps 1 to 201
    assert (g(0), g(1), g(101), g(201)) == pytest.approx((1.0, 1.0, 0.5, 0.0))


def test_lookahead_pulls_toward_slow_weights():
    m = torch.nn.Linear(2, 1)
    la = Lookahead(m)
    start = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    la.update(m, decay=0.75)
    assert torch.allclose(m.weight, start + 0.25) and torch.allclose(la.slow[0], start + 0.25)
    with torch.no_grad():
        m.weight.add_(1.0)
    la.update(m, decay=1.0)  # how a run ends: back on the slow weights, the fast step discarded
    assert torch.allclose(m.weight, start + 0.25)


def test_tta_levels():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(tta_logits(m, x, "none"), m(x))
    assert torch.allclose(tta_logits(m, x, "flip"), (m(x) + m(x.flip(3))) / 2)
    # airbench's level 2, written as airbench writes it: reflect-pad by one, crop both corners.
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, pad[:, :, 0:8, 0:8], pad[:, :, 2:10, 2:10]]
    mirrored = [(m(v) + m(v.flip(-1))) / 2 for v in views]
    expect = 0.5 * mirrored[0] + 0.5 * torch.stack(mirrored[1:]).mean(0)
    assert torch.allclose(tta_logits(m, x, "flip-translate"), expect, atol=1e-6)
    sym = torch.rand(5, 3, 8, 8)
    sym = sym + sym.flip(3)
    assert torch.allclose(tta_logits(m, sym, "flip"), (m(sym) + m(sym.flip(3))) / 2)


@pytest.mark.parametrize("recipe", ["fast", "best", "best-select"])
def test_speed_recipes_train_on_cpu(tmp_path, recipe, monkeypatch):
    # 16x16 images: a quarter of the arithmetic of 32x32 (best's wide model took most of this
    # test's time), and still three pooling stages deep
    data = make_image_folder(tmp_path / "d", n_train=24, n_test=4, size=(16, 16))
    decays: list[float] = []
    real_update = Lookahead.update
    monkeypatch.setattr(Lookahead, "update", lambda self, model, decay: (decays.append(decay),
                                                                         real_update(self, model, decay)))
    cfg = resolve_config(recipe, overrides={"data": {"data": str(data)},
                                            "train": {"epochs": 3, "batch_size": 16, "out": str(tmp_path / "r"),
                                                      "threads": 1}})
    lines: list[str] = []
    m = fit(cfg, log=lines.append)
    assert 0 <= m["test_accuracy"] <= 1 and m["tta"] == "flip-translate"
    # As airbench: every training image is trained on, no validation split.
    assert (m["data"]["train_images"], m["data"]["val_images"]) == (72, 0)
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [sorted(h) for h in history] == [["accuracy", "epoch", "learning_rate", "loss", "train_time_s"]] * 3
    assert (tmp_path / "r" / "history.png").is_file() and "val_" not in "".join(lines)
    # Full batches only (drop_last): 72 // 16 = 4 steps an epoch, 12 in all. Lookahead at steps 5
    # and 10, its decay growing with progress; the run ends on the slow weights.
    assert len(decays) == 3 and 0 < decays[0] < decays[1] < 1 and decays[-1] == 1.0
    arch = json.loads((tmp_path / "r" / "architecture.json").read_text())
    assert arch["preprocessing"]["mean"] is not None  # normalised by the training images' statistics


def test_runs_report_statistics(tmp_path, image_folder, capsys):
    cfg = resolve_config(overrides={"data": {"data": str(image_folder), "val_split": 0.25},
                                    "model": {"name": "keras-shallow"},
                                    "train": {"epochs": 1, "batch_size": 8, "runs": 3, "out": str(tmp_path / "r"),
                                              "threads": 1}})
    lines = []
    s = fit(cfg, log=lines.append)
    saved = json.loads((tmp_path / "r" / "runs_summary.json").read_text())
    assert saved["runs"] == 3 and [r["seed"] for r in saved["per_run"]] == [0, 1, 2]
    accs = [r["test_accuracy"] for r in saved["per_run"]]
    assert saved["test_accuracy"]["min"] == min(accs) and saved["test_accuracy"]["max"] == max(accs)
    assert saved["test_accuracy"]["mean"] == pytest.approx(sum(accs) / 3)
    assert all((tmp_path / "r" / f"run-{k}" / "weights.safetensors").is_file() for k in range(3))
    assert s["train_time_s"]["min"] > 0
    # the test pass is timed apart (airbench's published times include theirs)
    tests = [json.loads((tmp_path / "r" / f"run-{k}" / "metrics.json").read_text())["test_time_s"] for k in range(3)]
    assert [r["test_time_s"] for r in saved["per_run"]] == tests and min(tests) > 0
    assert saved["test_time_s"]["max"] == max(tests)
    from cifarlab.errors import CifarlabError
    from cifarlab.export import load_model

    with pytest.raises(CifarlabError, match=r"holds 3 runs of 'cifarlab train --runs' \(run-0, run-1, run-2\); "
                                            r"give one of them, for example '.*run-0'"):
        load_model(tmp_path / "r")
    from cifarlab.cli import main

    assert main(["evaluate", str(tmp_path / "r"), "--json"]) == 0  # each run, then the spread over them
    ev = json.loads(capsys.readouterr().out)
    assert [r["accuracy"] for r in ev["per_run"]] == pytest.approx(accs) and ev["runs"] == 3
    assert ev["accuracy"]["mean"] == pytest.approx(saved["test_accuracy"]["mean"])
    # equal test classes: the balanced accuracy is the accuracy, and the summary says so
    assert ev["balanced_accuracy"] == pytest.approx(ev["accuracy"]) and ev["unequal_classes"] is False
    assert all((tmp_path / "r" / f"run-{k}" / "eval" / "metrics.json").is_file() for k in range(3))
    assert json.loads((tmp_path / "r" / "eval_summary.json").read_text()) == ev
    # and their ensemble: the mean of the runs' probabilities, as predict gives it
    from cifarlab.data import load_dataset

    ds = load_dataset(image_folder)
    mean = np.mean([load_model(tmp_path / "r" / f"run-{k}").predict(ds.x_test) for k in range(3)], axis=0)
    ens = ev["ensemble"]
    assert ens["accuracy"] == pytest.approx(float((mean.argmax(1) == ds.y_test).mean()))
    # which training reported already, the runs being uncalibrated then
    assert saved["ensemble"] == {"test_accuracy": ens["accuracy"], "probabilities": "mean of the runs', uncalibrated"}
    assert (f"their ensemble (the mean of their probabilities, uncalibrated): test accuracy "
            f"{ens['accuracy']:.4f}") in lines[-1]
    assert ens["loss"] == pytest.approx(float(-np.log(mean[np.arange(len(ds.y_test)), ds.y_test]).mean()), rel=1e-5)
    assert ens["loss"] <= ev["loss"]["mean"] + 1e-6  # -log is convex: never above the runs' mean loss
    assert main(["evaluate", str(tmp_path / "r")]) == 0
    assert (f"Their ensemble (the mean of their probabilities, as 'cifarlab predict {tmp_path / 'r'}' gives them): "
            f"test accuracy {ens['accuracy']:.4f}, test score {ens['loss']:.4f}") in capsys.readouterr().out
    # the predict command that gives those probabilities carries the evaluation's options
    assert main(["evaluate", str(tmp_path / "r"), "--tta", "flip", "--uncalibrated", "--out", str(tmp_path / "e")]) == 0
    assert f"as 'cifarlab predict {tmp_path / 'r'} --tta flip --uncalibrated' gives them" in capsys.readouterr().out
    lines = []  # resuming finished runs trains nothing and summarises them again, the ensemble too
    assert fit(resume=tmp_path / "r", log=lines.append)["test_accuracy"] == s["test_accuracy"]
    assert sum("finished, test accuracy" in x for x in lines) == 3 and not any("Epoch" in x for x in lines)
    assert json.loads((tmp_path / "r" / "runs_summary.json").read_text())["ensemble"] == saved["ensemble"]


def test_bf16_autocast_trains_on_cpu(tmp_path, image_folder):
    cfg = resolve_config(overrides={"data": {"data": str(image_folder), "val_split": 0.25},
                                    "model": {"name": "keras-shallow"},
                                    "train": {"epochs": 1, "batch_size": 8, "precision": "bf16",
                                              "out": str(tmp_path / "r"), "threads": 1}})
    m = fit(cfg, log=lambda s: None)
    assert 0 <= m["test_accuracy"] <= 1


def test_fp16_on_cpu_is_refused(tmp_path, image_folder):
    from cifarlab.errors import ConfigError

    cfg = resolve_config(overrides={"data": {"data": str(image_folder)}, "model": {"name": "keras-shallow"},
                                    "train": {"epochs": 1, "precision": "fp16", "device": "cpu",
                                              "out": str(tmp_path / "r")}})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        fit(cfg, log=lambda s: None)
    # Refused before the data is read: a missing data path would otherwise be the error.
    cfg.data.data = str(tmp_path / "missing")
    for precision in ("fp16", "fp16-true"):
        cfg.train.precision = precision
        with pytest.raises(ConfigError, match=f"precision {precision} needs a CUDA device"):
            fit(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_true_precisions_cast_the_weights_but_not_batch_norm():
    from cifarlab import runtime
    from cifarlab.errors import ConfigError

    cpu = torch.device("cpu")
    m = runtime.cast_model(create_model("speednet"), cpu, "bf16-true")
    assert m.whiten.weight.dtype == m.layers[1].conv1.weight.dtype == m.head.weight.dtype == torch.bfloat16
    norms = [n for n in m.modules() if isinstance(n, torch.nn.BatchNorm2d)]
    assert len(norms) == 6
    assert {t.dtype for n in norms for t in (n.weight, n.bias, n.running_mean, n.running_var)} == {torch.float32}
    assert runtime.compute_dtype("bf16-true") == torch.bfloat16 and runtime.compute_dtype("bf16") == torch.float32
    for precision in ("fp32", "bf16"):  # autocast keeps float32 weights
        assert {p.dtype for p in runtime.cast_model(create_model("keras-shallow"), cpu, precision).parameters()} \
            == {torch.float32}
    with pytest.raises(ConfigError, match="precision fp16-true needs a CUDA device"):
        runtime.cast_model(create_model("keras-shallow"), cpu, "fp16-true")
    with pytest.raises(ConfigError, match="precision 'fp8' is not valid; choose fp32, bf16, fp16, bf16-true, fp16-true"):
        runtime.autocast(cpu, "fp8")
    with pytest.raises(ConfigError, match="train.precision = 'half' is not valid; choose fp32, bf16, fp16, bf16-true"):
        resolve_config("fast", overrides={"train": {"precision": "half"}})


@pytest.mark.parametrize("precision", ["bf16-true", "fp16-true"])
@pytest.mark.parametrize("recipe", ["fast", "fast-muon", "keras-book"])
def test_a_half_weight_step_moves_the_weights_as_the_fp32_step(monkeypatch, recipe, precision):
    """The same step from the same weights, once in float32 and once with half-precision
    weights: every tensor the fp32 step moves, the half one moves the same way (SGD, Muon and
    Keras RMSprop alike; the same dropout masks). fp16-true is refused on the CPU, where float16
    convolutions are slow, but its arithmetic is the same as on a GPU: with the device check
    lifted, its casts, static loss scale and float32 batch norms run here, with Muon's
    iteration in bf16 as on a GPU, so a dtype error shows up before GPU time is spent."""
    from cifarlab import optim, runtime
    from cifarlab.optim import build_optimizer, param_groups
    from cifarlab.train import train_step

    monkeypatch.setattr(runtime, "_check_precision", lambda device, precision: None)
    monkeypatch.setattr(optim, "_ns_dtype", lambda t: torch.bfloat16)  # Muon's iteration dtype on a GPU
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 12, 12), torch.randint(0, 10, (32,))
    cfg = resolve_config(recipe)
    # narrow speednet filter banks: the same layers and dtypes, and Muon's bf16 products (slow on a CPU) stay small
    ref = create_model(cfg.model.name, img_size=12, **({"widths": (16, 32, 32)} if cfg.model.name == "speednet" else {}))
    if hasattr(ref, "init_whitening"):
        ref.init_whitening(x)
    half = runtime.cast_model(copy.deepcopy(ref), torch.device("cpu"), precision)
    dtype = runtime.compute_dtype(precision)
    moved = []
    for model, inp, scale in ((ref, x, 1.0), (half, x.to(dtype), runtime.loss_scale(precision, len(y)))):
        before = {k: v.float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
        torch.manual_seed(1)  # the same dropout masks
        loss, _ = train_step(model, opt, inp, y, label_smoothing=cfg.train.label_smoothing, loss_scale=scale)
        assert torch.isfinite(loss)
        moved.append({k: model.state_dict()[k].float() - v for k, v in before.items()})
    norms = {id(t) for m in half.modules() if isinstance(m, torch.nn.BatchNorm2d) for t in m.parameters()}
    assert all(p.dtype == (torch.float32 if id(p) in norms else dtype) for p in half.parameters())
    compared = 0
    for k, d32 in moved[0].items():
        if "running" in k or d32.norm() < 1e-6:
            continue
        cos = torch.nn.functional.cosine_similarity(d32.flatten(), moved[1][k].flatten(), dim=0)
        assert cos > 0.9, (k, float(cos))
        compared += 1
    assert compared >= (10 if recipe != "keras-book" else 12)  # every filter bank, bias and dense layer


def test_fp16_loss_scale_is_a_power_of_two_and_leaves_the_step_unchanged():
    """fp16 training scales the loss by the largest power of two within the batch size and
    unscales the gradients: in float32 that changes nothing, to the bit; other precisions, and
    the step functions built for them, do not scale."""
    from cifarlab import runtime
    from cifarlab import train as train_mod
    from cifarlab.optim import build_optimizer, param_groups
    from cifarlab.train import train_step

    assert [runtime.loss_scale(p, b) for p, b in [("fp16", 2000), ("fp16-true", 128), ("fp16", 1), ("bf16", 2000),
                                                  ("bf16-true", 512), ("fp32", 128)]] == [1024, 128, 1, 1, 1, 1]
    x, y = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    for name, recipe in (("keras-shallow", "keras-book"), ("speednet", "fast-muon")):
        cfg = resolve_config(recipe)
        torch.manual_seed(0)
        ref = create_model(name, img_size=12)
        if name == "speednet":
            ref.init_whitening(x)
        models = [ref, copy.deepcopy(ref)]
        for model, scale in zip(models, (1.0, 1024.0)):
            opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
            torch.manual_seed(1)  # the same dropout masks
            for _ in range(2):
                train_step(model, opt, x, y, cfg.train.label_smoothing, loss_scale=scale)
        for a, b in zip(*(m.state_dict().values() for m in models)):
            assert torch.equal(a, b)
    cfg = resolve_config("keras-book", overrides={"train": {"precision": "fp16-true"}})
    model = create_model("keras-shallow")
    st = train_mod._Setup(model, build_optimizer(model.parameters(), cfg.optim), None, None, {}, None, {}, 0)
    assert train_mod._step_function(cfg, st, torch.device("cuda"), False).keywords["loss_scale"] == 128
    cfg.train.cuda_graph = True
    assert train_mod._step_function(cfg, st, torch.device("cuda"), False).loss_scale == 128
    cfg.train.precision = "bf16-true"
    assert train_mod._step_function(cfg, st, torch.device("cuda"), False).loss_scale == 1


def test_bf16_true_trains_saves_and_reloads_on_cpu(tmp_path):
    from safetensors.torch import load_file

    from cifarlab.export import load_model

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=2, size=(12, 12))
    cfg = resolve_config("fast", overrides={"data": {"data": str(data)},
                                            "train": {"epochs": 2, "batch_size": 8, "out": str(tmp_path / "r"),
                                                      "threads": 1, "precision": "bf16-true"}})
    m = fit(cfg, log=lambda s: None)
    assert 0 <= m["test_accuracy"] <= 1
    saved = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert saved["layers.1.conv1.weight"].dtype == saved["head.weight"].dtype == torch.bfloat16
    assert saved["layers.1.norm1.bias"].dtype == saved["layers.1.norm1.running_var"].dtype == torch.float32
    # Training reports the test figures of the weights it saves, in float32, as evaluate loads them.
    from cifarlab.data import load_dataset
    from cifarlab.evaluate import evaluate_run

    rep = evaluate_run(tmp_path / "r", load_dataset(data), tmp_path / "eval", device="cpu")
    assert rep["accuracy"] == m["test_accuracy"] and rep["loss"] == pytest.approx(m["test_loss"], rel=1e-4)
    predictor = load_model(tmp_path / "r")  # rebuilt in float32 from the bf16 file
    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    logits = predictor.logits(images)
    assert logits.dtype.name == "float32" and logits.shape == (3, 3) and np.isfinite(logits).all()


class _EmulatedGraphStep(GraphedStep):
    """GraphedStep with CUDA's side stream and graph replaced by plain calls: capture records
    the step without running it, replay runs it and writes the results into fixed buffers."""

    def _warmup_step(self, x, y):
        return self.eager(x, y)

    def _capture(self, step):
        out = (torch.zeros(()), torch.zeros((), dtype=torch.int64))

        def replay():
            loss, correct = step()
            out[0].copy_(loss)
            out[1].copy_(correct)

        return replay, out


@pytest.mark.parametrize("weighted", [False, True])
def test_graphed_step_bookkeeping_matches_eager_steps(weighted):
    """Warm-up steps, the capture, replays on fresh batches and an eager partial batch train
    exactly as plain steps do (the CUDA graph itself is replaced by plain calls here), with
    class weights too."""
    from cifarlab.optim import build_optimizer
    from cifarlab.config import OptimConfig
    from cifarlab.train import train_step

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(6)]
    for at in (2, 6):  # partial batches: one before the capture, which must wait for a full one, one after
        batches.insert(at, (torch.rand(3, 3, 32, 32, generator=gen), torch.randint(0, 10, (3,), generator=gen)))
    torch.manual_seed(1)
    ref_model = create_model("keras-shallow")
    graph_model = create_model("keras-shallow")
    graph_model.load_state_dict(ref_model.state_dict())
    ref_opt = build_optimizer(ref_model.parameters(), OptimConfig())
    weights = torch.linspace(0.5, 2.0, 10) if weighted else None
    step = _EmulatedGraphStep(graph_model, build_optimizer(graph_model.parameters(), OptimConfig()), warmup=2,
                              class_weight=weights)
    torch.manual_seed(2)  # the same dropout masks for both
    ref = [tuple(t.clone() for t in train_step(ref_model, ref_opt, x, y, class_weight=weights)) for x, y in batches]
    torch.manual_seed(2)
    got = [tuple(t.clone() for t in step(x, y)) for x, y in batches]
    assert step.replay is not None and step.static[0].shape == (8, 3, 32, 32)
    for (l_ref, c_ref), (l_got, c_got) in zip(ref, got):
        assert torch.equal(l_ref, l_got) and torch.equal(c_ref, c_got)
    for p_ref, p_got in zip(ref_model.parameters(), graph_model.parameters()):
        assert torch.equal(p_ref, p_got)


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_cuda_graph_with_compile_records_the_compiled_model(monkeypatch, mode):
    """``--cuda-graph --compile``: the step's graph runs the compiled model (whose fused kernels
    the capture records), compiled in the asked-for mode; without --compile, the model itself."""
    from cifarlab import runtime
    from cifarlab import train as train_mod
    from cifarlab.optim import build_optimizer

    calls = []
    monkeypatch.setattr(runtime, "maybe_compile", lambda m, on, md: calls.append((on, md)) or ("compiled", m)[not on])
    model = create_model("keras-shallow")
    for compile_ in (True, False):
        cfg = resolve_config("keras-book", overrides={"train": {"cuda_graph": True, "compile": compile_,
                                                                "compile_mode": mode if compile_ else "default"}})
        st = train_mod._Setup(model, build_optimizer(model.parameters(), cfg.optim), None, None, {}, None, {}, 0)
        step = train_mod._step_function(cfg, st, torch.device("cuda"), cpu_kernels=False)  # nothing runs on CUDA
        assert isinstance(step, GraphedStep) and step.model == ("compiled" if compile_ else model)
    assert calls == [(True, mode), (False, "default")]


def test_cuda_graph_needs_cuda_and_a_constant_learning_rate(tmp_path, image_folder):
    from cifarlab.errors import CifarlabError, ConfigError

    with pytest.raises(ConfigError, match="train.cuda_graph.*schedule constant.*'triangle'"):
        resolve_config("fast", overrides={"train": {"cuda_graph": True}})
    with pytest.raises(ConfigError, match="whiten_bias_epochs = 3; set that to 0"):
        resolve_config("fast", overrides={"optim": {"schedule": "constant"}, "train": {"cuda_graph": True}})
    for mode in ("reduce-overhead", "max-autotune"):  # they record CUDA graphs of their own
        with pytest.raises(ConfigError, match=f"train.compile_mode = '{mode}' is not valid; with train.cuda_graph"):
            resolve_config(overrides={"train": {"cuda_graph": True, "compile": True, "compile_mode": mode}})
    cfg = resolve_config(overrides={"data": {"data": str(image_folder)}, "model": {"name": "keras-shallow"},
                                    "train": {"epochs": 1, "cuda_graph": True, "device": "cpu",
                                              "out": str(tmp_path / "r")}})
    with pytest.raises(CifarlabError, match="cuda_graph needs a CUDA device; this run is on cpu"):
        fit(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()  # a setup failure leaves no run folder behind
    cfg.data.data = str(tmp_path / "missing")  # refused before the data is read
    with pytest.raises(CifarlabError, match="cuda_graph needs a CUDA device; this run is on cpu"):
        fit(cfg, log=lambda s: None)


@pytest.mark.parametrize("recipe,airbench_lr,airbench_wd", [("fast", 11.5, 0.0153), ("best", 9.0, 0.0153),
                                                             ("best-select", 9.0, 0.012)])
def test_speed_recipes_take_airbenchs_optimizer_steps(recipe, airbench_lr, airbench_wd):
    """Three steps of the recipe's optimizer (mean loss, our lr and weight decay, batch-norm
    biases in their own group) move every parameter exactly as airbench's arithmetic does (loss
    summed over the batch, lr 11.5 (airbench94) or 9.0 (airbench96) and weight decay 0.0153 per
    1024 examples, bias_scaler 64). best-select, as airbench96_faster: the loss is summed over the
    512 examples a step keeps, the weight decay (0.012) still reckoned on the batch of 1024."""
    from cifarlab.models.speed import BatchNormNoScale
    from cifarlab.optim import build_optimizer, param_groups
    from cifarlab.train import train_step

    cfg = resolve_config(recipe)
    batch, trained = cfg.train.batch_size, round(cfg.train.select_fraction * cfg.train.batch_size)
    assert trained == (512 if recipe == "best-select" else batch)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), BatchNormNoScale(4), torch.nn.GELU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10, bias=False))
    theirs = copy.deepcopy(ours)

    # airbench94's train(): lr and wd per 1024 examples, turned into PyTorch SGD's arguments.
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    lr, wd = airbench_lr / kilostep, airbench_wd * batch / kilostep
    norm_biases = [p for k, p in theirs.named_parameters() if k.startswith("1.") and p.requires_grad]
    others = [p for k, p in theirs.named_parameters() if not k.startswith("1.") and p.requires_grad]
    opt_theirs = torch.optim.SGD([dict(params=norm_biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
                                  dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=0.85, nesterov=True)
    opt_ours = build_optimizer(param_groups(ours, cfg.optim), cfg.optim)
    assert [len(g["params"]) for g in opt_ours.param_groups] == [1, 2]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(trained, 3, 8, 8, generator=g), torch.randint(0, 10, (trained,), generator=g)
        train_step(ours, opt_ours, x, y, label_smoothing=0.2)
        loss = torch.nn.functional.cross_entropy(theirs(x), y, label_smoothing=0.2, reduction="none").sum()
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert not torch.equal(ours[1].bias, torch.zeros(4))  # the biases did move


class _ScaledHead(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight, self.scale = torch.nn.Parameter(weight.clone()), scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.scale


def test_fast_muon_takes_airbench94_muons_steps():
    """Three steps of the fast-muon recipe's optimizer (mean loss, head scaled by 1/9) move
    the network exactly as airbench94_muon's arithmetic does (loss summed over the batch of
    2000, head output / 256 with its weights 256/9 times ours, so the same initial logits;
    SGD lr 0.053 for batch-norm biases and 0.67 for the head with lr x decay = 0.004; Muon
    lr 0.24, momentum 0.6, Nesterov, on filters rescaled to norm sqrt(out))."""
    from cifarlab.models.speed import BatchNormNoScale
    from cifarlab.optim import build_optimizer, orthogonalize, param_groups
    from cifarlab.train import train_step

    cfg = resolve_config("fast-muon")
    batch = cfg.train.batch_size
    assert batch == 2000
    torch.manual_seed(0)
    head = torch.nn.Linear(4 * 6 * 6, 10, bias=False).weight.detach()
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), BatchNormNoScale(4), torch.nn.GELU(),
                               torch.nn.Flatten(), _ScaledHead(head, 1 / 9))
    theirs = copy.deepcopy(ours)
    theirs[4] = _ScaledHead(head * 256 / 9, 1 / 256)
    x0 = torch.randn(7, 3, 8, 8)
    assert torch.allclose(ours(x0), theirs(x0), atol=1e-6)

    wd = 2e-6 * batch
    opt_theirs = torch.optim.SGD([dict(params=[theirs[1].bias], lr=0.053, weight_decay=wd / 0.053),
                                  dict(params=[theirs[4].weight], lr=0.67, weight_decay=wd / 0.67)],
                                 momentum=0.85, nesterov=True)
    opt_ours = build_optimizer(param_groups(ours, cfg.optim), cfg.optim)
    conv, buf = theirs[0].weight, torch.zeros_like(theirs[0].weight)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
        train_step(ours, opt_ours, x, y, label_smoothing=0.2)
        loss = torch.nn.functional.cross_entropy(theirs(x), y, label_smoothing=0.2, reduction="sum")
        opt_theirs.zero_grad(set_to_none=True)
        conv.grad = None
        loss.backward()
        opt_theirs.step()
        with torch.no_grad():
            buf.mul_(0.6).add_(conv.grad)
            update = orthogonalize((conv.grad + 0.6 * buf).reshape(4, -1)).view(conv.shape)
            conv.mul_(2.0 / conv.norm()).sub_(0.24 * update)
    assert torch.allclose(ours[0].weight, theirs[0].weight, atol=1e-5)
    assert torch.allclose(ours[1].bias, theirs[1].bias, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours[4].weight * 256 / 9, theirs[4].weight, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ours[1].bias, torch.zeros(4))  # the biases did move
    assert torch.allclose(ours(x0), theirs(x0), atol=1e-4)


def test_fast_muon_trains_on_cpu_and_its_whitening_bias_stops_at_zero_lr(tmp_path, monkeypatch):
    from cifarlab import train as train_mod

    data = make_image_folder(tmp_path / "d", n_train=24, n_test=4)
    seen: list = []
    real_build = train_mod._build
    monkeypatch.setattr(train_mod, "_build", lambda *a, **k: seen.append(real_build(*a, **k)) or seen[-1])
    cfg = resolve_config("fast-muon", overrides={"data": {"data": str(data)},
                                                 "train": {"epochs": 3, "batch_size": 16, "out": str(tmp_path / "r"),
                                                           "threads": 1, "whiten_bias_epochs": 2}})
    m = fit(cfg, log=lambda s: None)
    assert 0 <= m["test_accuracy"] <= 1 and m["tta"] == "flip-translate"
    st = seen[0]
    groups = {g.get("schedule", "muon" if g["muon"] else len(g["params"])): g for g in st.optimizer.param_groups}
    # 4 steps an epoch: the whitening bias's lr reaches 0 after 2 epochs; the others decay over all 12 steps.
    sched = st.scheduler.lr_lambdas[list(st.optimizer.param_groups).index(groups["whiten_bias"])]
    assert [sched(s) for s in (0, 4, 8, 11)] == [1.0, 0.5, 0.0, 0.0]
    assert groups["muon"]["lr"] == 0.0 and groups["whiten_bias"]["lr"] == 0.0  # both end at zero
    assert not torch.equal(st.model.whiten.bias, torch.zeros_like(st.model.whiten.bias))
    with pytest.raises(Exception, match="optim.muon_momentum = 1.5 is not valid"):
        resolve_config("fast-muon", overrides={"optim": {"muon_momentum": 1.5}})


def test_a_second_compiled_run_compiles_nothing_new(tmp_path, monkeypatch):
    """``benchmarks/gpu_speed.py`` times compiled entries after one untimed warm-up run; that is
    fair only if a later run (a new model, other seeds) reuses what the first compiled, the graph
    after the whitening bias stops training included. Dynamo's counters show it does. Whether a
    run compiles anew is Dynamo's choice (its guards), made before any backend, so the graphs go
    to AOTAutograd without Inductor's C++ code generation (47 s of this test before, on 2 cores)."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()  # nothing cached from other tests
    data = make_image_folder(tmp_path / "d", n_train=16, n_test=2, size=(16, 16))
    graphs = []
    for k in range(2):
        cfg = resolve_config("fast-muon", overrides={"data": {"data": str(data)}, "train": {
            "epochs": 2, "batch_size": 16, "out": str(tmp_path / f"r{k}"), "threads": 1, "compile": True,
            "whiten_bias_epochs": 1, "seed": k}})
        before = counters["stats"]["unique_graphs"]
        fit(cfg, log=lambda s: None)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] >= 2 and graphs[1] == 0  # before and after the switch; then nothing new
