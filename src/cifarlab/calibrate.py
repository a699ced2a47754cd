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
``load_model``, ``evaluate``, ``predict``, ``audit``, ``compare`` and ``export`` then use the
temperature of their level; ``uncalibrated`` (``--uncalibrated``) leaves it out.

Where the training classes were unequal in size, ``balance_classes`` (``--balance-classes``)
also corrects the calibrated probabilities for that: a model fitted to data where a class is
rare learns to say it rarely, which is right for data as skewed as its training set and wrong
for data where every class is equally common (CIFAR-10's test set; often a fair evaluation's
aim). Bayes' rule turns the one into the other (Saerens et al., 2002; the post-hoc logit
adjustment of Menon et al., 2021): add log(1 / classes) - log(training share of the class) to
each class's logit after the temperature. Unlike the temperature, this changes predictions
(rare classes are predicted more often), so it is asked for, and the validation images'
balanced accuracy with and without it is reported.

The ensemble of a ``--runs N`` folder (the mean of its runs' calibrated probabilities) is
underconfident where its runs disagree, however well each run is calibrated: averaging
spreads the probability. Its own temperature, fitted after averaging (pool, then calibrate:
Rahaman and Thiery, 2021), corrects that: probabilities = softmax(log(mean) / T). It needs
images that no run trained on: those outside every run's ``--subset``, and the validation
images the runs share where they hold out the same ones (``data.split_seed``,
``--split-seed``). ``OUT/ensemble_calibration.json`` records it, tied to each run's weights
and calibration as fitted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CifarlabError, short_list

CALIBRATION_FILE = "calibration.json"
FORMAT = "cifarlab-calibration-1"
ENSEMBLE_FILE = "ensemble_calibration.json"
ENSEMBLE_FORMAT = "cifarlab-ensemble-calibration-1"
# The search's bounds: a temperature beyond these is a sign of a broken model or a handful of
# validation images, and is reported as reaching the bound rather than trusted.
T_MIN, T_MAX = 0.05, 20.0
# The images an ensemble's temperature is fitted on: with fewer than the first, it would depend
# on which images they happened to be (a judgement; a run's own takes its validation images,
# 10,000 of CIFAR-10's); more than the second change one number little and cost a pass of
# every run over them.
ENSEMBLE_MIN_IMAGES, ENSEMBLE_MAX_IMAGES = 1_000, 10_000


@dataclass(frozen=True)
class Calibration:
    """What ``cifarlab calibrate`` fitted for one test-time augmentation level: probabilities =
    softmax(logits / ``temperature`` + ``class_offsets``)."""

    temperature: float
    # log(1 / classes) - log(training share), one per class in the model's order; None: the
    # probabilities keep the training set's class balance
    class_offsets: tuple[float, ...] | None = None
    # prediction sets (calibrate --sets): the calibrated probability at which each class, in the
    # model's order, enters an image's set, and the share of images whose set should hold their
    # true class; None: no sets were fitted (see cifarlab.conformal)
    set_floors: tuple[float, ...] | None = None
    set_coverage: float | None = None
    set_by_class: bool = False  # each class's floor fitted on its own images (calibrate --sets-by-class)
    # the images each class's floor was fitted on (all of them, for one floor): the chance range of coverage
    set_fit_images: tuple[int, ...] | None = None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (N, classes) as the calibrated probabilities' logits."""
        z = logits / self.temperature
        return z if self.class_offsets is None else z + np.asarray(self.class_offsets, z.dtype)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of ``logits`` (N, classes): the softmax of :meth:`apply`."""
        return torch.from_numpy(self.apply(logits)).softmax(1).numpy()


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


def same_offsets(a: Any, b: Any) -> bool:
    """Whether two records of class offsets (lists or tuples, as JSON or a predictor gives them;
    None for none) are the same: a report measured with other offsets predicted other classes."""
    return (None if a is None else tuple(a)) == (None if b is None else tuple(b))


def same_calibration(record: dict, temperature: float | None, class_offsets: Any) -> bool:
    """Whether a report's ``record`` (its ``temperature`` and ``class_offsets`` keys) was measured
    with this calibration: a temperature changes the calibration error quoted, class offsets the
    predictions."""
    return record.get("temperature") == temperature and same_offsets(record.get("class_offsets"), class_offsets)


def read_current_report(path: str | Path, run: str | Path, tta: str, temperature: float | None,
                        class_offsets: Any) -> dict | None:
    """The JSON report at ``path`` where it was measured with ``run``'s current weights (their
    SHA-256), test-time augmentation ``tta`` and calibration (:func:`same_calibration`); None
    where it is missing, unreadable or measured otherwise: what the model card may quote."""
    try:
        r = json.loads(Path(path).read_text())
        current = (isinstance(r, dict) and r.get("weights_sha256") == weights_digest(run) and r.get("tta") == tta
                   and same_calibration(r, temperature, class_offsets))
    except (OSError, ValueError, TypeError, CifarlabError):  # TypeError: offsets that are not a list
        return None
    return r if current else None


def read_runs_summary_file(path: str | Path, folder: str | Path, command: str,
                           missing: Callable[[dict], str | None]) -> dict[str, Any] | None:
    """The summary at ``path`` that ``command`` (``cifarlab robustness``, ``cifarlab ood``) wrote
    of the runs of the ``--runs N`` folder ``folder``, as ``{"summary": ...}`` where every run it
    names still holds the weights it measured, else ``{"note": why not}``; None where there is
    none. ``missing`` names what an incomplete summary lacks (None where it has all it needs)."""
    folder = Path(folder)
    try:
        s = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"note": f"{path} could not be read ({e}); run {command} {folder} again"}
    try:
        lacking = missing(s) if isinstance(s, dict) else "a JSON object"
        if lacking:
            raise KeyError(lacking)
        # each run by its name inside the folder, which holds wherever the folder was measured from
        stale = [r["run"] for r in s["per_run"]
                 if r.get("weights_sha256") != weights_digest(folder / Path(r["run"]).name)]
    except (KeyError, TypeError, AttributeError, CifarlabError) as e:
        return {"note": f"{path} is incomplete ({e}); run {command} {folder} again"}
    if stale:
        return {"note": f"{short_list(stale, 3)} changed after {command} measured them; measure again"}
    return {"summary": s}


def read_calibration(run: str | Path, classes: list[str] | None = None) -> dict[str, Calibration]:
    """What ``RUN/calibration.json`` holds, by test-time augmentation level; empty where the run
    has none (it was never calibrated). ``classes`` (default those of the run's
    ``architecture.json``) orders the class offsets. A damaged file, or one fitted to other
    weights than the run's (trained on since), is refused, naming what is wrong."""
    from .config import TTA_LEVELS

    path = Path(run) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    digest = weights_digest(run)
    again = f"calibrate the run again with: cifarlab calibrate {Path(run)}"
    levels = _levels(path, FORMAT, "calibration file", again)
    if classes is None:
        from .export import read_run

        classes = read_run(run)[1]["classes"]
    out = {}
    for level, entry in levels.items():
        t = entry.get("temperature") if isinstance(entry, dict) else None
        if level not in TTA_LEVELS or not _positive_number(t):
            raise CifarlabError(f"{path}: entry {level!r} has temperature {t!r}; expected a test-time augmentation "
                                f"level ({', '.join(TTA_LEVELS)}) with a positive number; {again}")
        if entry.get("weights_sha256") != digest:
            raise CifarlabError(f"{path}: its temperature for {level!r} was fitted to other weights than the run's "
                                f"(trained on since?); calibrate it again with: cifarlab calibrate {Path(run)} "
                                f"(or leave it out with --uncalibrated)")
        where = f"{path}: entry {level!r}"
        out[level] = Calibration(float(t), _offsets(entry.get("balance_classes"), classes, where, again),
                                 *_set_floors(entry.get("prediction_sets"), classes, where, again))
    return out


