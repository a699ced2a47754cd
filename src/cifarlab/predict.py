"""``cifarlab predict``: top-k classes for image files, robust to bad files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .data.images import IMAGE_SUFFIXES, is_image_name, open_image, to_array
from .errors import CifarlabError
from .export import Ensemble, Predictor, ensemble_probabilities, load_classifier
from .ood import predict_familiarity, read_rule


def _expand(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to predict, folders searched for image files; and a failure for each folder
    that holds none (a wrong folder should not pass as an empty result)."""
    files: list[Path] = []
    empty: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_name(f.name))
            if not found:
                empty.append((str(p), f"{p}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"))
            files += found
        else:
            files.append(p)
    return files, empty


# the JSON document's start, before its first prediction
_JSON_HEAD = '{\n  "predictions": ['
CHUNK_FILES = 4096  # files read and predicted at a time: memory stays bounded, and rows appear as made


class _Output:
    """Writes predictions as they come, in ``fmt``: a table or CSV row by row; JSON as one
    document whose predictions are written one by one, laid out as ``json.dump(doc, indent=2)``
    would lay it out, so a large folder's results are never all held at once."""

    def __init__(self, fmt: str, out, width: int, min_confidence: float | None,
                 unfamiliar: dict | None = None, sets: dict | None = None) -> None:
        self.fmt, self.out, self.width, self.min_confidence = fmt, out, width, min_confidence
        self.unfamiliar_rule = unfamiliar  # the score and threshold of cifarlab ood, where asked for
        self.sets = sets  # the prediction sets' coverage and whether by class, where asked for
        self.count = self.uncertain = self.unfamiliar = self.set_sizes = self.empty_sets = 0
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv:
            # the uncertain, unfamiliar and set columns only where asked for: the plain layout stays as it was
            self.csv.writerow(["file", "rank", "class", "probability"] + (["uncertain"] if self.marked else [])
                              + (["unfamiliar"] if unfamiliar else []) + (["set"] if sets else []))
        elif fmt == "json":
            out.write(_JSON_HEAD)

    @property
    def marked(self) -> bool:
        return self.min_confidence is not None

    def add(self, r: dict) -> None:
        self.count += 1
        self.uncertain += bool(r.get("uncertain"))
        self.unfamiliar += bool(r.get("unfamiliar"))
        if self.sets:
            self.set_sizes += len(r["set"])
            self.empty_sets += not r["set"]
        if self.fmt == "json":
            item = json.dumps(r, indent=2).replace("\n", "\n    ")  # at the list's depth
            self.out.write(f"{',' if self.count > 1 else ''}\n    {item}")
        elif self.csv:
            for k, t in enumerate(r["top"], 1):
                self.csv.writerow([r["file"], k, t["class"], f"{t['probability']:.6f}"]
                                  + ([str(r["uncertain"]).lower()] if self.marked else [])
                                  + ([str(r["unfamiliar"]).lower()] if self.unfamiliar_rule else [])
                                  + (["|".join(r["set"])] if self.sets else []))
        else:
            tops = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            marks = "".join(f"{m}: " for m in ("unfamiliar", "uncertain") if r.get(m))
            in_set = f"  set {{{', '.join(r['set'])}}}" if self.sets else ""
            self.out.write(f"{r['file']:<{self.width}}  {marks}{tops}{in_set}\n")

    def finish(self, failures: list[tuple[str, str]], about: dict) -> None:
        """The JSON document's end, or the table's closing lines; ``about`` says where the
        probabilities came from (:func:`_about`)."""
        if self.fmt == "json":
            rest = json.dumps({"predictions": [], "errors": [{"file": f, "error": e} for f, e in failures],
                               **about, "min_confidence": self.min_confidence,
                               **({"unfamiliar_below": self.unfamiliar_rule} if self.unfamiliar_rule else {}),
                               **({"prediction_sets": self.sets} if self.sets else {})},
                              indent=2)
            # the rest of the document as json.dump would lay it out after an empty list
            self.out.write(("\n  ]" if self.count else "]") + rest.removeprefix(_JSON_HEAD + "]") + "\n")
        elif self.fmt == "table" and "runs" in about:
            runs = about["runs"]
            t = about["ensemble_temperature"]
            self.out.write(f"the probabilities are the mean of the {len(runs)} runs' in {Path(runs[0]).parent}"
                           + ("" if t is None else f", calibrated with their ensemble's temperature {t:.4g}") + "\n")
        if self.fmt == "table" and self.marked:
            self.out.write(f"{self.uncertain} of {self.count} image(s) below confidence "
                           f"{self.min_confidence:g}: uncertain\n")
        if self.fmt == "table" and self.sets and self.count:
            per = " of each class" if self.sets["by_class"] else ""
            self.out.write(f"prediction sets of coverage {self.sets['coverage']:g}{per} (cifarlab calibrate --sets): "
                           f"mean size {self.set_sizes / self.count:.2f}, {self.empty_sets} of {self.count} empty; "
                           "they hold the true class at least that often for images drawn as the validation images "
                           "were, not for images from elsewhere\n")
        if self.fmt == "table" and self.unfamiliar_rule:
            u = self.unfamiliar_rule
            self.out.write(f"{self.unfamiliar} of {self.count} image(s) below the {u['score']} threshold "
                           f"{u['threshold']:.4g} of cifarlab ood (which keeps {u['keep']:.0%} of the "
                           f"{'ensemble' if 'runs' in u else 'run'}'s {u['fitted_on']} images): unfamiliar, unlike "
                           "the images it was trained on\n")


