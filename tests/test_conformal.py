"""Prediction sets: the conformal floor's guarantee, the sets, their report, and the commands
that fit, use and measure them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from cifarlab.calibrate import CALIBRATION_FILE, calibrate_run, read_calibration
from cifarlab.cli import main
from cifarlab.conformal import check_coverage, conformal_floor, expected_range, fit_floors, min_images, \
    prediction_sets, set_report
from cifarlab.data import load_dataset
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import evaluate_run
from cifarlab.export import load_model

from conftest import dirichlet_draws as _draws, tiny_config


def test_the_floor_gives_the_coverage_over_fresh_draws():
    """Over many draws of 50 held-out images, a new image's set holds its true class with
    probability between the coverage and the coverage + 1/(n + 1) (no ties): the finite-sample
    guarantee, which the uncorrected quantile (the 45th of 50 for 0.9, about 0.882) misses."""
    rng = np.random.default_rng(0)
    held = []
    for _ in range(1000):
        p, y = _draws(rng, 50)
        floors = fit_floors(p, y, 0.9)
        q, t = _draws(rng, 200)
        held.append(prediction_sets(q, floors)[np.arange(200), t].mean())
    assert 0.895 <= np.mean(held) <= 0.9 + 1 / 51 + 0.005


def test_a_floor_per_class_covers_the_class_the_model_finds_hard():
    """Sets with one floor cover a hard class less often than fitted for (the average is met by
    the easy ones); a floor per class gives each its coverage, the hard one entering sets at a
    lower probability."""
    rng = np.random.default_rng(1)
    p, y = _draws(rng, 8000, hard=0.3)
    q, t = _draws(rng, 8000, hard=0.3)
    classes = ["hard", "b", "c", "d"]
    one = set_report(prediction_sets(q, fit_floors(p, y, 0.9)), t, classes, 0.9, [8000] * 4)
    each = set_report(prediction_sets(q, fit_floors(p, y, 0.9, by_class=True)), t, classes, 0.9,
                      np.bincount(y).tolist(), by_class=True)
    assert abs(one["coverage"] - 0.9) < 0.01 and one["per_class"][0]["coverage"] < 0.85
    assert one["short_of_coverage"] == ["hard"] and each["short_of_coverage"] == []
    assert one["expected_range"][0] < 0.9 < one["expected_range"][1] and each["expected_range"] is None
    assert all(abs(r["coverage"] - 0.9) < 0.02 for r in each["per_class"])
    assert fit_floors(p, y, 0.9, by_class=True)[0] < fit_floors(p, y, 0.9)[0]


def test_the_chance_range_holds_the_coverage_of_95_percent_of_fits():
    """Over fresh fits on 100 images and 300 test images each, about 95% of coverages fall in the
    range (the beta-binomial law of the count covered), where the test images' own binomial
    interval around the target would miss far more: the fit's spread is the larger part."""
    rng = np.random.default_rng(2)
    lo, hi = expected_range(300, 100, 0.9)
    inside = []
    for _ in range(2000):
        p, y = _draws(rng, 100)
        q, t = _draws(rng, 300)
        c = prediction_sets(q, fit_floors(p, y, 0.9))[np.arange(300), t].mean()
        inside.append(lo <= c <= hi)
    assert 0.93 <= np.mean(inside) <= 0.98
    from cifarlab.audit import proportion_ci

    narrow = proportion_ci(270, 300)
    assert hi - lo > 1.3 * (narrow[1] - narrow[0])
    assert expected_range(0, 100, 0.9) is None and expected_range(50, 5, 0.9) == [1.0, 1.0]


def test_the_floor_with_too_few_images_holds_every_class():
    assert min_images(0.9) == 9 and min_images(0.5) == 1 and min_images(0.95) == 19
    p = np.linspace(0.1, 0.9, 9)
    assert conformal_floor(p, 0.9) == pytest.approx(0.1)  # the 9th largest of 9: the smallest
    assert conformal_floor(p[:8], 0.9) == 0.0  # 8 images cannot promise 0.9
    assert conformal_floor(p, 0.5) == pytest.approx(p[4])  # ceil(10 * 0.5) = 5th largest
    # a class without enough images of its own enters every set
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    floors = fit_floors(probs, np.array([0, 0, 1]), 0.5, by_class=True)
    assert floors[0] == pytest.approx(0.8) and floors[1] == pytest.approx(0.7)
    assert fit_floors(probs, np.array([0, 0, 1]), 0.9, by_class=True).tolist() == [0.0, 0.0]
    with pytest.raises(CifarlabError, match="there are none"):
        fit_floors(np.zeros((0, 2)), np.zeros(0, int), 0.9)
    for bad in (0, 1, 1.5, -0.1, True, "0.9"):
        with pytest.raises(CifarlabError, match=f"--sets {bad!r} is not valid; .* between 0 and 1"):
            check_coverage(bad)


