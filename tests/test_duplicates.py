"""``cifarlab duplicates``: near-copies of training images among the test images, and a run's
accuracy with and without them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.audit import read_groups
from cifarlab.cli import main
from cifarlab.config import load_run_config
from cifarlab.data import Dataset, load_dataset
from cifarlab.duplicates import best_among, candidate_scores, check_options, duplicates_report, find_duplicates, \
    read_duplicates, shifted_similarity, summarise, write_files
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import predict_dataset
from cifarlab.export import load_model
from cifarlab.train import fit, split_indices

from conftest import tiny_config


def smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Distinct photo-like uint8 (n, size, size, 3) images: random 6x6 colour fields enlarged
    smoothly, with a little pixel noise, so that block means tell them apart as they do photos."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(20, 235, (n, 3, 6, 6)).astype(np.float32))
    big = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    big = big + torch.from_numpy(rng.normal(0, 3, big.shape).astype(np.float32))
    return big.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy().copy()


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float()


def _brute_force(q: np.ndarray, o: np.ndarray, shift: int) -> float:
    """The best correlation of q's centre with o's shifted windows, by numpy, one shift at a time."""
    h, w = q.shape[:2]
    t = q[shift:h - shift, shift:w - shift].astype(np.float64).ravel()
    best = -1.0
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            win = o[dy:dy + h - 2 * shift, dx:dx + w - 2 * shift].astype(np.float64).ravel()
            best = max(best, float(np.corrcoef(t, win)[0, 1]))
    return best


def test_the_shifted_correlation_is_the_brute_force_one():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (6, 20, 20, 3)).astype(np.float32)
    o = rng.integers(0, 256, (6, 20, 20, 3)).astype(np.float32)
    o[:3] = np.roll(q[:3], (1, -2), axis=(1, 2)) * 0.5 + 40  # shifted, darker, flatter copies
    got = shifted_similarity(_t(q), _t(o), 3).numpy()
    want = [_brute_force(q[i], o[i], 3) for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-5)  # float64 norms: float32 window means were 1e-4 off
    assert got[:3] == pytest.approx(1, abs=1e-5) and (got[3:] < 0.5).all()


def test_each_query_can_be_compared_with_several_images_at_once():
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.float32)
    o = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
    o[3] = np.roll(q[1], (2, 1), axis=(0, 1)) * 2 - 30  # the second query's second image: a brighter shifted copy
    got = shifted_similarity(_t(q), _t(o), 2).numpy()  # two images per query: 0 and 1 for query 0, ...
    want = [_brute_force(q[i // 2], o[i], 2) for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[3] == pytest.approx(1, abs=1e-5)


def test_a_shift_beyond_the_search_lowers_the_score_and_flat_images_score_zero():
    x = smooth_images(2, 0).astype(np.float32)
    moved = np.roll(x, (0, 3), axis=(1, 2))
    assert shifted_similarity(_t(x), _t(moved), 3).numpy() == pytest.approx(1, abs=1e-4)
    assert (shifted_similarity(_t(x), _t(moved), 1).numpy() < 0.99).all()
    flat = np.full_like(x, 128)
    for a, b in ((x, flat), (flat, x), (flat, flat)):
        s = shifted_similarity(_t(a), _t(b), 2)
        assert torch.isfinite(s).all() and (s == 0).all()


def _dataset(x_train, y_train, x_test, y_test, classes=("a", "b", "c")) -> Dataset:
    return Dataset(x_train, np.asarray(y_train, np.int64), x_test, np.asarray(y_test, np.int64), list(classes),
                   "memory", "image-folder", [f"test/{i}.png" for i in range(len(x_test))])


def _planted(seed: int = 0):
    """30 training images and 12 test images, three of them near-copies of training images
    (shifted; brightened and re-noised; the third with another class), one a copy of another
    test image."""
    rng = np.random.default_rng(seed)
    imgs = smooth_images(42, seed)
    x_train, x_test = imgs[:30], imgs[30:].copy()
    y_train, y_test = np.arange(30) % 3, np.arange(12) % 3
    x_test[0] = np.roll(x_train[4], (2, -1), axis=(0, 1))  # class 1 both
    y_test[0] = y_train[4]
    brighter = x_train[9].astype(np.int16) * 0.8 + 30 + rng.normal(0, 2, x_train[9].shape)
    x_test[1] = brighter.clip(0, 255).round().astype(np.uint8)
    y_test[1] = y_train[9]
    x_test[2] = x_train[17]
    y_test[2] = (y_train[17] + 1) % 3  # the same photo, labelled otherwise
    x_test[11] = x_test[7]
    return _dataset(x_train, y_train, x_test, y_test), {0: 4, 1: 9, 2: 17}


def test_planted_copies_are_found_and_nothing_else():
    ds, planted = _planted()
    found = find_duplicates(ds, shift=3, candidates=5)
    idx, score = best_among(found["train_index"], found["train_score"])
    for i, j in planted.items():
        assert idx[i] == j and score[i] > 0.98
    others = [i for i in range(12) if i not in planted]
    assert (score[others] < 0.9).all()
    assert found["test_index"][7] == 11 and found["test_index"][11] == 7 and found["test_score"][7] > 0.99
    r = summarise(found, ds)
    assert r["test_with_train_duplicate"] == 3 and r["share"] == pytest.approx(3 / 12)
    assert r["label_disagreements"] == 1 and r["test_with_test_duplicate"] == 2
    assert {c["class"]: c["with_train_duplicate"] for c in r["by_class"]} == {
        ds.classes[k]: int(sum(ds.y_test[i] == k for i in planted)) for k in range(3)}
    counts = list(r["at_thresholds"].values())
    assert counts == sorted(counts, reverse=True) and r["at_thresholds"]["0.96"] == 3


def _planted_mirrored():
    """:func:`_planted` with a shifted mirror image of training image 21 as test image 5, the
    mirror image of test image 3 as test image 9, and test image 6 made left-right symmetric
    (its own mirror image, which must not count as a copy of itself)."""
    ds, planted = _planted()
    ds.x_test[5] = np.roll(ds.x_train[21][:, ::-1], (1, 1), axis=(0, 1))
    ds.y_test[5] = ds.y_train[21]
    ds.x_test[9] = ds.x_test[3][:, ::-1]
    half = ds.x_test[6][:, :16]
    ds.x_test[6] = np.concatenate([half, half[:, ::-1]], axis=1)
    return ds, planted


def test_mirrored_copies_are_found_only_when_asked():
    ds, planted = _planted_mirrored()
    plain = find_duplicates(ds, shift=3, candidates=5)
    idx, score = best_among(plain["train_index"], plain["train_score"])
    assert score[5] < 0.9 and plain["test_score"][9] < 0.9 and not plain["train_mirrored"].any()
    r = summarise(plain, ds)
    assert r["test_with_train_duplicate"] == 3 and r["mirrored_pairs"] == 0 and not r["method"]["mirrored"]

    found = find_duplicates(ds, shift=3, candidates=5, mirrored=True)
    assert found["train_index"].shape == (12, 10)  # each image's candidates, then its mirror image's
    assert (np.diff(found["train_score"], axis=1) <= 0).all()
    idx, score = best_among(found["train_index"], found["train_score"])
    assert idx[5] == 21 and score[5] > 0.98 and found["train_mirrored"][5, 0]
    for i, j in planted.items():  # the plain copies are still found, as themselves
        assert idx[i] == j and score[i] > 0.98 and not found["train_mirrored"][i, 0]
    assert found["test_index"][9] == 3 and found["test_index"][3] == 9 and found["test_mirrored"][9]
    assert found["test_index"][6] != 6 and found["test_score"][6] < 0.9  # not a copy of itself
    others = [i for i in range(12) if i not in {*planted, 5}]
    assert (score[others] < 0.9).all()
    r = summarise(found, ds)
    assert r["test_with_train_duplicate"] == 4 and r["mirrored_pairs"] == 1 and r["method"]["mirrored"]
    assert r["test_with_test_duplicate"] == 4  # 7 and 11, 3 and 9


def test_candidates_are_ranked_and_an_image_is_not_its_own_candidate():
    x = smooth_images(20, 3)
    index, score = candidate_scores(x, x, shift=2, candidates=4, same_set=True)
    assert index.shape == (20, 4) and not (index == np.arange(20)[:, None]).any()
    assert (np.diff(score, axis=1) <= 0).all()
    index, score = candidate_scores(x, x, shift=2, candidates=4)
    assert (index[:, 0] == np.arange(20)).all() and score[:, 0] == pytest.approx(1, abs=1e-4)
    # fewer images than candidates: each one compared once
    index, _ = candidate_scores(x[:2], x[:3], candidates=10)
    assert index.shape == (2, 3)


def _smoothed(x: np.ndarray) -> np.ndarray:
    """3x3 box means of (N, H, W, C) images, by numpy in float64."""
    h, w = x.shape[1:3]
    return sum(x[:, a:h - 2 + a, b:w - 2 + b].astype(np.float64) for a in range(3) for b in range(3)) / 9


def test_candidate_scores_are_the_brute_force_correlations_of_the_smoothed_images():
    x = smooth_images(12, 5)
    y = np.roll(smooth_images(12, 6), (1, -1), axis=(1, 2))
    y[:4] = np.roll(x[:4], (2, 0), axis=(1, 2))  # shifted copies
    y[4] = 77  # a flat image: scores 0 against anything
    index, score = candidate_scores(x, y, shift=2, candidates=3, chunk=5)  # chunks of 5, 5 and 2
    sx, sy = _smoothed(x), _smoothed(y)
    want = [[_brute_force(sx[i], sy[j], 2) if j != 4 else 0.0 for j in row] for i, row in enumerate(index)]
    np.testing.assert_allclose(score, want, atol=1e-5)
    assert (index[:4, 0] == np.arange(4)).all() and (score[:4, 0] > 0.99).all()


def test_the_best_candidate_can_be_limited_to_a_subset():
    index = np.array([[5, 2, 7], [1, 0, 3]])
    score = np.array([[0.99, 0.97, 0.5], [0.9, 0.8, 0.7]], np.float32)
    allowed = np.zeros(8, bool)
    allowed[[2, 7]] = True
    idx, sc = best_among(index, score, allowed)
    assert idx.tolist() == [2, -1] and sc[0] == pytest.approx(0.97) and np.isnan(sc[1])


@pytest.mark.parametrize("kw, fragment", [
    ({"threshold": 0}, "threshold 0 is not valid"), ({"threshold": 1.5}, "(0, 1]"),
    ({"threshold": float("nan")}, "threshold nan"), ({"shift": -1}, "shift -1 is not valid"),
    ({"shift": 2.5}, "whole number of pixels"), ({"candidates": 0}, "candidates 0 is not valid"),
    ({"shift": 8, "image_size": (32, 32)}, "give at most 7"),
    ({"shift": 1, "image_size": (4, 4)}, "too large for 4x4 images"),
])
def test_bad_options_are_refused_by_name(kw, fragment):
    with pytest.raises(CifarlabError) as e:
        check_options(**kw)
    assert fragment in str(e.value)


def _write_folder(root, ds: Dataset) -> None:
    """``ds`` as a PNG image folder (lossless, so the loaded pixels are the same)."""
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        for i, (im, lab) in enumerate(zip(x, y)):
            d = root / split / ds.classes[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{i:04d}.png")


def _index_of(x: np.ndarray, image: np.ndarray) -> int:
    return int(np.flatnonzero((x == image).all(axis=(1, 2, 3)))[0])


def _planted_folder(root, src: Dataset | None = None) -> tuple[Dataset, object]:
    """:func:`_planted`'s images (or ``src``'s) with 60 more training images, so that a tiny
    run's validation split holds some of the planted sources, as an image folder ``root``."""
    src = _planted(seed=1)[0] if src is None else src
    more = smooth_images(60, 7)
    x_train = np.concatenate([src.x_train, more])
    y_train = np.concatenate([src.y_train, np.arange(60) % 3])
    _write_folder(root, _dataset(x_train, y_train, src.x_test, src.y_test))
    return src, root


