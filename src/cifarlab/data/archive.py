"""Safe reading of tar archives: every member is checked before any is used.

cifarlab never extracts archives to disk; it reads members into memory. Even so, an archive
whose members are links, devices or paths that would leave a target folder is refused whole,
because such an archive is either corrupt or crafted.
"""

from __future__ import annotations

import gzip
import lzma
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from ..errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)


def is_archive(path: Path) -> bool:
    """True when ``path`` names a file whose suffix is a tar archive's."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def check_member(path: Path, m: tarfile.TarInfo) -> None:
    """Raise :class:`DataError` for a member that is a link, special file or escaping path."""
    if m.issym() or m.islnk():
        raise DataError(f"{path}: member '{m.name}' is a link (to '{m.linkname}'); archives with "
                        "links are refused, since a link can point outside the data folder")
    if not (m.isfile() or m.isdir()):
        raise DataError(f"{path}: member '{m.name}' is not a regular file or folder; refused")
    p = PurePosixPath(m.name)
    if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
        raise DataError(f"{path}: member '{m.name}' has a path that escapes the target folder; "
                        "the archive is refused")


def read_members(path: Path, want=lambda name: True, dirs: bool = False) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` for each regular file member whose name ``want`` accepts, in one pass.

    Every member is validated (see :func:`check_member`) before the result is returned, so a bad
    member anywhere refuses the whole archive. Truncated or corrupt compression is reported as
    :class:`DataError` naming the file. With ``dirs``, folders are listed too, as
    ``("name/", b"")``.
    """
    out = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:  # streaming: compressed archives are decompressed once
                check_member(path, m)
                if dirs and m.isdir():
                    out.append((m.name.rstrip("/") + "/", b""))
                elif m.isfile() and want(m.name):
                    f = tf.extractfile(m)
                    assert f is not None
                    out.append((m.name, f.read()))
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: the archive is truncated or corrupt ({type(e).__name__}: {e}). "
                        "Download it again or check the file.") from None
    return out


def first_name(path: Path) -> str:
    """Name of the first member (cheap: reads only the archive's head)."""
    try:
        with tarfile.open(path, "r:*") as tf:
            m = tf.next()
    except _READ_ERRORS as e:
        raise DataError(f"{path}: the archive is truncated or corrupt ({type(e).__name__}: {e}). "
                        "Download it again or check the file.") from None
    if m is None:
        raise DataError(f"{path}: the archive is empty")
    return m.name
