"""``cifarlab import``: the notebook's saved Keras model becomes a run folder.

The files are written here with h5py in the layouts Keras writes them (Keras 2 ``save_weights``,
the legacy whole-model ``.h5``, Keras 3 ``.weights.h5`` and ``.keras``), from a seeded model's
weights in Keras' layout, so each test knows the weights the import must recover."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, write_keras_legacy

import cifarlab
from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.keras_files import import_keras
from cifarlab.models import create_model
from cifarlab.models.keras_layout import to_keras

h5py = pytest.importorskip("h5py", reason="h5py (the keras extra) is not installed")

DEEP = [("conv2d", 32), ("relu",), ("conv2d", 32), ("relu",), ("pool",), ("dropout", 0.25), ("conv2d", 64), ("relu",),
        ("conv2d", 64), ("relu",), ("pool",), ("dropout", 0.25), ("flatten",), ("dense", 512), ("relu",),
        ("dropout", 0.5), ("dense", 10), ("softmax",)]
SHALLOW = [("conv2d", 32), ("relu",), ("pool",), ("dropout", 0.25), ("flatten",), ("dense", 512), ("relu",),
           ("dropout", 0.5), ("dense", 10), ("softmax",)]


def _config(spec, keras2: bool = False, input_shape=(32, 32, 3), padding=None) -> dict:
    """A Sequential ``to_json()`` config: Keras 3's (an InputLayer with ``batch_shape``) or Keras
    2's (``batch_input_shape`` on the first layer). ``padding`` overrides one conv's, by index."""
    layers, counts = [], {}

    def name(kind):
        counts[kind] = counts.get(kind, 0) + 1
        return kind if counts[kind] == 1 else f"{kind}_{counts[kind] - 1}"

    conv_i = 0
    for item in spec:
        kind = item[0]
        if kind == "conv2d":
            pad = (padding or {}).get(conv_i, "same")
            conv_i += 1
            layer = ("Conv2D", {"name": name("conv2d"), "filters": item[1], "kernel_size": [3, 3], "strides": [1, 1],
                                "padding": pad, "data_format": "channels_last", "dilation_rate": [1, 1],
                                "activation": "linear", "use_bias": True})
        elif kind in ("relu", "softmax"):
            layer = ("Activation", {"name": name("activation"), "activation": kind})
        elif kind == "pool":
            layer = ("MaxPooling2D", {"name": name("max_pooling2d"), "pool_size": [2, 2], "strides": [2, 2],
                                      "padding": "valid", "data_format": "channels_last"})
        elif kind == "dropout":
            layer = ("Dropout", {"name": name("dropout"), "rate": item[1]})
        elif kind == "flatten":
            layer = ("Flatten", {"name": name("flatten"), "data_format": "channels_last"})
        else:
            layer = ("Dense", {"name": name("dense"), "units": item[1], "activation": "linear", "use_bias": True})
        layers.append({"class_name": layer[0], "config": layer[1]})
    if keras2:
        layers[0]["config"]["batch_input_shape"] = [None, *input_shape]
        return {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": layers},
                "keras_version": "2.2.4", "backend": "tensorflow"}
    layers.insert(0, {"class_name": "InputLayer", "config": {"name": "input_layer", "batch_shape": [None, *input_shape]}})
    return {"module": "keras", "class_name": "Sequential", "config": {"name": "sequential", "layers": layers}}


def _weighted_names(config: dict) -> list[str]:
    return [layer["config"]["name"] for layer in config["config"]["layers"]
            if layer["class_name"] in ("Conv2D", "Dense")]


def _write_native(f, config: dict, weights: list[np.ndarray]) -> None:
    """Keras 3's ``.weights.h5`` layout: ``layers/<key>/vars/<i>``, where the key is the layer's
    class in snake case, numbered per class in the model's order, whatever the layer's name."""
    counts: dict[str, int] = {}
    it = iter(weights)
    for layer in config["config"]["layers"]:
        kind = {"Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d"}.get(layer["class_name"], layer["class_name"].lower())
        if kind == "inputlayer":
            continue
        key = kind if kind not in counts else f"{kind}_{counts[kind]}"
        counts[kind] = counts.get(kind, 0) + 1
        v = f.create_group(f"layers/{key}/vars")
        if kind in ("conv2d", "dense"):
            v["0"], v["1"] = next(it), next(it)
    f.create_group("vars")


def write_keras(path: Path, layout: str, model_name: str = "keras-deep", config: dict | None = None,
                seed: int = 0) -> tuple[Path, torch.nn.Module, dict]:
    """A Keras file of ``layout`` holding a seeded ``model_name``'s weights; returns the path,
    the model whose weights it holds, and its config."""
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    weights = to_keras(model)
    config = config or _config(DEEP if model_name == "keras-deep" else SHALLOW)
    names = _weighted_names(config)
    all_names = [layer["config"]["name"] for layer in config["config"]["layers"] if layer["class_name"] != "InputLayer"]
    if layout == "keras":
        h5 = path.with_suffix(".h5.tmp")
        write_keras(h5, "native", model_name, config, seed)
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
            z.writestr("config.json", json.dumps(config))
            z.write(h5, "model.weights.h5")
        h5.unlink()
        return path, model, config
    with h5py.File(path, "w") as f:
        if layout == "legacy":
            f.attrs["keras_version"], f.attrs["backend"] = b"2.2.4", b"tensorflow"
            write_keras_legacy(f, names, weights, all_names)
        elif layout == "legacy-model":
            f.attrs["model_config"] = json.dumps(config).encode()
            f.attrs["keras_version"] = "3.15.1"
            write_keras_legacy(f.create_group("model_weights"), names, weights, all_names, as_bytes=False)
        else:
            _write_native(f, config, weights)
    return path, model, config


def _same_weights(run: Path, model: torch.nn.Module) -> bool:
    imported = cifarlab.load_model(run).model.state_dict()
    return all(torch.equal(imported[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout,suffix", [("legacy", ".h5"), ("legacy-model", ".h5"), ("native", ".weights.h5"),
                                           ("keras", ".keras")])
@pytest.mark.parametrize("model_name", ["keras-shallow", "keras-deep"])
def test_each_keras_layout_imports_the_exact_weights(tmp_path, layout, suffix, model_name):
    path, model, _ = write_keras(tmp_path / f"m{suffix}", layout, model_name)
    logs = []
    run = cifarlab.import_keras(path, tmp_path / "run", log=logs.append)
    assert _same_weights(run, model)
    arch = json.loads((run / "architecture.json").read_text())
    assert arch["model"] == model_name and arch["classes"][0] == "airplane" and len(arch["classes"]) == 10
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), 1).numpy()
    np.testing.assert_allclose(cifarlab.load_model(run).predict(images), want, atol=1e-6)
    source = json.loads((run / "keras_import.json").read_text())
    assert source["model"] == model_name and len(source["sha256"]) == 64
    assert source["keras_version"] == ("2.2.4" if layout == "legacy" else None if layout == "native" else "3.15.1")
    assert any(f"imported {model_name}" in line for line in logs)


def test_architecture_json_from_keras_2_is_checked_layer_by_layer(tmp_path):
    """The notebook's to_json() file (Keras 2 style, input shape on the first layer) goes with a
    weights file that has no config; a network with a 'valid' convolution is refused, naming it."""
    config = _config(DEEP, keras2=True)
    path, model, _ = write_keras(tmp_path / "w.h5", "legacy", config=config)
    arch = tmp_path / "cifar10_architecture.json"
    arch.write_text(json.dumps(config))
    assert _same_weights(import_keras(path, tmp_path / "run", architecture=arch, log=lambda s: None), model)
    arch.write_text(json.dumps(_config(DEEP, keras2=True, padding={3: "valid"})))
    with pytest.raises(CifarlabError, match=r"not one of the notebook's two .* its layer 9 is Conv2D\(64, 3x3, "
                                            r"valid\), where keras-deep has Conv2D\(64, 3x3, same\)"):
        import_keras(path, tmp_path / "run2", architecture=arch, log=lambda s: None)
    assert not (tmp_path / "run2").exists()
    arch.write_text(json.dumps(_config(DEEP)))
    shallow, _, _ = write_keras(tmp_path / "shallow.h5", "legacy", "keras-shallow")
    with pytest.raises(CifarlabError, match=r"holds 3 layers with weights \(conv2d, dense, dense_1\) but keras-deep, "
                                            r"which the architecture describes, has 6"):
        import_keras(shallow, tmp_path / "run2", architecture=arch, log=lambda s: None)


def test_other_dropout_rates_import_with_a_note(tmp_path):
    spec = [("dropout", 0.3) if item == ("dropout", 0.5) else item for item in SHALLOW]
    path, model, _ = write_keras(tmp_path / "m.keras", "keras", "keras-shallow", config=_config(spec))
    logs = []
    assert _same_weights(import_keras(path, tmp_path / "run", log=logs.append), model)
    assert any("Dropout(0.3) stands where keras-shallow has Dropout(0.5)" in line for line in logs)


@pytest.mark.parametrize("names", [("zeta", "alpha", "mid", "beta", "fc", "a_out"),
                                   # a second model built in one Keras session: names that overlap the keys
                                   ("conv2d_2", "conv2d_3", "conv2d_4", "conv2d_5", "dense", "dense_1")])
def test_native_layout_keys_layers_by_class_not_by_the_names_given(tmp_path, names):
    """Keras 3 keys a layer's weights by its class, numbered in the model's order (conv2d,
    conv2d_1, ...), not by the name it was given: layers named by hand, or numbered on from an
    earlier model, import with or without the architecture, which names them otherwise."""
    config = _config(DEEP)
    for layer, name in zip((x for x in config["config"]["layers"] if x["class_name"] in ("Conv2D", "Dense")),
                           names):
        layer["config"]["name"] = name
    path, model, _ = write_keras(tmp_path / "m.weights.h5", "native", config=config)
    with h5py.File(path, "r") as f:
        assert "conv2d_3" in f["layers"] and "zeta" not in f["layers"]
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(config))
    assert _same_weights(import_keras(path, tmp_path / "run", log=lambda s: None), model)
    assert _same_weights(import_keras(path, tmp_path / "run2", architecture=arch, log=lambda s: None), model)


def test_weights_alone_that_are_not_the_notebooks_are_refused(tmp_path):
    """Without a config the shapes decide: a Dense input for 28x28 images does not fit 32x32,
    and the error suggests --image-size; with it, the import works."""
    torch.manual_seed(0)
    model = create_model("keras-deep", img_size=28).eval()
    names = ["conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "dense", "dense_1"]
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        write_keras_legacy(f, names, to_keras(model), names)
    with pytest.raises(CifarlabError, match=r"do not have the shapes of keras-shallow or keras-deep on 32x32x3 .*"
                                            r"dense \(3136, 512\).*--image-size"):
        import_keras(path, tmp_path / "run", log=lambda s: None)
    run = import_keras(path, tmp_path / "run", image_size=(28, 28), log=lambda s: None)
    assert _same_weights(run, model) and json.loads((run / "architecture.json").read_text())["input"]["height"] == 28


@pytest.mark.parametrize("content,message", [
    (b"not a keras file", "neither an HDF5 file nor a .keras zip"),
    (None, "is an HDF5 file but not one of Keras' weight layouts"),
    ("zip", "a zip without model.weights.h5"),
    ("zip-list-config", "its config.json holds no Keras model config"),
])
def test_files_that_are_not_keras_weights_are_named(tmp_path, content, message):
    path = tmp_path / "x.h5"
    if content is None:
        with h5py.File(path, "w") as f:
            f["data"] = np.zeros(3)
    elif isinstance(content, str):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", "[1]" if content == "zip-list-config" else "{}")
            if content == "zip-list-config":
                z.writestr("model.weights.h5", b"")
    else:
        path.write_bytes(content)
    with pytest.raises(CifarlabError, match=message):
        import_keras(path, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_damaged_files_and_configs_are_named(tmp_path):
    path, _, config = write_keras(tmp_path / "m.h5", "legacy", "keras-shallow")
    with h5py.File(path, "a") as f:
        del f["dense_1"]  # layer_names still lists it
    with pytest.raises(CifarlabError, match=r"the weights file is damaged or not as Keras writes it \(KeyError"):
        import_keras(path, tmp_path / "run", log=lambda s: None)
    good, _, _ = write_keras(tmp_path / "good.h5", "legacy", "keras-shallow")
    del config["config"]["layers"][1]["config"]["filters"]
    (tmp_path / "a.json").write_text(json.dumps(config))
    with pytest.raises(CifarlabError, match=r"a.json': the model config is damaged .*KeyError: 'filters'"):
        import_keras(good, tmp_path / "run", architecture=tmp_path / "a.json", log=lambda s: None)
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(CifarlabError, match=r"does not hold a Keras model config"):
        import_keras(good, tmp_path / "run", architecture=tmp_path / "a.json", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_classes_and_output_folder(tmp_path):
    path, _, _ = write_keras(tmp_path / "m.h5", "legacy", "keras-shallow")
    with pytest.raises(CifarlabError, match=r"--classes 'a,b' is not valid: the network has 10 classes"):
        import_keras(path, tmp_path / "run", classes="a,b", log=lambda s: None)
    names = ",".join(f"c{i}" for i in range(10))
    run = import_keras(path, tmp_path / "run", classes=names, log=lambda s: None)
    assert json.loads((run / "architecture.json").read_text())["classes"] == names.split(",")
    with pytest.raises(CifarlabError, match="already exists and is not empty.*--overwrite"):
        import_keras(path, run, log=lambda s: None)
    import_keras(path, run, overwrite=True, log=lambda s: None)
    with pytest.raises(CifarlabError, match=r"has 5 classes; name them in label order with --classes"):
        config = _config([("dense", 5) if item == ("dense", 10) else item for item in SHALLOW])
        torch.manual_seed(0)
        m = create_model("keras-shallow", num_classes=5)
        names_ = _weighted_names(config)
        with h5py.File(tmp_path / "five.h5", "w") as f:
            write_keras_legacy(f, names_, to_keras(m), names_)
        import_keras(tmp_path / "five.h5", tmp_path / "five", log=lambda s: None)


def test_cli_import_then_evaluate(tmp_path, capsys):
    """The imported run evaluates like any other run, on data with CIFAR-10's classes."""
    from cifarlab.data.cifar import CIFAR10_CLASSES

    data = make_image_folder(tmp_path / "d", classes=CIFAR10_CLASSES, n_train=1, n_test=2)
    path, model, _ = write_keras(tmp_path / "m.h5", "legacy", "keras-shallow")
    assert main(["import", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "imported keras-shallow (4,200,842 parameters" in out
    assert "classes, in label order: airplane, automobile, bird" in out and "(CIFAR-10's; --classes names" in out
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ds = cifarlab.load_dataset(str(data))
    with torch.no_grad():
        logits = model(torch.from_numpy(ds.x_test).permute(0, 3, 1, 2).float() / 255)
    assert report["accuracy"] == pytest.approx((logits.argmax(1).numpy() == ds.y_test).mean())
    assert main(["audit", str(tmp_path / "run"), "--data", str(data)]) == 0
    card = (tmp_path / "run" / "audit" / "MODEL_CARD.md").read_text()
    assert "- Trained in Keras 2.2.4 and imported with `cifarlab import` from `" in card
    assert "None" not in card and "Recipe, optimizer and epochs: [TO BE FILLED IN" in card
    # and fine-tuned from, every tensor copied (the same model and classes)
    assert main(["train", "--data", str(data), "--model", "keras-shallow", "--epochs", "1", "--val-split", "0",
                 "--init-from", str(tmp_path / "run"), "--out", str(tmp_path / "tuned"), "--threads", "1"]) == 0
    assert f"weights from {tmp_path / 'run'}, all of them" in capsys.readouterr().out
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["init_from"]["fresh"] == []
    capsys.readouterr()
    assert main(["import", str(path), "--image-size", "0x5"]) == 2
    assert "--image-size '0x5' is not valid; expected HxW" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "saved_model").mkdir()
    assert main(["import", str(tmp_path / "saved_model")]) == 2
    assert "is a folder (a TensorFlow SavedModel, perhaps)" in capsys.readouterr().err


def test_without_h5py_the_error_names_the_package(tmp_path, monkeypatch):
    path, _, _ = write_keras(tmp_path / "m.h5", "legacy", "keras-shallow")
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # as if not installed
    with pytest.raises(CifarlabError, match=r"needs h5py; install it with pip install h5py"):
        import_keras(path, tmp_path / "run", log=lambda s: None)


def _trained_like_run(tmp_path: Path, model_name: str, prep: dict | None = None) -> tuple[Path, torch.nn.Module]:
    """A run folder of a seeded model, as ``cifarlab import`` would write it from Keras."""
    path, model, _ = write_keras(tmp_path / "src.h5", "legacy", model_name, seed=5)
    run = import_keras(path, tmp_path / "run", log=lambda s: None)
    if prep:
        arch = json.loads((run / "architecture.json").read_text())
        arch["preprocessing"].update(prep)
        (run / "architecture.json").write_text(json.dumps(arch))
    return run, model


@pytest.mark.parametrize("model_name", ["keras-shallow", "keras-deep"])
def test_export_writes_weights_keras_loads_by_layer_order(tmp_path, model_name):
    """The file has Keras' save_weights layout: layer_names in order, each layer's kernel and
    bias in Keras' shapes under weight_names, a keras_version that is not "1" (which Keras would
    convert from Keras 1's layout); and it imports back to the same weights."""
    run, model = _trained_like_run(tmp_path, model_name)
    out = tmp_path / "cifar10_weights.h5"
    assert main(["export", str(run), "--out", str(out)]) == 0
    want = to_keras(model)
    with h5py.File(out, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        assert f.attrs["backend"] == "tensorflow" and f.attrs["keras_version"] not in ("1", b"1")
        got = []
        for n in names:
            for w in f[n].attrs["weight_names"]:
                got.append(np.asarray(f[n][w.decode() if isinstance(w, bytes) else w]))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert names[0] == "conv2d" and names[-1] == "dense_1"
    back = import_keras(out, tmp_path / "back", log=lambda s: None)
    assert _same_weights(back, model)


def test_export_to_keras_refuses_what_keras_could_not_load(tmp_path, capsys):
    run, _ = _trained_like_run(tmp_path, "keras-shallow", prep={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    assert main(["export", str(run), "--out", str(tmp_path / "w.weights.h5")]) == 2
    assert "give a name ending in .h5 only" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "w.h5"), "--tta", "flip"]) == 2
    assert "--tta applies to ONNX files, not to Keras weights" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "w.h5"), "--opset", "17", "--no-check"]) == 2
    assert "--opset and --no-check apply to ONNX files, not to Keras weights" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "w.h5"), "--uncalibrated"]) == 2
    assert "--uncalibrated applies to ONNX files" in capsys.readouterr().err
    assert not (tmp_path / "w.h5").exists()
    from cifarlab.calibrate import weights_digest

    (run / "calibration.json").write_text(json.dumps({"format": "cifarlab-calibration-1", "by_tta": {
        "none": {"temperature": 1.5, "weights_sha256": weights_digest(run)}}}))
    assert main(["export", str(run), "--out", str(tmp_path / "w.h5")]) == 0
    out = capsys.readouterr().out
    assert "normalises images by the mean [0.5, 0.5, 0.5]" in out
    assert "a temperature of 1.5, which the weights do not hold" in out and "offsets" not in out
    classes = json.loads((run / "architecture.json").read_text())["classes"]
    (run / "calibration.json").write_text(json.dumps({"format": "cifarlab-calibration-1", "by_tta": {
        "none": {"temperature": 1.5, "weights_sha256": weights_digest(run), "balance_classes": {
            "class_offsets": {c: 0.25 * k for k, c in enumerate(classes)}}}}}))
    assert main(["export", str(run), "--out", str(tmp_path / "w.h5")]) == 0
    offsets = ", ".join(f"{0.25 * k:.4g}" for k in range(len(classes)))
    assert f"in the order of the classes, to balance the classes as 'cifarlab calibrate --balance-classes' did: " \
           f"{offsets}" in capsys.readouterr().out
    from cifarlab.export import save_architecture, save_weights

    speed = tmp_path / "speed"
    speed.mkdir()
    net = create_model("speednet-proxy")
    save_weights(speed / "weights.safetensors", net)
    save_architecture(speed, "speednet-proxy", {"num_classes": 10}, [f"c{i}" for i in range(10)], (3, 32, 32),
                      {"rescale": 1 / 255}, 1)
    assert main(["export", str(speed), "--out", str(tmp_path / "s.h5")]) == 2
    assert "only the notebook's networks (keras-shallow, keras-deep) have a Keras counterpart" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "w.weights.h5").exists()