def test_a_run_is_scored_without_the_test_images_it_trained_on(tmp_path):
    src, folder = _planted_folder(tmp_path / "data")
    run = tmp_path / "run"
    fit(tiny_config(str(folder), str(run), epochs=1), log=lambda _: None)
    ds = load_dataset(str(folder))
    tr, va = split_indices(load_run_config(run / "config.yaml"), ds.y_train)
    # where each planted test image's source landed: trained on, or held out for validation
    sources = {i: _index_of(ds.x_train, src.x_train[j]) for i, j in {0: 4, 1: 9, 2: 17}.items()}
    test_pos = {i: _index_of(ds.x_test, src.x_test[i]) for i in sources}
    trained = {test_pos[i] for i, j in sources.items() if j in set(tr)}
    held_out = {test_pos[i] for i, j in sources.items() if j in set(va)}
    assert trained and held_out, "this seed's split should train on some sources and hold some out"
    report, _ = duplicates_report(ds, [run], device="cpu")
    assert report["test_with_train_duplicate"] == 3  # the data's own figure: every training image counts
    entry = report["runs"][0]
    assert entry["with_duplicate"]["images"] == len(trained)
    assert entry["trained_on"] == f"the {len(tr):,} images it trained on (of the {len(ds.y_train):,} training images)"
    correct = predict_dataset(load_model(run), ds.x_test).argmax(1) == ds.y_test
    mask = np.zeros(len(ds.y_test), bool)
    mask[list(trained)] = True
    assert entry["accuracy"] == pytest.approx(correct.mean())
    assert entry["without_duplicate"]["accuracy"] == pytest.approx(correct[~mask].mean())
    assert entry["with_duplicate"]["accuracy"] == pytest.approx(correct[mask].mean())
    # the model card quotes the run's figures
    assert main(["duplicates", str(run), "--data", str(folder), "--device", "cpu"]) == 0
    assert main(["audit", str(run), "--data", str(folder), "--device", "cpu"]) == 0
    card = (run / "audit" / "MODEL_CARD.md").read_text()
    n = len(trained)
    assert f"{n} image{'s' if n > 1 else ''} of the 12 test images {'have' if n > 1 else 'has'} a near-copy among the" \
        in card
    assert f"on the other {12 - n:,} **{entry['without_duplicate']['accuracy']:.4f}**" in card
    assert "`duplicates/duplicates.png` in the run folder" in card

    # a fine-tune of it with another split: the copies its starting weights learnt from count too
    tuned = tmp_path / "tuned"
    cfg = tiny_config(str(folder), str(tuned), epochs=1, seed=3)
    cfg.model.init_from = str(run)
    fit(cfg, log=lambda _: None)
    tr_tuned = split_indices(load_run_config(tuned / "config.yaml"), ds.y_train)[0]
    learnt = set(tr_tuned.tolist()) | set(tr.tolist())
    assert len(learnt) > len(tr_tuned), "this seed's split should hold out some images the first run trained on"
    entry = duplicates_report(ds, [tuned], device="cpu")[0]["runs"][0]
    assert entry["with_duplicate"]["images"] == len({test_pos[i] for i, j in sources.items() if j in learnt})
    assert entry["trained_on"] == (f"the {len(tr_tuned):,} images it trained on and {len(learnt) - len(tr_tuned):,} "
                                   f"more that the weights it started from learnt from (of the {len(ds.y_train):,} "
                                   "training images)")


