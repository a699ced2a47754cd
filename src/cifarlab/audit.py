"""Disaggregated evaluation and a model card: who and what a model gets wrong, written down.

Semantics follow Fairlearn's ``MetricFrame``: a metric computed overall and ``by_group``, with
``difference`` (largest minus smallest) and ``ratio`` (smallest over largest) between groups.
Every figure comes with a 95% interval, so every gap comes with its uncertainty: a class's or
group's accuracy the exact binomial (Clopper-Pearson) one, a gap between two the Newcombe
hybrid score one; precisions and ratios percentile bootstrap intervals over test images
(seeded). Fairlearn itself is not a dependency: these few aggregations are all it would be used
for here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .conformal import below_range
from .data import Dataset, seen
from .datasheet import people_classes, people_warning
from .duplicates import read_duplicates
from .label_issues import read_label_issues
from .ood import image_count, read_ensemble_report, read_report, saved_scores
from .errors import CifarlabError, short_list
from .evaluate import _check_compatible, probabilities_and_raw
from .export import data_suffix, list_to_csv_rows, load_ensemble, load_model, predict_command
from .fsutil import json_text, md_cell, read_json, report_folder, write_json, write_text

TO_FILL = "[TO BE FILLED IN BY THE MODEL'S OWNER]"
# Every model card's out-of-scope uses, also carried in the metadata of an exported model.
OUT_OF_SCOPE = (
    "Identifying, recognising, tracking or surveilling people, including face recognition.",
    "Making or supporting decisions about people (access, employment, credit, policing, health).",
    "Safety-critical perception (vehicles, medical imaging) or any image outside the training classes; "
    "the model always answers with one of its classes, even for images of none of them.",
)


def proportion_ci(k: int, n: int, alpha: float = 0.05, method: str = "exact") -> list[float]:
    """The ``1 - alpha`` interval of a share of ``k`` in ``n``, exact (Clopper-Pearson) unless
    ``method`` names another of scipy's (``"wilson"``); NaNs where ``n`` is 0. A percentile
    bootstrap collapses to a point where every image of a class is right or every one wrong ([0, 0]
    for 0 of 4: each resample of four wrong answers is wrong); this one says how little four
    images tell ([0, 0.602])."""
    if n == 0:
        return [math.nan, math.nan]
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(1 - alpha, method=method)
    return [float(ci.low), float(ci.high)]


def difference_ci(k1: int, n1: int, k2: int, n2: int, alpha: float = 0.05) -> list[float]:
    """Newcombe's hybrid score ``1 - alpha`` interval (his method 10, 1998) of ``k1/n1 - k2/n2``,
    the difference of two shares of disjoint sets of images, from their Wilson intervals; NaNs
    where a set is empty. Its bootstrap was the point [1, 1] for a class all right against one
    all wrong, however few their images; this one widens as they get fewer."""
    if not n1 or not n2:
        return [math.nan, math.nan]
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = proportion_ci(k1, n1, alpha, "wilson"), proportion_ci(k2, n2, alpha, "wilson")
    d = p1 - p2
    return [d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)]


def percentile_interval(vals: np.ndarray, alpha: float = 0.05) -> list[float]:
    """The central ``1 - alpha`` percentile interval of resampled figures; resamples where the
    figure is undefined (NaN: a class never predicted) drop out, and none left gives NaNs."""
    vals = vals[~np.isnan(vals)]
    if not len(vals):
        return [math.nan, math.nan]
    return [float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))]


def class_confidence(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """Calibration by predicted class: of the images the model gave each class, how many, its
    mean confidence on them, and the share that truly were that class (the precision). A
    confidence above the precision is overconfidence when the model names that class: a one-bin
    form of class-wise calibration (Kull et al., 2019), readable beside the accuracies. Figures
    of a class never predicted are None."""
    yhat, conf = probs.argmax(1), probs.max(1)
    rows = []
    for i, c in enumerate(classes):
        given = yhat == i
        n = int(given.sum())
        mean_conf = float(conf[given].mean()) if n else None
        precision = float((y[given] == i).mean()) if n else None
        rows.append({"class": c, "predicted": n, "mean_confidence": mean_conf, "precision": precision,
                     "overconfidence": mean_conf - precision if n else None})
    return rows


def class_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Per-class accuracy (= recall) with its exact 95% interval, precision with a bootstrap
    one; the best-worst spread, its difference with Newcombe's interval and its ratio with a
    bootstrap one."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    n = len(y)
    boots = rng.integers(0, n, (n_boot, n))
    # One bootstrap for all classes: recall and precision per class per resample, vectorised.
    rec_b = np.full((n_boot, k), np.nan)
    prec_b = np.full((n_boot, k), np.nan)
    for b in range(n_boot):
        yb, pb = y[boots[b]], pred[boots[b]]
        cm = np.bincount(yb * k + pb, minlength=k * k).reshape(k, k)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec_b[b] = np.diag(cm) / cm.sum(1)
            prec_b[b] = np.diag(cm) / cm.sum(0)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = np.diag(cm) / cm.sum(1)
        prec = np.diag(cm) / cm.sum(0)

    acc_ci = [proportion_ci(cm[i, i], cm[i].sum()) for i in range(k)]  # a class's accuracy is its recall
    rows = [{"class": c, "support": int(cm[i].sum()), "accuracy": float(rec[i]), "accuracy_ci": acc_ci[i],
             "recall": float(rec[i]), "recall_ci": list(acc_ci[i]),
             "precision": float(prec[i]) if np.isfinite(prec[i]) else None,
             "precision_ci": percentile_interval(prec_b[:, i])} for i, c in enumerate(classes)]
    best, worst = int(np.nanargmax(rec)), int(np.nanargmin(rec))
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 in a resample: NaN, which the interval drops
        ratio_b = rec_b[:, worst] / rec_b[:, best]
    spread = {"best": classes[best], "worst": classes[worst], "difference": float(rec[best] - rec[worst]),
              "difference_ci": difference_ci(cm[best, best], cm[best].sum(), cm[worst, worst], cm[worst].sum()),
              "ratio": float(rec[worst] / rec[best]) if rec[best] else None,
              "ratio_ci": percentile_interval(ratio_b)}
    return {"per_class": rows, "spread": spread}


def read_groups_file(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A groups CSV's header and rows (line number, fields), checked as far as the file alone
    allows: readable, a first column ``index`` or ``path`` and an attribute column or more, rows
    as long as the header, no attribute without a value. The commands call it before they load
    the data (:func:`check_groups_args`), so a bad file fails at once; :func:`read_groups`
    matches the rows to images."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(ln, r) for ln, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CifarlabError(f"cannot read groups file '{path}': {e}") from None
    if len(rows) < 2 or len(rows[0][1]) < 2:
        raise CifarlabError(f"groups file '{path}' needs a header and rows, with a first column 'index' or 'path' "
                            "and at least one attribute column")
    head, body = [h.strip() for h in rows[0][1]], rows[1:]
    if head[0].lower() not in ("index", "path"):
        raise CifarlabError(f"groups file '{path}': first column is '{head[0]}'; it must be 'index' or 'path'")
    for ln, r in body:
        if len(r) != len(head):
            raise CifarlabError(f"groups file '{path}' line {ln}: {len(r)} fields, header has {len(head)}")
    for j, h in enumerate(head[1:], start=1):
        if not any(r[j].strip() for _, r in body):
            raise CifarlabError(f"groups file '{path}': column '{h}' has no values; fill it in or remove it")
    return head, body


def read_groups(path: str | Path, ds: Dataset) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a groups CSV; returns (test indices, {attribute: values per row}).

    The first column is ``index`` (position in the test split, in the loader's order) or
    ``path`` (as in ``Dataset.test_paths``, e.g. ``test/cat/0001.jpg``). A byte-order mark (as
    spreadsheets write "CSV UTF-8") and blank lines are ignored. An empty cell means the
    attribute was not recorded for that image (see :func:`audit_run`). An image listed twice, or
    an attribute column with no value at all, is refused: either would misstate the groups.
    """
    head, body = read_groups_file(path)
    key = head[0].lower()
    lookup = {p: i for i, p in enumerate(ds.test_paths)} if key == "path" else None
    idx: list[int] = []
    seen: dict[int, int] = {}
    for ln, r in body:
        v = r[0].strip()
        if lookup is not None:
            if v not in lookup:
                raise CifarlabError(f"groups file '{path}' line {ln}: path '{v}' is not a test image of {ds.source} "
                                    f"(test paths look like '{ds.test_paths[0] if ds.test_paths else '?'}')")
            i = lookup[v]
        else:
            if not v.isdigit() or int(v) >= len(ds.y_test):
                raise CifarlabError(f"groups file '{path}' line {ln}: index '{v}' is not valid; expected 0.."
                                    f"{len(ds.y_test) - 1}")
            i = int(v)
        if i in seen:
            raise CifarlabError(f"groups file '{path}' line {ln}: {key} '{v}' is listed twice (first on line "
                                f"{seen[i]}); give each test image one row")
        seen[i] = ln
        idx.append(i)
    attrs = {h: np.array([r[j].strip() for _, r in body], dtype=object) for j, h in enumerate(head) if j > 0}
    return np.array(idx, dtype=np.int64), attrs


AND = " & "  # joins two attributes' names, and their values, into an intersection's


