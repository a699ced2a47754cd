"""Keras weight files: import a model the Keras notebook trained, and write a run's weights for Keras.

The notebook saves its network as ``model.to_json()`` and its weights with ``save_weights``.
Those files, or a whole saved model (legacy ``.h5`` or Keras 3 ``.keras``), become a run folder
(``architecture.json`` + ``weights.safetensors``), so ``evaluate``, ``predict``, ``audit`` and
``export`` work on a model trained elsewhere, and its accuracy can be compared with cifarlab's.

Three weight layouts are read, each only as arrays (nothing in them is executed):

- the legacy HDF5 layout of Keras 2 and of Keras 3's ``.h5`` saving: a ``layer_names`` attribute
  (at the root, or on ``model_weights`` in a whole-model file), one group per layer with a
  ``weight_names`` attribute;
- Keras 3's ``.weights.h5``: ``layers/<name>/vars/<i>``;
- Keras 3's ``.keras`` zip: ``config.json`` beside a ``model.weights.h5`` of the layout above.

Only the notebook's two networks are imported (``keras-shallow``, ``keras-deep``); anything else
is refused with the first layer that differs. The other way, :func:`export_keras_weights` writes
a run of one of those networks in the first layout, which Keras 2's and Keras 3's
``model.load_weights`` read by layer order. HDF5 needs h5py (the ``keras`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch.nn as nn

from .errors import CifarlabError, short_list

KERAS_MODELS = ("keras-shallow", "keras-deep")
_MAX_ZIP_MEMBER = 4 << 30  # a .keras member larger than this is not the notebook's model


@dataclass
class KerasFile:
    """What a Keras file holds: the weighted layers in order, (name, [kernel, bias]); the model
    config where the file carries one; and a name for its layout."""

    layers: list[tuple[str, list[np.ndarray]]]
    layout: str
    config: dict | None = None
    keras_version: str | None = None


def _h5py():
    try:
        import h5py
    except ImportError:
        raise CifarlabError("reading Keras .h5 files needs h5py; install it with pip install h5py (or "
                            "pip install '.[keras]' in a clone of cifarlab)") from None
    return h5py


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(value: Any) -> list[str]:
    return [_text(v) for v in np.asarray(value).reshape(-1)]


def _natural(name: str) -> list:
    """'conv2d_10' after 'conv2d_9', as Keras numbers the layers it names."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _legacy_layers(group) -> list[tuple[str, list[np.ndarray]]]:
    """Keras 2 ``save_weights`` and the legacy ``.h5`` layout: order from ``layer_names``."""
    out = []
    for name in _names(group.attrs["layer_names"]):
        g = group[name]
        arrays = [np.asarray(g[w]) for w in _names(g.attrs.get("weight_names", []))]
        if arrays:
            out.append((name, arrays))
    return out


def _native_layers(f) -> list[tuple[str, list[np.ndarray]]]:
    """Keras 3's ``layers/<key>/vars/<i>``. The keys are not the layers' names but their class
    names numbered in the model's order (conv2d, conv2d_1, ..., dense, dense_1), whatever the
    layers were called; HDF5 lists them alphabetically (conv2d_10 before conv2d_2), so they are
    sorted by that number, convolutions first as in both networks."""
    found = {}
    for name, g in f["layers"].items():
        vars_ = g.get("vars")
        if vars_ is not None and len(vars_):
            found[name] = [np.asarray(vars_[k]) for k in sorted(vars_, key=int)]
    names = sorted(found, key=lambda n: (found[n][0].ndim != 4, _natural(n)))
    return [(n, found[n]) for n in names]


def _layer_list(config: dict) -> list[dict]:
    """The layers of a Sequential config, each {"class_name", "config", "name"}, in order."""
    inner = config.get("config", config)
    layers = inner if isinstance(inner, list) else inner.get("layers")
    if not isinstance(layers, list):
        raise CifarlabError("the model config holds no list of layers; the notebook's networks are Sequential "
                            f"models (this one is {config.get('class_name')!r})")
    out = []
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            raise CifarlabError(f"the model config has a layer entry that is not a layer: {str(layer)[:80]}")
        out.append({"class_name": layer.get("class_name"), "config": layer["config"],
                    "name": layer["config"].get("name", layer.get("name"))})
    return out


