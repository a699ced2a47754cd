"""Images as numpy arrays in one ``.npz`` file, laid out as ``keras.datasets`` gives them:
``x_train``, ``y_train``, ``x_test``, ``y_test`` (the names of Keras' own ``mnist.npz``), as
``np.savez("cifar10.npz", x_train=x_train, ...)`` writes them after
``keras.datasets.cifar10.load_data()``.

* Images: uint8, (N, H, W, C) with C 1 or 3, or (N, H, W) for grey images.
* Labels: integers, (N,) or (N, 1) as Keras gives them; or one-hot rows (N, K), as the
  notebook's ``to_categorical`` makes them.
* Optional ``classes``: the class names, a 1-D array of strings in label order; without it the
  classes are named by their numbers.
* Training and test arrays, or test arrays alone (a set to test runs on), or training arrays
  alone, from which a share of each class is held out for testing, as for class folders.

The file is read with numpy's loader with pickles refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_NUMBERED = 10_000  # the most classes numbered without names (ImageNet-21k has about 21,000: name them)


def detect(path: Path) -> bool:
    """Whether ``path`` is an .npz file: by its name, so that :func:`load` says what is wrong
    with one that numpy cannot read or that lacks Keras' array names (CIFAR-10.2's own .npz
    files are known by their names before this is asked)."""
    return path.is_file() and path.name.lower().endswith(".npz")


def load(path: Path, test_split: float):
    """The :class:`~cifarlab.data.Dataset` of the .npz file ``path`` (see the module's notes);
    ``test_split``: the share of each class held out for testing where it has no test arrays."""
    from . import Dataset, folder

    # opened here, not by numpy, which leaves its own handle open when a zip's index is damaged;
    # once, each array read from it as asked for
    with open(path, "rb") as fh:
        try:
            npz = np.load(fh, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a readable numpy file ({e})") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array of shape {npz.shape}, as np.save writes one, where named "
                            "arrays were expected: save them with np.savez(path, x_train=..., y_train=..., "
                            "x_test=..., y_test=...)")
        with npz:
            names = list(npz.files)
            if "x_train" not in names and "x_test" not in names:
                raise DataError(f"{path}: holds the arrays {', '.join(names) or '(none)'} but neither x_train nor "
                                f"x_test; expected {', '.join(KEYS)} (and optionally classes), as keras.datasets "
                                "gives them")
            notes: list[str] = []
            unknown = sorted(set(names) - set(KEYS) - {"classes"})
            if unknown:
                notes.append(f"{path.name}: ignored array(s) {', '.join(unknown)}; read are {', '.join(KEYS)} and "
                             "classes")
            parts, one_hot = _read_parts(npz, path, names, notes)
            classes = _classes(npz, path, names, parts, one_hot, notes)
    if "test" in parts:
        x0 = parts["test"][0]
        (x_tr, y_tr), (x_te, y_te) = parts.get("train", (x0[:0], np.zeros(0, np.int64))), parts["test"]
        train_paths = [f"x_train#{i}" for i in range(len(x_tr))]
        test_paths = [f"x_test#{i}" for i in range(len(x_te))]
        origin = "named"
    else:  # training arrays alone: a share of each class held out by the images' names, as for class folders
        x, y = parts["train"]
        by_class: dict[str, list[str]] = {}
        for i, label in enumerate(y.tolist()):
            by_class.setdefault(classes[label], []).append(f"x_train#{i}")
        items = folder._split_classes(by_class, test_split, lambda c: f"{path}: class {c!r}")
        train_paths, test_paths = ([n for n, _ in items[split]] for split in ("train", "test"))
        tr, te = (np.array([int(n.partition("#")[2]) for n in p], np.int64) for p in (train_paths, test_paths))
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        notes.append(folder._held_out_note(items, test_split))
        origin = "held-out"
    return Dataset(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te, classes, str(path), "arrays",
                   test_paths=test_paths, notes=notes, train_paths=train_paths, test_origin=origin)


def _read_parts(npz, path: Path, names: list[str], notes: list[str]
                ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """The (images, labels) of each split the file holds, checked to agree, and the number of
    classes its one-hot labels count (0 for integer labels)."""
    parts = {}
    one_hot = 0  # one-hot rows count every class, some perhaps without an image
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        if (x_key in names) != (y_key in names):
            have, lack = (x_key, y_key) if x_key in names else (y_key, x_key)
            raise DataError(f"{path}: holds {have} but not {lack}; give both, or neither")
        if x_key in names:
            y, width = _labels(_array(npz, path, y_key), path, y_key, notes)
            x = _images(_array(npz, path, x_key), path, x_key)
            if len(y) != len(x):
                raise DataError(f"{path}: {x_key} holds {len(x)} images but {y_key} {len(y)} labels; expected one "
                                "label per image")
            parts[split], one_hot = (x, y), max(one_hot, width)
    shapes = {x.shape[1:] for x, _ in parts.values()}
    if len(shapes) > 1:
        raise DataError(f"{path}: x_train and x_test hold images of different shapes "
                        f"({' and '.join(str(s) for s in sorted(shapes))}); expected one (H, W, C)")
    if not any(len(y) for _, y in parts.values()):
        raise DataError(f"{path}: its arrays hold no images")
    return parts, one_hot


def _classes(npz, path: Path, names: list[str], parts, one_hot: int, notes: list[str]) -> list[str]:
    """The class names: the file's ``classes`` array, else the numbers (with a note)."""
    n_classes = max([one_hot] + [int(y.max()) + 1 for _, y in parts.values() if len(y)])
    if "classes" not in names:
        if n_classes > MAX_NUMBERED:  # labels are class numbers from 0: one this large is most likely not a label
            raise DataError(f"{path}: a label is {n_classes - 1}, which would make {n_classes:,} classes; labels are "
                            f"class numbers from 0 (at most {MAX_NUMBERED - 1:,} without a classes array naming them)")
        notes.append(f"{path.name} names no classes: they are called 0 to {n_classes - 1}; to name them, save a "
                     "classes array of names in label order in the file (np.savez(..., classes=[...]))")
        return [str(k) for k in range(n_classes)]
    given = _class_names(_array(npz, path, "classes"), path)
    if len(given) < n_classes:
        raise DataError(f"{path}: classes names {len(given)} classes but a label is {n_classes - 1}; expected at "
                        f"least {n_classes} names, in label order")
    return given


def _array(npz, path: Path, key: str) -> np.ndarray:
    """The array ``key`` of the .npz file ``path``, opened as ``npz`` with pickles refused; an
    object array (a pickle) or a damaged member is named."""
    try:
        return npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: its array {key} could not be read as plain numbers or text ({e}); save it as a "
                        "numeric array (pickled objects are never read)") from None


