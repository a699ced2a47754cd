"""Sweeps: a grid of settings trained point by point, ranked by validation accuracy."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from cifarlab.cli import main
from cifarlab.errors import ConfigError
from cifarlab.sweep import parse_axes, plan, point_name


def test_axes_are_parsed_and_bad_ones_named():
    assert parse_axes(["lr=0.001, 5e-4", "batch-size=64"]) == {"lr": ["0.001", "5e-4"], "batch_size": ["64"]}
    for specs, msg in ((["lr"], "--sweep 'lr' is not valid; expected OPTION=VALUE,VALUE"),
                       (["lr=0.1,"], "--sweep 'lr=0.1,' is not valid"),
                       (["lr=1", "lr=2"], "--sweep lr is given twice"),
                       (["lr=1,1"], "--sweep 'lr=1,1' gives a value twice")):
        with pytest.raises(ConfigError, match=msg):
            parse_axes(specs)
    assert point_name({"data": "a/b c", "lr": "1e-3"}) == "data=a_b_c,lr=1e-3"


def test_values_holding_commas_are_quoted_or_bracketed():
    axes = parse_axes(["class-weight=balanced, 'cat=2,dog=1'", 'x="a,b",[1,(2,3)],{k: 1, j: 2}'])
    assert axes == {"class_weight": ["balanced", "cat=2,dog=1"], "x": ["a,b", "[1,(2,3)]", "{k: 1, j: 2}"]}
    points = plan({"class_weight": axes["class_weight"]}, None, None, {})
    assert [c.train.class_weight for _, _, c in points] == ["balanced", {"cat": 2.0, "dog": 1.0}]
    # bracketed and braced values are read as a config file's YAML reads them: lists and mappings
    points = plan(parse_axes(["optim.milestones=[0.5,0.75],[0.3, 0.6, 0.9]", "class-weight={cat: 2, dog: 1}"]),
                  "resnet", None, {})
    assert [(c.optim.milestones, c.train.class_weight) for _, _, c in points] == [
        ([0.5, 0.75], {"cat": 2.0, "dog": 1.0}), ([0.3, 0.6, 0.9], {"cat": 2.0, "dog": 1.0})]
    with pytest.raises(ConfigError, match=r"--sweep optim.milestones=\[0.5,: not a list or mapping as YAML writes"):
        plan({"optim.milestones": ["[0.5,"]}, "resnet", None, {})
    for spec, msg in (("x='a,b", "--sweep \"x='a,b\" has an unclosed quote '; close it with '"),
                      ("x=[1,(2", r"--sweep 'x=\[1,\(2' has an unclosed bracket \(; close it with \)"),
                      ("x=a,,b", "quote a value that holds commas: class-weight=balanced,'cat=2,dog=1'")):
        with pytest.raises(ConfigError, match=msg):
            parse_axes([spec])


def test_every_point_is_resolved_and_checked_before_any_trains():
    points = plan(parse_axes(["recipe=keras-book,keras-book-augmented", "optim.rho=0.8,0.95"]), None, None,
                  {"train": {"epochs": 2}})
    assert [n for n, _, _ in points] == ["recipe=keras-book,optim.rho=0.8", "recipe=keras-book,optim.rho=0.95",
                                         "recipe=keras-book-augmented,optim.rho=0.8",
                                         "recipe=keras-book-augmented,optim.rho=0.95"]
    assert [(c.recipe, c.augment.preset, c.optim.rho, c.train.epochs) for _, _, c in points][1:3] == [
        ("keras-book", "none", 0.95, 2), ("keras-book-augmented", "keras", 0.8, 2)]
    with pytest.raises(ConfigError, match="--sweep point lr=fast: optim.lr: 'fast' is not valid; expected a number"):
        plan(parse_axes(["lr=0.1,fast"]), None, None, {})
    with pytest.raises(ConfigError, match="--sweep point model=kerasdeep: model = 'kerasdeep' is not valid \\(did "
                                          "you mean 'keras-deep'\\?\\); valid "
                                          "models: keras-deep"):
        plan(parse_axes(["model=keras-shallow,kerasdeep"]), None, None, {})
    with pytest.raises(ConfigError, match="unknown option 'lrr'; did you mean lr"):
        plan(parse_axes(["lrr=0.1"]), None, None, {})
    # one key by two names: the later would set it at every point, and the points named 0.1 and 0.2 be one
    for axes in (["optim.lr=0.1,0.2", "lr=0.3"], ["batch-size=64", "train.batch_size=32,128"]):
        first, second = (a.partition("=")[0].replace("-", "_") for a in axes)
        with pytest.raises(ConfigError, match=re.escape(f"--sweep {first} and --sweep {second} both set")):
            plan(parse_axes(axes), None, None, {})
    assert len(plan(parse_axes(["optim.lr=0.1,0.2", "optim.momentum=0.5"]), None, None, {})) == 2


def _sweep(capsys, data, out, *extra):
    code = main(["train", "--data", str(data), "--model", "keras-shallow", "--epochs", "1", "--batch-size", "8",
                 "--threads", "1", "--deterministic", "--out", str(out), *extra])
    return code, *capsys.readouterr()


def test_a_sweep_trains_each_point_ranks_them_and_resumes(capsys, tmp_path, image_folder):
    out = tmp_path / "sw"
    code, stdout, err = _sweep(capsys, image_folder, out, "--val-split", "0.25", "--sweep", "lr=0.001,0.0003",
                               "--sweep", "seed=0,1")
    assert code == 0, err
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["ranked_by"] == "val_accuracy" and len(summary["points"]) == 4
    vals = [p["val_accuracy"]["mean"] for p in summary["points"]]
    assert vals == sorted(vals, reverse=True)
    for p in summary["points"]:
        metrics = json.loads((out / p["name"] / "metrics.json").read_text())
        history = json.loads((out / p["name"] / "history.json").read_text())
        assert p["test_accuracy"]["mean"] == metrics["test_accuracy"] and p["runs"] == 1
        assert p["val_accuracy"]["mean"] == history[-1]["val_accuracy"]
        assert f"lr: {p['values']['lr']}" in (out / "configs" / f"{p['name']}.yaml").read_text()
    assert "ranked by validation accuracy" in stdout and stdout.count("data: ") == 1  # loaded once for all points

    shutil.rmtree(out / "lr=0.0003,seed=1")
    (out / "sweep_summary.json").unlink()
    before = (out / "lr=0.001,seed=0" / "weights.safetensors").read_bytes()
    code, stdout, err = run_main(capsys, ["train", "--resume", str(out)])
    assert code == 0, err
    assert "=== point 1/4: lr=0.001,seed=0 (finished) ===" in stdout
    assert "=== point 4/4: lr=0.0003,seed=1 (new) ===" in stdout and (out / "sweep_summary.json").is_file()
    assert (out / "lr=0.001,seed=0" / "weights.safetensors").read_bytes() == before
    (out / "lr=0.001,seed=1" / "metrics.json").unlink()
    (out / "lr=0.001,seed=1" / "checkpoint.pt").unlink()
    code, stdout, err = run_main(capsys, ["train", "--resume", str(out)])
    assert code == 2 and "holds files but neither a checkpoint nor a finished run's metrics" in err
    code, stdout, err = run_main(capsys, ["evaluate", str(out)])
    assert code == 2 and f"'{out}' is a sweep of 4 point(s), each a run folder" in err


def run_main(capsys, argv):
    code = main(argv)
    return code, *capsys.readouterr()


def test_a_sweep_without_validation_images_is_not_ranked_and_sets_of_runs_are_points(capsys, tmp_path, image_folder):
    out = tmp_path / "sw"
    code, stdout, err = _sweep(capsys, image_folder, out, "--val-split", "0", "--runs", "2", "--sweep", "lr=0.001")
    assert code == 0, err
    summary = json.loads((out / "sweep_summary.json").read_text())
    (point,) = summary["points"]
    assert summary["ranked_by"] is None and point["runs"] == 2 and point["val_accuracy"] is None
    runs = json.loads((out / "lr=0.001" / "runs_summary.json").read_text())
    assert point["test_accuracy"] == runs["test_accuracy"]
    assert "not ranked: some points have no validation images" in stdout
    code, stdout, err = _sweep(capsys, image_folder, out, "--val-split", "0", "--runs", "2", "--sweep", "lr=0.001")
    assert code == 2 and f"output folder '{out}' already exists and is not empty" in err
    code, stdout, err = _sweep(capsys, image_folder, out, "--val-split", "0", "--runs", "2", "--sweep", "lr=0.001",
                               "--overwrite")
    assert code == 0 and "=== point 1/1: lr=0.001 (new) ===" in stdout, err
    code, _, err = run_main(capsys, ["train", "--sweep", "lr=0.1", "--print-config"])
    assert code == 2 and "--print-config cannot be given with it" in err
    code, _, err = run_main(capsys, ["train", "--resume", str(out), "--epochs", "3"])
    assert code == 2 and "--epochs cannot change the points of the sweep" in err
    (out / "sweep.yaml").write_text("points: 3\n")
    code, _, err = run_main(capsys, ["train", "--resume", str(out)])
    assert code == 2 and "sweep.yaml is not a sweep's record of its points" in err


def test_a_notebook_sweeps_with_run_sweep(tmp_path, image_folder):
    import cifarlab

    s = cifarlab.run_sweep({"lr": [0.001, 0.0005]}, data=str(image_folder), model="keras-shallow", epochs=1,
                           batch_size=8, val_split=0.25, threads=1, deterministic=True, out=tmp_path / "api",
                           log=lambda line: None)
    assert sorted(p["name"] for p in s["points"]) == ["lr=0.0005", "lr=0.001"] and s["ranked_by"] == "val_accuracy"
    assert "lr: 0.0005" in (tmp_path / "api" / "configs" / "lr=0.0005.yaml").read_text()
    for axes in ({}, {"lr": []}, {"lr": 0.1}):
        with pytest.raises(ConfigError, match="sweep axes .* are not valid; give a dict of option names to lists"):
            cifarlab.run_sweep(axes)
    with pytest.raises(ConfigError, match="sweep axis 'lr' gives a value twice"):
        cifarlab.run_sweep({"lr": [0.1, 0.1]})