def read_keras_file(path: str | Path) -> KerasFile:
    """Read the weights (and model config, where there is one) of a Keras file. Every layer read
    is a numeric kernel (2-D or 4-D) and a 1-D bias, or a clear error."""
    kf = _read_keras_file(Path(path))
    for name, arrays in kf.layers:
        shapes = [a.shape for a in arrays]
        if (len(arrays) != 2 or arrays[0].ndim not in (2, 4) or arrays[1].ndim != 1
                or not all(np.issubdtype(a.dtype, np.floating) for a in arrays)):
            raise CifarlabError(f"'{path}': layer '{name}' holds {len(arrays)} array(s) of shapes {shapes} and types "
                                f"{[str(a.dtype) for a in arrays]}; a Conv2D or Dense layer of the notebook holds a "
                                "float kernel (4-D or 2-D) and a 1-D bias")
    return kf


def _read_keras_file(path: Path) -> KerasFile:
    if path.is_dir():
        raise CifarlabError(f"'{path}' is a folder (a TensorFlow SavedModel, perhaps); cifarlab reads Keras' .h5 and "
                            ".keras files: in Keras, save the weights with model.save_weights('cifar10_weights.h5')")
    if not path.is_file():
        raise CifarlabError(f"Keras file '{path}' does not exist; give the file the notebook's save_weights "
                            "wrote (.h5), or a saved model (.h5, .keras)")
    if zipfile.is_zipfile(path):
        with _malformed(path, "the .keras file"):
            return _read_keras_zip(path)
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CifarlabError(f"'{path}' is neither an HDF5 file nor a .keras zip ({e}); give the file the "
                            "notebook's save_weights wrote") from None
    with f:
        return _read_h5(f, path)


@contextlib.contextmanager
def _malformed(path: Path, what: str) -> Iterator[None]:
    """Turn a missing group, attribute or key of a damaged file into one clear error."""
    try:
        yield
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CifarlabError(f"'{path}': {what} is damaged or not as Keras writes it ({type(e).__name__}: {e})") from None


def _read_keras_zip(path: Path) -> KerasFile:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if "model.weights.h5" not in names:
            raise CifarlabError(f"'{path}' is a zip without model.weights.h5, so not a Keras .keras file")
        config = json.loads(z.read("config.json")) if "config.json" in names else None
        if config is not None and not isinstance(config, dict):
            raise CifarlabError(f"'{path}': its config.json holds no Keras model config (a JSON object)")
        meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
        version = meta.get("keras_version") if isinstance(meta, dict) else None
        info = z.getinfo("model.weights.h5")
        if info.file_size > _MAX_ZIP_MEMBER:
            raise CifarlabError(f"{path}: model.weights.h5 is {info.file_size:,} bytes, far more than the "
                                "notebook's networks hold")
        data = z.read("model.weights.h5")
    with _h5py().File(io.BytesIO(data), "r") as f:
        kf = _read_h5(f, path)
    kf.layout, kf.config, kf.keras_version = "Keras 3 .keras file", kf.config or config, version
    return kf


def _read_h5(f, path: Path) -> KerasFile:
    with _malformed(path, "the weights file"):
        return _read_h5_layout(f, path)


def _read_h5_layout(f, path: Path) -> KerasFile:
    version = _text(f.attrs["keras_version"]) if "keras_version" in f.attrs else None
    config = None
    if "model_config" in f.attrs:
        try:
            config = json.loads(_text(f.attrs["model_config"]))
        except ValueError:
            config = None
    if "layer_names" in f.attrs:
        return KerasFile(_legacy_layers(f), "HDF5 weights (save_weights)", config, version)
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        return KerasFile(_legacy_layers(f["model_weights"]), "HDF5 model (model.save)", config, version)
    if "layers" in f:
        return KerasFile(_native_layers(f), "Keras 3 .weights.h5", config, version)
    raise CifarlabError(f"'{path}' is an HDF5 file but not one of Keras' weight layouts (no layer_names, "
                        "model_weights or layers); give the file the notebook's save_weights wrote")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _activation_tokens(name: str | None) -> list[str]:
    return {None: [], "linear": [], "relu": ["ReLU"], "softmax": ["Softmax"]}.get(name, [f"Activation({name})"])


