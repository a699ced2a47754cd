"""How a trained model copes with worse images than its test split: accuracy and calibration
under common corruptions (noise, blur, weather, digital artefacts) at five severities, overall,
by corruption and by class.

A test split shares its training data's cameras and care; photos in use are noisier, blurrier,
darker, more compressed. Following Hendrycks and Dietterich (2019), the test images are
corrupted (see :mod:`cifarlab.corruptions`), or the published CIFAR-10-C / CIFAR-100-C files are
read, and the model is evaluated on each corruption and severity. Calibration is reported too,
since confidence is known to fit worse under such shifts (Ovadia et al., 2019).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .corruptions import CORRUPTIONS, PUBLISHED, PUBLISHED_BENCHMARK, SEVERITIES, corrupt
from .data import Dataset
from .errors import ConfigError, DataError, did_you_mean
from .evaluate import _check_compatible, calibration, describe
from .export import Ensemble, Predictor, ensemble_probabilities, list_to_csv_rows, load_model
from .fsutil import report_folder, write_json, write_text


def choose_corruptions(names: str | list[str] | None, published: bool = False) -> list[str]:
    """The corruptions to run: by default the benchmark's (those generated here, or with
    ``published`` all fifteen of the published files'); ``"all"`` adds the held-out ones; else
    the names given (a list or comma-separated), each checked."""
    known = PUBLISHED if published else list(CORRUPTIONS)
    if names is None:
        return list(PUBLISHED_BENCHMARK) if published else [n for n, c in CORRUPTIONS.items() if c.benchmark]
    if names == "all" or names == ["all"]:
        return list(known)
    chosen = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for n in chosen:
        if n not in known:
            raise ConfigError(f"unknown corruption '{n}'{did_you_mean(n, known)}; valid: {', '.join(known)}, or all")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"corruptions {', '.join(chosen) or '(none)'}: give each one once")
    return chosen


def check_severities(severities: str | list[int] | None) -> list[int]:
    """Severities 1 to 5 (default all), as a list or a comma-separated string, each checked."""
    if severities is None:
        return list(SEVERITIES)
    items = severities.split(",") if isinstance(severities, str) else list(severities)
    out = []
    for s in items:
        whole = isinstance(s, int) and not isinstance(s, bool) or isinstance(s, str) and s.strip().isdigit()
        v = int(s) if whole else None
        if v not in SEVERITIES or v in out:
            raise ConfigError(f"severity '{s}' is not valid; give each of 1 to 5 at most once, e.g. 1,3,5")
        out.append(v)
    return out


def image_subset(n_test: int, images: int | None, seed: int) -> np.ndarray | None:
    """Indices of a random ``images`` test images (sorted; None for all), drawn from ``seed``:
    a quicker, rougher measurement."""
    if images is None:
        return None
    if isinstance(images, bool) or not isinstance(images, int) or not 0 < images:
        raise ConfigError(f"--images {images!r} must be a positive whole number of test images")
    if images >= n_test:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_test, images, replace=False))


def check_options(corruptions=None, severities=None, images: int | None = None, seed: int = 0,
                  published: bool = False) -> tuple[list[str], list[int]]:
    """The corruptions and severities chosen, after checking every option (before any data is
    read): see :func:`choose_corruptions`, :func:`check_severities`, :func:`image_subset`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed {seed!r} must be a whole number, 0 or more")
    image_subset(1, images, seed)
    return choose_corruptions(corruptions, published), check_severities(severities)


