"""Data sources, splits and the :class:`Dataset` every other module consumes.

Accepted by ``--data`` (see :func:`load_dataset`):

* an official CIFAR-10/100 archive (python or binary version), as .tar.gz or extracted folder;
* a CIFAR-10.1 or CIFAR-10.2 file, or a folder of them (:mod:`.reproductions`): new test sets;
* an image folder or .tar/.tar.gz/.tar.xz archive with ``train/<class>/*`` and ``test/<class>/*``,
  or ``<class>/*`` alone, or images anywhere in it with a CSV file of their labels (``labels``),
  from which a test split is held out;
* nothing: the official python archive for ``--dataset`` is downloaded into the cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, did_you_mean, short_list
from . import archive, arrays, cache, cifar, download, folder, reproductions

__all__ = ["Dataset", "load_dataset", "resized", "only_classes", "every_image_as_test", "stratified_split",
           "balanced_subset", "subset_note", "DataError"]

CACHE_NOTE = "loaded from the decoded cache"
DECODED_NOTE = "decoded in {:.1f} s"


def content_notes(notes: list[str]) -> list[str]:
    """``notes`` without those that say how the data was read this time (decoded, or from the
    cache), which differ between two reads of the same data: what remains is about the data."""
    head, _, tail = DECODED_NOTE.partition("{:.1f}")  # the decoded note, whatever its time
    return [n for n in notes if n != CACHE_NOTE and not (n.startswith(head) and n.endswith(tail))]


@dataclass
class Dataset:
    """Train and test images as uint8 (N, H, W, C) with int64 labels, plus provenance.

    ``test_paths`` name each test image in the source (``test/cat/0001.jpg`` for image folders,
    ``test_batch#17`` or the official file name for archives), in the order of ``x_test``:
    this is the order that ``--groups`` files refer to by index. ``train_paths`` name the
    training images the same way, in the order of ``x_train``. ``test_origin`` says where the
    test images come from: ``"named"``, the source names them (a test/ folder, an official test
    batch, a test set's file); ``"held-out"``, the source names none (class folders alone, or
    images named by a labels file) and a share of its images was held out
    (:func:`cifarlab.data.folder.load_image_folder`); ``"unseen"``, every image of the source
    that the runs to be tested did not train or validate on (:func:`cifarlab.data.seen.test_split_for`).
    ``labels``: the path of the ``--labels`` file that named the classes, where one did.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str
    kind: str
    test_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)
    test_origin: str = "named"
    labels: str | None = None  # the --labels file that named the images' classes, where one did

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image, as models take it."""
        n, h, w, c = self.x_train.shape
        return c, h, w

    @property
    def num_classes(self) -> int:
        """How many classes there are."""
        return len(self.classes)


def load_dataset(data: str | Path | None = None, dataset: str = "cifar10", *, allow_unverified: bool = False,
                 label_mode: str = "fine", skip_bad_images: bool = False, use_cache: bool = True,
                 quiet: bool = True, image_size: tuple[int, int] | None = None,
                 test_split: float = folder.TEST_SPLIT, labels: str | Path | None = None) -> Dataset:
    """Load a data set from ``data`` (a path), or download the official ``dataset`` if ``data`` is None.

    ``dataset`` chooses the download only, and ``label_mode`` applies to CIFAR-100 only; where
    ``data`` holds something else, they are ignored and the returned notes say so.
    ``image_size`` (H, W): every image is resized to it (bilinear), an image folder's from its
    file; None keeps the data's own size (for a folder, its most common one). ``test_split``:
    the share of each class held out for testing from an image folder of class folders alone
    (``<class>/<image>``, no train/ and test/), or labelled by ``labels``, chosen by the images'
    paths. ``labels``: a CSV file of file,label rows naming the class of each image of an image
    folder or archive, wherever the image lies (:mod:`cifarlab.data.labels_csv`)."""
    if dataset not in ("cifar10", "cifar100"):
        raise DataError(f"--dataset '{dataset}' is not valid; choose cifar10 or cifar100")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise DataError(f"image size {tuple(image_size)} is not valid; expected (height, width), each at least 1")
    if isinstance(test_split, bool) or not isinstance(test_split, (int, float)) or not 0 < test_split < 1:
        raise DataError(f"--test-split {test_split!r} is not valid; it must lie strictly between 0 and 1, such as 0.2")
    if labels is not None and not str(labels).strip():
        raise DataError(f"--labels {str(labels)!r} is empty; give a CSV file of file,label rows, or leave it out")
    ds = _load(data, dataset, allow_unverified, label_mode, skip_bad_images, use_cache, quiet, image_size,
               float(test_split), labels)
    if test_split != folder.TEST_SPLIT and ds.test_origin == "named":  # any data that names its test images
        ds.notes.append(f"--test-split {test_split:g} applies to a folder of class folders alone (or images named by "
                        f"--labels); ignored, {ds.source} ({ds.kind}) names its own test images")
    if image_size is not None:
        ds = resized(ds, image_size)
    if not ds.kind.startswith("cifar100"):
        if label_mode != "fine":
            ds.notes.append(f"--label-mode {label_mode} applies to CIFAR-100 only; ignored, {ds.source} "
                            f"({ds.kind}) has its own {ds.num_classes} classes")
        if dataset != "cifar10":
            ds.notes.append(f"--dataset {dataset} only chooses what to download; ignored, {ds.source} "
                            f"({ds.kind}) is read as it is")
    return ds


def resized(ds: Dataset, size: tuple[int, int], reason: str = "the image size asked for") -> Dataset:
    """``ds`` with every image resized to ``size`` (H, W), bilinear as Pillow does it (as
    ``predict`` resizes an image file), and a note giving ``reason``; ``ds`` itself where its
    images are that size already."""
    from PIL import Image

    from .images import to_array

    size = (int(size[0]), int(size[1]))
    n, h, w, c = ds.x_train.shape
    if (h, w) == size:
        return ds

    def each(x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), *size, c), np.uint8)
        for i, im in enumerate(x):
            out[i] = to_array(Image.fromarray(im[:, :, 0] if c == 1 else im), c, size)
        return out

    note = f"resized all {n + len(ds.x_test)} image(s) from {h}x{w} to {size[0]}x{size[1]} ({reason}, HxW)"
    return dataclasses.replace(ds, x_train=each(ds.x_train), x_test=each(ds.x_test), notes=ds.notes + [note])


def only_classes(ds: Dataset, names: list[str]) -> Dataset:
    """``ds`` with the images of the classes ``names`` alone, labelled by their place in
    ``names`` (which becomes ``classes``); a name that is not one of ``ds``'s classes is
    refused, naming the valid ones. ``ds`` itself where ``names`` are its classes in its order."""
    names = list(names)
    if names == ds.classes:
        return ds
    unknown = [c for c in names if c not in ds.classes]
    if unknown:
        raise DataError(f"class(es) {', '.join(repr(c) + did_you_mean(c, ds.classes) for c in unknown)} of "
                        f"data.classes (--classes) are not in {ds.source}; its classes: {short_list(ds.classes, 20)}")
    new = np.full(len(ds.classes), -1, np.int64)
    new[[ds.classes.index(c) for c in names]] = np.arange(len(names))

    def keep(x: np.ndarray, y: np.ndarray, paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        m = new[y] >= 0 if len(y) else np.zeros(0, bool)
        return x[m], new[y[m]], [p for p, k in zip(paths, m) if k] if len(paths) == len(y) else paths

    x_tr, y_tr, p_tr = keep(ds.x_train, ds.y_train, ds.train_paths)
    x_te, y_te, p_te = keep(ds.x_test, ds.y_test, ds.test_paths)
    left = [c for c in ds.classes if c not in names]
    note = (f"{len(names)} of its {len(ds.classes)} classes (data.classes); the images of "
            f"{', '.join(left[:10])}{', ...' if len(left) > 10 else ''} left out")
    return dataclasses.replace(ds, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, classes=names,
                               train_paths=p_tr, test_paths=p_te, notes=ds.notes + [note])


def every_image_as_test(ds: Dataset) -> Dataset:
    """``ds`` with every image, its training ones included, as a test image, in the order of
    their paths, and no training images: to evaluate a run on data it was not trained on. The
    test paths need the training paths, so a data set without them is refused."""
    if len(ds.train_paths) != len(ds.x_train) or len(ds.test_paths) != len(ds.x_test):
        raise DataError(f"{ds.source}: its images are not all named, so they cannot be put in one order")
    paths = ds.train_paths + ds.test_paths
    order = np.argsort(np.array(paths, dtype=object), kind="stable")
    x = np.concatenate([ds.x_train, ds.x_test])[order]
    y = np.concatenate([ds.y_train, ds.y_test])[order]
    return dataclasses.replace(ds, x_train=x[:0], y_train=y[:0], x_test=x, y_test=y, train_paths=[],
                               test_paths=[paths[i] for i in order], test_origin="unseen",
                               notes=folder.without_held_out(ds.notes))


def _load(data: str | Path | None, dataset: str, allow_unverified: bool, label_mode: str, skip_bad_images: bool,
          use_cache: bool, quiet: bool, image_size: tuple[int, int] | None = None,
          test_split: float = folder.TEST_SPLIT, labels: str | Path | None = None) -> Dataset:
    if data is not None and not str(data).strip():  # Path("") would silently mean the current folder
        raise DataError(f"--data {str(data)!r} is empty; give a path, or leave --data out to download the "
                        f"official {dataset} archive")
    if labels is not None and data is None:
        raise DataError(f"--labels {labels} names the classes of the images in --data; give --data too (a folder "
                        "or archive of the images)")
    if data is None:
        path = download.fetch(dataset, quiet=quiet)
        train, test, classes, fmt = cifar.load_official_archive(path, label_mode=label_mode)
        return _from_official(train, test, classes, fmt, str(path))
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data '{data}' does not exist. Give an official CIFAR archive (.tar.gz) or its "
                        "extracted folder, or an image folder/archive with train/<class>/* and test/<class>/*, or "
                        "<class>/* alone, or with images anywhere and --labels FILE.csv naming their classes, or a "
                        "CIFAR-10.1 or CIFAR-10.2 file, or an .npz of arrays x_train, y_train, x_test, y_test")
    if reproductions.detect(path):
        _refuse_labels(labels, path)
        return reproductions.load(path)
    if arrays.detect(path):
        _refuse_labels(labels, path)
        return arrays.load(path, test_split)
    if path.is_file():
        if not path.name.lower().endswith(archive.ARCHIVE_SUFFIXES):
            raise DataError(f"--data '{data}' is a file but not a tar or zip archive; expected one of "
                            f"{', '.join(archive.ARCHIVE_SUFFIXES)}, an .npz of numpy arrays named x_train, y_train, "
                            "x_test, y_test (as keras.datasets gives them), or a folder")
        if cifar.detect_format([archive.first_name(path)]):
            _refuse_labels(labels, path)
            train, test, classes, fmt = cifar.load_official_archive(path, allow_unverified, label_mode)
            return _from_official(train, test, classes, fmt, str(path))
    elif cifar.detect_format([p.name for p in path.iterdir()]) or path.name in {
            f.folder for f in cifar.FORMATS.values()}:
        _refuse_labels(labels, path)
        train, test, classes, fmt = cifar.load_official_folder(path, label_mode)
        return _from_official(train, test, classes, fmt, str(path))
    return _load_folder_cached(path, skip_bad_images, use_cache, image_size, test_split, labels)


def _refuse_labels(labels: str | Path | None, path: Path) -> None:
    if labels is not None:
        raise DataError(f"--labels {labels} applies to image folders and archives; {path} holds CIFAR data with "
                        "its own labels: leave --labels out")


def _from_official(train, test, classes, fmt, source) -> Dataset:
    return Dataset(train.x, train.y, test.x, test.y, classes, source, fmt.key, test_paths=test.names,
                   train_paths=train.names)


def _load_folder_cached(path: Path, skip_bad: bool, use_cache: bool, size: tuple[int, int] | None = None,
                        test_split: float = folder.TEST_SPLIT, labels: str | Path | None = None) -> Dataset:
    # size, test split and labels join the key only where not the defaults, so the keys of
    # folders read the default way stay as they were; a labels file by its content, as it may
    # lie outside the folder. skip_bad stays out of it (False, as keys held it before): a folder
    # without unreadable images reads the same either way, so both share one entry, and an
    # entry that left images out serves only a read that skips them
    labels = Path(labels).expanduser() if labels is not None else None
    options = {"skip_bad": False, **({"size": list(size)} if size else {}),
               **({"test_split": test_split} if test_split != folder.TEST_SPLIT else {}),
               **({"labels": cache.file_digest(labels)} if labels is not None else {})}
    key = cache.source_key(path, **options) if use_cache else None
    hit = cache.load_cached(key) if key else None
    # an entry written before it kept the training paths is read again, and so is one that left
    # unreadable images out for a read that does not skip them, which is then refused naming them
    if hit is not None and "test_origin" in hit[1] and (skip_bad or not hit[1].get("skipped")):
        arrays, meta = hit
        return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], meta["classes"],
                       str(path), "image-folder", meta["test_paths"], meta["notes"] + [CACHE_NOTE],
                       train_paths=meta["train_paths"], test_origin=meta["test_origin"],
                       labels=str(labels) if labels is not None else None)
    t0 = time.perf_counter()
    fd = folder.load_image_folder(path, skip_bad=skip_bad, size=size, test_split=test_split, labels=labels)
    notes = fd.notes + [DECODED_NOTE.format(time.perf_counter() - t0)]
    if key:
        cache.store_cached(key, {"x_train": fd.x["train"], "y_train": fd.y["train"], "x_test": fd.x["test"],
                                 "y_test": fd.y["test"]},
                           {"classes": fd.classes, "test_paths": fd.paths["test"], "notes": fd.notes,
                            "source": str(path.resolve()),
                            "read_with": _read_with(size, test_split, labels, fd.skipped > 0),
                            "train_paths": fd.paths["train"], "test_origin": fd.test_origin, "skipped": fd.skipped})
    return Dataset(fd.x["train"], fd.y["train"], fd.x["test"], fd.y["test"], fd.classes, str(path),
                   "image-folder", fd.paths["test"], notes, train_paths=fd.paths["train"], test_origin=fd.test_origin,
                   labels=str(labels) if labels is not None else None)


def _read_with(size: tuple[int, int] | None, test_split: float, labels: Path | None, skipped: bool) -> list[str]:
    """The options other than the defaults that a cached folder was read with, in the flags'
    words, for ``cifarlab cache`` to tell two entries of one folder apart (--skip-bad-images
    where it ``skipped`` images: otherwise the entry is the one a plain read makes too)."""
    return ([f"--image-size {size[0]}x{size[1]}"] if size else []) + (
        [f"--test-split {test_split:g}"] if test_split != folder.TEST_SPLIT else []) + (
        [f"--labels {labels.resolve()}"] if labels is not None else []) + (["--skip-bad-images"] if skipped else [])


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train_idx, val_idx) with ``fraction`` of each class held out.

    Unlike Keras' ``validation_split`` (the last rows), this holds out every class in proportion,
    which matters for data stored class by class.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation split {fraction} is not valid; it must lie strictly between 0 and 1")
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        counts = np.unique(y, return_counts=True)[1]
        n_val = math.ceil(fraction * len(y))
        images = "image" if n_val == 1 else "images"
        raise DataError(
            f"cannot hold out {fraction:g} of {len(y)} images class by class: with {len(counts)} class(es) the "
            f"validation part ({n_val} {images}) and the training part ({len(y) - n_val}) each need at least "
            f"{len(counts)}, one per class, and every class at least 2 images (the smallest has {counts.min()}). "
            "Use more images (a larger --subset) or another --val-split") from None
    return np.sort(tr), np.sort(va)


def subset_note(n: int, available: int, what: str, classes: int = 0) -> str | None:
    """The note for ``--subset n`` asking for more than the ``available`` images (``what``, e.g.
    "test images"): :func:`balanced_subset` then uses them all; or for fewer images than the
    data's ``classes``, where some classes get none. None where neither holds."""
    if n > available:
        return f"--subset {n:,} is more than the {available:,} {what}; using them all"
    if n < classes:
        return (f"--subset {n:,} is fewer images than the {classes:,} classes: training sees no image of "
                f"{classes - n:,} of them")
    return None


