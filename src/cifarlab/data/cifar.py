"""Readers for the official CIFAR-10 and CIFAR-100 archives, python and binary versions.

Layouts (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html):

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (pickled dicts
  with ``data`` uint8 (10000, 3072), ``labels``), ``batches.meta`` (``label_names``).
* ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``;
  records of 1 label byte + 3072 pixel bytes; ``batches.meta.txt`` (one class name per line).
* ``cifar-100-python/``: ``train``, ``test`` (dicts with ``fine_labels``, ``coarse_labels``),
  ``meta`` (``fine_label_names``, ``coarse_label_names``).
* ``cifar-100-binary/``: ``train.bin``, ``test.bin``; records of coarse byte, fine byte, 3072
  pixel bytes; ``fine_label_names.txt``, ``coarse_label_names.txt``.

Pixels are stored channel-planar (1024 red, 1024 green, 1024 blue, rows in order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from . import archive
from .safe_pickle import safe_load


@dataclass(frozen=True)
class OfficialFormat:
    """One official archive: its folder name, file names, checksum and download name."""

    key: str
    dataset: str  # cifar10 | cifar100
    folder: str
    archive_name: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    binary: bool
    num_classes: int


FORMATS: dict[str, OfficialFormat] = {
    f.key: f
    for f in (
        OfficialFormat("cifar10-python", "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), False, 10),
        OfficialFormat("cifar10-binary", "cifar10", "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                       "c32a1d4ab5d03f1284b67883e8d87530",
                       tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), True, 10),
        OfficialFormat("cifar100-python", "cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",), False, 100),
        OfficialFormat("cifar100-binary", "cifar100", "cifar-100-binary", "cifar-100-binary.tar.gz",
                       "03b5dce01913d631647c71ecec9e9cb8", ("train.bin",), ("test.bin",), True, 100),
    )
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PIXELS = 32 * 32 * 3


@dataclass
class Split:
    """Images as uint8 (N, 32, 32, 3), labels as int64 (N,), and per-image names."""

    x: np.ndarray
    y: np.ndarray
    names: list[str]


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(names: list[str]) -> OfficialFormat | None:
    """The official format whose folder holds the listed member or file names, if any."""
    tops = {n.strip("/").split("/")[0] for n in names if n.strip("/")}
    for f in FORMATS.values():
        if f.folder in tops:
            return f
    return None


def planar_to_hwc(flat: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-planar rows to (N, 32, 32, 3) images."""
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels must be a list of integers, found {labels.dtype} of shape {labels.shape}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{what}: label {int(labels[i])} at record {i} is out of range; "
                        f"valid labels are 0..{num_classes - 1}")
    return labels.astype(np.int64)


def parse_python_batch(data: bytes, what: str, fmt: OfficialFormat, label_mode: str = "fine") -> Split:
    """Parse one pickled python batch (safely) into a :class:`Split`."""
    d = safe_load(data, what)
    if not isinstance(d, dict):
        raise DataError(f"{what}: expected a dict, found {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    label_key = "labels" if fmt.dataset == "cifar10" else f"{label_mode}_labels"
    if "data" not in d or label_key not in d:
        raise DataError(f"{what}: missing key 'data' or '{label_key}'; found keys {sorted(map(str, d))}")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        shape = getattr(x, "shape", None)
        raise DataError(f"{what}: 'data' must be a uint8 array of shape (N, {PIXELS}), found "
                        f"{getattr(x, 'dtype', type(x).__name__)} {shape}")
    num_classes = fmt.num_classes if label_mode == "fine" else 20
    try:
        labels = np.asarray(d[label_key])
    except Exception:
        raise DataError(f"{what}: '{label_key}' is not a list of integers") from None
    y = _check_labels(labels, num_classes, what)
    if len(y) != len(x):
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels")
    names = d.get("filenames")
    if isinstance(names, list) and len(names) == len(x):
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    else:
        names = [f"{what}#{i}" for i in range(len(x))]
    return Split(planar_to_hwc(x), y, names)


def parse_binary_batch(data: bytes, what: str, fmt: OfficialFormat, label_mode: str = "fine") -> Split:
    """Parse one binary batch (fixed-size records) into a :class:`Split`."""
    label_bytes = 1 if fmt.dataset == "cifar10" else 2
    rec = label_bytes + PIXELS
    if len(data) == 0 or len(data) % rec:
        raise DataError(f"{what}: size {len(data)} bytes is not a positive multiple of the "
                        f"{rec}-byte record size of {fmt.key}; the file is truncated or not a CIFAR batch")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
    if fmt.dataset == "cifar10":
        labels, num_classes = arr[:, 0], 10
    elif label_mode == "coarse":
        labels, num_classes = arr[:, 0], 20
    else:
        labels, num_classes = arr[:, 1], 100
    y = _check_labels(labels.astype(np.int64), num_classes, what)
    return Split(planar_to_hwc(arr[:, label_bytes:]), y, [f"{what}#{i}" for i in range(len(arr))])


def _class_names(fmt: OfficialFormat, files: dict[str, bytes], label_mode: str) -> list[str]:
    def txt(name: str) -> list[str] | None:
        b = files.get(name)
        return [ln.strip() for ln in b.decode("utf-8", "replace").splitlines() if ln.strip()] if b else None

    names: list[str] | None = None
    if fmt.key == "cifar10-python" and "batches.meta" in files:
        meta = safe_load(files["batches.meta"], "batches.meta")
        raw = meta.get(b"label_names") if isinstance(meta, dict) else None
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw] if raw else None
    elif fmt.key == "cifar10-binary":
        names = txt("batches.meta.txt")
    elif fmt.key == "cifar100-python" and "meta" in files:
        meta = safe_load(files["meta"], "meta")
        raw = meta.get(f"{label_mode}_label_names".encode()) if isinstance(meta, dict) else None
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw] if raw else None
    elif fmt.key == "cifar100-binary":
        names = txt(f"{label_mode}_label_names.txt")
    n = fmt.num_classes if label_mode == "fine" else 20
    if not names or len(names) != n:
        names = CIFAR10_CLASSES if fmt.dataset == "cifar10" else [f"class_{i}" for i in range(n)]
    return names


