"""Evaluation metrics against scikit-learn, the audit's intervals and groups, the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab.audit import (audit_run, class_confidence, class_metrics, confidence_gap, group_metrics, proportion_ci,
                           read_groups)
from cifarlab.data import load_dataset
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import calibration, compute_report, evaluate_run


def test_report_matches_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4))
    logits[np.arange(500), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = compute_report(probs, y, ["a", "b", "c", "d"], k=2)
    pred = probs.argmax(1)
    assert r["accuracy"] == pytest.approx((pred == y).mean())
    assert r["loss"] == pytest.approx(-np.log(probs[np.arange(500), y]).mean(), rel=1e-6)
    top2 = np.argsort(-probs, 1)[:, :2]
    assert r["top_k"]["accuracy"] == pytest.approx((top2 == y[:, None]).any(1).mean())
    cm = np.array(r["confusion_matrix"])
    assert cm.sum() == 500 and cm[1, 2] == ((y == 1) & (pred == 2)).sum()
    assert r["per_class"][0]["recall"] == pytest.approx(((pred == 0) & (y == 0)).sum() / (y == 0).sum())
    assert r["confused_pairs"][0]["count"] == np.max(cm - np.diag(np.diag(cm)))


def test_report_of_two_classes_has_top_1_accuracy():
    """Two classes: scikit-learn's top-k takes them for a binary problem and refuses two columns of
    probabilities; with k 1 the top-k accuracy is the accuracy."""
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])
    r = compute_report(probs, y, ["bird", "ship"])
    assert r["top_k"] == {"k": 1, "accuracy": 0.6} and r["accuracy"] == 0.6
    assert r["loss"] == pytest.approx(-np.log(probs[np.arange(5), y]).mean(), rel=1e-6)


def test_report_leaves_undefined_figures_undefined():
    """A class never predicted has no precision; a class with no test image, no recall."""
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    rows = compute_report(probs, y, ["a", "b", "c"], k=1)["per_class"]
    assert rows[0] == {"class": "a", "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # F1 as 2TP / (2TP + FP + FN): defined (0) once the class is predicted, wrongly
    assert rows[2] == {"class": "c", "accuracy": None, "precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    never = compute_report(probs[[0, 2]], y[[0, 2]], ["a", "b", "c"], k=1)["per_class"][1]
    assert never["precision"] is None and never["recall"] == 0.0


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_with_test_images():
    from sklearn.metrics import balanced_accuracy_score

    y = np.array([0, 0, 0, 0, 1, 2, 2])  # class 3 has no test image
    pred = np.array([0, 0, 0, 0, 0, 2, 1])
    r = compute_report(np.eye(4)[pred] * 0.9 + 0.025, y, ["a", "b", "c", "d"], k=1)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3) == balanced_accuracy_score(y, pred)


def test_ece_perfect_and_overconfident():
    y = np.array([0, 1] * 50)
    sure = np.eye(2)[y]
    assert calibration(sure, y)["ece"] == 0
    wrong = np.eye(2)[1 - y] * 0.99 + 0.005
    assert calibration(wrong, y)["ece"] == pytest.approx(0.995, abs=1e-6)


def test_class_metrics_intervals_cover_and_spread():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 300)
    pred = y.copy()
    flip = rng.random(900) < np.array([0.05, 0.2, 0.5])[y]
    pred[flip] = (y[flip] + 1) % 3
    m = class_metrics(y, pred, ["a", "b", "c"], n_boot=300, seed=0)
    accs = [r["accuracy"] for r in m["per_class"]]
    for r in m["per_class"]:
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert r["accuracy_ci"][1] - r["accuracy_ci"][0] < 0.15
    assert m["spread"]["best"] == "a" and m["spread"]["worst"] == "c"
    assert m["spread"]["difference"] == pytest.approx(max(accs) - min(accs))
    assert m["spread"]["difference_ci"][0] > 0.3


def test_an_accuracy_of_none_or_all_of_a_few_images_gets_an_honest_interval():
    """Four images of a class, all wrong or all right: the percentile bootstrap's interval was
    the point [0, 0] or [1, 1]; the exact binomial one says how little four images tell (the
    Clopper-Pearson bounds of 0 of 4 and 4 of 4, 0.6024 = 1 - 0.025 ** (1 / 4))."""
    y = np.repeat(np.arange(3), 4)
    pred = np.array([1] * 4 + [1] * 4 + [0, 2, 2, 2])
    rows = {r["class"]: r for r in class_metrics(y, pred, ["cat", "dog", "frog"], n_boot=200, seed=0)["per_class"]}
    assert rows["cat"]["accuracy_ci"] == pytest.approx([0.0, 1 - 0.025 ** 0.25], abs=1e-4)
    assert rows["dog"]["accuracy_ci"] == pytest.approx([0.025 ** 0.25, 1.0], abs=1e-4)
    assert rows["frog"]["accuracy_ci"][0] < 0.75 < rows["frog"]["accuracy_ci"][1]
    assert rows["cat"]["recall_ci"] == rows["cat"]["accuracy_ci"]
    groups = group_metrics(y, pred, np.array(["dark"] * 4 + ["bright"] * 8), 0.5, 0.05, 1)
    dark = next(g for g in groups["groups"] if g["group"] == "dark")
    assert dark["accuracy"] == 0 and dark["accuracy_ci"] == pytest.approx([0.0, 0.6024], abs=1e-4)


def test_gap_intervals_are_newcombes_and_widen_for_few_images():
    """The difference of two accuracies: Newcombe's (1998) method 10, checked against his table's
    examples; a class all right against one all wrong, on four images each, is no longer the
    bootstrap's point [1, 1]."""
    from cifarlab.audit import difference_ci

    for (k1, n1, k2, n2), want in [((56, 70, 48, 80), [0.0524, 0.3339]), ((9, 10, 3, 10), [0.1705, 0.8090]),
                                   ((5, 56, 0, 29), [-0.0381, 0.1926])]:
        assert difference_ci(k1, n1, k2, n2) == pytest.approx(want, abs=1e-4)
    y = np.repeat(np.arange(2), 4)
    spread = class_metrics(y, np.zeros(8, np.int64), ["cat", "dog"], n_boot=200, seed=0)["spread"]
    assert spread["difference"] == 1 and spread["difference_ci"] == pytest.approx([0.3072, 1.0], abs=1e-4)