def _read(files: list[Path], channels: int, size: tuple[int, int],
          failures: list[tuple[str, str]]) -> tuple[list[Path], list[np.ndarray]]:
    """The files that could be read and their uint8 images; a failure (reported on stderr at
    once) for each other."""
    ok_paths, arrays = [], []
    for f in files:
        try:
            if not f.is_file():
                raise CifarlabError(f"{f}: no such file")
            arrays.append(to_array(open_image(f.read_bytes(), str(f)), channels, size))
            ok_paths.append(f)
        except CifarlabError as e:
            failures.append((str(f), str(e)))
            print(f"cifarlab: error: {e}", file=sys.stderr)
    return ok_paths, arrays


def _about(model: Predictor | Ensemble) -> dict:
    """Where the probabilities came from, as the JSON document records it: one run's
    calibration (its temperature, and whether its classes' priors were balanced); or the runs
    whose mean they are, and each one's calibration."""
    if isinstance(model, Predictor):
        return {"temperature": model.temperature(), "balanced_classes": model.class_offsets() is not None}
    return {"runs": [str(p.run) for p in model.members], "probabilities": ensemble_probabilities(model.temperature()),
            "ensemble_temperature": model.temperature(), "temperature": [p.temperature() for p in model.members],
            "balanced_classes": [p.class_offsets() is not None for p in model.members]}


def _unfamiliar_rule(model: Predictor | Ensemble) -> tuple[dict, Any]:
    """The OOD score and threshold ``cifarlab ood`` fitted for the run of ``model``, or for the
    ensemble of a ``--runs N`` folder (:func:`cifarlab.ood.read_rule`), and for ``knn`` its bank;
    refused, naming the command to run, where there is none."""
    got = read_rule(model)
    if got is not None:
        return got
    if isinstance(model, Ensemble):
        raise CifarlabError(f"--flag-unfamiliar needs the threshold of their ensemble that 'cifarlab ood "
                            f"{model.folder}' fits, measured with the runs' current weights, test-time "
                            f"augmentation ({model.tta}) and calibration and the ensemble's; run that first (with "
                            "the same --tta and --uncalibrated)")
    raise CifarlabError(f"--flag-unfamiliar needs the threshold of 'cifarlab ood {model.run}', measured with the "
                        f"run's current weights, test-time augmentation ({model.tta}) and calibration; run that "
                        "first (with the same --tta and --uncalibrated)")


def _set_rule(model: Predictor | Ensemble) -> dict:
    """The coverage of the prediction sets fitted for ``model`` and whether by class; refused,
    naming the command to run, where none were fitted (:meth:`Predictor.sets_calibration`)."""
    cal = model.sets_calibration()
    return {"coverage": cal.set_coverage, "by_class": cal.set_by_class}