def _levels(path: Path, fmt: str, what: str, again: str) -> dict[str, Any]:
    """The entries by test-time augmentation level (``by_tta``) of the calibration file
    ``path`` of format ``fmt``; a file unreadable or of another kind is refused, saying what to
    do (``again``)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CifarlabError(f"{path}: unreadable ({e}); {again}") from None
    levels = doc.get("by_tta") if isinstance(doc, dict) and doc.get("format") == fmt else None
    if not isinstance(levels, dict):
        raise CifarlabError(f"{path}: not a cifarlab {what} (expected format {fmt!r} with 'by_tta'); {again}")
    return levels


def _fitted(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The temperature fitted to ``logits`` for labels ``y`` (:func:`fit_temperature`), with the
    loss and expected calibration error before and after it, as a calibration file's entry
    records them."""
    from .evaluate import calibration

    t = fit_temperature(logits, y)
    before, after = (calibration(Calibration(temp).probabilities(logits), y)["ece"] for temp in (1.0, t))
    return {"temperature": t, "at_bound": bool(t <= T_MIN * 1.001 or t >= T_MAX * 0.999),
            "validation_images": int(len(y)),
            "validation_loss": {"before": nll(logits, y), "after": nll(logits, y, t)},
            "validation_ece": {"before": before, "after": after},
            "validation_accuracy": float((logits.argmax(1) == y).mean())}


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _positive_number(v: Any) -> bool:
    return _finite(v) and v > 0