def test_group_gap_detection_and_small_groups():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 1000)
    g = np.array(["day"] * 500 + ["night"] * 480 + ["dusk"] * 20, dtype=object)
    pred = y.copy()
    bad = (g == "night") & (rng.random(1000) < 0.4)
    pred[bad] = (y[bad] + 1) % 3
    gm = group_metrics(y, pred, g, overall=float((pred == y).mean()), margin=0.05, min_group=30)
    rows = {r["group"]: r for r in gm["groups"]}
    assert rows["dusk"]["too_small"] and not rows["day"]["too_small"]
    assert rows["night"]["flagged"] and not rows["day"]["flagged"]
    assert gm["gap"]["highest"] == "day" and gm["gap"]["lowest"] == "night" and gm["gap"]["ci_excludes_zero"]
    same = group_metrics(y, y, g, 1.0, 0.05, 30)
    assert not same["gap"]["ci_excludes_zero"]


def test_group_confidence_and_the_gap_between_the_most_and_least_overconfident_groups():
    """Each group's mean confidence and that minus its accuracy, worked by hand; the gap's
    interval is Welch's normal one on each image's confidence minus its correctness."""
    y = np.zeros(8, np.int64)
    pred = np.array([0, 0, 1, 1, 0, 0, 0, 1])
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6, 0.6, 0.6])
    g = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    gm = group_metrics(y, pred, g, overall=0.625, margin=0.05, min_group=1, conf=conf)
    rows = {r["group"]: r for r in gm["groups"]}
    assert rows["a"]["mean_confidence"] == pytest.approx(0.9) and rows["a"]["overconfidence"] == pytest.approx(0.4)
    assert rows["b"]["mean_confidence"] == pytest.approx(0.6) and rows["b"]["overconfidence"] == pytest.approx(-0.15)
    cg = gm["confidence_gap"]
    assert (cg["most"], cg["least"]) == ("a", "b") and cg["difference"] == pytest.approx(0.55)
    # a: excess 0.9-1, 0.9-1, 0.9, 0.9 (variance 1/3); b: -0.4 x3, 0.6 (variance 0.25)
    half = 1.959964 * (1 / 3 / 4 + 0.25 / 4) ** 0.5
    assert cg["difference_ci"] == pytest.approx([0.55 - half, 0.55 + half], abs=1e-5)
    assert not cg["ci_excludes_zero"]  # four images a group tell little
    rng = np.random.default_rng(0)
    big = confidence_gap(rng.uniform(0.2, 0.4, 400), rng.uniform(-0.1, 0.1, 400))
    assert big["ci_excludes_zero"] and big["difference"] == pytest.approx(0.3, abs=0.02)
    assert "confidence_gap" not in group_metrics(y, pred, g, 0.625, 0.05, 1)  # without confidences, as before
    assert group_metrics(y, pred, np.array(["a"] * 8, dtype=object), 0.625, 0.05, 1, conf)["confidence_gap"] is None
    one = confidence_gap(np.array([0.5]), np.array([0.1, -0.2]))  # one image: no spread, no interval
    assert one["difference_ci"] == [None, None] and not one["ci_excludes_zero"]



def test_an_audit_warns_of_a_group_its_confidences_overstate_beyond_chance():
    from cifarlab.audit import _group_audit, _group_warnings

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 800)
    pred = np.where(rng.random(800) < 0.7, y, 1 - y)  # 70% right in both groups
    conf = np.concatenate([np.full(400, 0.95), np.full(400, 0.7)])  # overstated for "a" alone
    g = np.array(["a"] * 400 + ["b"] * 400, dtype=object)
    gm = _group_audit(y, pred, g, float((pred == y).mean()), 0.05, 30, conf=conf)
    warned = [w for w in _group_warnings("site", gm, 0.7, 0.05, 30) if "confidence exceeds accuracy" in w]
    a, b = gm["groups"]
    assert len(warned) == 1 and warned[0].startswith(f"site: confidence exceeds accuracy by {a['overconfidence']:+.3f} "
                                                     f"on 'a' images against {b['overconfidence']:+.3f} on 'b'")
    assert "which excludes zero): a confidence threshold is less reliable for the first" in warned[0]
    calibrated = _group_audit(y, pred, g, float((pred == y).mean()), 0.05, 30, conf=np.full(800, 0.7))
    assert not [w for w in _group_warnings("site", calibrated, 0.7, 0.05, 30) if "confidence" in w]
    # all right in both groups, confidences 1.0 against 0.99: beyond chance, but under the margin
    sure = _group_audit(np.zeros(800, np.int64), np.zeros(800, np.int64), g, 1.0, 0.05, 30,
                        conf=np.concatenate([np.full(400, 1.0), np.full(400, 0.99)]))
    assert sure["confidence_gap"]["ci_excludes_zero"]
    assert not [w for w in _group_warnings("site", sure, 1.0, 0.05, 30) if "confidence" in w]