def predict_files(run: str, paths: list[str], top: int = 3, fmt: str = "table", device: str = "cpu",
                  out=None, tta: str | None = None, uncalibrated: bool = False,
                  min_confidence: float | None = None, flag_unfamiliar: bool = False, sets: bool = False) -> int:
    """Predict each file; print results in ``fmt`` (table, json, csv). Returns 1 if any file failed.
    ``tta``: the test-time augmentation, by default the run's own; the probabilities use the
    run's calibration (``cifarlab calibrate``) unless ``uncalibrated``. With ``min_confidence``,
    a file whose top probability is below it is marked uncertain (its classes still shown).
    With ``flag_unfamiliar``, a file whose OOD score is below the threshold ``cifarlab ood``
    fitted (its report in ``RUN/ood``, measured with these weights and settings) is marked
    unfamiliar: unlike the images the run was trained on. ``run`` may be the folder of
    ``cifarlab train --runs N``: the probabilities are then the mean of its runs' (an ensemble,
    each run calibrated as its own), and ``flag_unfamiliar`` applies the ensemble's threshold
    from ``cifarlab ood`` of the folder. With ``sets``, each file's prediction set too: the
    classes whose probability reaches the floors ``cifarlab calibrate --sets`` fitted.
    Files are read and predicted :data:`CHUNK_FILES` at a time, and the rows (the JSON
    document's predictions too) written as each chunk is done, so a large folder needs no more
    memory than a chunk."""
    out = out or sys.stdout
    if min_confidence is not None and not 0 < min_confidence <= 1:
        raise CifarlabError(f"--min-confidence {min_confidence} is not valid; it must lie in (0, 1], such as 0.9")
    if top < 1:
        raise CifarlabError(f"--top {top} is not valid; it must be at least 1")
    if sets and uncalibrated:
        raise CifarlabError("--sets needs the calibrated probabilities the sets were fitted to; leave --uncalibrated "
                            "out")
    model = load_classifier(run, device, tta, uncalibrated)
    rule, bank = _unfamiliar_rule(model) if flag_unfamiliar else (None, None)
    set_rule = _set_rule(model) if sets else None
    top = min(top, len(model.classes))
    c, h, w = model.input_shape
    files, failures = _expand(paths)
    empty_folders = len(failures)
    for _, e in failures:
        print(f"cifarlab: error: {e}", file=sys.stderr)
    # the table's file column is as wide as the longest name given, known before any is read
    output = _Output(fmt, out, max([len(str(f)) for f in files] + [4]), min_confidence, rule, set_rule)
    for s in range(0, len(files), CHUNK_FILES):
        ok_paths, arrays = _read(files[s:s + CHUNK_FILES], c, (h, w), failures)
        if not arrays:
            continue
        images = np.stack(arrays)
        probs, familiar = (predict_familiarity(model, images, rule["score"], bank, rule.get("k")) if rule
                           else (model.predict(images), None))
        in_set = model.prediction_sets(probs) if sets else None
        for n, (f, p) in enumerate(zip(ok_paths, probs)):
            idx = np.argsort(-p)[:top]
            r = {"file": str(f), "top": [{"class": model.classes[i], "probability": float(p[i])} for i in idx]}
            if min_confidence is not None:
                r["uncertain"] = bool(p[idx[0]] < min_confidence)
            if rule:
                r["unfamiliar"] = bool(familiar[n] < rule["threshold"])
            if sets:  # most probable first, as the top classes are
                r["set"] = [model.classes[i] for i in np.argsort(-p, kind="stable") if in_set[n, i]]
            output.add(r)
        out.flush()
    output.finish(failures, _about(model))
    bad_files = len(failures) - empty_folders
    if bad_files:
        print(f"cifarlab: {bad_files} of {bad_files + output.count} file(s) could not be read", file=sys.stderr)
    if empty_folders:
        print(f"cifarlab: {empty_folders} folder(s) held no image files", file=sys.stderr)
    return 1 if failures else 0
