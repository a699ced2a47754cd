"""export --int8: an int8 file that keeps the float32 file's interface and metadata, calibrated on
training images, measured against the float32 file on the test images, written whole or not at all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.errors import CifarlabError

onnx = pytest.importorskip("onnx", reason="ONNX export is tested with the onnx extra (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="PyTorch's ONNX exporter needs onnxscript")
ort = pytest.importorskip("onnxruntime", reason="the int8 files are made and run with onnxruntime")

from cifarlab import quantize  # noqa: E402
from cifarlab.deploy import export_onnx  # noqa: E402

from conftest import random_run  # noqa: E402


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _int8_weights(path) -> dict[str, str]:
    """Each Conv and Gemm node of the file, and the type of the initializer its weight is
    dequantized from ('' where its weight is no dequantized initializer)."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm"):
            src = made_by.get(n.input[1])
            w = inits.get(src.input[0]) if src is not None and src.op_type == "DequantizeLinear" else None
            out[n.name] = onnx.TensorProto.DataType.Name(w.data_type) if w is not None else ""
    return out


def test_cli_writes_a_measured_int8_file_beside_the_run(trained_run, capsys):
    assert main(["export", str(trained_run), "--int8", "--calibration-images", "9"]) == 0
    out, err = capsys.readouterr()
    path, report_path = trained_run / "model.int8.onnx", trained_run / "model.int8.json"
    assert path.is_file() and report_path.is_file() and not (trained_run / "model.onnx").exists()
    assert f"wrote {path}" in out and "on 9 training images" in out and "on 9 test images" in out
    assert "calibrating the int8 ranges (minmax) on 9 training images" in err  # progress on stderr
    weights = _int8_weights(path)
    assert weights and set(weights.values()) == {"INT8"}  # every Conv and Gemm takes int8 weights
    report = json.loads(report_path.read_text())
    assert report["bytes"] == path.stat().st_size < report["float32_bytes"] / 3
    assert report["calibration"] == {"images": 9, "method": "minmax", "split": "training", "seed": 0}
    t = report["test"]
    assert (t["a"], t["b"], t["images"]) == ("float32", "int8", 9)  # 3 test images per class
    assert [r["class"] for r in t["per_class"]] == ["cat", "dog", "frog"]
    assert t["both_right"] + t["only_a"] + t["only_b"] + t["both_wrong"] == 9
    assert f"Test score {t['loss_int8']:.4f} int8 against {t['loss_float32']:.4f} float32" in out
    assert 0 <= t["ece_int8"] <= 1 and 0 <= t["ece_float32"] <= 1
    meta = _meta(path)
    assert json.loads(meta["classes"]) == ["cat", "dog", "frog"] and "out_of_scope_uses" in meta  # the float's
    q = json.loads(meta["quantization"])
    assert q["test_accuracy_int8"] == t["accuracy_b"] and q["calibration"]["images"] == 9
    # the same interface as the float32 file: uint8 (N, H, W, C) in, probabilities out, any batch size
    export_onnx(trained_run, log=lambda s: None)
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": images})[0]
           for p in (trained_run / "model.onnx", path)]
    assert run[1].shape == (5, 3) and np.allclose(run[1].sum(1), 1, atol=1e-5)
    assert np.abs(run[0] - run[1]).max() < 0.05  # int8 rounding, not another model


