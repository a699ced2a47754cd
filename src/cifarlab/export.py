"""Run folders: saving and loading architecture, weights and preprocessing; ``load_model``.

A run folder holds ``architecture.json`` (model name, its arguments, classes, input shape and
preprocessing: enough to rebuild the model without the config), ``weights.safetensors``,
``config.yaml``, the history and metrics. Nothing in it is a pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .calibrate import Calibration
from .config import TTA_LEVELS, load_run_config
from .errors import CifarlabError, short_list
from .fsutil import read_json, write_bytes, write_json

ARCH_FORMAT = "cifarlab-architecture/1"


def preprocess(x: torch.Tensor, prep: dict[str, Any]) -> torch.Tensor:
    """uint8 (N, C, H, W) to model input: scale by ``rescale`` (1/255, as the notebook), then
    subtract and divide by the featurewise mean and std when the run was trained with them."""
    return normalize(x.float() * prep.get("rescale", 1 / 255), prep)


def normalize(x: torch.Tensor, prep: dict[str, Any]) -> torch.Tensor:
    """The featurewise part of :func:`preprocess`, for images already scaled by ``rescale``."""
    if prep.get("mean") is not None:
        x = x - channel_values(tuple(prep["mean"]), x.dtype, x.device)
    if prep.get("std") is not None:
        x = x / channel_values(tuple(prep["std"]), x.dtype, x.device, 1e-6)
    return x


@functools.lru_cache(maxsize=64)
def channel_values(values: tuple[float, ...], dtype: torch.dtype, device: torch.device,
                   add: float = 0.0) -> torch.Tensor:
    """``values`` (+ ``add``) as a (1, C, 1, 1) tensor on ``device``, made once and reused: made
    from the Python list every batch, it was two host-to-device copies per training step, which
    a GPU profile of the fast recipe showed (pageable copies can stall the step loop)."""
    return (torch.tensor(values, dtype=dtype, device=device) + add).view(1, -1, 1, 1)


def _translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift images by (dy, dx) pixels, filling with reflected edges."""
    p = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[2:]
    return padded[:, :, p - dy:p - dy + h, p - dx:p - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, level: str = "none") -> torch.Tensor:
    """Logits with test-time augmentation, as airbench's levels 0 to 2: ``flip`` averages the
    image and its mirror; ``flip-translate`` gives that half the weight, and the other half to
    the same average over the image shifted by one pixel down-right and up-left (edges
    reflected): six forward passes."""
    def mirror(z: torch.Tensor) -> torch.Tensor:
        return (model(z) + model(z.flip(3))) / 2

    check_tta(level)
    if level == "none":
        return model(x)
    if level == "flip":
        return mirror(x)
    shifted = (mirror(_translate(x, 1, 1)) + mirror(_translate(x, -1, -1))) / 2
    return (mirror(x) + shifted) / 2


@torch.no_grad()
def batched_logits(model: nn.Module, x: torch.Tensor, prep: dict[str, Any], batch_size: int, tta: str = "none",
                   channels_last: bool = False, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None, desc: str = "Predicting") -> torch.Tensor:
    """Logits, float32 (N, classes) on ``x``'s device, of uint8 images ``x`` (N, C, H, W) with
    test-time augmentation ``tta``: ``batch_size`` images a pass, each batch moved to ``device``
    (default ``x``'s), preprocessed and cast to ``dtype``; ``desc`` names the progress bar.

    Each batch's logits are copied into one tensor made at the first batch. Gathered as a list
    of small tensors and joined at the end, every one of them sat on the heap above its batch's
    large activations and kept glibc from reusing their room: ``cifarlab predict`` on 60,000
    images peaked at 4.5 GB instead of 0.7 GB in two runs of three (2-core CPU)."""
    from .progress import batch_starts

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = None
    for i in batch_starts(len(x), batch_size, desc):
        batch = preprocess(x[i:i + batch_size].to(device or x.device), prep).to(dtype).contiguous(memory_format=fmt)
        z = tta_logits(model, batch, tta)
        if out is None:
            out = torch.empty((len(x), *z.shape[1:]), dtype=torch.float32, device=x.device)
        out[i:i + len(z)].copy_(z)
        del batch, z  # freed before the next batch is made, not after
    if out is None:
        raise CifarlabError("no images to predict: the image set is empty")
    return out


