"""The Python API, as a notebook uses it: make_config, fit, evaluate_run and audit_run on a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cifarlab
from cifarlab.errors import CifarlabError, ConfigError


def test_a_notebook_configures_trains_evaluates_and_audits_a_run(tmp_path, image_folder):
    cfg = cifarlab.make_config(data=str(image_folder), model="keras-shallow", val_split=0.25, epochs=2, batch_size=8,
                               out=str(tmp_path / "r"), threads=1, deterministic=True)
    cfg.optim.lr = 2e-3  # a field changed after make_config is what trains
    lines: list[str] = []
    m = cifarlab.fit(cfg, log=lines.append)
    assert [x.split(" - ")[0] for x in lines if x.startswith("Epoch")] == ["Epoch 1/2", "Epoch 2/2"]
    assert m["run"] == str(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]
    assert "lr: 0.002" in (tmp_path / "r" / "config.yaml").read_text()
    ds = cifarlab.load_dataset(image_folder)
    report = cifarlab.evaluate_run(tmp_path / "r", ds, device="cpu")  # into RUN/eval by default
    assert report["accuracy"] == pytest.approx(m["test_accuracy"], abs=1e-9)
    assert (tmp_path / "r" / "eval" / "confusion_matrix.png").is_file()
    audit = cifarlab.audit_run(str(tmp_path / "r"), ds, n_boot=100, device="cpu", log=lambda s: None)
    assert audit["overall_accuracy"] == report["accuracy"] and (tmp_path / "r" / "audit" / "MODEL_CARD.md").is_file()


def test_fit_checks_a_config_changed_after_make_config_and_refuses_what_is_not_one(tmp_path, image_folder):
    cfg = cifarlab.make_config(data=str(image_folder), out=str(tmp_path / "r"))
    cfg.train.epochs = 0
    with pytest.raises(ConfigError, match="epochs = 0 is not valid; it must be at least 1"):
        cifarlab.fit(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()
    with pytest.raises(CifarlabError, match=r"fit\(\) takes a Config, from cifarlab.make_config.*got str 'fast'"):
        cifarlab.fit("fast")
    cfg.train.epochs = 1
    with pytest.raises(CifarlabError, match="continues the run with its saved config; give no cfg with it"):
        cifarlab.fit(cfg, resume=tmp_path / "r")


def test_every_public_name_resolves():
    for name in cifarlab.__all__:
        assert getattr(cifarlab, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        cifarlab.trian  # noqa: B018


def test_a_notebook_trains_evaluates_and_audits_a_set_of_runs(tmp_path, image_folder):
    cfg = cifarlab.make_config(data=str(image_folder), model="keras-shallow", val_split=0.25, epochs=1, batch_size=8,
                               out=str(tmp_path / "set"), runs=2, threads=1, deterministic=True)
    s = cifarlab.fit(cfg, log=lambda line: None)
    assert s["run"] == str(tmp_path / "set") and [r["seed"] for r in s["per_run"]] == [0, 1]
    ds = cifarlab.load_dataset(image_folder)
    ev = cifarlab.evaluate_runs(s["run"], ds, device="cpu")  # paths as strings, as a notebook has them
    assert [r["accuracy"] for r in ev["per_run"]] == pytest.approx([r["test_accuracy"] for r in s["per_run"]])
    assert "uncalibrated_ece" not in ev
    ens = cifarlab.load_ensemble(s["run"])  # the runs as one classifier, as predict and evaluate_runs take them
    probs = ens.predict(ds.x_test)
    each = [cifarlab.load_model(r).predict(ds.x_test) for r in (tmp_path / "set" / "run-0", tmp_path / "set" / "run-1")]
    assert probs.dtype == np.float32 and np.allclose(probs, np.mean(each, axis=0), atol=1e-6)
    assert ev["ensemble"]["accuracy"] == pytest.approx(float((probs.argmax(1) == ds.y_test).mean()))
    files = [str(image_folder / p) for p in ds.test_paths[:2]]  # file paths, read once for both runs
    assert np.allclose(ens.predict(files), probs[:2], atol=1e-6) and ens.classes == ds.classes
    with pytest.raises(CifarlabError, match=r"'.*run-0' is one run, not the folder of 'cifarlab train --runs N'; "
                                            r"load it with load_model"):
        cifarlab.load_ensemble(tmp_path / "set" / "run-0")
    cal = cifarlab.calibrate_runs(s["run"], ds, device="cpu", log=lambda x: None)
    ev = cifarlab.evaluate_runs(s["run"], ds, device="cpu")
    assert [r["temperature"] for r in ev["per_run"]] == [r["temperature"] for r in cal["per_run"]]
    assert ev["uncalibrated_ece"]["max"] >= ev["uncalibrated_ece"]["min"] >= 0
    au = cifarlab.audit_runs(s["run"], ds, out=str(tmp_path / "audits"), n_boot=100, device="cpu", log=lambda x: None)
    assert au["runs"] == 2 and (tmp_path / "audits" / "audit_summary.md").is_file()
    assert (tmp_path / "audits" / "run-1" / "MODEL_CARD.md").is_file()
    assert au["calibration"]["temperature"]["min"] == min(r["temperature"] for r in cal["per_run"])
    assert au["calibration"]["ece"]["mean"] == pytest.approx(ev["ece"]["mean"])
    for r in au["classes"]["per_class"]:
        assert 0 <= r["overconfident_in"] <= 2 and ("overconfidence" in r)
    md = (tmp_path / "audits" / "audit_summary.md").read_text()
    assert "## Confidence by predicted class" in md and "with the runs' temperatures from `cifarlab calibrate`" in md
    assert "Answering only at a confidence of at least 0.5: " in (tmp_path / "audits" / "run-0" / "MODEL_CARD.md").read_text()
    assert au["calibration"]["balanced_classes_in"] == 0 and "--balance-classes" not in md
    cifarlab.calibrate_run(tmp_path / "set" / "run-1", ds, device="cpu", log=lambda x: None, balance_classes=True)
    au = cifarlab.audit_runs(s["run"], ds, out=str(tmp_path / "audits"), n_boot=100, device="cpu", log=lambda x: None)
    assert au["calibration"]["balanced_classes_in"] == 1
    assert "In 1 of 2 runs the probabilities were also corrected" in (tmp_path / "audits" / "audit_summary.md").read_text()
    from cifarlab.compare import compare_run_sets, format_run_sets

    sets = compare_run_sets(s["run"], s["run"])  # training's figures, which the balancing does not change
    assert sets["balanced_runs"] == [s["run"], s["run"]]
    assert "were calibrated with --balance-classes, which changes their predictions" in format_run_sets(sets)


def test_paths_and_hand_set_values_are_checked_and_converted_as_a_config_files_are(tmp_path, image_folder):
    """A notebook passes pathlib.Path objects and sets fields by hand: paths become text (the
    saved config.yaml must stay plain YAML), and a value of the wrong type is a ConfigError
    naming the key, not a TypeError from deep inside."""
    cfg = cifarlab.make_config(data=image_folder, model="keras-shallow", val_split=0.25, epochs=1, batch_size=8,
                               threads=1, deterministic=True)
    assert cfg.data.data == str(image_folder)
    cfg.train.epochs = "two"
    with pytest.raises(ConfigError, match="train.epochs: 'two' is not valid; expected a whole number"):
        cifarlab.fit(cfg, log=lambda s: None)
    cfg.train.epochs, cfg.train.out = 1, tmp_path / "r"  # a Path, set by hand
    m = cifarlab.fit(cfg, log=lambda s: None)
    assert m["run"] == str(tmp_path / "r") and f"out: {tmp_path / 'r'}" in (tmp_path / "r" / "config.yaml").read_text()
    tuned = cifarlab.make_config(data=image_folder, model="keras-shallow", init_from=tmp_path / "r")
    assert tuned.model.init_from == str(tmp_path / "r")
