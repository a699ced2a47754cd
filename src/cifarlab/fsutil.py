"""File system helpers: atomic writes (never leave a half-written file where a good one was),
reading back the JSON files written so, run folders, and a fast listing of a folder tree."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CifarlabError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a crash,
    a full disk or a kill at any instant leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        check_folder_path(path.parent)  # a file where a folder should be gets its own message
        raise CifarlabError(f"cannot write to folder '{path.parent}': {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        set_final_mode(tmp_path, replacing=path)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise CifarlabError(f"could not write '{path}': {e.strerror or e}; the previous file (if any) is intact") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, without changing it where Linux shows it in /proc (elsewhere it is
    read the only portable way, by setting it and setting it back)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_final_mode(tmp: str | os.PathLike, replacing: str | os.PathLike | None = None) -> None:
    """Give a temporary file or folder, about to be renamed into place, the permissions a plain
    ``open()`` or ``mkdir()`` would have given it: those of the file it replaces, if any, else
    0666 less the umask (0777 for a folder, or a file its writer made executable, such as a
    compiled library). ``mkstemp`` and ``mkdtemp`` create theirs private (0600, 0700), which
    would leave run folders and exported models unreadable to the rest of a group sharing them."""
    try:
        mode = stat.S_IMODE(os.stat(replacing).st_mode) if replacing is not None else None
    except OSError:
        mode = None
    if mode is None:
        st = os.stat(tmp)
        mode = (0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666) & ~umask()
    os.chmod(tmp, mode)


def check_folder_path(path: str | os.PathLike) -> None:
    """Refuse ``path`` as an output folder where a file stands in its place or in a parent's,
    before any work is done (:func:`make_folder` would refuse it only when it comes to write)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "exists and is a file" if p == path else f"cannot be created: '{p}' is a file"
                raise CifarlabError(f"output '{path}' {what}; give a folder path")
            return


def make_folder(path: str | os.PathLike, exist_ok: bool = True) -> Path:
    """Create the output folder ``path`` and its parents; any failure is a user error naming the
    folder and the reason. With ``exist_ok=False`` an existing folder raises FileExistsError, for
    the caller to handle."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CifarlabError(f"output '{path}' exists and is a file; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise CifarlabError(f"cannot create output folder '{path}': a file stands in its way") from None
    except OSError as e:
        raise CifarlabError(f"cannot create output folder '{path}': {e.strerror or e}") from None
    return path


def new_run_folder(out: str | os.PathLike | None, overwrite: bool, name: str,
                   remedy: str) -> tuple[Path, str | Path]:
    """The run folder, created: ``out``, or ``runs/<name>-<time>``; and what was there before:
    "empty", "used" (it held files and ``overwrite`` was given), or, where the folder was absent,
    the highest folder this call created (the run folder itself, or the first of its parents
    that did not exist, ``runs`` say), so that :func:`undo_on_failure` removes no more and no
    less. A non-empty ``out`` without ``overwrite`` is refused, the message ending in ``remedy``
    (what the user can do)."""
    if out:
        run = Path(out)
        if run.is_dir() and any(run.iterdir()) and not overwrite:
            raise CifarlabError(f"output folder '{run}' already exists and is not empty; {remedy}")
        before = _state_before(run)
        make_folder(run)
        return run, before
    # The folder is claimed by creating it (mkdir fails if it exists), so runs started in the
    # same second, by a sweep's parallel processes say, each get a folder of their own.
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        run = Path("runs") / f"{name}-{stamp}{f'-{n}' if n > 1 else ''}"
        created = _highest_absent(run)
        try:
            make_folder(run, exist_ok=False)
            return run, created
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends


def _state_before(path: Path) -> str | Path:
    """What an output folder about to be created or filled is now, for :func:`undo_on_failure`:
    "used" (it holds files), "empty", or, where it is absent, the highest folder that creating
    it will create."""
    return _highest_absent(path) if not path.is_dir() else "used" if any(path.iterdir()) else "empty"


def _highest_absent(path: Path) -> Path:
    """``path``'s highest folder that does not exist (``path`` itself where its parent exists)."""
    top = path
    while top.parent != top and not top.parent.exists():
        top = top.parent
    return top