def test_set_report_counts_sizes_coverage_and_singletons():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    sets = prediction_sets(probs, np.array([0.3, 0.3, 0.7]))
    assert sets.tolist() == [[True, False, False], [True, True, False], [False, False, True], [False, False, False]]
    r = set_report(sets, np.array([0, 1, 0, 2]), ["a", "b", "c"], 0.75, [20, 20, 20])
    assert r["coverage"] == 0.5 and r["mean_size"] == 1.0 and r["sizes"] == {"0": 1, "1": 2, "2": 1}
    assert r["empty"] == 0.25 and r["singletons"] == 0.5 and r["singleton_accuracy"] == 0.5
    a, b, c = r["per_class"]
    assert (a["images"], a["coverage"], a["mean_size"]) == (2, 0.5, 1.0)
    assert (b["coverage"], c["coverage"]) == (1.0, 0.0) and r["coverage_ci"][0] < 0.5 < r["coverage_ci"][1]


def test_calibrate_fits_sets_that_predict_and_evaluate_use(trained_run, image_folder, capsys):
    ds = load_dataset(str(image_folder))
    entry = calibrate_run(trained_run, ds, device="cpu", log=lambda s: None, sets=0.8)
    sets = entry["prediction_sets"]
    assert sets["coverage"] == 0.8 and not sets["by_class"] and sets["images"] == entry["validation_images"]
    # the floor is the conformal one of the validation images' calibrated probabilities
    model = load_model(trained_run, "cpu")
    from cifarlab.train import run_split

    va = run_split(trained_run, ds)[2]
    p = model.predict(ds.x_train[va])
    floor = conformal_floor(p[np.arange(len(va)), ds.y_train[va]], 0.8)
    assert list(sets["min_probability"].values()) == pytest.approx([floor] * 3)
    cal = read_calibration(trained_run)["none"]
    assert cal.set_coverage == 0.8 and cal.set_floors == pytest.approx((floor,) * 3) and not cal.set_by_class
    # evaluate measures them on the test images
    report = evaluate_run(trained_run, ds, device="cpu")
    q = model.predict(ds.x_test)
    held = (q >= floor)[np.arange(len(q)), ds.y_test]
    assert report["prediction_sets"]["coverage"] == pytest.approx(held.mean())
    assert report["prediction_sets"]["mean_size"] == pytest.approx((q >= floor).sum(1).mean())
    assert main(["evaluate", str(trained_run), "--device", "cpu"]) == 0
    assert f"they held the true class for {held.mean():.4f} of the test images" in capsys.readouterr().out
    # predict gives each image's set, most probable first, in every format
    image = next((image_folder / "test" / "cat").iterdir())
    q1 = model.predict([image])[0]
    expected = [model.classes[i] for i in np.argsort(-q1, kind="stable") if q1[i] >= floor]
    assert main(["predict", str(trained_run), str(image), "--json", "--sets"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["predictions"][0]["set"] == expected and doc["prediction_sets"] == {"coverage": 0.8, "by_class": False}
    assert main(["predict", str(trained_run), str(image), "--csv", "--sets"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].endswith(",set") and rows[1].endswith("," + "|".join(expected))
    assert main(["predict", str(trained_run), str(image), "--sets"]) == 0
    out = capsys.readouterr().out
    assert f"set {{{', '.join(expected)}}}" in out and "prediction sets of coverage 0.8" in out
    # too few validation images for the coverage: said, and every class enters every set
    logs = []
    n_val = calibrate_run(trained_run, ds, device="cpu", log=logs.append, sets=0.99)["validation_images"]
    assert n_val < min_images(0.99) and read_calibration(trained_run)["none"].set_floors == (0.0, 0.0, 0.0)
    assert f"warning: sets of coverage 0.99 need at least 99 held-out images, and there are {n_val}: every set " \
        "holds every class" in logs[-1]
    calibrate_run(trained_run, ds, device="cpu", log=logs.append, sets=0.9, sets_by_class=True)
    assert "sets of coverage 0.9 by class need at least 9 held-out images of a class;" in logs[-1]
    assert "have fewer, and so enter every set" in logs[-1]
    # a fit without --sets leaves none, and then predict --sets says what to run
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None)
    assert read_calibration(trained_run)["none"].set_floors is None
    assert evaluate_run(trained_run, ds, device="cpu")["prediction_sets"] is None
    assert main(["predict", str(trained_run), str(image), "--sets"]) == 2
    assert f"fit them on its held-out images with: cifarlab calibrate {trained_run} --sets 0.9" in \
        capsys.readouterr().err


def test_sets_options_and_damaged_records_are_refused(trained_run, image_folder, capsys, monkeypatch):
    from cifarlab import cli

    monkeypatch.setattr(cli, "_load_eval_data", lambda *a: pytest.fail("data loaded for a bad --sets"))
    for args, says in ((["--sets", "1"], "--sets 1.0 is not valid"),
                       (["--sets-by-class"], "--sets-by-class refines --sets COVERAGE")):
        assert main(["calibrate", str(trained_run), *args]) == 2
        assert says in capsys.readouterr().err
    monkeypatch.undo()
    calibrate_run(trained_run, load_dataset(str(image_folder)), device="cpu", log=lambda s: None, sets=0.8,
                  sets_by_class=True)
    image = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(trained_run), str(image), "--sets", "--uncalibrated"]) == 2
    assert "--sets needs the calibrated probabilities" in capsys.readouterr().err
    path = trained_run / CALIBRATION_FILE
    good = json.loads(path.read_text())
    assert good["by_tta"]["none"]["prediction_sets"]["by_class"] and read_calibration(trained_run)["none"].set_by_class
    for damage in ({"coverage": 1.5}, {"min_probability": {"cat": 0.5}},
                   {"min_probability": {"cat": 2, "dog": 0, "frog": 0}}, {"class_images": {"cat": 3}},
                   {"class_images": {"cat": 1.5, "dog": 1, "frog": 1}}):
        doc = json.loads(json.dumps(good))
        doc["by_tta"]["none"]["prediction_sets"].update(damage)
        path.write_text(json.dumps(doc))
        with pytest.raises(CifarlabError, match="has prediction sets .* expected a coverage between 0 and 1, a "
                                                "probability floor in \\[0, 1\\] for each of the model's classes "
                                                ".* and the images they were fitted on"):
            read_calibration(trained_run)


