"""ONNX export: the file reproduces the run's predictions without PyTorch, carries its classes
and intended use, and is written whole or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cifarlab
from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.models import list_models

from conftest import random_run

onnx = pytest.importorskip("onnx", reason="ONNX export is tested with the onnx extra (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="PyTorch's ONNX exporter needs onnxscript")
ort = pytest.importorskip("onnxruntime", reason="the exported files are run with onnxruntime")

from cifarlab.deploy import export_onnx  # noqa: E402


def _run(sess, images: np.ndarray) -> np.ndarray:
    return sess.run(["probabilities"], {"images": images})[0]


def test_exported_file_reproduces_predict_on_any_batch_size(trained_run):
    report = export_onnx(trained_run, log=lambda s: None)
    path = trained_run / "model.onnx"
    assert report["path"] == str(path) and path.is_file()
    assert report["check"]["max_abs_diff"] <= 1e-4 and report["check"]["images"] == 16
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    predictor = cifarlab.load_model(trained_run)
    rng = np.random.default_rng(1)
    for n in (1, 5):  # the batch dimension is free
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        got = _run(sess, images)
        assert got.shape == (n, 3) and np.allclose(got.sum(1), 1, atol=1e-5)
        assert np.abs(got - predictor.predict(images)).max() <= 1e-5
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog", "frog"]
    assert json.loads(meta["input"])["layout"] == "NHWC" and meta["test_time_augmentation"] == "none"
    assert any("surveilling people" in u for u in json.loads(meta["out_of_scope_uses"]))
    assert meta["source_run"] == trained_run.name and meta["architecture"] == "keras-shallow"
    assert "people_classes" not in meta  # cat, dog and frog are no people


def test_the_owners_answers_join_the_metadata(trained_run, tmp_path, capsys):
    about = tmp_path / "about.yaml"
    about.write_text("model:\n  developers: Ada Example\n  contact: ada@example.org\ndata:\n  consent: n/a\n")
    out = tmp_path / "m.onnx"
    assert main(["export", str(trained_run), "--out", str(out), "--about", str(about), "--no-check"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (meta["developers"], meta["contact"]) == ("Ada Example", "ada@example.org") and "licence" not in meta
    about.write_text("model:\n  contacts: x\n")
    assert main(["export", str(trained_run), "--out", str(tmp_path / "m2.onnx"), "--about", str(about)]) == 2
    assert "unknown key 'model.contacts'" in capsys.readouterr().err and not (tmp_path / "m2.onnx").exists()
    assert main(["export", str(trained_run), "--out", str(tmp_path / "w.h5"), "--about", str(about)]) == 2
    assert "--about applies to ONNX files" in capsys.readouterr().err


def test_the_metadata_of_a_model_that_sorts_people_says_so():
    from types import SimpleNamespace

    from cifarlab.deploy import _metadata

    fake = SimpleNamespace(input_shape=(3, 32, 32), classes=["bicycle", "man", "woman"], prep={}, arch={"model": "m"},
                           temperature=lambda: None, class_offsets=lambda: None, calibration=lambda: None)
    meta = _metadata(fake, Path("run"), "none")
    assert meta["people_classes"].startswith("the classes man, woman label people by how they look")


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_test_time_augmentation(tmp_path, name):
    """Each model, with flip + translate test-time augmentation (six passes, reflect padding) and
    featurewise normalisation inside the graph, gives PyTorch's probabilities. A model whose graph
    is another's with other widths or more blocks takes the flip alone (two passes), since the
    exporter's time grows with the copies: resnet56 (resnet20's; six copies took 40 s),
    speednet-proxy (speednet's) and speednet-wide2 (speednet-wide's, its GELU after the sum)."""
    tta = "flip" if name in ("resnet56", "speednet-proxy", "speednet-wide2") else "flip-translate"
    prep = {"rescale": 1 / 255, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    run = random_run(tmp_path, name, prep)
    report = export_onnx(run, tmp_path / "m.onnx", tta=tta, log=lambda s: None)
    assert report["tta"] == tta and report["check"]["max_abs_diff"] <= 1e-4
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = cifarlab.load_model(run, tta=tta).predict(images)
    assert np.abs(_run(sess, images) - want).max() <= 1e-4
    assert np.abs(want - cifarlab.load_model(run, tta="none").predict(images)).max() > 1e-6  # TTA changes them


def test_cli_export_and_its_errors(trained_run, tmp_path, capfd):
    out = tmp_path / "deploy" / "cls.onnx"
    # In a process of its own: PyTorch's exporter warns about torchvision's operators at its
    # first export in a process only, and the user's terminal should not show them.
    p = subprocess.run([sys.executable, "-m", "cifarlab", "export", str(trained_run), "--out", str(out), "--tta", "flip"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert f"wrote {out}" in p.stdout and "test-time augmentation flip" in p.stdout
    assert "checked with onnxruntime" in p.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["test_time_augmentation"] == "flip"
    assert main(["export", str(trained_run), "--out", str(tmp_path / "cls.pt")]) == 2
    assert "cls.pt' is not a .onnx file name" in capfd.readouterr().err
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert f"run folder '{tmp_path / 'nope'}' does not exist" in capfd.readouterr().err
    assert main(["export", str(trained_run), "--opset", "999"]) == 2
    assert "--opset 999 is not an ONNX opset this onnx knows" in capfd.readouterr().err
    # An opset the converter cannot reach is refused, not silently replaced by the exporter's own.
    assert main(["export", str(trained_run), "--out", str(tmp_path / "old.onnx"), "--opset", "13"]) == 2
    err = capfd.readouterr().err
    assert "--opset 13: the ONNX converter could not express this model in opset 13" in err
    assert "Traceback" not in err and not (tmp_path / "old.onnx").exists()
    assert export_onnx(trained_run, tmp_path / "o17.onnx", opset=17, log=lambda s: None)["opset"] == 17


def test_a_graph_that_disagrees_leaves_no_file(trained_run, monkeypatch):
    """When the exported probabilities differ from PyTorch's the export fails and writes nothing
    (not even a temporary file), keeping an earlier export intact."""
    import cifarlab.deploy as deploy

    path = trained_run / "model.onnx"
    path.write_bytes(b"earlier export")
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)  # every difference, even 0, is too large
    with pytest.raises(CifarlabError, match="does not reproduce the model"):
        export_onnx(trained_run, log=lambda s: None)
    assert path.read_bytes() == b"earlier export"
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".model.onnx")]


def test_without_onnxruntime_the_file_is_written_unchecked(trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    lines = []
    report = export_onnx(trained_run, log=lines.append)
    assert report["check"] is None and (trained_run / "model.onnx").is_file()
    assert lines[-1] == "not checked: onnxruntime is not installed (pip install onnxruntime)"


def test_without_the_exporters_packages_the_error_names_the_extra(trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(CifarlabError, match=r"onnxscript is not installed\): pip install onnx onnxscript onnxruntime"):
        export_onnx(trained_run, log=lambda s: None)
    assert not (trained_run / "model.onnx").exists()


@pytest.mark.parametrize("score, tta", [("energy", "none"), ("msp", "flip"), ("maxlogit", "none"), ("knn", "none"),
                                        ("knn", "flip")])
def test_the_file_carries_the_unfamiliar_images_threshold_of_ood(trained_run, score, tta, capsys):
    assert export_onnx(trained_run, log=lambda s: None)["unfamiliar_below"] is None  # no ood report: no such output
    assert [o.name for o in ort.InferenceSession(str(trained_run / "model.onnx")).get_outputs()] == ["probabilities"]
    assert main(["ood", str(trained_run), "synthetic:uniform", "--count", "4", "--score", score, "--keep", "0.5",
                 "--tta", tta, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    said = []
    report = export_onnx(trained_run, tta=tta, log=said.append)
    rule = {"output": "familiarity", "score": score, "threshold": r["threshold"], "keep": 0.5,
            "fitted_on": "validation"}
    if score == "knn":  # the bank travels in the file: the training images' features the report's scores used
        rule |= {"k": r["knn"]["k"], "bank_images": r["knn"]["bank_images"]}
        assert f"the features of {r['knn']['bank_images']} training images in the file" in said[0]
    assert report["unfamiliar_below"] == rule and report["check"]["familiarity_max_rel_diff"] <= 1e-4
    path = trained_run / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["unfamiliar_below"]) == rule
    # the file flags exactly the images predict --flag-unfamiliar flags
    from PIL import Image

    files = sorted((trained_run.parent / "imgs" / "test").rglob("*.png"))
    assert main(["predict", str(trained_run), *map(str, files), "--flag-unfamiliar", "--tta", tta, "--json"]) == 0
    flags = {p["file"]: p["unfamiliar"] for p in json.loads(capsys.readouterr().out)["predictions"]}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    probs, familiarity = sess.run(["probabilities", "familiarity"], {"images": images})
    assert familiarity.shape == (len(files),) and probs.shape == (len(files), 3)
    assert (familiarity < rule["threshold"]).tolist() == [flags[str(f)] for f in files]
    assert 0 < sum(flags.values()) < len(files)  # the threshold keeping half flags some of the test images


def test_a_stale_report_or_a_lost_bank_is_not_exported(trained_run, capsys):
    assert main(["ood", str(trained_run), "synthetic:blank", "--count", "3", "--score", "knn", "--json"]) == 0
    capsys.readouterr()
    assert export_onnx(trained_run, log=lambda s: None, tta="flip")["unfamiliar_below"] is None  # measured without
    (trained_run / "ood" / "knn_bank.safetensors").unlink()
    said = []
    assert export_onnx(trained_run, log=said.append)["unfamiliar_below"] is None
    assert any("no 'familiarity' output: cannot read the knn score's bank" in s for s in said)


def test_a_runs_folder_exports_as_one_file_of_their_ensemble(tmp_path, image_folder, capsys):
    """The folder of --runs N exports as one graph: every run with its own preprocessing and
    calibration, the mean of their probabilities out, as load_ensemble predicts; the metadata
    names the runs and holds each one's figures. cifarlab ood's threshold, one run's, stays out.
    --int8 writes the ensemble's int8 copy, measured against it; Keras weights take one run."""
    from conftest import tiny_config

    from cifarlab.export import load_ensemble
    from cifarlab.train import fit

    base = tmp_path / "set"
    fit(tiny_config(str(image_folder), str(base), runs=2), log=lambda s: None)
    assert main(["calibrate", str(base / "run-1")]) == 0  # run-0 stays uncalibrated
    assert main(["ood", str(base / "run-0"), "synthetic:gaussian"]) == 0  # a threshold, which is not exported
    capsys.readouterr()
    assert main(["export", str(base)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {base / 'model.onnx'}" in printed and "the mean of the 2 runs' (metadata 'ensemble_of'" in printed
    sess = ort.InferenceSession(str(base / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]
    images = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ens = load_ensemble(base)
    got, want = _run(sess, images), ens.predict(images)
    assert np.abs(got - want).max() <= 1e-5
    assert not np.allclose(want, ens.members[0].predict(images), atol=1e-4)  # not one run's alone
    meta = {p.key: p.value for p in onnx.load(str(base / "model.onnx")).metadata_props}
    assert json.loads(meta["ensemble_of"]) == ["run-0", "run-1"] and meta["source_run"] == "set"
    t = json.loads(meta["temperature"])
    assert t[0] is None and t[1] == pytest.approx(ens.members[1].temperature())
    assert len(json.loads(meta["preprocessing"])) == 2 and "unfamiliar_below" not in meta
    assert any("surveilling people" in u for u in json.loads(meta["out_of_scope_uses"]))
    assert main(["export", str(base), "--out", str(tmp_path / "w.h5")]) == 2
    assert "holds 2 runs of 'cifarlab train --runs' (run-0, run-1); give one of them" in capsys.readouterr().err
    from cifarlab.calibrate import weights_digest

    assert main(["export", str(base), "--int8", "--calibration-images", "9"]) == 0
    assert f"wrote {base / 'model.int8.onnx'}" in capsys.readouterr().out
    report = json.loads((base / "model.int8.json").read_text())
    runs = [base / "run-0", base / "run-1"]
    assert report["ensemble_of"] == [str(r) for r in runs]
    assert report["weights_sha256"] == [weights_digest(r) for r in runs]
    assert report["test"]["images"] == 9 and report["temperature"][1] == pytest.approx(ens.members[1].temperature())
    meta = {p.key: p.value for p in onnx.load(str(base / "model.int8.onnx")).metadata_props}
    assert json.loads(meta["ensemble_of"]) == ["run-0", "run-1"] and "quantization" in meta
    int8 = _run(ort.InferenceSession(str(base / "model.int8.onnx"), providers=["CPUExecutionProvider"]), images)
    assert np.abs(int8 - want).max() < 0.05  # the ensemble, with int8 rounding
    # the audit's section on the ensemble quotes it, while every run and the ensemble are as it was measured
    assert main(["audit", str(base), "--bootstrap", "100"]) == 0
    t = report["test"]
    section = (base / "audit_summary.md").read_text().split("## Their ensemble")[1]
    assert (f"Its int8 copy (`cifarlab export --int8`: `model.int8.onnx`, {report['bytes'] / 1e6:.1f} MB against "
            f"{report['float32_bytes'] / 1e6:.1f} MB in float32) reached {t['accuracy_b']:.4f} against "
            f"{t['accuracy_a']:.4f} on the 9 test images of") in section
    assert json.loads((base / "audit_summary.json").read_text())["ensemble"]["int8"]["images"] == 9
    assert main(["calibrate", str(base / "run-0")]) == 0  # measured without this temperature
    assert main(["audit", str(base), "--bootstrap", "100"]) == 0
    capsys.readouterr()
    assert "int8" not in (base / "audit_summary.md").read_text().split("## Their ensemble")[1]
