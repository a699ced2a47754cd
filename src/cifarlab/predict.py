"""``cifarlab predict``: top-k classes for image files, robust to bad files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from .data.images import IMAGE_SUFFIXES, is_image_name, open_image, to_array
from .errors import CifarlabError
from .export import load_model


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


def predict_files(run: str, paths: list[str], top: int = 3, fmt: str = "table", device: str = "cpu",
                  out=None, tta: str | None = None, uncalibrated: bool = False,
                  min_confidence: float | None = None) -> int:
    """Predict each file; print results in ``fmt`` (table, json, csv). Returns 1 if any file failed.
    ``tta``: the test-time augmentation, by default the run's own; the probabilities use the
    run's calibration (``cifarlab calibrate``) unless ``uncalibrated``. With ``min_confidence``,
    a file whose top probability is below it is marked uncertain (its classes still shown)."""
    out = out or sys.stdout
    if min_confidence is not None and not 0 < min_confidence <= 1:
        raise CifarlabError(f"--min-confidence {min_confidence} is not valid; it must lie in (0, 1], such as 0.9")
    if top < 1:
        raise CifarlabError(f"--top {top} is not valid; it must be at least 1")
    pred = load_model(run, device, tta, uncalibrated)
    top = min(top, len(pred.classes))
    c, h, w = pred.input_shape
    files, failures = _expand(paths)
    empty_folders = len(failures)
    for _, e in failures:
        print(f"cifarlab: error: {e}", file=sys.stderr)
    ok_paths, arrays = [], []
    for f in files:
        try:
            if not f.is_file():
                raise CifarlabError(f"{f}: no such file")
            arrays.append(to_array(open_image(f.read_bytes(), str(f)), c, (h, w)))
            ok_paths.append(f)
        except CifarlabError as e:
            failures.append((str(f), str(e)))
            print(f"cifarlab: error: {e}", file=sys.stderr)
    results = []
    if arrays:
        probs = pred.predict(np.stack(arrays))
        for f, p in zip(ok_paths, probs):
            idx = np.argsort(-p)[:top]
            results.append({"file": str(f), "top": [{"class": pred.classes[i], "probability": float(p[i])} for i in idx]})
            if min_confidence is not None:
                results[-1]["uncertain"] = bool(p[idx[0]] < min_confidence)
    if fmt == "json":
        json.dump({"predictions": results, "errors": [{"file": f, "error": e} for f, e in failures],
                   "temperature": pred.temperature(), "balanced_classes": pred.class_offsets() is not None,
                   "min_confidence": min_confidence}, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        wr = csv.writer(out)
        marked = min_confidence is not None  # the column only where asked for: the plain layout stays as it was
        wr.writerow(["file", "rank", "class", "probability"] + (["uncertain"] if marked else []))
        for r in results:
            for k, t in enumerate(r["top"], 1):
                wr.writerow([r["file"], k, t["class"], f"{t['probability']:.6f}"]
                            + ([str(r["uncertain"]).lower()] if marked else []))
    else:
        width = max([len(r["file"]) for r in results] + [4])
        for r in results:
            tops = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            out.write(f"{r['file']:<{width}}  {'uncertain: ' if r.get('uncertain') else ''}{tops}\n")
        if min_confidence is not None:
            uncertain = sum(r["uncertain"] for r in results)
            out.write(f"{uncertain} of {len(results)} image(s) below confidence {min_confidence:g}: uncertain\n")
    bad_files = len(failures) - empty_folders
    if bad_files:
        print(f"cifarlab: {bad_files} of {bad_files + len(results)} file(s) could not be read", file=sys.stderr)
    if empty_folders:
        print(f"cifarlab: {empty_folders} folder(s) held no image files", file=sys.stderr)
    return 1 if failures else 0