class PublishedCorruptions:
    """The published CIFAR-10-C or CIFAR-100-C files: a folder of ``NAME.npy`` (uint8, five
    severities' test images one after another) and ``labels.npy``, or the ``.tar`` they come
    in. Read with ``allow_pickle=False``: the files are plain arrays, never code."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"corrupted data '{path}' does not exist; give the CIFAR-10-C (or CIFAR-100-C) folder "
                            "of NAME.npy and labels.npy files, or its .tar")
        self._tar = None
        if self.path.is_file():
            try:
                self._tar = tarfile.open(self.path)  # noqa: SIM115 (closed by close(), after the last read)
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"corrupted data '{path}' is neither a folder nor a readable tar archive ({e})") \
                    from None
            self._members = {Path(m.name).name: m for m in self._tar.getmembers()
                             if m.isfile() and m.name.endswith(".npy")}
        else:
            self._members = {p.name: p for p in self.path.glob("*.npy")}
        if "labels.npy" not in self._members:
            raise DataError(f"corrupted data '{path}' has no labels.npy; expected the CIFAR-10-C layout (NAME.npy "
                            "for each corruption, and labels.npy)")
        labels = self._read("labels.npy")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{self._where('labels.npy')} holds {labels.dtype} values; expected whole-number class "
                            "labels")
        self.labels = labels.astype(np.int64)
        if self.labels.ndim != 1 or len(self.labels) % len(SEVERITIES):
            raise DataError(f"{self._where('labels.npy')} has shape {self.labels.shape}; expected one label per image "
                            f"for {len(SEVERITIES)} severities ({len(SEVERITIES)} x the test images)")
        self.per_severity = len(self.labels) // len(SEVERITIES)

    def close(self) -> None:
        """Close the archive, where the files are read from one."""
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> PublishedCorruptions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self, name: str) -> str:
        return f"'{self.path}'" + (f" member {self._members[name].name}" if self._tar else f"/{name}")

    def _read(self, name: str) -> np.ndarray:
        try:
            if self._tar is not None:
                with self._tar.extractfile(self._members[name]) as f:  # numpy needs a real file or bytes
                    x = np.load(io.BytesIO(f.read()), allow_pickle=False)
            else:
                x = np.load(self._members[name], allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {self._where(name)} as a numpy array: {e}") from None
        if not isinstance(x, np.ndarray):  # a zip of arrays (np.savez's) under an .npy name
            x.close()
            raise DataError(f"{self._where(name)} is an .npz archive of arrays ({', '.join(x.files)}); expected one "
                            "array, as np.save writes it")
        return x

    def available(self) -> list[str]:
        """The corruptions whose files are there."""
        return [n for n in PUBLISHED if f"{n}.npy" in self._members]

    def images(self, name: str, classes: int, shape: tuple[int, int, int]) -> np.ndarray:
        """All five severities' images of corruption ``name``, checked against the labels, the
        model's input ``shape`` (H, W, C) and its number of ``classes``."""
        if f"{name}.npy" not in self._members:
            raise DataError(f"corrupted data '{self.path}' has no {name}.npy; it has: "
                            f"{', '.join(self.available()) or 'none'}")
        x = self._read(f"{name}.npy")
        if x.dtype != np.uint8 or x.shape != (len(self.labels), *shape):
            raise DataError(f"{self._where(f'{name}.npy')} holds {x.dtype} images of shape {x.shape}; expected "
                            f"uint8 {(len(self.labels), *shape)} (the model's input, one per label)")
        if self.labels.min() < 0 or self.labels.max() >= classes:
            raise DataError(f"{self._where('labels.npy')} has labels {self.labels.min()} to {self.labels.max()}; "
                            f"the model has {classes} classes (0 to {classes - 1})")
        return x


def _cells(ds: Dataset, names: list[str], severities: list[int], seed: int, subset: np.ndarray | None,
           published: PublishedCorruptions | None, shape: tuple[int, int, int], classes: int
           ) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """(corruption, severity, images, labels) for each cell, made or read one at a time so that
    only one cell's images are in memory."""
    for name in names:
        if published is not None:
            x_all, n = published.images(name, classes, shape), published.per_severity
        for s in severities:
            if published is not None:
                idx = np.arange((s - 1) * n, s * n) if subset is None else (s - 1) * n + subset
                yield name, s, np.ascontiguousarray(x_all[idx]), published.labels[idx]
            else:
                x = ds.x_test if subset is None else ds.x_test[subset]
                y = ds.y_test if subset is None else ds.y_test[subset]
                # a seed of its own per cell (distinct for every seed, corruption and severity), so
                # that a cell's images do not depend on which others ran
                yield name, s, corrupt(x, name, s, seed=seed * 1000 + PUBLISHED.index(name) * 10 + s), y


def _scores(probs: np.ndarray, y: np.ndarray, classes: int) -> dict[str, Any]:
    pred = probs.argmax(1)
    counts = np.bincount(y, minlength=classes)
    hits = np.bincount(y[pred == y], minlength=classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, hits / counts, np.nan)
    return {"accuracy": float((pred == y).mean()), "ece": calibration(probs, y)["ece"], "per_class": per_class}