def _offsets(balance: Any, classes: list[str], where: str, again: str) -> tuple[float, ...] | None:
    """The class offsets of an entry's ``balance_classes`` in the order of ``classes``; None
    where it has none."""
    if balance is None:
        return None
    got = balance.get("class_offsets") if isinstance(balance, dict) else None
    if not isinstance(got, dict) or sorted(got) != sorted(classes) or not all(map(_finite, got.values())):
        raise CifarlabError(f"{where} has class offsets {str(got)[:80]}; expected a finite number for each of the "
                            f"model's classes ({short_list(classes, 5)}); {again}")
    return tuple(float(got[c]) for c in classes)


def _set_floors(sets: Any, classes: list[str], where: str, again: str) -> tuple[Any, ...]:
    """The floors (in the order of ``classes``), coverage, by-class switch and images fitted on
    (per class) of an entry's ``prediction_sets``, as :class:`Calibration` takes them after its
    temperature and offsets; (None, None, False, None) where it has none."""
    if sets is None:
        return None, None, False, None
    got = sets if isinstance(sets, dict) else {}
    floors, coverage, by_class = got.get("min_probability"), got.get("coverage"), got.get("by_class") is True
    images = got.get("class_images") if by_class else dict.fromkeys(classes, got.get("images"))

    def counts(v: Any) -> bool:
        return isinstance(v, dict) and sorted(v) == sorted(classes)

    if not (_finite(coverage) and 0 < coverage < 1 and counts(floors) and counts(images)
            and all(_finite(v) and 0 <= v <= 1 for v in floors.values())
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in images.values())):
        raise CifarlabError(f"{where} has prediction sets {str(sets)[:80]}; expected a coverage between 0 and 1, "
                            "a probability floor in [0, 1] for each of the model's classes "
                            f"({short_list(classes, 5)}) and the images they were fitted on; {again}")
    return (tuple(float(floors[c]) for c in classes), float(coverage), by_class,
            tuple(int(images[c]) for c in classes))


