"""cifarlab label-issues: confident learning on a run's test predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cifarlab import label_issues as li
from cifarlab.cli import main
from cifarlab.data import Dataset

# five images, classes 0 and 1 (and 2, which no image has): thresholds 0.7 and 0.8+0.7+0.2 / 3
PROBS = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0], [0.8, 0.2, 0.0]])
LABELS = np.array([0, 0, 1, 1, 1])


def test_thresholds_joint_and_estimate_by_hand():
    t = li.thresholds(PROBS, LABELS)
    assert t[:2] == pytest.approx([0.7, 1.7 / 3]) and np.isnan(t[2])
    conf = li.confident_classes(PROBS, t)
    # image 1 reaches no threshold; image 4, labelled 1, is confidently 0
    assert conf.tolist() == [0, -1, 1, 1, 0]
    c = li.confident_joint(LABELS, conf, 3)
    assert c.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]
    # row 0 scaled to its 2 images stays diagonal; row 1 (3 images, 3 counted): one off the diagonal
    assert li.estimated_issues(c, LABELS) == pytest.approx(1.0)
    found = li.find_issues(PROBS, LABELS)
    assert found["indices"].tolist() == [4] and found["suggested"].tolist() == [0]


def test_several_classes_above_threshold_take_the_most_probable():
    probs = np.array([[0.5, 0.45, 0.05], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    t = np.array([0.4, 0.4, 0.25])
    assert li.confident_classes(probs, t).tolist() == [0, 1, 2, 0]


def test_flagged_images_are_ranked_by_the_given_labels_probability():
    probs = np.array([[0.95, 0.05]] * 4 + [[0.05, 0.95]] * 4 + [[0.96, 0.04], [0.99, 0.01], [0.97, 0.03]])
    labels = np.array([0] * 4 + [1] * 7)  # the last three labelled 1 look like 0
    found = li.find_issues(probs, labels)
    assert found["indices"].tolist() == [9, 10, 8]  # p(given) 0.01, 0.03, 0.04
    assert found["estimated"] == pytest.approx(3.0)


def test_report_files(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ds = Dataset(x[:0], LABELS[:0], x, LABELS, ["cat", "dog", "frog"], "mem", "arrays",
                 test_paths=[f"test/{i}.png" for i in range(5)])
    out = tmp_path / "li"
    r = li.label_issues_report(PROBS, ds, out, ds.classes, about={"run": "stub"})
    assert sorted(p.name for p in out.iterdir()) == r["files"] == ["groups.csv", "label_issues.csv",
                                                                    "label_issues.json", "label_issues.png"]
    assert r["flagged"] == 1 and r["estimated_wrong_labels"] == pytest.approx(1.0)
    # argmax right on images 0 to 3 (image 1's tie goes to its label, 0): 4 of 5; without image 4: 4 of 4
    assert r["accuracy"] == pytest.approx(0.8) and r["accuracy_without_flagged"] == pytest.approx(1.0)
    assert [c["flagged"] for c in r["per_class"]] == [0, 1, 0] and r["per_class"][2]["threshold"] is None
    rows = list(csv.DictReader((out / "label_issues.csv").read_text().splitlines()))
    assert rows == [{"rank": "1", "index": "4", "path": "test/4.png", "given": "dog", "suggested": "cat",
                     "p_given": "0.2", "p_suggested": "0.8", "predicted": "cat"}]
    groups = list(csv.DictReader((out / "groups.csv").read_text().splitlines()))
    assert [g["label_issue"] for g in groups] == ["no", "no", "no", "no", "yes"]
    saved = json.loads((out / "label_issues.json").read_text())
    assert saved["confident_joint"] == [[1, 0, 0], [1, 2, 0], [0, 0, 0]] and saved["run"] == "stub"


def test_label_issues_through_the_cli(trained_run, capsys):
    """The run's own test images; the groups file is one that audit --groups reads."""
    assert main(["label-issues", str(trained_run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    out = trained_run / "label-issues"
    assert r["test_images"] == 9 and r["files"] == sorted(p.name for p in out.iterdir())
    flagged = {row["index"] for row in r["issues"]}
    groups = list(csv.DictReader((out / "groups.csv").read_text().splitlines()))
    assert {int(g["index"]) for g in groups if g["label_issue"] == "yes"} == flagged
    assert main(["audit", str(trained_run), "--groups", str(out / "groups.csv"), "--bootstrap", "100"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "By `label_issue`" in card
    # the card quotes the report measured with these weights and this test-time augmentation
    assert f"Test labels in doubt (`cifarlab label-issues`, confident learning): {r['flagged']:,} of the 9 " in card
    card_json = json.loads((trained_run / "audit" / "model_card.json").read_text())
    assert card_json["metrics"]["label_issues"]["flagged"] == r["flagged"]
    assert main(["audit", str(trained_run), "--tta", "flip", "--bootstrap", "100"]) == 0
    assert "Test labels in doubt" not in (trained_run / "audit" / "MODEL_CARD.md").read_text()
    # a temperature changes the probabilities the thresholds are means of: the report is then another's
    assert main(["calibrate", str(trained_run)]) == 0
    assert main(["audit", str(trained_run), "--bootstrap", "100"]) == 0
    assert "Test labels in doubt" not in (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert main(["label-issues", str(trained_run)]) == 0
    assert main(["audit", str(trained_run), "--bootstrap", "100"]) == 0
    assert "Test labels in doubt" in (trained_run / "audit" / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    assert main(["label-issues", str(trained_run), "--review", "-1"]) == 2
    assert "--review -1 is not valid" in capsys.readouterr().err


def test_label_issues_of_a_runs_folder_use_the_mean_probabilities(image_folder, tmp_path, capsys):
    """A --runs N folder: one report, on the mean of the runs' probabilities, in OUT/label-issues."""
    from conftest import tiny_config

    from cifarlab.export import load_model
    from cifarlab.train import fit

    base = tmp_path / "set"
    fit(tiny_config(str(image_folder), str(base), runs=2), log=lambda s: None)
    assert main(["label-issues", str(base), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (base / "label-issues" / "label_issues.json").is_file()
    assert r["runs"] == [str(base / "run-0"), str(base / "run-1")] and len(r["per_run_accuracy"]) == 2
    from cifarlab.data import load_dataset

    ds = load_dataset(str(image_folder))
    mean = np.mean([load_model(base / f"run-{k}").predict(ds.x_test) for k in range(2)], 0)
    assert r["flagged"] == len(li.find_issues(mean, ds.y_test)["indices"])
    assert r["accuracy"] == pytest.approx(float((mean.argmax(1) == ds.y_test).mean()))
    assert "weights_sha256" not in r  # no run's model card quotes the runs' ensemble
    assert main(["label-issues", str(base)]) == 0
    assert "from the mean of the probabilities of 2 runs" in capsys.readouterr().out
    assert main(["label-issues", str(base), "--split", "val"]) == 2
    assert f"--split val takes one run, whose validation images are its own; give one of the runs of '{base}'" \
        in capsys.readouterr().err


def test_label_issues_of_the_validation_images(trained_run, image_folder, tmp_path, capsys):
    """--split val: the run's validation images (training data it never trained on), in the
    order the run holds them out, into RUN/label-issues-val; refused where it held none out."""
    from conftest import tiny_config

    from cifarlab.data import load_dataset
    from cifarlab.export import load_model
    from cifarlab.train import fit, run_split

    assert main(["label-issues", str(trained_run), "--split", "val", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    ds = load_dataset(str(image_folder))
    _, _, va = run_split(trained_run, ds)
    assert r["test_origin"] == "validation" and r["test_images"] == len(va) > 0
    rows = list(csv.DictReader((trained_run / "label-issues-val" / "groups.csv").read_text().splitlines()))
    assert len(rows) == len(va)
    probs = load_model(trained_run).predict(ds.x_train[va])
    assert r["flagged"] == len(li.find_issues(probs, ds.y_train[va])["indices"])
    assert all(row["path"].startswith("train/") for row in r["issues"])
    assert not (trained_run / "label-issues").exists()  # the test images' report is another

    no_val = tmp_path / "noval"
    cfg = tiny_config(str(image_folder), str(no_val))
    cfg.data.val_split = 0.0
    fit(cfg, log=lambda s: None)
    assert main(["label-issues", str(no_val), "--split", "val"]) == 2
    assert "held out no validation images" in capsys.readouterr().err
    other = tmp_path / "other-data"
    from conftest import make_image_folder

    make_image_folder(other, seed=3, n_train=4)
    assert main(["label-issues", str(trained_run), "--split", "val", "--data", str(other)]) == 2
    assert "not the data" in capsys.readouterr().err


def test_no_test_images_is_refused(tmp_path):
    from cifarlab.errors import CifarlabError

    x = np.zeros((0, 8, 8, 3), np.uint8)
    ds = Dataset(x, LABELS[:0], x, LABELS[:0], ["cat", "dog", "frog"], "empty", "arrays")
    with pytest.raises(CifarlabError, match="empty has no test images to doubt the labels of"):
        li.label_issues_report(np.zeros((0, 3)), ds, tmp_path / "li", ds.classes)
    assert not (tmp_path / "li").exists()


def test_many_classes_print_the_most_flagged():
    per_class = [{"class": f"c{k}", "flagged": k % 7} for k in range(100)]
    line = li._by_class(per_class)
    assert line.startswith("c6 6, c13 6, ") and line.count(",") == 19
    # 295 flags in all; the 20 shown hold 14 x 6 + 6 x 5 = 114
    assert line.endswith("; the other 80 classes 181 (label_issues.json lists each)")
    assert li._by_class(per_class[:3]) == "c0 0, c1 1, c2 2"


def test_a_report_that_flags_most_images_says_the_flags_are_the_models():
    """Labels cannot be mostly wrong in data a model learns from: where more than half the images
    are flagged, the terminal report warns that the flags are mostly the model's own mistakes."""
    r = {"test_images": 10, "estimated_wrong_labels": 6.0, "accuracy": 0.3, "accuracy_without_flagged": 0.75,
         "per_class": [{"class": "cat", "flagged": 6}], "issues": []}
    text = li.format_report({**r, "flagged": 6}, Path("out"))
    assert ("warning: more than half the test images are flagged: a data set whose labels were mostly wrong could "
            "not be learnt at all, so most of these flags are the model's own mistakes (accuracy 0.3000)") in text
    assert "warning" not in li.format_report({**r, "flagged": 5}, Path("out"))
