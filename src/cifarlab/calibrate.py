"""Temperature scaling: confidences that mean what they say, fitted on a run's validation images.

A network trained with cross-entropy is often overconfident: among the images it gives 0.9,
fewer than 90% are right (the reliability diagram of ``cifarlab evaluate`` shows by how much).
Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides the
logits by one number T, fitted to minimise the negative log-likelihood on images the model was
not trained on. T > 1 softens overconfident probabilities, T < 1 sharpens underconfident ones
(label smoothing makes those); the predicted class, and so every accuracy, stays the same.

cifarlab fits T on the run's own validation images, which its ``config.yaml`` names (the seeded
``data.val_split``), never on the test images, whose figures it would otherwise flatter. The
result is ``RUN/calibration.json``, one temperature per test-time augmentation level, since
averaging the logits over flipped and shifted copies changes their scale, each tied by SHA-256
to the weights it was fitted to: weights trained on since are refused, not misread.
``load_model``, ``evaluate``, ``predict``, ``audit`` and ``export`` then use the temperature of
their level; ``uncalibrated`` (``--uncalibrated``) leaves it out.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CifarlabError, short_list

CALIBRATION_FILE = "calibration.json"
FORMAT = "cifarlab-calibration-1"
# The search's bounds: a temperature beyond these is a sign of a broken model or a handful of
# validation images, and is reported as reaching the bound rather than trusted.
T_MIN, T_MAX = 0.05, 20.0


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels ``y`` under softmax(``logits`` / T), in float64
    (the "Test score" of a model whose probabilities are those)."""
    z = torch.from_numpy(np.asarray(logits, np.float64))
    return float(F.cross_entropy(z / temperature, torch.from_numpy(np.asarray(y, np.int64))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in [T_MIN, T_MAX] that minimises :func:`nll` of ``logits`` (N, classes)
    for labels ``y``.

    The loss is convex in 1/T (a log-sum-exp of the logits scaled by 1/T, less a term linear in
    1/T), so its one minimum is found by a bounded scalar search over 1/T (scipy's Brent)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        raise CifarlabError("cannot fit a temperature to 0 images; it needs validation images")
    res = minimize_scalar(lambda beta: nll(logits, y, 1 / beta), bounds=(1 / T_MAX, 1 / T_MIN), method="bounded",
                          options={"xatol": 1e-7})
    return float(1 / res.x)


def weights_digest(run: str | Path) -> str:
    """SHA-256 of the run's ``weights.safetensors``: which weights a temperature was fitted to."""
    try:
        return hashlib.sha256((Path(run) / "weights.safetensors").read_bytes()).hexdigest()
    except OSError as e:
        raise CifarlabError(f"cannot read {Path(run) / 'weights.safetensors'}: {e.strerror or e}") from None


def read_calibration(run: str | Path) -> dict[str, float]:
    """The temperatures of ``RUN/calibration.json`` by test-time augmentation level; empty where
    the run has none (it was never calibrated). A damaged file, or one fitted to other weights
    than the run's (trained on since), is refused, naming what is wrong."""
    from .config import TTA_LEVELS

    path = Path(run) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    digest = weights_digest(run)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CifarlabError(f"{path}: unreadable ({e}); calibrate the run again with: cifarlab calibrate "
                            f"{Path(run)}") from None
    levels = doc.get("by_tta") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    if not isinstance(levels, dict):
        raise CifarlabError(f"{path}: not a cifarlab calibration file (expected format {FORMAT!r} with 'by_tta'); "
                            f"calibrate the run again with: cifarlab calibrate {Path(run)}")
    out = {}
    for level, entry in levels.items():
        t = entry.get("temperature") if isinstance(entry, dict) else None
        if level not in TTA_LEVELS or isinstance(t, bool) or not isinstance(t, (int, float)) \
                or not math.isfinite(t) or t <= 0:
            raise CifarlabError(f"{path}: entry {level!r} has temperature {t!r}; expected a test-time augmentation "
                                f"level ({', '.join(TTA_LEVELS)}) with a positive number. Calibrate the run again "
                                f"with: cifarlab calibrate {Path(run)}")
        if entry.get("weights_sha256") != digest:
            raise CifarlabError(f"{path}: its temperature for {level!r} was fitted to other weights than the run's "
                                f"(trained on since?); calibrate it again with: cifarlab calibrate {Path(run)} "
                                f"(or leave it out with --uncalibrated)")
        out[level] = float(t)
    return out


def _validation_images(run: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images (uint8 N, H, W, C) and labels, chosen again from ``ds``'s
    training split as its training chose them; refused where the run held none out, or where
    ``ds`` is not the data it was trained on (other image counts; its classes are checked
    before)."""
    from .config import load_run_config
    from .train import split_indices

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise CifarlabError(f"'{run}' has no config.yaml (an imported model?), so its validation images are unknown; "
                            "calibration needs images the model was not trained on, and never the test images")
    cfg = load_run_config(cfg_path)
    if not cfg.data.val_split:
        raise CifarlabError(f"'{run}' held out no validation images (data.val_split = 0, as the speed recipes do), "
                            "and calibration needs images the model was not trained on, never the test images; "
                            "train with --val-split 0.1 (or more) to calibrate it")
    tr, va = split_indices(cfg, ds.y_train)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    data = metrics.get("data", {})
    want = (data.get("train_images"), data.get("val_images"))
    if None not in want and want != (len(tr), len(va)):
        raise CifarlabError(f"'{run}' trained on {want[0]:,} images and validated on {want[1]:,}, but this data "
                            f"splits into {len(tr):,} and {len(va):,}: it is not the data the run was trained on "
                            f"('{data.get('source')}'); give that with --data")
    per_class = data.get("train_per_class")
    if per_class is not None:
        have = dict(zip(ds.classes, np.bincount(ds.y_train[tr], minlength=len(ds.classes)).tolist()))
        if have != per_class:
            diff = [c for c in ds.classes if have.get(c) != per_class.get(c)]
            raise CifarlabError(f"this data's training images per class differ from the run's (for "
                                f"{short_list(diff, 5)}): it is not the data '{run}' was trained on; give that "
                                "with --data")
    return ds.x_train[va], ds.y_train[va]


def calibrate_run(run: str | Path, ds, tta: str | None = None, device: str = "auto",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit ``run``'s temperature on its validation images from ``ds`` (the data it was trained
    on), for the test-time augmentation ``tta`` (default the run's own), and record it in
    ``RUN/calibration.json`` beside the temperatures of other levels; return that level's entry:
    the temperature with the validation loss and expected calibration error before and after."""
    from .evaluate import _check_compatible, calibration
    from .export import load_model, read_run
    from .fsutil import write_json

    run, _ = read_run(run)
    pred = load_model(run, device, tta, uncalibrated=True)
    _check_compatible(pred, ds)
    x, y = _validation_images(run, ds)
    log(f"{run}: fitting the temperature on {len(y):,} validation images (test-time augmentation {pred.tta})")
    logits = pred.logits(x)
    t = fit_temperature(logits, y)

    def probs(temp: float) -> np.ndarray:
        return torch.from_numpy(logits / temp).softmax(1).numpy()

    entry = {"temperature": t, "at_bound": bool(t <= T_MIN * 1.001 or t >= T_MAX * 0.999),
             "weights_sha256": weights_digest(run),
             "validation_images": int(len(y)), "data": ds.source,
             "validation_loss": {"before": nll(logits, y), "after": nll(logits, y, t)},
             "validation_ece": {"before": calibration(probs(1.0), y)["ece"], "after": calibration(probs(t), y)["ece"]},
             "validation_accuracy": float((logits.argmax(1) == y).mean())}
    write_json(run / CALIBRATION_FILE, {
        "format": FORMAT,
        "method": "temperature scaling (Guo et al., 2017): probabilities = softmax(logits / temperature), the "
                  "temperature minimising the negative log-likelihood of the run's validation images",
        "by_tta": {**_entries(run, log), pred.tta: entry}})
    return {"run": str(run), "tta": pred.tta, **entry}


def _entries(run: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The entries of the run's calibration file, kept beside a new level's; none where a
    damaged or outdated file (fitted to earlier weights) is replaced."""
    try:
        if read_calibration(run):  # checks every entry
            return json.loads((run / CALIBRATION_FILE).read_text())["by_tta"]
    except CifarlabError:
        log(f"replacing {run / CALIBRATION_FILE}: it was damaged, or fitted to earlier weights")
    return {}


def calibrate_runs(base: str | Path, ds, tta: str | None = None, device: str = "auto",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`calibrate_run` for every run of the ``--runs N`` folder ``base``; returns each run's
    entry and the temperatures and validation calibration errors described over the runs."""
    from .evaluate import describe
    from .export import finished_runs

    entries = [calibrate_run(r, ds, tta, device, log) for r in finished_runs(base)]
    return {"runs": len(entries), "per_run": entries,
            "temperature": describe([e["temperature"] for e in entries]),
            "validation_ece_before": describe([e["validation_ece"]["before"] for e in entries]),
            "validation_ece_after": describe([e["validation_ece"]["after"] for e in entries])}
