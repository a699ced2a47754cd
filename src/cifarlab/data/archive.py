"""Safe reading of tar and zip archives: every member is checked before any is used.

cifarlab never extracts archives to disk; it reads members into memory. Even so, an archive
whose members are links, devices or paths that would leave a target folder is refused whole,
because such an archive is either corrupt or crafted.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..errors import DataError
from ..progress import byte_progress

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile,
                OSError)
# A zip member declares its size before it is read (and reading stops there), so a zip bomb is
# refused unread; no file of an image data set comes near this (CIFAR's largest is 31 MB).
MAX_ZIP_MEMBER_BYTES = 1 << 30


def is_archive(path: Path) -> bool:
    """True when ``path`` names a file whose suffix is a tar or zip archive's."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_zip(path: Path) -> bool:
    return path.name.lower().endswith(".zip")


def _check_path(path: Path, name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
        raise DataError(f"{path}: member '{name}' has a path that escapes the target folder; "
                        "the archive is refused")


def check_member(path: Path, m: tarfile.TarInfo) -> None:
    """Raise :class:`DataError` for a member that is a link, special file or escaping path."""
    if m.issym() or m.islnk():
        raise DataError(f"{path}: member '{m.name}' is a link (to '{m.linkname}'); archives with "
                        "links are refused, since a link can point outside the data folder")
    if not (m.isfile() or m.isdir()):
        raise DataError(f"{path}: member '{m.name}' is not a regular file or folder; refused")
    _check_path(path, m.name)


def check_zip_member(path: Path, m: zipfile.ZipInfo) -> None:
    """As :func:`check_member` for a zip member; also refuses encrypted and oversized members."""
    kind = stat.S_IFMT(m.external_attr >> 16)  # a Unix file type, where the zip recorded one (else 0)
    if kind == stat.S_IFLNK:
        raise DataError(f"{path}: member '{m.filename}' is a link; archives with links are refused, since a "
                        "link can point outside the data folder")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DataError(f"{path}: member '{m.filename}' is not a regular file or folder; refused")
    _check_path(path, m.filename)
    if m.flag_bits & 0x1:
        raise DataError(f"{path}: member '{m.filename}' is encrypted; give an archive without a password")
    if m.file_size > MAX_ZIP_MEMBER_BYTES:
        raise DataError(f"{path}: member '{m.filename}' would unpack to {m.file_size:,} bytes, more than any "
                        f"image data file needs ({MAX_ZIP_MEMBER_BYTES:,}); the archive is refused")


def _corrupt(path: Path, e: BaseException) -> DataError:
    return DataError(f"{path}: the archive is truncated or corrupt ({type(e).__name__}: {e}). "
                     "Download it again or check the file.")


def read_members(path: Path, want=lambda name: True, dirs: bool = False) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` for each regular file member whose name ``want`` accepts, in one pass.

    Every member is validated (see :func:`check_member`) before the result is returned, so a bad
    member anywhere refuses the whole archive. Truncated or corrupt compression is reported as
    :class:`DataError` naming the file. With ``dirs``, folders are listed too, as
    ``("name/", b"")``.
    """
    if _is_zip(path):
        return _read_zip(path, want, dirs)
    out = []
    try:
        # The file opened here so that its position, the compressed bytes read, moves the bar.
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf, \
                byte_progress(path.stat().st_size, "Reading") as bar:
            for m in tf:  # streaming: compressed archives are decompressed once
                check_member(path, m)
                if dirs and m.isdir():
                    out.append((m.name.rstrip("/") + "/", b""))
                elif m.isfile() and want(m.name):
                    f = tf.extractfile(m)
                    assert f is not None
                    out.append((m.name, f.read()))
                bar.update(raw.tell() - bar.n)
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    return out


def _read_zip(path: Path, want, dirs: bool) -> list[tuple[str, bytes]]:
    out = []
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            for m in members:  # all checked before any is read
                check_zip_member(path, m)
            with byte_progress(sum(m.compress_size for m in members), "Reading") as bar:
                for m in members:
                    if m.is_dir():
                        if dirs:
                            out.append((m.filename.rstrip("/") + "/", b""))
                    elif want(m.filename):
                        out.append((m.filename, zf.read(m)))
                    bar.update(m.compress_size)
    except DataError:
        raise
    except NotImplementedError as e:  # a compression method Python lacks (deflate64, say)
        raise DataError(f"{path}: {e}; re-create the archive with the standard deflate compression") from None
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    return out


def first_name(path: Path) -> str:
    """Name of the first member (cheap: reads only the archive's head, or a zip's directory)."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            name = names[0] if names else None
        else:
            with tarfile.open(path, "r:*") as tf:
                m = tf.next()
            name = m.name if m is not None else None
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    if name is None:
        raise DataError(f"{path}: the archive is empty")
    return name