def check_tta(level: str) -> str:
    """``level`` if it is a test-time augmentation level, else a clear error."""
    if level not in TTA_LEVELS:
        raise CifarlabError(f"test-time augmentation {level!r} is not valid; choose {', '.join(TTA_LEVELS)}")
    return level


def run_tta(run: str | Path) -> str:
    """The test-time augmentation a run's test accuracy was measured with (``train.tta`` in its
    ``config.yaml``); "none" for a folder without one."""
    path = Path(run) / "config.yaml"
    return load_run_config(path).train.tta if path.is_file() else "none"


def save_architecture(run: Path, model_name: str, model_kwargs: dict, classes: list[str],
                      input_shape: tuple[int, int, int], prep: dict[str, Any], num_params: int,
                      channels_last: bool = False) -> None:
    """Write ``architecture.json``. ``channels_last`` records the memory format used in training,
    so a reloaded model runs the same kernels and predicts bit for bit the same on a CPU."""
    c, h, w = input_shape
    write_json(run / "architecture.json", {
        "format": ARCH_FORMAT, "model": model_name, "model_kwargs": model_kwargs, "classes": classes,
        "input": {"channels": c, "height": h, "width": w, "layout": "NCHW", "dtype": "uint8"},
        "preprocessing": prep, "num_params": num_params, "channels_last": channels_last,
        "output": "logits; apply softmax for probabilities (the notebook's final layer)",
    })


def save_weights(path: Path, model: nn.Module) -> None:
    """Write the model's state as safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # bytes first: safetensors' own file writer reports a full disk as a SafetensorError, a traceback
    write_bytes(path, save(state))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code runs in reading one), or a clear error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CifarlabError(f"{path}: not a readable safetensors weights file ({e})") from None


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model``; a mismatch names the first differing tensor and both shapes."""
    state = read_weights(path)
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise CifarlabError(f"{path}: weights do not match the architecture: tensor '{k}' (shape "
                                f"{tuple(v.shape)}) is missing from the file")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CifarlabError(f"{path}: weights do not match the architecture: tensor '{k}' has shape "
                                f"{tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CifarlabError(f"{path}: weights do not match the architecture: the file has tensor '{extra[0]}' "
                            "that the model lacks")
    model.load_state_dict(state)
    return model


def runs_of(folder: str | Path, marker: str = "architecture.json") -> list[Path]:
    """The ``run-K`` subfolders holding ``marker`` of ``folder``, the parent folder of
    ``cifarlab train --runs N``, in K's order; empty for any other folder."""
    runs = [p for p in Path(folder).glob("run-*") if (p / marker).is_file()]
    return sorted(runs, key=lambda p: (len(p.name), p.name))  # run-2 before run-10


def is_runs_set(folder: str | Path) -> bool:
    """Whether ``folder`` is the parent folder of ``cifarlab train --runs N`` rather than a run:
    it holds no ``architecture.json`` but a ``runs_summary.json``, ``run-K`` subfolders, or a
    ``config.yaml`` of several runs (a set whose first run has not started). The one rule of the
    commands that take either (evaluate, audit, compare)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "architecture.json").is_file():
        return False
    if (folder / "runs_summary.json").is_file() or any(
            p.is_dir() and p.name[4:].isdigit() for p in folder.glob("run-*")):
        return True
    try:
        return (folder / "config.yaml").is_file() and load_run_config(folder / "config.yaml").train.runs > 1
    except CifarlabError:  # not a config of ours: not a set (the command then says what the folder lacks)
        return False


def finished_metrics(run: Path, epochs: int) -> dict[str, Any] | None:
    """The ``metrics.json`` of ``run`` if it has trained all of ``epochs``, else None."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("epochs") == epochs else None


def finished_runs(folder: str | Path) -> list[Path]:
    """The runs of the ``--runs N`` folder ``folder``, refused with the command that finishes
    them where any has not trained all the epochs its ``config.yaml`` names (stopped, not
    started, or not yet trained on to more epochs): evaluating or auditing the set takes all of
    them, as trained alike."""
    folder = Path(folder)
    if not runs_of(folder):
        raise CifarlabError(f"'{folder}' holds no runs of 'cifarlab train --runs' (run-K folders with "
                            "architecture.json)")
    cfg = load_run_config(folder / "config.yaml")
    runs = [folder / f"run-{k}" for k in range(cfg.train.runs)]
    unfinished = [r.name for r in runs if finished_metrics(r, cfg.train.epochs) is None]
    if unfinished:
        raise CifarlabError(f"'{folder}' has runs that have not trained all {cfg.train.epochs} epochs "
                            f"({', '.join(unfinished)}); finish them with: cifarlab train --resume {folder}")
    return runs


