"""cifarlab train --lr-find: the learning-rate range test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab import lr_find
from cifarlab.cli import main
from cifarlab.errors import CifarlabError


def test_rates_smoothing_and_the_longest_fall():
    lrs = lr_find.rates(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(lrs[1:] / lrs[:-1], 10)  # geometric
    # bias-corrected: a constant stays itself from the first value on
    assert np.allclose(lr_find.smooth([2.0] * 5), 2.0)
    assert lr_find.smooth([1.0, 3.0], beta=0.5).tolist() == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    # falls from index 1 to 7 (3.2, 3.1, 2.9, 2.5, 2.0, 1.5: the bump at index 5 skipped), then rises
    curve = np.array([3.0, 3.2, 3.1, 2.9, 2.5, 2.7, 2.0, 1.5, 2.5, 9.0])
    assert lr_find.longest_fall(curve) == (1, 7)
    assert lr_find.longest_fall(np.array([1.0, 2.0, 3.0])) == (0, 0)


def test_the_stop_rule():
    """Four times the lowest loss, as fastai and Lightning; a loss near zero (weights that already
    fit) is judged against 0.1 nats instead, or its noise would end the test at once."""
    assert lr_find.diverged(8.1, 2.0) and not lr_find.diverged(7.9, 2.0)
    assert not lr_find.diverged(5e-4, 1e-4) and not lr_find.diverged(0.39, 1e-4)
    assert lr_find.diverged(0.41, 1e-4)


def test_the_centred_smoothing_does_not_lag():
    """Half a decade of rates around each point (here 8 steps a decade: 2 either side), fewer at
    the ends; a straight line stays where it is, where the exponential average trails it."""
    lrs = lr_find.rates(1e-4, 1.0, 33)
    line = np.linspace(3.0, 1.0, 33)
    assert np.allclose(lr_find.centred(line, lrs)[2:-2], line[2:-2])
    assert lr_find.centred(line, lrs)[0] == pytest.approx(line[:3].mean())
    assert (lr_find.smooth(line)[5:] > line[5:] + 0.1).all()  # the stop's average lags behind
    assert lr_find.centred([2.0], lrs[:1]).tolist() == [2.0]


def test_suggestions():
    lrs = lr_find.rates(1e-5, 1.0, 21)  # four steps a decade
    loss = np.concatenate([np.full(8, 2.3), np.linspace(2.2, 1.0, 9), [1.5, 3.0, 6.0, 12.0]])
    s = lr_find.suggest(lrs, loss)
    low = int(np.argmin(loss))  # 16
    assert s["min_loss_lr"] == pytest.approx(lrs[low]) and s["min_over_10"] == pytest.approx(lrs[low] / 10)
    first, last = lr_find.longest_fall(loss)
    assert (first, last) == (7, 16)  # from the last flat point down to the lowest
    assert s["valley"] == pytest.approx(lrs[(first + last) // 2])
    assert s["valley_from"] < s["valley"] < s["valley_to"]
    assert lr_find.suggest(lrs[:5], loss[:5]) is None  # too few points
    assert s["first_loss"] == 2.3 and s["fall"] == pytest.approx(1.3 / 2.3)


def test_a_curve_that_hardly_falls_is_flagged():
    """Where the averaged loss ends less than 5% below its start, as keras-book's does in 200
    steps from scratch, the readings are printed with a warning that they rest on noise; a
    curve that falls further has none."""
    lrs = lr_find.rates(1e-7, 10.0, 40)
    flat = np.concatenate([np.linspace(2.31, 2.26, 30), [2.4, 3.0, 5.0, 9.0, 12.0, 14.0, 15.0, 16.0, 17.0, 18.0]])
    r = {"steps_run": 40, "steps": 200, "stopped": None, "config_lr": 1e-3, "folder": "f",
         "suggestion": lr_find.suggest(lrs, flat)}
    assert r["suggestion"]["fall"] == pytest.approx(0.05 / 2.31)
    text = lr_find.format_result(r)
    assert "warning: the averaged loss fell only 2.2% below where it started (2.3100 to 2.2600)" in text
    assert "more --lr-find-steps than 200" in text and "suggestions, not answers" in text
    falls = np.concatenate([np.linspace(2.31, 1.9, 30), flat[30:]])
    assert "warning" not in lr_find.format_result({**r, "suggestion": lr_find.suggest(lrs, falls)})


@pytest.mark.parametrize("args, message", [
    (["--lr-range", "1,0.1"], "--lr-range 1,0.1 is not valid; give MIN,MAX with 0 < MIN < MAX"),
    (["--lr-range", "0,1"], "--lr-range 0,1 is not valid"),
    (["--lr-range", "1e-3"], "--lr-range '1e-3' is not valid; give MIN,MAX, such as 1e-7,10"),
    (["--lr-find-steps", "3"], "--lr-find-steps 3 is not valid; give at least 10"),
    (["--runs", "2"], "--lr-find tests one run's config; --runs 2 is for training"),
    (["--print-config"], "--lr-find tests a new run's options; --print-config cannot be given with it"),
])
def test_refusals(image_folder, tmp_path, capsys, args, message):
    out = tmp_path / "lrf"
    assert main(["train", "--data", str(image_folder), "--model", "keras-shallow", "--lr-find", "--out", str(out),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_range_test_through_the_cli(image_folder, tmp_path, capsys):
    """The rates rise geometrically step by step from the range's start; the run's optimizer
    sees them (an lr far too large blows the loss up and stops the test); the files agree."""
    out = tmp_path / "lrf"
    assert main(["train", "--data", str(image_folder), "--model", "keras-shallow", "--batch-size", "4",
                 "--lr-find", "--lr-range", "1e-5,1e4", "--lr-find-steps", "40", "--out", str(out),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "lr_find.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "lr_find.csv", "lr_find.json", "lr_find.png"]
    assert r["lrs"] == pytest.approx(lr_find.rates(1e-5, 1e4, 40)[:r["steps_run"]].tolist())
    assert r["stopped"] and r["steps_run"] < 40  # RMSprop at lr 1e4 diverges
    assert f"{r['steps_run']} of 40 steps; stopped early" in printed
    assert r["smoothed"] == pytest.approx(lr_find.centred(r["losses"], np.array(r["lrs"])).tolist())
    rows = (out / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and len(rows) == r["steps_run"] + 1
    assert r["config_lr"] == 1e-3 and r["optimizer"] == "rmsprop"
    assert (r["suggestion"] is None) == (r["steps_run"] < lr_find.MIN_POINTS)


def test_each_group_keeps_its_ratio(image_folder, tmp_path, monkeypatch):
    """Every parameter group's rate is its configured one times lr / optim.lr at each step: with
    Muon, the filters' rate (muon_lr) moves with optim.lr in the config's ratio."""
    from cifarlab import train
    from cifarlab.config import resolve_config

    seen = []
    real = train._Loop.batch

    def batch(self, *args):
        seen.append([(g["lr"], g["initial_lr"], bool(g.get("muon"))) for g in self.st.optimizer.param_groups])
        return real(self, *args)

    monkeypatch.setattr(train._Loop, "batch", batch)
    cfg = resolve_config("fast-muon", overrides={
        "data": {"data": str(image_folder)}, "model": {"name": "speednet-proxy"},
        "train": {"batch_size": 6, "out": str(tmp_path / "m"), "threads": 1, "tta": "none"}})
    r = lr_find.find_lr(cfg, 1e-4, 1e-2, 12, log=lambda _: None)
    assert len(seen) == r["steps_run"] == 12
    for groups, lr in zip(seen, lr_find.rates(1e-4, 1e-2, 12)):
        for group_lr, initial, _ in groups:
            assert group_lr == pytest.approx(initial * lr / cfg.optim.lr)
    muon = [initial for _, initial, is_muon in seen[0] if is_muon]
    assert muon == [pytest.approx(cfg.optim.muon_lr)]


def test_python_api_refuses_bad_options(image_folder, tmp_path):
    from cifarlab.config import resolve_config

    cfg = resolve_config("keras-book", overrides={"data": {"data": str(image_folder)}})
    with pytest.raises(CifarlabError, match="--lr-find-steps 2 is not valid"):
        lr_find.find_lr(cfg, steps=2)