def balanced_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded, class-balanced subset of ``n`` images (sorted), with an image of
    every class where ``n`` is at least the number of classes; of fewer, one image each of
    ``n`` classes drawn with the seed."""
    if n <= 0:
        raise DataError(f"--subset {n} is not valid; it must be a positive number of images")
    if n >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    rng, classes = np.random.default_rng(seed), np.unique(y)
    try:
        sub, _ = train_test_split(np.arange(len(y)), train_size=n, random_state=seed, stratify=y)
    except ValueError:  # stratification is impossible
        if n < len(classes):  # no class twice, so that as few classes as can be go without an image
            sub = np.array([rng.choice(np.flatnonzero(y == c)) for c in rng.choice(classes, n, replace=False)])
        else:  # a class too small to be split, for one: a seeded random subset
            sub = rng.choice(len(y), size=n, replace=False)
    if n >= len(classes):
        # stratification rounds a rare class's share down to no image, and the random draw may
        # miss one: each class left out takes the place of an image of the subset's largest class
        for c in np.setdiff1d(classes, y[sub]):
            have, counts = np.unique(y[sub], return_counts=True)
            sub[rng.choice(np.flatnonzero(y[sub] == have[counts.argmax()]))] = rng.choice(np.flatnonzero(y == c))
    return np.sort(sub)