def several_runs(folder: Path, marker: str) -> tuple[str, Path] | None:
    """Where ``folder`` is the parent folder of ``cifarlab train --runs N``, whose ``run-K``
    subfolders hold ``marker``: a phrase naming them and the first one's path; else None."""
    runs = [p.name for p in runs_of(folder, marker)]
    if not runs:
        return None
    return f"'{folder}' holds {len(runs)} runs of 'cifarlab train --runs' ({short_list(runs, 5)})", folder / runs[0]


# suffixes left out of a data file's name where it names a report folder
_DATA_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tgz", ".tar", ".zip", ".npy", ".npz")


def data_tag(source: str, labels: str | None = None) -> str:
    """A folder-name-safe tag for the data at ``source``: its name, and 8 hex digits of its
    absolute path, so that two folders both named ``test`` get two tags; and of the absolute
    path of the ``labels`` file that named its classes, where one did, so that two labellings
    of the same images get two tags too."""
    name = Path(source).name
    for suffix in _DATA_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:40] or "data"
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p

    where = absolute(source) + ("" if labels is None else f"\nlabels {absolute(labels)}")
    return f"{name}-{hashlib.blake2b(where.encode(), digest_size=4).hexdigest()}"


def data_suffix(ds, runs: Iterable[str | Path]) -> str:
    """What the name of a report folder of ``runs`` on ``ds`` adds to its kind (:func:`report_name`):
    nothing where ``ds`` is the data they were trained on, or where that is unknown (a run
    without a record of its images, whose data path is not recorded either); else
    ``-<data tag>`` (:func:`data_tag`)."""
    from .data import seen

    runs = [Path(r) for r in runs]
    own = seen.trained_on(ds, runs)
    if own is None:  # no record of the images (an older run, an imported model): the data's path, where recorded
        own = all(_same_source(ds.source, r) for r in runs)
    return "" if own else f"-{data_tag(ds.source, ds.labels)}"


def report_name(kind: str, ds, runs: Iterable[str | Path]) -> str:
    """The name of the folder of a report of ``kind`` (``eval``, ``audit``, ``robustness``,
    ``duplicates``) of ``runs`` on ``ds``: ``kind`` on their own data, else ``<kind>-<data tag>``
    (:func:`data_suffix`).

    So a report on other data (CIFAR-10.1, new photos) is kept beside the run's report on its
    own test images instead of replacing it, and the model card quotes the reports made on the
    data it was audited on."""
    return kind + data_suffix(ds, runs)


def other_data_folder(folder: str | Path, kind: str, ds, runs: Iterable[str | Path] | None = None) -> Path | None:
    """``folder/<kind>-<data tag>`` where ``ds`` is not the data that ``runs`` (by default the
    run ``folder``) were trained on (:func:`report_name`); else None. ``evaluate``, ``audit``,
    ``robustness`` and ``duplicates`` of a ``--runs N`` folder write there by default."""
    name = report_name(kind, ds, runs if runs is not None else [folder])
    return None if name == kind else Path(folder) / name


def default_report_folder(run: str | Path, kind: str, ds) -> Path:
    """Where a report of ``kind`` (``eval``, ``audit``, ...) of ``run`` on ``ds`` goes when no
    folder is given: ``RUN/<kind>`` on the run's own data, else ``RUN/<kind>-<data tag>``
    (:func:`report_name`)."""
    return Path(run) / report_name(kind, ds, [run])