def keras_tokens(config: dict) -> tuple[list[str], tuple[int, ...] | None]:
    """A Sequential config as layer tokens (``Conv2D(32, 3x3, same)``, ``ReLU``, ...) and its
    input shape (H, W, C) where the config gives one."""
    tokens, shape = [], None
    for layer in _layer_list(config):
        kind, c = layer["class_name"], layer["config"]
        shape = shape or c.get("batch_input_shape") or c.get("batch_shape")
        if kind == "InputLayer":
            continue
        if c.get("data_format") == "channels_first":
            tokens.append(f"{kind}(channels_first)")
        elif kind == "Conv2D":
            extra = [f"strides {_pair(c.get('strides', 1))}"] if _pair(c.get("strides", 1)) != (1, 1) else []
            extra += [f"dilation {_pair(c['dilation_rate'])}"] if _pair(c.get("dilation_rate", 1)) != (1, 1) else []
            extra += ["no bias"] if c.get("use_bias") is False else []
            kh, kw = _pair(c["kernel_size"])
            tokens.append(f"Conv2D({', '.join([str(c['filters']), f'{kh}x{kw}', c.get('padding', 'valid'), *extra])})")
            tokens += _activation_tokens(c.get("activation"))
        elif kind == "Dense":
            tokens.append(f"Dense({c['units']}{', no bias' if c.get('use_bias') is False else ''})")
            tokens += _activation_tokens(c.get("activation"))
        elif kind == "Activation":
            tokens += _activation_tokens(c.get("activation")) or ["Activation(linear)"]
        elif kind in ("ReLU", "Softmax", "Flatten"):
            tokens.append(kind)
        elif kind == "MaxPooling2D":
            pool = _pair(c.get("pool_size", 2))
            strides = _pair(c.get("strides") or pool)
            tokens.append(f"MaxPooling2D({pool[0]}x{pool[1]}"
                          f"{'' if strides == pool else f', strides {strides}'}, {c.get('padding', 'valid')})")
        elif kind == "Dropout":
            tokens.append(f"Dropout({c.get('rate')})")
        else:
            tokens.append(kind)
    return tokens, (tuple(int(v) for v in shape[1:]) if shape and None not in shape[1:] else None)


def model_tokens(model: nn.Module) -> list[str]:
    """The same tokens for one of cifarlab's Keras-book models, softmax included."""
    from .models.keras_book import FlattenChannelsLast

    tokens = []
    for m in model.children():
        if isinstance(m, nn.Conv2d):
            tokens.append(f"Conv2D({m.out_channels}, {m.kernel_size[0]}x{m.kernel_size[1]}, same)")
        elif isinstance(m, nn.ReLU):
            tokens.append("ReLU")
        elif isinstance(m, nn.MaxPool2d):
            tokens.append(f"MaxPooling2D({m.kernel_size}x{m.kernel_size}, valid)")
        elif isinstance(m, nn.Dropout):
            tokens.append(f"Dropout({m.p})")
        elif isinstance(m, FlattenChannelsLast):
            tokens.append("Flatten")
        elif isinstance(m, nn.Linear):
            tokens.append(f"Dense({m.out_features})")
    return tokens + ["Softmax"]


def _same_but_dropout(a: str, b: str) -> bool:
    return a == b or (a.startswith("Dropout(") and b.startswith("Dropout("))


def _match_config(tokens: list[str], num_classes: int, in_chans: int, size: tuple[int, int],
                  notes: list[str]) -> str:
    """The registered model whose layers the config's are; dropout rates may differ (they act
    in training only), with a note."""
    from .models import create_model

    best = None
    for name in KERAS_MODELS:
        want = model_tokens(create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=size))
        if len(want) == len(tokens) and all(_same_but_dropout(a, b) for a, b in zip(tokens, want)):
            for a, b in zip(tokens, want):
                if a != b:
                    notes.append(f"the file's {a} stands where {name} has {b}; dropout acts only in training, "
                                 "so predictions are not affected")
            return name
        first = next((i for i, (a, b) in enumerate(zip(tokens, want)) if not _same_but_dropout(a, b)),
                     min(len(tokens), len(want)))
        if best is None or first > best[0]:
            best = (first, name, want)
    i, name, want = best
    got = tokens[i] if i < len(tokens) else "(nothing: the network ends)"
    expected = want[i] if i < len(want) else "(nothing: it ends there)"
    raise CifarlabError(f"the Keras network is not one of the notebook's two ({', '.join(KERAS_MODELS)}): its layer "
                        f"{i + 1} is {got}, where {name} has {expected}. Its layers: {', '.join(tokens)}")


def _match_weights(layers: list[tuple[str, list[np.ndarray]]], in_chans: int,
                   size: tuple[int, int]) -> tuple[str, int]:
    """Without a config: the registered model (and number of classes) whose weight shapes are the file's."""
    from .models import create_model
    from .models.keras_layout import to_keras

    if not layers or layers[-1][1][0].ndim != 2:
        raise CifarlabError("the Keras file's last weighted layer is not a Dense layer, so this is not one of the "
                            f"notebook's networks (layers: {', '.join(n for n, _ in layers) or 'none'})")
    num_classes = int(layers[-1][1][0].shape[1])
    got = [tuple(a.shape) for _, arrays in layers for a in arrays]
    for name in KERAS_MODELS:
        want = [a.shape for a in to_keras(create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=size))]
        if got == want:
            return name, num_classes
    described = "; ".join(f"{n} {tuple(a[0].shape)}" for n, a in layers)
    raise CifarlabError(f"the Keras weights do not have the shapes of {' or '.join(KERAS_MODELS)} on {size[0]}x"
                        f"{size[1]}x{in_chans} images with {num_classes} classes (kernels: {described}). Give "
                        "--image-size if the images were not 32x32, or --architecture with the model's JSON to be "
                        "told which layer differs")