def with_intersections(attrs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``attrs`` (attribute -> value per image, '' where not recorded) and, for each pair of
    attributes, their intersection: ``'lighting & colour'`` with values such as ``'dark & nearly
    grey'``, not recorded where either is not. A gap can hide in a combination that neither
    attribute shows alone (Buolamwini and Gebru, 2018: darker-skinned women, not darker skin or
    women alone); pairs only, since the groups of three attributes are mostly too small to judge."""
    names = list(attrs)
    out = dict(attrs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            name = f"{a}{AND}{b}"
            if name in attrs:
                raise CifarlabError(f"the groups file has a column named '{name}', the name of the intersection of "
                                    f"'{a}' and '{b}'; rename it to audit with --intersections")
            va, vb = attrs[a], attrs[b]
            out[name] = np.array([f"{x}{AND}{z}" if x and z else "" for x, z in zip(va, vb)], dtype=object)
    return out


def check_intersections(intersections: bool, groups_csv: str | Path | None) -> None:
    """``--intersections`` needs ``--groups``: refused without one, before any data is read."""
    if intersections and not groups_csv:
        raise CifarlabError("--intersections pairs the attributes of a groups file; give one with --groups")


def check_groups_args(intersections: bool, groups_csv: str | Path | None) -> None:
    """The commands' checks of ``--groups`` and ``--intersections`` that need no data: run before
    the data is loaded, so a missing or malformed groups file fails at once."""
    check_intersections(intersections, groups_csv)
    if groups_csv:
        read_groups_file(groups_csv)


def load_groups(groups_csv: str | Path | None, ds: Dataset, intersections: bool = False):
    """:func:`read_groups` of ``groups_csv`` (None: no groups), with :func:`with_intersections`
    where ``intersections``, which needs a file of two attributes or more."""
    check_intersections(intersections, groups_csv)
    groups = read_groups(groups_csv, ds) if groups_csv else None
    if groups is None or not intersections:
        return groups
    if len(groups[1]) < 2:
        raise CifarlabError(f"--intersections pairs the attributes of the groups file, and '{groups_csv}' has one "
                            f"({', '.join(groups[1])}); add a column, or leave --intersections out")
    return groups[0], with_intersections(groups[1])


def group_metrics(y: np.ndarray, pred: np.ndarray, values: np.ndarray, overall: float, margin: float,
                  min_group: int, conf: np.ndarray | None = None) -> dict[str, Any]:
    """By-group accuracy (with its exact interval), macro recall and macro precision; the largest
    gap and its interval (:func:`difference_ci`), or a gap of None where there is only one group.
    With ``conf``, each image's top probability: each group's mean confidence and its
    overconfidence (that minus its accuracy), and the gap between the groups most and least
    overconfident (:func:`confidence_gap`)."""
    groups = sorted(set(values.tolist()))
    rows = []
    members = {g: np.flatnonzero(values == g) for g in groups}
    right = {g: int((y[ix] == pred[ix]).sum()) for g, ix in members.items()}  # each group has an image

    def macro(ix, axis_true: bool):
        yt, pt = y[ix], pred[ix]
        vals = []
        for c in np.unique(yt if axis_true else pt):
            m = (yt == c) if axis_true else (pt == c)
            vals.append(float((yt[m] == pt[m]).mean()))
        return float(np.mean(vals)) if vals else float("nan")

    for g in groups:
        ix = members[g]
        a = right[g] / len(ix)
        row = {"group": g, "n": int(len(ix)), "accuracy": a, "accuracy_ci": proportion_ci(right[g], len(ix)),
               "macro_recall": macro(ix, True), "macro_precision": macro(ix, False),
               "too_small": bool(len(ix) < min_group),
               "flagged": bool(a < overall - margin)}
        if conf is not None:
            row["mean_confidence"] = float(conf[ix].mean())
            row["overconfidence"] = row["mean_confidence"] - a
        rows.append(row)
    if len(rows) < 2:  # one group: nothing to compare it with
        return {"groups": rows, "gap": None} | ({"confidence_gap": None} if conf is not None else {})
    judged = [r for r in rows if not r["too_small"]] or rows
    hi = max(judged, key=lambda r: r["accuracy"])
    lo = min(judged, key=lambda r: r["accuracy"])
    ci = difference_ci(right[hi["group"]], hi["n"], right[lo["group"]], lo["n"])
    out = {"groups": rows, "gap": {"highest": hi["group"], "lowest": lo["group"],
                                   "difference": hi["accuracy"] - lo["accuracy"], "difference_ci": ci,
                                   "ratio": lo["accuracy"] / hi["accuracy"] if hi["accuracy"] else None,
                                   "ci_excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}}
    if conf is not None:
        most = max(judged, key=lambda r: r["overconfidence"])
        least = min(judged, key=lambda r: r["overconfidence"])
        excess = conf - (y == pred)  # each image's confidence minus whether it was right
        out["confidence_gap"] = confidence_gap(excess[members[most["group"]]], excess[members[least["group"]]])
        out["confidence_gap"] |= {"most": most["group"], "least": least["group"]}
    return out


def confidence_gap(excess_a: np.ndarray, excess_b: np.ndarray, alpha: float = 0.05) -> dict[str, Any]:
    """How much more overconfident a model is on one group of images than on another: the
    difference of the groups' mean confidence minus accuracy, from each image's confidence
    minus 1 if it was right (0 if not), with a normal-approximation interval of a difference of
    two means (Welch's standard error; each value lies in [-1, 1], so the means are near normal
    for groups of tens of images). Calibration within groups (Pleiss et al., 2017): a confidence
    threshold that trusts a prediction trusts one group's wrongly more often."""
    from scipy import stats

    diff = float(excess_a.mean() - excess_b.mean())
    if min(len(excess_a), len(excess_b)) < 2:  # a single image's spread is unknown: no interval
        return {"difference": diff, "difference_ci": [None, None], "ci_excludes_zero": False}
    var = sum(float(e.var(ddof=1)) / len(e) for e in (excess_a, excess_b))
    half = float(stats.norm.ppf(1 - alpha / 2)) * var ** 0.5
    ci = [diff - half, diff + half]
    return {"difference": diff, "difference_ci": ci, "ci_excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}


def share_by_group(hit: np.ndarray, values: np.ndarray, gm: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The share of each group's test images for which ``hit`` (aligned with ``values``) holds,
    added to the rows of ``gm`` (as :func:`group_metrics` returns them) as ``key``, with its
    exact interval as ``key_ci``; returns the gap between the groups of the highest and lowest
    share (those large enough to judge) with its interval, or None where there is only one group."""
    hits = {g["group"]: int(hit[values == g["group"]].sum()) for g in gm["groups"]}  # each has an image
    for g in gm["groups"]:
        g[key] = hits[g["group"]] / g["n"]
        g[f"{key}_ci"] = proportion_ci(hits[g["group"]], g["n"])
    if len(gm["groups"]) < 2:
        return None
    judged = [g for g in gm["groups"] if not g["too_small"]] or gm["groups"]
    most = max(judged, key=lambda g: g[key])
    least = min(judged, key=lambda g: g[key])
    ci = difference_ci(hits[most["group"]], most["n"], hits[least["group"]], least["n"])
    return {"most": most["group"], "least": least["group"], "difference": most[key] - least[key], "difference_ci": ci,
            "ci_excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}


def unfamiliar_by_group(flagged: np.ndarray, values: np.ndarray, gm: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`share_by_group` of the images ``cifarlab ood``'s threshold flags as unfamiliar
    (``unfamiliar_share``): a deployment that turns away unfamiliar images turns away some
    people's photographs more than others' where the gap is real."""
    return share_by_group(flagged, values, gm, "unfamiliar_share")


def set_coverage_by_group(held: np.ndarray, size: np.ndarray, values: np.ndarray, gm: dict[str, Any],
                          coverage: float, n_fit: int) -> dict[str, Any] | None:
    """:func:`share_by_group` of the images whose prediction set (``cifarlab calibrate --sets``)
    held their true class (``held``; ``set_coverage``), with the range chance allows a group of
    images drawn as the ``n_fit`` the floor was fitted on were (``set_coverage_expected``,
    :func:`cifarlab.conformal.expected_range`) and the group's mean set size (``size``, each
    image's; ``set_mean_size``): sets fitted to hold it for 90% of images on average may hold it
    for fewer of one group's, whose people then get a wrong set more often, or keep it by giving
    them larger sets, less of an answer."""
    from .conformal import expected_range

    gap = share_by_group(held, values, gm, "set_coverage")
    for g in gm["groups"]:
        g["set_coverage_expected"] = expected_range(g["n"], n_fit, coverage)
        g["set_mean_size"] = float(size[values == g["group"]].mean())
    return gap


def images_phrase(n: int) -> str:
    """'1 image', '2 images'."""
    return f"{n} image" if n == 1 else f"{n} images"


# How an option is named in an error: as the Python keyword the caller gave, or as the CLI flag
# the user typed, so the message points at what they can change.
PYTHON_NAMES = {"margin": "margin={}", "min_group": "min_group={}", "n_boot": "n_boot={}"}
CLI_NAMES = {"margin": "--margin {}", "min_group": "--min-group {}", "n_boot": "--bootstrap {}"}


def check_bootstrap(n_boot: int, names: dict[str, str] = PYTHON_NAMES) -> None:
    """Refuse a number of bootstrap resamples too small for a 95% interval's tails."""
    if n_boot < 100:
        raise CifarlabError(f"{names['n_boot'].format(n_boot)} is too few resamples for a 95% interval; use at "
                            "least 100")


def check_options(margin: float, min_group: int, n_boot: int, names: dict[str, str] = PYTHON_NAMES) -> None:
    """Refuse audit settings that cannot give a meaningful report, naming the value; ``names``
    spells each option (:data:`PYTHON_NAMES`, or :data:`CLI_NAMES` for the command line)."""
    if not 0 <= margin < 1:
        raise CifarlabError(f"{names['margin'].format(margin)} is not valid; it must lie in [0, 1)")
    check_bootstrap(n_boot, names)
    if min_group < 1:
        raise CifarlabError(f"{names['min_group'].format(min_group)} is not valid; it must be a positive number "
                            "of images")


def audit_run(run: str | Path, ds: Dataset, out: str | Path | None = None, groups_csv: str | None = None,
              margin: float = 0.05, min_group: int = 30, n_boot: int = 1000, seed: int = 0, tta: str | None = None,
              device: str = "auto", log: Callable[[str], None] = print,
              uncalibrated: bool = False, intersections: bool = False,
              about: str | Path | None = None, datasheet: str | Path | None = None) -> dict[str, Any]:
    """Audit a run on ``ds``'s test split: write ``audit.json``, ``audit.md``, plots and
    ``MODEL_CARD.md``/``model_card.json`` into ``out`` (default ``RUN/audit``, or ``RUN/audit-<data>``
    on other data than the run's own: :func:`cifarlab.export.other_data_folder`) and return the
    audit. ``groups_csv``: a file of image attributes to break accuracy down by (see
    :func:`read_groups`); ``margin``: how far below the overall accuracy a class or group is
    flagged; ``min_group``: a group of fewer images is marked too small and left out of the
    best-to-worst gap; ``n_boot``: bootstrap resamples for the confidence intervals. ``tta``:
    the test-time augmentation, by default the run's own (the model as trained and reported is
    the model audited). Its probabilities use the run's temperature where ``cifarlab
    calibrate`` fitted one, unless ``uncalibrated``. ``intersections``: also every pair of the
    groups file's attributes (:func:`with_intersections`). ``about``: a file of what only the
    model's owner knows (:func:`cifarlab.about.read_about`), which the model card states;
    ``datasheet``: the folder (or ``datasheet.json``) that ``cifarlab datasheet`` wrote of the
    run's training data, whose warnings the model card quotes."""
    check_options(margin, min_group, n_boot)
    # The groups file first: a mistake in it should cost no prediction and leave no partial report.
    groups = load_groups(groups_csv, ds, intersections)
    return _audit(run, ds, out, groups, groups_csv, margin, min_group, n_boot, seed, tta, device, log, uncalibrated,
                  read_card_files(about, datasheet), datasheet)[0]


def _audit(run: str | Path, ds: Dataset, out: str | Path | None, groups, groups_csv: str | None, margin: float,
           min_group: int, n_boot: int, seed: int, tta: str | None, device: str, log: Callable[[str], None],
           uncalibrated: bool, cards: tuple[dict[str, dict[str, str]], dict[str, Any] | None],
           datasheet: str | Path | None) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`audit_run`'s audit, and the probabilities it was made of, with the groups file
    already read (:func:`load_groups`) and the model card's files (:func:`read_card_files`), so
    that the runs of a folder share one reading of each."""
    run = Path(run)
    suffix = data_suffix(ds, [run])  # the reports on this data are in RUN/<kind><suffix>
    out = Path(out) if out is not None else run / f"audit{suffix}"
    facts, sheet = cards
    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    if sheet is not None and sheet["classes"] != pred.classes:
        raise CifarlabError(f"the datasheet '{datasheet}' describes data of the classes "
                            f"{short_list(sheet['classes'])}, the run's are {short_list(pred.classes)}; give the "
                            "datasheet of its training data")
    with report_folder(out):  # removed again if the audit fails part-way
        audit, probs = _write_audit(out, run, pred, ds, groups, groups_csv, margin, min_group, n_boot, seed, suffix,
                                    facts, sheet)
    for w in audit["warnings"]:
        log(f"warning: {w}")
    if people := people_classes(pred.classes):  # the model card's ethical considerations say it in full
        log(f"note: {people_warning(people)}")
    sp = audit["classes"]["spread"]
    log(f"overall accuracy {audit['overall_accuracy']:.4f}; best class {sp['best']}, worst {sp['worst']}: gap "
        f"{sp['difference']:.4f} (95% CI {sp['difference_ci'][0]:.4f} to {sp['difference_ci'][1]:.4f})")
    log(f"wrote {out / 'audit.md'} and {out / 'MODEL_CARD.md'}")
    return audit, probs


def read_card_files(about: str | Path | None, datasheet: str | Path | None) -> tuple[dict[str, dict[str, str]],
                                                                                   dict[str, Any] | None]:
    """What the model card states besides the audit's figures: the answers of the about file
    ``about`` (:func:`cifarlab.about.read_about`) and the report of the datasheet folder or file
    ``datasheet`` (:func:`cifarlab.datasheet.read_datasheet`; None without one). A bad file of
    either is refused, so callers check them before any data is loaded or model run."""
    from .about import read_about
    from .datasheet import read_datasheet

    return read_about(about), (read_datasheet(datasheet) if datasheet is not None else None)


def _write_audit(out: Path, run: Path, pred, ds: Dataset, groups, groups_csv: str | None, margin: float,
                 min_group: int, n_boot: int, seed: int, suffix: str,
                 facts: dict[str, dict[str, str]] | None = None,
                 sheet: dict | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`audit_run`'s predictions, metrics and files, into the existing folder ``out``,
    returned with the probabilities they were made of;
    the other reports it quotes are those in ``RUN/<kind><suffix>`` (:func:`cifarlab.export.data_suffix`);
    ``facts``, the owner's answers (:func:`cifarlab.about.read_about`), and ``sheet``, the
    training data's datasheet (:func:`cifarlab.datasheet.read_datasheet`), go into the model card."""
    from .evaluate import write_report

    probs, raw = probabilities_and_raw(pred, ds.x_test)
    report = write_report(pred, ds, probs, out, uncalibrated=raw)  # confusion matrix, reliability, confident errors
    yhat = probs.argmax(1)
    y = ds.y_test
    overall = float((yhat == y).mean())
    cls, class_warnings = _class_audit(y, yhat, pred.classes, overall, margin, n_boot, seed)
    cls["confidence"] = class_confidence(probs, y, pred.classes)
    trained = _train_per_class(run, pred.classes)
    for r in cls["per_class"]:
        if trained:  # beside its accuracy: a class seen less in training is usually recognised worse
            r["train_images"] = trained[r["class"]]
    audit: dict[str, Any] = {"run": str(run), "data": ds.source, "tta": pred.tta, "overall_accuracy": overall,
                             "margin": margin, "bootstrap_resamples": n_boot, "classes": cls, "warnings": [],
                             "calibration": {"ece": report["calibration"]["ece"], "temperature": report["temperature"],
                                             "uncalibrated_ece": (report.get("uncalibrated") or {}).get("ece"),
                                             "balanced_classes": report.get("class_offsets") is not None,
                                             "class_offsets": report.get("class_offsets")}}
    audit["warnings"] += class_warnings
    # `cifarlab duplicates`' figures for this model (weights, test-time augmentation, offsets), if measured
    # measured on the data audited (a report on other data is kept in duplicates-<data>)
    audit["near_duplicates"] = read_duplicates(run, pred.tta, pred.class_offsets(), name=f"duplicates{suffix}")
    # and `cifarlab label-issues`', on the same terms
    audit["label_issues"] = read_label_issues(run, pred.tta, pred.temperature(), pred.class_offsets(),
                                              name=f"label-issues{suffix}")
    # and `cifarlab ood`'s, whose familiar images are always the run's own test images
    ood = None if suffix else read_report(pred)
    audit["unfamiliar_images"] = _ood_summary(ood)
    flagged = unfamiliar_flags(pred, ood, len(y))  # each test image below its threshold, or None
    # the prediction sets of `cifarlab calibrate --sets`, as evaluate measured them, and whether
    # each test image's set held its true class
    audit["prediction_sets"] = report["prediction_sets"]
    sets_rule = None
    if report["prediction_sets"]:
        sets_rule = _sets_rule(report["prediction_sets"], pred.prediction_sets(probs), y,
                               pred.sets_calibration().set_fit_images, audit["warnings"])
    if groups is not None:
        idx, attrs = groups
        audit["groups_file"] = str(groups_csv)
        audit["attributes"] = {}
        for name, values in attrs.items():
            gm = _group_audit(y[idx], yhat[idx], values, overall, margin, min_group,
                              None if flagged is None else (flagged[idx], ood["score"]), probs.max(1)[idx],
                              None if sets_rule is None else (sets_rule[0][idx], sets_rule[1][idx], *sets_rule[2:]))
            audit["attributes"][name] = gm
            audit["warnings"] += _group_warnings(name, gm, overall, margin, min_group)
    _plot_class_accuracy(cls["per_class"], overall, out / "per_class_accuracy.png")
    write_json(out / "audit.json", audit)
    write_text(out / "per_class_audit.csv", list_to_csv_rows(
        [{k: (json_text(v, indent=None) if isinstance(v, list) else v) for k, v in r.items()}
         for r in cls["per_class"]]))
    write_text(out / "audit.md", _audit_markdown(audit))
    card = build_model_card(run, pred, ds, report, audit, suffix, facts, sheet)
    write_json(out / "model_card.json", card)
    write_text(out / "MODEL_CARD.md", model_card_markdown(card))
    return audit, probs


def _class_audit(y: np.ndarray, yhat: np.ndarray, classes: list[str], overall: float, margin: float, n_boot: int,
                 seed: int) -> tuple[dict[str, Any], list[str]]:
    """:func:`class_metrics`, each class flagged where its accuracy is more than ``margin`` below
    ``overall``; and a warning for each class flagged."""
    cls = class_metrics(y, yhat, classes, n_boot, seed)
    warnings = []
    for r in cls["per_class"]:
        r["flagged"] = bool(r["accuracy"] < overall - margin)
        if r["flagged"]:
            warnings.append(f"class '{r['class']}' accuracy {r['accuracy']:.3f} is more than {margin:.2f} below the "
                            f"overall {overall:.3f}")
    return cls, warnings


def _sets_rule(ps: dict[str, Any], in_set: np.ndarray, y: np.ndarray, fit_images: tuple[int, ...],
               warnings: list[str]) -> tuple[np.ndarray, np.ndarray, float, int]:
    """What :func:`_group_audit` takes of a model's prediction sets (``ps``, as
    :func:`cifarlab.evaluate.sets_report` measured them; ``in_set``, each test image's set): each
    image's set held its true class or not, its size, the coverage fitted for and the images a
    floor was fitted on. Appends to ``warnings`` one for each class below its chance range."""
    warnings += [_short_of_coverage(f"class '{c['class']}'", c["coverage"], c["expected_range"], ps["coverage_target"])
                 for c in ps["per_class"] if c["class"] in ps["short_of_coverage"]]
    # a group's images mix classes; by class, the fewest images of a floor give the widest range
    return in_set[np.arange(len(y)), y], in_set.sum(1), ps["coverage_target"], min(fit_images)


def _short_of_coverage(what: str, coverage: float, expected: list[float], target: float) -> str:
    """The warning for a class or group whose prediction sets held the true class less often
    than they were fitted for, beyond chance (below the range of
    :func:`cifarlab.conformal.expected_range`)."""
    return (f"{what}: its prediction sets held the true class for {coverage:.3f} of its images, below the {target:g} "
            f"they were fitted for and the {expected[0]:.3f} to {expected[1]:.3f} that chance allows images like the "
            "validation images")


def _group_audit(y: np.ndarray, yhat: np.ndarray, values: np.ndarray, overall: float, margin: float,
                 min_group: int, unfamiliar: tuple[np.ndarray, str] | None = None,
                 conf: np.ndarray | None = None,
                 sets: tuple[np.ndarray, np.ndarray, float, int] | None = None) -> dict[str, Any]:
    """:func:`group_metrics` of one attribute's ``values`` (one per image of ``y``, as is
    ``conf``, each image's top probability, where given). An empty cell: the attribute was not
    recorded for that image, which then belongs to none of its groups (a group of its own would
    mix unrelated images); ``not_recorded`` counts them.
    ``unfamiliar``: which of the images the threshold of ``cifarlab ood`` flags, and its score,
    for each group's share flagged (:func:`unfamiliar_by_group`). ``sets``: whether each image's
    prediction set held its true class and its size, the coverage the sets were fitted for and
    the images their floor was fitted on, for each group's coverage (:func:`set_coverage_by_group`)."""
    known = values != ""
    gm = group_metrics(y[known], yhat[known], values[known], overall, margin, min_group,
                       None if conf is None else conf[known])
    gm["not_recorded"] = int((~known).sum())
    if unfamiliar is not None:
        flagged, score = unfamiliar
        gm["unfamiliar_gap"] = unfamiliar_by_group(flagged[known], values[known], gm)
        gm["unfamiliar_score"] = score
    if sets is not None:
        held, size, target, n_fit = sets
        gm["set_coverage_gap"] = set_coverage_by_group(held[known], size[known], values[known], gm, target, n_fit)
        gm["set_coverage_target"] = target
    return gm


def _ensemble_audit(probs: np.ndarray, classes: list[str], ds: Dataset, groups, margin: float, min_group: int,
                    n_boot: int, seed: int, unfamiliar: tuple[np.ndarray, str] | None = None,
                    ens=None) -> dict[str, Any]:
    """The runs as one model, their ensemble, whose probabilities ``probs`` are the mean of the
    runs' (as :class:`cifarlab.export.Ensemble` gives them, what ``cifarlab predict BASE``
    serves), audited as :func:`audit_run` audits a run: its overall accuracy, each class's with
    its interval and flag, the best-to-worst gap, each group's accuracy and gap (``groups`` from
    :func:`load_groups`) and, with ``unfamiliar`` (which test images the ensemble's threshold of
    ``cifarlab ood`` flags, and its score), the share of each group flagged, and their warnings.
    Where ``ens`` (the :class:`~cifarlab.export.Ensemble`) has prediction sets of its own, their
    coverage by class and group, from the mean calibrated with the ensemble's temperature."""
    from .calibrate import calibrate_mean
    from .evaluate import sets_report

    y, yhat = ds.y_test, probs.argmax(1)
    overall = float((yhat == y).mean())
    cls, warnings = _class_audit(y, yhat, classes, overall, margin, n_boot, seed)
    out: dict[str, Any] = {"probabilities": "mean of the runs'", "overall_accuracy": overall, "classes": cls}
    own = None if ens is None else ens.calibration
    sets_rule = None
    if own is not None and own.set_floors is not None:  # the sets apply to the mean as predict serves it
        served = calibrate_mean(probs, own.temperature)
        out["prediction_sets"] = sets_report(own, served, y, classes)
        sets_rule = _sets_rule(out["prediction_sets"], ens.prediction_sets(served), y, own.set_fit_images, warnings)
    if groups is not None:
        idx, attrs = groups
        out["attributes"] = {}
        for name, values in attrs.items():
            gm = out["attributes"][name] = _group_audit(
                y[idx], yhat[idx], values, overall, margin, min_group,
                None if unfamiliar is None else (unfamiliar[0][idx], unfamiliar[1]), probs.max(1)[idx],
                None if sets_rule is None else (sets_rule[0][idx], sets_rule[1][idx], *sets_rule[2:]))
            warnings += _group_warnings(name, gm, overall, margin, min_group)
    out["warnings"] = warnings
    return out


def _ensemble_ood(ens, n: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """What the ensemble's section quotes of ``cifarlab ood``'s report on the ensemble ``ens``
    (:func:`cifarlab.ood.read_ensemble_report`): its score and threshold, and per set the AUROC
    and the share accepted; and which of its ``n`` test images the threshold flags, from the
    scores the report saved (None where they are missing or of other images). (None, None)
    where there is no report measured as the ensemble is now."""
    e = read_ensemble_report(ens)
    if e is None:
        return None, None
    # what a run's card quotes of its report, and what the ensemble's score is and its threshold was fitted on
    return {**_ood_summary(e), "scored": e["scored"][e["score"]]}, \
        unfamiliar_flags(ens, e, n)


def _train_per_class(run: Path, classes: list[str]) -> dict[str, int] | None:
    """How many images each class of ``run`` trained on, from its ``metrics.json`` (None for runs
    that did not record it, such as imported ones)."""
    try:
        counts = json.loads((run / "metrics.json").read_text())["data"]["train_per_class"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counts if isinstance(counts, dict) and list(counts) == list(classes) else None


def _group_warnings(name: str, gm: dict[str, Any], overall: float, margin: float, min_group: int) -> list[str]:
    """The warnings of one attribute's groups (``gm`` from :func:`group_metrics`)."""
    warnings = []
    if gm["not_recorded"]:
        warnings.append(f"{name}: not recorded for {images_phrase(gm['not_recorded'])}, left out of its groups")
    for g in gm["groups"]:
        if g["too_small"]:
            warnings.append(f"{name}={g['group']}: only {images_phrase(g['n'])} (< {min_group}); too small to judge")
        elif g["flagged"]:
            warnings.append(f"{name}={g['group']}: accuracy {g['accuracy']:.3f} is more than {margin:.2f} below the "
                            f"overall {overall:.3f}")
    if gm["gap"] is not None and gm["gap"]["ci_excludes_zero"]:
        ga = gm["gap"]
        warnings.append(f"{name}: the accuracy gap between '{ga['highest']}' and '{ga['lowest']}' "
                        f"({ga['difference']:.3f}, 95% CI {ga['difference_ci'][0]:.3f} to "
                        f"{ga['difference_ci'][1]:.3f}) excludes zero")
    cg = gm.get("confidence_gap")
    # beyond chance and by more than the margin: groups whose images are all right, say, differ
    # by hundredths of confidence with next to no spread, which no threshold feels
    if cg and cg["ci_excludes_zero"] and cg["difference"] > margin:
        over = {g["group"]: g["overconfidence"] for g in gm["groups"]}
        warnings.append(f"{name}: confidence exceeds accuracy by {over[cg['most']]:+.3f} on '{cg['most']}' images "
                        f"against {over[cg['least']]:+.3f} on '{cg['least']}' (difference {cg['difference']:.3f}, "
                        f"95% CI {cg['difference_ci'][0]:.3f} to {cg['difference_ci'][1]:.3f}, which excludes zero): "
                        "a confidence threshold is less reliable for the first")
    if "set_coverage_target" in gm:  # groups large enough to judge, covered less often than chance allows
        warnings += [_short_of_coverage(f"{name}={g['group']}", g["set_coverage"], g["set_coverage_expected"],
                                        gm["set_coverage_target"])
                     for g in gm["groups"] if not g["too_small"] and below_range(g["set_coverage"],
                                                                                 g["set_coverage_expected"])]
    ug = gm.get("unfamiliar_gap")
    if ug and ug["ci_excludes_zero"]:
        shares = {g["group"]: g["unfamiliar_share"] for g in gm["groups"]}
        warnings.append(f"{name}: the unfamiliar-image threshold of `cifarlab ood` flags {shares[ug['most']]:.1%} of "
                        f"'{ug['most']}' images against {shares[ug['least']]:.1%} of '{ug['least']}' "
                        f"(difference {ug['difference']:.3f}, 95% CI {ug['difference_ci'][0]:.3f} to "
                        f"{ug['difference_ci'][1]:.3f}, which excludes zero)")
    return warnings


def audit_runs(base: str | Path, ds: Dataset, out: str | Path | None = None, groups_csv: str | None = None,
               margin: float = 0.05, min_group: int = 30, n_boot: int = 1000, seed: int = 0, tta: str | None = None,
               device: str = "auto", log: Callable[[str], None] = print,
               uncalibrated: bool = False, intersections: bool = False,
               about: str | Path | None = None, datasheet: str | Path | None = None) -> dict[str, Any]:
    """Audit every run of the ``--runs N`` folder ``base`` (see :func:`audit_run`: each run's
    report and model card in ``RUN/audit``, or ``out/run-K``), then summarise over the runs: each
    class's and group's accuracy as mean, std, min and max, in how many runs it was flagged, and
    the largest gaps. A gap that one run shows may be its seed's; one that every run shows is the
    recipe's. Writes ``audit_summary.json`` and ``audit_summary.md`` into ``out`` (default ``base``,
    or ``base/audit-<data>`` on other data than the runs' own: :func:`cifarlab.export.other_data_folder`)."""
    from .export import finished_runs

    check_options(margin, min_group, n_boot)
    # Read once for every run and the ensemble; a bad file fails before the first run is audited.
    groups = load_groups(groups_csv, ds, intersections)
    cards = read_card_files(about, datasheet)
    base = Path(base)
    runs = finished_runs(base)
    suffix = data_suffix(ds, runs)  # the reports on this data are in base/<kind><suffix>
    out = Path(out) if out is not None else (base / f"audit{suffix}" if suffix else None)
    audits, reports, total = [], [], None
    for r in runs:
        folder = (out / r.name) if out else r / "audit"
        reports.append(folder / "audit.md")
        # its warnings are in its audit.md; the summary gathers them
        a, probs = _audit(r, ds, folder, groups, groups_csv, margin, min_group, n_boot, seed, tta, device,
                          lambda _: None, uncalibrated, cards, datasheet)
        total = probs.astype(np.float64) if total is None else total + probs  # the ensemble's, summed as they come
        sp = a["classes"]["spread"]
        log(f"{r.name}: overall accuracy {a['overall_accuracy']:.4f}; worst class {sp['worst']}, gap "
            f"{sp['difference']:.4f}; {len(a['warnings'])} warning(s); report in {folder / 'audit.md'}")
        audits.append(a)
    summary = summarise_audits(audits, [str(r) for r in runs])
    classes = [c["class"] for c in audits[0]["classes"]["per_class"]]
    try:  # the ensemble as predict serves it, for the reports measured on it
        ens = load_ensemble(base, "cpu", tta, uncalibrated)
    except CifarlabError:  # its own temperature is stale: no report can hold for it
        ens = None
    # cifarlab ood's familiar images are always the runs' own test images
    ood, flagged = _ensemble_ood(ens, len(ds.y_test)) if ens is not None and not suffix else (None, None)
    summary["ensemble"] = e = _ensemble_audit((total / len(runs)).astype(np.float32), classes, ds, groups, margin,
                                              min_group, n_boot, seed, None if flagged is None else
                                              (flagged, ood["score"]), ens)
    if not suffix:
        e["unfamiliar_images"] = ood
    # export --int8 OUT's comparison (only the default file is read; it names the data it was measured on)
    e["int8"] = _int8_summary(base, ens) if ens is not None else None
    sp = e["classes"]["spread"]
    log(f"their ensemble (the mean of their probabilities, as '{predict_command(base, tta, uncalibrated)}' gives "
        f"them): overall accuracy {e['overall_accuracy']:.4f}; worst class {sp['worst']}, gap {sp['difference']:.4f}; "
        f"{len(e['warnings'])} warning(s)")
    summary["robustness"] = _runs_robustness(base, f"robustness{suffix}", summary["tta"], audits)
    summary["near_duplicates"] = _runs_duplicates(audits)
    summary["unfamiliar_images"] = _runs_ood(audits)
    dest = out or base
    for row, report in zip(summary["per_run"], reports):
        row["report"] = os.path.relpath(report, dest)  # from the summary's folder, so its links work
    write_json(dest / "audit_summary.json", summary)
    _plot_runs_class_accuracy(summary, dest / "per_class_accuracy.png")
    write_text(dest / "audit_summary.md", _audit_runs_markdown(summary))
    return summary


def _runs_robustness(base: Path, name: str, tta: list[str], audits: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ``audit_summary`` quotes of ``cifarlab robustness``'s summary of the runs (in
    ``base``, or in its subfolder ``name`` where that is not ``robustness``: measured on other
    data), where it measured these weights with the test-time augmentation and calibration
    audited (else a note, or None)."""
    from .calibrate import same_calibration
    from .errors import short_list
    from .robustness import read_runs_summary

    r = read_runs_summary(base, None if name == "robustness" else name)
    if r is None or "note" in r:
        return r
    s = r["summary"]
    if s.get("tta") != tta:
        return {"note": f"measured under corruption with test-time augmentation {', '.join(s.get('tta') or [])}, "
                        f"audited with {', '.join(tta)}"}
    # A run calibrated after it was measured, or audited --uncalibrated, is not what was measured.
    audited = {Path(a["run"]).name: a["calibration"] for a in audits}
    other = [m["run"] for m in s["per_run"]
             if (c := audited.get(Path(m["run"]).name)) is not None
             and not same_calibration(m, c["temperature"], c["class_offsets"])]
    if other:
        return {"note": f"{short_list(other, 3)} measured under corruption with another calibration than audited "
                        "(`cifarlab calibrate` since, or --uncalibrated); measure again"}
    hardest = sorted(s["corruptions"], key=lambda c: c["accuracy"]["mean"])[:3]
    return {k: s[k] for k in ("source", "severities", "images_per_cell", "clean_accuracy", "mean_accuracy",
                              "relative_accuracy", "clean_ece", "mean_ece")} | {
        "corruptions": len(s["corruptions"]),
        "hardest": [{"corruption": c["name"], "accuracy": c["accuracy"]} for c in hardest]}


def _runs_duplicates(audits: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ``audit_summary`` quotes of ``cifarlab duplicates``: each run's accuracy without and
    with the test images it trained on a copy of, as spreads, where it was measured for every
    run audited, with the same settings (else a note); None otherwise."""
    found = [a.get("near_duplicates") for a in audits]
    if not all(found):
        return None
    # A run's own `duplicates` folder comes before its parent's, so runs can have been measured
    # at different thresholds: their figures would not be one spread.
    settings = [(d["method"]["threshold"], bool(d["method"].get("mirrored")), d["method"].get("shift"))
                for d in found]
    if len(set(settings)) > 1:
        each = "; ".join(f"{Path(a['run']).name}: >= {t}{', mirrored' if m else ''}, shifts up to {sh}"
                         for a, (t, m, sh) in zip(audits, settings))
        return {"note": f"its runs were measured with different settings ({each}); run `cifarlab duplicates` "
                        "on the folder of the runs to measure them alike"}
    runs = [d["run"] for d in found]
    out = {"threshold": found[0]["method"]["threshold"], "mirrored": bool(found[0]["method"].get("mirrored")),
           "test_images": found[0]["test_images"],
           "with_duplicate_images": [r["with_duplicate"]["images"] for r in runs],
           "accuracy": _spread([r["accuracy"] for r in runs]),
           "without_duplicate": _spread([r["without_duplicate"]["accuracy"] for r in runs]),
           "with_duplicate": _spread([r["with_duplicate"]["accuracy"] for r in runs]),
           "difference": _spread([r["difference"] for r in runs])}
    if out["mirrored"] and all("mirrored" in r["with_duplicate"] for r in runs):
        for key in ("mirrored", "unmirrored"):  # the copies whose best pair is mirrored, and the others
            out[f"with_duplicate_{key}"] = {"images": [r["with_duplicate"][key]["images"] for r in runs],
                                            "accuracy": _spread([r["with_duplicate"][key]["accuracy"] for r in runs])}
    return out


def _runs_ood(audits: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ``audit_summary`` quotes of ``cifarlab ood``: per set, the AUROC and the share
    accepted as spreads over the runs, where every run audited was measured against the same sets
    with the same score and threshold rule (else a note); None where none was."""
    found = [a.get("unfamiliar_images") for a in audits]
    if not any(found):
        return None
    if not all(found):
        missing = [Path(a["run"]).name for a, u in zip(audits, found) if not u]
        return {"note": f"{', '.join(missing)} not measured with {'its' if len(missing) == 1 else 'their'} current "
                        "weights, test-time augmentation and calibration; run `cifarlab ood` on the folder of the runs"}
    settings = {(u["score"], u["keep"], tuple(st["name"] for st in u["sets"])) for u in found}
    if len(settings) > 1:
        return {"note": "its runs were measured with different scores, thresholds or sets; run `cifarlab ood` on the "
                        "folder of the runs to measure them alike"}
    first = found[0]
    return {"score": first["score"], "keep": first["keep"], "fitted_on": first["fitted_on"],
            "sets": [{"name": st["name"], "images": st["images"],
                      "auroc": _spread([u["sets"][i]["auroc"] for u in found]),
                      "accepted_share": _spread([u["sets"][i]["accepted_share"] for u in found])}
                     for i, st in enumerate(first["sets"])]}


def _mirrored_split(mirrored: tuple[str, str], other: tuple[str, str] | None) -> str:
    """' (A on the N whose copy is mirrored, B on the other M)', from (accuracy, count) as text,
    for the card and the runs' summary alike; the second part left out where ``other`` is None.
    A model trained without flips may know a mirrored copy less well than a plain one."""
    rest = f", {other[0]} on the other {other[1]}" if other else ""
    return f" ({mirrored[0]} on the {mirrored[1]} whose copy is mirrored{rest})"


def _runs_mirrored_split(dup: dict[str, Any]) -> str:
    """:func:`_mirrored_split` of the runs' summary as spreads, where the mirrored pairs were
    scored apart and some run has one; else nothing."""
    m, u = dup.get("with_duplicate_mirrored"), dup.get("with_duplicate_unmirrored")
    if not m or not max(m["images"]):
        return ""
    return _mirrored_split((_fmt_spread(m["accuracy"]), _count_range(m["images"])),
                           (_fmt_spread(u["accuracy"]), _count_range(u["images"])))


def _spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean, std, min and max of the defined values (a class absent from the test data has no
    accuracy); None where no value is defined."""
    from .evaluate import describe

    defined = [v for v in values if v is not None and math.isfinite(v)]
    return describe(defined) if defined else None


def summarise_audits(audits: list[dict[str, Any]], runs: list[str]) -> dict[str, Any]:
    """The spread over several runs' audits (as :func:`audit_run` returns them, on the same test
    images and groups file): per class and per group, accuracy as mean/std/min/max and the number
    of runs in which it was flagged; per attribute, the largest gap's spread and the number of runs
    whose gap interval excluded zero; and which class was the worst in how many runs."""
    from collections import Counter

    n = len(audits)
    first = audits[0]
    classes = [r["class"] for r in first["classes"]["per_class"]]
    per_class = []
    for i, c in enumerate(classes):
        rows = [a["classes"]["per_class"][i] for a in audits]
        per_class.append({"class": c, "support": rows[0]["support"], "accuracy": _spread([r["accuracy"] for r in rows]),
                          "flagged_in": sum(r["flagged"] for r in rows)})
        if all("train_images" in r for r in rows):  # each run's (its seed splits off the validation images)
            per_class[-1]["train_images"] = [r["train_images"] for r in rows]
        if all(a["classes"].get("confidence") for a in audits):  # audits written before it have none
            over = [a["classes"]["confidence"][i]["overconfidence"] for a in audits]
            per_class[-1]["overconfidence"] = _spread(over)
            per_class[-1]["overconfident_in"] = sum(v is not None and v > 0 for v in over)
    spreads = [a["classes"]["spread"] for a in audits]
    summary: dict[str, Any] = {
        "runs": n, "data": first["data"], "tta": sorted({a["tta"] for a in audits}), "margin": first["margin"],
        "bootstrap_resamples": first["bootstrap_resamples"],
        "overall_accuracy": _spread([a["overall_accuracy"] for a in audits]),
        "calibration": {**{k: _spread([a.get("calibration", {}).get(k) for a in audits])
                           for k in ("ece", "temperature", "uncalibrated_ece")},
                        "balanced_classes_in": sum(bool(a.get("calibration", {}).get("balanced_classes"))
                                                   for a in audits)},
        "classes": {"per_class": per_class,
                    "spread": {"difference": _spread([s["difference"] for s in spreads]),
                               "worst": dict(Counter(s["worst"] for s in spreads).most_common()),
                               "best": dict(Counter(s["best"] for s in spreads).most_common()),
                               "interval_excludes_zero_in": sum(s["difference_ci"][0] > 0 for s in spreads)}},
        "per_run": [{"run": r, "overall_accuracy": a["overall_accuracy"], "warnings": len(a["warnings"])}
                    for r, a in zip(runs, audits)],
        "warnings": [],
    }
    for r in per_class:
        if r["flagged_in"]:
            summary["warnings"].append(f"class '{r['class']}' was more than {first['margin']:.2f} below the overall "
                                       f"accuracy in {r['flagged_in']} of {n} runs")
    sets = [a.get("prediction_sets") for a in audits]
    if all(sets):  # every run with prediction sets: their coverage, and each class short of it in how many runs
        short = Counter(c for ps in sets for c in ps["short_of_coverage"])
        summary["prediction_sets"] = {"coverage_target": sorted({ps["coverage_target"] for ps in sets}),
                                      "by_class_in": sum(ps["by_class"] for ps in sets),
                                      "coverage": _spread([ps["coverage"] for ps in sets]),
                                      "mean_size": _spread([ps["mean_size"] for ps in sets]),
                                      "short_of_coverage_in": dict(short.most_common())}
        summary["warnings"] += [f"class '{c}': its prediction sets held the true class less often than chance allows "
                                f"in {k} of {n} runs" for c, k in short.most_common()]
    if "attributes" in first:
        summary["groups_file"] = first["groups_file"]
        summary["attributes"] = {}
        for name, gm in first["attributes"].items():
            per_run = [a["attributes"][name] for a in audits]
            groups = []
            for j, g in enumerate(gm["groups"]):
                rows = [p["groups"][j] for p in per_run]
                groups.append({"group": g["group"], "n": g["n"], "too_small": g["too_small"],
                               "accuracy": _spread([x["accuracy"] for x in rows]),
                               "flagged_in": sum(x["flagged"] for x in rows)})
                if all("overconfidence" in x for x in rows):  # audits written before it have none
                    groups[-1]["overconfidence"] = _spread([x["overconfidence"] for x in rows])
                if all("unfamiliar_share" in x for x in rows):  # every run measured by `cifarlab ood`
                    groups[-1]["unfamiliar_share"] = _spread([x["unfamiliar_share"] for x in rows])
                if all("set_coverage" in x for x in rows):  # every run with prediction sets
                    groups[-1]["set_coverage"] = _spread([x["set_coverage"] for x in rows])
                    groups[-1]["set_mean_size"] = _spread([x["set_mean_size"] for x in rows])
                    groups[-1]["short_of_coverage_in"] = sum(below_range(x["set_coverage"], x["set_coverage_expected"])
                                                             for x in rows)
                if groups[-1]["flagged_in"] and not g["too_small"]:
                    summary["warnings"].append(f"{name}={g['group']}: more than {first['margin']:.2f} below the "
                                               f"overall accuracy in {groups[-1]['flagged_in']} of {n} runs")
            gaps = [p["gap"] for p in per_run if p["gap"] is not None]
            gap = None
            if gaps:
                gap = _gap_spread(gaps, "highest", "lowest")
                if gap["interval_excludes_zero_in"]:
                    summary["warnings"].append(f"{name}: the largest gap's interval excluded zero in "
                                               f"{gap['interval_excludes_zero_in']} of {n} runs")
            summary["attributes"][name] = {"groups": groups, "gap": gap, "not_recorded": gm.get("not_recorded", 0)}
            cgaps = [p.get("confidence_gap") for p in per_run]
            if all(cgaps):
                cg = summary["attributes"][name]["confidence_gap"] = _gap_spread(cgaps, "most", "least")
                # as each run warns: beyond chance and by more than the margin
                cg["warned_in"] = sum(x["ci_excludes_zero"] and x["difference"] > first["margin"] for x in cgaps)
                if cg["warned_in"]:
                    summary["warnings"].append(f"{name}: confidence exceeded accuracy by more on one group than on "
                                               f"another, beyond chance and by more than {first['margin']:.2f}, in "
                                               f"{cg['warned_in']} of {n} runs")
            ugaps = [p.get("unfamiliar_gap") for p in per_run]
            if all(ugaps):
                ug = summary["attributes"][name]["unfamiliar_gap"] = _gap_spread(ugaps, "most", "least")
                if ug["interval_excludes_zero_in"]:
                    summary["warnings"].append(f"{name}: the gap between the groups `cifarlab ood`'s threshold flags "
                                               f"most and least as unfamiliar excluded zero in "
                                               f"{ug['interval_excludes_zero_in']} of {n} runs")
    return summary


def _gap_spread(gaps: list[dict[str, Any]], high: str, low: str) -> dict[str, Any]:
    """The spread over runs of one attribute's largest gap (each run's, with its groups under
    ``high`` and ``low``): the difference's spread, how often each group was at either end, and
    in how many runs the gap's interval excluded zero."""
    from collections import Counter

    return {"difference": _spread([x["difference"] for x in gaps]),
            high: dict(Counter(x[high] for x in gaps).most_common()),
            low: dict(Counter(x[low] for x in gaps).most_common()),
            "interval_excludes_zero_in": sum(x["ci_excludes_zero"] for x in gaps)}


def _fmt_spread(d: dict[str, float] | None, signed: bool = False) -> str:
    """'mean (min to max)' of a spread, or n/a; ``signed`` gives each figure its sign."""
    f = "+.3f" if signed else ".3f"
    return "n/a" if d is None else f"{d['mean']:{f}} ({d['min']:{f}} to {d['max']:{f}})"


def _count_range(counts: list[int]) -> str:
    """'n', or 'min to max' where the runs' counts differ."""
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def _table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header line and the rule under it."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _with_train_images(rows: list[dict]) -> list[str]:
    """The extra column of a per-class table whose rows all give their training images (runs
    that recorded them), else none."""
    return ["training images"] if rows and all("train_images" in r for r in rows) else []


def _audit_runs_markdown(s: dict) -> str:
    n = s["runs"]
    trained = _with_train_images(s["classes"]["per_class"])
    lines = [f"# Audit of {n} runs", "", f"Data: `{s['data']}`; test-time augmentation: {', '.join(s['tta'])}. "
             f"Overall accuracy {_fmt_spread(s['overall_accuracy'])}, as mean (min to max) over the runs. Each "
             f"run's own audit, with its intervals and model card, is listed at the end.", "",
             "![per-class accuracy over the runs](per_class_accuracy.png)", "",
             *_table_head(["class", "n", "accuracy, mean", "std", "min", "max", "flagged in", *trained])]
    for r in s["classes"]["per_class"]:
        a = r["accuracy"]
        cells = " | ".join(_fmt(a[k]) for k in ("mean", "std", "min", "max")) if a else "n/a | n/a | n/a | n/a"
        lines.append(f"| {md_cell(r['class'])} | {r['support']} | {cells} | {r['flagged_in']} of {n} |"
                     + (f" {_count_range(r['train_images'])} |" if trained else ""))
    sp = s["classes"]["spread"]
    lines += ["", f"Best-to-worst class gap: {_fmt_spread(sp['difference'])}; its interval excluded zero in "
              f"{sp['interval_excludes_zero_in']} of {n} runs. Best class: "
              + ", ".join(f"{md_cell(c)} in {k} of {n}" for c, k in sp["best"].items()) + "; worst: "
              + ", ".join(f"{md_cell(c)} in {k} of {n}" for c, k in sp["worst"].items()) + ".", ""]
    lines += _runs_confidence_lines(s)
    ps = s.get("prediction_sets")
    if ps:
        short = ", ".join(f"{md_cell(c)} in {k} of {n}" for c, k in ps["short_of_coverage_in"].items())
        lines += ["## Prediction sets", "", f"Fitted (`cifarlab calibrate --sets`) for coverage "
                  f"{', '.join(f'{c:g}' for c in ps['coverage_target'])}, by class in {ps['by_class_in']} of {n} runs; "
                  f"on the test images they held the true class for {_fmt_spread(ps['coverage'])} of them, with "
                  f"{_fmt_spread(ps['mean_size'])} classes on average. Classes covered less often than chance "
                  f"allows: {short or 'none'}.", ""]
    lines += _quoted("Under common corruptions", s.get("robustness"), _runs_robustness_sentence)
    lines += _quoted("Near-duplicates", s.get("near_duplicates"), _runs_duplicates_sentence)
    lines += _quoted("Unfamiliar images", s.get("unfamiliar_images"), _runs_ood_sentence)
    for name, gm in s.get("attributes", {}).items():
        unfamiliar = all("unfamiliar_share" in g for g in gm["groups"])
        confident = all("overconfidence" in g for g in gm["groups"])
        covered = all("set_coverage" in g for g in gm["groups"])
        lines += [f"## Groups by `{name}`", "", *_table_head(
            ["group", "n", "accuracy, mean (min to max)", "flagged in",
             *(["confidence - accuracy, mean (min to max)"] if confident else []),
             *(["flagged unfamiliar"] if unfamiliar else []),
             *(["set coverage", "mean set size", "below chance range in"] if covered else [])])]
        for g in gm["groups"]:
            flagged = "too small to judge" if g["too_small"] else f"{g['flagged_in']} of {n}"
            lines.append(f"| {md_cell(g['group'])} | {g['n']} | {_fmt_spread(g['accuracy'])} | {flagged} |"
                         + (f" {_fmt_spread(g['overconfidence'], signed=True)} |" if confident else "")
                         + (f" {_fmt_spread(g['unfamiliar_share'])} |" if unfamiliar else "")
                         + (f" {_fmt_spread(g['set_coverage'])} | {_fmt_spread(g['set_mean_size'])} | "
                            f"{g['short_of_coverage_in']} of {n} |" if covered else ""))
        ga = gm["gap"]
        lines += ["", "Only one group: no gap to measure." if ga is None else
                  _runs_gap_sentence("Largest gap:", ga, n, ("highest", "Highest group"), ("lowest", "lowest")), ""]
        if cg := gm.get("confidence_gap"):
            lines += [_runs_gap_sentence("Confidence minus accuracy: largest gap", cg, n,
                                         ("most", "Most overconfident"), ("least", "least")), ""]
        if ug := gm.get("unfamiliar_gap"):
            lines += [_runs_gap_sentence("Flagged as unfamiliar (`cifarlab ood`'s threshold): largest gap", ug, n,
                                         ("most", "Flagged most"), ("least", "least")), ""]
    if "ensemble" in s:  # audit_runs adds it; summarise_audits alone does not
        lines += _ensemble_lines(s["ensemble"], n, s["bootstrap_resamples"])
    if s["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    lines += ["## Each run", ""] + [f"- `{r['run']}`: overall accuracy {r['overall_accuracy']:.4f}, "
                                    f"{r['warnings']} warning(s)" + (f"; [its audit]({r['report']})" if r.get("report") else "")
                                    for r in s["per_run"]] + [""]
    return "\n".join(lines)


def _runs_gap_sentence(head: str, gap: dict, n: int, high: tuple[str, str], low: tuple[str, str]) -> str:
    """audit_summary.md's sentence on one gap over the runs (:func:`_gap_spread`): its spread,
    in how many runs its interval excluded zero, and how often each group was at either end
    (``high`` and ``low``: the key and the words for each)."""
    def ends(key: str) -> str:
        return ", ".join(f"{md_cell(g)} in {k} of {n}" for g, k in gap[key].items())

    return (f"{head} {_fmt_spread(gap['difference'])}; its interval excluded zero in "
            f"{gap['interval_excludes_zero_in']} of {n} runs. {high[1]}: {ends(high[0])}; {low[1]}: {ends(low[0])}.")


def _quoted(head: str, section: dict | None, sentence: Callable[[dict], str]) -> list[str]:
    """audit_summary.md's paragraph on what another command measured of the runs: its
    ``sentence``, the reason it is not quoted (``head``: not quoted; ...), or nothing."""
    if not section:
        return []
    return [f"{head}: not quoted; {section['note']}." if "note" in section else sentence(section), ""]


def _runs_robustness_sentence(rob: dict) -> str:
    return (f"Under common corruptions (`cifarlab robustness`: {rob['corruptions']} corruptions at severities "
            f"{', '.join(map(str, rob['severities']))}, {rob['images_per_cell']:,} images each, the same for every "
            f"run): accuracy {_fmt_spread(rob['mean_accuracy'])} against {_fmt_spread(rob['clean_accuracy'])} clean; "
            f"expected calibration error {_fmt_spread(rob['mean_ece'])} against {_fmt_spread(rob['clean_ece'])}; "
            "hardest: " + ", ".join(f"{c['corruption']} {_fmt_spread(c['accuracy'])}" for c in rob["hardest"]) + ".")


def _runs_duplicates_sentence(dup: dict) -> str:
    return (f"{_duplicates_head(dup['threshold'], dup.get('mirrored'))}: "
            f"{_count_range(dup['with_duplicate_images'])} of the {dup['test_images']:,} test images have a "
            f"near-copy among the images a run trained on. Accuracy without them "
            f"{_fmt_spread(dup['without_duplicate'])}, on them {_fmt_spread(dup['with_duplicate'])}"
            + _runs_mirrored_split(dup) + f", against {_fmt_spread(dup['accuracy'])} on all.")


def _runs_ood_sentence(ood: dict) -> str:
    return (f"Unfamiliar images (`cifarlab ood`, {ood['score']} score, each run's threshold keeping "
            f"{ood['keep']:.0%} of its {ood['fitted_on']} images): "
            + "; ".join(f"{md_cell(st['name'])} ({st['images']:,} images): AUROC {_fmt_spread(st['auroc'])}, "
                        f"accepted {_fmt_spread(st['accepted_share'])}" for st in ood["sets"]) + ".")


def _runs_confidence_lines(s: dict) -> list[str]:
    """audit_summary.md's calibration over the runs: the ECE, and by predicted class how far the
    mean confidence lay above the precision (as :func:`class_confidence`)."""
    cal, rows = s.get("calibration") or {}, s["classes"]["per_class"]
    lines = []
    if cal.get("ece"):
        lines += [f"Expected calibration error {_fmt_spread(cal['ece'])}"
                  + (f" with the runs' temperatures from `cifarlab calibrate` (T {_fmt_spread(cal['temperature'])}); "
                     f"{_fmt_spread(cal['uncalibrated_ece'])} without them" if cal.get("uncalibrated_ece") else "")
                  + ".", ""]
        if cal.get("balanced_classes_in"):
            lines[-2:-1] = [lines[-2] + f" In {cal['balanced_classes_in']} of {s['runs']} runs the probabilities were "
                            "also corrected for the training classes' unequal sizes (`cifarlab calibrate "
                            "--balance-classes`), which changes their predictions."]
    if rows and all("overconfidence" in r for r in rows):
        n = s["runs"]
        lines += ["## Confidence by predicted class", "",
                  "Of the test images each run gave a class, its mean confidence minus the share that truly were "
                  "that class (the precision): above zero, overconfidence when it names that class.", "",
                  *_table_head(["predicted class", "confidence - precision, mean (min to max)", "overconfident in"])]
        for r in rows:
            lines.append(f"| {md_cell(r['class'])} | {_fmt_spread(r['overconfidence'], signed=True)} | "
                         f"{r['overconfident_in']} of {n} |")
        lines.append("")
    return lines


def _plot_class_accuracy(rows: list[dict], overall: float, path: Path) -> None:
    from .plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
    acc = np.array([r["accuracy"] for r in rows])
    lo = acc - np.array([r["accuracy_ci"][0] for r in rows])
    hi = np.array([r["accuracy_ci"][1] for r in rows]) - acc
    ax.bar(range(len(rows)), acc, yerr=[lo, hi], capsize=3,
           color=["tab:red" if r.get("flagged") else "tab:blue" for r in rows])
    ax.axhline(overall, color="k", ls="--", label=f"overall {overall:.3f}")
    ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=45, ha="right")
    ax.set(ylabel="accuracy (95% bootstrap CI)", ylim=(0, 1), title="Per-class accuracy")
    ax.legend()
    _save(fig, path)


def _plot_runs_class_accuracy(s: dict, path: Path) -> None:
    """Each class's mean accuracy over the runs, its bar spanning min to max; red where the class
    was flagged in every run, orange where in some."""
    from .plots import _plt, _save

    rows, n = s["classes"]["per_class"], s["runs"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2) + 2.5, 4))
    nan = {"mean": math.nan, "min": math.nan, "max": math.nan}
    acc = [r["accuracy"] or nan for r in rows]
    mean = np.array([a["mean"] for a in acc])
    ax.bar(range(len(rows)), mean, yerr=[mean - [a["min"] for a in acc], np.array([a["max"] for a in acc]) - mean],
           capsize=3, color=["tab:red" if r["flagged_in"] == n else "tab:orange" if r["flagged_in"] else "tab:blue"
                             for r in rows])
    overall = s["overall_accuracy"]["mean"]
    ax.axhline(overall, color="k", ls="--", label=f"overall, mean {overall:.3f}")
    from matplotlib.patches import Patch

    ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=45, ha="right")
    ax.set(ylabel=f"accuracy, mean (min to max of {n} runs)", ylim=(0, 1), title="Per-class accuracy over the runs")
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], Patch(color="tab:red", label="flagged in every run"),
                       Patch(color="tab:orange", label="flagged in some runs")], fontsize="small",
              loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, which can reach 1
    _save(fig, path)


