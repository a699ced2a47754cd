"""Temperature scaling: the fit, the file, and the commands that use it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cifarlab.calibrate import CALIBRATION_FILE, T_MAX, Calibration, calibrate_run, calibrate_runs, \
    fit_temperature, nll, read_calibration
from cifarlab.cli import main
from cifarlab.data import load_dataset
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import evaluate_run
from cifarlab.export import load_model

from conftest import make_image_folder, tiny_config


def _sampled(temperature: float, n: int = 20000, classes: int = 10, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): the temperature that makes
    these logits calibrated is ``temperature``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p = torch.from_numpy(z / temperature).softmax(1).numpy()
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z.astype(np.float32), y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    z, y = _sampled(true_t)
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.05)


def test_fit_is_the_minimum_of_the_loss_and_scales_with_the_logits():
    z, y = _sampled(1.7, n=3000, seed=1)
    t = fit_temperature(z, y)
    grid = np.linspace(0.3, 6, 400)
    assert nll(z, y, t) <= min(nll(z, y, g) for g in grid) + 1e-9
    assert nll(z, y, t) < nll(z, y, 1.0)
    # logits twice as large need twice the temperature for the same probabilities
    assert fit_temperature(2 * z, y) == pytest.approx(2 * t, rel=1e-4)


def test_fit_stops_at_the_bound_for_a_model_that_is_never_right():
    z = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]] * 5
    y = np.array([1, 2, 0, 1])  # always confidently wrong: the flattest probabilities are best
    assert fit_temperature(z, y) == pytest.approx(T_MAX, rel=1e-3)
    with pytest.raises(CifarlabError, match="0 images"):
        fit_temperature(z[:0], y[:0])


def test_read_calibration_refuses_damaged_files(trained_run):
    assert read_calibration(trained_run) == {}
    path = trained_run / CALIBRATION_FILE
    for text, match in (("{not json", "unreadable"), ('{"format": "other"}', "not a cifarlab calibration"),
                        ('{"format": "cifarlab-calibration-1", "by_tta": {"none": {"temperature": -1}}}',
                         "temperature -1"),
                        ('{"format": "cifarlab-calibration-1", "by_tta": {"none": {"temperature": true}}}',
                         "temperature True"),
                        ('{"format": "cifarlab-calibration-1", "by_tta": {"sideways": {"temperature": 2}}}',
                         "'sideways'")):
        path.write_text(text)
        with pytest.raises(CifarlabError, match=match) as e:
            load_model(trained_run)
        assert "cifarlab calibrate" in str(e.value)
    assert load_model(trained_run, uncalibrated=True).calibrations == {}  # not read at all


def test_calibrate_uses_the_runs_own_validation_images(trained_run, image_folder):
    ds = load_dataset(str(image_folder))
    entry = calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)
    last = json.loads((trained_run / "history.json").read_text())[-1]
    # the same images training validated on: the same loss and accuracy before the temperature
    assert entry["validation_accuracy"] == pytest.approx(last["val_accuracy"])
    assert entry["validation_loss"]["before"] == pytest.approx(last["val_loss"], rel=1e-4, abs=1e-7)
    assert entry["validation_images"] == json.loads((trained_run / "metrics.json").read_text())["data"]["val_images"]
    assert entry["validation_loss"]["after"] <= entry["validation_loss"]["before"] + 1e-12
    saved = json.loads((trained_run / CALIBRATION_FILE).read_text())
    assert saved["by_tta"]["none"]["temperature"] == entry["temperature"]
    # another test-time augmentation level is added beside it, not over it
    flip = calibrate_run(trained_run, ds, tta="flip", device="cpu", log=lambda s: None)
    assert read_calibration(trained_run) == {"none": Calibration(entry["temperature"]),
                                             "flip": Calibration(flip["temperature"])}


def test_a_temperature_fitted_to_other_weights_is_refused_until_calibrated_again(trained_run, image_folder):
    from cifarlab.export import save_weights

    ds = load_dataset(str(image_folder))
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)
    model = load_model(trained_run, uncalibrated=True).model
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # as training on would change them
    save_weights(trained_run / "weights.safetensors", model)
    with pytest.raises(CifarlabError, match="fitted to other weights .*cifarlab calibrate"):
        load_model(trained_run)
    assert main(["evaluate", str(trained_run), "--device", "cpu", "--uncalibrated"]) == 0
    from cifarlab.compare import compare_runs

    with pytest.raises(CifarlabError, match="fitted to other weights"):
        compare_runs(trained_run, trained_run, ds, device="cpu")
    assert compare_runs(trained_run, trained_run, ds, device="cpu", uncalibrated=True)
    said = []
    calibrate_run(trained_run, ds, tta="flip", device="cpu", log=said.append)
    assert any(s.startswith(f"replacing {trained_run / CALIBRATION_FILE}: ") for s in said)
    assert set(read_calibration(trained_run)) == {"flip"}  # the outdated "none" entry is gone


def test_calibrated_predictions_divide_the_logits_and_keep_every_class(trained_run, image_folder):
    ds = load_dataset(str(image_folder))
    t = calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)["temperature"]
    pred, raw = load_model(trained_run), load_model(trained_run, uncalibrated=True)
    assert pred.temperature() == t and raw.temperature() is None
    assert pred.temperature("flip") is None  # fitted for "none" only
    logits = raw.logits(ds.x_test)
    np.testing.assert_allclose(pred.predict(ds.x_test), torch.from_numpy(logits / t).softmax(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(pred.predict(ds.x_test, tta="flip"), raw.predict(ds.x_test, tta="flip"), atol=1e-6)
    np.testing.assert_array_equal(pred.predict(ds.x_test).argmax(1), raw.predict(ds.x_test).argmax(1))


def test_evaluate_reports_the_temperature_and_the_figures_without_it(trained_run, image_folder, tmp_path):
    ds = load_dataset(str(image_folder))
    before = evaluate_run(trained_run, ds, tmp_path / "before", device="cpu")
    assert before["temperature"] is None and "uncalibrated" not in before
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)
    after = evaluate_run(trained_run, ds, tmp_path / "after", device="cpu")
    assert after["temperature"] == read_calibration(trained_run)["none"].temperature
    assert after["accuracy"] == before["accuracy"]
    assert after["uncalibrated"]["loss"] == pytest.approx(before["loss"])
    assert after["uncalibrated"]["ece"] == pytest.approx(before["calibration"]["ece"])
    assert after["loss"] != pytest.approx(before["loss"])
    off = evaluate_run(trained_run, ds, tmp_path / "off", device="cpu", uncalibrated=True)
    assert off["loss"] == pytest.approx(before["loss"]) and off["temperature"] is None


def test_calibrate_finds_the_validation_images_of_a_subset_run(tmp_path):
    from cifarlab.train import fit

    folder = make_image_folder(tmp_path / "imgs", n_train=12, seed=3)
    cfg = tiny_config(str(folder), str(tmp_path / "sub"), epochs=1, seed=5)
    cfg.data.subset = 20
    fit(cfg, log=lambda s: None)
    entry = calibrate_run(tmp_path / "sub", load_dataset(str(folder)), device="cpu", log=lambda s: None)
    last = json.loads((tmp_path / "sub" / "history.json").read_text())[-1]
    assert entry["validation_images"] == 5
    assert entry["validation_accuracy"] == pytest.approx(last["val_accuracy"])
    assert entry["validation_loss"]["before"] == pytest.approx(last["val_loss"], rel=1e-4, abs=1e-7)


def test_calibrate_refuses_runs_without_validation_and_other_data(tmp_path, image_folder, trained_run):
    from cifarlab.train import fit

    ds = load_dataset(str(image_folder))
    cfg = tiny_config(str(image_folder), str(tmp_path / "noval"))
    cfg.data.val_split = 0.0
    fit(cfg, log=lambda s: None)
    with pytest.raises(CifarlabError, match=r"held out no validation images .*--val-split"):
        calibrate_run(tmp_path / "noval", ds, device="cpu", log=lambda s: None)
    other = load_dataset(str(make_image_folder(tmp_path / "more", n_train=10)))
    with pytest.raises(CifarlabError, match="not the data the run was trained on"):
        calibrate_run(trained_run, other, device="cpu", log=lambda s: None)
    fewer = load_dataset(str(make_image_folder(tmp_path / "two", classes=("cat", "dog"))))
    with pytest.raises(CifarlabError, match="classes differ"):
        calibrate_run(trained_run, fewer, device="cpu", log=lambda s: None)
    (trained_run / "config.yaml").rename(trained_run / "config.yaml.bak")
    with pytest.raises(CifarlabError, match="no config.yaml"):
        calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)
    assert not (trained_run / CALIBRATION_FILE).exists()


def test_calibrate_command_on_a_run_and_a_set_of_runs(tmp_path, image_folder, capsys):
    from cifarlab.train import fit

    fit(tiny_config(str(image_folder), str(tmp_path / "set"), runs=2), log=lambda s: None)
    assert main(["calibrate", str(tmp_path / "set"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: temperature mean" in out and out.count("validation images, loss") == 2
    eces = [tuple(map(float, m)) for m in re.findall(r"expected calibration error ([\d.]+) -> ([\d.]+)", out)]
    assert ("calibration error rose" in out) == any(after > before for before, after in eces)
    for k in range(2):
        assert set(read_calibration(tmp_path / "set" / f"run-{k}")) == {"none"}
    assert main(["calibrate", str(tmp_path / "set" / "run-1"), "--json", "--tta", "flip"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tta"] == "flip" and doc["temperature"] > 0
    summary = calibrate_runs(tmp_path / "set", load_dataset(str(image_folder)), device="cpu", log=lambda s: None)
    assert summary["runs"] == 2 and summary["temperature"]["min"] <= summary["temperature"]["max"]
    # evaluate, predict and audit say what they used
    run = tmp_path / "set" / "run-0"
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Temperature: " in out
    # each confidence threshold with the share of the 9 test images it answers, and their number
    shares = re.findall(r"^  0\.\d+ +(\d+\.\d)% of the images \((\d+)\), accuracy", out, re.M)
    assert len(shares) == 4 and all(abs(float(p) - 100 * int(n) / 9) < 0.06 for p, n in shares)
    assert main(["evaluate", str(run), "--device", "cpu", "--uncalibrated"]) == 0
    assert "Temperature" not in capsys.readouterr().out
    image = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(run), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["temperature"] == read_calibration(run)["none"].temperature
    assert main(["audit", str(run), "--device", "cpu", "--bootstrap", "100"]) == 0
    card = (run / "audit" / "MODEL_CARD.md").read_text()
    assert "temperature-scaled" in card
    assert re.search(r"0\.5: \d+\.\d% of the test images \(\d\), accuracy", card)


def test_calibrate_says_why_a_calibration_error_can_rise_and_names_where_it_did():
    from cifarlab.cli import _ece_rose_note

    def fit(before, after, n):
        return {"validation_ece": {"before": before, "after": after}, "validation_images": n}

    assert _ece_rose_note([("runs/a", fit(0.07, 0.05, 600)), ("runs/b", fit(0.03, 0.03, 600))]) is None
    note = _ece_rose_note([("runs/a", fit(0.07, 0.05, 600)), ("runs/b", fit(0.074, 0.098, 600)),
                           ("their ensemble", fit(0.02, 0.03, 10_000))])
    assert "(runs/b, their ensemble)" in note and "runs/a" not in note
    assert "lowest loss" in note and "600 images or more" in note


def test_calibrate_command_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path)]) != 0
    assert "not a cifarlab run folder" in capsys.readouterr().err


def test_export_builds_the_temperature_into_the_graph(trained_run, image_folder, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from cifarlab.deploy import export_onnx

    ds = load_dataset(str(image_folder))
    t = calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)["temperature"]
    report = export_onnx(trained_run, tmp_path / "m.onnx", log=lambda s: None)  # checked against predict()
    assert report["temperature"] == t and report["check"]["max_abs_diff"] < 1e-4
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": ds.x_test})[0]
    np.testing.assert_allclose(got, load_model(trained_run).predict(ds.x_test), atol=1e-4)
    raw = export_onnx(trained_run, tmp_path / "raw.onnx", log=lambda s: None, uncalibrated=True)
    assert raw["temperature"] is None


def test_predict_marks_images_below_the_minimum_confidence(trained_run, image_folder, capsys):
    files = sorted(str(f) for f in (image_folder / "test").rglob("*.png"))
    top = load_model(trained_run).predict(files).max(1)
    threshold = float(np.median(top))
    want = {f: bool(p < threshold) for f, p in zip(files, top)}
    assert main(["predict", str(trained_run), *files, "--json", "--min-confidence", repr(threshold)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["min_confidence"] == threshold
    assert {r["file"]: r["uncertain"] for r in doc["predictions"]} == want
    assert main(["predict", str(trained_run), *files, "--csv", "--min-confidence", repr(threshold)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "file,rank,class,probability,uncertain"
    assert main(["predict", str(trained_run), *files, "--min-confidence", repr(threshold)]) == 0
    table = capsys.readouterr().out
    assert f"{sum(want.values())} of {len(files)} image(s) below confidence {threshold:g}: uncertain" in table
    assert table.count("uncertain: ") == sum(want.values())
    assert main(["predict", str(trained_run), *files, "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "file,rank,class,probability"
    for bad in ("0", "1.5", "-0.2"):
        assert main(["predict", str(trained_run), files[0], "--min-confidence", bad]) == 2
        assert f"--min-confidence {float(bad)} is not valid; it must lie in (0, 1]" in capsys.readouterr().err


def test_selective_table_counts_the_images_it_answers():
    from cifarlab.evaluate import selective

    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])
    rows = {r["threshold"]: r for r in selective(probs, y, (0.5, 0.7, 0.99))}
    assert rows[0.5] == {"threshold": 0.5, "images": 4, "coverage": 1.0, "accuracy": 0.5}
    assert rows[0.7] == {"threshold": 0.7, "images": 2, "coverage": 0.5, "accuracy": 1.0}
    assert rows[0.99] == {"threshold": 0.99, "images": 0, "coverage": 0.0, "accuracy": None}


def test_balancing_offsets_turn_skewed_posteriors_into_equal_class_ones():
    """Images of skewed classes (labels drawn from ``prior``, a feature x ~ N(class mean, 1)), and
    a model that knows their posterior but is overconfident by the factor 1.8: the fitted
    temperature and the offsets from the classes' counts give back the posterior of a world
    where every class is equally likely, softmax(log p(x | y))."""
    from cifarlab.calibrate import balancing_offsets

    rng = np.random.default_rng(4)
    prior, means = np.array([0.55, 0.25, 0.12, 0.05, 0.03]), np.array([-3.0, -1.5, 0.0, 1.5, 3.0])
    y = rng.choice(5, 40000, p=prior)
    x = rng.normal(means[y], 1.0)
    log_px = -0.5 * (x[:, None] - means) ** 2  # log p(x | y) up to a constant
    logits = 1.8 * (log_px + np.log(prior))
    offsets = balancing_offsets(np.bincount(y, minlength=5))
    np.testing.assert_allclose(offsets, np.log(0.2) - np.log(np.bincount(y) / len(y)))
    assert balancing_offsets(np.array([7, 7, 7])).tolist() == [0.0, 0.0, 0.0]
    cal = Calibration(fit_temperature(logits, y), tuple(offsets))
    assert cal.temperature == pytest.approx(1.8, rel=0.03)
    got = torch.from_numpy(cal.apply(logits)).softmax(1).numpy()
    assert np.abs(got - torch.from_numpy(log_px).softmax(1).numpy()).max() < 0.03
    np.testing.assert_allclose(cal.apply(logits), logits / cal.temperature + offsets)


def _skewed_folder(root, rare: str = "frog", keep: int = 2):
    """The test image folder with only ``keep`` training images of the class ``rare``."""
    folder = make_image_folder(root, n_train=12)
    for f in sorted((folder / "train" / rare).iterdir())[keep:]:
        f.unlink()
    return folder


def test_balance_classes_records_the_offsets_and_predictions_use_them(tmp_path, capsys):
    from cifarlab.config import load_run_config
    from cifarlab.evaluate import balanced_accuracy
    from cifarlab.train import fit, split_indices

    folder = _skewed_folder(tmp_path / "imgs")
    ds = load_dataset(str(folder))
    fit(tiny_config(str(folder), str(tmp_path / "run"), epochs=2), log=lambda s: None)
    run = tmp_path / "run"
    said = []
    entry = calibrate_run(run, ds, device="cpu", log=said.append, balance_classes=True)
    bal = entry["balance_classes"]
    tr, va = split_indices(load_run_config(run / "config.yaml"), ds.y_train)
    counts = np.bincount(ds.y_train[tr], minlength=3)
    assert counts.tolist() != [counts[0]] * 3  # the classes really are unequal
    assert bal["training_share"] == pytest.approx(dict(zip(ds.classes, counts / counts.sum())))
    assert bal["class_offsets"] == pytest.approx(dict(zip(ds.classes, np.log(1 / 3) - np.log(counts / counts.sum()))))
    assert bal["trained_with"] == [] and not any("lean toward" in s for s in said)
    raw = load_model(run, uncalibrated=True)
    val_logits = raw.logits(ds.x_train[va])
    assert bal["validation_balanced_accuracy"]["before"] == balanced_accuracy(ds.y_train[va], val_logits.argmax(1))
    cal = read_calibration(run)["none"]
    assert cal.class_offsets == pytest.approx([bal["class_offsets"][c] for c in ds.classes])
    pred = load_model(run)
    logits = raw.logits(ds.x_test)
    want = torch.from_numpy(logits / entry["temperature"] + np.array(cal.class_offsets)).softmax(1).numpy()
    np.testing.assert_allclose(pred.predict(ds.x_test), want, atol=1e-6)
    report = evaluate_run(run, ds, tmp_path / "ev", device="cpu")
    plain = evaluate_run(run, ds, tmp_path / "plain", device="cpu", uncalibrated=True)
    assert report["class_offsets"] == pytest.approx(bal["class_offsets"])
    assert report["uncalibrated"]["accuracy"] == plain["accuracy"]
    assert report["uncalibrated"]["balanced_accuracy"] == plain["balanced_accuracy"]
    assert report["accuracy"] == float((want.argmax(1) == ds.y_test).mean())
    # calibrating again without the option drops the offsets
    calibrate_run(run, ds, device="cpu", log=lambda s: None)
    assert read_calibration(run)["none"].class_offsets is None
    # the command line says what it did, and evaluate and audit what they used
    assert main(["calibrate", str(run), "--balance-classes", "--device", "cpu"]) == 0
    assert "with the classes balanced, balanced accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(cifarlab calibrate, with the classes balanced); without them" in out and "balanced accuracy" in out
    assert main(["audit", str(run), "--device", "cpu", "--bootstrap", "100"]) == 0
    assert "corrected for the training classes' unequal sizes" in (run / "audit" / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    image = next((folder / "test" / "cat").iterdir())
    assert main(["predict", str(run), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balanced_classes"] is True
    # compare uses each run's calibration: the offsets change predicted classes
    import shutil

    shutil.copytree(run, tmp_path / "t-only")
    calibrate_run(tmp_path / "t-only", ds, device="cpu", log=lambda s: None)
    assert main(["compare", str(tmp_path / "t-only"), str(run), "--device", "cpu", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert (c["a"]["balanced_classes"], c["b"]["balanced_classes"]) == (False, True)
    assert (c["accuracy_a"], c["accuracy_b"]) == pytest.approx((plain["accuracy"], report["accuracy"]))
    assert main(["compare", str(tmp_path / "t-only"), str(run), "--device", "cpu"]) == 0
    assert "classes balanced by calibrate): test accuracy" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "t-only"), str(run), "--device", "cpu", "--uncalibrated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy_b"] == pytest.approx(plain["accuracy"])


def test_balance_classes_warns_where_training_already_leaned_to_rare_classes(tmp_path):
    from cifarlab.train import fit

    folder = _skewed_folder(tmp_path / "imgs")
    fit(tiny_config(str(folder), str(tmp_path / "cw"), class_weight="balanced"), log=lambda s: None)
    said = []
    entry = calibrate_run(tmp_path / "cw", load_dataset(str(folder)), device="cpu", log=said.append,
                          balance_classes=True)
    assert entry["balance_classes"]["trained_with"] == ["class weights"]
    assert any("warning: it trained with class weights, so its predictions already lean toward rare classes" in s for s in said)


def test_balance_classes_refuses_a_class_without_training_images_and_damaged_offsets(trained_run, image_folder):
    from cifarlab.calibrate import _balance
    from cifarlab.config import load_run_config

    cfg = load_run_config(trained_run / "config.yaml")
    z, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(CifarlabError, match="trained on no images of frog.*without --balance-classes"):
        _balance(trained_run, cfg, ["cat", "dog", "frog"], np.array([0, 1, 1, 0]), z, y, 1.0, lambda s: None)
    said = []
    equal = _balance(trained_run, cfg, ["cat", "dog", "frog"], np.array([0, 1, 2]), z, y, 1.0, said.append)
    assert list(equal["class_offsets"].values()) == [0.0, 0.0, 0.0] and "nothing to balance" in said[0]
    calibrate_run(trained_run, load_dataset(str(image_folder)), device="cpu", log=lambda s: None,
                  balance_classes=True)
    path = trained_run / CALIBRATION_FILE
    doc = json.loads(path.read_text())
    for bad in ({"cat": 0.1, "dog": 0.2}, {"cat": 0.1, "dog": 0.2, "frog": float("nan")}, [0.1, 0.2, 0.3]):
        doc["by_tta"]["none"]["balance_classes"]["class_offsets"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(CifarlabError, match=r"class offsets .*expected a finite number for each of the model's "
                                                r"classes \(cat, dog, frog\); calibrate the run again"):
            load_model(trained_run)


def test_export_builds_the_class_offsets_into_the_graph(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from cifarlab.deploy import export_onnx
    from cifarlab.train import fit

    folder = _skewed_folder(tmp_path / "imgs")
    ds = load_dataset(str(folder))
    fit(tiny_config(str(folder), str(tmp_path / "run")), log=lambda s: None)
    calibrate_run(tmp_path / "run", ds, device="cpu", log=lambda s: None, balance_classes=True)
    offsets = read_calibration(tmp_path / "run")["none"].class_offsets
    report = export_onnx(tmp_path / "run", tmp_path / "m.onnx", log=lambda s: None)
    assert report["class_offsets"] == offsets and report["check"]["max_abs_diff"] < 1e-4
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": ds.x_test})[0]
    np.testing.assert_allclose(got, load_model(tmp_path / "run").predict(ds.x_test), atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["class_offsets"]) == pytest.approx(list(offsets))


def test_calibrate_mean_is_the_softmax_of_the_log_mean_over_the_temperature():
    from cifarlab.calibrate import calibrate_mean

    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    got = calibrate_mean(p, 0.5)
    want = p ** 2 / (p ** 2).sum(1, keepdims=True)  # softmax(log p / T) = p^(1/T), normalised
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert got.dtype == np.float32 and np.isfinite(got).all()  # a class every run gave 0 keeps 0, not NaN
    np.testing.assert_allclose(calibrate_mean(p, 1.0), p, atol=1e-7)


def test_the_ensemble_is_calibrated_on_the_images_no_run_trained_on(tmp_path, image_folder, capsys, monkeypatch):
    """With --split-seed the runs hold out the same validation images; calibrate OUT then fits
    the ensemble's own temperature on them, which load_ensemble, evaluate, predict, label-issues
    and export apply, and which a run changed since makes refused. Without it, runs of the whole
    data leave too few images that none trained on, and the ensemble is left as it is, saying
    why; runs of a --subset each leave the images outside it, on which it is calibrated."""
    import cifarlab.calibrate
    from cifarlab.calibrate import ENSEMBLE_FILE, calibrate_mean
    from cifarlab.evaluate import evaluate_runs
    from cifarlab.export import Ensemble, load_ensemble
    from cifarlab.train import fit, run_split

    base = tmp_path / "set"
    cfg = tiny_config(str(image_folder), str(base), runs=2, epochs=2)
    cfg.data.split_seed = 7
    fit(cfg, log=lambda s: None)
    ds = load_dataset(str(image_folder))
    va = [run_split(base / f"run-{k}", ds)[2] for k in range(2)]
    assert np.array_equal(va[0], va[1])
    assert "split_seed: 7" in (base / "config.yaml").read_text()
    # the least it takes, scaled to these 18 training images: the runs' shared validation images
    monkeypatch.setattr(cifarlab.calibrate, "ENSEMBLE_MIN_IMAGES", len(va[0]))
    capsys.readouterr()
    assert main(["calibrate", str(base), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((base / ENSEMBLE_FILE).read_text())
    entry = doc["by_tta"]["none"]
    t = entry["temperature"]
    assert f"their ensemble: temperature {t:.4f}" in out and f"on {len(va[0])} training images no run trained on" in out
    assert [r["run"] for r in entry["runs"]] == ["run-0", "run-1"]
    assert entry["validation_loss"]["after"] <= entry["validation_loss"]["before"] + 1e-12
    # the fit: the temperature minimises the loss of log(mean of the calibrated runs' probabilities)
    members = [load_model(base / f"run-{k}") for k in range(2)]
    mean = np.mean([m.predict(ds.x_train[va[0]]).astype(np.float64) for m in members], axis=0)
    floor = np.finfo(np.float64).tiny  # as the fit floors them: a class every run gave 0
    assert t == pytest.approx(fit_temperature(np.log(np.maximum(mean, floor)), ds.y_train[va[0]]), rel=1e-6)

    ens = load_ensemble(base)
    assert ens.temperature() == t and load_ensemble(base, uncalibrated=True).temperature() is None
    raw = Ensemble(members, base).predict(ds.x_test)
    np.testing.assert_allclose(ens.predict(ds.x_test), calibrate_mean(raw, t), atol=1e-6)
    assert (ens.predict(ds.x_test).argmax(1) == raw.argmax(1)).all()  # a temperature changes no prediction
    s = evaluate_runs(base, ds, device="cpu")
    assert s["ensemble"]["temperature"] == t
    assert s["ensemble"]["loss"] == pytest.approx(nll(np.log(np.maximum(ens.predict(ds.x_test), floor)), ds.y_test),
                                                 abs=1e-5)
    from cifarlab.evaluate import calibration

    assert s["ensemble"]["uncalibrated_ece"] == pytest.approx(calibration(raw, ds.y_test)["ece"], abs=1e-6)
    image = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(base), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ensemble_temperature"] == t
    from cifarlab.label_issues import label_issues_runs

    li = label_issues_runs(base, ds, out=tmp_path / "li", device="cpu")
    assert li["ensemble_temperature"] == t
    if pytest.importorskip("onnxruntime") and pytest.importorskip("onnxscript"):
        from cifarlab.deploy import export_onnx

        report = export_onnx(base, tmp_path / "e.onnx", log=lambda s: None)  # checked against ens.predict
        assert report["ensemble_temperature"] == t and report["check"]["max_abs_diff"] < 1e-4

    # a run calibrated on its own since: the ensemble's temperature no longer fits, and says so
    f = base / "run-1" / CALIBRATION_FILE
    d = json.loads(f.read_text())
    d["by_tta"]["none"]["temperature"] *= 2
    f.write_text(json.dumps(d))
    with pytest.raises(CifarlabError, match=r"run-1 changed after the ensemble's temperature for 'none' was fitted"):
        load_ensemble(base)
    assert main(["evaluate", str(base), "--device", "cpu"]) == 2
    assert f"calibrate them again with: cifarlab calibrate {base}" in capsys.readouterr().err
    assert load_ensemble(base, uncalibrated=True).temperature() is None
    # a damaged file, or another tool's, is refused by name too
    runs = [base / "run-0", base / "run-1"]
    from cifarlab.calibrate import read_ensemble_calibration

    for text, why in (("{", "unreadable"), ('{"format": "x"}', "not a cifarlab ensemble calibration file"),
                      ('{"format": "cifarlab-ensemble-calibration-1", "by_tta": {"none": {"temperature": -1}}}',
                       "entry 'none' has temperature -1")):
        (base / ENSEMBLE_FILE).write_text(text)
        with pytest.raises(CifarlabError, match=why):
            read_ensemble_calibration(base, runs, "none")

    # runs of the whole data split by their own seeds: each image trained one run or the other
    other = tmp_path / "other"
    fit(tiny_config(str(image_folder), str(other), runs=2), log=lambda s: None)
    assert main(["calibrate", str(other), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    unseen = len(ds.y_train) - len(np.union1d(*[run_split(other / f"run-{k}", ds)[1] for k in range(2)]))
    assert unseen < len(va[0]) and f"their ensemble (the mean of their probabilities) is not calibrated: {unseen} " \
           f"of the training images were trained on by no run" in said and "--split-seed N" in said
    assert not (other / ENSEMBLE_FILE).exists() and load_ensemble(other).temperature() is None
    # runs of a subset, each its own: the images outside every subset serve
    sub = tmp_path / "sub"
    fit(_with_data(tiny_config(str(image_folder), str(sub), runs=2, epochs=2), subset=9), log=lambda s: None)
    trained = np.union1d(*[run_split(sub / f"run-{k}", ds)[1] for k in range(2)])
    assert main(["calibrate", str(sub), "--device", "cpu", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)["ensemble"]
    assert e["calibrated"] and e["validation_images"] == len(ds.y_train) - len(trained) >= len(va[0])
    assert load_ensemble(sub).temperature() == e["temperature"]


def _with_data(cfg, **data):
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg
