from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, tiny_config

from cifarlab.cli import main
from cifarlab.compare import compare_predictions, holm, mcnemar_exact
from cifarlab.errors import CifarlabError
from cifarlab.train import fit


def _exact_two_sided(k: int, n: int) -> float:
    """The exact binomial two-sided p-value at p = 1/2, summed by hand."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_mcnemar_and_holm_match_their_definitions():
    for a, b in [(0, 0), (3, 3), (1, 9), (30, 12), (200, 250)]:
        assert mcnemar_exact(a, b) == pytest.approx(_exact_two_sided(b, a + b), rel=1e-9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> made non-decreasing
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _delong_by_definition(xa, ya, xb, yb):
    """DeLong's test from its definition: each image's placement values from every in-out pair
    (a tie counts one half), their covariances across the two scores, and the normal p-value."""
    from scipy.stats import norm

    def placements(x, y):
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        return psi.mean(1), psi.mean(0)

    (va10, va01), (vb10, vb01) = placements(xa, ya), placements(xb, yb)
    s10, s01 = np.cov([va10, vb10]), np.cov([va01, vb01])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / len(xa) + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / len(ya)
    diff = vb10.mean() - va10.mean()
    return va10.mean(), vb10.mean(), np.sqrt(var), 2 * norm.sf(abs(diff) / np.sqrt(var))


def test_delongs_test_matches_its_definition_and_the_auroc():
    from sklearn.metrics import roc_auc_score

    from cifarlab.compare import delong

    rng = np.random.default_rng(0)
    for m, n, levels in [(40, 30, 1000), (25, 60, 4)]:  # the second with many ties
        xa, ya = rng.integers(0, levels, m) + 1.0, rng.integers(0, levels, n) * 1.0
        xb, yb = xa + rng.normal(0, levels / 4, m), ya + rng.normal(0, levels / 2, n)  # the same images, noisier
        d = delong(xa, ya, xb, yb)
        a, b, se, p = _delong_by_definition(xa, ya, xb, yb)
        assert (d["auroc_a"], d["auroc_b"], d["se"], d["p_value"]) == pytest.approx((a, b, se, p), rel=1e-9)
        assert d["auroc_a"] == pytest.approx(roc_auc_score(np.r_[np.ones(m), np.zeros(n)], np.r_[xa, ya]))
        assert d["difference"] == pytest.approx(b - a)
    same = delong(xa, ya, xa, ya)
    assert same["difference"] == 0 and same["se"] == 0 and same["p_value"] == 1.0
    # a score that tells them apart against one that does not: far apart, on 200 images each
    x, y = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    assert delong(rng.normal(0, 1, 200), rng.normal(0, 1, 200), x, y)["p_value"] < 1e-6
    with pytest.raises(CifarlabError, match="needs the same images under both scores, got 200 and 3 in"):
        delong(x, y, x[:3], y)
    # a p-value below a double's range prints as a bound, not as 0
    from cifarlab.compare import _paired_ood_lines

    row = {"set": "uniform", "images": 9, "auroc_a": 0.5, "auroc_b": 0.9, "difference": 0.4, "se": 0.001,
           "p_value_holm": 0.0}
    lines = _paired_ood_lines({"score": "energy", "test_images": 9, "sets": [row], "unpaired": {"a": [], "b": []}},
                              0.05)
    assert lines[1] == "  uniform (9 images): A 0.5000, B 0.9000, B - A +0.4000 (standard error 0.0010), p (Holm) " \
                       "< 1e-300 *"


def test_paired_comparison_counts_and_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    a = y.copy()
    a[:150] = (y[:150] + 1) % 3  # A wrong on the first 150 images
    b = y.copy()
    b[100:160] = (y[100:160] + 1) % 3  # B wrong on 60, 50 of them where A is wrong too
    c = compare_predictions(y, a, b, ["x", "y", "z"], n_boot=400, seed=1)
    assert (c["both_right"], c["only_a"], c["only_b"], c["both_wrong"]) == (440, 10, 100, 50)
    assert c["accuracy_a"] == pytest.approx(450 / 600) and c["accuracy_b"] == pytest.approx(540 / 600)
    assert c["difference"] == pytest.approx(90 / 600)
    lo, hi = c["difference_ci"]
    assert 0 < lo < c["difference"] < hi
    assert c["p_value"] == pytest.approx(_exact_two_sided(10, 110)) and c["p_value"] < 1e-15
    assert sum(r["support"] for r in c["per_class"]) == 600
    assert sum(r["only_b"] for r in c["per_class"]) == 100
    for r in c["per_class"]:
        assert r["p_value_holm"] >= r["p_value"]
    assert c == compare_predictions(y, a, b, ["x", "y", "z"], n_boot=400, seed=1)  # seeded
    light = np.array(["dark"] * 300 + ["bright"] * 250 + [""] * 50, dtype=object)
    g = compare_predictions(y, a, b, ["x", "y", "z"], n_boot=100, groups=(np.arange(600), {"light": light}))
    by = g["by_attribute"]["light"]
    assert by["not_recorded"] == 50 and [r["group"] for r in by["groups"]] == ["bright", "dark"]
    bright, dark = by["groups"]
    assert (dark["support"], dark["accuracy_a"], dark["accuracy_b"]) == (300, 0.5, 0.8)
    assert (dark["only_a"], dark["only_b"], dark["both_wrong"]) == (10, 100, 50)
    assert (bright["support"], bright["accuracy_a"], bright["accuracy_b"], bright["only_b"]) == (250, 1.0, 1.0, 0)
    assert bright["p_value"] == 1.0 and dark["p_value_holm"] == pytest.approx(2 * _exact_two_sided(10, 110))
    same = compare_predictions(y, a, a, ["x", "y", "z"], n_boot=100)
    assert same["difference"] == 0 and same["difference_ci"] == [0, 0] and same["p_value"] == 1.0
    assert same["agreement"] == 1.0
    with pytest.raises(CifarlabError, match="n_boot=50 is too few"):  # named as the Python caller gave it
        compare_predictions(y, a, b, ["x", "y", "z"], n_boot=50)


def test_cli_compare_two_runs(tmp_path, image_folder, capsys):
    for seed in (0, 1):
        fit(tiny_config(str(image_folder), str(tmp_path / f"r{seed}"), seed=seed), log=lambda s: None)
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "McNemar's exact test: p = " in out and "B - A: " in out and "frog" in out
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--json", "--tta", "flip"]) == 0
    c = json.loads(capsys.readouterr().out)
    evaluated = [json.loads((tmp_path / r / "metrics.json").read_text())["test_accuracy"] for r in ("r0", "r1")]
    assert c["images"] == 9 and c["a"]["tta"] == c["b"]["tta"] == "flip"
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert [c["accuracy_a"], c["accuracy_b"]] == pytest.approx(evaluated)  # each run's own figure
    assert c["both_right"] + c["only_a"] + c["only_b"] + c["both_wrong"] == 9

    groups = tmp_path / "groups.csv"
    groups.write_text("index,light\n" + "".join(f"{i},{'dark' if i < 4 else 'bright' if i < 8 else ''}\n"
                                                  for i in range(9)))
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--groups", str(groups)]) == 0
    out = capsys.readouterr().out
    assert "Attribute 'light' (not recorded for 1 image, left out):" in out and "dark" in out
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--groups", str(groups), "--json"]) == 0
    by = json.loads(capsys.readouterr().out)["by_attribute"]["light"]
    assert [(r["group"], r["support"]) for r in by["groups"]] == [("bright", 4), ("dark", 4)]
    groups.write_text("index,light,site\n" + "".join(f"{i},{'dark' if i < 4 else 'bright'},{'xy'[i % 2]}\n"
                                                       for i in range(9)))
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--groups", str(groups), "--json",
                 "--intersections"]) == 0
    by = json.loads(capsys.readouterr().out)["by_attribute"]
    assert list(by) == ["light", "site", "light & site"]
    assert [(r["group"], r["support"]) for r in by["light & site"]["groups"]] == [
        ("bright & x", 3), ("bright & y", 2), ("dark & x", 2), ("dark & y", 2)]
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--intersections"]) == 2
    assert "--intersections pairs the attributes of a groups file" in capsys.readouterr().err
    groups.write_text("index,light\n99,dark\n")
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--groups", str(groups)]) == 2
    assert "index '99' is not valid; expected 0..8" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "r1"), "--bootstrap", "10"]) == 2
    assert "--bootstrap 10 is too few" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "nope")]) == 2
    assert "nope' does not exist" in capsys.readouterr().err
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog", "owl"))
    fit(tiny_config(str(other), str(tmp_path / "owl")), log=lambda s: None)
    assert main(["compare", str(tmp_path / "r0"), str(tmp_path / "owl")]) == 2
    err = capsys.readouterr().err
    assert "cannot be compared: their models have 3 and 3 classes, 2 of them in one only (cat, dog, frog " \
           "against cat, dog, owl)" in err
    shutil.copytree(tmp_path / "owl", tmp_path / "owl2")  # the same weights in another folder
    assert main(["compare", str(tmp_path / "owl"), str(tmp_path / "owl2"), "--json"]) == 0  # on run A's data
    assert json.loads(capsys.readouterr().out)["p_value"] == 1.0
    assert main(["compare", str(tmp_path / "owl"), str(tmp_path / "owl2"), "--data", str(image_folder)]) == 2
    err = capsys.readouterr().err
    assert f"run A ('{tmp_path / 'owl'}'): the data's 3 classes differ" in err and "missing from the data: owl" in err


def _welch_p(a: list[float], b: list[float]) -> float:
    """Welch's two-sided p-value from its formula (t and Welch-Satterthwaite degrees of freedom)."""
    from scipy.stats import t as student_t

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(b) - np.mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(2 * student_t.sf(abs(t), df))