def read_official(files: dict[str, bytes], fmt: OfficialFormat, source: str,
                  label_mode: str = "fine") -> tuple[Split, Split, list[str]]:
    """Build train and test splits from the member files of an official archive.

    ``files`` maps base names (``data_batch_1``) to their bytes.
    """
    if label_mode not in ("fine", "coarse"):
        raise DataError(f"label mode '{label_mode}' is not valid; use 'fine' or 'coarse'")
    if fmt.dataset == "cifar10":
        label_mode = "fine"
    parse: Callable[..., Split] = parse_binary_batch if fmt.binary else parse_python_batch
    out = []
    for group in (fmt.train_files, fmt.test_files):
        parts = []
        for name in group:
            if name not in files:
                raise DataError(f"{source}: missing '{fmt.folder}/{name}'; the {fmt.key} layout needs "
                                f"{', '.join(fmt.train_files + fmt.test_files)}")
            parts.append(parse(files[name], name, fmt, label_mode))
        out.append(Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                         [n for p in parts for n in p.names]))
    return out[0], out[1], _class_names(fmt, files, label_mode)


def load_official_archive(path: Path, allow_unverified: bool = False,
                          label_mode: str = "fine") -> tuple[Split, Split, list[str], OfficialFormat]:
    """Read an official .tar.gz after checking its MD5 against the published sum."""
    fmt = detect_format([archive.first_name(path)])
    if fmt is None:
        raise DataError(f"{path}: not an official CIFAR archive (no folder named "
                        f"{', '.join(f.folder for f in FORMATS.values())})")
    found = md5sum(path)
    if found != fmt.md5 and not allow_unverified:
        raise DataError(f"{path}: MD5 checksum {found} differs from the official {fmt.archive_name} "
                        f"checksum {fmt.md5}. The file is corrupt, altered or not the official one; pass "
                        "--allow-unverified to read it anyway (pickles are still read safely).")
    files = {}
    for name, data in archive.read_members(path, lambda n: n.strip("/").startswith(fmt.folder + "/")):
        files[name.strip("/").split("/", 1)[1]] = data
    train, test, classes = read_official(files, fmt, str(path), label_mode)
    return train, test, classes, fmt


def load_official_folder(path: Path, label_mode: str = "fine") -> tuple[Split, Split, list[str], OfficialFormat]:
    """Read an extracted official folder (the folder itself or its parent)."""
    fmt = detect_format([p.name for p in path.iterdir()]) if path.is_dir() else None
    root = path / fmt.folder if fmt else path
    if fmt is None:
        fmt = next((f for f in FORMATS.values() if f.folder == path.name), None)
    if fmt is None:
        raise DataError(f"{path}: not an official CIFAR folder")
    files = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    train, test, classes = read_official(files, fmt, str(path), label_mode)
    return train, test, classes, fmt