def _fmt(x: float | None) -> str:
    """A figure to 3 decimals, or "n/a" where it is undefined (None or NaN, as read back from JSON)."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def interval_method(resamples: int) -> str:
    """How the audit's 95% intervals are made, in one phrase for its reports."""
    return (f"95%; of an accuracy, exact binomial (Clopper-Pearson); of a gap between two accuracies, Newcombe's "
            f"hybrid score interval; of a precision or ratio, percentile bootstrap, {resamples} resamples")


def _fmt_ci(ci: list[float | None]) -> str:
    return "n/a" if any(x is None or not math.isfinite(x) for x in ci) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _audit_markdown(a: dict) -> str:
    trained = _with_train_images(a["classes"]["per_class"])  # where the run recorded them
    lines = [f"# Audit of `{a['run']}`", "", f"Data: `{a['data']}`. Overall accuracy **{a['overall_accuracy']:.4f}** "
             f"(test-time augmentation: {a['tta']}). Intervals: {interval_method(a['bootstrap_resamples'])}.", "",
             "![per-class accuracy](per_class_accuracy.png)", "", *_class_lines(a["classes"], trained)]
    lines += _confidence_lines(a["classes"].get("confidence"))
    lines += _sets_lines(a.get("prediction_sets"))
    for name, gm in a.get("attributes", {}).items():
        lines += _group_lines(f"## Groups by `{name}`", gm)
    lines += ["## Other evaluation plots", "", "![confusion matrix](confusion_matrix.png)", "",
              "![reliability diagram](reliability.png)", "", "![most confident errors](confident_errors.png)", ""]
    if a["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in a["warnings"]] + [""]
    return "\n".join(lines)


def _class_lines(cls: dict[str, Any], trained: list[str]) -> list[str]:
    """The table of :func:`class_metrics`' classes (with their training images where ``trained``
    names the column), and the spread between the best and the worst."""
    lines = _table_head(["class", "n", "accuracy", "95% CI", "precision", "95% CI", "flagged", *trained])
    for r in cls["per_class"]:
        lines.append(f"| {md_cell(r['class'])} | {r['support']} | {r['accuracy']:.3f} | {_fmt_ci(r['accuracy_ci'])} | "
                     f"{_fmt(r['precision'])} | {_fmt_ci(r['precision_ci'])} | {'yes' if r['flagged'] else ''} |"
                     + (f" {r['train_images']:,} |" if trained else ""))
    sp = cls["spread"]
    return lines + ["", f"Spread: best class **{sp['best']}**, worst **{sp['worst']}**; difference "
                    f"{sp['difference']:.3f} {_fmt_ci(sp['difference_ci'])}, ratio {_fmt(sp['ratio'])} "
                    f"{_fmt_ci(sp['ratio_ci'])}.", ""]


def _group_lines(heading: str, gm: dict[str, Any]) -> list[str]:
    """One attribute's groups (:func:`_group_audit`) under ``heading``: their table, and the
    largest gap."""
    unfamiliar = ["flagged unfamiliar"] if "unfamiliar_score" in gm else []
    confident = ["mean confidence", "confidence - accuracy"] if "confidence_gap" in gm else []  # older audits: none
    covered = ["set coverage", "chance range", "mean set size"] if "set_coverage_target" in gm else []
    lines = [heading, "", *_table_head(["group", "n", "accuracy", "95% CI", "macro recall", "macro precision",
                                        *confident, *unfamiliar, *covered, "note"])]
    for g in gm["groups"]:
        note = "too small to judge" if g["too_small"] else ("flagged" if g["flagged"] else "")
        lines.append(f"| {md_cell(g['group'])} | {g['n']} | {g['accuracy']:.3f} | {_fmt_ci(g['accuracy_ci'])} | "
                     f"{_fmt(g['macro_recall'])} | {_fmt(g['macro_precision'])} | "
                     + (f"{g['mean_confidence']:.3f} | {g['overconfidence']:+.3f} | " if confident else "")
                     + (f"{g['unfamiliar_share']:.1%} | " if unfamiliar else "")
                     + (f"{g['set_coverage']:.3f} | {_fmt_ci(g['set_coverage_expected'])} | "
                        f"{g['set_mean_size']:.2f} | " if covered else "")
                     + f"{note} |")
    if gm.get("not_recorded"):
        lines += ["", f"Not recorded for {images_phrase(gm['not_recorded'])} (empty cells), left out of these groups."]
    ga = gm["gap"]
    lines += ["", "Only one group: no gap to measure." if ga is None else
              f"Largest gap: {ga['highest']} vs {ga['lowest']}: {ga['difference']:.3f} {_fmt_ci(ga['difference_ci'])}"
              + _zero_verdict(ga), ""]
    cg = gm.get("confidence_gap")
    if cg:
        lines += [f"Confidence minus accuracy (above zero: overconfident): highest on {md_cell(cg['most'])}, lowest "
                  f"on {md_cell(cg['least'])}; difference {cg['difference']:.3f} {_fmt_ci(cg['difference_ci'])}"
                  + _zero_verdict(cg), ""]
    sg = gm.get("set_coverage_gap")
    if sg:
        lines += [f"Prediction sets (fitted for coverage {gm['set_coverage_target']:g}) held the true class most "
                  f"often for {md_cell(sg['most'])}, least for {md_cell(sg['least'])}; difference "
                  f"{sg['difference']:.3f} {_fmt_ci(sg['difference_ci'])}"
                  + _zero_verdict(sg), ""]
    return lines + _unfamiliar_gap_lines(gm)


def _zero_verdict(gap: dict[str, Any]) -> str:
    """audit.md's closing words on a gap: whether its interval excludes zero."""
    return " - the interval excludes zero." if gap["ci_excludes_zero"] else " - the interval includes zero."


def _sets_lines(sets: dict[str, Any] | None, heading: str = "## Prediction sets") -> list[str]:
    """audit.md's section on the prediction sets of ``cifarlab calibrate --sets``
    (:func:`cifarlab.evaluate.sets_report`): their coverage and size, overall and by class."""
    if not sets:
        return []
    lo, hi = sets["coverage_ci"]
    per = "each class's images" if sets["by_class"] else "images on average"
    lines = [heading, "", f"Fitted (`cifarlab calibrate --sets`) to hold the true class for "
             f"{sets['coverage_target']:g} of {per}; on the test images they held it for **{sets['coverage']:.3f}** "
             f"[{lo:.3f}, {hi:.3f}], with {sets['mean_size']:.2f} classes on average ({sets['singletons']:.1%} of "
             f"the sets one class, {sets['empty']:.1%} empty).", "",
             *_table_head(["class", "n", "coverage", "95% CI", "chance range", "mean set size"])]
    for c in sets["per_class"]:
        lines.append(f"| {md_cell(c['class'])} | {c['images']} | {_fmt(c['coverage'])} | "
                     f"{_fmt_ci(c['coverage_ci'] or [None, None])} | {_fmt_ci(c['expected_range'] or [None, None])} | "
                     f"{_fmt(c['mean_size'])} |")
    short = sets["short_of_coverage"]
    return lines + ["", "The chance range: the coverage that 95% of fits on as many validation images would give "
                    "as many test images drawn as those were (a beta-binomial law; Vovk, 2012).",
                    "", (f"Covered less often than chance allows: {', '.join(map(md_cell, short))}."
                         if short else "No class was covered less often than chance allows."), ""]


def _ensemble_lines(e: dict[str, Any], n: int, n_boot: int) -> list[str]:
    """audit_summary.md's section on the runs' ensemble (:func:`_ensemble_audit`)."""
    lines = ["## Their ensemble", "", f"The {n} runs as one model: the mean of their probabilities, which `cifarlab "
             f"predict` serves when given their folder. Overall accuracy **{e['overall_accuracy']:.4f}**. Intervals: "
             f"{interval_method(n_boot)}.", "", *_class_lines(e["classes"], [])]
    u = e.get("unfamiliar_images")
    if u:
        lines += [f"Unfamiliar images (`cifarlab ood`, {u['score']} score: {u['scored']}; its threshold keeps "
                  f"{u['keep']:.0%} of {u['threshold_images']:,} {u['fitted_on']} images and flags "
                  f"{u['flagged_share']:.1%} of the test images): "
                  + "; ".join(f"{md_cell(st['name'])} ({st['images']:,} images): AUROC {st['auroc']:.3f}, accepted "
                              f"{st['accepted_share']:.1%}" for st in u["sets"]) + "."
                  + _flagged_own_sentence(u, overall=False), ""]
    lines += _int8_lines(e.get("int8"))
    lines += _sets_lines(e.get("prediction_sets"), "### The ensemble's prediction sets")
    for name, gm in e.get("attributes", {}).items():
        lines += _group_lines(f"### The ensemble's groups by `{name}`", gm)
    if e["warnings"]:
        lines += ["The ensemble's warnings:", ""] + [f"- {w}" for w in e["warnings"]] + [""]
    return lines


def _confidence_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """audit.md's table of :func:`class_confidence`, and the class the model is most
    overconfident in (audits written before it have no rows)."""
    if not rows:
        return []
    lines = ["## Confidence by predicted class", "",
             "Of the test images the model gave each class: its mean confidence, and the share that truly were that "
             "class (the precision). Confidence above the precision is overconfidence when the model names that class.",
             "", *_table_head(["predicted class", "images", "mean confidence", "precision", "confidence - precision"])]
    for r in rows:
        gap = r["overconfidence"]
        lines.append(f"| {md_cell(r['class'])} | {r['predicted']} | {_fmt(r['mean_confidence'])} | "
                     f"{_fmt(r['precision'])} | {'n/a' if gap is None else f'{gap:+.3f}'} |")
    said = [r for r in rows if r["overconfidence"] is not None]
    if said:
        worst = max(said, key=lambda r: r["overconfidence"])
        lines += ["", f"Most overconfident when it names **{worst['class']}**: {worst['overconfidence']:+.3f}."
                  if worst["overconfidence"] > 0 else "The model is not overconfident in any class it names."]
    return lines + [""]


def build_model_card(run: Path, pred, ds: Dataset, report: dict, audit: dict, suffix: str | None = None,
                     facts: dict[str, dict[str, str]] | None = None, sheet: dict | None = None) -> dict[str, Any]:
    """The model card's content (Mitchell et al., 2019) as a dict; unknown facts are marked
    TO_FILL, unless ``facts`` (:func:`cifarlab.about.read_about`) answers them; the warnings of
    ``sheet``, the training data's datasheet, are quoted with it. It quotes
    ``cifarlab robustness``'s report on the data audited, in ``RUN/robustness<suffix>``
    (:func:`cifarlab.export.data_suffix`, worked out where None)."""
    m = read_json(run / "metrics.json", absent={})
    cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    import yaml

    cfg = yaml.safe_load(cfg_text) if cfg_text else {}
    imported = read_json(run / "keras_import.json", absent=None)  # written by `cifarlab import`: trained elsewhere
    suffix = data_suffix(ds, [run]) if suffix is None else suffix
    robustness = _robustness_summary(run, pred, f"robustness{suffix}")
    start = read_json(run / "init_from.json", absent=None)  # written by `cifarlab train --init-from`: a fine-tune
    own = seen.trained_on(ds, [run])  # None for a run that keeps no record of its training images
    from .data.cifar import CIFAR10_CLASSES

    # CIFAR-10, CIFAR-100 and their new test sets share their provenance (80 Million Tiny Images)
    cifar10_classes = pred.classes == CIFAR10_CLASSES
    is_cifar10 = ds.kind.startswith("cifar10") or (ds.kind in ("image-folder", "arrays") and cifar10_classes)
    people = people_classes(pred.classes)
    given, told = (facts or {}).get("model", {}), (facts or {}).get("data", {})  # the owner's answers win
    training_data = {
        "source": m.get("data", {}).get("source", TO_FILL),
        # a labels file (train --labels) gave the classes, not folder names
        "labels_file": (cfg.get("data") or {}).get("labels"),
        "size": {k: m.get("data", {}).get(k) for k in ("train_images", "val_images")},
        "classes": pred.classes,
        # runs trained before these were recorded have neither
        "per_class": m.get("data", {}).get("train_per_class"), "class_weight": m.get("class_weight"),
        "sampling": m.get("sampling"), "logit_adjustment": m.get("logit_adjustment"),
        "licence": told.get("licence") or (
            "CIFAR-10/100 carry no explicit licence; the images were collected from the web (80 Million Tiny "
            "Images) without the consent of the people photographed or the photographers" if is_cifar10 else TO_FILL),
        "consent": told.get("consent") or ("not obtained: web-scraped images" if is_cifar10 else TO_FILL),
        "label_caveats": told.get("label_caveats") or (
            f"{'CIFAR-10' if cifar10_classes else 'CIFAR'} labels were assigned by paid student labellers to 32x32 "
            "thumbnails; classes are defined by the labelling instructions"
            + (" (e.g. 'automobile' excludes pickup trucks, 'truck' excludes pickups)" if cifar10_classes else "")
            + ", a small share of test labels are known to be wrong or ambiguous, and the data's parent collection "
            "was withdrawn in 2020 over offensive content" if is_cifar10 else TO_FILL),
        "datasheet": sheet and {"data": sheet["data"], "warnings": sheet["warnings"]},
        # the data the starting weights learnt from shaped this model too, with its own caveats
        "started_from": start and {k: start.get(k) for k in ("run", "model", "data", "classes", "fresh")} | {
            k: start[k] for k in ("seen_validation_images", "seen_test_images") if k in start},  # absent: older runs
        # a teacher's predictions (train --teacher) taught this model, with its data's caveats and its errors
        "distilled_from": m.get("teacher"),
    }
    return {
        "model_details": {
            "name": run.name, "architecture": pred.arch["model"], "parameters": pred.arch.get("num_params"),
            "recipe": cfg.get("recipe"), "optimizer": cfg.get("optim"), "epochs": cfg.get("train", {}).get("epochs"),
            "early_stopping": m.get("early_stopping"),
            "training_time_s": m.get("train_time_s"), "trained_on": m.get("device"), "versions": m.get("versions"),
            "date": date.today().isoformat(),
            **{k: given.get(k, TO_FILL) for k in ("developers", "licence", "contact")},
            "imported_from": imported and {k: imported.get(k) for k in ("source", "sha256", "layout", "keras_version")},
        },
        "intended_use": {
            "primary_uses": f"Classifying small ({pred.input_shape[2]}x{pred.input_shape[1]}) photos into the data "
                            f"set's {len(pred.classes)} classes ({short_list(pred.classes)}) for research, teaching and benchmarking.",
            "primary_users": given.get("primary_users", "Students, researchers and engineers studying image "
                                                        "classification."),
            "out_of_scope": list(OUT_OF_SCOPE),
        },
        "factors": {"relevant_factors": given.get("relevant_factors", TO_FILL + " (e.g. photo source, lighting, "
                                                                             "region, camera)"),
                    "evaluated_groups": list(audit.get("attributes", {}))},
        "training_data": training_data,
        "evaluation_data": {"source": ds.source, "size": int(len(ds.y_test)), "note": _evaluation_note(own, ds)},
        "metrics": {
            "overall": {"accuracy": report["accuracy"], "loss": report["loss"], "top_k": report["top_k"],
                        "ece": report["calibration"]["ece"], "test_time_augmentation": report["tta"],
                        # a temperature fitted by `cifarlab calibrate` changes the loss and ECE, not the accuracy;
                        # class offsets (--balance-classes) change the predictions too
                        "temperature": report.get("temperature"), "class_offsets": report.get("class_offsets"),
                        "uncalibrated": report.get("uncalibrated"),
                        "selective": report.get("selective"), "prediction_sets": report.get("prediction_sets")},
            "per_class": audit["classes"]["per_class"], "class_spread": audit["classes"]["spread"],
            "groups": audit.get("attributes", {}), "interval_method": interval_method(audit["bootstrap_resamples"]),
            "robustness": robustness,
            "int8": _int8_summary(run, pred),
            "near_duplicates": audit.get("near_duplicates"),
            "label_issues": audit.get("label_issues"),
            "unfamiliar_images": audit.get("unfamiliar_images"),
        },
        "ethical_considerations": [
            "An inaccurate or unevenly accurate classifier harms the people who depend on its output; the per-class "
            "and per-group figures above show where this model is weaker.",
            f"Consent of the people pictured in the training images, as the data's owner states it: {told['consent']}"
            if "consent" in told else
            "The training images were collected without consent; do not extend such data with images of people."
            if is_cifar10 else f"Whether the people pictured in the training images consented: {TO_FILL} "
                               "(`cifarlab datasheet` lists the questions to answer of the data).",
            "Uses for surveillance or face recognition are out of scope and should be refused.",
        ] + ([_sentence(people_warning(people))] if people else []),
        "caveats": [
            ("Accuracy is measured on data from the same collection as the training data; expect lower accuracy on "
             "other photos" if own is not False else
             f"Accuracy is measured on `{ds.source}`, not on the training data; expect other figures on photos unlike "
             "both") + ("." if robustness else ", and on noisy, blurred or compressed ones (`cifarlab robustness` "
                                               "measures how much lower)."),
            "Group results are only as good as the groups file; small groups get wide intervals.",
        ] + audit["warnings"],
    }


def _datasheet_lines(td: dict[str, Any]) -> list[str]:
    """The model card's line on the training data's datasheet: its warnings, where the audit was
    given it, else the command that makes it."""
    sheet = td.get("datasheet")
    if sheet:
        said = [f"  - {w}" for w in sheet["warnings"]] or ["  - none"]
        return [f"- Datasheet (`cifarlab datasheet` of `{sheet['data']}`), its warnings:", *said]
    if td["source"] == TO_FILL:
        return [f"- Datasheet: {TO_FILL}"]
    return [f"- Datasheet: `cifarlab datasheet --data {shlex.quote(td['source'])}` measures its class sizes, exact "
            "copies and colour cues by class, and lists the questions of collection and consent (DATASHEET.md); "
            "`cifarlab audit --datasheet FOLDER` quotes its warnings here"]


def _sentence(warning: str) -> str:
    """A warning (written to follow 'warning: ') as a sentence of its own."""
    return f"{warning[0].upper()}{warning[1:]}."


def _evaluation_note(own: bool | None, ds) -> str:
    """What the card says of its test images: the training data's own test split, or other data."""
    if own is not False:
        return "the test split of the same collection as the training data; it shares its biases"
    if ds.test_origin == "unseen":  # seen.test_split_for took every image the model had not seen
        return ("not the data the model was trained on: every one of its images but any with the pixels of an "
                "image the model trained or validated on")
    return "the test images of other data than the model was trained on"


def _robustness_summary(run: Path, pred, name: str) -> dict[str, Any] | None:
    """What the card quotes of ``cifarlab robustness``'s report (in ``RUN/name``: on the data
    audited) for the predictor audited (its weights, test-time augmentation and calibration), if
    there is one."""
    from .robustness import read_robustness

    r = read_robustness(run, pred.tta, pred.temperature(), pred.class_offsets(), name)
    if r is None:
        return None
    hardest = sorted(r["corruptions"], key=lambda c: c["accuracy"])[:3]
    drops = sorted((c for c in r["per_class"] if c.get("drop") is not None), key=lambda c: -c["drop"])[:3]
    return {"source": r["source"], "corruptions": [c["name"] for c in r["corruptions"]], "severities": r["severities"],
            "images_per_cell": r["images_per_cell"], "clean_accuracy": r["clean"]["accuracy"],
            "mean_accuracy": r["mean_accuracy"], "relative_accuracy": r["relative_accuracy"],
            "clean_ece": r["clean"]["ece"], "mean_ece": r["mean_ece"],
            "hardest": [{"corruption": c["name"], "accuracy": c["accuracy"]} for c in hardest],
            "largest_class_drops": [{k: c[k] for k in ("class", "clean", "corrupted")} for c in drops]}


def _robustness_lines(r: dict | None) -> list[str]:
    """The card's paragraph on accuracy under common corruptions, where it was measured."""
    if not r:
        return []
    src = r["source"]
    made = (f"made from the test images with seed {src['seed']}" if src["kind"] == "generated" else
            f"the published files in `{src['path']}`")
    rel = f", {r['relative_accuracy']:.0%} of the {r['clean_accuracy']:.4f} on the clean images" \
        if r["relative_accuracy"] is not None else ""
    return [f"Under common corruptions (`cifarlab robustness`: {len(r['corruptions'])} corruptions at severities "
            f"{', '.join(map(str, r['severities']))}, {made}, {r['images_per_cell']:,} images each): mean accuracy "
            f"**{r['mean_accuracy']:.4f}**{rel}; hardest "
            + ", ".join(f"{c['corruption']} {c['accuracy']:.3f}" for c in r["hardest"])
            + f"; expected calibration error {r['mean_ece']:.4f} against {r['clean_ece']:.4f} clean"
            + ("; classes that lost most: " + ", ".join(f"{c['class']} {c['clean']:.3f} -> {c['corrupted']:.3f}"
                                                       for c in r["largest_class_drops"]) if r["largest_class_drops"]
               else "") + ". See `robustness/robustness.png` in the run folder.", ""]


def _int8_summary(run: Path, pred) -> dict[str, Any] | None:
    """What the card quotes of ``cifarlab export --int8``'s comparison (``RUN/model.int8.json``),
    where it was measured with the predictor audited (weights, test-time augmentation, calibration;
    of a ``--runs N`` folder, its ensemble's)."""
    from .quantize import read_int8

    r = read_int8(run, pred)
    if r is None:
        return None
    t = r["test"]
    return {"file": Path(r["path"]).name, "bytes": r["bytes"], "float32_bytes": r["float32_bytes"], "data": r["data"],
            "images": t["images"], "accuracy_float32": t["accuracy_a"], "accuracy_int8": t["accuracy_b"],
            "difference_ci": t["difference_ci"], "changed_class": 1 - t["agreement"],
            "classes_lost": [{k: row[k] for k in ("class", "difference", "p_value_holm")}
                             for row in t["per_class"] if row["class"] in t["classes_lost"]],
            # with export --int8 --groups: the groups it costs, Holm-adjusted within each attribute
            "groups_compared": list(t.get("by_attribute", {})), "groups_lost": t.get("groups_lost", [])}


def _int8_lines(q: dict | None) -> list[str]:
    """The card's paragraph on its int8 copy, where ``cifarlab export --int8`` measured one."""
    if not q:
        return []
    lo, hi = q["difference_ci"]
    lost = q["classes_lost"]
    cost = ("; less accurate beyond chance on " + ", ".join(
        f"**{c['class']}** ({c['difference']:+.4f}, Holm-adjusted p = {c['p_value_holm']:.2g})" for c in lost)
        + f": its smaller size is paid for by {'that class' if len(lost) == 1 else 'those classes'}" if lost else
        "; no class less accurate beyond chance (McNemar's test per class, Holm-adjusted)")
    if q.get("groups_compared"):
        cost += ("; by group (" + ", ".join(q["groups_compared"]) + "), less accurate beyond chance on " + ", ".join(
            f"{g['attribute']} **{g['group']}** ({g['difference']:+.4f}, p = {g['p_value_holm']:.2g})"
            for g in q["groups_lost"]) if q["groups_lost"] else
            f"; by group ({', '.join(q['groups_compared'])}), none less accurate beyond chance")
    return [f"Its int8 copy (`cifarlab export --int8`: `{q['file']}`, {q['bytes'] / 1e6:.1f} MB against "
            f"{q['float32_bytes'] / 1e6:.1f} MB in float32) reached {q['accuracy_int8']:.4f} against "
            f"{q['accuracy_float32']:.4f} on the {q['images']:,} test images of `{q['data']}` (int8 minus float32: "
            f"95% CI {lo:+.4f} to {hi:+.4f}); {q['changed_class']:.1%} of them changed class{cost}.", ""]


def _duplicates_head(threshold: float, mirrored: bool | None) -> str:
    """How the card and the runs' summary open their paragraph on near-duplicates: the command
    and the settings it counted copies with."""
    return (f"Near-duplicates (`cifarlab duplicates`, similarity >= {threshold}"
            f"{', mirrored copies included' if mirrored else ''})")


def _duplicates_lines(d: dict | None) -> list[str]:
    """The card's paragraph on test images that are near-copies of training images, where
    ``cifarlab duplicates`` measured it for this model."""
    if not d:
        return []
    r, m = d["run"], d["method"]
    w, o = r["with_duplicate"], r["without_duplicate"]
    head = _duplicates_head(m["threshold"], m.get("mirrored"))
    if not w["images"]:
        return [f"{head}: none of the test images has a near-copy among {r['trained_on']}.", ""]
    diff = "" if r["difference"] is None else \
        f" (difference {r['difference']:+.4f}, 95% CI {_fmt_ci(r['difference_ci'])})"
    other = f", on the other {o['images']:,} **{o['accuracy']:.4f}**" if o["images"] else ""
    verb = "has" if w["images"] == 1 else "have"
    mw, uw = w.get("mirrored"), w.get("unmirrored")
    split = "" if not (mw or {}).get("images") else _mirrored_split(
        (f"{mw['accuracy']:.4f}", f"{mw['images']:,}"),
        (f"{uw['accuracy']:.4f}", f"{uw['images']:,}") if uw["images"] else None)
    return [f"{head}: {images_phrase(w['images'])} "
            f"of the {d['test_images']:,} test images {verb} a near-copy among {r['trained_on']}, which the model may "
            f"recognise from memory. Accuracy on them {w['accuracy']:.4f}{split}{other}{diff}; the latter is the fairer "
            f"estimate for photos it has not seen. `duplicates/duplicates.png` in {d.get('where', 'the run folder')} "
            "shows the pairs near the threshold.", ""]


def _label_issues_lines(li: dict | None) -> list[str]:
    """The card's paragraph on test labels in doubt, where ``cifarlab label-issues`` measured
    them for this model."""
    if not li:
        return []
    n, k = li["test_images"], li["flagged"]
    without = li["accuracy_without_flagged"]
    rest = "" if without is None else f"; accuracy without them {without:.4f} (with them {li['accuracy']:.4f})"
    worst = sorted(li["per_class"], key=lambda c: -c["flagged"])[:3]
    return [f"Test labels in doubt (`cifarlab label-issues`, confident learning): {k:,} of the {n:,} test images "
            f"({k / n:.1%}) flagged as possibly mislabelled, most in "
            + ", ".join(f"{c['class']} ({c['flagged']})" for c in worst)
            + f"; an estimated {li['estimated_wrong_labels']:.0f} wrong labels{rest}. The flags are candidates, often "
            "the model's own mistakes rather than wrong labels (the weaker the model, the more of them); "
            "`label-issues/label_issues.png` shows the most doubtful to judge by eye.", ""]


def unfamiliar_flags(model, ood: dict | None, n: int) -> np.ndarray | None:
    """Which of the ``n`` test images of ``model`` (a run's predictor, or an ensemble) the
    threshold of the ``cifarlab ood`` report ``ood`` (current, as :func:`cifarlab.ood.read_ood`
    or :func:`cifarlab.ood.read_ensemble_report` returns it) flags as unfamiliar, from the scores
    it saved; None without a report, or where its scores are missing or of other images."""
    if not ood:
        return None
    scores = (saved_scores(model, ood) or {}).get("in")
    return None if scores is None or len(scores) != n else scores < ood["threshold"]


def _ood_summary(r: dict | None) -> dict[str, Any] | None:
    """What the card quotes of a ``cifarlab ood`` report: per set, how well the threshold's
    score separates it from the test images, the share it lets through, and its commonest label."""
    if not r:
        return None
    s = r["score"]
    ind = r.get("in_distribution") or {}
    by_class = sorted(ind.get("per_class") or [], key=lambda c: -c["flagged_share"])
    return {"score": s, "keep": r["keep"], "fitted_on": r["threshold_fitted_on"],
            "threshold_images": r.get("threshold_images"),  # absent from reports of an older cifarlab
            "flagged_share": ind.get("flagged_share"),
            # the own classes a deployment that flags would turn away most and least
            "most_flagged": by_class[0] if len(by_class) > 1 else None,
            "least_flagged": by_class[-1] if len(by_class) > 1 else None,
            "sets": [{"name": st["name"], "images": st["images"], "auroc": st[s]["auroc"],
                      "fpr_at_95_tpr": st[s]["fpr_at_95_tpr"], "accepted_share": st["accepted_share"],
                      "called": st["called"][0] if st["called"] else None,
                      # the features' score beside the threshold's, where measured: often far apart
                      "knn_auroc": st["knn"]["auroc"] if "knn" in st and s != "knn" else None}
                     for st in r["sets"]]}


def _unfamiliar_gap_lines(gm: dict) -> list[str]:
    """audit.md's line on how unequally the unfamiliar-image threshold flags an attribute's
    groups, where ``cifarlab ood`` measured the run."""
    ug = gm.get("unfamiliar_gap")
    if not ug:
        return []
    return [f"Flagged as unfamiliar (the {gm['unfamiliar_score']} threshold of `cifarlab ood`): {md_cell(ug['most'])} "
            f"most, {md_cell(ug['least'])} least; difference {ug['difference']:.3f} {_fmt_ci(ug['difference_ci'])}"
            + _zero_verdict(ug), ""]


def _card_confidence_by_group(gm: dict) -> str:
    """The card's sentence on each group's confidence minus accuracy (audits written before it
    have none)."""
    if "confidence_gap" not in gm:
        return ""
    cg = gm["confidence_gap"]
    return (" Confidence minus accuracy: " + ", ".join(f"{g['group']} {g['overconfidence']:+.3f}" for g in gm["groups"])
            + ("" if not cg else f" (largest gap {cg['difference']:.3f} {_fmt_ci(cg['difference_ci'])})") + ".")


def _card_unfamiliar_by_group(gm: dict) -> str:
    """The card's sentence on the share of each group the unfamiliar-image threshold flags."""
    ug = gm.get("unfamiliar_gap")
    if "unfamiliar_score" not in gm:
        return ""
    return (" Flagged as unfamiliar by `cifarlab ood`'s threshold: "
            + ", ".join(f"{g['group']} {g['unfamiliar_share']:.1%}" for g in gm["groups"])
            + ("" if not ug else f" (largest gap {ug['difference']:.3f} {_fmt_ci(ug['difference_ci'])})") + ".")


def _card_sets_by_group(gm: dict) -> str:
    """The card's sentence on how often each group's prediction sets held the true class."""
    if "set_coverage_target" not in gm:
        return ""
    sg = gm["set_coverage_gap"]
    return (f" Prediction sets (fitted for coverage {gm['set_coverage_target']:g}) held the true class for: "
            + ", ".join(f"{g['group']} {g['set_coverage']:.3f} (mean size {g['set_mean_size']:.2f})"
                        for g in gm["groups"])
            + ("" if not sg else f" (largest gap {sg['difference']:.3f} {_fmt_ci(sg['difference_ci'])})") + ".")


def _ood_lines(u: dict | None) -> list[str]:
    """The card's paragraph on images unlike the training data, where ``cifarlab ood`` measured it."""
    if not u:
        return []
    sets = "; ".join(f"{st['name']} ({st['images']:,} images): AUROC {st['auroc']:.3f}"
                     + (f" (knn {st['knn_auroc']:.3f})" if st.get("knn_auroc") is not None else "") + ", "
                     f"**{st['accepted_share']:.1%} accepted**"
                     + (f", most called {st['called']['class']} ({st['called']['share']:.0%})" if st["called"] else "")
                     for st in u["sets"])
    return [f"Unfamiliar images (`cifarlab ood`, {u['score']} score): flagging images below a threshold that keeps "
            f"{u['keep']:.0%} of its {image_count(u.get('threshold_images'))}{u['fitted_on']} images, the model still "
            f"accepts as one of its classes: {sets}. "
            "`cifarlab predict --flag-unfamiliar` applies the threshold, and `cifarlab export` puts it in the ONNX "
            "file; synthetic sets are the easy case, and real photographs of other things are harder to tell. See "
            "`ood/ood.png` in the run folder." + _flagged_own_sentence(u)
            + " These are one run's figures, and seeds can move them far more than they move accuracy: `cifarlab ood` on "
            "the folder of `train --runs N` gives their spread.", ""]


def _flagged_own_sentence(u: dict, overall: bool = True) -> str:
    """The card's sentence on the share of the run's own test images the threshold turns away,
    overall (unless said already: ``overall`` False) and for the classes it turns away most and
    least, where the report gives them."""
    most, least = u.get("most_flagged"), u.get("least_flagged")
    if u.get("flagged_share") is None or not most:
        return ""
    by_class = (f"{most['flagged_share']:.1%} of the {md_cell(most['class'])} images, "
                f"{least['flagged_share']:.1%} of the {md_cell(least['class'])} images.")
    if not overall:
        return f" By class, the most and the least: {by_class}"
    return (f" The threshold also flags {u['flagged_share']:.1%} of the test images, which are of its classes, and "
            f"not alike by class: {by_class}")


def _temperature_lines(overall: dict) -> list[str]:
    """The card's lines on the temperature its probabilities were divided by, if any, and on
    answering only above a confidence threshold."""
    t, raw = overall.get("temperature"), overall.get("uncalibrated")
    if t and overall.get("class_offsets"):
        lines = [f"Probabilities are temperature-scaled (`cifarlab calibrate`, T = {t:.3f}, fitted on the run's "
                 "validation images) and corrected for the training classes' unequal sizes (`--balance-classes`: as "
                 "if every class were equally likely, so rare classes are predicted more often than the training "
                 f"data alone would suggest). Without both, the loss was {raw['loss']:.4f}, the expected calibration "
                 f"error {raw['ece']:.4f}, the accuracy {raw['accuracy']:.4f} and the balanced accuracy "
                 f"{raw['balanced_accuracy']:.4f}. Where the classes will be as unequal in use as in training, "
                 "calibrate the run without `--balance-classes`.", ""]
    else:
        lines = [] if not t else [
            f"Probabilities are temperature-scaled (`cifarlab calibrate`, T = {t:.3f}, fitted on the run's validation "
            f"images): without it, the loss was {raw['loss']:.4f} and the expected calibration error "
            f"{raw['ece']:.4f}. The accuracy is the same either way.", ""]
    sel = [r for r in overall.get("selective") or [] if r["accuracy"] is not None]
    if sel:
        lines += ["Answering only at a confidence of at least "
                  + "; ".join(f"{r['threshold']:g}: {r['coverage']:.1%} of the test images ({r['images']:,}), accuracy "
                              f"{r['accuracy']:.4f}" for r in sel)
                  + ". The rest would be left to a person (`cifarlab predict --min-confidence`).", ""]
    ps = overall.get("prediction_sets")
    if ps:
        short = ps["short_of_coverage"]
        lines += [f"Prediction sets (`cifarlab predict --sets`), fitted on the run's validation images to hold the "
                  f"true class for {ps['coverage_target']:g} of {'each class' if ps['by_class'] else 'images'}, held "
                  f"it for {ps['coverage']:.4f} of the test images with {ps['mean_size']:.2f} classes on average"
                  + (f"; less often than fitted for, beyond chance, for {', '.join(short)}" if short else "")
                  + ". The promise holds only for images from the same source as the validation images.", ""]
    return lines


def _origin_lines(d: dict) -> list[str]:
    """How the model was trained: the recipe of a cifarlab run, or the Keras file it was imported from."""
    if d.get("imported_from"):
        i = d["imported_from"]
        keras = f"Keras {i['keras_version']}" if i.get("keras_version") else "Keras"
        return [f"- Trained in {keras} and imported with `cifarlab import` from `{i['source']}` ({i['layout']}, "
                f"SHA-256 {i['sha256'][:16]}...)",
                f"- Recipe, optimizer and epochs: {TO_FILL}"]
    if d["recipe"] is None:
        return [f"- Recipe, optimizer and epochs: {TO_FILL}"]
    epochs = str(d["epochs"])
    if es := d.get("early_stopping"):
        stop = f"stopped early after epoch {es['stopped_after_epoch']}" if es["stopped_after_epoch"] else \
            "trained every epoch"
        # metrics.json written before the monitor could be chosen watched the validation loss
        best = {"val_loss": "the lowest validation loss", "val_accuracy": "the highest validation accuracy",
                "val_balanced_accuracy": "the highest validation balanced accuracy"}[
            es.get("monitor", "val_loss")]
        delta = f", changes of {es['min_delta']:g} or less not counting" if es.get("min_delta") else ""
        epochs = f"{epochs} with early stopping (patience {es['patience']}{delta}; {stop}; the weights are " \
                 f"those of epoch {es['best_epoch']}, {best})"
    opt = d["optimizer"] or {}
    if opt.get("plateau_patience"):
        # configs written before the monitor and the cooldown could be chosen watched the validation loss
        better = {"val_loss": "a lower validation loss", "val_accuracy": "a higher validation accuracy",
                  "val_balanced_accuracy": "a higher validation balanced accuracy"}[
            opt.get("plateau_monitor", "val_loss")]
        cooldown = f", then {opt['plateau_cooldown']} epoch(s) of cooldown" if opt.get("plateau_cooldown") else ""
        epochs += f"; learning rate multiplied by {opt['plateau_factor']:g} after every {opt['plateau_patience']} " \
                  f"epoch(s) without {better}{cooldown}"
    return [f"- Recipe: `{d['recipe']}`; optimizer: `{opt.get('name')}`, epochs: {epochs}"]


def _balance_lines(per_class: dict[str, int] | None, class_weight: dict | None, sampling: str | None = None,
                   logit_adjustment: dict | None = None) -> list[str]:
    """The model card's lines on how many images each class trained on, and on what made up for
    their differences (the loss's class weights, class-balanced sampling, or the logit-adjusted
    loss): a class seen less is usually recognised worse, which the per-class metrics then show."""
    lines = []
    if per_class:
        low, high = min(per_class.values()), max(per_class.values())

        def having(n: int) -> str:
            return short_list([c for c, k in per_class.items() if k == n], 3)

        if low == high:
            lines.append(f"- Training images per class: {low:,} each")
        else:
            ratio = f", {high / low:.1f} times as many" if low else ""
            lines.append(f"- Training images per class: from {f'{low:,}' if low else 'none'} ({having(low)}) to "
                         f"{high:,} ({having(high)}){ratio}; classes with fewer images are usually recognised worse "
                         "(see the per-class metrics)")
    if class_weight:
        w = class_weight["weights"]
        how = "balanced, n_samples / (n_classes x count)" if class_weight["setting"] == "balanced" else "as set"
        lo, hi = min(w, key=w.get), max(w, key=w.get)
        lines.append(f"- Training loss weighted by class ({how}): from {w[lo]:.3g} ({lo}) to {w[hi]:.3g} ({hi})")
    if sampling == "balanced":
        lines.append("- Training images drawn class-balanced: each epoch as many draws as images, with replacement, "
                     "every class equally likely, so a rare class's images were each seen several times an epoch")
    if logit_adjustment:
        lines.append(f"- Logit-adjusted training loss (tau {logit_adjustment['tau']:g}, Menon et al., 2021): the loss "
                     "saw each logit plus tau x log(its class's training share), so the model's predictions treat the "
                     "classes as equally likely")
    return lines


def _started_from_lines(start: dict | None) -> list[str]:
    """The model card's line on the run whose weights a fine-tuned model started from."""
    if not start:
        return []
    classes = short_list(start["classes"])
    return [f"- Started from: the weights of run `{start['run']}` ({start['model']}, trained on "
            f"`{start['data'] or TO_FILL}`, classes {classes}); that data shaped this model too, so its licence, "
            "consent and caveats apply here as well (see that run's model card)"
            + (f". Trained from fresh weights: {', '.join(start['fresh'])}." if start["fresh"] else ".")
            + _seen_by_start_words(start)]


def _seen_by_start_words(start: dict) -> str:
    """What the model card says of the test images that the weights a model started from had
    learnt from (``seen_test_images`` in ``init_from.json``; absent from runs of an older
    cifarlab)."""
    if "seen_test_images" not in start:
        return ""
    n = start["seen_test_images"]
    if n is None:
        return (" That run's record does not tell which images it trained on, so whether this model's test images "
                "include any is unknown.")
    return (f" {n:,} of this model's test images {'has' if n == 1 else 'have'} the pixels of an image that run's "
            f"weights learnt from: the test figures count {'it' if n == 1 else 'them'}, and may flatter the model."
            if n else "")


def _distilled_from_lines(teacher: dict | None) -> list[str]:
    """The model card's line on the teacher whose predictions the model learnt from."""
    if not teacher:
        return []
    runs = teacher.get("runs")  # an ensemble: the runs of a --runs N folder, their logits averaged
    what = "mean test accuracy" if runs else "test accuracy"
    acc = f", {what} {teacher['test_accuracy']:.4f}" if teacher.get("test_accuracy") is not None else ""
    of = f"the {runs} runs of `{teacher['run']}` (their logits averaged" if runs else f"run `{teacher['run']}` ("
    return [f"- Distilled from: the predictions of {of}{', ' if runs else ''}{teacher['model']}{acc}, trained on "
            f"`{teacher['data'] or TO_FILL}`; {teacher['weight']:g} of the loss, at temperature "
            f"{teacher['temperature']:g}); " + ("those runs' data" if runs else "that run's data")
            + f" and errors shaped this model too, so {'their model cards apply' if runs else 'its model card applies'} "
            "here as well"]


def model_card_markdown(card: dict) -> str:
    """Render a model card dict as Markdown, linking the audit plots beside it."""
    d, iu, td, ev, mt = (card["model_details"], card["intended_use"], card["training_data"], card["evaluation_data"],
                         card["metrics"])
    o = mt["overall"]
    trained = _with_train_images(mt["per_class"])
    lines = [f"# Model card: {d['name']}", "", "## Model details", "",
             f"- Architecture: `{d['architecture']}`, {d['parameters']:,} parameters",
             *_origin_lines(d),
             f"- Training time: {d['training_time_s']:.1f} s on {d['trained_on']}" if d["training_time_s"] else
             f"- Training time: {TO_FILL}",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in (d['versions'] or {}).items()) or TO_FILL}",
             f"- Date of this card: {d['date']}",
             f"- Developers: {d['developers']}", f"- Licence: {d['licence']}", f"- Contact: {d['contact']}", "",
             "## Intended use", "", f"- Primary uses: {iu['primary_uses']}", f"- Primary users: {iu['primary_users']}",
             "", "### Out-of-scope uses", ""] + [f"- {u}" for u in iu["out_of_scope"]] + [
             "", "## Factors", "", f"- Relevant factors: {card['factors']['relevant_factors']}",
             f"- Evaluated group attributes: {', '.join(card['factors']['evaluated_groups']) or 'none supplied'}", "",
             "## Training data", "", f"- Source: `{td['source']}`",
             *([f"- Labels: from `{td['labels_file']}` (file,label rows); the test images were held out of the "
                "labelled images"] if td.get("labels_file") else []),
             f"- Size: {td['size']['train_images']:,} training, {td['size'].get('val_images') or 0:,} validation images"
             if td["size"].get("train_images") is not None else f"- Size: {TO_FILL}",
             f"- Classes: {short_list(td['classes'], 20)}",
             f"- Licence: {td['licence']}", f"- Consent: {td['consent']}", f"- Label caveats: {td['label_caveats']}",
             *_datasheet_lines(td),
             *_balance_lines(td.get("per_class"), td.get("class_weight"), td.get("sampling"),
                             td.get("logit_adjustment")),
             *_started_from_lines(td.get("started_from")), *_distilled_from_lines(td.get("distilled_from")), "",
             "## Evaluation data", "", f"- Source: `{ev['source']}`, {ev['size']:,} images; {ev['note']}", "",
             "## Metrics", "", f"Overall accuracy **{o['accuracy']:.4f}**, loss {o['loss']:.4f}, top-{o['top_k']['k']} "
             f"accuracy {o['top_k']['accuracy']:.4f}, expected calibration error {o['ece']:.4f}; test-time "
             f"augmentation: {o['test_time_augmentation']}. Intervals: {mt['interval_method']}.", "",
             *_temperature_lines(o),
             "![per-class accuracy](per_class_accuracy.png)", "",
             *_table_head(["class", "accuracy", "95% CI", "precision", *trained])]
    for r in mt["per_class"]:
        lines.append(f"| {md_cell(r['class'])} | {r['accuracy']:.3f} | {_fmt_ci(r['accuracy_ci'])} | "
                     f"{_fmt(r['precision'])} |" + (f" {r['train_images']:,} |" if trained else ""))
    sp = mt["class_spread"]
    lines += ["", f"Largest class gap: {sp['best']} vs {sp['worst']}, {sp['difference']:.3f} {_fmt_ci(sp['difference_ci'])}.", ""]
    for name, gm in mt["groups"].items():
        ga = gm["gap"]
        lines += [f"By `{name}`: " + ", ".join(f"{g['group']} {g['accuracy']:.3f} (n={g['n']})" for g in gm["groups"])
                  + ("." if ga is None else f"; largest gap {ga['difference']:.3f} {_fmt_ci(ga['difference_ci'])}.")
                  + _card_confidence_by_group(gm) + _card_unfamiliar_by_group(gm) + _card_sets_by_group(gm), ""]
    lines += _robustness_lines(mt.get("robustness"))
    lines += _int8_lines(mt.get("int8"))
    lines += _duplicates_lines(mt.get("near_duplicates"))
    lines += _label_issues_lines(mt.get("label_issues"))
    lines += _ood_lines(mt.get("unfamiliar_images"))
    lines += ["![confusion matrix](confusion_matrix.png) ![reliability diagram](reliability.png)", "",
              "## Ethical considerations", ""] + [f"- {e}" for e in card["ethical_considerations"]] + [
              "", "## Caveats and recommendations", ""] + [f"- {c}" for c in card["caveats"]] + [""]
    return "\n".join(lines)
