"""CIFAR-10.1 and CIFAR-10.2: new test sets for CIFAR-10 classifiers, gathered the way CIFAR-10
was (images of the same Tiny Images collection, found by the same keywords), to measure how far
a classifier's accuracy carries over to new images of the same kind.

* CIFAR-10.1 (Recht et al., 2018, "Do CIFAR-10 Classifiers Generalize to CIFAR-10?"):
  ``cifar10.1_v6_data.npy`` (2,000 images; the version its authors recommend) or
  ``cifar10.1_v4_data.npy`` (2,021), uint8 (N, 32, 32, 3), each beside its
  ``cifar10.1_vN_labels.npy``. Test images only.
* CIFAR-10.2 (Lu et al., 2020, "Harder or Different? A Closer Look at Distribution Shift in
  Dataset Reproduction"): ``cifar102_train.npz`` (10,000 images) and ``cifar102_test.npz``
  (2,000), each with ``images`` uint8 (N, 32, 32, 3) and ``labels``.

Labels are CIFAR-10's class indices (airplane 0 ... truck 9). The files are read with numpy's
loader with pickles refused: CIFAR-10.2's object arrays (label names, keywords) are never read.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .cifar import CIFAR10_CLASSES

_V1 = re.compile(r"^cifar10\.1_(v\d+)_(data|labels)\.npy$")
_V2 = re.compile(r"^cifar102_(train|test)\.np[yz]$")


def _files(path: Path) -> list[Path]:
    """The CIFAR-10.1 and CIFAR-10.2 files that ``path`` (a file, or a folder of them) names."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [p for p in files if _V1.match(p.name) or _V2.match(p.name)]


def detect(path: Path) -> bool:
    """Whether ``path`` is a CIFAR-10.1 or CIFAR-10.2 file, or a folder holding them."""
    return bool(_files(path))


def load(path: Path):
    """The data set of a CIFAR-10.1 data or labels file (the other one beside it), a CIFAR-10.2
    file (its images as test images) or a folder of such files (CIFAR-10.2's two: training and
    test images), as a :class:`~cifarlab.data.Dataset` of CIFAR-10's classes."""
    from . import Dataset

    files = _files(path)
    versions = sorted({m.group(1) for p in files if (m := _V1.match(p.name))})
    v2 = {_V2.match(p.name).group(1): p for p in files if _V2.match(p.name)}
    if versions and v2 or len(versions) > 1:
        found = [f"CIFAR-10.1 {v}" for v in versions] + (["CIFAR-10.2"] if v2 else [])
        raise DataError(f"{path} holds {' and '.join(found)}; give one data set's file with --data, such as "
                        f"{path / files[0].name}")
    empty = np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), []
    if versions:
        v = versions[0]
        folder = path if path.is_dir() else path.parent
        data, labels = (folder / f"cifar10.1_{v}_{part}.npy" for part in ("data", "labels"))
        test = _read(data, labels)
        kind, train = f"cifar10.1-{v}", empty
    elif len(v2) == 1:  # one file, either of them: its images are the ones to test on
        (split, file), = v2.items()
        test, train, kind = _read(file), empty, f"cifar10.2-{split}"
    else:
        test, train, kind = _read(v2["test"]), _read(v2["train"]), "cifar10.2"
    return Dataset(train[0], train[1], test[0], test[1], list(CIFAR10_CLASSES), str(path), kind,
                   test_paths=test[2], train_paths=train[2])


def _read(data: Path, labels: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and names (``FILE#INDEX``) of one CIFAR-10.1 pair (``data``, ``labels``) or
    CIFAR-10.2 file (``data``, holding both), checked to be what the publishers describe."""
    if labels is None:
        x, y = _arrays(data, ("images", "labels"))
    else:
        if not labels.is_file():
            raise DataError(f"{labels} is missing: CIFAR-10.1's labels lie beside its images ({data.name}) in a file "
                            f"of that name")
        (x,), (y,) = _arrays(data, None), _arrays(labels, None)
    what = f"{data}: expected uint8 images of shape (N, 32, 32, 3)"
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) == 0:
        raise DataError(f"{what}, N at least 1, found {x.dtype} of shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{labels or data}: expected {len(x)} integer labels (one per image), found {y.dtype} of shape "
                        f"{y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        bad = int(y[(y < 0) | (y > 9)][0])
        raise DataError(f"{labels or data}: label {bad} is not one of CIFAR-10's classes 0 to 9")
    return np.ascontiguousarray(x), y.astype(np.int64), [f"{data.name}#{i}" for i in range(len(x))]


def _arrays(path: Path, keys: tuple[str, ...] | None) -> tuple[np.ndarray, ...]:
    """The arrays of an .npy file (``keys`` None) or the named arrays of an .npz file, with
    pickles refused; a file of the other kind, or one numpy cannot read, is named."""
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    if keys is None:
                        raise DataError(f"{path}: expected one array (.npy), found an .npz archive of "
                                        f"{', '.join(loaded.files)}")
                    missing = [k for k in keys if k not in loaded.files]
                    if missing:
                        raise DataError(f"{path}: expected the arrays {', '.join(keys)}, found "
                                        f"{', '.join(loaded.files)}")
                    return tuple(loaded[k] for k in keys)
            if keys is not None:
                raise DataError(f"{path}: expected an .npz archive of {', '.join(keys)}, found one array")
            return (loaded,)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable numpy file ({e})") from None
