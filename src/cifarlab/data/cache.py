"""Where cifarlab keeps downloads and decoded arrays, and the decoded-array cache itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..fsutil import set_final_mode, tree

# Bump when the decoded layout or the decoding rules change, so stale caches are not reused.
CACHE_VERSION = 2  # 2: images turned upright by their EXIF orientation


def cache_dir() -> Path:
    """The cache root: ``$CIFARLAB_CACHE``, else ``$XDG_CACHE_HOME/cifarlab``, else ``~/.cache/cifarlab``."""
    env = os.environ.get("CIFARLAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cifarlab"


def source_key(path: Path, **options) -> str:
    """A key for the decoded cache that changes whenever the source's content does.

    An archive is hashed byte for byte (SHA-256; about 0.1 s for the 19 MB JPEG copy). A folder
    is keyed by every file's relative path, size and modification time, since reading 60,000
    files to hash them would cost more than the cache saves.
    """
    h = hashlib.sha256(f"v{CACHE_VERSION} {json.dumps(options, sort_keys=True)}".encode())
    path = path.resolve()
    if path.is_file():
        _hash_file(h, path)
    else:
        # sorted by path components, as Path objects sort, so the keys stay those of earlier versions
        for rel, entry in sorted(tree(path), key=lambda item: item[0].split("/")):
            try:
                st = entry.stat()  # a link's target, as Path.stat
            except OSError:  # a broken link: its reader says so if it is an image
                h.update(f"{rel}\0?\n".encode())
                continue
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)


def file_digest(path: Path) -> str | None:
    """The SHA-256 of a file's bytes, for a key; None where it cannot be read (its reader then
    says why)."""
    h = hashlib.sha256()
    try:
        _hash_file(h, path)
    except OSError:
        return None
    return h.hexdigest()


def load_cached(key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and metadata cached under ``key``, or None if absent or unreadable."""
    d = cache_dir() / "decoded" / key
    try:
        meta = json.loads((d / "meta.json").read_text())
        arrays = {name: np.load(d / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
        return arrays, meta
    except (OSError, ValueError, KeyError, EOFError):  # EOFError: an empty array file
        return None


def store_cached(key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and metadata under ``key``: a temporary folder renamed into place at once,
    replacing an entry already there (one that an older cifarlab wrote without what this one
    reads, say: a folder cannot be renamed onto a full one, so it is moved aside first).

    Failure to write (read-only or full disk) is silently ignored: the cache is an optimisation.
    """
    root = cache_dir() / "decoded"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    except OSError:
        return
    try:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": list(arrays)}))
        set_final_mode(tmp)
        old = None
        if (root / key).exists():
            old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=root))
            os.replace(root / key, old / "entry")
        os.replace(tmp, root / key)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
