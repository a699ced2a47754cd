"""Write an example groups file for ``cifarlab audit --groups``: each test image's lighting
(dark / medium / bright: terciles of mean luminance) and colourfulness (grey-ish / colourful:
halves of the mean channel spread). These are stand-ins for the attributes a real audit would
use (photo source, region, camera), computed from the pixels so the example runs anywhere.

Usage: python examples/lighting_groups.py DATA OUT.csv
"""

from __future__ import annotations

import csv
import sys

import numpy as np

from cifarlab.data import load_dataset


def main(data: str, out: str) -> None:
    ds = load_dataset(data)
    x = ds.x_test.astype(np.float32)
    if x.shape[-1] == 3:
        lum = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).mean(axis=(1, 2))
        spread = (x.max(axis=-1) - x.min(axis=-1)).mean(axis=(1, 2))
    else:
        lum, spread = x.mean(axis=(1, 2, 3)), np.zeros(len(x))
    lo, hi = np.quantile(lum, [1 / 3, 2 / 3])
    light = np.where(lum < lo, "dark", np.where(lum < hi, "medium", "bright"))
    colour = np.where(spread < np.median(spread), "greyish", "colourful")
    key = "path" if ds.kind == "image-folder" else "index"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([key, "lighting", "colourfulness"])
        for i in range(len(x)):
            w.writerow([ds.test_paths[i] if key == "path" else i, light[i], colour[i]])
    print(f"wrote {len(x)} rows to {out}: lighting terciles at luminance {lo:.1f} and {hi:.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