def _images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``x`` as uint8 (N, H, W, C), a grey (N, H, W) array given its channel; anything else named."""
    if x.dtype != np.uint8:
        hint = (" (images scaled to [0, 1] as the notebook does: save (x * 255).round().astype('uint8'))"
                if np.issubdtype(x.dtype, np.floating) else "")
        raise DataError(f"{path}: {key} is {x.dtype}; expected uint8 pixels from 0 to 255{hint}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < 1:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, H, W, C) with C 1 or 3, or (N, H, W)")
    return x


def _labels(y: np.ndarray, path: Path, key: str, notes: list[str]) -> tuple[np.ndarray, int]:
    """``y`` as int64 (N,), from integer labels (N,) or (N, 1), or one-hot rows (N, K); and K
    (0 for integer labels)."""
    if y.dtype.kind not in "biuf":  # text or other kinds: neither sums nor compares to 0 and 1 as numbers
        raise DataError(f"{path}: {key} is {y.dtype} of shape {y.shape}; expected integer labels (N,) or (N, 1), "
                        "or one-hot rows (N, K)")
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot, as to_categorical makes them
        if not ((y == 0) | (y == 1)).all() or not (y.sum(1) == 1).all():
            raise DataError(f"{path}: {key} has shape {y.shape} but its rows are not one-hot (a single 1, the rest "
                            "0); expected integer labels (N,) or (N, 1), or one-hot rows")
        notes.append(f"{path.name}: {key} read as one-hot rows of {y.shape[1]} classes")
        return y.argmax(1).astype(np.int64), y.shape[1]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} is {y.dtype} of shape {y.shape}; expected integer labels (N,) or (N, 1), "
                        "or one-hot rows (N, K)")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {key} holds the label {int(y.min())}; labels are class numbers from 0")
    return y.astype(np.int64), 0


def _class_names(c: np.ndarray, path: Path) -> list[str]:
    """The ``classes`` array as a list of distinct, non-empty names."""
    if c.ndim != 1 or c.dtype.kind not in "US":
        raise DataError(f"{path}: classes is {c.dtype} of shape {c.shape}; expected a 1-D array of names "
                        "(np.array(['airplane', 'automobile', ...]))")
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
    if not all(n.strip() for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}: classes {names} must be distinct, non-empty names")
    return names
