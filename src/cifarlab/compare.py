"""Two trained models on the same test images: is the difference in accuracy real?

A difference of a point between two runs is often within what the choice of test images alone
gives. The comparison is paired, image by image, as the standard tests for two classifiers on
one test set are (Dietterich, 1998): McNemar's exact test on the images exactly one model gets
right, a paired percentile bootstrap interval for the difference in accuracy, and per class the
same test with Holm's correction for testing every class; and, from ``cifarlab ood``'s reports,
DeLong's paired test of how well each tells unfamiliar images from the test images. It says
whether these two trained models differ on these images; whether two *recipes* differ needs
several runs of each (``cifarlab train --runs N``), since seeds alone move accuracy:
:func:`compare_run_sets` compares two such folders with Welch's t-test on their runs'
accuracies. The ensemble of such a folder is one model too, and :func:`compare_runs` compares it
as one (with a run, or with another ensemble).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .audit import _fmt_spread, check_bootstrap, images_phrase, load_groups
from .data import Dataset
from .errors import CifarlabError, short_list
from .evaluate import _check_compatible, describe
from .export import Ensemble, load_classifier

ALPHA = 0.05  # the level at which a difference is called one


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: of the images exactly one model gets right, is the split
    between the two models more uneven than a fair coin gives? (A binomial test with p = 1/2.)"""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_b, n, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (family-wise error), in their order. (scipy
    adjusts only for the false discovery rate; statsmodels would be a dependency for this alone.)"""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # never below an earlier one
        adjusted[i] = running
    return adjusted


def delong(inside_a: np.ndarray, outside_a: np.ndarray, inside_b: np.ndarray,
           outside_b: np.ndarray) -> dict[str, float]:
    """DeLong's test (DeLong, DeLong and Clarke-Pearson, 1988) of whether two scores of the same
    images tell in-distribution images (``inside_*``, higher meaning in) from others
    (``outside_*``) equally well: both AUROCs, B minus A, its standard error and the two-sided
    p-value. Paired: the i-th image is the same image in A's and in B's arrays, so the
    covariance of the two AUROCs is taken into account. Computed from midranks (Sun and Xu,
    2014). The standard error is 0 (and p 1, or 0 where the AUROCs differ) where neither score
    varies across the images in a way that moves its AUROC."""
    from scipy.stats import norm, rankdata

    m, n = len(inside_a), len(outside_a)
    if not m or not n or len(inside_b) != m or len(outside_b) != n:
        raise CifarlabError(f"DeLong's test needs the same images under both scores, got {m} and {len(inside_b)} "
                            f"in, {n} and {len(outside_b)} out")
    v10, v01, auc = [], [], []
    for x, y in ((inside_a, outside_a), (inside_b, outside_b)):
        tz = rankdata(np.r_[x, y])  # midranks: a tie counts one half, as the AUROC counts it
        tx, ty = rankdata(x), rankdata(y)
        v10.append((tz[:m] - tx) / n)  # each in image: the share of out images it scores above
        v01.append(1 - (tz[m:] - ty) / m)  # each out image: the share of in images that score above it
        auc.append(float(v10[-1].mean()))
    s10, s01 = np.cov(v10) if m > 1 else np.zeros((2, 2)), np.cov(v01) if n > 1 else np.zeros((2, 2))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = auc[1] - auc[0]
    se = float(np.sqrt(max(var, 0.0)))
    p = float(2 * norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"auroc_a": auc[0], "auroc_b": auc[1], "difference": diff, "se": se, "p_value": p}


def _counts(ok_a: np.ndarray, ok_b: np.ndarray) -> dict[str, int]:
    return {"both_right": int((ok_a & ok_b).sum()), "only_a": int((ok_a & ~ok_b).sum()),
            "only_b": int((~ok_a & ok_b).sum()), "both_wrong": int((~ok_a & ~ok_b).sum())}


def _subsets(ok_a: np.ndarray, ok_b: np.ndarray, key: str, subsets: list[tuple[str, np.ndarray]]) -> list[dict]:
    """One row per named subset of the images (a class, a group): size, both accuracies, B minus
    A, the four counts and McNemar's p-value, Holm-adjusted over the subsets."""
    rows = []
    for name, ix in subsets:
        a, b = ok_a[ix], ok_b[ix]
        k = _counts(a, b)
        rows.append({key: name, "support": int(len(a)), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
                     "difference": float(b.mean() - a.mean()), **k, "p_value": mcnemar_exact(k["only_a"], k["only_b"])})
    for row, p in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_value_holm"] = p
    return rows


