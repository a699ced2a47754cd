"""The images a run trained and validated on, kept in its folder as one 64-bit hash of each
image's path and one of its pixels, so that a run can be evaluated on other data without
testing it on an image it has seen.

A run that started from another run's weights (``--init-from``) keeps the hashes of the images
that run trained on (and had inherited in turn) too, as images its own weights have learnt from:
it is not tested on them, and its calibration and thresholds leave them out of its validation
images (:func:`inherited_rows`). That run's validation images are not among them: it only
measured itself on them, so a fine-tune on the same split keeps its validation images.

Where the data names no test images (class folders alone, or a labels file), a test split is
held out of it by the images' paths. That split is the run's test split only on the run's own
data; on other data (new photos in class folders) every image is a test image, except those
with the pixels of an image the run trained or validated on (:func:`test_split_for`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from . import Dataset

FILE = "seen_images.safetensors"
_FORMAT = "cifarlab seen images 1"


def pixel_hashes(x: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
    """One 64-bit BLAKE2b hash per image of ``x`` (uint8, N x H x W x C), or of its ``rows``
    only, of its pixels and shape: equal images (and, but for a chance of 2**-64, only they)
    hash alike."""
    x = np.ascontiguousarray(x)  # each image's bytes in one piece, hashed where they lie (no copy of a subset)
    rows = range(len(x)) if rows is None else rows
    key = "x".join(map(str, x.shape[1:])).encode()
    # about 0.3 s for CIFAR-10's 50,000 training images on one core
    return np.frombuffer(b"".join(hashlib.blake2b(x[i].data, digest_size=8, key=key).digest() for i in rows),
                         dtype="<u8").astype(np.uint64)


def path_hashes(paths: Sequence[str]) -> np.ndarray:
    """One 64-bit BLAKE2b hash per path (as :class:`~cifarlab.data.Dataset` names its images)."""
    return np.frombuffer(b"".join(hashlib.blake2b(p.encode(), digest_size=8).digest() for p in paths),
                         dtype="<u8").astype(np.uint64)


class Record(NamedTuple):
    """What a run recorded (:func:`read`), each array sorted."""

    pixels: np.ndarray  # hashes of the pixels of the images it trained and validated on
    paths: np.ndarray  # hashes of their paths (empty where the data names none)
    trained: np.ndarray | None  # pixel hashes of those it trained on; None in records of an older cifarlab
    inherited: np.ndarray  # pixel hashes of the images the weights it started from learnt from (empty: none)

    @property
    def saw(self) -> np.ndarray:
        """The pixel hashes of every image not to test the run on: those it trained or
        validated on, and those its starting weights learnt from."""
        return np.union1d(self.pixels, self.inherited)

    @property
    def learnt(self) -> np.ndarray | None:
        """The pixel hashes of every image the run's weights learnt from: those it trained on
        and those its starting weights learnt from (not its validation images, which it only
        measured itself on); None where the record does not tell them apart."""
        return None if self.trained is None else np.union1d(self.trained, self.inherited)


def record(path: str | Path, x: np.ndarray, rows: Sequence[int], paths: Sequence[str], trained: Sequence[int],
           inherited: np.ndarray | None = None) -> None:
    """Write the hashes of the images ``x[rows]``, named ``paths`` (empty where unnamed), with
    which of them (``trained``, a part of ``rows``) it trained on, and the pixel hashes
    ``inherited`` that the run it started from learnt from (its :attr:`Record.learnt`; None:
    it started from no run, or from one whose record does not tell), to ``path`` (a run's
    :data:`FILE`), atomically."""
    from safetensors.numpy import save

    from ..fsutil import write_bytes

    tensors = {"pixels": np.sort(pixel_hashes(x, rows)), "paths": np.sort(path_hashes(paths)),
               "trained": np.sort(pixel_hashes(x, trained))}
    if inherited is not None and len(inherited):  # a record without it reads as before
        tensors["inherited"] = np.unique(inherited).astype(np.uint64)
    write_bytes(path, save(tensors, metadata={"format": _FORMAT}))  # bytes first: see export.save_weights


def read(run: str | Path) -> Record | None:
    """What a run recorded (:class:`Record`), or None where it recorded nothing (a run trained
    before cifarlab kept records, or imported from Keras). The format is one: ``trained`` and
    ``inherited`` came later, and a record without them reads as one with none inherited and
    its trained images unknown."""
    from safetensors import SafetensorError, safe_open

    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            if (f.metadata() or {}).get("format") != _FORMAT:
                raise DataError(f"{path}: not a record of a run's images ({_FORMAT!r}); remove it, or train again")
            keys = set(f.keys())
            return Record(f.get_tensor("pixels"), f.get_tensor("paths"),
                          f.get_tensor("trained") if "trained" in keys else None,
                          f.get_tensor("inherited") if "inherited" in keys else np.zeros(0, np.uint64))
    except (SafetensorError, OSError, KeyError) as e:
        raise DataError(f"{path}: not a readable record of a run's images ({e}); remove it, or train again") from None


def inherited_rows(run: str | Path, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The indices (of ``rows``, default every image of ``x``) of the images with the pixels of
    an image that the weights ``run`` started from had learnt from (:attr:`Record.inherited`):
    its own weights carry what they learnt, so they are no fair images to calibrate it or to set
    its thresholds on. Empty where the run started from no run, or keeps no record."""
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    rec = read(run)
    return rows[among(x, rows, None if rec is None else rec.inherited)]


