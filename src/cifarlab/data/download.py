"""Downloading the official archives into the cache, verified before they are used."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DataError
from ..fsutil import set_final_mode
from .cache import cache_dir, mark_used
from .cifar import FORMATS, OfficialFormat

OFFICIAL_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
TIMEOUT_S = 30


def source_url(fmt: OfficialFormat) -> str:
    """The URL (or local path) to fetch ``fmt`` from: ``$CIFARLAB_MIRROR`` if set, else the official site.

    The mirror may be a base URL (``https://host/path/``) or a local folder holding the archives.
    """
    base = os.environ.get("CIFARLAB_MIRROR") or OFFICIAL_BASE_URL
    if "://" not in base:
        return str(Path(base).expanduser() / fmt.archive_name)
    return urllib.parse.urljoin(base.rstrip("/") + "/", fmt.archive_name)


def fetch(dataset: str, binary: bool = False, quiet: bool = False) -> Path:
    """Path of the verified official archive for ``dataset``, downloading it if not cached.

    The download goes to a temporary name in the cache folder and is renamed only once it is
    complete and its MD5 matches the published one.
    """
    key = f"{dataset}-{'binary' if binary else 'python'}"
    if key not in FORMATS:
        raise DataError(f"unknown dataset '{dataset}'; valid: cifar10, cifar100")
    fmt = FORMATS[key]
    dest = cache_dir() / fmt.archive_name
    if dest.is_file():
        mark_used(dest)
        return dest
    url = source_url(fmt)
    help_ = (f"Download {fmt.archive_name} by hand (from {url}) and pass --data PATH, or point "
             "--data at an image folder or archive (train/<class>/*, test/<class>/*), or set "
             "CIFARLAB_MIRROR to a mirror URL or folder.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fmt.archive_name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DataError(f"cannot write to the cache folder {dest.parent} ({e.strerror}); set CIFARLAB_CACHE "
                        "to a writable folder") from None
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            if "://" not in url:
                if not Path(url).is_file():
                    raise DataError(f"{fmt.archive_name} is not in the mirror folder ({url}). {help_}")
                src = open(url, "rb")
                total = Path(url).stat().st_size
            else:
                src = urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only
                total = int(src.headers.get("Content-Length") or 0) or None
            with src, tqdm(total=total, unit="B", unit_scale=True, desc=fmt.archive_name,
                           disable=quiet, mininterval=1.0) as bar:
                while block := src.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != fmt.md5:
            raise DataError(f"downloaded {fmt.archive_name} from {url} has MD5 {h.hexdigest()}, not the "
                            f"official {fmt.md5}; the download was discarded. {help_}")
        set_final_mode(tmp)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {url} ({reason}). {help_}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest
