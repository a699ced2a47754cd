"""Image-folder data: ``train/<class>/*`` and ``test/<class>/*``, or ``<class>/*`` alone, in a folder or a
tar or zip archive."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..fsutil import tree
from ..progress import progress
from . import archive, labels_csv
from .images import is_gray, is_image_name, is_visible_image, open_image, to_array

SPLITS = ("train", "test")


@dataclass
class FolderData:
    """Decoded image-folder data; ``paths`` are relative to the folder or archive root."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    paths: dict[str, list[str]]
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    test_origin: str = "named"  # "held-out" where the folder names no test images (see Dataset.test_origin)
    skipped: int = 0  # unreadable image files left out (skip_bad)


# Below this many files, starting worker processes costs more than decoding in this one.
POOL_MIN_FILES = 2000
TEST_SPLIT = 0.2  # the share of each class held out for testing from a folder of class folders


def _held_out(names: list[str], fraction: float) -> set[str]:
    """The ``fraction`` of ``names`` (one class's images) held out for testing: those whose
    path's SHA-256 comes first. The choice depends on the paths alone (no seed, no file order),
    so every command, on any machine, holds out the same images, and adding an image moves at
    most one other."""
    k = round(fraction * len(names))
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:k])


def _class_folders(norm: list[str], source: str, test_split: float
                   ) -> tuple[str, dict[str, list[tuple[str, str]]], list[str]]:
    """The layout without train/ and test/: <class>/<image>, perhaps in one wrapper folder. Each
    class's images are split into train and test by :func:`_held_out`."""
    images = [n for n in norm if is_visible_image(n)]
    prefix = ""
    tops = {n.split("/")[0] for n in images}
    if len(tops) == 1 and any(n.count("/") >= 2 for n in images):
        prefix = tops.pop() + "/"  # one wrapper folder, as an archive of a folder holds
    by_class: dict[str, list[str]] = {}
    misplaced = []
    for n in images:
        parts = n[len(prefix):].split("/")
        if len(parts) == 2:
            by_class.setdefault(parts[0], []).append(n)
        else:
            misplaced.append(n[len(prefix):])
    if not by_class:
        raise DataError(f"{source}: no class folders found. An image folder must hold train/<class>/<image> and "
                        "test/<class>/<image> (for example train/cat/0001.jpg), or <class>/<image> alone (for "
                        "example cat/0001.jpg), from which a test split is held out; images outside class folders need a "
                        "CSV file of their labels (--labels)")
    return prefix, _split_classes(by_class, test_split, lambda c: f"{source}: class folder '{prefix}{c}'"), \
        sorted(misplaced)


def _split_classes(by_class: dict[str, list[str]], test_split: float, what: Callable[[str], str]
                   ) -> dict[str, list[tuple[str, str]]]:
    """(path, class) per split, ``test_split`` of each class's paths held out (:func:`_held_out`);
    a class too small to split is refused, named by ``what(class)``."""
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for c, members in sorted(by_class.items()):
        test = _held_out(members, test_split)
        if not test or len(test) == len(members):
            raise DataError(f"{what(c)} holds {len(members)} image(s), too few to hold out a test split of "
                            f"{test_split:g} and train on the rest; add images, or give another --test-split")
        items["test"] += [(n, c) for n in members if n in test]
        items["train"] += [(n, c) for n in members if n not in test]
    return items


def _labelled(files: list[str], labels: Path, source: str, test_split: float
              ) -> tuple[str, dict[str, list[tuple[str, str]]], list[str], list[str]]:
    """The layout of images labelled by a CSV file: the wrapper folder (or ''), (path, class) per
    split with ``test_split`` of each class held out (:func:`_held_out`), the classes, and notes."""
    rows = labels_csv.read_rows(Path(labels))
    prefix, by_class, notes = labels_csv.assign(files, rows, source)
    items = _split_classes(by_class, test_split, lambda c: f"{rows.path}: class {c!r}")
    return prefix, items, labels_csv.class_order(by_class), notes + [_held_out_note(items, test_split)]


def _held_out_note(items: dict[str, list[tuple[str, str]]], test_split: float) -> str:
    n_test = len(items["test"])
    return (f"held out {test_split:g} of each class's images for testing ({n_test} of {n_test + len(items['train'])}), "
            "by their paths, the same in every command")


_HELD_OUT_NOTE = re.compile(r"(, and )?held out \S+ of each class's images for testing \(\d+ of \d+\), by their paths, "
                            r"the same in every command$")


def without_held_out(notes: list[str]) -> list[str]:
    """``notes`` without what they say of a held-out test split (:func:`_held_out_note`), for
    data whose every image became a test image."""
    return [kept for n in notes if (kept := _HELD_OUT_NOTE.sub("", n))]


def _in_class_folder(name: str, prefix: str) -> bool:
    """True for a file (not a folder, not hidden) directly in a class folder under ``prefix``."""
    parts = name[len(prefix):].split("/") if name.startswith(prefix) else []
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


def _index(names: list[str], source: str, test_split: float = TEST_SPLIT
           ) -> tuple[str, dict[str, list[tuple[str, str]]], list[str], bool]:
    """Find the root holding train/ and test/ and list (path, class) per split, the image
    files under train/ or test/ that are not directly in a class folder (they are not read),
    and whether the folder held class folders alone, split here (see :func:`_class_folders`)."""
    norm = [n.strip("/") for n in names]
    prefix = ""
    if not any(n.startswith("train/") for n in norm):
        tops = {n.split("/")[0] for n in norm if n.count("/") >= 2}
        cands = [t for t in tops if any(n.startswith(f"{t}/train/") for n in norm)]
        if len(cands) == 1:
            prefix = cands[0] + "/"
        else:
            return (*_class_folders(norm, source, test_split), True)
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    misplaced: list[str] = []
    for n in norm:
        if not n.startswith(prefix):
            continue
        parts = n[len(prefix):].split("/")
        if parts[0] not in SPLITS or not parts[-1] or any(p.startswith(".") for p in parts):
            continue
        if len(parts) == 3:
            items[parts[0]].append((n, parts[1]))
        elif is_image_name(n):
            misplaced.append(n[len(prefix):])
    return prefix, items, sorted(misplaced), False


def _classes(items: dict[str, list[tuple[str, str]]], dirs: dict[str, set[str]], source: str,
             misplaced: list[str]) -> list[str]:
    train_classes = sorted(dirs["train"] | {c for _, c in items["train"]})
    if not train_classes:
        raise DataError(f"{source}: train/ holds no class folders; expected train/<class>/<image>")
    for split in SPLITS:
        counts = Counter(c for p, c in items[split] if is_image_name(p))
        empty = [c for c in sorted(dirs[split] | set(counts)) if counts[c] == 0]
        if empty:
            deeper = [m for m in misplaced if tuple(m.split("/")[:2]) in {(split, c) for c in empty}]
            hint = (f"; {len(deeper)} image(s) sit in subfolders of them (first: {deeper[0]}), but only "
                    f"{split}/<class>/<image> is read: move them up" if deeper else "; remove them or add images")
            raise DataError(f"{source}: class folder(s) {', '.join(f'{split}/{c}' for c in empty)} hold no images "
                            f"(jpg, png, bmp, gif, tiff, webp, ppm){hint}")
    extra = sorted({c for _, c in items["test"]} - set(train_classes))
    if extra:
        raise DataError(f"{source}: test/ has classes not in train/: {', '.join(extra)}")
    if not items["test"]:
        raise DataError(f"{source}: no test/<class>/<image> files found; both train/ and test/ are needed")
    return train_classes


def _decode_one(item: tuple[str, bytes]) -> tuple[str, object]:
    """One file decoded to (array, is grayscale, Pillow mode), or its DataError."""
    name, data = item
    try:
        im = open_image(data, name)
        gray = is_gray(im)
        return name, (to_array(im, 1 if gray else 3), gray, im.mode)
    except DataError as e:
        return name, e


def _decode_all(blobs: list[tuple[str, bytes]], skip_bad: bool, source: str,
                workers: int) -> tuple[list[tuple[str, tuple]], list[str]]:
    if workers > 1 and len(blobs) > POOL_MIN_FILES:
        # Processes, not threads: decoding tiny JPEGs is dominated by Python-level overhead that
        # holds the GIL, so threads ran slower than one core here.
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            results = list(progress(pool.imap(_decode_one, blobs, chunksize=1000), len(blobs), "Decoding", "image"))
    else:
        results = [_decode_one(b) for b in progress(blobs, len(blobs), "Decoding", "image")]
    bad = [(n, r) for n, r in results if isinstance(r, DataError)]
    if bad and not skip_bad:
        shown = "; ".join(str(e) for _, e in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{source}: {len(bad)} unreadable image file(s): {shown}{more}. Fix or remove them, "
                        "or pass --skip-bad-images to leave them out")
    notes = [f"skipped {len(bad)} unreadable image file(s), first: {bad[0][0]}"] if bad else []
    return [(n, r) for n, r in results if not isinstance(r, DataError)], notes