def _same_source(source: str, run: Path) -> bool:
    """Whether ``source`` is the data path in ``run``'s ``metrics.json`` (True where it has none)."""
    try:
        recorded = json.loads((run / "metrics.json").read_text())["data"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if not isinstance(recorded, str) or recorded == source:
        return True
    try:
        return Path(recorded).expanduser().resolve() == Path(source).expanduser().resolve()
    except OSError:
        return False


def read_run(run: str | Path) -> tuple[Path, dict]:
    """Validate a run folder and return it with its parsed ``architecture.json``."""
    run = Path(run)
    if not run.is_dir():
        raise CifarlabError(f"run folder '{run}' does not exist; give a folder written by 'cifarlab train'")
    arch_path = run / "architecture.json"
    if not arch_path.is_file():
        several = several_runs(run, "architecture.json")
        if several:
            raise CifarlabError(f"{several[0]}; give one of them, for example '{several[1]}'")
        from .sweep import CONFIGS, is_sweep

        points = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != CONFIGS) if is_sweep(run) else []
        if points:  # cifarlab train --sweep
            raise CifarlabError(f"'{run}' is a sweep of {len(points)} point(s), each a run folder (or a --runs N "
                                f"folder): give one, for example '{run / points[0]}'; its sweep_summary.json ranks "
                                "them")
        raise CifarlabError(f"'{run}' is not a cifarlab run folder (no architecture.json); give a folder "
                            "written by 'cifarlab train'")
    arch = read_json(arch_path)
    if arch.get("format") != ARCH_FORMAT:
        raise CifarlabError(f"{arch_path}: not a cifarlab architecture file (format {arch.get('format')!r}, expected "
                            f"{ARCH_FORMAT!r})")
    _check_architecture(arch, arch_path)
    return run, arch


