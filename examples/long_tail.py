"""Make a long-tailed copy of an image-folder data set, to try ``cifarlab train --class-weight``
(or ``--sampling balanced``, or ``cifarlab calibrate --balance-classes`` after training):
class k of K (in sorted order) keeps n * RATIO ** (-k / (K - 1)) of its training images, where n
is the count of the largest class, so the first class keeps all of them and the last 1/RATIO of
them (Cui et al., 2019, "Class-Balanced Loss Based on Effective Number of Samples": RATIO 100 of
CIFAR-10 is their CIFAR-10-LT, 5,000 airplanes down to 50 trucks). The test images are all kept,
so the test set stays balanced and its accuracy is the mean of the per-class recalls.

Usage: python examples/long_tail.py DATA OUT RATIO

DATA is a folder or a .tar/.tar.gz/.tar.xz/.zip archive in the train/<class>/*, test/<class>/*
layout, as the JPEG copy of CIFAR-10 is. Each class keeps its first images in file-name order,
so the copy is the same every time. OUT is written whole or not at all.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from class_split import image_folder_root  # the same unpacking; run from examples/


def kept_counts(counts: list[int], ratio: float) -> list[int]:
    """How many training images each class keeps: the profile above, at least one each."""
    n, k = max(counts), len(counts)
    return [min(c, max(1, int(n * ratio ** (-i / max(k - 1, 1))))) for i, c in enumerate(counts)]


def main(data: str, out: str, ratio_text: str) -> None:
    out_path = Path(out)
    if out_path.exists():
        sys.exit(f"{out} exists; give a new folder")
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = float("nan")
    if not ratio >= 1 or ratio == float("inf"):
        sys.exit(f"RATIO {ratio_text!r} is not valid; give the largest class's count over the smallest's, 1 or more")
    with tempfile.TemporaryDirectory() as tmp:
        root = image_folder_root(Path(data), Path(tmp))
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        files = [sorted(p for p in (root / "train" / c).iterdir() if p.is_file()) for c in classes]
        keep = kept_counts([len(f) for f in files], ratio)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}-"))
        try:
            for c, names, n in zip(classes, files, keep):
                (staging / "train" / c).mkdir(parents=True)
                for f in names[:n]:
                    shutil.copy2(f, staging / "train" / c / f.name)
            if (root / "test").is_dir():
                shutil.copytree(root / "test", staging / "test")
            staging.rename(out_path)  # whole or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out}: training images kept per class: "
          + ", ".join(f"{c} {n}" for c, n in zip(classes, keep)))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