@contextlib.contextmanager
def undo_on_failure(run: Path, before: str | Path) -> Iterator[None]:
    """If filling a new run folder fails (bad data, a model that cannot take the images, a Keras
    file that does not fit), remove what was written, so a corrected rerun with the same ``--out``
    is not refused and no empty ``runs`` folder is left behind. ``before`` is what
    :func:`new_run_folder` found: a folder that already held files ("used") is left as it is."""
    try:
        yield
    except BaseException:
        if isinstance(before, Path):
            shutil.rmtree(run, ignore_errors=True)
            # Then the parents it created, each only while empty (rmdir refuses otherwise): a
            # parallel run may have put its own folder in ``runs`` meanwhile.
            for parent in run.parents:
                if parent == before.parent:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
        elif before == "empty":
            for p in run.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def report_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create the report folder ``path`` (and its parents) for the block's files; if the block
    fails (interrupted predictions, a plot that cannot be drawn), remove what this call created,
    so no empty or partial report is left to be mistaken for one. A folder that already held
    files is left as it is."""
    path = Path(path)
    before = _state_before(path)
    make_folder(path)
    with undo_on_failure(path, before):
        yield path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def md_cell(text: Any) -> str:
    """A class or group name as one Markdown table cell: a '|' in it would split the cell."""
    return str(text).replace("|", "\\|")


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as standard JSON. NaN and infinities (an empty calibration bin, the precision of a
    class never predicted) become ``null``: JSON has no such numbers, and Python's ``NaN`` tokens
    break other readers (``jq``, browsers, JSON Schema). numpy values and paths are converted."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (see :func:`json_text`)."""
    write_text(path, json_text(obj) + "\n")


_ABSENT: Any = object()


def read_json(path: str | os.PathLike, expect: type = dict, absent: Any = _ABSENT) -> Any:
    """The JSON document in ``path``, one of the files cifarlab writes (a run's ``metrics.json``,
    ``history.json``), checked to be an ``expect`` (an object, or a list); ``absent`` where there
    is no such file, if given. A file that cannot be read, or is damaged (cut short, not UTF-8,
    not JSON, or another kind of document), is refused with its path and the reason, where it
    would have failed later with a traceback."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if absent is _ABSENT:
            raise CifarlabError(f"{path} does not exist; it is written by cifarlab (train, or the command of "
                                "its folder): run that again") from None
        return absent
    except OSError as e:
        raise CifarlabError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # not UTF-8, or not JSON: both are ValueErrors
        raise CifarlabError(f"{path} is damaged ({e}); it is written by cifarlab: restore it from a copy, or "
                            "run the command that writes it again") from None
    if not isinstance(doc, expect):
        kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                 bool: "true or false", type(None): "null"}
        raise CifarlabError(f"{path} is damaged: it holds {kinds[type(doc)]} where cifarlab writes {kinds[expect]}; "
                            "restore it from a copy, or run the command that writes it again")
    return doc


def _finite(o: Any) -> Any:
    """``o`` with every non-finite float, in any nesting of dicts, lists and tuples, made None."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if type(o).__module__ == "numpy":  # numpy scalars and arrays, without importing numpy here
        return _finite(_json_default(o))
    return o


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically create ``path`` by calling ``writer(tmp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def tree(root: str | os.PathLike) -> list[tuple[str, os.DirEntry]]:
    """Every file and folder under ``root`` as (its path relative to ``root``, with '/', its
    ``os.DirEntry``), as ``Path(root).rglob("*")`` lists them: hidden ones included, links to
    folders listed but not entered, unreadable folders passed over. In no set order.

    ``os.scandir`` with strings instead of ``pathlib``: for a folder of 50,000 images, listing
    and sorting ``Path`` objects took about 1.2 s, most of it in ``Path`` comparisons."""
    out: list[tuple[str, os.DirEntry]] = []
    stack = [("", os.fspath(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    out.append((prefix + e.name, e))
                    if e.is_dir() and not e.is_symlink():
                        stack.append((prefix + e.name + "/", e.path))
        except (PermissionError, NotADirectoryError, FileNotFoundError):
            continue
    return out