def test_evaluate_and_audit_write_reports(trained_run, image_folder, tmp_path):
    ds = load_dataset(image_folder)
    rep = evaluate_run(trained_run, ds, tmp_path / "eval", device="cpu")
    for f in ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "reliability.png", "per_class.csv",
              "predictions.csv"):
        assert (tmp_path / "eval" / f).is_file()
    assert len(rep["per_class"]) == 3 and rep["num_images"] == 9
    # one row per test image, in the test split's order, agreeing with the report's figures
    import csv

    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").read_text().splitlines()))
    assert [r["path"] for r in rows] == ds.test_paths and [r["index"] for r in rows] == [str(i) for i in range(9)]
    assert [r["true"] for r in rows] == [ds.classes[y] for y in ds.y_test]
    assert sum(r["correct"] == "yes" for r in rows) / 9 == pytest.approx(rep["accuracy"])
    assert all((r["predicted"] == r["true"]) == (r["correct"] == "yes") for r in rows)
    assert all(float(r["confidence"]) >= float(r["p_true"]) for r in rows)
    assert "predictions.csv" in rep["files"]
    groups = tmp_path / "groups.csv"
    groups.write_text("path,source\n" + "".join(f"{p},{'a' if i % 2 else 'b'}\n" for i, p in enumerate(ds.test_paths)))
    audit = audit_run(trained_run, ds, tmp_path / "audit", groups_csv=str(groups), n_boot=200, device="cpu",
                      log=lambda s: None)
    assert set(audit["attributes"]["source"]["gap"]) >= {"difference", "difference_ci", "ratio"}
    assert any("too small to judge" in w for w in audit["warnings"])  # groups of 4-5 < 30
    card = json.loads((tmp_path / "audit" / "model_card.json").read_text())
    assert {"model_details", "intended_use", "training_data", "evaluation_data", "metrics",
            "ethical_considerations", "caveats"} <= set(card)
    md = (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert "must not" in md.lower() or "out-of-scope" in md.lower()
    assert "identifying, recognising, tracking or surveilling people" in md.lower()
    assert "[TO BE FILLED IN BY THE MODEL'S OWNER]" in md  # unknown facts are marked, not invented
    assert "per_class_accuracy.png" in md and (tmp_path / "audit" / "per_class_accuracy.png").is_file()
    assert card["model_details"]["early_stopping"] is None and ", epochs: 2\n" in md
    # the command that describes the training data, its path quoted for a shell
    import shlex

    line = next(ln for ln in md.splitlines() if ln.startswith("- Datasheet: "))
    assert shlex.split(line.split("`")[1]) == ["cifarlab", "datasheet", "--data", card["training_data"]["source"]]


def test_a_run_whose_metrics_file_is_damaged_is_refused_by_name(trained_run, image_folder, tmp_path, capsys):
    """A run folder is handed over (copied, synced): a metrics.json cut short stops the model
    card, a teacher and a start, naming the file, where each raised a traceback."""
    from cifarlab.cli import main

    metrics = trained_run / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:50])
    base = ["train", "--data", str(image_folder), "--epochs", "1", "--out", str(tmp_path / "new")]
    for argv in (["audit", str(trained_run), "--out", str(tmp_path / "a")],
                 base + ["--model", "keras-shallow", "--teacher", str(trained_run)],
                 base + ["--model", "keras-shallow", "--init-from", str(trained_run)]):
        assert main(argv) == 2, argv
        assert f"{metrics} is damaged (" in capsys.readouterr().err
        assert not (tmp_path / "a").exists() and not (tmp_path / "new").exists()


def test_model_card_says_which_epochs_weights_an_early_stopped_run_kept():
    from cifarlab.audit import _origin_lines

    d = {"recipe": "keras-book", "optimizer": {"name": "rmsprop"}, "epochs": 40,
         "early_stopping": {"patience": 3, "best_epoch": 9, "best_val_loss": 1.2, "stopped_after_epoch": 12}}
    assert _origin_lines(d) == ["- Recipe: `keras-book`; optimizer: `rmsprop`, epochs: 40 with early stopping "
                                "(patience 3; stopped early after epoch 12; the weights are those of epoch 9, the "
                                "lowest validation loss)"]
    d["early_stopping"].update(best_epoch=39, stopped_after_epoch=None)
    assert "(patience 3; trained every epoch; the weights are those of epoch 39," in _origin_lines(d)[0]
    # a run that watched its validation accuracy, changes of 0.002 or less not counting
    d["early_stopping"] = {"patience": 5, "monitor": "val_accuracy", "min_delta": 0.002, "best_epoch": 20,
                           "best_val_accuracy": 0.75, "stopped_after_epoch": 25}
    assert _origin_lines(d)[0].endswith("epochs: 40 with early stopping (patience 5, changes of 0.002 or less not "
                                        "counting; stopped early after epoch 25; the weights are those of epoch "
                                        "20, the highest validation accuracy)")
    d["optimizer"] = {"name": "rmsprop", "plateau_patience": 2, "plateau_factor": 0.5}
    assert _origin_lines(d)[0].endswith("the highest validation accuracy); learning rate multiplied by 0.5 after "
                                        "every 2 epoch(s) without a lower validation loss")
    del d["early_stopping"]
    assert _origin_lines(d)[0] == ("- Recipe: `keras-book`; optimizer: `rmsprop`, epochs: 40; learning rate "
                                   "multiplied by 0.5 after every 2 epoch(s) without a lower validation loss")


def test_groups_file_errors(image_folder, tmp_path):
    ds = load_dataset(image_folder)
    f = tmp_path / "g.csv"
    f.write_text("id,x\n0,a\n")
    with pytest.raises(CifarlabError, match="first column is 'id'; it must be 'index' or 'path'"):
        read_groups(f, ds)
    f.write_text("index,x\n99,a\n")
    with pytest.raises(CifarlabError, match=r"line 2: index '99' is not valid; expected 0..8"):
        read_groups(f, ds)
    f.write_text("path,x\ntest/cow/1.png,a\n")
    with pytest.raises(CifarlabError, match="path 'test/cow/1.png' is not a test image"):
        read_groups(f, ds)
    f.write_text("index,x\n0,a\n1,b\n")
    idx, attrs = read_groups(f, ds)
    assert idx.tolist() == [0, 1] and attrs["x"].tolist() == ["a", "b"]
    f.write_text("index,x\n0,a\n1,b\n0,c\n")
    with pytest.raises(CifarlabError, match=r"line 4: index '0' is listed twice \(first on line 2\)"):
        read_groups(f, ds)
    f.write_text(f"path,x\n{ds.test_paths[3]},a\n\n{ds.test_paths[3]},a\n")
    with pytest.raises(CifarlabError, match=r"line 4: path '.*' is listed twice \(first on line 2\)"):
        read_groups(f, ds)
    f.write_text("index,x,y\n0,a,\n1,b, \n")
    with pytest.raises(CifarlabError, match="column 'y' has no values"):
        read_groups(f, ds)


