"""Write scikit-learn's 1,797 handwritten digits (Alpaydin and Kaynak's UCI set, 8x8 pixels,
grey) as PNG files into one folder: real images of nothing CIFAR-10 knows, at hand on any
machine with cifarlab installed, to give ``cifarlab ood`` as unfamiliar images.

Usage: python examples/digits_folder.py OUT
       cifarlab ood RUN OUT

Each digit is written as dark ink on white paper (the set stores ink intensity, 0 to 16) at its
own 8x8 size, as ``OUT/digit<D>-<NNNN>.png``; ``cifarlab ood`` reads them as ``predict`` reads
files: made colour for a colour model and resized to its input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 (N, 8, 8) images, ink dark on white, and their labels."""
    d = load_digits()
    return np.round(255 - d.images * (255 / 16)).astype(np.uint8), d.target


def main(out: str) -> None:
    folder = Path(out)
    if folder.exists():
        sys.exit(f"{folder} exists; give a new folder")
    images, labels = digit_images()
    tmp = folder.with_name(folder.name + ".partial")  # renamed once whole: no half-written folder
    tmp.mkdir(parents=True)
    for i, (im, d) in enumerate(zip(images, labels)):
        Image.fromarray(im, "L").save(tmp / f"digit{d}-{i:04d}.png")
    tmp.rename(folder)
    print(f"wrote {len(images)} images of handwritten digits to {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