def test_a_run_scores_its_mirrored_and_unmirrored_copies_apart(tmp_path):
    src, _ = _planted_mirrored()
    _, folder = _planted_folder(tmp_path / "data", src)
    run = tmp_path / "run"
    fit(tiny_config(str(folder), str(run), epochs=1, seed=1), log=lambda _: None)  # trains on training image 21
    ds = load_dataset(str(folder))
    tr, _ = split_indices(load_run_config(run / "config.yaml"), ds.y_train)
    trained = set(tr.tolist())
    pos = {i: _index_of(ds.x_test, src.x_test[i]) for i in (0, 1, 2, 5)}
    mirrored = {pos[5]} if _index_of(ds.x_train, src.x_train[21]) in trained else set()
    plain = {pos[i] for i, j in {0: 4, 1: 9, 2: 17}.items() if _index_of(ds.x_train, src.x_train[j]) in trained}
    assert mirrored and plain, "this seed's split should train on the mirrored source and on some others"
    report, _ = duplicates_report(ds, [run], device="cpu", mirrored=True, candidates=5)
    w = report["runs"][0]["with_duplicate"]
    assert (w["mirrored"]["images"], w["unmirrored"]["images"], w["images"]) == (
        len(mirrored), len(plain), len(mirrored) + len(plain))
    correct = predict_dataset(load_model(run), ds.x_test).argmax(1) == ds.y_test
    for key, ix in (("mirrored", mirrored), ("unmirrored", plain)):
        want = float(correct[sorted(ix)].mean()) if ix else None
        assert w[key]["accuracy"] == (pytest.approx(want) if ix else None)
    # the model card gives the split too, and the audit's summary of several runs its spread
    from cifarlab.audit import _duplicates_lines, _runs_duplicates, _runs_mirrored_split

    entry = {**{k: v for k, v in report.items() if k != "runs"}, "run": report["runs"][0]}
    card = _duplicates_lines(entry)[0]
    assert (f"({w['mirrored']['accuracy']:.4f} on the {len(mirrored)} whose copy is mirrored, "
            f"{w['unmirrored']['accuracy']:.4f} on the other {len(plain)})") in card
    summary = _runs_duplicates([{"run": str(run), "near_duplicates": entry}] * 2)
    assert summary["with_duplicate_mirrored"]["images"] == [len(mirrored)] * 2
    assert summary["with_duplicate_unmirrored"]["accuracy"]["mean"] == pytest.approx(w["unmirrored"]["accuracy"])
    m, u = w["mirrored"]["accuracy"], w["unmirrored"]["accuracy"]
    assert _runs_mirrored_split(summary) == (f" ({m:.3f} ({m:.3f} to {m:.3f}) on the {len(mirrored)} whose copy is "
                                             f"mirrored, {u:.3f} ({u:.3f} to {u:.3f}) on the other {len(plain)})")
    assert "mirrored" not in duplicates_report(ds, [run], device="cpu", candidates=5)[0]["runs"][0]["with_duplicate"]


