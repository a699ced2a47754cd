"""A restricted unpickler for the official CIFAR python batches.

The batches are Python pickles. Loading a pickle with the standard unpickler can run any code
the file names, so a crafted archive could take over the machine. This unpickler resolves only
the handful of globals that the real files hold (numpy's array reconstructor, ndarray and dtype,
and the byte-string codec used by protocol-2 pickles) and refuses everything else before it is
called. Before that, the stream's opcodes are read without running them, and a memo index beyond
any object the stream could have made is refused: CPython's unpickler grows its memo table to the
index given, so a few bytes asking for entry 2**31 would fill the machine's memory.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
from typing import Any

import numpy as np

from ..errors import DataError

# numpy 2 moved numpy.core to numpy._core; files written by numpy 1 (the official ones) name
# the old module, files written by numpy 2 the new one. Both map to the same safe objects.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): None,  # filled below; scalars appear in some re-pickled files
    ("_codecs", "encode"): None,
}


class _Refused(pickle.UnpicklingError):
    """A global or value that a CIFAR batch never holds."""


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles from Python 3 store bytes as _codecs.encode(str, 'latin1'). Only the
    # text codecs that can appear there are allowed, so the call cannot reach arbitrary codecs.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _Refused(f"refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding, errors)


def _scalar(dtype: np.dtype, data: bytes) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused("refused numpy scalar of object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # Protocol-5 pickles rebuild arrays from a raw buffer; only plain (non-object) dtypes.
    dtype = np.dtype(dtype)
    if dtype.hasobject or not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _Refused("refused array buffer of object dtype or unexpected type")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


_ALLOWED[("numpy.core.numeric", "_frombuffer")] = _frombuffer
_ALLOWED[("numpy._core.numeric", "_frombuffer")] = _frombuffer
_ALLOWED[("_codecs", "encode")] = _codecs_encode
_ALLOWED[("numpy.core.multiarray", "scalar")] = _scalar
_ALLOWED[("numpy._core.multiarray", "scalar")] = _scalar


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"global '{module}.{name}' is not allowed") from None


def safe_load(data: bytes, what: str) -> Any:
    """Unpickle ``data`` (the bytes of one CIFAR batch) allowing only the expected types.

    ``what`` names the file in error messages. Raises :class:`DataError` for anything that is
    not a plain CIFAR batch (a foreign global, an object array, a malformed stream).
    """
    try:
        _check_memo(data)
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{what}: refused to read this pickle: {e}. A genuine CIFAR batch holds only "
                        "a dict of lists, bytes and one uint8 array; nothing in it was run.") from None
    except Exception as e:  # malformed streams raise many types (EOFError, ValueError, ...)
        raise DataError(f"{what}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from None
    _check_plain(obj, what)
    return obj


def _check_memo(data: bytes) -> None:
    """Refuse a memo index larger than the number of opcodes before it (each memoised object was
    made by an earlier opcode, so a genuine pickle's indices stay below it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pickletools on a damaged text string
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > count:
                raise _Refused(f"memo index {int(arg):,} at opcode {count} (a genuine pickle numbers its objects "
                               "from 0 up)")


def _check_plain(obj: Any, what: str, depth: int = 0) -> None:
    """Refuse anything but dicts, lists, bytes, str, numbers and non-object numpy arrays."""
    if depth > 4:
        raise DataError(f"{what}: nested deeper than a CIFAR batch can be")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, what, depth + 1)
            _check_plain(v, what, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if not isinstance(v, (int, bytes, str)):
                _check_plain(v, what, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise DataError(f"{what}: holds an object array, which a CIFAR batch never does")
    elif not isinstance(obj, (bytes, str, int, float, np.generic)) and obj is not None:
        raise DataError(f"{what}: holds a {type(obj).__name__}, which a CIFAR batch never does")