def among(x: np.ndarray, rows: np.ndarray, hashes: np.ndarray | None) -> np.ndarray:
    """Whether each image ``x[rows]`` has the pixels of an image of ``hashes`` (pixel hashes,
    such as a :class:`Record`'s), one bool per row; all False where ``hashes`` is None or empty
    (nothing is hashed then)."""
    rows = np.asarray(rows, np.int64)
    if hashes is None or not len(hashes) or not len(rows):
        return np.zeros(len(rows), bool)
    return np.isin(pixel_hashes(x, rows.tolist()), hashes)


def learnt_from(run: str | Path, x: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """The indices, sorted, of the training images ``x`` that the weights of ``run`` learnt
    from: ``trained``, those it trained on, and those that the weights it started from had
    learnt from (:func:`inherited_rows`)."""
    return np.union1d(trained, inherited_rows(run, x)).astype(np.int64)


def test_split_for(ds: Dataset, runs: Sequence[str | Path]) -> tuple[Dataset, str | None]:
    """The test images on which to evaluate ``runs`` (one run, or the runs of a set or of a
    comparison), with a note saying what was chosen (None where nothing changed).

    Data that names its test images keeps them (a note counts those with the pixels of an image
    a run trained or validated on, or inherited: :attr:`Record.saw`). Data whose test split was
    held out (``ds.test_origin``) keeps it where it is every run's own data: every image each
    run trained or validated on, by its path, lies in the data's training part, with the pixels
    it saw (checked on a sample); a note counts those test images too. Otherwise every image of
    the data is a test image, but for those of a run's :attr:`Record.saw`. A run without a
    record (:func:`read`) keeps the held-out split, as before such records were kept."""
    from . import every_image_as_test

    records = [(Path(r), read(r)) for r in runs]
    who = "the run" if len(records) == 1 else "one of the runs"
    missing = [str(r) for r, rec in records if rec is None]
    started = any(rec is not None and len(rec.inherited) for _, rec in records)
    seen_by = (f"an image {who} trained or validated on" +
               (", or that the weights it started from had learnt from" if started else ""))
    if missing and ds.test_origin != "held-out":
        return ds, None
    if missing:
        return ds, (f"{', '.join(missing)} records no images it trained on ({FILE}: made by an older cifarlab, or "
                    f"imported), so {ds.source} keeps its held-out test split; on data the run was not trained on, "
                    "that is a share of the images only")
    own = ds.test_origin == "held-out" and _all_in(ds, [rec for _, rec in records])
    if ds.test_origin != "held-out" or own:  # the test images stay; a note counts those seen
        n = int(np.isin(pixel_hashes(ds.x_test), np.concatenate([rec.saw for _, rec in records])).sum())
        named = "as the data names its test images" if not own else "as the run's own held-out test split"
        return ds, (f"{n:,} of the {len(ds.x_test):,} test images of {ds.source} have the pixels of {seen_by}; they "
                    f"stay in, {named}" if n else None)
    everything = every_image_as_test(ds)
    keep = ~np.isin(pixel_hashes(everything.x_test), np.concatenate([rec.saw for _, rec in records]))
    n_all, n_keep = len(keep), int(keep.sum())
    if n_keep == 0:
        raise DataError(f"{ds.source}: every one of its {n_all:,} images has the pixels of {seen_by}, so none is "
                        "left to test it on")
    ds = everything if n_keep == n_all else _take(everything, keep)
    left = f", leaving out {n_all - n_keep:,} with the pixels of {seen_by}" if n_keep < n_all else ""
    return ds, (f"{ds.source} is not the data {who} was trained on (its training images are not all in it), so "
                f"every image is a test image, not the held-out split alone: {n_keep:,} of {n_all:,}{left}")


def trained_on(ds: Dataset, runs: Sequence[str | Path]) -> bool | None:
    """Whether ``ds`` is the data ``runs`` were trained on (:func:`_all_in`); None where a run
    keeps no record (:func:`read`)."""
    records = [read(r) for r in runs]
    return None if any(rec is None for rec in records) else _all_in(ds, records)


# how many of a run's images, found in the data by their paths, have their pixels checked: a
# sample, as hashing every training image's pixels costs about 0.3 s per 50,000
_PIXEL_SAMPLE = 256
# the share of that sample that must have the pixels the run recorded: other images under the
# same names (another folder of cat/0001.png ...) match almost none; the run's data with a few
# images edited since still counts as its own
_PIXEL_MATCH = 0.9


def _all_in(ds: Dataset, records) -> bool:
    """Whether each image each run (by its :func:`read` record) trained or validated on, by its
    path, is among ``ds``'s training images, and those images are the ones it saw: an evenly
    spread sample of them has the pixels it recorded."""
    hashes = path_hashes(ds.train_paths)
    have = set(hashes.tolist())
    if not all(have.issuperset(rec.paths.tolist()) for rec in records):
        return False
    for rec in records:
        found = np.flatnonzero(np.isin(hashes, rec.paths))
        if not len(found):
            continue
        sample = found[np.unique(np.linspace(0, len(found) - 1, min(len(found), _PIXEL_SAMPLE)).astype(np.int64))]
        if np.isin(pixel_hashes(ds.x_train, sample.tolist()), rec.pixels).mean() < _PIXEL_MATCH:
            return False
    return True


def _take(ds: Dataset, keep: np.ndarray) -> Dataset:
    idx = np.flatnonzero(keep)
    return dataclasses.replace(ds, x_test=ds.x_test[idx], y_test=ds.y_test[idx],
                               test_paths=[ds.test_paths[i] for i in idx])