def test_the_command_writes_its_files_and_groups_that_audit_reads(tmp_path, capsys):
    ds, planted = _planted()
    folder = tmp_path / "data"
    _write_folder(folder, ds)
    out = tmp_path / "dup"
    assert main(["duplicates", "--data", str(folder), "--out", str(out), "--candidates", "5"]) == 0
    printed = capsys.readouterr().out
    assert "3 of 12 test images (25.00%) have a near-duplicate" in printed and "duplicates.png" in printed
    for f in ("duplicates.json", "duplicates.csv", "groups.csv", "duplicates.png"):
        assert (out / f).is_file()
    rows = list(csv.DictReader((out / "duplicates.csv").read_text().splitlines()))
    assert len(rows) == 12 and sum(r["train_duplicate"] == "yes" for r in rows) == 3
    loaded = load_dataset(str(folder))
    idx, groups = read_groups(out / "groups.csv", loaded)
    assert sorted(idx.tolist()) == list(range(12)) and (groups["train_duplicate"] == "yes").sum() == 3
    assert main(["duplicates", "--data", str(folder), "--out", str(tmp_path / "j"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_with_train_duplicate"] == 3


def test_the_mirrored_search_through_the_command_its_files_and_the_card(tmp_path, capsys, monkeypatch):
    import cifarlab.plots

    drawn = {}
    real_grid = cifarlab.plots.image_grid
    monkeypatch.setattr(cifarlab.plots, "image_grid", lambda images, titles, *a, **k: (
        drawn.update(images=images, titles=titles), real_grid(images, titles, *a, **k)))
    ds, _ = _planted_mirrored()
    folder = tmp_path / "data"
    _write_folder(folder, ds)
    out = tmp_path / "dup"
    assert main(["duplicates", "--data", str(folder), "--out", str(out), "--candidates", "5", "--mirrored"]) == 0
    # the review sheet shows the mirrored pair's training image mirrored back, facing the test image's way
    k = next(k for k, t in enumerate(drawn["titles"]) if t.startswith("dup") and "mirrored" in t)
    assert np.array_equal(drawn["images"][k][:, 34:], ds.x_train[21][:, ::-1])
    printed = capsys.readouterr().out
    assert "4 of 12 test images (33.33%) have a near-duplicate among the 30 training images, 1 of them mirrored" \
        in printed and "mirror images compared" in printed
    loaded = load_dataset(str(folder))
    rows = list(csv.DictReader((out / "duplicates.csv").read_text().splitlines()))
    # (a pair below the threshold may be mirrored too: its best match was its mirror image)
    mirrored = [r for r in rows if r["train_mirrored"] == "yes" and r["train_duplicate"] == "yes"]
    assert len(mirrored) == 1 and sum(r["train_duplicate"] == "yes" for r in rows) == 4
    assert np.array_equal(loaded.x_train[int(mirrored[0]["train_index"])], ds.x_train[21])
    assert sum(r["test_mirrored"] == "yes" and float(r["test_score"]) >= 0.96 for r in rows) == 2
    assert main(["duplicates", "--data", str(folder), "--out", str(tmp_path / "plain"), "--candidates", "5"]) == 0
    # not compared: neither yes nor no
    rows = list(csv.DictReader((tmp_path / "plain" / "duplicates.csv").read_text().splitlines()))
    assert {r["train_mirrored"] for r in rows} == {""} and {r["test_mirrored"] for r in rows} == {""}


def test_the_card_says_when_mirrored_copies_were_counted(trained_run, image_folder):
    assert main(["duplicates", str(trained_run), "--data", str(image_folder), "--device", "cpu", "--mirrored"]) == 0
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Near-duplicates (`cifarlab duplicates`, similarity >= 0.96, mirrored copies included)" in card


def test_the_command_refuses_bad_options_before_loading_data(tmp_path, capsys):
    assert main(["duplicates", "--data", str(tmp_path / "absent"), "--threshold", "1.2"]) == 2
    assert "threshold 1.2 is not valid" in capsys.readouterr().err
    assert main(["duplicates", "--data", str(tmp_path / "absent"), "--candidates", "0"]) == 2
    assert "candidates 0 is not valid" in capsys.readouterr().err
    assert main(["duplicates", "--data", str(tmp_path / "absent"), "--tta", "flip"]) == 2
    assert "--tta applies to a run's predictions" in capsys.readouterr().err
    assert not (tmp_path / "duplicates").exists()


def test_the_model_card_quotes_the_figures_of_the_same_model_only(trained_run, image_folder, capsys):
    assert main(["duplicates", str(trained_run), "--data", str(image_folder), "--device", "cpu"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    r = json.loads((trained_run / "duplicates" / "duplicates.json").read_text())
    assert len(r["runs"]) == 1 and r["runs"][0]["tta"] == "none"
    assert read_duplicates(trained_run, "none")["run"]["accuracy"] == r["runs"][0]["accuracy"]
    assert read_duplicates(trained_run, "flip") is None  # measured with another test-time augmentation
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Near-duplicates (`cifarlab duplicates`" in card
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu", "--tta", "flip",
                 "--out", str(trained_run / "audit-flip")]) == 0
    assert "Near-duplicates" not in (trained_run / "audit-flip" / "MODEL_CARD.md").read_text()


def test_runs_are_each_scored_and_summarised(tmp_path, capsys):
    _, image_folder = _planted_folder(tmp_path / "data")
    fit(tiny_config(str(image_folder), str(tmp_path / "set"), runs=2), log=lambda _: None)
    assert main(["duplicates", str(tmp_path / "set"), "--data", str(image_folder), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    r = json.loads((tmp_path / "set" / "duplicates" / "duplicates.json").read_text())
    assert len(r["runs"]) == 2 and "over 2 runs" in printed
    accs = [e["accuracy"] for e in r["runs"]]
    assert r["runs_summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert r["runs_summary"]["accuracy"]["min"] == min(accs)
    # each run's model card finds its entry in the folder's report, and the audit's summary quotes the spread
    found = read_duplicates(tmp_path / "set" / "run-1", "none")
    assert found["run"]["run"] == r["runs"][1]["run"] and found["where"] == "the folder of its runs"
    assert main(["audit", str(tmp_path / "set"), "--data", str(image_folder), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "set" / "audit_summary.json").read_text())["near_duplicates"]
    assert summary["without_duplicate"]["mean"] == pytest.approx(
        np.mean([e["without_duplicate"]["accuracy"] for e in r["runs"]]))
    assert "Near-duplicates (`cifarlab duplicates`" in (tmp_path / "set" / "audit_summary.md").read_text()
    # one run measured again on its own at another threshold: its card quotes that, and the
    # summary refuses to pool figures counted two ways
    assert main(["duplicates", str(tmp_path / "set" / "run-1"), "--data", str(image_folder), "--device", "cpu",
                 "--threshold", "0.9"]) == 0
    assert read_duplicates(tmp_path / "set" / "run-1", "none")["method"]["threshold"] == 0.9
    assert main(["audit", str(tmp_path / "set"), "--data", str(image_folder), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "set" / "audit_summary.json").read_text())["near_duplicates"]
    assert set(summary) == {"note"} and "run-0: >= 0.96" in summary["note"] and "run-1: >= 0.9," in summary["note"]
    md = (tmp_path / "set" / "audit_summary.md").read_text()
    assert "Near-duplicates: not quoted; its runs were measured with different settings" in md


def test_one_test_image_has_no_other_to_compare_with(tmp_path):
    x = smooth_images(5, 4)
    ds = _dataset(x[:4], [0, 1, 2, 0], x[:1].copy(), [0])
    report, found = duplicates_report(ds, candidates=3)
    assert report["test_with_train_duplicate"] == 1 and report["test_with_test_duplicate"] == 0
    write_files(report, found, ds, tmp_path / "one")
    row = next(csv.DictReader((tmp_path / "one" / "duplicates.csv").read_text().splitlines()))
    assert row["train_index"] == "0" and row["test_index"] == "" and row["test_score"] == ""
