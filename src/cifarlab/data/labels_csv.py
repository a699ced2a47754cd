"""Images labelled by a CSV file rather than by class folders: ``file,label`` rows, as Keras'
``flow_from_dataframe`` and fastai's ``ImageDataLoaders.from_csv`` read them, and as CIFAR-10 is
published for Kaggle's competition (``train/1.png`` ... with ``trainLabels.csv``: ``id,label``).

A row's file is a path relative to the data's root, or that path without its suffix (an id such as
``1`` for ``1.png``), either perhaps through the root folder's own name (``train/1.png`` for
``--data train``, from a labels file beside that folder). The first row is a header unless it names an image. The file column is the
one headed file, filename, path, image, image_id, id or name, else the first; the label column the
one headed label, class, category or target, else the second.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import DataError
from .images import is_visible_image

FILE_HEADERS = ("file", "filename", "path", "image", "image_id", "id", "name")
LABEL_HEADERS = ("label", "class", "category", "target")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class Rows:
    """A labels file read: (line number, file, label) per row, and whether line 1 was a header."""

    path: Path
    rows: list[tuple[int, str, str]]
    header: bool


def read_rows(path: Path) -> Rows:
    """Read ``path``'s rows (comma, semicolon or tab separated; a UTF-8 byte-order mark, as
    spreadsheets write, is dropped). Blank lines are skipped; a row without a file or a label is
    refused with its line number."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"--labels '{path}' does not exist; give a CSV file of file,label rows") from None
    except IsADirectoryError:
        raise DataError(f"--labels '{path}' is a folder; give a CSV file of file,label rows") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"--labels '{path}' is not UTF-8 text (line {line}: {e.reason}); save it as UTF-8 (CSV UTF-8 "
                        "in a spreadsheet)") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # one column, or too few rows to tell: read as commas, refused below if wrong
    lines = [(i, [f.strip() for f in r]) for i, r in enumerate(csv.reader(text.splitlines(), dialect), 1)
             if any(f.strip() for f in r)]
    if not lines:
        raise DataError(f"--labels '{path}' holds no rows; expected file,label rows such as cat/0001.png,cat")
    first = [f.lower() for f in lines[0][1]]
    if len(first) < 2:
        raise DataError(f"--labels '{path}': line {lines[0][0]} has one column ({lines[0][1][0]!r}); expected two, "
                        "file and label, separated by commas, semicolons or tabs")
    fcol = next((first.index(h) for h in FILE_HEADERS if h in first), 0)
    lcol = next((first.index(h) for h in LABEL_HEADERS if h in first), 1 if fcol != 1 else 0)
    named = first[fcol] in FILE_HEADERS or first[lcol] in LABEL_HEADERS
    rows = []
    for i, fields in lines:
        if len(fields) <= max(fcol, lcol) or not fields[fcol] or not fields[lcol]:
            raise DataError(f"--labels '{path}': line {i} ({','.join(fields)!r}) lacks a file or a label; every row "
                            "needs both")
        rows.append((i, fields[fcol].replace("\\", "/").removeprefix("./"), fields[lcol]))
    return Rows(path, rows, header=named)


def _lookup(images: list[str], strip: int = 0) -> dict[str, str | None]:
    """Each way a row may name an image (its path after ``strip`` characters, and that path
    without the suffix) -> the image; None where two images answer to it (1.png and 1.jpg for
    the id 1)."""
    found: dict[str, str | None] = {}
    for n in images:
        for key in {n[strip:], str(PurePosixPath(n[strip:]).with_suffix(""))}:
            found[key] = None if key in found and found[key] != n else n
    return found


def assign(files: list[str], rows: Rows, source: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """The data's wrapper folder (or ''), each class's images, and notes: which rows name no
    image and which images no row names. A row naming two images, an image given two labels, or
    a file whose rows name none of its images is refused."""
    images = sorted(n for n in files if is_visible_image(n))
    if not images:
        raise DataError(f"{source}: no image files found to match with the labels in {rows.path}")
    tops = {n.split("/")[0] for n in images}
    prefix = tops.pop() + "/" if len(tops) == 1 and all("/" in n for n in images) else ""
    # with a wrapper folder (an archive of a folder), a row may name a path inside it or through it
    lookups = [_lookup(images)] + ([_lookup(images, len(prefix))] if prefix else [])
    # a labels file beside the images' folder may name paths through that folder (train/1.png)
    through = PurePosixPath(source.replace("\\", "/")).name + "/"

    def find(name: str) -> list[str | None]:
        keys = (name, name[len(through):]) if name.startswith(through) else (name,)
        return [lk[k] for k in keys for lk in lookups if k in lk][:1]

    entries = rows.rows[1:] if rows.header else rows.rows
    if not rows.header and not find(rows.rows[0][1]):
        entries = rows.rows[1:]  # a first row that names no image is a header, whatever it says
    label_of: dict[str, tuple[str, int]] = {}
    unmatched = []
    for line, name, label in entries:
        hits = find(name)
        if not hits:
            unmatched.append((line, name))
            continue
        if hits[0] is None:
            raise DataError(f"{rows.path}: line {line} names {name!r}, which matches more than one image in {source} "
                            "(the same name with different suffixes); give the file's full name")
        image = hits[0]
        if image in label_of and label_of[image][0] != label:
            raise DataError(f"{rows.path}: {image} is labelled {label_of[image][0]!r} on line {label_of[image][1]} "
                            f"and {label!r} on line {line}; give each image one label")
        label_of[image] = (label, line)
    if not label_of:
        first = entries[0][1] if entries else rows.rows[0][1]
        raise DataError(f"{rows.path}: none of its {len(entries)} row(s) names an image in {source} (first row's file "
                        f"{first!r}, first image {images[0]!r}). A row's file is a path under {source}, such as "
                        f"{images[0][len(prefix):]!r}, or that path without its suffix")
    by_class: dict[str, list[str]] = {}
    for image, (label, _) in sorted(label_of.items()):
        by_class.setdefault(label, []).append(image)
    notes = [f"labels from {rows.path}: {len(label_of)} image(s) in {len(by_class)} classes"]
    if unmatched:
        notes.append(f"{len(unmatched)} row(s) of {rows.path} name no image in {source} and are left out (first: "
                     f"{unmatched[0][1]!r} on line {unmatched[0][0]})")
    unlabelled = [n for n in images if n not in label_of]
    if unlabelled:
        notes.append(f"ignored {len(unlabelled)} image(s) that {rows.path} does not label (first: {unlabelled[0]})")
    return prefix, by_class, notes


def class_order(classes) -> list[str]:
    """Class names in order: by number where every one is an integer (2 before 10), else as text."""
    names = list(classes)
    if all(_INTEGER.fullmatch(c) for c in names):
        return sorted(names, key=int)
    return sorted(names)