def _fit_sets(probs: np.ndarray, y: np.ndarray, classes: list[str], coverage: float, by_class: bool,
              what: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The ``prediction_sets`` record of a calibration entry: per class, the floor its calibrated
    probability must reach to enter an image's set (:func:`cifarlab.conformal.fit_floors`),
    fitted on the held-out images' calibrated probabilities ``probs`` and labels ``y``; a warning
    where too few images leave every class in every set."""
    from .conformal import fit_floors, min_images

    floors = fit_floors(probs, y, coverage, by_class)
    need = min_images(coverage)
    per_class = np.bincount(y, minlength=len(classes))
    if by_class:
        short = [c for c, n in zip(classes, per_class) if n < need]
        if short:
            log(f"{what}: warning: sets of coverage {coverage:g} by class need at least {need} held-out images of a "
                f"class; {short_list(short, 5)} {'has' if len(short) == 1 else 'have'} fewer, and so enter every set")
    elif len(y) < need:
        log(f"{what}: warning: sets of coverage {coverage:g} need at least {need} held-out images, and there are "
            f"{len(y)}: every set holds every class")
    record = {"coverage": coverage, "by_class": by_class, "images": int(len(y)),
              "min_probability": dict(zip(classes, floors.tolist()))}
    if by_class:  # each floor's own images, for the range of coverage chance allows
        record["class_images"] = dict(zip(classes, per_class.tolist()))
    return record


def _held_out(run: Path, ds) -> tuple[Any, np.ndarray, np.ndarray]:
    """The run's config, and the indices into ``ds``'s training split of the images it trained
    on and of those it validated on (:func:`cifarlab.train.run_split`); refused where the run
    held none out."""
    from .train import run_split

    if not (run / "config.yaml").is_file():
        raise CifarlabError(f"'{run}' has no config.yaml (an imported model?), so its validation images are unknown; "
                            "calibration needs images the model was not trained on, and never the test images")
    cfg, tr, va = run_split(run, ds)
    if not cfg.data.val_split:
        raise CifarlabError(f"'{run}' held out no validation images (data.val_split = 0, as the speed recipes do), "
                            "and calibration needs images the model was not trained on, never the test images; "
                            "train with --val-split 0.1 (or more) to calibrate it")
    return cfg, tr, va


def calibrate_run(run: str | Path, ds, tta: str | None = None, device: str = "auto",
                  log: Callable[[str], None] = print, balance_classes: bool = False, sets: float | None = None,
                  sets_by_class: bool = False) -> dict[str, Any]:
    """Fit ``run``'s temperature on its validation images from ``ds`` (the data it was trained
    on), for the test-time augmentation ``tta`` (default the run's own), and record it in
    ``RUN/calibration.json`` beside the temperatures of other levels; return that level's entry:
    the temperature with the validation loss and expected calibration error before and after.
    With ``balance_classes``, the entry also holds the class offsets that correct the
    probabilities for the training classes' unequal sizes (see the module's docstring). With
    ``sets`` (a coverage such as 0.9), it also holds the floors of prediction sets fitted on the
    same images' calibrated probabilities (:mod:`cifarlab.conformal`; ``sets_by_class``: a floor
    per class)."""
    from .evaluate import _check_compatible
    from .export import load_model, read_run
    from .fsutil import read_json, write_json

    run, _ = read_run(run)
    pred = load_model(run, device, tta, uncalibrated=True)
    _check_compatible(pred, ds)
    cfg, tr, va = _held_out(run, ds)
    x, y = ds.x_train[va], ds.y_train[va]
    n = read_json(run / "init_from.json", absent={}).get("seen_validation_images")  # a fine-tune's (train.py)
    left = f"; {n:,} left out, as the weights it started from had learnt from them" if n else ""
    log(f"{run}: fitting the temperature on {len(y):,} validation images (test-time augmentation {pred.tta}{left})")
    logits = pred.logits(x)
    entry = {**_fitted(logits, y), "weights_sha256": weights_digest(run), "data": ds.source}
    if balance_classes:
        entry["balance_classes"] = _balance(run, cfg, pred.classes, ds.y_train[tr], logits, y, entry["temperature"],
                                            log)
    if sets is not None:
        offsets = entry.get("balance_classes", {}).get("class_offsets")
        cal = Calibration(entry["temperature"], None if offsets is None else tuple(offsets[c] for c in pred.classes))
        entry["prediction_sets"] = _fit_sets(cal.probabilities(logits), y, pred.classes, sets, sets_by_class, str(run),
                                             log)
    write_json(run / CALIBRATION_FILE, {
        "format": FORMAT,
        "method": "temperature scaling (Guo et al., 2017): probabilities = softmax(logits / temperature), the "
                  "temperature minimising the negative log-likelihood of the run's validation images; with "
                  "balance_classes, softmax(logits / temperature + class offset), the offset log(1 / classes) - "
                  "log(the class's share of the training images) (Saerens et al., 2002; Menon et al., 2021); with "
                  "prediction_sets, a class enters an image's set where its calibrated probability reaches its "
                  "min_probability, the split-conformal floor of the validation images for the coverage "
                  "(Sadinle et al., 2019)",
        "by_tta": {**_entries(run, log), pred.tta: entry}})
    return {"run": str(run), "tta": pred.tta, **entry}


def calibrate_mean(probs: np.ndarray, temperature: float) -> np.ndarray:
    """An ensemble's mean probabilities ``probs`` (N, classes) with its temperature:
    softmax(log(probs) / temperature), float32. The log is taken in float64, of the
    probabilities floored at the smallest normal float64, so a class whose every run gave it 0
    keeps a probability of about 0 rather than becoming NaN."""
    z = np.log(np.maximum(np.asarray(probs, np.float64), np.finfo(np.float64).tiny)) / temperature
    return torch.from_numpy(z).softmax(1).numpy().astype(np.float32)


def _member_state(run: Path, tta: str) -> dict[str, Any]:
    """What an ensemble's temperature was fitted on top of, for one run: its weights and its
    calibration at ``tta`` (as :func:`read_calibration` gives them now)."""
    cal = read_calibration(run).get(tta)
    return {"run": run.name, "weights_sha256": weights_digest(run),
            "temperature": None if cal is None else cal.temperature,
            "class_offsets": None if cal is None or cal.class_offsets is None else list(cal.class_offsets)}


def read_ensemble_calibration(folder: str | Path, runs: list[Path], tta: str) -> Calibration | None:
    """The temperature of the ensemble of ``runs`` (the finished runs of the ``--runs N`` folder
    ``folder``) at test-time augmentation ``tta``, from ``folder/ensemble_calibration.json``;
    None where it has none for that level. Refused, naming what to do, where the file is damaged
    or a run's weights or calibration changed since the temperature was fitted on top of them."""
    folder = Path(folder)
    path = folder / ENSEMBLE_FILE
    if not path.is_file():
        return None
    again = f"calibrate them again with: cifarlab calibrate {folder} (or leave it out with --uncalibrated)"
    entry = _levels(path, ENSEMBLE_FORMAT, "ensemble calibration file", again).get(tta)
    if entry is None:
        return None
    t = entry.get("temperature") if isinstance(entry, dict) else None
    if not _positive_number(t) or not isinstance(entry.get("runs"), list):
        raise CifarlabError(f"{path}: entry {tta!r} has temperature {t!r}; expected a positive number and the runs "
                            f"it was fitted on; {again}")
    now = [_member_state(r, tta) for r in runs]
    if [m.get("run") if isinstance(m, dict) else None for m in entry["runs"]] != [m["run"] for m in now]:
        raise CifarlabError(f"{path}: its temperature for {tta!r} was fitted to the ensemble of other runs than "
                            f"the folder's finished ones ({short_list([m['run'] for m in now], 5)}); {again}")
    changed = [m["run"] for m, was in zip(now, entry["runs"])
               if was.get("weights_sha256") != m["weights_sha256"]
               or not same_calibration(was, m["temperature"], m["class_offsets"])]
    if changed:
        raise CifarlabError(f"{path}: {short_list(changed, 5)} changed after the ensemble's temperature for {tta!r} "
                            f"was fitted (trained on, or calibrated on its own, since); {again}")
    from .export import read_run

    classes = read_run(runs[0])[1]["classes"]
    return Calibration(float(t), None, *_set_floors(entry.get("prediction_sets"), classes, f"{path}: entry {tta!r}",
                                                    again))


