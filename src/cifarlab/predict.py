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
                  out=None, tta: str | None = None, uncalibrated: bool = False) -> int:
    """Predict each file; print results in ``fmt`` (table, json, csv). Returns 1 if any file failed.
    ``tta``: the test-time augmentation, by default the run's own; the probabilities use the
    run's temperature (``cifarlab calibrate``) unless ``uncalibrated``."""
    out = out or sys.stdout
    pred = load_model(run, device, tta, uncalibrated)
    if top < 1:
        raise CifarlabError(f"--top {top} is not valid; it must be at least 1")
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
    if fmt == "json":
        json.dump({"predictions": results, "errors": [{"file": f, "error": e} for f, e in failures],
                   "temperature": pred.temperature()}, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        wr = csv.writer(out)
        wr.writerow(["file", "rank", "class", "probability"])
        for r in results:
            for k, t in enumerate(r["top"], 1):
                wr.writerow([r["file"], k, t["class"], f"{t['probability']:.6f}"])
    else:
        width = max([len(r["file"]) for r in results] + [4])
        for r in results:
            tops = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            out.write(f"{r['file']:<{width}}  {tops}\n")
    bad_files = len(failures) - empty_folders
    if bad_files:
        print(f"cifarlab: {bad_files} of {bad_files + len(results)} file(s) could not be read", file=sys.stderr)
    if empty_folders:
        print(f"cifarlab: {empty_folders} folder(s) held no image files", file=sys.stderr)
    return 1 if failures else 0