def test_groups_file_as_spreadsheets_write_it(image_folder, tmp_path):
    """A byte-order mark, CRLF line ends and blank lines (as spreadsheets save CSV) are read as
    the plain file is; an empty cell stays empty, for the audit to leave out."""
    ds = load_dataset(image_folder)
    f = tmp_path / "g.csv"
    f.write_bytes("\ufeffindex,x\r\n0,a\r\n\r\n1,\r\n2,b\r\n\r\n".encode())
    idx, attrs = read_groups(f, ds)
    assert idx.tolist() == [0, 1, 2] and attrs["x"].tolist() == ["a", "", "b"]


def test_audit_leaves_out_images_without_a_group_and_measures_no_gap_in_one_group(trained_run, image_folder,
                                                                                   tmp_path):
    ds = load_dataset(image_folder)
    groups = tmp_path / "groups.csv"
    n = len(ds.y_test)
    groups.write_text("index,site,camera\n" + "".join(f"{i},{'a' if i < 5 else ''},c|1\n" for i in range(n)))
    audit = audit_run(trained_run, ds, tmp_path / "audit", groups_csv=str(groups), n_boot=100, device="cpu",
                      log=lambda s: None)
    site, camera = audit["attributes"]["site"], audit["attributes"]["camera"]
    assert [(g["group"], g["n"]) for g in site["groups"]] == [("a", 5)] and site["not_recorded"] == n - 5
    assert site["gap"] is None and camera["gap"] is None and camera["not_recorded"] == 0
    assert f"site: not recorded for {n - 5} images, left out of its groups" in audit["warnings"]
    assert "only 5 images (< 30)" in " ".join(audit["warnings"])
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "Only one group: no gap to measure." in md and f"Not recorded for {n - 5} images" in md
    assert "| c\\|1 | 9 |" in md  # a '|' in a name stays inside its table cell
    assert "By `site`: a " in (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    a = site["groups"][0]
    assert a["overconfidence"] == pytest.approx(a["mean_confidence"] - a["accuracy"])
    assert "| mean confidence | confidence - accuracy |" in md and "Confidence minus accuracy: a " in (
        tmp_path / "audit" / "MODEL_CARD.md").read_text()


def test_evaluation_uses_the_runs_own_test_time_augmentation(image_folder, tmp_path):
    """A run trained with TTA is evaluated, audited and served with it unless told otherwise, so
    `evaluate` reproduces the test accuracy training reported."""
    from conftest import tiny_config

    from cifarlab.export import load_model
    from cifarlab.train import fit

    cfg = tiny_config(str(image_folder), str(tmp_path / "run"), epochs=2)
    cfg.train.tta = "flip-translate"
    trained = fit(cfg, log=lambda s: None)
    ds = load_dataset(image_folder)
    rep = evaluate_run(tmp_path / "run", ds, tmp_path / "eval", device="cpu")
    assert rep["tta"] == "flip-translate"
    assert rep["accuracy"] == trained["test_accuracy"]
    assert rep["loss"] == pytest.approx(trained["test_loss"], rel=1e-4)
    plain = evaluate_run(tmp_path / "run", ds, tmp_path / "eval-none", tta="none", device="cpu")
    assert plain["tta"] == "none" and plain["loss"] != rep["loss"]
    audit = audit_run(tmp_path / "run", ds, tmp_path / "audit", n_boot=100, device="cpu", log=lambda s: None)
    assert audit["tta"] == "flip-translate" and audit["overall_accuracy"] == rep["accuracy"]
    assert "test-time augmentation: flip-translate" in (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert load_model(tmp_path / "run").tta == "flip-translate"
    with pytest.raises(CifarlabError, match="test-time augmentation 'mirror' is not valid; choose none, flip"):
        load_model(tmp_path / "run", tta="mirror")


def _strict_json(path):
    """Parse ``path`` as standard JSON: NaN and Infinity tokens fail."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_audit_of_a_model_that_predicts_one_class_writes_standard_json_and_n_a(trained_run, image_folder, tmp_path,
                                                                             monkeypatch):
    import warnings

    from cifarlab import audit as audit_mod

    ds = load_dataset(image_folder)
    # Every image given to class 0: the other classes' precision, and most calibration bins, are undefined.
    monkeypatch.setattr(audit_mod, "probabilities_and_raw", lambda pred, x: (np.tile([0.9, 0.05, 0.05], (len(x), 1)), None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy warning about all-NaN resamples
        audit_run(trained_run, ds, tmp_path / "audit", n_boot=100, device="cpu", log=lambda s: None)
    a = _strict_json(tmp_path / "audit" / "audit.json")
    rows = {r["class"]: r for r in a["classes"]["per_class"]}
    assert rows[ds.classes[1]]["precision"] is None and rows[ds.classes[1]]["precision_ci"] == [None, None]
    assert rows[ds.classes[0]]["precision"] == pytest.approx(float(np.mean(ds.y_test == 0)))
    _strict_json(tmp_path / "audit" / "model_card.json")
    metrics = _strict_json(tmp_path / "audit" / "metrics.json")
    never = metrics["per_class"][1]  # the evaluation report agrees with the audit (it said 0.0)
    assert never["precision"] is None and never["recall"] == 0.0 and never["f1"] == 0.0
    bins = metrics["calibration"]["bin_accuracy"]
    assert None in bins and any(b is not None for b in bins)
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert f"| {ds.classes[1]} | " in md and "| n/a | n/a |" in md and "nan" not in md.lower()


def test_a_bad_groups_file_stops_the_audit_before_any_prediction_or_file(trained_run, image_folder, tmp_path,
                                                                         monkeypatch):
    from cifarlab import audit as audit_mod

    def must_not_predict(*a, **k):
        raise AssertionError("predicted before checking the groups file")

    monkeypatch.setattr(audit_mod, "probabilities_and_raw", must_not_predict)
    with pytest.raises(CifarlabError, match="cannot read groups file .*missing.csv"):
        audit_run(trained_run, load_dataset(image_folder), tmp_path / "audit", groups_csv=str(tmp_path / "missing.csv"),
                  n_boot=100, device="cpu", log=lambda s: None)
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("data_classes, msg", [
    (["cat", "dog", "emu"], "the data's 3 classes differ from the model's 3 (not among the model's: emu; "
                            "missing from the data: bird)"),
    (["bird", "cat"], "the data's 2 classes differ from the model's 3 (missing from the data: dog)"),
    (["dog", "cat", "bird"], "(the same names in another order: dog, cat, bird against the model's bird, cat, dog)"),
])
def test_evaluation_data_with_other_classes_is_refused_naming_them(data_classes, msg):
    from types import SimpleNamespace

    from cifarlab.evaluate import _check_compatible

    pred = SimpleNamespace(input_shape=(3, 8, 8), classes=["bird", "cat", "dog"])
    ds = SimpleNamespace(x_test=np.zeros((2, 8, 8, 3), np.uint8), classes=data_classes)
    with pytest.raises(CifarlabError) as e:
        _check_compatible(pred, ds)
    assert msg in str(e.value)


def test_audit_of_a_runs_folder_summarises_each_class_and_group_over_the_runs(image_folder, tmp_path, capsys,
                                                                               monkeypatch):
    from conftest import make_image_folder, tiny_config

    from cifarlab.cli import main
    from cifarlab.train import fit

    out = tmp_path / "r"
    fit(tiny_config(str(image_folder), str(out), runs=3), log=lambda s: None)
    # Test images of cat and dog in each other's colours: the models get them wrong, so flags occur.
    swapped = make_image_folder(tmp_path / "swapped", classes=("dog", "cat", "frog"))
    ds = load_dataset(swapped)
    groups = tmp_path / "groups.csv"
    groups.write_text("path,source\n" + "".join(f"{p},{'b' if i < 3 else 'a'}\n" for i, p in enumerate(ds.test_paths)))  # b: the cats
    assert main(["audit", str(out), "--data", str(swapped), "--groups", str(groups), "--bootstrap", "100",
                 "--min-group", "1"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "audit_summary.json").read_text())
    runs = [json.loads((out / f"run-{k}" / "audit" / "audit.json").read_text()) for k in range(3)]
    assert s["runs"] == 3 and all((out / f"run-{k}" / "audit" / "MODEL_CARD.md").is_file() for k in range(3))
    assert [r["overall_accuracy"] for r in s["per_run"]] == [r["overall_accuracy"] for r in runs]
    for i, c in enumerate(s["classes"]["per_class"]):
        accs = [r["classes"]["per_class"][i]["accuracy"] for r in runs]
        assert c["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert (c["accuracy"]["min"], c["accuracy"]["max"]) == (min(accs), max(accs))
        assert c["flagged_in"] == sum(r["classes"]["per_class"][i]["flagged"] for r in runs)
        if c["flagged_in"]:
            assert f"class '{c['class']}' was more than 0.05 below the overall accuracy in {c['flagged_in']} of 3 " \
                   f"runs" in printed
    for j, g in enumerate(s["attributes"]["source"]["groups"]):
        accs = [r["attributes"]["source"]["groups"][j]["accuracy"] for r in runs]
        assert g["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert g["flagged_in"] == sum(r["attributes"]["source"]["groups"][j]["flagged"] for r in runs)
    gap = s["attributes"]["source"]["gap"]
    assert gap["difference"]["max"] == max(r["attributes"]["source"]["gap"]["difference"] for r in runs)
    assert sum(gap["lowest"].values()) == 3 and sum(s["classes"]["spread"]["worst"].values()) == 3
    assert sum(r["flagged_in"] for r in s["classes"]["per_class"]) > 0  # the checks above met a flag
    assert "source=b: more than 0.05 below the overall accuracy in 3 of 3 runs" in printed
    for j, g in enumerate(s["attributes"]["source"]["groups"]):  # each run's confidence minus accuracy, spread
        over = [r["attributes"]["source"]["groups"][j]["overconfidence"] for r in runs]
        assert (g["overconfidence"]["min"], g["overconfidence"]["max"]) == (min(over), max(over))
    cg = s["attributes"]["source"]["confidence_gap"]
    assert sum(cg["most"].values()) == 3 and cg["warned_in"] == sum(
        r["attributes"]["source"]["confidence_gap"]["ci_excludes_zero"]
        and r["attributes"]["source"]["confidence_gap"]["difference"] > 0.05 for r in runs)
    assert "Confidence minus accuracy: largest gap" in (out / "audit_summary.md").read_text()
    assert "3 runs: overall accuracy mean" in printed
    assert "[its audit](run-2/audit/audit.md)" in (out / "audit_summary.md").read_text()
    # their ensemble, the model predict serves for the folder, audited as one run is
    from cifarlab.export import load_ensemble

    e = s["ensemble"]
    yhat = load_ensemble(out).predict(ds.x_test).argmax(1)
    assert e["overall_accuracy"] == pytest.approx(float((yhat == ds.y_test).mean()))
    for i, c in enumerate(e["classes"]["per_class"]):
        right = int(((yhat == i) & (ds.y_test == i)).sum())
        assert c["accuracy"] == pytest.approx(right / 3) and c["accuracy_ci"] == pytest.approx(proportion_ci(right, 3))
        assert c["flagged"] == (c["accuracy"] < e["overall_accuracy"] - 0.05)
    b = [g for g in e["attributes"]["source"]["groups"] if g["group"] == "b"][0]  # the 3 cats
    assert b["n"] == 3 and b["accuracy"] == pytest.approx(float((yhat[:3] == ds.y_test[:3]).mean()))
    assert all(f"class '{c['class']}' accuracy" in " ".join(e["warnings"]) for c in e["classes"]["per_class"]
               if c["flagged"])
    assert f"their ensemble (the mean of their probabilities, as 'cifarlab predict {out}' gives them): overall " \
           f"accuracy {e['overall_accuracy']:.4f}" in printed
    md = (out / "audit_summary.md").read_text()
    assert "## Their ensemble" in md and f"Overall accuracy **{e['overall_accuracy']:.4f}**" in md
    assert "### The ensemble's groups by `source`" in md
    trained = [json.loads((out / f"run-{k}" / "metrics.json").read_text())["data"]["train_per_class"]
               for k in range(3)]
    assert [c["train_images"] for c in s["classes"]["per_class"]] == [[t[c] for t in trained] for c in trained[0]]
    text = (out / "audit_summary.md").read_text()
    assert "| flagged in | training images |" in text
    cat = [t["cat"] for t in trained]
    cat_range = f"{min(cat)}" if min(cat) == max(cat) else f"{min(cat)} to {max(cat)}"
    runs_part = text.split("## Their ensemble")[0]
    cat_rows = [line for line in runs_part.splitlines() if line.startswith("| cat |")]  # accuracy, then confidence
    assert len(cat_rows) == 2 and cat_rows[0].endswith(f" {cat_range} |") and cat_rows[1].endswith(" of 3 |")
    assert (out / "per_class_accuracy.png").is_file()
    # --out: each run's report under OUT/run-K, the summary in OUT, its links relative to it
    assert main(["audit", str(out), "--data", str(swapped), "--bootstrap", "100", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "run-1" / "audit.md").is_file() and "attributes" not in json.loads(
        (tmp_path / "a" / "audit_summary.json").read_text())
    assert "[its audit](run-1/audit.md)" in (tmp_path / "a" / "audit_summary.md").read_text()
    # the about file, the datasheet and the intersections reach every run's card and the summary
    (tmp_path / "about.yaml").write_text("model:\n  developers: Ada Example\n")
    assert main(["datasheet", "--data", str(image_folder), "--out", str(tmp_path / "sheet")]) == 0
    groups.write_text("path,source,half\n" + "".join(f"{p},{'b' if i < 3 else 'a'},{'xy'[i % 2]}\n"
                                                     for i, p in enumerate(ds.test_paths)))
    import cifarlab.about
    import cifarlab.audit
    import cifarlab.datasheet

    reads = []
    for module, name in ((cifarlab.audit, "read_groups"), (cifarlab.about, "read_about"),
                         (cifarlab.datasheet, "read_datasheet")):
        def counted(*a, _f=getattr(module, name), _name=name, **k):
            reads.append(_name)
            return _f(*a, **k)
        monkeypatch.setattr(module, name, counted)
    assert main(["audit", str(out), "--data", str(swapped), "--bootstrap", "100", "--out", str(tmp_path / "c"),
                 "--about", str(tmp_path / "about.yaml"), "--datasheet", str(tmp_path / "sheet"), "--groups",
                 str(groups), "--intersections", "--min-group", "1"]) == 0
    # the groups file read once for the 3 runs and the ensemble; the card files so too, after the
    # command's own check of them before the data is loaded
    assert sorted(reads) == ["read_about"] * 2 + ["read_datasheet"] * 2 + ["read_groups"]
    for k in range(3):
        card = json.loads((tmp_path / "c" / f"run-{k}" / "model_card.json").read_text())
        assert card["model_details"]["developers"] == "Ada Example" and card["training_data"]["datasheet"]
    assert "source & half" in json.loads((tmp_path / "c" / "audit_summary.json").read_text())["attributes"]


def test_summary_of_audits_leaves_a_class_absent_from_the_test_data_undefined():
    from cifarlab.audit import _audit_runs_markdown, summarise_audits

    def audit(acc_a: float, flagged: bool) -> dict:
        rows = [{"class": "a", "support": 5, "accuracy": acc_a, "flagged": flagged},
                {"class": "b", "support": 0, "accuracy": float("nan"), "flagged": False}]
        return {"data": "d", "tta": "none", "margin": 0.05, "bootstrap_resamples": 100, "overall_accuracy": acc_a,
                "warnings": [], "classes": {"per_class": rows, "spread": {
                    "best": "a", "worst": "a", "difference": 0.0, "difference_ci": [0.0, 0.0]}}}

    s = summarise_audits([audit(0.5, True), audit(0.7, False)], ["r0", "r1"])
    a, b = s["classes"]["per_class"]
    assert a["accuracy"]["mean"] == pytest.approx(0.6) and a["flagged_in"] == 1 and b["accuracy"] is None
    assert s["warnings"] == ["class 'a' was more than 0.05 below the overall accuracy in 1 of 2 runs"]
    assert "| b | 0 | n/a | n/a | n/a | n/a | 0 of 2 |" in _audit_runs_markdown(s)


@pytest.mark.parametrize("step", ["evaluate", "audit"])
def test_an_interrupted_report_leaves_no_folder_it_created_and_keeps_an_earlier_report(step, trained_run, image_folder,
                                                                                      tmp_path, monkeypatch):
    import cifarlab.evaluate as ev

    ds = load_dataset(image_folder)
    report = (lambda out: evaluate_run(trained_run, ds, out, device="cpu")) if step == "evaluate" else \
        (lambda out: audit_run(trained_run, ds, out, n_boot=100, device="cpu", log=lambda s: None))
    report(tmp_path / "kept")  # a finished report, rewritten below

    def interrupted(pred, ds, probs, out, n_worst=32, uncalibrated=None):
        (out / "confusion_matrix.csv").write_text("partial")  # some files written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "write_report", interrupted)
    for out in (tmp_path / "new" / "deep", tmp_path / "kept"):
        with pytest.raises(KeyboardInterrupt):
            report(out)
    assert not (tmp_path / "new").exists()  # the folder and the parent it created are gone
    assert (tmp_path / "kept" / ("MODEL_CARD.md" if step == "audit" else "metrics.json")).is_file()


def test_audit_options_are_named_as_the_caller_gave_them(trained_run, image_folder, capsys):
    from cifarlab.cli import main

    ds = load_dataset(image_folder)
    for kw, msg in [({"margin": 1.5}, "margin=1.5 is not valid; it must lie in [0, 1)"),
                    ({"min_group": 0}, "min_group=0 is not valid"),
                    ({"n_boot": 10}, "n_boot=10 is too few resamples")]:
        with pytest.raises(CifarlabError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            audit_run(trained_run, ds, device="cpu", **kw)
    assert not (trained_run / "audit").exists()
    assert main(["audit", str(trained_run), "--margin", "1.5"]) == 2
    assert "--margin 1.5 is not valid" in capsys.readouterr().err


def test_model_card_lines_on_unequal_classes_and_what_made_up_for_them():
    from cifarlab.audit import _balance_lines

    assert _balance_lines({"a": 4, "b": 4}, None) == ["- Training images per class: 4 each"]
    assert _balance_lines({"a": 0, "b": 5, "c": 5}, None)[0].startswith(
        "- Training images per class: from none (a) to 5 (b, c); classes with fewer")
    lines = _balance_lines({"a": 2, "b": 8}, {"setting": {"a": 3.0}, "weights": {"a": 3.0, "b": 1.0}}, "shuffle")
    assert lines[0].startswith("- Training images per class: from 2 (a) to 8 (b), 4.0 times as many;")
    assert lines[1:] == ["- Training loss weighted by class (as set): from 1 (b) to 3 (a)"]
    assert _balance_lines(None, None, "balanced")[0].startswith("- Training images drawn class-balanced")
    assert _balance_lines(None, None, None) == []  # a run that recorded neither


def test_class_confidence_sets_each_predicted_class_s_confidence_against_its_precision():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    y = np.array([0, 1, 0, 1])
    rows = {r["class"]: r for r in class_confidence(probs, y, ["a", "b", "c"])}
    assert rows["a"]["predicted"] == 3 and rows["a"]["mean_confidence"] == pytest.approx(2.3 / 3)
    assert rows["a"]["precision"] == pytest.approx(2 / 3)
    assert rows["a"]["overconfidence"] == pytest.approx(2.3 / 3 - 2 / 3)
    assert rows["b"]["overconfidence"] == pytest.approx(0.7 - 1.0)  # underconfident
    assert rows["c"] == {"class": "c", "predicted": 0, "mean_confidence": None, "precision": None,
                         "overconfidence": None}


def test_audit_reports_confidence_by_predicted_class(trained_run, image_folder, tmp_path):
    ds = load_dataset(image_folder)
    a = audit_run(trained_run, ds, tmp_path / "audit", n_boot=100, device="cpu", log=lambda s: None)
    rows = a["classes"]["confidence"]
    assert sum(r["predicted"] for r in rows) == len(ds.y_test)
    for r, c in zip(rows, a["classes"]["per_class"]):
        assert r["class"] == c["class"] and (r["precision"] is None) == (c["precision"] is None)
        if r["precision"] is not None:
            assert r["precision"] == pytest.approx(c["precision"])
            assert 0 < r["mean_confidence"] <= 1
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "## Confidence by predicted class" in md and f"| {rows[0]['class']} | {rows[0]['predicted']} |" in md


def test_test_score_is_the_cross_entropy_training_reports_also_when_overconfident():
    """evaluate's loss is the cross-entropy of the logits, as training's test loss (and Keras on
    TensorFlow, from the softmax's logits): images whose label has a probability far below 1e-7
    count in full, not clipped; a probability float32 rounds to zero counts as a loss of 87.3."""
    import torch
    import torch.nn.functional as F

    from cifarlab.evaluate import log_loss

    logits = torch.tensor([[30.0, 0.0, -10.0], [0.0, 2.0, 1.0], [-20.0, 25.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 1, 0, 1])
    probs = logits.softmax(1).numpy()
    assert log_loss(probs, y.numpy()) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert log_loss(probs, y.numpy()) > 20  # clipped at 1e-7, the first and third would count 16.1 each
    huge = torch.tensor([[200.0, 0.0]]).softmax(1).numpy()  # the label's probability is 0 in float32
    assert log_loss(huge, np.array([1])) == pytest.approx(-np.log(np.finfo(np.float32).tiny))


def test_intersections_pair_every_two_attributes_and_leave_out_unrecorded_values():
    from cifarlab.audit import with_intersections

    attrs = {"light": np.array(["dark", "bright", "", "dark"], dtype=object),
             "colour": np.array(["grey", "grey", "grey", ""], dtype=object),
             "site": np.array(["x", "y", "x", "y"], dtype=object)}
    out = with_intersections(attrs)
    assert list(out) == ["light", "colour", "site", "light & colour", "light & site", "colour & site"]
    assert out["light & colour"].tolist() == ["dark & grey", "bright & grey", "", ""]
    assert out["colour & site"].tolist() == ["grey & x", "grey & y", "grey & x", ""]
    assert all(out[k] is attrs[k] for k in attrs)  # the attributes themselves are untouched
    with pytest.raises(CifarlabError, match="column named 'light & colour'"):
        with_intersections({**attrs, "light & colour": attrs["site"]})


def test_a_gap_only_a_combination_shows():
    """Right answers in (a, p) and (b, q), wrong ones in (a, q) and (b, p): each attribute alone
    shows no gap, their intersection a gap of 1."""
    from cifarlab.audit import with_intersections

    n = 200
    first = np.array(["a", "b"] * (n // 2), dtype=object)
    second = np.array(["p", "p", "q", "q"] * (n // 4), dtype=object)
    y = np.zeros(n, np.int64)
    pred = np.where((first == "a") == (second == "p"), 0, 1)
    attrs = with_intersections({"first": first, "second": second})
    gaps = {k: group_metrics(y, pred, v, 0.5, 0.05, 30)["gap"]["difference"] for k, v in attrs.items()}
    assert gaps == {"first": 0.0, "second": 0.0, "first & second": 1.0}


def test_audit_with_intersections(trained_run, image_folder, tmp_path, capsys):
    from cifarlab.cli import main

    ds = load_dataset(image_folder)
    n = len(ds.y_test)
    groups = tmp_path / "groups.csv"
    groups.write_text("index,first,second\n" + "".join(f"{i},{'ab'[i % 2]},{'pq'[i // 2 % 2]}\n" for i in range(n)))
    audit = audit_run(trained_run, ds, tmp_path / "audit", groups_csv=str(groups), n_boot=100, device="cpu",
                      log=lambda s: None, intersections=True)
    both = audit["attributes"]["first & second"]
    assert {g["group"]: g["n"] for g in both["groups"]} == {
        f"{x} & {z}": sum('ab'[i % 2] == x and 'pq'[i // 2 % 2] == z for i in range(n)) for x in "ab" for z in "pq"}
    assert "Evaluated group attributes: first, second, first & second" in \
        (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    # the command line: refused without a groups file, and with a file of one attribute, before any file
    assert main(["audit", str(trained_run), "--intersections"]) == 2
    assert "--intersections pairs the attributes of a groups file" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    one.write_text("index,first\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(n)))
    assert main(["audit", str(trained_run), "--groups", str(one), "--intersections", "--out",
                 str(tmp_path / "a2")]) == 2
    assert "has one (first)" in capsys.readouterr().err and not (tmp_path / "a2").exists()


def test_the_model_card_of_classes_that_label_people_says_so(tmp_path, capsys):
    """A model that sorts people (CIFAR-100's man and woman, say) gets that said in its card's
    ethical considerations and on the terminal; its data's consent is left for its owner to state."""
    from conftest import make_image_folder, tiny_config

    from cifarlab.train import fit

    data = make_image_folder(tmp_path / "imgs", classes=("man", "woman", "bicycle"))
    trained: list[str] = []
    fit(tiny_config(str(data), str(tmp_path / "run")), log=trained.append)
    note = next(i for i, ln in enumerate(trained) if ln.startswith("note: the classes man, woman label people"))
    assert note < next(i for i, ln in enumerate(trained) if ln.startswith("Epoch 1/"))  # before training starts
    lines = []
    audit_run(tmp_path / "run", load_dataset(data), tmp_path / "audit", n_boot=100, device="cpu", log=lines.append)
    assert any(ln.startswith("note: the classes man, woman label people by how they look") for ln in lines)
    card = json.loads((tmp_path / "audit" / "model_card.json").read_text())
    ethics = card["ethical_considerations"]
    assert ethics[-1].startswith("The classes man, woman label people") and ethics[-1].endswith("about people.")
    assert any("consented: [TO BE FILLED IN BY THE MODEL'S OWNER]" in e for e in ethics)
    assert not any("were collected without consent" in e for e in ethics)  # not known of this data


def test_the_model_card_of_cifar10s_classes_states_what_is_known_of_the_data(tmp_path):
    from conftest import make_image_folder, tiny_config

    from cifarlab.data.cifar import CIFAR10_CLASSES
    from cifarlab.train import fit

    data = make_image_folder(tmp_path / "imgs", classes=tuple(CIFAR10_CLASSES), n_train=4, n_test=1)
    fit(tiny_config(str(data), str(tmp_path / "run"), epochs=1), log=lambda s: None)
    audit_run(tmp_path / "run", load_dataset(data), tmp_path / "audit", n_boot=100, device="cpu",
              log=lambda s: None, min_group=1)
    card = json.loads((tmp_path / "audit" / "model_card.json").read_text())
    assert card["training_data"]["consent"] == "not obtained: web-scraped images"
    assert card["training_data"]["label_caveats"].startswith("CIFAR-10 labels were assigned")
    assert "'automobile' excludes pickup trucks" in card["training_data"]["label_caveats"]
    assert any("were collected without consent" in e for e in card["ethical_considerations"])
    assert not any("label people" in e for e in card["ethical_considerations"])


def test_the_model_cards_started_from_line_counts_the_test_images_the_starting_weights_learnt_from():
    """A fine-tune's card names the test images its starting weights learnt from, says where
    that is unknown, and says nothing of them for a run of an older cifarlab that did not count."""
    from cifarlab.audit import _started_from_lines

    start = {"run": "src", "model": "keras-deep", "data": "d", "classes": ["cat", "dog"], "fresh": []}
    old = _started_from_lines(start)[0]
    assert old.endswith("(see that run's model card).")
    counted = {**start, "seen_validation_images": 3}
    assert _started_from_lines({**counted, "seen_test_images": 0}) == [old]
    assert _started_from_lines({**counted, "seen_test_images": 2})[0] == old + (
        " 2 of this model's test images have the pixels of an image that run's weights learnt from: the test figures "
        "count them, and may flatter the model.")
    assert _started_from_lines({**start, "seen_validation_images": None, "seen_test_images": None})[0] == old + (
        " That run's record does not tell which images it trained on, so whether this model's test images include "
        "any is unknown.")