def untrained_images(trained: list[np.ndarray], n: int) -> np.ndarray:
    """The indices, sorted, of the images of a training split of ``n`` that none of ``trained``
    (each run's indices of the images its weights learnt from:
    :func:`cifarlab.data.seen.learnt_from`) holds: those an ensemble of the runs has never seen,
    at most :data:`ENSEMBLE_MAX_IMAGES` of them (a seeded draw)."""
    unseen = np.setdiff1d(np.arange(n), np.concatenate(trained) if trained else [])
    if len(unseen) > ENSEMBLE_MAX_IMAGES:  # enough for one number; predicting more only costs time
        unseen = np.sort(np.random.default_rng(0).choice(unseen, ENSEMBLE_MAX_IMAGES, replace=False))
    return unseen


def _ensemble_images(runs: list[Path], ds) -> np.ndarray:
    """The indices into ``ds``'s training split of the images an ensemble of ``runs`` is
    calibrated on: those no run trained on (:func:`untrained_images`)."""
    from .data.seen import learnt_from

    return untrained_images([learnt_from(r, ds.x_train, _held_out(r, ds)[1]) for r in runs], len(ds.y_train))


def held_out_images(where: str | Path, ds, ensemble: bool = False) -> np.ndarray:
    """The indices into ``ds``'s training split of the held-out images that ``cifarlab
    calibrate`` fits on: a run's validation images, or with ``ensemble`` (``where`` the folder of
    ``--runs N``) the training images no run trained on. Refused, as calibration refuses it,
    where ``ds`` is not the runs' data or a run held out no images."""
    from .export import finished_runs

    return _ensemble_images(finished_runs(Path(where)), ds) if ensemble else _held_out(Path(where), ds)[2]


