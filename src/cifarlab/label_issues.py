"""``cifarlab label-issues``: test images whose given label a run's predictions put in doubt.

Some of what a model "gets wrong" is the data's fault: Northcutt, Athalye and Mueller (2021,
"Pervasive label errors in test sets destabilize machine learning benchmarks") found wrong
labels in the test sets of ten common benchmarks, CIFAR-10's among them. Confident learning
(Northcutt, Jiang and Chuang, 2021, JAIR 70, sections 3.1 and 3.2) finds candidates from
out-of-sample predicted probabilities, which a run's test images give (it never trained on them):

* each class j gets a threshold t_j, the mean probability of j over the images labelled j
  (the model's average self-confidence there);
* an image labelled i counts towards class j when its probability of j reaches t_j (of several
  such classes, the most probable); counted for another class than its label, it is a label
  issue (the off-diagonal of the "confident joint");
* the confident joint, its rows scaled to the number of images of each label, estimates how
  many labels are wrong.

Implemented from the paper's definitions rather than with cleanlab, whose AGPL licence would
bind cifarlab's users. Candidates are for a person to look at: a weak model's own mistakes are
among them, and a flagged image is not wrong until someone has looked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import CifarlabError


def check_review(review: int) -> None:
    """A clear error for a negative ``--review``, before any data is loaded."""
    if review < 0:
        raise CifarlabError(f"--review {review} is not valid; give 0 or more images to show")


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's threshold: the mean probability of the class over the images labelled with
    it; NaN for a class no image is labelled with (it then counts no image)."""
    k = probs.shape[1]
    t = np.full(k, np.nan)
    for j in range(k):
        mine = labels == j
        if mine.any():
            t[j] = probs[mine, j].mean()
    return t