@pytest.mark.parametrize("name", ["keras-deep", "resnet20", "speednet"])
def test_each_family_of_model_quantizes_close_to_its_float_file(tmp_path, name, monkeypatch):
    """The notebook's net, a residual net and a speed net (batch norms after pooling, GELU):
    their convolution and dense layers become int8 and the probabilities stay close; nothing is
    left in the working folder."""
    monkeypatch.chdir(tmp_path)
    prep = {"rescale": 1 / 255, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    run = random_run(tmp_path, name, prep)
    export_onnx(run, tmp_path / "f.onnx", tta="flip", log=lambda s: None)
    rng = np.random.default_rng(0)
    quantize.quantize_file(tmp_path / "f.onnx", tmp_path / "q.onnx", rng.integers(0, 256, (64, 32, 32, 3), np.uint8))
    assert set(_int8_weights(tmp_path / "q.onnx").values()) == {"INT8"}
    images = rng.integers(0, 256, (16, 32, 32, 3), np.uint8)
    (f,), _ = quantize.run_file(tmp_path / "f.onnx", images, ["probabilities"])
    (q,), _ = quantize.run_file(tmp_path / "q.onnx", images, ["probabilities"])
    assert np.abs(f - q).max() < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.onnx", "q.onnx", name])


def test_a_class_that_int8_costs_is_named(monkeypatch):
    """Int8 that keeps the overall accuracy but loses one class (Hooker et al.): the class is
    named in the report and warned about; a change within chance is not."""
    labels = np.repeat(np.arange(3), 40)
    right = np.eye(3, dtype=np.float32)[labels]
    hurt = right.copy()
    hurt[:40] = np.eye(3, dtype=np.float32)[1]  # every cat called a dog
    outputs = {"f": [right], "q": [hurt]}
    monkeypatch.setattr(quantize, "run_file", lambda path, images, names: (outputs[str(path)], 1.0))
    c = quantize.compare_files("f", "q", np.zeros((120, 1)), labels, ["cat", "dog", "frog"])
    assert c["classes_lost"] == ["cat"] and c["difference"] == pytest.approx(-1 / 3)
    # certain and right in float32, certain and a third wrong in int8
    assert (c["ece_float32"], c["ece_int8"]) == (0.0, pytest.approx(1 / 3)) and c["loss_int8"] > 20
    report = {"path": "m.int8.onnx", "bytes": 1e6, "float32_bytes": 4e6, "test": c,
              "calibration": {"method": "minmax", "images": 10}}
    text = quantize.format_int8_report(report)
    assert "WARNING: the int8 file is less accurate on cat beyond chance" in text and "cat -1.0000" in text
    outputs["q"] = [np.r_[np.eye(3, dtype=np.float32)[[1]], right[1:]]]  # one cat lost: chance
    c = quantize.compare_files("f", "q", np.zeros((120, 1)), labels, ["cat", "dog", "frog"])
    assert c["classes_lost"] == [] and "no class lost accuracy beyond chance" in quantize.format_int8_report(
        report | {"test": c})


def test_a_group_that_int8_costs_is_named(monkeypatch):
    """Two groups of images across all classes: int8 loses every dark image of class cat only.
    The dark group is named (the loss is within it), the bright one is not."""
    labels = np.repeat(np.arange(3), 60)
    light = np.array(["dark", "bright"] * 90)
    right = np.eye(3, dtype=np.float32)[labels]
    hurt = right.copy()
    hurt[(labels == 0) & (light == "dark")] = np.eye(3, dtype=np.float32)[2]
    monkeypatch.setattr(quantize, "run_file",
                        lambda path, images, names: ({"f": [right], "q": [hurt]}[str(path)], 1.0))
    c = quantize.compare_files("f", "q", np.zeros((180, 1)), labels, ["cat", "dog", "frog"],
                               groups=(np.arange(180), {"light": light}))
    assert [(g["attribute"], g["group"]) for g in c["groups_lost"]] == [("light", "dark")]
    assert c["groups_lost"][0]["difference"] == pytest.approx(-30 / 90)
    report = {"path": "m.int8.onnx", "bytes": 1e6, "float32_bytes": 4e6, "test": c,
              "calibration": {"method": "minmax", "images": 10}}
    assert "WARNING: the int8 file is less accurate on the light group 'dark' beyond chance (-0.3333" in \
        quantize.format_int8_report(report)
    from cifarlab.audit import _int8_lines

    q = {"file": "m.int8.onnx", "bytes": 1e6, "float32_bytes": 4e6, "data": "d", "images": 180,
         "accuracy_float32": 1.0, "accuracy_int8": c["accuracy_b"], "difference_ci": c["difference_ci"],
         "changed_class": 1 - c["agreement"], "classes_lost": [], "groups_compared": ["light"],
         "groups_lost": c["groups_lost"]}
    assert "by group (light), less accurate beyond chance on light **dark** (-0.3333" in _int8_lines(q)[0]


def test_cli_int8_by_group(trained_run, tmp_path, capsys):
    groups = tmp_path / "groups.csv"
    groups.write_text("index,light,site\n" + "".join(f"{i},{'dark' if i < 5 else 'bright'},{'xy'[i % 2]}\n"
                                                     for i in range(9)))
    assert main(["export", str(trained_run), "--int8", "--calibration-images", "6", "--groups", str(groups),
                 "--intersections"]) == 0
    assert "by group (light, site, light & site): " in capsys.readouterr().out
    t = json.loads((trained_run / "model.int8.json").read_text())["test"]
    assert list(t["by_attribute"]) == ["light", "site", "light & site"] and "groups_lost" in t
    assert [(r["group"], r["support"]) for r in t["by_attribute"]["light"]["groups"]] == [("bright", 4), ("dark", 5)]
    capsys.readouterr()
    assert main(["export", str(trained_run), "--int8", "--intersections"]) == 2
    assert "--intersections pairs the attributes of a groups file; give one with --groups" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--groups", str(groups)]) == 2
    assert "--groups applies to --int8" in capsys.readouterr().err


def test_int8_options_and_their_errors(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--int8", "--calibration-images", "0"]) == 2
    assert "--calibration-images 0 is not valid; give a positive number" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--calibration-images", "5"]) == 2
    assert "--calibration-images applies to --int8" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--data", str(tmp_path)]) == 2
    assert "--data applies to --int8 (the float32 file needs no data)" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--int8", "--out", str(tmp_path / "w.h5")]) == 2
    assert "--int8 applies to ONNX files, not to Keras weights" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--int8", "--out", str(tmp_path / "m.int8")]) == 2
    assert "is not a .onnx file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(trained_run), "--int8", "--calibration-method", "kl"])
    assert "invalid choice: 'kl'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx")) and not (trained_run / "model.int8.onnx").exists()