def _check_architecture(arch: dict, path: Path) -> None:
    """Refuse an architecture file that lacks a field the commands read, or holds one of another
    kind (edited, or damaged): by its name, where it would have failed later with a traceback."""
    def is_size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    inp = arch.get("input")
    checks = {"model": isinstance(arch.get("model"), str),
              "model_kwargs": isinstance(arch.get("model_kwargs", {}), dict),
              "classes": isinstance(arch.get("classes"), list) and all(isinstance(c, str) for c in arch["classes"]),
              "input": isinstance(inp, dict) and all(is_size(inp.get(k)) for k in ("channels", "height", "width")),
              "preprocessing": isinstance(arch.get("preprocessing"), dict)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        named = " and ".join([", ".join(bad[:-1]), bad[-1]] if len(bad) > 1 else bad)
        raise CifarlabError(f"{path}: its {named} {'is' if len(bad) == 1 else 'are'} missing or not what "
                            "cifarlab writes (model: a name; model_kwargs: a mapping; classes: a list of names; "
                            "input: channels, height and width; preprocessing: a mapping); restore the file from a "
                            "copy, or train again")


class Predictor:
    """A trained model with its classes, preprocessing and test-time augmentation (``tta``):
    ``predict(images)`` gives probabilities, calibrated by the entry of ``calibrations`` (by
    test-time augmentation level, from :func:`cifarlab.calibrate.read_calibration`) where there
    is one for the level used."""

    def __init__(self, model: nn.Module, arch: dict, device: torch.device, run: Path | None = None,
                 tta: str = "none", calibrations: dict[str, Calibration] | None = None):
        self.model = model.eval()
        self.calibrations = dict(calibrations or {})
        self.arch = arch
        self.classes: list[str] = arch["classes"]
        self.prep: dict = arch["preprocessing"]
        self.device = device
        self.run = run
        self.tta = check_tta(tta)
        inp = arch["input"]
        self.input_shape = (inp["channels"], inp["height"], inp["width"])

    def to_uint8(self, images: Any) -> torch.Tensor:
        """Convert images to uint8 N,C,H,W: a uint8 array N,H,W,C or H,W,C, or one PIL image or file
        path, or a list of any of these (arrays H,W,C). Files and PIL images are converted and
        resized to the model's input as training data are; arrays must already match it."""
        from PIL import Image

        from .data.images import open_image, to_array

        c, h, w = self.input_shape

        def checked(a: np.ndarray) -> np.ndarray:
            if a.dtype != np.uint8:
                hint = "; for images scaled to [0, 1], pass (x * 255).round().astype(np.uint8)" \
                    if a.dtype.kind == "f" else ""
                raise CifarlabError(f"images must be uint8 (0..255) arrays, got {a.dtype}{hint}")
            if a.shape[1:] != (h, w, c):
                raise CifarlabError(f"images have shape {a.shape[1:]}, the model expects (H, W, C) = {(h, w, c)}")
            return a

        if isinstance(images, np.ndarray):
            a = checked(images if images.ndim == 4 else images[None])
            return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
        arrays = []
        for im in images if isinstance(images, (list, tuple)) else [images]:
            if isinstance(im, np.ndarray):
                arrays.append(checked(im[None])[0])
                continue
            if isinstance(im, (str, Path)):
                try:
                    data = Path(im).read_bytes()
                except OSError as e:
                    raise CifarlabError(f"cannot read image file '{im}': {e.strerror or e}") from None
                im = open_image(data, str(im))
            elif not isinstance(im, Image.Image):
                raise CifarlabError(f"cannot predict on a {type(im).__name__}; give uint8 arrays (N, H, W, C) or "
                                    "(H, W, C), PIL images or image file paths")
            arrays.append(to_array(im, c, (h, w)))
        if not arrays:
            return torch.zeros((0, c, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def logits(self, images: Any, batch_size: int | None = None, tta: str | None = None) -> np.ndarray:
        """Raw logits, float32 (N, classes); ``tta`` overrides the predictor's test-time augmentation;
        ``batch_size`` images per pass (default :func:`cifarlab.runtime.inference_batch_size`)."""
        from .runtime import inference_batch_size

        x = images if isinstance(images, torch.Tensor) else self.to_uint8(images)
        if not len(x):
            return np.zeros((0, len(self.classes)), np.float32)
        out = batched_logits(self.model, x.cpu(), self.prep, batch_size or inference_batch_size(self.device),
                             self.tta if tta is None else tta, bool(self.arch.get("channels_last")),
                             device=self.device).numpy()
        bad = int((~np.isfinite(out)).any(1).sum())
        if bad:  # every figure made of them would be NaN, or a library's traceback
            raise CifarlabError(f"the model{f' of {self.run}' if self.run else ''} gives NaN or infinite outputs for "
                                f"{bad:,} of {len(out):,} images: its weights overflow (a training that diverged) or "
                                "are damaged; train it again, with a lower learning rate")
        return out

    def calibration(self, tta: str | None = None) -> Calibration | None:
        """What calibrates the probabilities at test-time augmentation ``tta`` (default the
        predictor's own); None where the run was not calibrated at that level."""
        return self.calibrations.get(self.tta if tta is None else tta)

    def temperature(self, tta: str | None = None) -> float | None:
        """The temperature that divides the logits at test-time augmentation ``tta`` (default the
        predictor's own); None where the run was not calibrated at that level."""
        cal = self.calibration(tta)
        return cal.temperature if cal else None

    def class_offsets(self, tta: str | None = None) -> tuple[float, ...] | None:
        """The per-class offsets added to the logits after the temperature (``cifarlab calibrate
        --balance-classes``), in the order of ``classes``; None where there are none."""
        cal = self.calibration(tta)
        return cal.class_offsets if cal else None

    def probabilities(self, logits: np.ndarray, tta: str | None = None) -> np.ndarray:
        """softmax(``logits`` / T + offsets), float32, with the calibration at ``tta`` (the plain
        softmax where there is none)."""
        cal = self.calibration(tta)
        return cal.probabilities(logits) if cal else torch.from_numpy(logits).softmax(1).numpy()

    def predict(self, images: Any, batch_size: int | None = None, tta: str | None = None) -> np.ndarray:
        """Class probabilities, float32 (N, classes): the softmax of the logits, calibrated first
        where ``cifarlab calibrate`` fitted this test-time augmentation level (divided by the
        temperature, and with ``--balance-classes`` shifted by the class offsets)."""
        return self.probabilities(self.logits(images, batch_size, tta), tta)

    def sets_calibration(self, tta: str | None = None) -> Calibration:
        """The calibration at ``tta`` (default the predictor's own) that holds the prediction
        sets ``cifarlab calibrate --sets`` fitted; refused, naming the command, where it fitted none."""
        level = self.tta if tta is None else tta
        return _with_sets(self.calibration(level), f"{self.run or 'the run'} at test-time augmentation {level}",
                          f"cifarlab calibrate {self.run or 'RUN'} --sets 0.9" + (f" --tta {level}" if tta else ""))

    def prediction_sets(self, probs: np.ndarray, tta: str | None = None) -> np.ndarray:
        """Which classes each image's prediction set holds, boolean (N, classes), from its
        probabilities ``probs`` (as :meth:`predict` gives them at ``tta``): those reaching the
        floors of :meth:`sets_calibration` (:func:`cifarlab.conformal.prediction_sets`)."""
        from .conformal import prediction_sets

        return prediction_sets(probs, np.asarray(self.sets_calibration(tta).set_floors))


class Ensemble:
    """The runs of a ``cifarlab train --runs N`` folder as one classifier: ``predict(images)``
    gives the mean of their probabilities, each run's with its own test-time augmentation and
    calibration (as ``cifarlab predict BASE`` gives them, and the ensemble figures of
    ``cifarlab evaluate BASE``), and where ``calibration`` holds the ensemble's own temperature
    (``cifarlab calibrate BASE``, on training images no run trained on), that mean
    calibrated with it (:func:`cifarlab.calibrate.calibrate_mean`). The runs must classify the
    same classes from the same input."""

    def __init__(self, members: list[Predictor], folder: str | Path | None = None, calibration: Any = None):
        if not members:
            raise CifarlabError("an ensemble needs at least one run")
        first = members[0]
        for m in members[1:]:
            if (m.classes, m.input_shape) != (first.classes, first.input_shape):
                raise CifarlabError(
                    f"the runs of '{folder}' differ: {_name(first)} classifies {short_list(first.classes, 5)} from "
                    f"{_input(first)} images, {_name(m)} {short_list(m.classes, 5)} from {_input(m)}; their "
                    "probabilities cannot be averaged: give one run")
        self.members = members
        self.folder = Path(folder) if folder is not None else None
        self.classes, self.input_shape = first.classes, first.input_shape
        self.calibration = calibration

    @property
    def tta(self) -> str:
        """Its runs' test-time augmentation, each level once ("flip", or "flip, none" where
        they differ), as :attr:`Predictor.tta` names one run's."""
        return ", ".join(sorted({m.tta for m in self.members}))

    def temperature(self) -> float | None:
        """The ensemble's own temperature; None where it has none (its mean is not recalibrated)."""
        return None if self.calibration is None else self.calibration.temperature

    def predict(self, images: Any, batch_size: int | None = None) -> np.ndarray:
        """The mean of the members' class probabilities, float32 (N, classes), calibrated with
        the ensemble's temperature where it has one, for images as :meth:`Predictor.predict`
        takes them (read and converted once, not once a run)."""
        x = images if isinstance(images, torch.Tensor) else self.members[0].to_uint8(images)
        return self.combine(m.predict(x, batch_size) for m in self.members)

    def combine(self, probabilities: Iterable[np.ndarray]) -> np.ndarray:
        """The ensemble's probabilities from its members' (one array per member, in their order,
        taken one at a time, so a generator holds one array, not N): their mean, calibrated with
        the ensemble's temperature where it has one."""
        from .calibrate import calibrate_mean

        total, n = None, 0
        for p in probabilities:
            total = p.astype(np.float64) if total is None else total + p
            n += 1
        if n != len(self.members):
            raise ValueError(f"{n} members' probabilities given, for an ensemble of {len(self.members)}")
        mean = total / n
        return mean.astype(np.float32) if self.calibration is None else calibrate_mean(mean, self.temperature())

    def sets_calibration(self) -> Calibration:
        """The ensemble's own calibration, holding the prediction sets ``cifarlab calibrate BASE
        --sets`` fitted for it; refused, naming the command, where it fitted none."""
        return _with_sets(self.calibration, f"the ensemble of {self.folder or 'the runs'}",
                          f"cifarlab calibrate {self.folder or 'BASE'} --sets 0.9 (with runs that hold out the same "
                          "validation images, --split-seed)")

    def prediction_sets(self, probs: np.ndarray) -> np.ndarray:
        """Which classes each image's prediction set holds, boolean (N, classes), from the
        ensemble's probabilities ``probs`` (:meth:`predict`), with the floors of :meth:`sets_calibration`."""
        from .conformal import prediction_sets

        return prediction_sets(probs, np.asarray(self.sets_calibration().set_floors))


def _with_sets(cal: Calibration | None, who: str, how: str) -> Calibration:
    """``cal`` where it holds prediction sets; else a :class:`CifarlabError` saying ``how`` to fit them."""
    if cal is None or cal.set_floors is None:
        raise CifarlabError(f"no prediction sets were fitted for {who}; fit them on its held-out images with: {how}")
    return cal


def _name(pred: Predictor) -> str:
    return pred.run.name if pred.run else "a run"


def _input(pred: Predictor) -> str:
    c, h, w = pred.input_shape
    return f"{h}x{w}x{c}"


def load_ensemble(folder: str | Path, device: str = "cpu", tta: str | None = None,
                  uncalibrated: bool = False) -> Ensemble:
    """The runs of the ``--runs N`` folder ``folder`` (all finished), each loaded as
    :func:`load_model` loads a run, as one :class:`Ensemble`, with the ensemble's own
    temperature where ``cifarlab calibrate`` fitted one for its test-time augmentation (none
    where ``uncalibrated``)."""
    if (Path(folder) / "architecture.json").is_file():
        raise CifarlabError(f"'{folder}' is one run, not the folder of 'cifarlab train --runs N'; load it with "
                            "load_model")
    runs = finished_runs(folder)
    own = ensemble_calibration(folder, runs, tta, uncalibrated)  # a stale one is refused before any run loads
    return Ensemble([load_model(r, device, tta, uncalibrated) for r in runs], folder, own)


def ensemble_probabilities(temperature: float | None) -> str:
    """What the probabilities of an ensemble with this temperature (None: none) are, in the
    words the reports record."""
    return "mean of the runs'" + ("" if temperature is None else ", calibrated with the ensemble's temperature")


def predict_command(folder: str | Path, tta: str | None = None, uncalibrated: bool = False) -> str:
    """The ``cifarlab predict`` command that gives the probabilities a report on ``folder``
    used, with its ``--tta`` and ``--uncalibrated`` where the report had them."""
    return (f"cifarlab predict {folder}" + (f" --tta {tta}" if tta else "")
            + (" --uncalibrated" if uncalibrated else ""))


def ensemble_calibration(folder: str | Path, runs: list[Path], tta: str | None = None, uncalibrated: bool = False):
    """The ensemble temperature (:func:`cifarlab.calibrate.read_ensemble_calibration`) of
    ``runs``, the finished runs of ``folder``, predicting with test-time augmentation ``tta``
    (default each run's own); None where it has none, or ``uncalibrated``."""
    from .calibrate import read_ensemble_calibration

    levels = {run_tta(r) if tta is None else tta for r in runs}
    return None if uncalibrated or len(levels) > 1 else read_ensemble_calibration(folder, runs, levels.pop())


def check_weights(run: Path) -> Path:
    """The path of the run's ``weights.safetensors``; refused, naming how to finish it, where
    its training has not written them yet. Commands call it before loading their data too."""
    weights = run / "weights.safetensors"
    if not weights.is_file():
        raise CifarlabError(f"run folder '{run}' has no weights.safetensors; did its training finish? "
                            f"(resume it with: cifarlab train --resume {run})")
    return weights


def load_model(run: str | Path, device: str = "cpu", tta: str | None = None,
               uncalibrated: bool = False) -> Predictor:
    """Rebuild a trained model from its run folder (architecture.json + weights.safetensors).

    ``tta`` is the test-time augmentation its predictions use: by default the run's own (see
    :func:`run_tta`), so evaluating a run reproduces the test accuracy its training reported.
    Its probabilities use the calibration of ``RUN/calibration.json`` (``cifarlab calibrate``)
    unless ``uncalibrated``.
    """
    from .calibrate import read_calibration
    from .models import create_model
    from .runtime import select_device

    run, arch = read_run(run)
    tta = run_tta(run) if tta is None else tta  # checked by Predictor
    weights = check_weights(run)
    model = create_model(arch["model"], **arch.get("model_kwargs", {}))
    load_weights(model, weights)
    dev = select_device(device)
    if arch.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return Predictor(model.to(dev), arch, dev, run, tta, {} if uncalibrated else read_calibration(run, arch["classes"]))


def load_classifier(run: str | Path, device: str = "cpu", tta: str | None = None,
                    uncalibrated: bool = False) -> Predictor | Ensemble:
    """The model ``cifarlab predict RUN`` serves: one run's :class:`Predictor`
    (:func:`load_model`), or for the folder of ``cifarlab train --runs N`` their
    :class:`Ensemble` (:func:`load_ensemble`)."""
    return (load_ensemble if is_runs_set(run) else load_model)(run, device, tta, uncalibrated)


def list_to_csv_rows(rows: Iterable[dict]) -> str:
    """Rows of dicts (same keys) as CSV text."""
    import csv
    import io

    rows = list(rows)
    buf = io.StringIO()
    if rows:
        wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return buf.getvalue()