def confident_classes(probs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each image, the class it confidently belongs to: of the classes whose probability
    reaches their threshold, the most probable; -1 where none does."""
    above = probs >= np.where(np.isnan(t), np.inf, t)  # a class without images is never reached
    masked = np.where(above, probs, -1.0)
    out = masked.argmax(1)
    out[~above.any(1)] = -1
    return out


def confident_joint(labels: np.ndarray, confident: np.ndarray, k: int) -> np.ndarray:
    """C[i, j]: the images labelled i that confidently belong to j (those with none left out)."""
    c = np.zeros((k, k), int)
    ok = confident >= 0
    np.add.at(c, (labels[ok], confident[ok]), 1)
    return c


def estimated_issues(c: np.ndarray, labels: np.ndarray) -> float:
    """The number of wrong labels the confident joint estimates: each row scaled to the images
    of that label (the paper's calibration, its equation 2), the off-diagonal summed."""
    counts = np.bincount(labels, minlength=len(c)).astype(float)
    rows = c.sum(1).astype(float)
    scaled = np.divide(c * counts[:, None], rows[:, None], out=np.zeros(c.shape), where=rows[:, None] > 0)
    return float(scaled.sum() - np.trace(scaled))


def find_issues(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Confident learning on ``probs`` (N, K), out-of-sample, and the given ``labels`` (N,):
    the flagged images' indices, ranked by the probability of their given label (lowest
    first, Northcutt et al.'s "self-confidence" ranking), the class each confidently belongs
    to, the thresholds, the confident joint and the estimated number of wrong labels."""
    k = probs.shape[1]
    t = thresholds(probs, labels)
    conf = confident_classes(probs, t)
    flagged = np.flatnonzero((conf >= 0) & (conf != labels))
    self_conf = probs[np.arange(len(labels)), labels]
    flagged = flagged[np.argsort(self_conf[flagged], kind="stable")]
    c = confident_joint(labels, conf, k)
    return {"indices": flagged, "suggested": conf[flagged], "thresholds": t, "confident_joint": c,
            "estimated": estimated_issues(c, labels), "self_confidence": self_conf}


def label_issues_report(probs: np.ndarray, ds, out: Path, classes: list[str], review: int = 32,
                        about: dict[str, Any] | None = None) -> dict[str, Any]:
    """Find the label issues of ``ds``'s test images from ``probs``, out-of-sample class
    probabilities of them (N, classes), and write ``label_issues.json`` (the report),
    ``label_issues.csv`` (each flagged image: index, path, given and suggested label, their
    probabilities), ``groups.csv`` (``index``, ``label_issue`` yes/no, for ``audit --groups`` and
    ``compare --groups``) and ``label_issues.png`` (the ``review`` most doubtful, with both
    labels) into ``out``. The report gives the accuracy of ``probs`` with and without the
    flagged images, and per class how many of its images are flagged; ``about`` opens it with
    what was measured (the run, its test-time augmentation, its weights' digest)."""
    from .export import list_to_csv_rows
    from .fsutil import make_folder, write_json, write_text
    from .plots import image_grid

    y = ds.y_test
    if not len(y):
        raise CifarlabError(f"{ds.source} has no test images to doubt the labels of")
    found = find_issues(probs, y)
    idx, sugg = found["indices"], found["suggested"]
    n = len(y)
    correct = probs.argmax(1) == y
    keep = np.ones(n, bool)
    keep[idx] = False
    rows = [{"rank": r + 1, "index": int(i), "path": ds.test_paths[i] if ds.test_paths else "",
             "given": classes[y[i]], "suggested": classes[s], "p_given": round(float(probs[i, y[i]]), 6),
             "p_suggested": round(float(probs[i, s]), 6), "predicted": classes[probs[i].argmax()]}
            for r, (i, s) in enumerate(zip(idx, sugg))]
    flagged_per_class = np.bincount(y[idx], minlength=len(classes))
    t = found["thresholds"]
    per_class = [{"class": name, "test_images": int((y == j).sum()), "flagged": int(flagged_per_class[j]),
                  "threshold": None if np.isnan(t[j]) else float(t[j])} for j, name in enumerate(classes)]
    report = {**(about or {}), "data": ds.source, "test_origin": ds.test_origin, "test_images": n, "flagged": len(idx),
              "flagged_share": len(idx) / n, "estimated_wrong_labels": found["estimated"],
              "accuracy": float(correct.mean()),
              "accuracy_without_flagged": float(correct[keep].mean()) if keep.any() else None,
              "flagged_predicted_as_suggested": int(sum(r["predicted"] == r["suggested"] for r in rows)),
              "per_class": per_class, "confident_joint": found["confident_joint"].tolist(), "classes": classes,
              "method": "confident learning (Northcutt et al., 2021): off-diagonal of the confident joint, ranked "
                        "by the given label's probability",
              "issues": rows}
    make_folder(out)
    write_text(out / "label_issues.csv", list_to_csv_rows(rows) if rows else
               "rank,index,path,given,suggested,p_given,p_suggested,predicted\n")
    write_text(out / "groups.csv", list_to_csv_rows({"index": i, "label_issue": "no" if keep[i] else "yes"}
                                                    for i in range(n)))
    shown = idx[:review]
    if len(shown):
        titles = [f"given {classes[y[i]]} {probs[i, y[i]]:.2f}\nmodel: {classes[s]} {probs[i, s]:.2f}"
                  for i, s in zip(shown, sugg[:review])]
        image_grid(ds.x_test[shown], titles, out / "label_issues.png")
    report["files"] = sorted({p.name for p in out.iterdir() if not p.name.startswith(".")} | {"label_issues.json"})
    write_json(out / "label_issues.json", report)
    return report


def label_issues_run(run: str | Path, ds, out: str | Path | None = None, review: int = 32, tta: str | None = None,
                     device: str = "auto", uncalibrated: bool = False,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """:func:`label_issues_report` of the run ``run`` on ``ds``'s test split, into ``out``, by
    default ``RUN/label-issues`` (``RUN/label-issues-<data>`` on other data than the run's own)."""
    from .calibrate import weights_digest
    from .evaluate import _check_compatible
    from .export import default_report_folder, load_model
    from .fsutil import report_folder

    check_review(review)
    out = Path(out) if out is not None else default_report_folder(run, "label-issues", ds)
    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    offsets = pred.class_offsets()
    about = {"run": str(pred.run), "tta": pred.tta, "temperature": pred.temperature(),
             "class_offsets": None if offsets is None else list(offsets), "weights_sha256": weights_digest(pred.run)}
    with report_folder(out):
        which = "validation" if ds.test_origin == "validation" else "test"
        log(f"predicting the {len(ds.x_test):,} {which} images")
        return label_issues_report(pred.predict(ds.x_test), ds, out, pred.classes, review, about)


def validation_images(run: str | Path, ds):
    """``ds`` with its test split replaced by the images ``run`` validated on (out of sample
    too: it never trained on them), so confident learning can look for label errors among the
    training data's images; ``test_origin`` "validation". ``ds`` must be the data the run was
    trained on."""
    import dataclasses

    from .train import run_split

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise CifarlabError(f"'{run}' has no config.yaml (an imported model?), so its validation images are unknown; "
                            "look at its test images instead (leave out --split val)")
    _, _, va = run_split(run, ds)
    if not len(va):
        raise CifarlabError(f"'{run}' held out no validation images (data.val_split = 0, as the speed recipes do); "
                            "look at its test images instead (leave out --split val)")
    named = len(ds.train_paths) == len(ds.x_train)
    return dataclasses.replace(ds, x_test=ds.x_train[va], y_test=ds.y_train[va],
                               test_paths=[ds.train_paths[i] if named else f"train#{i}" for i in va],
                               test_origin="validation")


def label_issues_runs(base: str | Path, ds, out: str | Path | None = None, review: int = 32, tta: str | None = None,
                      device: str = "auto", uncalibrated: bool = False,
                      log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """:func:`label_issues_report` of the runs of the ``--runs N`` folder ``base`` together: on
    the mean of their probabilities (their ensemble, more accurate than each, so its doubts are
    fewer of its own mistakes), into ``out``, by default ``base/label-issues``
    (``base/label-issues-<data>`` on other data). The report adds each run's accuracy. The mean
    is calibrated with the ensemble's own temperature where ``cifarlab calibrate`` fitted one
    (:class:`cifarlab.export.Ensemble`), as ``cifarlab predict BASE`` gives it."""
    from .calibrate import calibrate_mean
    from .evaluate import _check_compatible
    from .export import ensemble_calibration, ensemble_probabilities, finished_runs, load_model, \
        other_data_folder
    from .fsutil import report_folder

    check_review(review)
    base = Path(base)
    runs = finished_runs(base)
    own = ensemble_calibration(base, runs, tta, uncalibrated)
    out = Path(out) if out is not None else other_data_folder(base, "label-issues", ds, runs) or base / "label-issues"
    preds = [load_model(r, device, tta, uncalibrated) for r in runs]
    for p in preds:
        _check_compatible(p, ds)
    with report_folder(out):
        probs = []
        for r, p in zip(runs, preds):
            log(f"predicting the {len(ds.x_test):,} test images with {r.name}")
            probs.append(p.predict(ds.x_test))
        t = None if own is None else own.temperature
        about = {"run": str(base), "runs": [str(r) for r in runs], "probabilities": ensemble_probabilities(t),
                 "ensemble_temperature": t,
                 "tta": sorted({p.tta for p in preds}),
                 "per_run_accuracy": [float((q.argmax(1) == ds.y_test).mean()) for q in probs]}
        mean = np.mean(np.asarray(probs, np.float64), 0)
        return label_issues_report(mean.astype(np.float32) if own is None else calibrate_mean(mean, own.temperature),
                                   ds, out, preds[0].classes, review, about)


def read_label_issues(run: str | Path, tta: str, temperature: float | None = None,
                      class_offsets: tuple[float, ...] | None = None,
                      name: str = "label-issues") -> dict[str, Any] | None:
    """What ``cifarlab label-issues`` found for ``run`` with its current weights, test-time
    augmentation ``tta`` and calibration (``temperature`` and ``class_offsets``: both change the
    probabilities the thresholds are means of), from ``RUN/<name>/label_issues.json`` (``name``
    ``label-issues-<data>`` for other data); None where there is none, or where it is
    unreadable or was measured with other weights or settings: what the model card quotes."""
    from .calibrate import read_current_report

    r = read_current_report(Path(run) / name / "label_issues.json", run, tta, temperature, class_offsets)
    if r is None:
        return None
    return {k: r.get(k) for k in ("test_images", "flagged", "estimated_wrong_labels", "accuracy",
                                  "accuracy_without_flagged", "per_class")}


def _by_class(per_class: list[dict[str, Any]], most: int = 20) -> str:
    """Each class's flagged count, in the classes' order; of more than ``most`` classes (CIFAR-100's
    hundred), the ``most`` with the most flags, and how many the others hold."""
    if len(per_class) <= most:
        return ", ".join(f"{c['class']} {c['flagged']}" for c in per_class)
    top = sorted(per_class, key=lambda c: -c["flagged"])[:most]
    rest = sum(c["flagged"] for c in per_class) - sum(c["flagged"] for c in top)
    return ", ".join(f"{c['class']} {c['flagged']}" for c in top) + \
        f"; the other {len(per_class) - most} classes {rest} (label_issues.json lists each)"


def format_report(r: dict[str, Any], out: Path, most: int = 10) -> str:
    """The report as a few lines for the terminal."""
    n, k = r["test_images"], r["flagged"]
    which = "validation" if r.get("test_origin") == "validation" else "test"
    lines = [f"{k:,} of {n:,} {which} images flagged ({k / n:.2%}) as possibly mislabelled; confident learning "
             f"estimates {r['estimated_wrong_labels']:,.0f} wrong labels"]
    if r.get("runs"):
        each = r["per_run_accuracy"]
        lines.append(f"from the mean of the probabilities of {len(r['runs'])} runs (each run's accuracy "
                     f"{min(each):.4f} to {max(each):.4f})")
    lines += [f"accuracy {r['accuracy']:.4f}; without the flagged images "
              + ("n/a" if r["accuracy_without_flagged"] is None else f"{r['accuracy_without_flagged']:.4f}"),
              "flagged by class: " + _by_class(r["per_class"])]
    for row in r["issues"][:most]:
        lines.append(f"  {row['rank']:>3}. {row['path'] or '#' + str(row['index']):<28} given {row['given']} "
                     f"({row['p_given']:.3f}), model: {row['suggested']} ({row['p_suggested']:.3f})")
    if k > most:
        lines.append(f"  ... {k - most} more in label_issues.csv")
    lines.append("These are candidates to look at, not errors found: the model's own mistakes are among them "
                 "(label_issues.png shows the most doubtful).")
    if k > n / 2:  # most labels of a data set worth testing on are right: so most of these flags are the model's
        lines.append(f"warning: more than half the {which} images are flagged: a data set whose labels were mostly "
                     f"wrong could not be learnt at all, so most of these flags are the model's own mistakes "
                     f"(accuracy {r['accuracy']:.4f}); a more accurate model gives a shorter list to look at")
    lines.append(f"Report files in {out}")
    return "\n".join(lines)