def _read_architecture(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise CifarlabError(f"cannot read --architecture '{path}': {e.strerror or e}") from None
    except ValueError as e:
        raise CifarlabError(f"--architecture '{path}' is not JSON ({e}); give the file the notebook wrote with "
                            "model.to_json()") from None
    if not isinstance(config, dict):
        raise CifarlabError(f"--architecture '{path}' does not hold a Keras model config (a JSON object)")
    return config


def parse_classes(text: str | None, n: int) -> list[str]:
    """Class names from ``--classes`` (comma-separated); by default CIFAR-10's, for 10 classes."""
    from .data.cifar import CIFAR10_CLASSES

    if text is None:
        if n == 10:
            return list(CIFAR10_CLASSES)
        raise CifarlabError(f"the network has {n} classes; name them in label order with --classes a,b,... "
                            "(CIFAR-10's names are the default for 10 classes)")
    names = [c.strip() for c in text.split(",")]
    if len(names) != n or not all(names) or len(set(names)) != n:
        raise CifarlabError(f"--classes '{text}' is not valid: the network has {n} classes, so give {n} distinct, "
                            "non-empty names separated by commas")
    return names


def import_keras(weights: str | Path, out: str | Path | None = None, *, architecture: str | Path | None = None,
                 classes: str | None = None, image_size: tuple[int, int] | None = None, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Write a run folder for the Keras model in ``weights``; return the folder.

    ``architecture`` is the notebook's ``model.to_json()`` file; without it (and without a config
    inside the file) the model is recognised by its weight shapes, on ``image_size`` (default
    32x32). The weights file is read as arrays only; nothing in it is executed.
    """
    from .export import save_architecture, save_weights
    from .fsutil import new_run_folder, undo_on_failure, write_json
    from .models import create_model
    from .models.keras_layout import from_keras

    arch = _read_architecture(architecture) if architecture else None
    kf = read_keras_file(weights)
    config = arch or kf.config
    if not kf.layers:
        raise CifarlabError(f"'{weights}' holds no weights (a Keras file of {kf.layout} layout with no weighted layer)")
    first = kf.layers[0][1][0]
    if first.ndim != 4:
        raise CifarlabError(f"the first weighted layer of '{weights}' ({kf.layers[0][0]}) is not a Conv2D "
                            f"(kernel shape {first.shape}), so this is not one of the notebook's networks")
    in_chans = int(first.shape[2])
    notes: list[str] = []
    with _malformed(Path(architecture or weights), "the model config"):
        tokens, shape = keras_tokens(config) if config else ([], None)
    if shape and image_size and tuple(image_size) != tuple(shape[:2]):
        raise CifarlabError(f"--image-size {image_size[0]}x{image_size[1]} differs from the model config's input "
                            f"{shape[0]}x{shape[1]}; leave --image-size out")
    size = tuple(image_size or (shape[:2] if shape else (32, 32)))
    if shape and shape[2] != in_chans:
        raise CifarlabError(f"the model config's input has {shape[2]} channels but the first kernel takes {in_chans}")
    num_classes = int(kf.layers[-1][1][0].shape[-1])
    if config:
        name = _match_config(tokens, num_classes, in_chans, size, notes)
    else:
        name, num_classes = _match_weights(kf.layers, in_chans, size)
    names = parse_classes(classes, num_classes)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "img_size": list(size)}
    model = create_model(name, **kwargs)
    wanted = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    if len(kf.layers) != wanted:
        raise CifarlabError(f"'{weights}' holds {len(kf.layers)} layers with weights ({', '.join(n for n, _ in kf.layers)}) "
                            f"but {name}, which the architecture describes, has {wanted}; give the weights and the "
                            "architecture of the same model")
    try:
        from_keras(model, [a.astype(np.float32) for _, arrays in kf.layers for a in arrays])
    except ValueError as e:
        raise CifarlabError(f"the Keras weights do not fit {name}: {e}") from None

    num_params = sum(p.numel() for p in model.parameters())
    run, before = new_run_folder(out, overwrite, f"keras-import-{name}",
                                 "choose another --out or pass --overwrite to replace its files")
    with undo_on_failure(run, before):
        save_weights(run / "weights.safetensors", model)
        write_json(run / "keras_import.json", {
            "source": str(weights), "sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
            "layout": kf.layout, "keras_version": kf.keras_version,
            "architecture": str(architecture) if architecture else None, "model": name,
            "layers": [n for n, _ in kf.layers], "notes": notes,
        })
        # Last, because it marks the folder as a run: a failure before it leaves no half run.
        save_architecture(run, name, kwargs, names, (in_chans, *size), {"rescale": 1 / 255, "mean": None, "std": None},
                          num_params)
    for note in notes:
        log(f"note: {note}")
    log(f"imported {name} ({num_params:,} parameters, {num_classes} classes, "
        f"{size[0]}x{size[1]}x{in_chans} images) from {weights} ({kf.layout}"
        f"{f', Keras {kf.keras_version}' if kf.keras_version else ''}) into {run}")
    log(f"classes, in label order: {short_list(names)}" + (" (CIFAR-10's; --classes names others)" if classes is None else ""))
    log(f"next: cifarlab evaluate {run} --data DATA")
    return run


def export_keras_weights(run: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write a keras-shallow or keras-deep run's weights as Keras' ``save_weights`` would, in the
    HDF5 layout that Keras 2 and Keras 3 ``model.load_weights(out)`` read by layer order, so the
    notebook's model, built as the notebook builds it, predicts what the run predicts."""
    from . import __version__
    from .calibrate import read_calibration
    from .export import load_model, run_tta
    from .fsutil import write_with
    from .models.keras_layout import to_keras

    out = Path(out)
    if out.name.endswith(".weights.h5"):
        raise CifarlabError(f"'{out}': Keras 3 reads a name ending in .weights.h5 in its own layout, which matches "
                            "layers by their names; give a name ending in .h5 only (such as cifar10_weights.h5), "
                            "which Keras 2 and 3 load by layer order")
    predictor = load_model(run, "cpu", tta="none", uncalibrated=True)  # the weights alone; the temperature below
    name = predictor.arch["model"]
    if name not in KERAS_MODELS:
        raise CifarlabError(f"only the notebook's networks ({', '.join(KERAS_MODELS)}) have a Keras counterpart; this "
                            f"run's model is {name}; export it to ONNX with an --out ending in .onnx")
    h5py = _h5py()
    weights = to_keras(predictor.model.float())
    kinds = ["conv2d" if w.ndim == 4 else "dense" for w in weights[::2]]
    names = [k if kinds[:i].count(k) == 0 else f"{k}_{kinds[:i].count(k)}" for i, k in enumerate(kinds)]

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            text = h5py.string_dtype()
            f.attrs["layer_names"] = np.array(names, dtype=text)
            f.attrs["backend"] = "tensorflow"  # kernels in TensorFlow's channels-last layout
            f.attrs["keras_version"] = f"written by cifarlab {__version__}"
            for i, n in enumerate(names):
                g = f.create_group(n)
                g.attrs["weight_names"] = np.array([f"{n}/kernel:0", f"{n}/bias:0"], dtype=text)
                g[f"{n}/kernel:0"], g[f"{n}/bias:0"] = weights[2 * i], weights[2 * i + 1]

    write_with(out, write)
    prep = predictor.prep
    if prep.get("mean") is not None or prep.get("std") is not None:
        log(f"note: this run normalises images by the mean {prep.get('mean')} and std {prep.get('std')} after scaling "
            "by 1/255; feed the Keras model images normalised the same way")
    tta = run_tta(run)
    if tta != "none":
        log(f"note: the run's accuracy was measured with test-time augmentation '{tta}', which the Keras model does "
            "not do; compare it with cifarlab evaluate --tta none")
    try:
        cal = read_calibration(run, predictor.classes).get("none")  # the level the Keras model computes
    except CifarlabError as e:
        cal = None
        log(f"note: {e}")
    if cal:
        log(f"note: 'cifarlab calibrate' fitted this run a temperature of {cal.temperature:.4g}, which the weights do "
            "not hold; for its calibrated probabilities, divide the logits (the input of the Keras model's final "
            "softmax) by it")
    if cal and cal.class_offsets:
        log("note: and then add these offsets to the logits, in the order of the classes, to balance the classes as "
            f"'cifarlab calibrate --balance-classes' did: {', '.join(f'{v:.4g}' for v in cal.class_offsets)}")
    log(f"wrote {out}: {name} weights in Keras' HDF5 layout ({len(names)} layers); in Keras build the notebook's "
        f"{name} and call model.load_weights('{out.name}')")
    return out

