"""Progress bars for work that takes long enough to need explaining, shown on an interactive
terminal only. Kept apart from :mod:`cifarlab.runtime` so that reading data (and listing the
cache) does not import torch."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str) -> Iterable[T]:
    """``items`` behind a progress bar on an interactive terminal, for work that takes long enough
    to need explaining (a first decode of a data set, a test with test-time augmentation on a
    CPU). The bar goes when done and never reaches a log file; one item shows none."""
    return _bar(items, total, desc, unit)


def byte_progress(total: int, desc: str):
    """A :func:`progress` bar counting bytes, moved by hand with ``update(n)`` (reading an
    archive, where the bytes read are the measure of work done); use it as a context manager."""
    return _bar(None, total, desc, "B", unit_scale=True, unit_divisor=1024)


def _bar(items, total: int, desc: str, unit: str, **kw):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, leave=False,
                disable=not sys.stderr.isatty() or total < 2, **kw)


def batch_starts(n: int, batch_size: int, desc: str) -> Iterable[int]:
    """The first index of each batch of ``n`` images, behind a :func:`progress` bar."""
    starts = range(0, n, batch_size)
    return progress(starts, len(starts), desc, "batch")