def test_compare_two_runs_folders_from_their_summaries(tmp_path, image_folder, capsys):
    for name, model in (("a", "keras-shallow"), ("b", "keras-deep")):
        cfg = tiny_config(str(image_folder), str(tmp_path / name))
        cfg.model.name, cfg.train.runs = model, 3
        fit(cfg, log=lambda s: None)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    acc = {k: [r["test_accuracy"] for r in json.loads((tmp_path / k / "runs_summary.json").read_text())["per_run"]]
           for k in "ab"}
    assert c["a"]["accuracies"] == acc["a"] and c["b"]["runs"] == 3 and c["same_data"]
    assert c["difference"] == pytest.approx(np.mean(acc["b"]) - np.mean(acc["a"]))
    if np.std(acc["a"]) + np.std(acc["b"]) > 0:
        assert c["p_value"] == pytest.approx(_welch_p(acc["a"], acc["b"]))
    per_class = {k: [json.loads((tmp_path / k / f"run-{i}" / "metrics.json").read_text())["per_class_accuracy"]
                     for i in range(3)] for k in "ab"}
    assert [r["class"] for r in c["per_class"]] == list(per_class["a"][0])  # each class, from each run's metrics
    for r in c["per_class"]:
        xa, xb = ([m[r["class"]] for m in per_class[k]] for k in "ab")
        assert (r["mean_a"], r["mean_b"]) == (pytest.approx(np.mean(xa)), pytest.approx(np.mean(xb)))
        if np.std(xa) + np.std(xb) > 0:
            assert r["p_value"] == pytest.approx(_welch_p(xa, xb))
    assert [r["p_value_holm"] for r in c["per_class"]] == holm([r["p_value"] for r in c["per_class"]])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "3 runs, test accuracy mean" in out and "Welch's t-test on the runs' accuracies: p = " in out
    ens = {k: json.loads((tmp_path / k / "runs_summary.json").read_text())["ensemble"]["test_accuracy"] for k in "ab"}
    assert (f"Their ensembles (the mean of each folder's runs' probabilities, uncalibrated, as training tested them): "
            f"A {ens['a']:.4f}, B {ens['b']:.4f}, B - A {ens['b'] - ens['a']:+.4f}; not tested here, as a "
            f"difference of two models: cifarlab compare {tmp_path / 'a'} {tmp_path / 'b'} --ensembles tests it image "
            "by image") in out
    assert "A mean  B mean    B - A  p (Holm)" in out and "after Holm's correction over the classes" in out
    assert "Under corruption" not in out  # neither folder measured
    # under corruption: once both folders were measured on the same images, Welch's test on the runs' means
    rob = ["--data", str(image_folder), "--corruptions", "contrast,fog", "--severities", "2", "--device", "cpu"]
    assert main(["robustness", str(tmp_path / "a"), *rob]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert f"Under corruption: not compared; only one folder was measured under corruption; run: cifarlab " \
           f"robustness {tmp_path / 'b'}" in capsys.readouterr().out
    assert main(["robustness", str(tmp_path / "b"), *rob]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["robustness"]
    means = {k: [json.loads((tmp_path / k / f"run-{i}" / "robustness" / "robustness.json").read_text())[
        "mean_accuracy"] for i in range(3)] for k in "ab"}
    assert r["difference"] == pytest.approx(np.mean(means["b"]) - np.mean(means["a"]))
    if np.std(means["a"]) + np.std(means["b"]) > 0:
        assert r["p_value"] == pytest.approx(_welch_p(means["a"], means["b"]))
    summary_b = tmp_path / "b" / "robustness_summary.json"
    s = json.loads(summary_b.read_text())
    summary_b.write_text(json.dumps(s | {"severities": [3]}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "measured under corruption with different severities" in capsys.readouterr().out
    s["per_run"][1]["weights_sha256"] = "0" * 64  # as if run-1 trained on after it was measured
    summary_b.write_text(json.dumps(s))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "changed after cifarlab robustness measured them; measure again" in capsys.readouterr().out
    # against unfamiliar images: Welch's test on the runs' AUROC for each set, where both were measured alike
    ood = ["synthetic:uniform", "synthetic:blank", "--data", str(image_folder), "--count", "5", "--knn-bank", "0",
           "--device", "cpu"]
    assert main(["ood", str(tmp_path / "a"), *ood]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert (f"Unfamiliar images: not compared; only one folder was measured against unfamiliar images; run: "
            f"cifarlab ood {tmp_path / 'b'}") in capsys.readouterr().out
    assert main(["ood", str(tmp_path / "b"), *ood]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    u = json.loads(capsys.readouterr().out)["unfamiliar_images"]
    assert u["score"] == "energy" and [r["set"] for r in u["sets"]] == ["uniform", "blank"]
    aurocs = {k: [[json.loads((tmp_path / k / f"run-{i}" / "ood" / "ood.json").read_text())["sets"][j]["energy"][
        "auroc"] for i in range(3)] for j in range(2)] for k in "ab"}
    for j, r in enumerate(u["sets"]):
        assert r["difference"] == pytest.approx(np.mean(aurocs["b"][j]) - np.mean(aurocs["a"][j]))
        assert r["a"]["min"] == min(aurocs["a"][j]) and r["b"]["max"] == max(aurocs["b"][j])
        if np.std(aurocs["a"][j]) + np.std(aurocs["b"][j]) > 0:
            assert r["p_value"] == pytest.approx(_welch_p(aurocs["a"][j], aurocs["b"][j]))
    assert [r["p_value_holm"] for r in u["sets"]] == holm([r["p_value"] for r in u["sets"]])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "Unfamiliar images (cifarlab ood, energy AUROC over the runs, mean (min to max), the same images): " \
           "uniform: A " in capsys.readouterr().out
    assert main(["ood", str(tmp_path / "b"), *ood, "--seed", "3"]) == 0  # the same sources, other images
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "measured against unfamiliar images with different sets (sources, counts or --seed)" in \
        capsys.readouterr().out
    ext = tmp_path / "ext"  # a set whose --resume OUT --epochs 2 is under way: its config says 2, its runs 1
    shutil.copytree(tmp_path / "a", ext)
    (ext / "config.yaml").write_text((ext / "config.yaml").read_text().replace("epochs: 1\n", "epochs: 2\n"))
    assert main(["compare", str(ext), str(tmp_path / "b")]) == 2
    assert f"'{ext}' has runs that have not trained all 2 epochs (run-0, run-1, run-2)" in capsys.readouterr().err

    # By hand: summaries with known accuracies, another data path, a single run, a mix, a stopped set.
    def summary(folder, accs, data="d"):
        folder.mkdir()
        (folder / "runs_summary.json").write_text(json.dumps({"recipe": "r", "model": "m", "data": data, "per_run": [
            {"seed": i, "test_accuracy": x, "train_time_s": 2.0} for i, x in enumerate(accs)]}))
        return str(folder)

    x = summary(tmp_path / "x", [0.90, 0.91, 0.92])
    y = summary(tmp_path / "y", [0.93, 0.95, 0.94, 0.96], data="/elsewhere/d")
    assert main(["compare", x, y]) == 0
    out = capsys.readouterr().out
    p = _welch_p([0.90, 0.91, 0.92], [0.93, 0.95, 0.94, 0.96])
    assert f"p = {p:.3g}; B is the more accurate recipe" in out and "B - A: +0.0350" in out
    assert "Note: A was tested on d and B on /elsewhere/d" in out
    assert "Their ensembles" not in out  # summaries without them, as an older cifarlab wrote
    assert f"Per class: not compared; '{x}' has no run-K/metrics.json files" in out  # summaries alone

    def with_classes(folder, per_run):  # each run's metrics.json with these per-class accuracies
        for i, accuracies in enumerate(per_run):
            (Path(folder) / f"run-{i}").mkdir()
            (Path(folder) / f"run-{i}" / "metrics.json").write_text(json.dumps({"per_class_accuracy": accuracies}))
        return folder

    cats_a, cats_b = [0.5, 0.6, 0.7], [0.8, 0.9, 0.85]
    ka = with_classes(summary(tmp_path / "ka", [0.7, 0.75, 0.8]),
                      [{"cat": v, "dog": 0.9, "emu": None} for v in cats_a])
    kb = with_classes(summary(tmp_path / "kb", [0.85, 0.9, 0.875]),
                      [{"cat": v, "dog": 0.9, "emu": None} for v in cats_b])
    assert main(["compare", ka, kb, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["per_class"]
    assert [r["class"] for r in rows] == ["cat", "dog"]  # emu: absent from the test data, no accuracy to test
    assert rows[0]["p_value"] == pytest.approx(_welch_p(cats_a, cats_b)) and rows[1]["p_value"] == 1.0
    assert rows[0]["p_value_holm"] == pytest.approx(min(1.0, 2 * rows[0]["p_value"]))
    other = with_classes(summary(tmp_path / "other", [0.9, 0.8]), [{"cat": 0.9, "owl": 0.8}] * 2)
    assert main(["compare", ka, other]) == 0
    assert "Per class: not compared; the two sets have other classes" in capsys.readouterr().out
    assert main(["compare", x, y, "--data", "d", "--bootstrap", "100", "--tta"]) == 2
    assert "--data, --bootstrap, --tta: two --runs folders are compared from their summaries" in \
        capsys.readouterr().err
    assert main(["compare", x, y, "--labels", "l.csv"]) == 2  # every data option, the labels file's too
    assert "--labels: two --runs folders are compared from their summaries" in capsys.readouterr().err
    assert main(["compare", x, y, "--bootstrap", "0"]) == 2  # a value of 0 is given too, not left out
    assert "--bootstrap: two --runs folders are compared from their summaries" in capsys.readouterr().err
    assert main(["compare", x, summary(tmp_path / "one", [0.9])]) == 2
    assert "holds 1 run; a test across runs needs at least 2" in capsys.readouterr().err
    assert main(["compare", x, str(tmp_path / "a" / "run-0")]) == 2  # beside a run, a set is its ensemble: its runs
    assert f"'{x}' holds no runs of 'cifarlab train --runs' (run-K folders" in capsys.readouterr().err
    (tmp_path / "stopped" / "run-0").mkdir(parents=True)
    assert main(["compare", str(tmp_path / "stopped"), x]) == 2
    err = capsys.readouterr().err
    assert "has no runs_summary.json" in err and f"cifarlab train --resume {tmp_path / 'stopped'}" in err
    same = summary(tmp_path / "same", [0.9, 0.9]), summary(tmp_path / "same2", [0.9, 0.9])
    assert main(["compare", *same, "--json"]) == 0  # no spread at all: Welch's test is undefined, p taken as 1
    assert json.loads(capsys.readouterr().out)["p_value"] == 1.0
    assert main(["compare", same[0], same[0]]) == 2  # one folder twice: nothing to test
    assert "are the same folder; give two runs (or two --runs folders) to compare" in capsys.readouterr().err


def test_a_runs_folders_ensemble_is_compared_as_one_model(tmp_path, image_folder, capsys):
    """Beside a single run, a --runs N folder is compared as its ensemble (the model predict
    serves for it), image by image; two such folders likewise with --ensembles. --ensembles
    without such a folder is refused."""
    from cifarlab.data import load_dataset
    from cifarlab.export import load_ensemble, load_model

    base, single = tmp_path / "set", tmp_path / "one"
    fit(tiny_config(str(image_folder), str(base), runs=2), log=lambda s: None)
    fit(tiny_config(str(image_folder), str(single), seed=5), log=lambda s: None)
    assert main(["compare", str(single), str(base), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    ds = load_dataset(image_folder)
    ok_a = load_model(single).predict(ds.x_test).argmax(1) == ds.y_test
    ok_b = load_ensemble(base).predict(ds.x_test).argmax(1) == ds.y_test
    assert (c["accuracy_a"], c["accuracy_b"]) == (pytest.approx(ok_a.mean()), pytest.approx(ok_b.mean()))
    assert (c["only_a"], c["only_b"]) == (int((ok_a & ~ok_b).sum()), int((ok_b & ~ok_a).sum()))
    assert c["a"]["runs"] == 0 and c["b"] == {"run": str(base), "model": "ensemble of 2 keras-shallow runs",
                                              "tta": "none", "runs": 2, "balanced_classes": False}
    shutil.copytree(base, tmp_path / "set2")  # the same ensemble in another folder: no image differs
    assert main(["compare", str(base), str(tmp_path / "set2"), "--ensembles"]) == 0
    out = capsys.readouterr().out
    assert f"A: {base} (ensemble of 2 keras-shallow runs, tta none): test accuracy {ok_b.mean():.4f}" in out
    assert "only A 0, only B 0" in out and "McNemar's exact test: p = 1" in out
    assert main(["compare", str(single), str(base / "run-0"), "--ensembles"]) == 2
    assert "--ensembles compares the ensembles of --runs N folders, and neither" in capsys.readouterr().err

    # how well each tells unfamiliar images from its test images: DeLong's paired test, where cifarlab ood
    # measured both on the same images
    from cifarlab.compare import delong

    assert c["unfamiliar_images"] is None  # measured on neither
    sets = ["synthetic:uniform", "synthetic:blank", "--count", "6", "--knn-bank", "0"]
    assert main(["ood", str(single), *sets]) == 0
    capsys.readouterr()
    assert main(["compare", str(single), str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unfamiliar_images"] == {
        "note": f"B has no report of cifarlab ood measured as it is now; run: cifarlab ood {base}"}
    assert main(["ood", str(base), *sets]) == 0
    capsys.readouterr()
    assert main(["compare", str(single), str(base), "--json"]) == 0
    u = json.loads(capsys.readouterr().out)["unfamiliar_images"]
    ra = json.loads((single / "ood" / "ood.json").read_text())
    rb = json.loads((base / "ood_summary.json").read_text())["ensemble"]
    sa, sb = np.load(single / "ood" / "scores.npz"), np.load(base / "ood_ensemble_scores.npz")
    assert u["score"] == "energy" and u["test_images"] == 9 and u["unpaired"] == {"a": [], "b": []}
    for i, (r, name) in enumerate(zip(u["sets"], ["uniform", "blank"])):
        assert r["set"] == name and r["images"] == 6
        assert (r["auroc_a"], r["auroc_b"]) == pytest.approx((ra["sets"][i]["energy"]["auroc"],
                                                               rb["sets"][i]["energy"]["auroc"]))
        assert r["p_value"] == pytest.approx(delong(sa["in_energy"], sa[f"set{i}_energy"], sb["in_energy"],
                                                    sb[f"set{i}_energy"])["p_value"])
    assert main(["compare", str(single), str(base)]) == 0
    out = capsys.readouterr().out
    assert "Unfamiliar images (cifarlab ood, energy score): AUROC of telling each set from the 9 test images" in out
    assert f"  uniform (6 images): A {u['sets'][0]['auroc_a']:.4f}, B {u['sets'][0]['auroc_b']:.4f}, B - A " in out
    # other images in each set (another --seed) are not paired; another score is not compared
    assert main(["ood", str(base), *sets, "--seed", "5"]) == 0
    capsys.readouterr()
    assert main(["compare", str(single), str(base)]) == 0
    assert ("not compared, each scored on other images (another --seed, --count or source): A's uniform, blank; "
            "B's uniform, blank") in capsys.readouterr().out
    assert main(["ood", str(base), *sets, "--score", "msp"]) == 0
    capsys.readouterr()
    assert main(["compare", str(single), str(base)]) == 0
    assert ("Unfamiliar images: not compared; A was measured with the energy score and B with msp; measure both "
            "with the same --score") in capsys.readouterr().out
    assert main(["compare", str(single), str(base), "--tta", "flip"]) == 0  # measured without it, both
    assert ("Unfamiliar images: not compared; neither has a report of cifarlab ood measured as it is compared here "
            f"(its weights, calibration and test-time augmentation); run: cifarlab ood {single}, cifarlab ood {base}") \
        in capsys.readouterr().out
