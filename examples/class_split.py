"""Split an image-folder archive or folder by class into two image folders, to try
``cifarlab train --init-from``: train on the first classes, then fine-tune on the others.

Usage: python examples/class_split.py DATA OUT CLASS[,CLASS...]

Writes OUT/a (the classes named, train/ and test/) and OUT/b (every other class), copying the
image files as they are. DATA is a folder or a .tar/.tar.gz/.tar.xz/.zip archive in the
train/<class>/*, test/<class>/* layout, as the JPEG copy of CIFAR-10 is.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def image_folder_root(data: Path, into: Path) -> Path:
    """The folder holding train/ and test/: ``data`` itself, or where its archive unpacked."""
    if data.is_dir():
        root = data
    elif zipfile.is_zipfile(data):
        with zipfile.ZipFile(data) as z:
            z.extractall(into)
        root = into
    else:
        with tarfile.open(data) as t:
            t.extractall(into, filter="data")  # no links or paths outside ``into``
        root = into
    while not (root / "train").is_dir() and len(subs := [p for p in root.iterdir() if p.is_dir()]) == 1:
        root = subs[0]  # an archive with one top folder
    if not (root / "train").is_dir():
        sys.exit(f"{data}: no train/ folder; expected train/<class>/* and test/<class>/*")
    return root


def main(data: str, out: str, first: str) -> None:
    out_path = Path(out)
    if out_path.exists():
        sys.exit(f"{out} exists; give a new folder")
    wanted = [c.strip() for c in first.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = image_folder_root(Path(data), Path(tmp))
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        unknown = [c for c in wanted if c not in classes]
        if unknown or not wanted or len(wanted) == len(classes):
            sys.exit(f"give some, not all, of the classes {', '.join(classes)}; got {first!r}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}-"))
        try:
            for part, names in (("a", wanted), ("b", [c for c in classes if c not in wanted])):
                for split in ("train", "test"):
                    for c in names:
                        if (root / split / c).is_dir():
                            shutil.copytree(root / split / c, staging / part / split / c)
            staging.rename(out_path)  # whole or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out}/a ({', '.join(wanted)}) and {out}/b (the other {len(classes) - len(wanted)} classes)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