def _conform(arr: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Bring one decoded array to ``channels`` and ``size`` (H, W)."""
    if arr.shape[:2] != size:
        mode = "L" if arr.shape[2] == 1 else "RGB"
        arr = to_array(Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode), arr.shape[2], size)
    if arr.shape[2] != channels:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def load_image_folder(path: Path, skip_bad: bool = False, workers: int | None = None,
                      size: tuple[int, int] | None = None, test_split: float = TEST_SPLIT,
                      labels: Path | None = None) -> FolderData:
    """Read and decode an image folder or archive; all images end up one size and mode.

    A folder of class folders alone, without train/ and test/, has ``test_split`` of each
    class's images held out for testing (see :func:`_held_out`). With ``labels``, a CSV file
    naming each image's class (:mod:`.labels_csv`), the images it names are read wherever they
    lie, and a test split is held out of them the same way.

    Images are resized (bilinear) to ``size`` (H, W), by default the most common size, each
    from its decoded file; grayscale is kept as one channel
    only when every image is grayscale, else everything becomes RGB. Each conversion is counted
    in ``notes``.
    """
    source = str(path)
    workers = workers or os.cpu_count() or 1
    dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
    if path.is_dir():
        names = [rel + ("/" if e.is_dir() else "") for rel, e in tree(path)]
        members = None
    else:
        # Every member, not just images: non-image files must be listed to be counted as ignored.
        members = archive.read_members(path, dirs=True)
        names = [n for n, _ in members]
    files = [n for n in names if not n.endswith("/")]
    if labels is not None:
        prefix, items, classes, notes_before = _labelled(files, labels, source, test_split)
        misplaced, layout = [], "labels"
    else:
        prefix, items, misplaced, flat = _index(files, source, test_split)
        notes_before, layout = [], "class-folders" if flat else "split"
    for n in names:
        parts = n.strip("/")[len(prefix):].split("/") if n.startswith(prefix) else []
        if n.endswith("/") and len(parts) == 2 and parts[0] in SPLITS and not parts[1].startswith("."):
            dirs[parts[0]].add(parts[1])
    wanted = {n for s in SPLITS for n, _ in items[s] if is_image_name(n)}
    if path.is_dir():
        blobs = [(n, (path / n).read_bytes()) for n in sorted(wanted)]
    else:
        blobs = [(n.strip("/"), b) for n, b in members if n.strip("/") in wanted]
        del members
    if layout != "labels":  # a labels file names the classes; folders are not looked at
        classes = _classes(items, dirs, source, misplaced)
    ignored = sum(1 for s in SPLITS for n, _ in items[s] if not is_image_name(n))
    if layout == "class-folders":  # its index keeps images only; count the other files in class folders here
        ignored = sum(1 for n in names if _in_class_folder(n, prefix) and not is_image_name(n))
    decoded, notes = _decode_all(blobs, skip_bad, source, workers)
    skipped = len(blobs) - len(decoded)
    del blobs
    notes = notes_before + notes
    if ignored:
        notes.append(f"ignored {ignored} file(s) without an image suffix")
    if misplaced:
        read = "<class>/<image>" if layout == "class-folders" else "train/<class>/<image> and test/<class>/<image>"
        notes.append(f"ignored {len(misplaced)} image(s) not directly in a class folder (first: {misplaced[0]}); "
                     f"only {read} are read")
    if layout == "class-folders":
        notes.append(f"no train/ and test/ folders: read {len(classes)} class folders, and "
                     + _held_out_note(items, test_split))
    if not decoded:
        raise DataError(f"{source}: no readable images")
    sizes = Counter(a.shape[:2] for _, (a, _, _) in decoded)
    given = size is not None
    size = tuple(size) if given else sizes.most_common(1)[0][0]
    channels = 1 if all(g for _, (_, g, _) in decoded) else 3
    resized = sum(n for s, n in sizes.items() if s != size)
    if resized:
        to = f"{size[0]}x{size[1]} (the image size asked for, HxW)" if given else \
            f"the most common size {size[0]}x{size[1]} (HxW, as --image-size takes it)"
        notes.append(f"resized {resized} image(s) to {to}")
    want_mode = "L" if channels == 1 else "RGB"
    converted = sum(1 for _, (_, _, mode) in decoded if mode != want_mode)
    if converted:
        notes.append(f"converted {converted} image(s) to {want_mode}")
    arrays = {n: _conform(a, channels, size) for n, (a, _, _) in decoded}
    cls_index = {c: i for i, c in enumerate(classes)}
    out_x, out_y, out_p = {}, {}, {}
    for s in SPLITS:
        rows = sorted((n[len(prefix):], c) for n, c in items[s] if n in arrays)
        if not rows:
            raise DataError(f"{source}: no readable images in {s}/")
        out_x[s] = np.stack([arrays[prefix + n] for n, _ in rows])
        out_y[s] = np.array([cls_index[c] for _, c in rows], dtype=np.int64)
        out_p[s] = [n for n, _ in rows]
    return FolderData(out_x, out_y, out_p, classes, notes, test_origin="named" if layout == "split" else "held-out",
                      skipped=skipped)
