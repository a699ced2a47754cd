"""Malicious archives and pickles are refused without running or writing anything."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import tarfile
import warnings

import numpy as np
import pytest
from conftest import Terminal, make_official, official_pickle

from cifarlab.data import load_dataset
from cifarlab.data.safe_pickle import safe_load
from cifarlab.errors import DataError


class _Payload:
    """Unpickling this runs os.system, which would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"labels": [1], b"data": _Payload(marker)}, protocol=2)
    path, _ = make_official(tmp_path, "cifar10-python", replace={"data_batch_2": evil})
    with pytest.raises(DataError, match="refused to read this pickle.*posix.system|refused to read this pickle.*os.system"):
        load_dataset(path, allow_unverified=True)
    assert not marker.exists()
    # the payload really would have run: prove the test could fail
    pickle.loads(evil)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_batch_loads_under_every_protocol(protocol):
    d = {b"labels": [1, 2], b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251}
    out = safe_load(pickle.dumps(d, protocol=protocol), "batch")
    np.testing.assert_array_equal(out[b"data"], d[b"data"])


def test_batch_pickled_as_the_official_files_were_loads_without_a_warning():
    """The official batches were pickled by Python 2 with numpy 1: byte strings as Python 2 str
    (SHORT_BINSTRING, BINSTRING), arrays rebuilt by numpy.core.multiarray, the dtype as
    dtype('u1', 0, 1) with int flags. numpy 2 pickles none of these, so the stream is checked
    first; it must read with no warning (numpy 2.4 deprecates int dtype flags other than 0, 1)."""
    d = {b"labels": [1, 2], b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251}
    data = official_pickle(d)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data) if op.name != "BINPUT"]
    at = ops.index(("SHORT_BINSTRING", "u1"))
    assert ops[at + 1:at + 3] == [("BININT1", 0), ("BININT1", 1)]
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("SHORT_BINSTRING", "labels") in ops
    assert [name for name, arg in ops if isinstance(arg, str) and len(arg) == 2 * 3072] == ["BINSTRING"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = safe_load(data, "batch")
    assert out[b"data"].dtype == np.uint8 and out[b"labels"] == [1, 2]
    np.testing.assert_array_equal(out[b"data"], d[b"data"])


def test_object_array_refused():
    d = {b"labels": [1], b"data": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(DataError):
        safe_load(pickle.dumps(d, protocol=2), "batch")


@pytest.mark.parametrize("put", [b"r" + (2**31).to_bytes(4, "little"), b"p2147483648\n"])
def test_a_memo_index_that_would_fill_the_memory_is_refused_before_unpickling(put):
    """CPython's unpickler grows its memo table to the index a PUT gives: these few bytes (a
    LONG_BINPUT, then a text PUT) would make it allocate and zero 16 GiB or more."""
    with pytest.raises(DataError, match="refused to read this pickle: memo index 2,147,483,648 at opcode 2"):
        safe_load(b"\x80\x02N" + put + b".", "batch")


def test_not_a_pickle():
    with pytest.raises(DataError, match="not a readable CIFAR python batch"):
        safe_load(b"\x00\x01garbage", "batch")


def _tar_with(tmp_path, add):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        add(tf)
    return path


def _file(tf, name, data=b"x"):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("name", ["../escape.png", "/abs/train/cat/1.png", "train/../../x.png"])
def test_escaping_member_refused(tmp_path, name):
    path = _tar_with(tmp_path, lambda tf: (_file(tf, "train/cat/0.png"), _file(tf, name)))
    with pytest.raises(DataError, match="escapes the target folder"):
        load_dataset(path)
    assert not (tmp_path.parent / "escape.png").exists()


def test_symlink_member_refused(tmp_path):
    def add(tf):
        ti = tarfile.TarInfo("train/cat/link.png")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/etc/passwd"
        tf.addfile(ti)

    with pytest.raises(DataError, match="is a link"):
        load_dataset(_tar_with(tmp_path, add))


def test_hardlink_in_official_archive_refused(tmp_path):
    def add(tf):
        _file(tf, "cifar-10-batches-bin/data_batch_1.bin", bytes(3073))
        ti = tarfile.TarInfo("cifar-10-batches-bin/data_batch_2.bin")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "cifar-10-batches-bin/data_batch_1.bin"
        tf.addfile(ti)

    with pytest.raises(DataError, match="is a link"):
        load_dataset(_tar_with(tmp_path, add), allow_unverified=True)


def _zip_with(tmp_path, entries):
    """A zip of (ZipInfo or name, data) entries, beside one good image member."""
    import zipfile

    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/cat/0.png", b"x")
        for info, data in entries:
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["../escape.png", "/abs/train/cat/1.png", "train/../../x.png"])
def test_escaping_zip_member_refused(tmp_path, name):
    import zipfile

    info = zipfile.ZipInfo("placeholder")
    info.filename = name  # ZipInfo would strip a leading '/' or '..' of a name given to it; a crafted file need not
    with pytest.raises(DataError, match="escapes the target folder"):
        load_dataset(_zip_with(tmp_path, [(info, b"x")]))


def test_zip_symlink_encrypted_and_oversized_members_refused(tmp_path, monkeypatch):
    import stat
    import zipfile

    from cifarlab.data import archive

    link = zipfile.ZipInfo("train/cat/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(DataError, match="member 'train/cat/link.png' is a link"):
        load_dataset(_zip_with(tmp_path, [(link, b"/etc/passwd")]))
    # zipfile writes no encrypted members: mark one as encrypted in the central directory
    # (general-purpose flag bit 0, at offset 8 of its 'PK\1\2' record), which readers consult.
    path = _zip_with(tmp_path, [("train/cat/1.png", b"x")])
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)  # the second record: train/cat/1.png
    data[at + 8] |= 0x1
    path.write_bytes(bytes(data))
    assert zipfile.ZipFile(path).infolist()[1].flag_bits & 0x1
    with pytest.raises(DataError, match="member 'train/cat/1.png' is encrypted"):
        load_dataset(path)
    monkeypatch.setattr(archive, "MAX_ZIP_MEMBER_BYTES", 1000)
    with pytest.raises(DataError, match=r"member 'train/cat/big.png' would unpack to 4,096 bytes, more than any "
                                        r"image data file needs \(1,000\)"):
        load_dataset(_zip_with(tmp_path, [("train/cat/big.png", bytes(4096))]))


def test_truncated_zip_is_reported_as_corrupt(tmp_path):
    path = _zip_with(tmp_path, [("test/cat/0.png", bytes(100))])
    path.write_bytes(path.read_bytes()[:-30])  # the central directory's end is cut off
    with pytest.raises(DataError, match="the archive is truncated or corrupt"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["w:xz", "zip"])
def test_reading_an_archive_shows_its_bytes_on_a_terminal_only(tmp_path, monkeypatch, kind):
    """The first read of a compressed data set takes seconds before decoding starts: on an
    interactive stderr a bar counts the archive's bytes up to its whole size and is cleared when
    done (the bar's total is the archive's size in KiB: random bytes do not compress); piped,
    stderr gets nothing. Either way the members read are the same."""
    import sys
    import zipfile

    from tqdm import tqdm

    from cifarlab.data.archive import read_members

    rng = np.random.default_rng(0)
    blobs = {f"train/c/{i}.bin": rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for i in range(4)}
    path = tmp_path / ("d.tar.xz" if kind == "w:xz" else "d.zip")
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, b in blobs.items():
                zf.writestr(name, b)
    else:
        with tarfile.open(path, kind) as tf:
            for name, b in blobs.items():
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))

    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert dict(read_members(path)) == blobs
        shown = stream.getvalue()
        total = path.stat().st_size if kind == "w:xz" else sum(zipfile.ZipFile(path).getinfo(n).compress_size
                                                                 for n in blobs)
        assert ("Reading" in shown and f"/{tqdm.format_sizeof(total, divisor=1024)}" in shown) == bar, shown