def compare_predictions(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, classes: list[str],
                        n_boot: int = 1000, seed: int = 0,
                        groups: tuple[np.ndarray, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """The paired comparison of two models' predicted classes ``pred_a`` and ``pred_b`` on the
    images labelled ``y``: accuracies, B minus A with a bootstrap 95% interval (``n_boot``
    resamples of the images, seeded), the four agreement counts, McNemar's exact p-value, and
    the same per class (p-values Holm-adjusted over the classes). ``groups`` (as
    :func:`cifarlab.audit.read_groups` returns them: image indices and each attribute's value
    per index) adds the same per group of each attribute, Holm-adjusted within the attribute;
    images whose value is empty are left out of that attribute and counted."""
    check_bootstrap(n_boot)
    ok_a, ok_b = pred_a == y, pred_b == y
    n = len(y)
    rng = np.random.default_rng(seed)
    gain = ok_b.astype(np.int8) - ok_a.astype(np.int8)  # +1 only B right, -1 only A right
    diffs = np.concatenate([gain[rng.integers(0, n, (chunk, n))].mean(1)  # chunks bound the memory
                            for chunk in np.diff(np.r_[0:n_boot:100, n_boot])])
    per_class = _subsets(ok_a, ok_b, "class", [(c, np.flatnonzero(y == i)) for i, c in enumerate(classes)
                                               if (y == i).any()])
    total = _counts(ok_a, ok_b)
    out = {"images": n, "accuracy_a": float(ok_a.mean()), "accuracy_b": float(ok_b.mean()),
           "difference": float(ok_b.mean() - ok_a.mean()),
           "difference_ci": [float(np.quantile(diffs, ALPHA / 2)), float(np.quantile(diffs, 1 - ALPHA / 2))],
           "bootstrap": n_boot, "seed": seed, **total, "agreement": float((pred_a == pred_b).mean()),
           "p_value": mcnemar_exact(total["only_a"], total["only_b"]), "alpha": ALPHA, "per_class": per_class}
    if groups is not None:
        idx, attrs = groups
        out["by_attribute"] = {
            attr: {"not_recorded": int((values == "").sum()),
                   "groups": _subsets(ok_a, ok_b, "group", [(g, idx[values == g]) for g in sorted(set(values) - {""})])}
            for attr, values in attrs.items()}
    return out


def check_same_classes(run_a: Path, classes_a: list[str], run_b: Path, classes_b: list[str]) -> None:
    """Refuse two runs whose models tell apart other classes (or the same ones in another order)."""
    if classes_a != classes_b:
        how = ("the same classes in another order" if sorted(classes_a) == sorted(classes_b) else
               f"{len(classes_a)} and {len(classes_b)} classes, "
               f"{len(set(classes_a) ^ set(classes_b))} of them in one only")
        raise CifarlabError(f"'{run_a}' and '{run_b}' cannot be compared: their models have {how} "
                            f"({short_list(classes_a, 5)} against {short_list(classes_b, 5)}); compare runs "
                            "trained on the same classes")


def compare_runs(run_a: str | Path, run_b: str | Path, ds: Dataset, tta: str | None = None, device: str = "auto",
                 n_boot: int = 1000, seed: int = 0, groups_csv: str | Path | None = None,
                 uncalibrated: bool = False, intersections: bool = False) -> dict[str, Any]:
    """Compare two run folders on ``ds``'s test images (see :func:`compare_predictions`), each
    with its own test-time augmentation unless ``tta`` names one for both, and with its own
    calibration unless ``uncalibrated`` (a temperature changes no predicted class, but the class
    offsets of ``cifarlab calibrate --balance-classes`` do); ``groups_csv`` is a groups file as
    ``cifarlab audit --groups`` reads it, with each pair of its attributes where ``intersections``.
    Either folder may be that of ``cifarlab train --runs N``: its ensemble is compared, the model
    ``cifarlab predict`` serves for it (:func:`cifarlab.export.load_ensemble`)."""
    check_bootstrap(n_boot)  # a bad setting should cost no prediction
    groups = load_groups(groups_csv, ds, intersections)  # a bad file fails before any model runs
    models = [load_classifier(r, device, tta, uncalibrated) for r in (run_a, run_b)]
    about = [_about(m) for m in models]
    check_same_classes(Path(about[0]["run"]), models[0].classes, Path(about[1]["run"]), models[1].classes)
    for name, m, a in zip("AB", models, about):
        try:
            _check_compatible(m, ds)
        except CifarlabError as e:
            raise CifarlabError(f"{'ensemble' if a['runs'] else 'run'} {name} ('{a['run']}'): {e}") from None
    pred_a, pred_b = (m.predict(ds.x_test).argmax(1) for m in models)
    result = compare_predictions(ds.y_test, pred_a, pred_b, ds.classes, n_boot, seed, groups)
    result.update({"a": about[0], "b": about[1], "data": ds.source, "unfamiliar_images": paired_ood(*models)})
    return result


def paired_ood(model_a, model_b) -> dict[str, Any] | None:
    """How well the two models tell unfamiliar images from their test images, from the reports
    of ``cifarlab ood`` on each (a run's, or a ``--runs N`` folder's ensemble's): for each set
    of images both scored, both AUROCs and DeLong's paired test (:func:`delong`), Holm-adjusted
    over the sets. It needs both measured as they are now, with the same score, on the same
    test images; sets are paired by their images (those with other images in each, as from
    another ``--seed``, are named and left out). None where neither was measured; else a note
    saying why not, where they cannot be paired."""
    from .ood import FILE, SUMMARY_FILE, read_report, saved_scores

    models = (model_a, model_b)
    got = [read_report(m) for m in models]
    folders = [m.folder if isinstance(m, Ensemble) else m.run for m in models]
    if got == [None, None]:  # none at all, or none that holds for the models as compared
        written = [f is not None and (Path(f) / (SUMMARY_FILE if isinstance(m, Ensemble) else f"ood/{FILE}")).is_file()
                   for f, m in zip(folders, models)]
        return {"note": "neither has a report of cifarlab ood measured as it is compared here (its weights, "
                        f"calibration and test-time augmentation); run: cifarlab ood {folders[0]}, "
                        f"cifarlab ood {folders[1]}"} if any(written) else None
    for name, r, folder in zip("AB", got, folders):
        if r is None:
            return {"note": f"{name} has no report of cifarlab ood measured as it is now; run: cifarlab ood {folder}"}
    ra, rb = got
    if ra["score"] != rb["score"]:
        return {"note": f"A was measured with the {ra['score']} score and B with {rb['score']}; measure both with "
                        "the same --score"}
    if not ra["in_distribution"].get("images_sha256") or \
            ra["in_distribution"].get("images_sha256") != rb["in_distribution"].get("images_sha256"):
        return {"note": "the two were not measured on the same test images (or by an older cifarlab ood, which "
                        "recorded none); measure both again on the same data"}
    sa, sb = saved_scores(model_a, ra), saved_scores(model_b, rb)
    if sa is None or sb is None:
        return {"note": f"the scores that cifarlab ood saved with {'A' if sa is None else 'B'}'s report are missing "
                        "or damaged; run cifarlab ood on it again"}
    where_b = {st["images_sha256"]: j for j, st in enumerate(rb["sets"]) if st.get("images_sha256")}
    rows, paired = [], {}  # B's set -> A's
    for i, st in enumerate(ra["sets"]):
        j = where_b.get(st.get("images_sha256"))
        if j is not None and j not in paired:
            paired[j] = i
            rows.append({"set": st["name"], "images": st["images"],
                         **delong(sa["in"], sa["sets"][i], sb["in"], sb["sets"][j])})
    for r, q in zip(rows, holm([r["p_value"] for r in rows])):
        r["p_value_holm"] = q
    return {"score": ra["score"], "test_images": ra["in_distribution"]["images"], "sets": rows,
            "unpaired": {"a": [st["name"] for i, st in enumerate(ra["sets"]) if i not in paired.values()],
                         "b": [st["name"] for j, st in enumerate(rb["sets"]) if j not in paired]}}


def _about(m) -> dict[str, Any]:
    """What a comparison records of one side: a run, or the ensemble of a ``--runs N`` folder
    (``runs``: how many; 0 for one run)."""
    if isinstance(m, Ensemble):
        each = m.members
        return {"run": str(m.folder), "model": f"ensemble of {len(each)} {each[0].arch['model']} runs",
                "tta": m.tta, "runs": len(each),
                "balanced_classes": any(r.class_offsets() is not None for r in each)}
    return {"run": str(m.run), "model": m.arch["model"], "tta": m.tta, "runs": 0,
            "balanced_classes": m.class_offsets() is not None}


def _summary(folder: Path) -> dict[str, Any]:
    from .export import finished_runs, runs_of

    if (folder / "config.yaml").is_file() and runs_of(folder):
        finished_runs(folder)  # every run trained its epochs: not a set stopped, or half trained on to more
    path = folder / "runs_summary.json"
    if not path.is_file():
        raise CifarlabError(f"'{folder}' has no runs_summary.json: its runs did not all finish; finish them with "
                            f"cifarlab train --resume {folder}")
    try:
        s = json.loads(path.read_text())
        accuracies = [float(r["test_accuracy"]) for r in s["per_run"]]
        times = [float(r["train_time_s"]) for r in s["per_run"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CifarlabError(f"{path} is not a summary written by 'cifarlab train --runs' ({type(e).__name__}: {e})") \
            from None
    ensemble = (s.get("ensemble") or {}).get("test_accuracy")  # absent from summaries of an older cifarlab
    return {"folder": str(folder), "recipe": s.get("recipe"), "model": s.get("model"), "data": s.get("data"),
            "accuracies": accuracies, "times": times,
            "ensemble_accuracy": float(ensemble) if isinstance(ensemble, (int, float)) else None}


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that ``a`` and ``b`` have the
    same mean; where neither varies, 1 if they are equal, else 0 (t is 0/0 or infinite)."""
    from scipy.stats import ttest_ind

    if np.ptp(a) == np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():  # scipy warns of "nearly identical" data when one set has no spread,
        warnings.simplefilter("ignore", RuntimeWarning)  # which Welch's test handles (its variance is 0)
        return float(ttest_ind(b, a, equal_var=False).pvalue)


def _class_accuracies(folder: Path) -> tuple[dict[str, list[float]] | None, str | None]:
    """Each class's test accuracy over the runs of ``folder``, from their ``metrics.json``; or
    None and the reason where a run's figures are missing or the runs name other classes."""
    from .export import runs_of

    rows = []
    for run in runs_of(folder, "metrics.json"):
        try:
            rows.append(json.loads((run / "metrics.json").read_text())["per_class_accuracy"])
        except (ValueError, KeyError, OSError) as e:
            return None, f"{run / 'metrics.json'} has no per-class accuracy ({type(e).__name__})"
    if not rows:
        return None, f"'{folder}' has no run-K/metrics.json files"
    if any(list(r) != list(rows[0]) for r in rows):
        return None, f"the runs of '{folder}' name other classes"
    return {c: [r[c] for r in rows] for c in rows[0]}, None


def _per_class_tests(folder_a: Path, folder_b: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Welch's test per class on the two sets' runs, with Holm's correction over the classes;
    None and the reason where the runs' per-class figures cannot be paired."""
    (ca, why_a), (cb, why_b) = _class_accuracies(folder_a), _class_accuracies(folder_b)
    if ca is None or cb is None:
        return None, why_a or why_b
    if list(ca) != list(cb):
        return None, "the two sets have other classes"
    rows = []
    for c in ca:
        xa, xb = ca[c], cb[c]
        if any(x is None for x in xa + xb):  # a class absent from the test data has no accuracy
            continue
        rows.append({"class": c, "mean_a": float(np.mean(xa)), "mean_b": float(np.mean(xb)),
                     "difference": float(np.mean(xb) - np.mean(xa)), "p_value": welch_p(xa, xb)})
    for r, q in zip(rows, holm([r["p_value"] for r in rows])):
        r["p_value_holm"] = q
    return rows, None


def compare_run_sets(folder_a: str | Path, folder_b: str | Path) -> dict[str, Any]:
    """Compare two ``--runs N`` folders (two recipes, each trained on several seeds) from their
    summaries: mean test accuracy and training time of each, B minus A, and Welch's t-test on
    the runs' accuracies (unpaired: a seed means nothing shared across recipes); the same per
    class from the runs' ``metrics.json``, with Holm's correction over the classes. Their
    ensembles' test accuracies, as training measured them, are quoted beside, untested."""
    a, b = _summary(Path(folder_a)), _summary(Path(folder_b))
    for s in (a, b):
        if len(s["accuracies"]) < 2:
            raise CifarlabError(f"'{s['folder']}' holds {len(s['accuracies'])} run; a test across runs needs at "
                                "least 2 in each folder (train with --runs N, N >= 2)")
    out = {"a": a, "b": b, "same_data": a["data"] == b["data"], "alpha": ALPHA,
           "p_value": welch_p(a["accuracies"], b["accuracies"])}
    out["per_class"], out["per_class_note"] = _per_class_tests(Path(folder_a), Path(folder_b))
    out["balanced_runs"] = [s for s in (folder_a, folder_b) if _balanced(Path(s))]
    out["robustness"] = _robustness(Path(folder_a), Path(folder_b))
    out["unfamiliar_images"] = _ood(Path(folder_a), Path(folder_b))
    for side in (a, b):
        side.update(runs=len(side["accuracies"]), test_accuracy=describe(side["accuracies"]),
                    train_time_s=describe(side["times"]))
    out["difference"] = b["test_accuracy"]["mean"] - a["test_accuracy"]["mean"]
    ta, tb = a["train_time_s"]["mean"], b["train_time_s"]["mean"]
    out["time_ratio"] = tb / ta if ta > 0 else None
    ea, eb = a["ensemble_accuracy"], b["ensemble_accuracy"]
    out["ensemble_difference"] = eb - ea if ea is not None and eb is not None else None
    return out


def _both_summaries(folder_a: Path, folder_b: Path, read: Callable[[Path], dict[str, Any] | None], what: str,
                    command: str) -> tuple[dict[str, Any], dict[str, Any]] | dict[str, Any] | None:
    """The summaries of ``command`` in both folders, as ``read`` returns them (``{"summary": ...}``
    or ``{"note": ...}``), as the pair (A's, B's); else a note saying why not (``what``: what the
    command measured), or None where it measured neither folder."""
    found = {f: r for f in (folder_a, folder_b) if (r := read(f)) is not None}
    if not found:
        return None
    if len(found) < 2:
        missing = folder_b if folder_a in found else folder_a
        return {"note": f"only one folder was measured {what}; run: {command} {missing}"}
    if any("note" in r for r in found.values()):
        return {"note": "; ".join(r["note"] for r in found.values() if "note" in r)}
    return found[folder_a]["summary"], found[folder_b]["summary"]


def _robustness(folder_a: Path, folder_b: Path) -> dict[str, Any] | None:
    """Welch's test on the runs' mean accuracies under corruption, where ``cifarlab robustness``
    measured both folders on the same corruptions, severities and images and the runs still hold
    the weights it measured; else a note saying what differs (None where neither was measured)."""
    from .robustness import read_runs_summary

    got = _both_summaries(folder_a, folder_b, read_runs_summary, "under corruption", "cifarlab robustness")
    if not isinstance(got, tuple):
        return got
    sa, sb = got
    differ = [k for k in ("source", "severities", "images_per_cell", "tta") if sa.get(k) != sb.get(k)]
    if [c.get("name") for c in sa["corruptions"]] != [c.get("name") for c in sb["corruptions"]]:
        differ.append("corruptions")
    if differ:
        return {"note": f"the two folders were measured under corruption with different {', '.join(differ)}; "
                        "measure both with the same options"}
    a, b = [r["mean_accuracy"] for r in sa["per_run"]], [r["mean_accuracy"] for r in sb["per_run"]]
    return {"corruptions": len(sa["corruptions"]), "severities": sa["severities"], "source": sa["source"],
            "a": describe(a), "b": describe(b), "difference": float(np.mean(b) - np.mean(a)),
            "p_value": welch_p(a, b) if min(len(a), len(b)) >= 2 else None}


def _ood(folder_a: Path, folder_b: Path) -> dict[str, Any] | None:
    """Welch's test on the runs' AUROC for each unfamiliar set, where ``cifarlab ood`` measured
    both folders against the same sets with the same score and test-time augmentation and the
    runs still hold the weights it measured, with Holm's correction over the sets; else a note
    saying what differs (None where neither was measured). Seeds move these figures far more than
    they move accuracy: only a test across runs can say one recipe tells them apart better."""
    from .ood import read_runs_summary

    got = _both_summaries(folder_a, folder_b, read_runs_summary, "against unfamiliar images", "cifarlab ood")
    if not isinstance(got, tuple):
        return got
    sa, sb = got
    differ = [k for k in ("score", "tta", "keep") if sa.get(k) != sb.get(k)]
    # the same images, where both summaries record their digests (older ones: the same sources and counts)
    if [(st.get("source"), st.get("images"), st.get("images_sha256")) for st in sa["sets"]] != \
            [(st.get("source"), st.get("images"), st.get("images_sha256")) for st in sb["sets"]]:
        differ.append("sets (sources, counts or --seed)")
    if differ:
        return {"note": f"the two folders were measured against unfamiliar images with different "
                        f"{', '.join(differ)}; measure both with the same options"}
    rows = []
    for i, st in enumerate(sa["sets"]):
        a, b = [r["auroc"][i] for r in sa["per_run"]], [r["auroc"][i] for r in sb["per_run"]]
        rows.append({"set": st["name"], "a": describe(a), "b": describe(b), "difference": float(np.mean(b) - np.mean(a)),
                     "p_value": welch_p(a, b) if min(len(a), len(b)) >= 2 else None})
    tested = [r for r in rows if r["p_value"] is not None]
    for r, q in zip(tested, holm([r["p_value"] for r in tested])):
        r["p_value_holm"] = q
    return {"score": sa["score"], "sets": rows}


def _balanced(folder: Path) -> bool:
    """Whether a run of ``folder`` was calibrated with ``--balance-classes``, which changes its
    predictions from those its training's figures were measured with."""
    from .calibrate import CALIBRATION_FILE
    from .export import runs_of

    for run in runs_of(folder):
        try:
            levels = json.loads((run / CALIBRATION_FILE).read_text()).get("by_tta", {})
        except (OSError, ValueError, AttributeError):
            continue  # no file, or a damaged one: the commands that use it say so
        if any(isinstance(e, dict) and e.get("balance_classes") for e in levels.values()):
            return True
    return False


def format_run_sets(c: dict[str, Any]) -> str:
    """The comparison of two ``--runs`` folders as ``cifarlab compare`` prints it."""
    lines = []
    for name in "AB":
        s = c[name.lower()]
        acc = s["test_accuracy"]
        lines.append(f"{name}: {s['folder']} ({s['recipe']}, {s['model']}): {s['runs']} runs, test accuracy mean "
                     f"{acc['mean']:.4f} (std {acc['std']:.4f}, min {acc['min']:.4f}, max {acc['max']:.4f}); "
                     f"training time mean {s['train_time_s']['mean']:.2f} s")
    verdict = (f"{'B' if c['difference'] > 0 else 'A'} is the more accurate recipe on this data (p < {c['alpha']:g})"
               if c["p_value"] < c["alpha"] else f"no difference at the {c['alpha']:g} level across these runs")
    ratio = f"; B's training time is {c['time_ratio']:.2f} times A's" if c["time_ratio"] is not None else ""
    lines += [f"B - A: {c['difference']:+.4f} in mean test accuracy{ratio}",
              f"Welch's t-test on the runs' accuracies: p = {c['p_value']:.3g}; {verdict}"]
    if c.get("ensemble_difference") is not None:  # quoted, not tested: that takes the data and both ensembles
        lines.append(f"Their ensembles (the mean of each folder's runs' probabilities, uncalibrated, as training "
                     f"tested them): A {c['a']['ensemble_accuracy']:.4f}, B {c['b']['ensemble_accuracy']:.4f}, "
                     f"B - A {c['ensemble_difference']:+.4f}; not tested here, as a difference of two models: "
                     f"cifarlab compare {c['a']['folder']} {c['b']['folder']} --ensembles tests it image by image")
    if c.get("per_class"):
        width = max([16, *(len(r["class"]) + 2 for r in c["per_class"])])
        lines.append(f"{'class':<{width}}{'A mean':>8}{'B mean':>8}{'B - A':>9}{'p (Holm)':>10}")
        for r in c["per_class"]:
            mark = " *" if r["p_value_holm"] < c["alpha"] else ""
            lines.append(f"{r['class']:<{width}}{r['mean_a']:>8.4f}{r['mean_b']:>8.4f}{r['difference']:>+9.4f}"
                         f"{r['p_value_holm']:>10.3g}{mark}")
        lines.append(f"* differs at the {c['alpha']:g} level after Holm's correction over the classes (Welch's "
                     f"test on each class's accuracy over the runs; with few runs it finds only large differences)")
    elif c.get("per_class_note"):
        lines.append(f"Per class: not compared; {c['per_class_note']}")
    rob = c.get("robustness")
    if rob and "note" in rob:
        lines.append(f"Under corruption: not compared; {rob['note']}")
    elif rob:
        p = rob["p_value"]
        lines.append(f"Under corruption (cifarlab robustness, {rob['corruptions']} corruptions at severities "
                     f"{', '.join(map(str, rob['severities']))}, the same images): A mean {rob['a']['mean']:.4f} (min "
                     f"{rob['a']['min']:.4f}, max {rob['a']['max']:.4f}), B mean {rob['b']['mean']:.4f} (min "
                     f"{rob['b']['min']:.4f}, max {rob['b']['max']:.4f}); B - A {rob['difference']:+.4f}"
                     + (f"; Welch's t-test p = {p:.3g}" if p is not None else ""))
    ood = c.get("unfamiliar_images")
    if ood and "note" in ood:
        lines.append(f"Unfamiliar images: not compared; {ood['note']}")
    elif ood:
        lines.append(f"Unfamiliar images (cifarlab ood, {ood['score']} AUROC over the runs, mean (min to max), the "
                     "same images): " + "; ".join(
                         f"{r['set']}: A {_fmt_spread(r['a'])}, B {_fmt_spread(r['b'])}, B - A {r['difference']:+.3f}"
                         + (f", p (Holm) {r['p_value_holm']:.3g}" if "p_value_holm" in r else "") for r in ood["sets"]))
    for folder in c.get("balanced_runs", []):
        lines.append(f"Note: runs of {folder} were calibrated with --balance-classes, which changes their "
                     "predictions; these figures are training's, without it. Compare two single runs, or evaluate "
                     "each folder (cifarlab evaluate FOLDER), for the balanced figures.")
    if not c["same_data"]:  # the same data may have been named by two paths: a note, not a refusal
        lines.append(f"Note: A was tested on {c['a']['data']} and B on {c['b']['data']}; the comparison holds only "
                     "if these are the same test images.")
    return "\n".join(lines)


def _paired_ood_lines(u: dict[str, Any] | None, alpha: float) -> list[str]:
    """The lines of :func:`paired_ood`'s figures in ``cifarlab compare``'s output."""
    if not u:
        return []
    if "note" in u:
        return [f"Unfamiliar images: not compared; {u['note']}"]
    lines = [f"Unfamiliar images (cifarlab ood, {u['score']} score): AUROC of telling each set from the "
             f"{u['test_images']:,} test images; DeLong's paired test, p Holm-adjusted over the sets"]
    for r in u["sets"]:
        lines.append(f"  {r['set']} ({r['images']:,} images): A {r['auroc_a']:.4f}, B {r['auroc_b']:.4f}, B - A "
                     f"{r['difference']:+.4f} (standard error {r['se']:.4f}), p (Holm) "
                     + (f"{r['p_value_holm']:.3g}" if r["p_value_holm"] > 0 else "< 1e-300")  # below a double's range
                     + (" *" if r["p_value_holm"] < alpha else ""))
    a, b = u["unpaired"]["a"], u["unpaired"]["b"]
    if a or b:
        lines.append("  not compared, each scored on other images (another --seed, --count or source): "
                     + "; ".join(f"{name}'s {', '.join(sets)}" for name, sets in (("A", a), ("B", b)) if sets))
    return lines


def format_comparison(c: dict[str, Any]) -> str:
    """The comparison as the lines ``cifarlab compare`` prints."""
    def pct(x: float) -> str:
        return f"{x:+.4f}"

    lo, hi = c["difference_ci"]
    p = c["p_value"]
    verdict = (f"{'B' if c['difference'] > 0 else 'A'} is the more accurate on these images (p < {c['alpha']:g})"
               if p < c["alpha"] else f"no difference at the {c['alpha']:g} level: a split this uneven is common "
               "by chance")
    def side(name: str) -> str:
        s = c[name.lower()]
        return (f"{name}: {s['run']} ({s['model']}, tta {s['tta']}"
                + (", classes balanced by calibrate" if s.get("balanced_classes") else "")
                + f"): test accuracy {c['accuracy_' + name.lower()]:.4f}")

    lines = [side("A"), side("B"),
             f"B - A: {pct(c['difference'])} (95% interval {pct(lo)} to {pct(hi)}; paired bootstrap, "
             f"{c['bootstrap']} resamples)",
             f"On {c['images']:,} test images of {c['data']}: both right {c['both_right']:,}, only A {c['only_a']:,}, "
             f"only B {c['only_b']:,}, both wrong {c['both_wrong']:,}; same prediction on {c['agreement']:.1%}",
             f"McNemar's exact test: p = {p:.3g}; {verdict}"]

    def table(key: str, rows: list[dict]) -> None:
        width = max([16, *(len(str(r[key])) + 2 for r in rows)])
        lines.append(f"{key:<{width}}{'images':>8}{'A':>8}{'B':>8}{'B - A':>9}{'only A':>8}{'only B':>8}"
                     f"{'p (Holm)':>10}")
        for r in rows:
            mark = " *" if r["p_value_holm"] < c["alpha"] else ""
            lines.append(f"{r[key]:<{width}}{r['support']:>8}{r['accuracy_a']:>8.4f}{r['accuracy_b']:>8.4f}"
                         f"{pct(r['difference']):>9}{r['only_a']:>8}{r['only_b']:>8}{r['p_value_holm']:>10.3g}{mark}")

    table("class", c["per_class"])
    for attr, a in c.get("by_attribute", {}).items():
        lines.append(f"Attribute '{attr}'" + (f" (not recorded for {images_phrase(a['not_recorded'])}, left out)"
                                              if a["not_recorded"] else "") + ":")
        table("group", a["groups"])
    lines += _paired_ood_lines(c.get("unfamiliar_images"), c["alpha"])
    lines.append(f"* differs at the {c['alpha']:g} level after Holm's correction over the classes (over the groups "
                 "of each attribute, over the sets of unfamiliar images). These are two trained models on one test "
                 "set; seeds alone move accuracy, so "
                 "to compare recipes, train each with --runs N and compare the two folders.")
    return "\n".join(lines)