def measure(predictors: list[Predictor], ds: Dataset, names: list[str], severities: list[int], seed: int = 0,
            images: int | None = None, published: PublishedCorruptions | None = None,
            log: Callable[[str], None] = print, ensemble=None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Each predictor's accuracy and calibration error on ``ds``'s test images, clean and with
    each corruption in ``names`` at each of ``severities`` (generated from ``seed``, or read
    from ``published``): one report per predictor (see :func:`robustness_run`), and the first
    test image clean and in each cell, a row per corruption. Each cell's images are made once
    for all the predictors. ``ensemble`` (a :class:`cifarlab.export.Ensemble` of the
    predictors) adds its report last, from the predictors' probabilities: no pass of its own."""
    classes = len(ds.classes)
    shape = ds.x_test.shape[1:]
    subset = image_subset(len(ds.y_test) if published is None else published.per_severity, images, seed)
    if published is not None and (missing := [n for n in names if n not in published.available()]):
        raise DataError(f"corrupted data '{published.path}' has no file for {', '.join(missing)}; it has: "
                        f"{', '.join(published.available()) or 'none'}")
    # The published files were made from the official test split; where these are its images (the
    # labels agree), the clean figures are of the same images as the corrupted ones, else of the
    # whole test split, and the report says so.
    same = published is None or bool(published.per_severity == len(ds.y_test)
                                      and np.array_equal(published.labels[:len(ds.y_test)], ds.y_test))
    x_clean, y_clean = (ds.x_test, ds.y_test) if subset is None or not same else (ds.x_test[subset], ds.y_test[subset])
    measured = predictors + ([ensemble] if ensemble is not None else [])

    def scores(x: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
        probs = [p.predict(x) for p in predictors]
        return [_scores(q, y, classes) for q in probs + ([ensemble.combine(probs)] if ensemble is not None else [])]

    clean = scores(x_clean, y_clean)
    cells: list[list[dict[str, Any]]] = [[] for _ in measured]
    total = len(names) * len(severities)
    first: dict[str, list[np.ndarray]] = {}  # the first image of each cell, to show what was measured
    for k, (name, s, x, y) in enumerate(_cells(ds, names, severities, seed, subset, published, shape, classes), 1):
        first.setdefault(name, []).append(x[0].copy())  # a view would keep the whole cell alive
        for out, sc in zip(cells, scores(x, y)):
            out.append({"corruption": name, "severity": s, **sc})
        runs = cells[:len(predictors)]
        log(f"[{k}/{total}] {name} {s}: accuracy " + ", ".join(f"{c[-1]['accuracy']:.4f}" for c in runs)
            + (f"; their ensemble {cells[-1][-1]['accuracy']:.4f}" if ensemble is not None else ""))
    source = ({"kind": "published", "path": str(published.path), "same_images_as_test_split": same}
              if published is not None else {"kind": "generated", "seed": seed})
    reports = [_report(p, ds, c, cl, names, severities, source, len(y_clean) if published is None else
                       (published.per_severity if subset is None else len(subset)))
               for p, c, cl in zip(measured, cells, clean)]
    # the clean image beside its corrupted copies (for published files of other images, the test
    # split's first image, which is then not theirs)
    examples = np.stack([im for n in names for im in (x_clean[0], *first[n])])
    return reports, examples


def _report(pred: Predictor, ds: Dataset, cells: list[dict], clean: dict, names: list[str], severities: list[int],
            source: dict, n_images: int) -> dict[str, Any]:
    from .calibrate import weights_digest

    acc = np.array([c["accuracy"] for c in cells])
    per_class = np.nanmean(np.stack([c["per_class"] for c in cells]), axis=0)
    by_name = [{"name": n, "category": CORRUPTIONS[n].category if n in CORRUPTIONS else _published_category(n),
                "accuracy": float(np.mean([c["accuracy"] for c in cells if c["corruption"] == n])),
                "by_severity": [c["accuracy"] for c in cells if c["corruption"] == n]} for n in names]
    worst = min(cells, key=lambda c: c["accuracy"])
    classes = [{"class": name, "clean": _num(clean["per_class"][i]), "corrupted": _num(per_class[i]),
                "drop": _num(clean["per_class"][i] - per_class[i])} for i, name in enumerate(pred.classes)]
    if isinstance(pred, Ensemble):  # an ensemble: its folder, its temperature, and each run's weights
        about = {"run": str(pred.folder), "ensemble_of": [str(m.run) for m in pred.members],
                 "probabilities": ensemble_probabilities(pred.temperature()),
                 "tta": pred.tta, "temperature": pred.temperature(),
                 "weights_sha256": [weights_digest(m.run) for m in pred.members]}
    else:
        about = {"run": str(pred.run), "tta": pred.tta, "temperature": pred.temperature(),
                 "class_offsets": pred.class_offsets(),
                 "weights_sha256": weights_digest(pred.run) if pred.run else None}
    return {
        **about, "data": ds.source, "source": source,
        "images_per_cell": n_images, "severities": severities,
        "clean": {"accuracy": clean["accuracy"], "ece": clean["ece"]},
        "mean_accuracy": float(acc.mean()), "relative_accuracy": float(acc.mean() / clean["accuracy"])
        if clean["accuracy"] else None,
        "mean_ece": float(np.mean([c["ece"] for c in cells])),
        "worst": {"corruption": worst["corruption"], "severity": worst["severity"], "accuracy": worst["accuracy"]},
        "corruptions": by_name,
        "cells": [{k: v for k, v in c.items() if k != "per_class"} for c in cells],
        "per_class": classes,
    }


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


_PUBLISHED_ONLY = {"motion_blur": "blur", "snow": "weather", "frost": "weather", "elastic_transform": "digital",
                   "spatter": "digital"}


def _published_category(name: str) -> str:
    return _PUBLISHED_ONLY[name]


def robustness_run(run: str | Path, ds: Dataset, out: str | Path | None = None, corruptions=None, severities=None,
                   seed: int = 0, images: int | None = None, corrupted_data: str | Path | None = None,
                   tta: str | None = None, device: str = "auto", uncalibrated: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure a run's accuracy and expected calibration error on ``ds``'s test images, clean
    and under each of ``corruptions`` (default: the benchmark's; see :func:`choose_corruptions`)
    at each of ``severities`` (default 1 to 5), generated with ``seed`` or, with
    ``corrupted_data``, read from the published CIFAR-10-C files. ``images``: a random subset of
    that many test images (quicker, rougher). Writes ``robustness.json``, ``robustness.csv`` and
    ``robustness.png`` into ``out`` (default ``RUN/robustness``, or ``RUN/robustness-<data>`` on
    other data than the run's own: :func:`cifarlab.export.other_data_folder`), which ``cifarlab
    audit``'s model card then quotes; returns the report. The run's test-time augmentation and
    calibration are used, as in ``cifarlab evaluate``."""
    from .export import default_report_folder

    out = Path(out) if out is not None else default_report_folder(run, "robustness", ds)
    names, sev = check_options(corruptions, severities, images, seed, corrupted_data is not None)
    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    with _published(corrupted_data) as published, report_folder(out):
        reports, examples = measure([pred], ds, names, sev, seed, images, published, log)
        write_files(reports[0], out, examples)
    return reports[0]


def _published(path: str | Path | None):
    """The published files at ``path`` as a context that closes them, or None for none."""
    import contextlib

    return PublishedCorruptions(path) if path is not None else contextlib.nullcontext()


def robustness_runs(base: str | Path, ds: Dataset, out: str | Path | None = None, corruptions=None,
                    severities=None, seed: int = 0, images: int | None = None,
                    corrupted_data: str | Path | None = None, tta: str | None = None, device: str = "auto",
                    uncalibrated: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`robustness_run` for every run of the ``--runs N`` folder ``base`` on the same
    corrupted images, each report into ``RUN/robustness`` (or ``out/run-K``), and the spread
    over the runs in ``robustness_summary.json`` (in ``out``, by default ``base``, or
    ``base/robustness-<data>`` on other data than the runs' own: :func:`cifarlab.export.other_data_folder`)."""
    from .export import Ensemble, ensemble_calibration, finished_runs, other_data_folder

    base = Path(base)
    names, sev = check_options(corruptions, severities, images, seed, corrupted_data is not None)
    runs = finished_runs(base)
    out = Path(out) if out is not None else other_data_folder(base, "robustness", ds, runs)
    own = ensemble_calibration(base, runs, tta, uncalibrated)  # a stale one is refused before any run loads
    preds = [load_model(r, device, tta, uncalibrated) for r in runs]
    for p in preds:
        _check_compatible(p, ds)
    with _published(corrupted_data) as published:
        reports, examples = measure(preds, ds, names, sev, seed, images, published, log,
                                    ensemble=Ensemble(preds, base, own))
    *reports, ensemble = reports
    for r, rep in zip(runs, reports):
        folder = (out / r.name) if out else r / "robustness"
        with report_folder(folder):
            write_files(rep, folder, examples)
    summary = summarise_robustness(reports)
    # the model predict serves for the folder, measured on the same images (its cells in the summary)
    summary["ensemble"] = {k: v for k, v in ensemble.items() if k not in ("data", "source", "severities",
                                                                          "images_per_cell")}
    write_json((out or base) / "robustness_summary.json", summary)
    return summary


def summarise_robustness(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The spread over runs measured alike (:func:`robustness_run`'s reports, one per run):
    clean and corrupted accuracy and calibration error, each corruption's accuracy and each
    class's loss as mean, std, min and max, and each run's figures and weights' digest."""
    first = reports[0]
    return {
        "runs": len(reports), "data": first["data"], "source": first["source"], "severities": first["severities"],
        "images_per_cell": first["images_per_cell"], "tta": sorted({r["tta"] for r in reports}),
        "clean_accuracy": describe([r["clean"]["accuracy"] for r in reports]),
        "mean_accuracy": describe([r["mean_accuracy"] for r in reports]),
        "relative_accuracy": _spread([r["relative_accuracy"] for r in reports]),
        "clean_ece": describe([r["clean"]["ece"] for r in reports]),
        "mean_ece": describe([r["mean_ece"] for r in reports]),
        "corruptions": [{"name": c["name"], "accuracy": describe([r["corruptions"][i]["accuracy"] for r in reports])}
                        for i, c in enumerate(first["corruptions"])],
        "per_class_drop": [{"class": c["class"], "drop": _spread([r["per_class"][i]["drop"] for r in reports])}
                           for i, c in enumerate(first["per_class"])],
        "per_run": [{"run": r["run"], "clean_accuracy": r["clean"]["accuracy"], "mean_accuracy": r["mean_accuracy"],
                     "weights_sha256": r["weights_sha256"], "temperature": r["temperature"],
                     "class_offsets": r["class_offsets"]} for r in reports],
    }


def _spread(values: list[float | None]) -> dict[str, float] | None:
    """:func:`describe` of the defined values (a class without test images has none)."""
    defined = [v for v in values if v is not None]
    return describe(defined) if defined else None


def write_files(report: dict[str, Any], out: Path, examples: np.ndarray | None = None) -> None:
    """``robustness.json``, ``robustness.csv`` (one row per corruption and severity),
    ``robustness.png`` (accuracy by corruption and severity) and, given ``examples`` (from
    :func:`measure`), ``examples.png`` into ``out``."""
    from .plots import image_grid, plot_robustness

    names, sev = [c["name"] for c in report["corruptions"]], report["severities"]
    write_json(out / "robustness.json", report)
    write_text(out / "robustness.csv", list_to_csv_rows(report["cells"]))
    plot_robustness(names, sev, np.array([c["by_severity"] for c in report["corruptions"]]),
                    report["clean"]["accuracy"], report["mean_accuracy"], out / "robustness.png")
    if examples is not None:
        image_grid(examples, [t for n in names for t in ("clean", *(f"{n} {s}" for s in sev))],
                   out / "examples.png", cols=len(sev) + 1)


def format_report(r: dict[str, Any]) -> str:
    """The report as a table for the terminal: accuracy by corruption and severity, then the
    summary figures and the classes that lost most."""
    sev = r["severities"]
    lines = [f"{'corruption':<18}{'category':<10}" + "".join(f"{s:>8}" for s in sev) + f"{'mean':>8}"]
    for c in r["corruptions"]:
        lines.append(f"{c['name']:<18}{c['category']:<10}" + "".join(f"{a:>8.4f}" for a in c["by_severity"])
                     + f"{c['accuracy']:>8.4f}")
    cl, w = r["clean"], r["worst"]
    rel = f" ({r['relative_accuracy']:.1%} of clean)" if r["relative_accuracy"] is not None else ""
    lines += [f"clean accuracy {cl['accuracy']:.4f}; under corruption, mean {r['mean_accuracy']:.4f}{rel}; worst "
              f"{w['corruption']} at severity {w['severity']}: {w['accuracy']:.4f}",
              f"expected calibration error: clean {cl['ece']:.4f}, under corruption mean {r['mean_ece']:.4f}"]
    drops = sorted((c for c in r["per_class"] if c["drop"] is not None), key=lambda c: -c["drop"])
    if drops:
        lines.append("accuracy lost most by class: " + ", ".join(
            f"{c['class']} {c['clean']:.3f} -> {c['corrupted']:.3f}" for c in drops[:3]))
    src = r["source"]
    lines.append(f"images: {r['images_per_cell']:,} per cell, " + (
        f"corrupted here from the test split (seed {src['seed']})" if src["kind"] == "generated" else
        f"the published files in {src['path']}" + ("" if src["same_images_as_test_split"] else
                                                   " (not the same images as the clean test split)")))
    return "\n".join(lines)


def format_runs(s: dict[str, Any], folder: Path, reports: Path | None = None) -> str:
    """A ``--runs N`` summary for the terminal: the spread over the runs, whose summary is in
    ``folder`` and reports in ``reports/run-K`` (each run's robustness folder where None)."""
    def spread(d: dict[str, float]) -> str:
        return f"mean {d['mean']:.4f} (min {d['min']:.4f}, max {d['max']:.4f})"

    lines = [f"{r['run']}: clean accuracy {r['clean_accuracy']:.4f}, under corruption {r['mean_accuracy']:.4f}"
             for r in s["per_run"]]
    lines += [f"{s['runs']} runs: clean accuracy {spread(s['clean_accuracy'])}; under corruption "
              f"{spread(s['mean_accuracy'])}; relative {spread(s['relative_accuracy'])}",
              f"expected calibration error: clean {spread(s['clean_ece'])}, under corruption {spread(s['mean_ece'])}",
              "by corruption: " + ", ".join(f"{c['name']} {c['accuracy']['mean']:.4f}"
                                             for c in sorted(s["corruptions"], key=lambda c: c["accuracy"]["mean"]))]
    drops = sorted((c for c in s["per_class_drop"] if c["drop"]), key=lambda c: -c["drop"]["mean"])
    if drops:
        lines.append("accuracy lost by class, mean over the runs: " + ", ".join(
            f"{c['class']} {c['drop']['mean']:.3f}" for c in drops[:3]))
    e = s.get("ensemble")
    if e:
        rel = f" ({e['relative_accuracy']:.1%} of clean)" if e["relative_accuracy"] is not None else ""
        lines.append(f"their ensemble (probabilities: the {e['probabilities']}): clean accuracy "
                     f"{e['clean']['accuracy']:.4f}, under corruption {e['mean_accuracy']:.4f}{rel}; expected "
                     f"calibration error clean {e['clean']['ece']:.4f}, under corruption {e['mean_ece']:.4f}")
    lines.append(f"each run's report in {f'{reports}/run-K' if reports else 'its robustness folder'}; summary in "
                 f"{folder / 'robustness_summary.json'}")
    return "\n".join(lines)


def list_corruptions() -> str:
    """The corruptions, their categories, and which are the benchmark's, for ``--list``."""
    lines = ["generated here (the benchmark's unless marked held out):"]
    lines += [f"  {n:<18}{c.category}" + ("" if c.benchmark else "  (held out)") for n, c in CORRUPTIONS.items()]
    lines.append("only in the published CIFAR-10-C / CIFAR-100-C files (--corrupted-data): "
                 + ", ".join(n for n in PUBLISHED if n not in CORRUPTIONS))
    return "\n".join(lines)


def read_runs_summary(folder: str | Path, name: str | None = None) -> dict[str, Any] | None:
    """``folder``'s ``robustness_summary.json`` (``cifarlab robustness`` of a ``--runs N``
    folder), or that of its subfolder ``name`` (``robustness-<data>``, measured on other data),
    as ``{"summary": ...}`` where every run still holds the weights it measured, else
    ``{"note": why not}``; None where there is none."""
    from .calibrate import read_runs_summary_file

    folder = Path(folder)
    path = folder / name / "robustness_summary.json" if name else folder / "robustness_summary.json"
    return read_runs_summary_file(path, folder, "cifarlab robustness", lambda s: None if isinstance(
        s.get("corruptions"), list) and "mean_accuracy" in s else "corruptions")


def read_robustness(run: str | Path, tta: str, temperature: float | None = None,
                    class_offsets: tuple[float, ...] | None = None, name: str = "robustness") -> dict[str, Any] | None:
    """The run's ``robustness/robustness.json`` (or ``name/robustness.json``: ``robustness-<data>``
    on other data) where it was measured with these weights, test-time augmentation ``tta`` and
    calibration (``temperature`` and ``class_offsets``, None for none); None otherwise, or where
    it is unreadable: what the model card quotes."""
    from .calibrate import read_current_report

    r = read_current_report(Path(run) / name / "robustness.json", run, tta, temperature, class_offsets)
    return r if r is not None and isinstance(r.get("corruptions"), list) else None
