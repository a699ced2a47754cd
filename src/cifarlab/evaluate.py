"""Evaluation: the notebook's "Test score" and "Test accuracy", and what a model gets wrong.

Metrics come from scikit-learn (log loss, top-k accuracy, precision/recall/F1, confusion
matrix); expected calibration error is the standard equal-width-bin estimate (Guo et al., 2017),
which scikit-learn does not provide for multi-class models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Dataset
from .export import Predictor, list_to_csv_rows, load_model
from .fsutil import make_folder, report_folder, write_json, write_text


def predict_dataset(pred: Predictor, x_uint8_nhwc: np.ndarray, tta: str | None = None,
                    batch_size: int | None = None) -> np.ndarray:
    """Probabilities for uint8 (N, H, W, C) images, with the predictor's test-time augmentation
    (the run's own unless it was loaded with another) or the level ``tta``."""
    return pred.predict(x_uint8_nhwc, batch_size, tta=tta)


def probabilities_and_raw(pred: Predictor, x_uint8_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``pred``'s probabilities for uint8 (N, H, W, C) images, and where they were calibrated
    (``cifarlab calibrate``), the probabilities without it (else None), from one pass over the
    images."""
    logits = pred.logits(x_uint8_nhwc)
    raw = torch.from_numpy(logits).softmax(1).numpy() if pred.calibration() else None
    return pred.probabilities(logits), raw


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels ``y`` under ``probs`` (N, classes): the
    cross-entropy that training reports as its test loss, and the notebook's "Test score".

    Not clipped: Keras on TensorFlow computes the categorical cross-entropy of a softmax output
    from the softmax's logits, and training from the model's logits; clipped at 1e-7, as it once
    was here, it fell short of training's figure wherever a label's probability was smaller
    (0.8480 against 0.8509 for a 20-epoch keras-book run). A probability that float32 rounded to
    zero counts as its smallest normal number (a loss of 87.3), not as infinity."""
    p = probs[np.arange(len(y)), y].astype(np.float64)
    return float(-np.log(np.maximum(p, np.finfo(np.float32).tiny)).mean()) if len(y) else float("nan")


def calibration(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over ``n_bins`` equal-width confidence bins, and the bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_conf = np.bincount(which, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(which, weights=correct.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_conf, bin_acc = sum_conf / count, sum_acc / count
    ece = float(np.sum(np.abs(sum_acc - sum_conf)) / max(1, len(y)))
    return {"ece": ece, "n_bins": n_bins, "bin_confidence": bin_conf.tolist(), "bin_accuracy": bin_acc.tolist(),
            "bin_count": count.tolist()}


# Confidence thresholds of the selective-prediction table: a model that answers only above one
# leaves the rest to a person; the table shows the share it answers and how often it is right.
SELECTIVE_THRESHOLDS = (0.5, 0.7, 0.9, 0.95)


def selective(probs: np.ndarray, y: np.ndarray, thresholds: Iterable[float] = SELECTIVE_THRESHOLDS) -> list[dict[str, Any]]:
    """For each confidence threshold: the share of images whose top probability reaches it (the
    coverage), how many, and the accuracy on them (None where none reach it): the accuracy a
    model buys by abstaining below the threshold (selective classification, Geifman and
    El-Yaniv, 2017). Only as meaningful as the confidences: see ``cifarlab calibrate``."""
    conf, right = probs.max(1), probs.argmax(1) == y
    rows = []
    for t in thresholds:
        kept = conf >= t
        n = int(kept.sum())
        rows.append({"threshold": float(t), "images": n, "coverage": n / max(1, len(y)),
                     "accuracy": float(right[kept].mean()) if n else None})
    return rows


def _defined(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def compute_report(probs: np.ndarray, y: np.ndarray, classes: list[str], k: int = 5) -> dict[str, Any]:
    """All evaluation metrics for predicted probabilities ``probs`` (N, C) and labels ``y``."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    labels = list(range(len(classes)))
    pred = probs.argmax(1)
    k = min(k, len(classes) - 1) if len(classes) > 2 else 1
    # Undefined figures are None (null in JSON, empty in CSV), not 0: the precision of a class never
    # predicted, the recall of a class with no test image (and its F1, unless it was predicted).
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=np.nan)
    cm = confusion_matrix(y, pred, labels=labels)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1]
    pairs = []
    for flat in order[:10]:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                      "share_of_true_class": float(off[i, j] / max(1, cm[i].sum()))})
    return {
        "loss": log_loss(probs, y),
        "accuracy": float((pred == y).mean()),
        # where the classes' test images are unequally many, the accuracy mostly weighs the common ones
        "balanced_accuracy": balanced_accuracy(y, pred) if len(y) else None,
        # top-1 is the accuracy; scikit-learn's top-k reads two classes as a binary problem and
        # refuses their two columns of probabilities
        "top_k": {"k": k, "accuracy": float((pred == y).mean()) if k == 1 else
                  float(top_k_accuracy_score(y, probs, k=k, labels=labels))},
        "num_images": int(len(y)),
        "per_class": [{"class": c, "accuracy": _defined(rec[i]), "precision": _defined(prec[i]),
                       "recall": _defined(rec[i]), "f1": _defined(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)],
        "confusion_matrix": cm.tolist(),
        "confused_pairs": pairs,
        "calibration": calibration(probs, y),
        "selective": selective(probs, y),
    }


def balanced_accuracy(y: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor) -> float:
    """The mean per-class recall of predictions ``pred`` for labels ``y``, over the classes with
    labels (scikit-learn's ``balanced_accuracy_score``)."""
    y, pred = np.asarray(y), np.asarray(pred)
    counts = np.bincount(y)
    hits = np.bincount(y[pred == y], minlength=len(counts))
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def unequal_classes(counts: Iterable[int]) -> bool:
    """Whether classes of these image ``counts`` are unequally many, so that the balanced
    accuracy differs from the accuracy (classes without images left out)."""
    return len({int(n) for n in counts if n}) > 1


def evaluate_run(run: str | Path, ds: Dataset, out: str | Path | None = None, tta: str | None = None,
                 device: str = "auto", n_worst: int = 32, uncalibrated: bool = False) -> dict[str, Any]:
    """Evaluate a run on ``ds``'s test split (from :func:`cifarlab.load_dataset`) and write report
    files into ``out``, by default ``RUN/eval``, or ``RUN/eval-<data>`` where ``ds`` is not the
    run's own data (:func:`cifarlab.export.other_data_folder`; see :func:`write_report`); return the report, as
    ``cifarlab evaluate --json`` prints it. ``tta``: the test-time augmentation level, by default
    the run's own, so the accuracy is the one its training reported. The probabilities are
    those of the run's temperature where ``cifarlab calibrate`` fitted one (unless
    ``uncalibrated``); the report then also gives the loss and calibration error without it."""
    return _evaluate(run, ds, out, tta, device, n_worst, uncalibrated)[0]


def _evaluate(run: str | Path, ds: Dataset, out: str | Path | None, tta: str | None, device: str,
              n_worst: int = 32, uncalibrated: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`evaluate_run`'s report, and the probabilities it was made of."""
    from .export import default_report_folder

    out = Path(out) if out is not None else default_report_folder(run, "eval", ds)
    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    with report_folder(out):  # before the predictions: an unwritable folder should cost no time
        probs, raw = probabilities_and_raw(pred, ds.x_test)
        return write_report(pred, ds, probs, out, n_worst, uncalibrated=raw), probs


def describe(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max: how runs on several seeds
    are reported, since one run proves little at this scale."""
    import statistics

    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def evaluate_runs(base: str | Path, ds: Dataset, out: str | Path | None = None, tta: str | None = None,
                  device: str = "auto", uncalibrated: bool = False) -> dict[str, Any]:
    """Evaluate every run of the ``--runs N`` folder ``base`` (see :func:`evaluate_run`), each
    report into ``RUN/eval`` (or ``out/run-K``), and summarise the test loss and accuracy over
    the runs in ``eval_summary.json`` (in ``out``, by default ``base``), with the figures of their
    ensemble: the mean of their probabilities, as ``cifarlab predict BASE`` gives them. On other
    data than the runs' own, ``out`` is by default ``base/eval-<data>``
    (:func:`cifarlab.export.other_data_folder`)."""
    from .calibrate import calibrate_mean
    from .export import ensemble_calibration, ensemble_probabilities, finished_runs, other_data_folder

    base = Path(base)
    runs = finished_runs(base)
    own = ensemble_calibration(base, runs, tta, uncalibrated)  # a stale one is refused before any run is evaluated
    out = Path(out) if out is not None else other_data_folder(base, "eval", ds, runs)
    reports, total = [], None
    for r in runs:
        rep, probs = _evaluate(r, ds, (out / r.name) if out else r / "eval", tta, device, uncalibrated=uncalibrated)
        reports.append(rep)
        total = probs.astype(np.float64) if total is None else total + probs  # a sum: one array held, not N
    classes = [c["class"] for c in reports[0]["per_class"]]
    mean = total / len(runs)
    ens_probs = mean.astype(np.float32) if own is None else calibrate_mean(mean, own.temperature)
    ens = compute_report(ens_probs, ds.y_test, classes)
    summary = {"runs": len(runs), "data": ds.source, "test_origin": ds.test_origin,
               "tta": sorted({r["tta"] for r in reports}),
               "accuracy": describe([r["accuracy"] for r in reports]), "loss": describe([r["loss"] for r in reports]),
               "balanced_accuracy": describe([r["balanced_accuracy"] for r in reports]),
               "ece": describe([r["calibration"]["ece"] for r in reports]),
               "unequal_classes": unequal_classes(c["support"] for c in reports[0]["per_class"]),
               "ensemble": {"probabilities": ensemble_probabilities(None if own is None else own.temperature),
                            "temperature": None if own is None else own.temperature, "accuracy": ens["accuracy"],
                            "balanced_accuracy": ens["balanced_accuracy"], "loss": ens["loss"],
                            "ece": ens["calibration"]["ece"],
                            **({} if own is None else {"uncalibrated_ece": calibration(mean, ds.y_test)["ece"]}),
                            "prediction_sets": sets_report(own, ens_probs, ds.y_test, classes)},
               "per_run": [{"run": str(r), "accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"],
                            "loss": rep["loss"], "ece": rep["calibration"]["ece"], "temperature": rep["temperature"],
                            "balanced_classes": rep["class_offsets"] is not None}
                           for r, rep in zip(runs, reports)]}
    if all(r["prediction_sets"] for r in reports):  # every run with sets: their coverage and size over the runs
        summary["prediction_sets"] = {
            "coverage_target": sorted({r["prediction_sets"]["coverage_target"] for r in reports}),
            **{k: describe([r["prediction_sets"][k] for r in reports]) for k in ("coverage", "mean_size")}}
    if all(r["temperature"] for r in reports):  # every run calibrated: what calibrating changed
        for key in ("ece", "accuracy", "balanced_accuracy"):
            summary[f"uncalibrated_{key}"] = describe([r["uncalibrated"][key] for r in reports])
    write_json((out or base) / "eval_summary.json", summary)
    return summary


def write_report(pred: Predictor, ds: Dataset, probs: np.ndarray, out: Path, n_worst: int = 32,
                 uncalibrated: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics of ``pred``'s probabilities ``probs`` on ``ds``'s test split, written into
    ``out``: ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``/``.png``,
    ``reliability.png``, ``confident_errors.png``, ``predictions.csv`` (one row per image).
    Where ``probs`` were divided by a temperature (and shifted by class offsets),
    ``uncalibrated`` (the probabilities without them) gives the report's "uncalibrated"
    figures, to show what calibrating changed."""
    from .plots import image_grid, plot_confusion, plot_reliability

    report = compute_report(probs, ds.y_test, pred.classes)
    offsets = pred.class_offsets()
    # test_origin: the data's own test images, a share held out of it, or every image the run had not seen
    report.update({"run": str(pred.run), "data": ds.source, "test_origin": ds.test_origin, "tta": pred.tta,
                   "temperature": pred.temperature(),
                   "class_offsets": None if offsets is None else dict(zip(pred.classes, offsets)),
                   "prediction_sets": sets_report(pred.calibration(), probs, ds.y_test, pred.classes)})
    before = None
    if uncalibrated is not None:
        # the same metrics without calibration; the accuracies differ where the classes were balanced
        raw = compute_report(uncalibrated, ds.y_test, pred.classes)
        raw_cal = raw["calibration"]
        report["uncalibrated"] = {"loss": raw["loss"], "ece": raw_cal["ece"], "accuracy": raw["accuracy"],
                                  "balanced_accuracy": raw["balanced_accuracy"]}
        before = (np.array(raw_cal["bin_accuracy"], float), raw_cal["ece"], f"temperature {report['temperature']:.3g}"
                  + (", classes balanced" if offsets is not None else ""))
    make_folder(out)
    cm = np.array(report["confusion_matrix"])
    write_text(out / "confusion_matrix.csv", list_to_csv_rows(
        [{"true\\predicted": c, **{p: int(v) for p, v in zip(pred.classes, row)}} for c, row in zip(pred.classes, cm)]))
    write_text(out / "per_class.csv", list_to_csv_rows(report["per_class"]))
    plot_confusion(cm, pred.classes, out / "confusion_matrix.png")
    cal = report["calibration"]
    plot_reliability(np.array(cal["bin_confidence"], float), np.array(cal["bin_accuracy"], float),
                     np.array(cal["bin_count"]), cal["ece"], out / "reliability.png", before)
    wrong = np.flatnonzero(probs.argmax(1) != ds.y_test)
    worst = wrong[np.argsort(-probs[wrong].max(1))][:n_worst]
    if len(worst):
        titles = [f"true {pred.classes[ds.y_test[i]]}\npred {pred.classes[probs[i].argmax()]} {probs[i].max():.2f}"
                  for i in worst]
        image_grid(ds.x_test[worst], titles, out / "confident_errors.png")
    write_text(out / "predictions.csv", list_to_csv_rows(_prediction_rows(probs, ds, pred.classes)))
    report["confident_errors"] = [{"index": int(i), "path": ds.test_paths[i] if ds.test_paths else None,
                                   "true": pred.classes[ds.y_test[i]], "predicted": pred.classes[probs[i].argmax()],
                                   "confidence": float(probs[i].max())} for i in worst]
    report["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    write_json(out / "metrics.json", report)
    return report


def sets_report(cal, probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any] | None:
    """How the prediction sets of ``cal`` (a :class:`~cifarlab.calibrate.Calibration` with the
    floors of ``cifarlab calibrate --sets``) fare on images of probabilities ``probs`` and labels
    ``y`` (:func:`cifarlab.conformal.set_report`); None where ``cal`` is None or has no sets."""
    from .conformal import prediction_sets, set_report

    if cal is None or cal.set_floors is None:
        return None
    sets = prediction_sets(probs, np.asarray(cal.set_floors))
    return {"by_class": cal.set_by_class,
            **set_report(sets, y, classes, cal.set_coverage, list(cal.set_fit_images), cal.set_by_class)}


def _prediction_rows(probs: np.ndarray, ds: Dataset, classes: list[str]) -> Iterator[dict[str, Any]]:
    """One row per test image, for ``predictions.csv``: its index and path, true and predicted
    class, the predicted class's probability, the true class's, and whether it was right; a
    spreadsheet or a script can then take the report apart by any attribute of the images."""
    predicted = probs.argmax(1)
    for i, (t, p) in enumerate(zip(ds.y_test, predicted)):
        yield {"index": i, "path": ds.test_paths[i] if ds.test_paths else "", "true": classes[t],
               "predicted": classes[p], "confidence": round(float(probs[i, p]), 6),
               "p_true": round(float(probs[i, t]), 6), "correct": "yes" if t == p else "no"}


def _check_compatible(pred: Predictor, ds: Dataset) -> None:
    from .errors import CifarlabError

    c, h, w = pred.input_shape
    if ds.x_test.shape[1:] != (h, w, c):
        hint = f"; resize them with cifarlab.data.resized(ds, ({h}, {w}))" if ds.x_test.shape[3] == c else ""
        raise CifarlabError(f"the data's images are {'x'.join(map(str, ds.x_test.shape[1:]))} (HxWxC) but the model "
                            f"was trained on {h}x{w}x{c}{hint}")
    if ds.classes != pred.classes:
        def names(cs: list[str]) -> str:
            return ", ".join(cs[:8]) + (f", ... ({len(cs)} in all)" if len(cs) > 8 else "")

        unknown = [c for c in ds.classes if c not in pred.classes]
        missing = [c for c in pred.classes if c not in ds.classes]
        parts = []
        if unknown:
            parts.append(f"not among the model's: {names(unknown)}")
        if missing:
            parts.append(f"missing from the data: {names(missing)}")
        detail = "; ".join(parts) or (f"the same names in another order: {names(ds.classes)} against the "
                                      f"model's {names(pred.classes)}")
        raise CifarlabError(f"the data's {len(ds.classes)} classes differ from the model's {len(pred.classes)} "
                            f"({detail}); evaluate on data with the classes the model was trained on")