def calibrate_ensemble(base: str | Path, ds, tta: str | None = None, device: str = "auto",
                       log: Callable[[str], None] = print, sets: float | None = None,
                       sets_by_class: bool = False) -> dict[str, Any]:
    """Fit the temperature of the ensemble of the ``--runs N`` folder ``base`` (the mean of its
    runs' probabilities, each run with its calibration as it is now) on the images of ``ds``'s
    training split that no run trained on: the validation images the runs share, and those
    outside every run's ``--subset``, at most :data:`ENSEMBLE_MAX_IMAGES` of them (a seeded
    draw). Record it in ``base/ensemble_calibration.json`` and return its entry. Where there are
    fewer than :data:`ENSEMBLE_MIN_IMAGES` (runs of the whole data, whose validation images are
    each drawn by the run's own seed), nothing is fitted, and the entry says why. ``sets``,
    ``sets_by_class``: prediction sets fitted on the same images, as :func:`calibrate_run` fits a run's."""
    from .export import Ensemble, finished_runs, load_model
    from .fsutil import write_json

    base = Path(base)
    runs = finished_runs(base)
    unseen = _ensemble_images(runs, ds)
    if len(unseen) < ENSEMBLE_MIN_IMAGES:
        why = (f"{len(unseen):,} of the training images were trained on by no run (each run holds out validation "
               f"images drawn by its own seed), and the ensemble's temperature needs {ENSEMBLE_MIN_IMAGES:,}; train "
               "with --split-seed N, so that every run holds out the same ones")
        return {"calibrated": False, "why": why, "unseen_images": int(len(unseen))}
    ens = Ensemble([load_model(r, device, tta) for r in runs], base)  # each run with its calibration, as now
    level = ens.members[0].tta
    x, y = ds.x_train[unseen], ds.y_train[unseen]
    log(f"{base}: fitting their ensemble's temperature on {len(y):,} training images that no run trained on")
    logits = np.log(np.maximum(ens.predict(x).astype(np.float64), np.finfo(np.float64).tiny))
    entry = {**_fitted(logits, y), "runs": [_member_state(r, level) for r in runs], "data": ds.source}
    if sets is not None:
        probs = Calibration(entry["temperature"]).probabilities(logits)
        entry["prediction_sets"] = _fit_sets(probs, y, ens.classes, sets, sets_by_class, f"{base} (ensemble)", log)
    try:
        old = json.loads((base / ENSEMBLE_FILE).read_text())["by_tta"]
        kept = {k: v for k, v in old.items() if k != level} if isinstance(old, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: this level alone
        kept = {}
    write_json(base / ENSEMBLE_FILE, {
        "format": ENSEMBLE_FORMAT,
        "method": "temperature scaling after averaging (Rahaman and Thiery, 2021): probabilities = "
                  "softmax(log(mean of the runs' calibrated probabilities) / temperature), the temperature "
                  "minimising the negative log-likelihood of training images that no run trained on (validation_images: "
                  "how many)",
        "by_tta": {**kept, level: entry}})
    return {"calibrated": True, "tta": level, **entry}


def balancing_offsets(train_counts: np.ndarray) -> np.ndarray:
    """The offsets, one per class, that turn the calibrated logits of a model trained on
    classes of ``train_counts`` images (all above 0) into those of one whose classes were
    equally likely beforehand: log(1 / classes) - log(the class's share). By Bayes' rule,
    p_equal(y | x) is proportional to p_train(y | x) / p_train(y), and the constant log(1 / classes)
    keeps offsets of 0 where the classes were equal already."""
    counts = np.asarray(train_counts, np.float64)
    return np.log(1 / len(counts)) - np.log(counts / counts.sum())


def _balance(run: Path, cfg, classes: list[str], y_train: np.ndarray, logits: np.ndarray, y: np.ndarray,
             temperature: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The ``balance_classes`` record of a calibration entry: the training share of each class,
    the offsets that make the classes equally likely beforehand, and what they do to the
    balanced accuracy of the validation images (``logits``, ``y``)."""
    from .evaluate import balanced_accuracy

    counts = np.bincount(y_train, minlength=len(classes))
    if not counts.all():
        missing = [c for c, n in zip(classes, counts) if not n]
        raise CifarlabError(f"'{run}' trained on no images of {short_list(missing, 5)}, so it cannot be corrected "
                            "toward classes it never saw; calibrate it without --balance-classes")
    share = counts / counts.sum()
    offsets = balancing_offsets(counts)
    adjusted = Calibration(temperature, tuple(offsets.tolist())).apply(logits)
    before, after = balanced_accuracy(y, logits.argmax(1)), balanced_accuracy(y, adjusted.argmax(1))
    if len(set(counts.tolist())) == 1:
        log(f"{run}: its training classes were equal in size ({counts[0]:,} images each); there is nothing to "
            "balance, and the offsets are 0")
    leaning = [what for what, on in (("class weights", cfg.train.class_weight is not None),
                                     ("balanced sampling", cfg.train.sampling == "balanced"),
                                     ("a logit-adjusted loss", bool(cfg.train.logit_adjustment))) if on]
    if leaning:
        log(f"{run}: warning: it trained with {' and '.join(leaning)}, so its predictions already lean toward rare "
            "classes; the offsets assume a model trained on the data as it is, and may overcorrect")
    if after < before:
        log(f"{run}: warning: balancing lowers the validation images' balanced accuracy ({before:.4f} -> "
            f"{after:.4f}); consider calibrating without --balance-classes")
    return {"target": "every class equally likely",
            "training_share": dict(zip(classes, share.tolist())),
            "class_offsets": dict(zip(classes, offsets.tolist())),
            "trained_with": leaning,
            "validation_balanced_accuracy": {"before": before, "after": after}}


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
                   log: Callable[[str], None] = print, balance_classes: bool = False, sets: float | None = None,
                   sets_by_class: bool = False) -> dict[str, Any]:
    """:func:`calibrate_run` for every run of the ``--runs N`` folder ``base``, then
    :func:`calibrate_ensemble` for their ensemble; returns each run's entry, the ensemble's, and
    the temperatures and validation calibration errors described over the runs (and with
    ``balance_classes``, the validation balanced accuracies before and after). ``sets``,
    ``sets_by_class``: prediction sets for each run and the ensemble."""
    from .evaluate import describe
    from .export import finished_runs

    entries = [calibrate_run(r, ds, tta, device, log, balance_classes, sets, sets_by_class)
               for r in finished_runs(base)]
    ensemble = calibrate_ensemble(base, ds, tta, device, log, sets, sets_by_class)
    out = {"runs": len(entries), "per_run": entries, "ensemble": ensemble,
           "temperature": describe([e["temperature"] for e in entries]),
           "validation_ece_before": describe([e["validation_ece"]["before"] for e in entries]),
           "validation_ece_after": describe([e["validation_ece"]["after"] for e in entries])}
    if balance_classes:
        for when in ("before", "after"):
            out[f"validation_balanced_accuracy_{when}"] = describe(
                [e["balance_classes"]["validation_balanced_accuracy"][when] for e in entries])
    return out