def test_sets_of_an_ensemble(tmp_path, image_folder, capsys, monkeypatch):
    """calibrate OUT --sets fits each run's sets and the ensemble's, on the images no run trained
    on; evaluate OUT reports the runs' spread and the ensemble's, predict OUT gives its sets."""
    import cifarlab.calibrate
    from cifarlab.evaluate import evaluate_runs
    from cifarlab.export import load_ensemble
    from cifarlab.train import fit

    base = tmp_path / "set"
    cfg = tiny_config(str(image_folder), str(base), runs=2, epochs=2)
    cfg.data.split_seed = 7
    fit(cfg, log=lambda s: None)
    monkeypatch.setattr(cifarlab.calibrate, "ENSEMBLE_MIN_IMAGES", 3)
    ds = load_dataset(str(image_folder))
    image = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(base), str(image), "--sets"]) == 2
    assert "no prediction sets were fitted for the ensemble" in capsys.readouterr().err
    assert main(["calibrate", str(base), "--sets", "0.75", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("prediction sets for coverage 0.75, fitted on") == 3  # two runs and the ensemble
    ens = load_ensemble(base)
    assert ens.calibration.set_coverage == 0.75
    summary = evaluate_runs(base, ds, device="cpu")
    q = ens.predict(ds.x_test)
    floors = np.asarray(ens.calibration.set_floors)
    assert summary["ensemble"]["prediction_sets"]["coverage"] == pytest.approx(
        (q >= floors)[np.arange(len(q)), ds.y_test].mean())
    assert summary["prediction_sets"]["coverage_target"] == [0.75]
    assert main(["predict", str(base), str(image), "--sets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    p1 = ens.predict([image])[0]
    expected = [ens.classes[i] for i in np.argsort(-p1, kind="stable") if p1[i] >= floors[i]]
    assert doc["predictions"][0]["set"] == expected
    assert main(["evaluate", str(base), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Prediction sets of the runs (cifarlab calibrate --sets): coverage mean" in out
    assert "Their ensemble's prediction sets (cifarlab calibrate --sets 0.75)" in out
    # the runs' audit gives the ensemble's sets too, by class and by group, as evaluate measured them
    from cifarlab.audit import audit_runs

    groups = tmp_path / "groups.csv"
    groups.write_text("index,half\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(len(ds.y_test))))
    a = audit_runs(base, ds, tmp_path / "a", groups_csv=str(groups), n_boot=100, min_group=1, log=lambda m: None)
    e = a["ensemble"]
    assert e["prediction_sets"]["coverage"] == pytest.approx(summary["ensemble"]["prediction_sets"]["coverage"])
    held = (q >= floors)[np.arange(len(q)), ds.y_test]
    assert [g["set_coverage"] for g in e["attributes"]["half"]["groups"]] == pytest.approx(
        [held[0::2].mean(), held[1::2].mean()])
    assert "### The ensemble's prediction sets" in (tmp_path / "a" / "audit_summary.md").read_text()
    # its int8 copy refits the ensemble's floors on the images they were fitted on, none of which
    # a run trained on
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        from cifarlab.calibrate import held_out_images
        from cifarlab.quantize import export_int8

        r = export_int8(base, ds, calibration_images=9, log=lambda s: None)
        assert r["prediction_sets"]["refitted_on_images"] == len(held_out_images(base, ds, ensemble=True)) \
            == ens.calibration.set_fit_images[0]


def test_audit_gives_the_sets_coverage_by_class_and_by_group(trained_run, image_folder, tmp_path):
    from cifarlab.audit import audit_run

    ds = load_dataset(str(image_folder))
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None, sets=0.8)
    groups = tmp_path / "groups.csv"
    groups.write_text("index,half\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(len(ds.y_test))))
    audit = audit_run(trained_run, ds, tmp_path / "audit", groups_csv=str(groups), n_boot=100, min_group=1,
                      log=lambda s: None)
    model = load_model(trained_run, "cpu")
    q = model.predict(ds.x_test)
    held = model.prediction_sets(q)[np.arange(len(q)), ds.y_test]
    assert audit["prediction_sets"]["coverage"] == pytest.approx(held.mean())
    rows = audit["attributes"]["half"]["groups"]
    assert [r["set_coverage"] for r in rows] == pytest.approx([held[0::2].mean(), held[1::2].mean()])
    assert all(r["set_coverage_ci"][0] <= r["set_coverage"] <= r["set_coverage_ci"][1] for r in rows)
    assert [r["set_coverage_expected"] for r in rows] == [
        expected_range(r["n"], read_calibration(trained_run)["none"].set_fit_images[0], 0.8) for r in rows]
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "## Prediction sets" in md and "| set coverage | chance range | mean set size |" in md
    size = model.prediction_sets(q).sum(1)
    assert [r["set_mean_size"] for r in rows] == pytest.approx([size[0::2].mean(), size[1::2].mean()])
    card = (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert "Prediction sets (`cifarlab predict --sets`)" in card
    assert "Prediction sets (fitted for coverage 0.8) held the true class for: a " in card


def test_a_group_covered_less_often_than_promised_is_warned_of():
    from cifarlab.audit import _group_audit, _group_warnings

    y = np.zeros(200, int)
    values = np.array(["day"] * 100 + ["night"] * 100, dtype=object)
    held = np.r_[np.ones(100, bool), np.arange(100) < 70]  # night: 0.70, far below 0.9
    gm = _group_audit(y, y, values, 1.0, 0.05, 30, sets=(held, np.ones(200), 0.9, 1000))
    assert [g["set_coverage"] for g in gm["groups"]] == [1.0, 0.7]
    assert gm["set_coverage_gap"]["least"] == "night" and gm["set_coverage_gap"]["ci_excludes_zero"]
    lo, hi = expected_range(100, 1000, 0.9)
    assert gm["groups"][1]["set_coverage_expected"] == [lo, hi] and lo > 0.7
    warnings = _group_warnings("time", gm, 1.0, 0.05, 30)
    assert [w for w in warnings if "prediction sets" in w] == [
        f"time=night: its prediction sets held the true class for 0.700 of its images, below the 0.9 they were "
        f"fitted for and the {lo:.3f} to {hi:.3f} that chance allows images like the validation images"]
    # a group too small to judge is not warned of, however low; nor one within its range
    small = _group_audit(y[:110], y[:110], values[:110], 1.0, 0.05, 30, sets=(np.r_[np.ones(100, bool),
                                                                                   np.zeros(10, bool)], np.ones(110),
                                                                                   0.9, 1000))
    assert not [w for w in _group_warnings("time", small, 1.0, 0.05, 30) if "prediction sets" in w]
    near = _group_audit(y, y, values, 1.0, 0.05, 30, sets=(np.r_[np.ones(100, bool), np.arange(100) < 86],
                                                                np.ones(200), 0.9, 200))
    assert near["groups"][1]["set_coverage_ci"][1] < 0.95 and near["groups"][1]["set_coverage_expected"][0] < 0.86
    assert not [w for w in _group_warnings("time", near, 1.0, 0.05, 30) if "prediction sets" in w]


def test_the_runs_audit_summarises_the_sets(tmp_path, image_folder):
    """audit OUT: each run's sets, and over the runs their coverage, size and the classes short
    of coverage in how many runs; each group's coverage spread."""
    from cifarlab.audit import audit_runs
    from cifarlab.calibrate import calibrate_runs
    from cifarlab.train import fit

    base = tmp_path / "set"
    fit(tiny_config(str(image_folder), str(base), runs=2, epochs=2), log=lambda s: None)
    ds = load_dataset(str(image_folder))
    calibrate_runs(base, ds, device="cpu", log=lambda s: None, sets=0.8)
    groups = tmp_path / "groups.csv"
    groups.write_text("index,half\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(len(ds.y_test))))
    s = audit_runs(base, ds, tmp_path / "a", groups_csv=str(groups), n_boot=100, min_group=1, log=lambda m: None)
    each = [json.loads((tmp_path / "a" / f"run-{k}" / "audit.json").read_text())["prediction_sets"] for k in range(2)]
    ps = s["prediction_sets"]
    assert ps["coverage_target"] == [0.8] and ps["by_class_in"] == 0
    assert (ps["coverage"]["min"], ps["coverage"]["max"]) == (min(e["coverage"] for e in each),
                                                              max(e["coverage"] for e in each))
    assert sum(ps["short_of_coverage_in"].values()) == sum(len(e["short_of_coverage"]) for e in each)
    g = s["attributes"]["half"]["groups"][0]
    assert {"set_coverage", "set_mean_size", "short_of_coverage_in"} <= set(g)
    md = (tmp_path / "a" / "audit_summary.md").read_text()
    assert "## Prediction sets" in md and "| set coverage | mean set size | below chance range in |" in md


def test_export_carries_the_sets_floors_as_metadata(trained_run, image_folder, tmp_path):
    """The ONNX file travels without calibration.json: its metadata holds the floors, which on
    the file's probabilities give the sets predict --sets gives."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cifarlab.deploy import export_onnx

    ds = load_dataset(str(image_folder))
    export_onnx(trained_run, tmp_path / "plain.onnx", log=lambda s: None)
    assert "prediction_sets" not in {p.key for p in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None, sets=0.8, sets_by_class=True)
    export_onnx(trained_run, tmp_path / "m.onnx", log=lambda s: None)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    sets = json.loads(meta["prediction_sets"])
    cal = read_calibration(trained_run)["none"]
    assert sets == {"coverage": 0.8, "by_class": True, "min_probability": list(cal.set_floors)}
    probs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": ds.x_test})[0]
    model = load_model(trained_run)
    flips = (prediction_sets(probs, np.array(sets["min_probability"])) != model.prediction_sets(model.predict(ds.x_test)))
    assert flips.sum() <= 1  # float32 rounding may move a probability that sits on a floor


@pytest.mark.parametrize("by_class", [False, True])
def test_the_int8_copy_carries_floors_refitted_on_its_own_probabilities(trained_run, image_folder, by_class,
                                                                         monkeypatch):
    """Rounding moves the probabilities, so the int8 file gets floors of its own, fitted on its
    probabilities of the same held-out images at the same coverage; its int8 ranges are never
    measured on those images; its report sets both files' sets side by side on the test images."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cifarlab import quantize
    from cifarlab.calibrate import held_out_images

    ds = load_dataset(str(image_folder))
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None, sets=0.8, sets_by_class=by_class)
    held = held_out_images(trained_run, ds)
    ranged = []
    real = quantize.quantize_file
    monkeypatch.setattr(quantize, "quantize_file", lambda src, dst, images, method: (ranged.append(images),
                                                                                    real(src, dst, images, method)))
    lines = []
    report = quantize.export_int8(trained_run, ds, calibration_images=9, log=lines.append)
    held_rows = {x.tobytes() for x in ds.x_train[held]}
    assert len(ranged[0]) == 9 and not any(x.tobytes() in held_rows for x in ranged[0])
    path = trained_run / "model.int8.onnx"
    sets = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["prediction_sets"])
    probs = ort.InferenceSession(str(path)).run(None, {"images": ds.x_train[held]})[0]
    assert sets == {"coverage": 0.8, "by_class": by_class,
                    "min_probability": fit_floors(probs, ds.y_train[held], 0.8, by_class).tolist()}
    assert report["prediction_sets"]["refitted_on_images"] == len(held)
    assert list(report["prediction_sets"]["float32_min_probability"].values()) == \
        list(read_calibration(trained_run)["none"].set_floors)
    test = report["test"]["prediction_sets"]
    test_probs = ort.InferenceSession(str(path)).run(None, {"images": ds.x_test})[0]
    held_true = prediction_sets(test_probs, np.array(sets["min_probability"]))[np.arange(len(ds.y_test)), ds.y_test]
    assert test["int8"]["coverage"] == pytest.approx(held_true.mean())
    assert test["int8"]["by_class"] is by_class and test["float32"]["coverage_target"] == 0.8
    assert f"held the true class for {test['int8']['coverage']:.4f} of the test images" in "\n".join(lines)


def test_the_int8_copy_leaves_out_sets_it_cannot_refit(trained_run, image_folder, monkeypatch):
    """Data that does not give back the held-out images the floors were fitted on: the int8 file
    carries no sets, and says why; one without sets says nothing of them."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import dataclasses

    import cifarlab.calibrate
    from cifarlab.quantize import export_int8

    ds = load_dataset(str(image_folder))
    lines = []
    export_int8(trained_run, ds, calibration_images=9, log=lines.append)
    assert "prediction_sets" not in json.loads((trained_run / "model.int8.json").read_text())
    assert not [m for m in lines if "prediction sets" in m]
    calibrate_run(trained_run, ds, device="cpu", log=lambda s: None, sets=0.8)
    other = dataclasses.replace(ds, x_train=ds.x_train[1:], y_train=ds.y_train[1:])
    export_int8(trained_run, other, calibration_images=9, log=lines.append)
    meta = {p.key: p.value for p in onnx.load(str(trained_run / "model.int8.onnx")).metadata_props}
    assert "temperature" in meta and "quantization" in meta and "prediction_sets" not in meta
    assert any(m.startswith("the int8 file carries no prediction sets") and "not the data the run was trained on"
               in m for m in lines)
    # held-out images that are not as many as the floors were fitted on (calibrated on other images)
    monkeypatch.setattr(cifarlab.calibrate, "held_out_images", lambda *a, **k: np.arange(2))
    export_int8(trained_run, ds, calibration_images=9, log=lines.append)
    assert "prediction_sets" not in json.loads((trained_run / "model.int8.json").read_text())
    said = f"2 held-out images here against {read_calibration(trained_run)['none'].set_fit_images[0]:,} then; " \
           f"calibrate again with: cifarlab calibrate {trained_run} --sets 0.8"
    assert any(said in m for m in lines)



def test_fit_image_counts_are_each_class_own_images_by_class_else_all():
    from cifarlab.conformal import fit_image_counts

    y = np.array([0, 2, 2, 1, 2, 0])
    assert fit_image_counts(y, 4, by_class=True) == [2, 1, 3, 0]
    assert fit_image_counts(y, 4) == [6, 6, 6, 6]
