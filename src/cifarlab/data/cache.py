"""Where cifarlab keeps downloads and decoded arrays, the decoded-array cache itself, and the
inventory and clearing of everything cifarlab keeps there (``cifarlab cache``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    except (OSError, ValueError, KeyError, EOFError):  # EOFError: an empty array file
        return None
    mark_used(d / "meta.json")
    return arrays, meta


def mark_used(path: Path) -> None:
    """Record that a cached file was just read (its modification time), which is what
    ``cifarlab cache --clear --unused-days N`` goes by; a read-only cache is left as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


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


# cifarlab cache: what is kept, and clearing it ----------------------------------------------

KINDS = ("decoded", "downloads", "kernels")
KIND_TITLES = {"decoded": "decoded image folders and archives (read again from their source when removed)",
               "downloads": "official archives downloaded without --data (downloaded again when removed)",
               "kernels": "cifarlab's compiled CPU kernels (compiled again, in about 3 s, when removed)"}
# A temporary name untouched this long is a write that was stopped (killed, or the machine went
# down), not one in progress: a download or decoding touches its file or folder as it goes.
LEFTOVER_AGE_S = 3600
_KEY = re.compile(r"[0-9a-f]{32}")
_KEY_TEMP = re.compile(r"\.[0-9a-f]{32}\..+")  # store_cached's and remove_entry's temporary folders
_KERNEL = re.compile(r"cpu_kernels-[0-9a-f]{16}\.so")


@dataclass
class CacheEntry:
    """One thing cifarlab keeps in its cache folder (or left there, half written)."""

    kind: str  # one of KINDS
    path: Path
    size: int  # bytes
    last_used: float  # seconds since the epoch: when it was last read (or written)
    source: str = ""  # a decoded entry: the folder or archive it was decoded from
    read_with: tuple[str, ...] = ()  # and the options other than the defaults it was read with
    leftover: bool = False  # a temporary name that a stopped write left behind

    def describe(self) -> str:
        """What the entry holds, in one line's words: its source and options, or its file name."""
        if self.kind != "decoded" or self.leftover:
            return self.path.name
        return self.source + (f" ({', '.join(self.read_with)})" if self.read_with else "")

    def as_json(self) -> dict:
        """The entry as ``cifarlab cache --json`` lists it."""
        return {"kind": self.kind, "path": str(self.path), "bytes": self.size, "leftover": self.leftover,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used)),
                **({"source": self.source, "read_with": list(self.read_with)}
                   if self.kind == "decoded" and not self.leftover else {})}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _entry(kind: str, path: Path, now: float, stamp: Path | None = None, leftover: bool = False,
           **described: Any) -> CacheEntry | None:
    """The entry at ``path`` (``described``: its source and read_with), or None where it vanished
    meanwhile (another process cleared it) or, as a leftover, may still be being written."""
    try:
        used = (stamp or path).stat().st_mtime
        if leftover and now - used < LEFTOVER_AGE_S:
            return None
        return CacheEntry(kind, path, _size(path), used, leftover=leftover, **described)
    except OSError:
        return None


def _decoded_source(entry: Path) -> dict[str, Any]:
    """The folder or archive a decoded entry came from (``source``), and the options it was read
    with (``read_with``)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        source, options = meta.get("source"), meta.get("read_with")
    except (OSError, ValueError, AttributeError):  # a half-removed entry, or one of another tool
        source, options = None, None
    return {"source": str(source) if source else "(source not recorded)",
            "read_with": tuple(map(str, options)) if isinstance(options, list) else ()}


def cache_entries(now: float | None = None) -> list[CacheEntry]:
    """Everything cifarlab keeps in :func:`cache_dir`, by kind, most recently used first. Only
    names that cifarlab writes are listed; anything else in that folder is someone else's and is
    neither listed nor ever removed (``$CIFARLAB_CACHE`` may name a folder shared with other files)."""
    from .cifar import FORMATS

    now = time.time() if now is None else now
    root = cache_dir()
    found: list[CacheEntry | None] = []
    for child in _children(root / "decoded"):
        if _KEY.fullmatch(child.name) and child.is_dir():
            found.append(_entry("decoded", child, now, child / "meta.json", **_decoded_source(child)))
        elif _KEY_TEMP.fullmatch(child.name):
            found.append(_entry("decoded", child, now, leftover=True))
    archives = {f.archive_name for f in FORMATS.values()}
    for child in _children(root):
        if child.name in archives and child.is_file():
            found.append(_entry("downloads", child, now))
        elif child.name.endswith(".part") and any(child.name.startswith(f".{a}.") for a in archives):
            found.append(_entry("downloads", child, now, leftover=True))
    for child in _children(root / "kernels"):
        if _KERNEL.fullmatch(child.name) and child.is_file():
            found.append(_entry("kernels", child, now))
        elif child.name.startswith(".cpu_kernels-"):  # atomic_path's temporary and the source beside it
            found.append(_entry("kernels", child, now, leftover=True))
    entries = [e for e in found if e is not None]
    return sorted(entries, key=lambda e: (KINDS.index(e.kind), e.leftover, -e.last_used, str(e.path)))


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # absent (nothing cached yet) or unreadable
        return []


def remove_entry(entry: CacheEntry) -> bool:
    """Remove one cached entry; False where it was already gone. A decoded entry is first renamed
    out of its key's place, so a process loading it at that moment finds it whole or not at all
    (and then decodes its source again)."""
    path = entry.path
    try:
        if path.is_dir() and not path.is_symlink():
            if not entry.leftover:
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.removing.", dir=path.parent))
                os.replace(path, aside / "entry")
                path = aside
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def clear_entries(entries: list[CacheEntry], kinds: tuple[str, ...], unused_days: float | None = None,
                  now: float | None = None) -> list[CacheEntry]:
    """Remove the entries of ``kinds`` not used for ``unused_days`` days (all of them where it is
    None), and every one of those kinds that a stopped write left behind, whatever its age: it
    would never be read. Returns the entries removed (not those another process removed first)."""
    now = time.time() if now is None else now
    removed = []
    for e in entries:
        if e.kind in kinds and (e.leftover or unused_days is None or now - e.last_used > unused_days * 86400) \
                and remove_entry(e):
            removed.append(e)
    return removed


def format_size(n: int) -> str:
    """Bytes as people read them on disk: 184.3 MB (powers of 1000, as ``df -H`` and file managers)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