def test_a_failed_quantization_leaves_no_file(trained_run, monkeypatch):
    from cifarlab.data import load_dataset

    ds = load_dataset(trained_run.parent / "imgs")
    path = trained_run / "model.int8.onnx"
    path.write_bytes(b"earlier export")

    def broken(*a, **k):
        raise CifarlabError("calibration failed")

    monkeypatch.setattr(quantize, "quantize_file", broken)
    with pytest.raises(CifarlabError, match="calibration failed"):
        quantize.export_int8(trained_run, ds, log=lambda s: None)
    assert path.read_bytes() == b"earlier export" and not (trained_run / "model.int8.json").exists()
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".model.int8")]


def test_data_of_other_classes_is_refused_before_anything_is_written(trained_run, tmp_path):
    import cifarlab
    from conftest import make_image_folder

    ds = cifarlab.load_dataset(make_image_folder(tmp_path / "other", classes=("cat", "dog", "emu")))
    with pytest.raises(CifarlabError, match=r"the data's 3 classes differ from the model's 3 \(not among the model's: "
                                            r"emu; missing from the data: frog\)"):
        cifarlab.export_int8(trained_run, ds, log=lambda s: None)
    assert not (trained_run / "model.int8.onnx").exists() and not (trained_run / "model.int8.json").exists()


def test_the_familiarity_output_is_kept_and_its_threshold_checked(trained_run, capsys):
    assert main(["ood", str(trained_run), "synthetic:uniform", "--count", "4", "--score", "energy", "--keep", "0.5",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(trained_run), "--int8", "--calibration-images", "6",
                 "--calibration-method", "percentile"]) == 0
    assert "of the test images on the same side of the threshold as in float32" in capsys.readouterr().out
    path = trained_run / "model.int8.onnx"
    outputs = [o.name for o in ort.InferenceSession(str(path)).get_outputs()]
    assert outputs == ["probabilities", "familiarity"] and "unfamiliar_below" in _meta(path)
    report = json.loads((trained_run / "model.int8.json").read_text())
    assert 0 <= report["test"]["familiarity_same_side"] <= 1 and report["calibration"]["method"] == "percentile"


def test_the_model_card_quotes_the_int8_copy_while_the_run_is_unchanged(trained_run, capsys):
    assert main(["export", str(trained_run), "--int8", "--calibration-images", "6"]) == 0
    report = json.loads((trained_run / "model.int8.json").read_text())
    assert main(["audit", str(trained_run)]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    t = report["test"]
    assert (f"Its int8 copy (`cifarlab export --int8`: `model.int8.onnx`, {report['bytes'] / 1e6:.1f} MB against "
            f"{report['float32_bytes'] / 1e6:.1f} MB in float32) reached {t['accuracy_b']:.4f} against "
            f"{t['accuracy_a']:.4f} on the 9 test images of") in card
    card_json = json.loads((trained_run / "audit" / "model_card.json").read_text())
    assert card_json["metrics"]["int8"]["classes_lost"] == [] and card_json["metrics"]["int8"]["images"] == 9
    # a temperature fitted since: the int8 file was measured without it, so the card leaves it out
    assert main(["calibrate", str(trained_run)]) == 0
    assert main(["audit", str(trained_run)]) == 0
    capsys.readouterr()
    assert "int8" not in (trained_run / "audit" / "MODEL_CARD.md").read_text()
