"""cifarlab ood: scores, separation figures, synthetic sets, the report, predict's flag and the card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import ood
from cifarlab.cli import main
from cifarlab.errors import CifarlabError


def test_scores_match_their_definitions():
    z = np.random.default_rng(0).normal(0, 3, (7, 5))
    s = ood.scores(z)
    t = torch.tensor(z)
    assert s["energy"] == pytest.approx(torch.logsumexp(t, 1).numpy())
    assert s["msp"] == pytest.approx(t.softmax(1).max(1).values.numpy())
    assert s["maxlogit"] == pytest.approx(z.max(1))
    # large logits overflow a naive exp: the logsumexp stays finite
    big = ood.scores(np.array([[1000.0, 999.0]]))
    assert big["energy"][0] == pytest.approx(1000 + np.log1p(np.exp(-1.0))) and np.isfinite(big["msp"]).all()


def test_separation_by_hand():
    r = ood.separation(np.array([3.0, 4, 5]), np.array([0.0, 1, 3.5]))
    assert r["auroc"] == pytest.approx(8 / 9)  # of the 9 pairs, only (3, 3.5) is ranked wrongly
    # keeping all 3 in images (2 of 3 is under 95%) needs the threshold 3, which lets 3.5 through
    assert r["fpr_at_95_tpr"] == pytest.approx(1 / 3)
    perfect = ood.separation(np.array([2.0, 3]), np.array([0.0, 1]))
    assert perfect == {"auroc": 1.0, "fpr_at_95_tpr": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    upside = ood.separation(np.array([0.0, 1]), np.array([2.0, 3]))
    assert upside["auroc"] == 0.0 and upside["fpr_at_95_tpr"] == 1.0
    with pytest.raises(CifarlabError, match="both kinds"):
        ood.separation(np.array([1.0]), np.array([]))


@pytest.mark.parametrize("n, expected", [(100, 5.0), (20, 1.0), (19, 0.0), (1, 0.0)])
def test_threshold_keeps_at_least_95_percent_and_no_more_than_it_must(n, expected):
    s = np.random.default_rng(n).permutation(np.arange(n, dtype=float))
    t = ood.threshold(s)
    assert t == expected and (s >= t).mean() >= 0.95
    with pytest.raises(CifarlabError, match="none"):
        ood.threshold(np.array([]))
    assert ood.threshold(np.arange(100.0), 0.5) == 50.0 and ood.threshold(np.arange(100.0), 0.99) == 1.0


def test_synthetic_sets():
    like = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    for name in ood.SYNTHETIC:
        x = ood.synthetic_images(name, 5, (8, 8, 3), seed=3, like=like)
        assert x.shape == (5, 8, 8, 3) and x.dtype == np.uint8
        assert np.array_equal(x, ood.synthetic_images(name, 5, (8, 8, 3), seed=3, like=like))  # seeded
    blank = ood.synthetic_images("blank", 4, (8, 8, 3))
    assert (blank == blank[:, :1, :1]).all() and len({tuple(b[0, 0]) for b in blank}) == 4
    shuffled = ood.synthetic_images("shuffled", 5, (8, 8, 3), like=like)
    for a, b in zip(shuffled, like):  # each image's pixels, rearranged
        assert sorted(map(tuple, a.reshape(-1, 3))) == sorted(map(tuple, b.reshape(-1, 3)))
        assert not np.array_equal(a, b)
    gauss = ood.synthetic_images("gaussian", 200, (8, 8, 3))
    # sd 1 around 0.5, clipped: about 31% of the values on each bound
    assert 0.25 < (gauss == 0).mean() < 0.37 and 0.25 < (gauss == 255).mean() < 0.37
    with pytest.raises(CifarlabError, match="needs 5 images"):
        ood.synthetic_images("shuffled", 5, (8, 8, 3), like=like[:2])


def test_sources_are_checked_before_any_data(tmp_path):
    ood.check_sources(["synthetic:gaussian", str(tmp_path)])
    with pytest.raises(CifarlabError, match="unknown synthetic set 'synthetic:static'.*synthetic:gaussian"):
        ood.check_sources(["synthetic:static"])
    with pytest.raises(CifarlabError, match="'synthetic:gausian' \\(did you mean 'synthetic:gaussian'\\?\\)"):
        ood.check_sources(["synthetic:gausian"])
    with pytest.raises(CifarlabError, match="'nowhere' does not exist"):
        ood.check_sources(["nowhere"])
    with pytest.raises(CifarlabError, match="--score 'odin' is not valid; choose from energy, msp, maxlogit"):
        ood.check_score("odin")
    with pytest.raises(CifarlabError, match="--score 'enegry' is not valid \\(did you mean 'energy'\\?\\)"):
        ood.check_score("enegry")


class _Bright:
    """A predictor stand-in whose confidence grows with an image's brightness: bright images
    are its familiar kind, dark ones unfamiliar; it calls every image class 0 or 1 by its red."""

    classes = ["red", "other"]

    def calibration(self):
        return None

    def logits(self, x):
        x = np.asarray(x, np.float64)
        b = x.mean((1, 2, 3)) / 255 * 10
        red = x[..., 0].mean((1, 2)) > x[..., 1:].mean((1, 2, 3))
        return np.stack([np.where(red, b, 0), np.where(red, 0, b)], 1)


def test_report_of_a_model_that_knows_bright_images(tmp_path):
    rng = np.random.default_rng(0)
    bright = rng.integers(200, 256, (40, 4, 4, 3), dtype=np.uint8)
    val = rng.integers(200, 256, (20, 4, 4, 3), dtype=np.uint8)
    dark = rng.integers(0, 50, (30, 4, 4, 3), dtype=np.uint8)
    mixed = np.concatenate([dark[:10], rng.integers(200, 256, (10, 4, 4, 3), dtype=np.uint8)])
    sets = [{"name": "dark", "source": "synthetic:dark", "images": dark, "notes": ["how it is made"]},
            {"name": "mixed", "source": "test:mixed", "images": mixed, "notes": ["half bright"]}]
    r = ood.ood_report(_Bright(), bright, val, sets, tmp_path, "msp", {"run": "stub"})
    assert r["threshold_fitted_on"] == "validation" and r["threshold_images"] == 20 and r["run"] == "stub"
    d, m = r["sets"]
    assert d["energy"]["auroc"] == 1.0 and d["accepted_share"] == 0.0 and d["images"] == 30
    assert 0.6 < m["energy"]["auroc"] < 0.9 and m["accepted_share"] <= 0.5 and m["notes"] == ["half bright"]
    assert r["in_distribution"]["images"] == 40 and r["in_distribution"]["flagged_share"] <= 0.1
    assert r["threshold"] == r["thresholds"]["msp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood.json", "ood.png", "scores.npz"]
    with np.load(tmp_path / "scores.npz") as z:
        assert z["in_energy"].shape == (40,) and z["set1_msp"].shape == (20,)
    assert json.loads((tmp_path / "ood.json").read_text())["sets"][0]["name"] == "dark"
    text = ood.format_report(r, tmp_path)
    # a data source's notes are shown; a synthetic set's description is in the report alone
    assert "mixed: half bright" in text and "how it is made" not in text
    assert "which keeps 95% of the run's 20 validation images" in text
    # without validation images, the threshold comes from the test images, and says so
    r2 = ood.ood_report(_Bright(), bright, None, sets[:1], tmp_path / "b")
    assert r2["threshold_fitted_on"] == "test" and r2["threshold_images"] == 40 and r2["score"] == "energy"
    assert r2["in_distribution"]["flagged_share"] == pytest.approx(2 / 40)  # two of 40 below: at most 5%


def test_the_share_of_its_own_images_flagged_is_given_by_class(tmp_path):
    """A threshold that keeps 95% of the validation images may turn away one class's test images
    wholesale: here the dimmer images of class 'other'."""
    rng = np.random.default_rng(0)
    val = rng.integers(200, 256, (40, 4, 4, 3), dtype=np.uint8)
    test = np.concatenate([rng.integers(200, 256, (30, 4, 4, 3), dtype=np.uint8),
                           rng.integers(120, 160, (10, 4, 4, 3), dtype=np.uint8)])
    y = np.r_[np.zeros(30, int), np.ones(10, int)]
    sets = [{"name": "dark", "source": "x", "images": rng.integers(0, 50, (5, 4, 4, 3), dtype=np.uint8)}]
    r = ood.ood_report(_Bright(), test, val, sets, tmp_path, y_in=y)
    ind = r["in_distribution"]
    red, other = ind["per_class"]
    assert (red["class"], red["images"], other["class"], other["images"]) == ("red", 30, "other", 10)
    assert other["flagged_share"] == 1.0 and red["flagged_share"] <= 0.1
    assert ind["flagged_share"] == pytest.approx((30 * red["flagged_share"] + 10) / 40)
    assert f"flagged, by class: most other 100.0%, red {red['flagged_share']:.1%}; least red" in \
        ood.format_report(r, tmp_path)
    # a class without test images has no share; without labels, no breakdown
    assert [c["class"] for c in ood.ood_report(_Bright(), test[:30], val, sets, tmp_path / "b", y_in=y[:30])[
        "in_distribution"]["per_class"]] == ["red"]
    assert "per_class" not in ood.ood_report(_Bright(), test, val, sets, tmp_path / "c")["in_distribution"]
    # the card's sentence
    from cifarlab.audit import _ood_lines, _ood_summary

    (line, _) = _ood_lines(_ood_summary(r))
    assert (f"The threshold also flags {ind['flagged_share']:.1%} of the test images, which are of its classes, and "
            f"not alike by class: 100.0% of the other images, {red['flagged_share']:.1%} of the red images.") in line


def test_a_set_scored_more_familiar_than_the_test_images_is_called_out(tmp_path):
    rng = np.random.default_rng(0)
    dim = rng.integers(100, 150, (20, 4, 4, 3), dtype=np.uint8)
    glare = np.full((20, 4, 4, 3), 255, np.uint8)
    r = ood.ood_report(_Bright(), dim, None, [{"name": "glare", "source": "x", "images": glare}], tmp_path)
    assert r["sets"][0]["energy"]["auroc"] == 0.0 and r["sets"][0]["accepted_share"] == 1.0
    text = ood.format_report(r, tmp_path)
    assert "more familiar than its own test images" in text and "Most images of glare pass as familiar" in text


def test_ood_through_the_cli_predict_and_the_card(trained_run, capsys):
    assert main(["ood", str(trained_run), "--json", "--count", "5"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in r["sets"]] == list(ood.SYNTHETIC)
    assert all(s["images"] == 5 for s in r["sets"]) and r["in_distribution"]["images"] == 9
    assert r["threshold_fitted_on"] == "validation" and r["tta"] == "none"
    for s in r["sets"]:
        assert {k: 0 <= s[k]["auroc"] <= 1 for k in ood.SCORES} == dict.fromkeys(ood.SCORES, True)
    assert (trained_run / "ood" / "ood.png").is_file()

    # predict marks exactly the images whose energy falls below the report's threshold
    imgs = trained_run.parent / "imgs" / "test" / "cat"
    noise = trained_run.parent / "noise.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    assert main(["predict", str(trained_run), str(imgs), str(noise), "--flag-unfamiliar", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    from cifarlab.export import load_model

    pred = load_model(trained_run)
    files = [p["file"] for p in doc["predictions"]]
    energy = ood.scores(ood.calibrated_logits(pred, pred.logits(files)))["energy"]
    assert [p["unfamiliar"] for p in doc["predictions"]] == (energy < r["threshold"]).tolist()
    assert doc["unfamiliar_below"] == {"score": "energy", "threshold": r["threshold"], "keep": 0.95,
                                       "fitted_on": "validation"}
    assert main(["predict", str(trained_run), str(noise), "--flag-unfamiliar", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "file,rank,class,probability,unfamiliar"
    # another test-time augmentation changes the scores: the threshold is not borrowed
    assert main(["predict", str(trained_run), str(noise), "--flag-unfamiliar", "--tta", "flip"]) == 2
    assert "run that first" in capsys.readouterr().err

    assert main(["audit", str(trained_run), "--bootstrap", "100"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Unfamiliar images (`cifarlab ood`, energy score)" in card and "gaussian (5 images)" in card
    assert f"a threshold that keeps 95% of its {r['threshold_images']} validation images, the model" in card
    assert "applies the threshold, and `cifarlab export` puts it in the ONNX file; " in card
    assert "These are one run's figures, and seeds can move them far more than they move accuracy" in card
    knn = r["sets"][0]["knn"]["auroc"]  # the features' score beside the threshold's
    assert f"gaussian (5 images): AUROC {r['sets'][0]['energy']['auroc']:.3f} (knn {knn:.3f}), **" in card
    # weights trained on since: the report no longer describes the model, and the card drops it
    from safetensors.torch import load_file, save_file

    w = load_file(trained_run / "weights.safetensors")
    save_file({k: v + 0.01 for k, v in w.items()}, trained_run / "weights.safetensors")
    assert main(["audit", str(trained_run), "--bootstrap", "100"]) == 0
    assert "Unfamiliar images" not in (trained_run / "audit" / "MODEL_CARD.md").read_text()


def test_a_run_of_some_classes_meets_the_others(tmp_path, image_folder, capsys):
    """The open-set check: trained on two of three classes, tested against the third's images."""
    from conftest import tiny_config

    from cifarlab.train import fit

    run = tmp_path / "two"
    cfg = tiny_config(str(image_folder), str(run), epochs=1)
    cfg.data.classes = ["frog", "cat"]
    fit(cfg, log=lambda s: None)
    arch = json.loads((run / "architecture.json").read_text())
    assert arch["classes"] == ["frog", "cat"]
    assert main(["evaluate", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["num_images"] == 6 and [c["class"] for c in ev["per_class"]] == ["frog", "cat"]  # 3 of each
    assert main(["ood", str(run), str(image_folder), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    (s,) = r["sets"]
    assert s["images"] == 3 and s["source"] == str(image_folder)  # dog's test images alone
    assert s["notes"] == ["its images of cat, frog were left out: the run knows those classes"]
    (dog,) = s["per_class"]
    assert dog["class"] == "dog" and dog["images"] == 3 and dog["accepted_share"] == s["accepted_share"]
    assert dog["called"]["class"] in ("frog", "cat") and dog["called"]["share"] >= 0.5
    assert main(["ood", str(run), str(image_folder), "--count", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sets"][0]["images"] == 2
    # data of no class the run does not know has nothing to offer
    two = tmp_path / "same"
    from conftest import make_image_folder

    make_image_folder(two, classes=("cat", "frog"))
    assert main(["ood", str(run), str(two)]) == 2
    assert "holds no test images of a class the run does not know" in capsys.readouterr().err


def test_cli_refusals_and_a_grey_source(trained_run, tmp_path, capsys):
    assert main(["ood", str(trained_run), "synthetic:static"]) == 2
    assert "unknown synthetic set" in capsys.readouterr().err
    assert main(["ood", str(trained_run), "--count", "0"]) == 2
    assert "--count 0 is not valid" in capsys.readouterr().err
    grey = tmp_path / "grey"
    from conftest import make_image_folder

    make_image_folder(grey, classes=("ship", "plane"), mode="L")
    assert main(["ood", str(trained_run), "synthetic:nowhere"]) == 2
    assert not (trained_run / "ood").exists()  # nothing half-written
    # grey images against a colour model: converted, as predict converts files
    assert main(["ood", str(trained_run), str(grey), "--json", "--knn-bank", "0"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["sets"]
    assert s["images"] == 6 and "its grey images converted to colour, as predict converts image files" in s["notes"]
    from cifarlab.data import load_dataset
    from cifarlab.export import load_model

    pred = load_model(trained_run)
    rgb = np.repeat(load_dataset(grey).x_test, 3, axis=3)  # grey to RGB repeats the channel
    energy = ood.scores(ood.calibrated_logits(pred, pred.logits(rgb)))["energy"]
    got = np.load(trained_run / "ood" / "scores.npz")["set0_energy"]
    assert got == pytest.approx(energy)
    (trained_run / "ood" / "ood.json").unlink()
    assert main(["predict", str(trained_run), str(grey), "--flag-unfamiliar"]) == 2
    assert "needs the threshold of 'cifarlab ood" in capsys.readouterr().err


def test_knn_score_by_hand():
    bank = np.array([[1.0, 0], [0, 1.0], [-1.0, 0]])
    feats = np.array([[1.0, 0], [np.sqrt(0.5), np.sqrt(0.5)]])
    # the first: nearest at distance 0, then sqrt(2), then 2; the second: sqrt(2 - sqrt 2) twice, then the far one
    assert ood.knn_scores(bank, feats, 1) == pytest.approx([0, -np.sqrt(2 - np.sqrt(2))])
    assert ood.knn_scores(bank, feats, 2) == pytest.approx([-np.sqrt(2), -np.sqrt(2 - np.sqrt(2))])
    assert ood.knn_scores(bank, feats, 3, chunk=1) == pytest.approx([-2, -np.sqrt(2 + np.sqrt(2))])
    assert [ood.knn_k(n) for n in (50_000, 10_000, 1_000, 13, 1)] == [50, 10, 1, 1, 1]


class _Net:
    """A predictor stand-in around a small network, for the features of its last layer."""

    classes = ["a", "b"]
    tta = "none"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(),
                                         torch.nn.Linear(5, 2))

    def calibration(self):
        return None

    def logits(self, x, tta=None):
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(x), dtype=torch.float32) / 255).numpy()


def test_features_are_the_classifiers_input_at_length_one(tmp_path):
    net = _Net()
    x = np.random.default_rng(0).integers(0, 256, (6, 2, 2, 3), dtype=np.uint8)
    f = ood.features(net, x)
    want = torch.relu(net.model[1](torch.as_tensor(x, dtype=torch.float32).flatten(1) / 255)).detach()
    assert f.shape == (6, 5) and f == pytest.approx(torch.nn.functional.normalize(want, dim=1).numpy(), abs=1e-6)
    assert ood.last_linear(net.model)[0] == "3"
    with pytest.raises(CifarlabError, match="no linear layer"):
        ood.last_linear(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)))
    # the report with a bank: the knn score beside the others, its bank saved as used
    r = ood.ood_report(net, x, None, [{"name": "n", "source": "synthetic:x", "images": x[::-1].copy()}], tmp_path,
                       "knn", bank=f[:4])
    assert r["knn"]["bank_images"] == 4 and r["knn"]["k"] == 1 and "knn" in r["sets"][0]
    assert r["knn"]["features"] == "the 5 inputs of layer '3', scaled to length 1"
    assert r["threshold"] == r["thresholds"]["knn"] and (tmp_path / "knn_bank.safetensors").is_file()
    assert np.array_equal(ood.read_bank(tmp_path.parent, tmp_path.name), f[:4].astype(np.float16).astype(np.float32))
    with pytest.raises(CifarlabError, match="--score knn needs a bank"):
        ood.ood_report(net, x, None, [], tmp_path / "b", "knn")


def test_knn_through_the_cli_and_predict(trained_run, capsys):
    assert main(["ood", str(trained_run), "synthetic:uniform", "--score", "knn", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # all 13 images the run trained on are in the bank (of the folder's 18, 5 validated it)
    assert r["knn"]["bank_images"] == 13 and r["score"] == "knn" and r["threshold"] == r["thresholds"]["knn"]
    imgs = sorted(str(p) for p in (trained_run.parent / "imgs" / "test").rglob("*.png"))
    assert main(["predict", str(trained_run), *imgs, "--flag-unfamiliar", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    from cifarlab.export import load_model

    pred = load_model(trained_run)
    want = ood.knn_scores(ood.read_bank(trained_run), ood.features(pred, imgs), r["knn"]["k"]) < r["threshold"]
    assert [p["unfamiliar"] for p in doc["predictions"]] == want.tolist()
    assert doc["unfamiliar_below"]["score"] == "knn"
    # the features are the plain model's: with test-time augmentation (two passes) the knn scores stay
    before = np.load(trained_run / "ood" / "scores.npz")["in_knn"]
    assert main(["ood", str(trained_run), "synthetic:uniform", "--tta", "flip", "--json"]) == 0
    capsys.readouterr()
    assert np.load(trained_run / "ood" / "scores.npz")["in_knn"] == pytest.approx(before, abs=1e-6)
    assert main(["ood", str(trained_run), "synthetic:blank", "--knn-bank", "0", "--json"]) == 0
    assert "knn" not in json.loads(capsys.readouterr().out)
    for args, msg in ((["--knn-bank", "-1"], "--knn-bank -1 is not valid"),
                      (["--score", "knn", "--knn-bank", "0"], "--score knn needs a bank")):
        assert main(["ood", str(trained_run), *args]) == 2
        assert msg in capsys.readouterr().err


def test_a_run_without_its_config_gets_the_logit_scores_and_a_threshold_from_its_test_images(trained_run, capsys):
    """An imported model's training and validation images are unknown: no knn, and the test
    images fit the threshold (the report says so)."""
    (trained_run / "config.yaml").unlink()
    data = str(trained_run.parent / "imgs")
    assert main(["ood", str(trained_run), "synthetic:blank", "--data", data, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "knn" not in r and r["threshold_fitted_on"] == "test"
    assert r["in_distribution"]["flagged_share"] <= 0.05
    assert main(["ood", str(trained_run), "--data", data, "--score", "knn"]) == 2
    assert "--score knn needs a bank of the run's training images' features" in capsys.readouterr().err


def test_a_folder_of_loose_images_is_a_source(trained_run, tmp_path, capsys):
    """Photos of other things, as a user has them: image files in a folder, no classes."""
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, where in enumerate([photos, photos, photos / "more"]):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(where / f"p{i}.jpg")
    (photos / "notes.txt").write_text("not an image")
    assert main(["ood", str(trained_run), str(photos), "--json", "--knn-bank", "0"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["sets"]
    assert s["images"] == 3 and s["notes"] == ["3 image file(s), read as predict reads them"]
    from cifarlab.export import load_model

    pred = load_model(trained_run)
    files = sorted(str(f) for f in photos.rglob("*.jpg"))  # resized to 32x32 as predict resizes them
    energy = ood.scores(ood.calibrated_logits(pred, pred.logits(files)))["energy"]
    assert np.load(trained_run / "ood" / "scores.npz")["set0_energy"] == pytest.approx(energy)
    (photos / "broken.png").write_bytes(b"no image")
    assert main(["ood", str(trained_run), str(photos)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["ood", str(trained_run), str(photos), "--skip-bad-images", "--knn-bank", "0", "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["sets"]
    assert s["images"] == 3 and "1 unreadable file(s) left out" in s["notes"][1]
    assert main(["ood", str(trained_run), files[0], "--knn-bank", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sets"][0]["images"] == 1


def test_keep_sets_how_many_of_the_runs_own_images_the_threshold_keeps(trained_run, capsys):
    args = ["ood", str(trained_run), "synthetic:blank", "--knn-bank", "0", "--json"]
    assert main(args) == 0
    usual = json.loads(capsys.readouterr().out)
    assert main(args + ["--keep", "0.5"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert usual["keep"] == 0.95 and half["keep"] == 0.5
    # keeping fewer of its own images takes a threshold at least as high, for every score
    assert all(half["thresholds"][k] >= usual["thresholds"][k] for k in ood.SCORES)
    assert half["in_distribution"]["flagged_share"] >= usual["in_distribution"]["flagged_share"]
    for bad in ("1", "0", "-0.5"):
        assert main(["ood", str(trained_run), "--keep", bad]) == 2
        assert f"--keep {float(bad)} is not valid" in capsys.readouterr().err


def test_the_runs_of_a_set_meet_the_same_images_and_their_spread_is_reported(tmp_path, image_folder, capsys):
    from conftest import tiny_config

    from cifarlab.train import fit

    base = tmp_path / "set"
    fit(tiny_config(str(image_folder), str(base), runs=2), log=lambda s: None)
    other = tmp_path / "others"
    from conftest import make_image_folder

    make_image_folder(other, classes=("ship", "plane"))
    assert main(["ood", str(base), str(other), "synthetic:uniform", "--count", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    each = [json.loads((base / f"run-{k}" / "ood" / "ood.json").read_text()) for k in range(2)]
    assert s == json.loads((base / "ood_summary.json").read_text())
    assert s["runs"] == 2 and [st["name"] for st in s["sets"]] == [e["name"] for e in each[0]["sets"]]
    assert s["scores"] == list(ood.SCORES) + ["knn"]
    assert [r["weights_sha256"] for r in s["per_run"]] == [e["weights_sha256"] for e in each]
    assert len(s["in_distribution"]["per_class"]) == 3
    for i, c in enumerate(s["in_distribution"]["per_class"]):  # each class's own images flagged, over the runs
        shares = [e["in_distribution"]["per_class"][i]["flagged_share"] for e in each]
        assert c["flagged_share"]["mean"] == pytest.approx(sum(shares) / 2) and c["images"] == 3
    assert each[0]["weights_sha256"] != each[1]["weights_sha256"]  # two seeds, two models
    for i, st in enumerate(s["sets"]):
        assert [e["sets"][i]["images"] for e in each] == [4, 4] and st["images"] == 4
        # the same images for both runs: the same random choice of the folder's files, the same noise
        assert each[0]["sets"][i]["notes"] == each[1]["sets"][i]["notes"] == st["notes"]
        for score in s["scores"]:
            aurocs = [e["sets"][i][score]["auroc"] for e in each]
            assert st[score]["auroc"]["min"] == min(aurocs) and st[score]["auroc"]["max"] == max(aurocs)
            assert st[score]["auroc"]["mean"] == pytest.approx(sum(aurocs) / 2)
        assert st["accepted_share"]["mean"] == pytest.approx(sum(e["sets"][i]["accepted_share"] for e in each) / 2)
        assert sum(c["runs"] for c in st["called_most"]) == 2
    # the noise is literally the same: run-1 scores the images run-0 scored, and its own scores are reproduced
    from cifarlab.export import load_model

    noise = ood.synthetic_images("uniform", 4, (32, 32, 3), seed=1)  # the second source: seed + 1
    pred = load_model(base / "run-1")
    got = np.load(base / "run-1" / "ood" / "scores.npz")["set1_energy"]
    assert got == pytest.approx(ood.scores(ood.calibrated_logits(pred, pred.logits(noise)))["energy"])

    # on the terminal, and into --out: each run's report under OUT/run-K, the summary in OUT
    out = tmp_path / "o"
    assert main(["ood", str(base), "synthetic:blank", "--count", "3", "--knn-bank", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run-0: energy threshold" in printed and "2 runs, 9 test images of their own data against 1" in printed
    assert str(out / "ood_summary.json") in printed and (out / "run-1" / "ood.json").is_file()
    assert json.loads((out / "ood_summary.json").read_text())["scores"] == list(ood.SCORES)

    # the audit of the set quotes the spread of the runs' own reports
    from cifarlab.audit import audit_runs
    from cifarlab.data import load_dataset

    ds = load_dataset(str(image_folder))
    groups = tmp_path / "groups.csv"
    groups.write_text("index,half\n" + "".join(f"{i},{'first' if i < 5 else 'second'}\n" for i in range(9)))
    audit_runs(base, ds, n_boot=100, device="cpu", log=lambda _: None, groups_csv=str(groups))
    md = (base / "audit_summary.md").read_text()
    summary = json.loads((base / "audit_summary.json").read_text())["attributes"]["half"]
    each_group = [json.loads((base / f"run-{k}" / "audit" / "audit.json").read_text())["attributes"]["half"]
                  for k in range(2)]
    for j, g in enumerate(summary["groups"]):  # each group's share flagged as unfamiliar, over the runs
        assert g["unfamiliar_share"]["max"] == max(e["groups"][j]["unfamiliar_share"] for e in each_group)
    assert summary["unfamiliar_gap"]["difference"]["min"] == min(e["unfamiliar_gap"]["difference"] for e in each_group)
    assert ("| group | n | accuracy, mean (min to max) | flagged in | confidence - accuracy, mean (min to max) | "
            "flagged unfamiliar |") in md
    assert "Flagged as unfamiliar (`cifarlab ood`'s threshold): largest gap " in md
    # one run whose flag gap is real: the summary warns, naming in how many runs
    from cifarlab.audit import summarise_audits

    audits = [json.loads((base / f"run-{k}" / "audit" / "audit.json").read_text()) for k in range(2)]
    for a, real in zip(audits, (True, False)):
        a["attributes"]["half"]["unfamiliar_gap"]["ci_excludes_zero"] = real
    warned = summarise_audits(audits, ["run-0", "run-1"])["warnings"]
    assert ("half: the gap between the groups `cifarlab ood`'s threshold flags most and least as unfamiliar "
            "excluded zero in 1 of 2 runs") in warned
    u = s["sets"][1]
    assert ("Unfamiliar images (`cifarlab ood`, energy score, each run's threshold keeping 95% of its validation "
            "images): ") in md
    assert (f"uniform (4 images): AUROC {u['energy']['auroc']['mean']:.3f} ({u['energy']['auroc']['min']:.3f} to "
            f"{u['energy']['auroc']['max']:.3f}), accepted {u['accepted_share']['mean']:.3f}") in md
    (base / "run-1" / "ood" / "ood.json").unlink()
    audit_runs(base, ds, n_boot=100, device="cpu", log=lambda _: None)
    md = (base / "audit_summary.md").read_text()
    assert "Unfamiliar images: not quoted; run-1 not measured with its current weights" in md


def test_the_ensemble_of_a_set_gets_its_own_threshold_which_predict_and_its_file_apply(tmp_path, image_folder, capsys,
                                                                                        monkeypatch):
    """ood OUT reports the runs' ensemble, the model predict OUT serves, from the runs' own
    scores: msp its own top probability, the others the mean of the runs'; its threshold keeps
    95% of the training images no run trained on (the test images where there are too few).
    predict OUT --flag-unfamiliar and the ensemble's ONNX file apply it, and a run or bank
    changed since makes it refused."""
    from conftest import tiny_config

    import cifarlab.calibrate
    from cifarlab.data import load_dataset
    from cifarlab.data.images import open_image, to_array
    from cifarlab.export import load_ensemble, load_model
    from cifarlab.train import fit, run_split

    base = tmp_path / "set"
    cfg = tiny_config(str(image_folder), str(base), runs=2, epochs=2)
    cfg.data.split_seed = 7  # the runs hold out the same 5 validation images, which neither trained on
    fit(cfg, log=lambda s: None)
    ds = load_dataset(str(image_folder))
    va = run_split(base / "run-0", ds)[2]
    runs = [load_model(base / f"run-{k}") for k in range(2)]

    # too few images that no run trained on: the threshold comes from the test images, and says so
    assert main(["ood", str(base), "synthetic:uniform", "--count", "4", "--knn-bank", "0"]) == 0
    printed = capsys.readouterr().out
    e = json.loads((base / "ood_summary.json").read_text())["ensemble"]
    assert e["threshold_fitted_on"] == "test" and e["threshold_images"] == 9
    assert "keeps 95% of the 9 test images (too few training images were trained on by no run" in printed

    monkeypatch.setattr(cifarlab.calibrate, "ENSEMBLE_MIN_IMAGES", len(va))
    assert main(["ood", str(base), "synthetic:uniform", "synthetic:blank", "--count", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    e = s["ensemble"]
    assert e["threshold_fitted_on"] == "unseen training" and e["threshold_images"] == len(va) == 5
    assert [r["run"] for r in e["runs"]] == ["run-0", "run-1"] and e["ensemble_temperature"] is None
    assert [r["weights_sha256"] for r in e["runs"]] == [r["weights_sha256"] for r in s["per_run"]]
    assert list(e["thresholds"]) == list(ood.SCORES) + ["knn"] and e["score"] == "energy"

    # by hand: energy is the mean of the runs' energies, msp the ensemble's own top probability
    def energies(x):
        return np.mean([ood.scores(ood.calibrated_logits(m, m.logits(x)))["energy"] for m in runs], axis=0)

    ens = load_ensemble(base)
    assert e["thresholds"]["energy"] == pytest.approx(ood.threshold(energies(ds.x_train[va])))
    assert e["thresholds"]["msp"] == pytest.approx(ood.threshold(ens.predict(ds.x_train[va]).max(1)), abs=1e-6)
    p_test = ens.predict(ds.x_test)
    assert e["in_distribution"]["mean_confidence"] == pytest.approx(p_test.max(1).mean(), abs=1e-6)
    assert e["in_distribution"]["flagged_share"] == pytest.approx((energies(ds.x_test) < e["threshold"]).mean())
    noise = ood.synthetic_images("uniform", 4, (32, 32, 3), seed=0)
    sep = ood.separation(energies(ds.x_test), energies(noise))
    assert e["sets"][0]["energy"]["auroc"] == pytest.approx(sep["auroc"])
    assert e["sets"][0]["accepted_share"] == pytest.approx((energies(noise) >= e["threshold"]).mean())
    # knn: the mean of the runs' own knn scores, each against its own bank
    each = [np.load(base / f"run-{k}" / "ood" / "scores.npz")["set1_knn"] for k in range(2)]
    blank = ood.synthetic_images("blank", 4, (32, 32, 3), seed=1)
    assert e["sets"][1]["knn"]["auroc"] == pytest.approx(ood.separation(
        np.mean([np.load(base / f"run-{k}" / "ood" / "scores.npz")["in_knn"] for k in range(2)], axis=0),
        np.mean(each, axis=0))["auroc"])
    k = json.loads((base / "run-0" / "ood" / "ood.json").read_text())["knn"]["k"]
    assert each[0] == pytest.approx(ood.knn_scores(ood.read_bank(base / "run-0"), ood.features(runs[0], blank), k))

    # predict OUT --flag-unfamiliar applies it: an image is unfamiliar where the runs' mean energy is below it
    files = sorted(str(f) for f in (image_folder / "test").rglob("*.png"))
    images = np.stack([to_array(open_image(open(f, "rb").read(), f), 3, (32, 32)) for f in files])
    assert main(["predict", str(base), *files, "--flag-unfamiliar", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["unfamiliar"] for r in doc["predictions"]] == (energies(images) < e["threshold"]).tolist()
    assert doc["unfamiliar_below"] == {"score": "energy", "threshold": e["threshold"], "keep": 0.95,
                                       "fitted_on": "unseen training", "runs": 2,
                                       "scored": "the mean of the runs' energy scores"}
    assert main(["predict", str(base), *files[:2], "--flag-unfamiliar"]) == 0
    assert "image(s) below the energy threshold" in capsys.readouterr().out
    # the audit's section on the ensemble quotes it
    from cifarlab.audit import audit_runs

    groups = tmp_path / "groups.csv"
    groups.write_text("index,light\n" + "".join(f"{i},{'dark' if i < 4 else 'bright'}\n" for i in range(9)))
    summary = audit_runs(base, ds, groups_csv=str(groups), n_boot=100, device="cpu", log=lambda _: None)
    u = summary["ensemble"]["unfamiliar_images"]
    # and each group's share its threshold flags, from the ensemble's scores saved beside the summary
    saved = base / ood.ENSEMBLE_SCORES_FILE
    assert np.load(saved)["in_energy"] == pytest.approx(energies(ds.x_test))
    flagged = energies(ds.x_test) < e["threshold"]
    gm = summary["ensemble"]["attributes"]["light"]
    assert {g["group"]: g["unfamiliar_share"] for g in gm["groups"]} == pytest.approx(
        {"dark": flagged[:4].mean(), "bright": flagged[4:].mean()}) and gm["unfamiliar_score"] == "energy"
    assert "flagged unfamiliar" in (base / "audit_summary.md").read_text().split("### The ensemble's groups")[1]
    saved.write_bytes(saved.read_bytes()[:-1] + b"x")  # not the file it wrote: no shares
    again = audit_runs(base, ds, groups_csv=str(groups), n_boot=100, device="cpu", log=lambda _: None)
    assert "unfamiliar_gap" not in again["ensemble"]["attributes"]["light"] and again["ensemble"]["unfamiliar_images"]
    assert {k: u["sets"][0][k] for k in ("name", "images", "auroc", "accepted_share")} == {
        "name": "uniform", "images": 4, "auroc": e["sets"][0]["energy"]["auroc"],
        "accepted_share": e["sets"][0]["accepted_share"]}
    by_class = sorted(e["in_distribution"]["per_class"], key=lambda c: -c["flagged_share"])
    assert (u["most_flagged"], u["least_flagged"]) == (by_class[0], by_class[-1])
    md = (base / "audit_summary.md").read_text()
    assert ("Unfamiliar images (`cifarlab ood`, energy score: the mean of the runs' energy scores; its threshold keeps "
            "95% of 5 unseen training images and flags") in md
    assert f"uniform (4 images): AUROC {u['sets'][0]['auroc']:.3f}, accepted" in md.split("## Their ensemble")[1]
    assert (f"By class, the most and the least: {by_class[0]['flagged_share']:.1%} of the {by_class[0]['class']} "
            f"images, {by_class[-1]['flagged_share']:.1%} of the {by_class[-1]['class']} images.") in md
    assert main(["ood", str(base), "synthetic:uniform", "--count", "4", "--score", "msp", "--knn-bank", "0"]) == 0
    assert "msp score: the largest of the ensemble's own probabilities" in capsys.readouterr().out
    thr = json.loads((base / "ood_summary.json").read_text())["ensemble"]["threshold"]
    assert main(["predict", str(base), *files, "--flag-unfamiliar", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["unfamiliar"] for r in doc["predictions"]] == (ens.predict(images).max(1) < thr).tolist()

    # the ensemble's ONNX file gives its familiarity, as predict scores it (the export checks it)
    from importlib.util import find_spec

    for score in ("msp", "knn"):
        if score == "knn":
            assert main(["ood", str(base), "synthetic:uniform", "--count", "4", "--score", "knn"]) == 0
        if find_spec("onnxruntime") and find_spec("onnxscript"):
            from cifarlab.deploy import export_onnx

            report = export_onnx(base, tmp_path / f"{score}.onnx", log=lambda s: None)
            assert report["unfamiliar_below"]["score"] == score and report["unfamiliar_below"]["runs"] == 2
            assert report["check"]["familiarity_max_rel_diff"] < 1e-4

    # a run's bank measured again on its own, and a run calibrated since: the threshold no longer holds
    assert main(["ood", str(base / "run-0"), "synthetic:blank", "--count", "2", "--knn-bank", "5", "--score",
                 "knn"]) == 0
    capsys.readouterr()
    assert main(["predict", str(base), files[0], "--flag-unfamiliar"]) == 2
    assert f"needs the threshold of their ensemble that 'cifarlab ood {base}' fits" in capsys.readouterr().err
    assert main(["ood", str(base), "synthetic:uniform", "--count", "4"]) == 0
    assert main(["predict", str(base), files[0], "--flag-unfamiliar"]) == 0
    assert main(["calibrate", str(base / "run-1")]) == 0
    capsys.readouterr()
    assert main(["predict", str(base), files[0], "--flag-unfamiliar"]) == 2
    assert "and the ensemble's; run that first" in capsys.readouterr().err
    assert audit_runs(base, ds, n_boot=100, device="cpu", log=lambda _: None)["ensemble"]["unfamiliar_images"] is None


def test_a_spread_that_straddles_chance_is_called_out():
    def report(run, auroc):
        st = {"name": "blank", "source": "synthetic:blank", "images": 5, "notes": [], "accepted_share": 0.5,
              "mean_confidence": 0.9, "called": [{"class": "cat", "share": 1.0}],
              **{k: {"auroc": auroc, "fpr_at_95_tpr": 0.5} for k in ood.SCORES}}
        return {"run": run, "data": "d", "score": "energy", "keep": 0.95, "tta": "none", "threshold": 1.0,
                "thresholds": dict.fromkeys(ood.SCORES, 1.0), "threshold_fitted_on": "validation",
                "temperature": None, "class_offsets": None, "weights_sha256": run,
                "in_distribution": {"images": 9, "flagged_share": 0.0, "mean_confidence": 0.8}, "sets": [st]}

    s = ood.summarise_ood([report("a", 0.3), report("b", 0.8)])
    assert s["sets"][0]["energy"]["auroc"]["mean"] == pytest.approx(0.55)
    assert s["sets"][0]["called_most"] == [{"class": "cat", "runs": 2}]
    text = ood.format_runs(s, Path("f"))
    assert "blank: AUROC from 0.300 to 0.800 over the runs, on both sides of 0.5" in text
    assert "0.5500 (0.3000 to 0.8000)" in text
    assert "both sides" not in ood.format_runs(ood.summarise_ood([report("a", 0.6), report("b", 0.8)]), Path("f"))


def test_the_audit_gives_the_share_of_each_group_flagged_as_unfamiliar(trained_run, tmp_path, capsys):
    groups = tmp_path / "groups.csv"
    groups.write_text("index,light\n" + "".join(f"{i},{'dark' if i < 4 else 'bright'}\n" for i in range(9)))
    assert main(["audit", str(trained_run), "--groups", str(groups), "--bootstrap", "100"]) == 0
    a = json.loads((trained_run / "audit" / "audit.json").read_text())
    assert "unfamiliar_gap" not in a["attributes"]["light"]  # no ood report yet: nothing to break down
    capsys.readouterr()
    # a threshold keeping half the validation images flags some of the test images
    assert main(["ood", str(trained_run), "synthetic:blank", "--count", "3", "--knn-bank", "0", "--keep", "0.5",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert main(["audit", str(trained_run), "--groups", str(groups), "--bootstrap", "100"]) == 0
    capsys.readouterr()
    a = json.loads((trained_run / "audit" / "audit.json").read_text())
    gm = a["attributes"]["light"]
    flagged = np.load(trained_run / "ood" / "scores.npz")["in_energy"] < r["threshold"]
    by_hand = {"dark": flagged[:4].mean(), "bright": flagged[4:].mean()}
    assert {g["group"]: g["unfamiliar_share"] for g in gm["groups"]} == pytest.approx(by_hand)
    ug = gm["unfamiliar_gap"]
    assert ug["difference"] == pytest.approx(max(by_hand.values()) - min(by_hand.values()))
    assert by_hand[ug["most"]] == max(by_hand.values()) and by_hand[ug["least"]] == min(by_hand.values())
    assert gm["unfamiliar_score"] == "energy" and 0 < flagged.mean() < 1
    md = (trained_run / "audit" / "audit.md").read_text()
    assert ("| group | n | accuracy | 95% CI | macro recall | macro precision | mean confidence | "
            "confidence - accuracy | flagged unfamiliar | note |") in md
    assert f"Flagged as unfamiliar (the energy threshold of `cifarlab ood`): {ug['most']} most" in md
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert (f"Flagged as unfamiliar by `cifarlab ood`'s threshold: bright {by_hand['bright']:.1%}, dark "
            f"{by_hand['dark']:.1%}") in card
    # scores of other images than these test images are not borrowed; damaged scores are no scores
    scores = trained_run / "ood" / "scores.npz"
    whole = scores.read_bytes()
    np.savez(scores, in_energy=np.zeros(5))
    one = io.BytesIO()
    np.save(one, np.zeros(len(flagged)))  # one array, as np.save writes it: no names to read
    for damaged in (None, whole[:60], b"", b"not an npz", one.getvalue()):
        if damaged is not None:
            scores.write_bytes(damaged)
        assert main(["audit", str(trained_run), "--groups", str(groups), "--bootstrap", "100"]) == 0
        capsys.readouterr()
        assert "unfamiliar_gap" not in json.loads((trained_run / "audit" / "audit.json").read_text())["attributes"][
            "light"]


def test_a_group_flagged_far_more_often_is_warned_of():
    from cifarlab.audit import _group_warnings, group_metrics, unfamiliar_by_group

    values = np.array(["night"] * 40 + ["day"] * 40)
    y = np.zeros(80, int)
    gm = group_metrics(y, y, values, 1.0, 0.05, 30)
    gm["not_recorded"] = 0
    flagged = np.r_[np.arange(40) < 20, np.zeros(40, bool)]  # half the night photos, no day photo
    ug = gm["unfamiliar_gap"] = unfamiliar_by_group(flagged, values, gm)
    assert (ug["most"], ug["least"], ug["difference"]) == ("night", "day", 0.5)
    assert ug["ci_excludes_zero"] and ug["difference_ci"][0] > 0
    assert [g["unfamiliar_share"] for g in gm["groups"]] == [0.0, 0.5]  # day, night: sorted
    (w,) = _group_warnings("light", gm, 1.0, 0.05, 30)
    assert w.startswith("light: the unfamiliar-image threshold of `cifarlab ood` flags 50.0% of 'night' images "
                        "against 0.0% of 'day'")
    # alike groups: an interval that holds zero, no warning
    gm2 = group_metrics(y, y, values, 1.0, 0.05, 30)
    gm2["not_recorded"] = 0
    gm2["unfamiliar_gap"] = unfamiliar_by_group(np.tile(np.arange(40) < 4, 2), values, gm2)
    assert not gm2["unfamiliar_gap"]["ci_excludes_zero"] and gm2["unfamiliar_gap"]["difference"] == 0
    assert _group_warnings("light", gm2, 1.0, 0.05, 30) == []
