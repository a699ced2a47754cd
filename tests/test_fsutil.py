"""Writes are atomic: a failure mid-write leaves the previous file intact and no debris."""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import export
from cifarlab.errors import CifarlabError
from cifarlab.data import cache
from cifarlab.fsutil import make_folder, read_json, umask, write_json, write_text
from cifarlab.models import create_model


def _full_disk(monkeypatch) -> None:
    """File writes that stop part-way with ENOSPC, as a full disk makes them."""
    def failing_write(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing_write)


def test_full_disk_keeps_previous_weights_and_checkpoint(tmp_path, monkeypatch):
    """A full disk while writing weights or a checkpoint is a one-line error naming the file and
    the cause, with the previous file intact. (They are serialised in memory and written by
    Python: on a real full disk, safetensors' own writer raised a SafetensorError and torch.save
    a RuntimeError from its C++ writer, both tracebacks.)"""
    from cifarlab.train import CHECKPOINT, _save_checkpoint

    model = create_model("keras-shallow", num_classes=3)
    path = tmp_path / "weights.safetensors"
    export.save_weights(path, model)
    _save_checkpoint(tmp_path, {"step": torch.tensor(1)})
    before = path.read_bytes(), (tmp_path / CHECKPOINT).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with monkeypatch.context() as m:
        _full_disk(m)
        with pytest.raises(CifarlabError, match="weights.safetensors': No space left on device.*previous file .* "
                                                "intact"):
            export.save_weights(path, model)
        with pytest.raises(CifarlabError, match=f"{CHECKPOINT}': No space left on device"):
            _save_checkpoint(tmp_path, {"step": torch.tensor(2)})
    assert (path.read_bytes(), (tmp_path / CHECKPOINT).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, "weights.safetensors"])
    assert torch.load(tmp_path / CHECKPOINT)["step"] == 1


def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CifarlabError, match=r"output '.*file/sub' cannot be created: '.*file' is a file"):
        write_json(blocker / "sub" / "a.json", {"a": 1})
    with pytest.raises(CifarlabError, match=r"output '.*file' exists and is a file"):
        write_json(blocker / "a.json", {"a": 1})

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(CifarlabError, match=r"cannot write to folder '.*': Permission denied"):
        write_json(tmp_path / "a.json", {"a": 1})


def test_make_folder_names_the_folder_and_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CifarlabError, match=r"output '.*file' exists and is a file; give a folder path"):
        make_folder(blocker)
    with pytest.raises(CifarlabError, match=r"cannot create output folder '.*file/sub': Not a directory"):
        make_folder(blocker / "sub")
    assert make_folder(tmp_path / "a" / "b").is_dir() and make_folder(tmp_path / "a" / "b").is_dir()
    with pytest.raises(FileExistsError):  # claiming a folder: the caller picks another name
        make_folder(tmp_path / "a" / "b", exist_ok=False)


def test_interrupt_mid_write_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    write_text(p, "old")
    import cifarlab.fsutil as fs

    monkeypatch.setattr(fs.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_text(p, "new")
    assert p.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_json_holds_no_nan_or_infinity_tokens(tmp_path):
    import json

    import numpy as np

    from cifarlab.fsutil import write_json

    write_json(tmp_path / "m.json", {"nan": float("nan"), "list": [1.5, float("inf"), np.float32("nan")],
                                     "array": np.array([0.25, -np.inf]), "tuple": (2, float("-inf")),
                                     "int": np.int64(7), "flag": np.bool_(True)})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written")) == {
        "nan": None, "list": [1.5, None, None], "array": [0.25, None], "tuple": [2, None], "int": 7, "flag": True}


@pytest.mark.parametrize("content, expect, message", [
    (b'{"epochs": 2', dict, r"m.json is damaged \(Expecting ',' delimiter"),  # cut short
    (b"\xff\xfe{}", dict, "m.json is damaged \\('utf-8' codec can't decode byte 0xff"),
    (b"[1, 2]", dict, "m.json is damaged: it holds a list where cifarlab writes an object; restore it"),
    (b"null", list, "m.json is damaged: it holds null where cifarlab writes a list"),
])
def test_a_damaged_json_file_is_refused_by_name(tmp_path, content, expect, message):
    (tmp_path / "m.json").write_bytes(content)
    with pytest.raises(CifarlabError, match=message):
        read_json(tmp_path / "m.json", expect=expect)


def test_read_json_gives_what_was_written_or_the_value_for_absent(tmp_path):
    write_json(tmp_path / "m.json", {"a": [1, 2.5]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2.5]}
    assert read_json(tmp_path / "none.json", absent={}) == {} and read_json(tmp_path / "none.json", absent=None) is None
    with pytest.raises(CifarlabError, match="none.json does not exist; it is written by cifarlab"):
        read_json(tmp_path / "none.json")


def test_a_failed_run_removes_the_parent_folders_it_created_and_no_others(tmp_path, monkeypatch):
    """`runs/` made for the first run goes with that run's folder when the run fails; a `runs/`
    that was there before stays, and so does one where another run put its folder meanwhile."""
    from cifarlab.fsutil import new_run_folder, undo_on_failure

    monkeypatch.chdir(tmp_path)

    def fail_in(run, before, also=None):
        with pytest.raises(RuntimeError), undo_on_failure(run, before):
            (run / "config.yaml").write_text("x")
            if also is not None:
                also.mkdir()
            raise RuntimeError("bad data")

    run, before = new_run_folder(None, False, "r", "")
    assert before == Path("runs")
    fail_in(run, before)
    assert list(tmp_path.iterdir()) == []
    run, before = new_run_folder("a/b/c", False, "r", "")
    assert before == Path("a")
    fail_in(run, before)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()  # there before: stays, empty
    run, before = new_run_folder(None, False, "r", "")
    assert before == run
    fail_in(run, before)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and not any((tmp_path / "runs").iterdir())
    (tmp_path / "runs").rmdir()
    run, before = new_run_folder(None, False, "r", "")
    fail_in(run, before, also=Path("runs/other"))  # a parallel run's folder, made meanwhile
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["other"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_written_files_get_the_permissions_a_plain_write_would(tmp_path, monkeypatch):
    # The temporary files behind atomic writes are created private (0600, 0700); the files and
    # cache folders they become must not be, or a group sharing run folders cannot read them.
    old = os.umask(0o022)
    try:
        assert umask() == 0o022
        write_text(tmp_path / "new.txt", "a")
        assert _mode(tmp_path / "new.txt") == 0o644
        (tmp_path / "kept.txt").write_text("a")
        os.chmod(tmp_path / "kept.txt", 0o640)
        write_text(tmp_path / "kept.txt", "b")  # replacing a file keeps its permissions
        assert _mode(tmp_path / "kept.txt") == 0o640 and (tmp_path / "kept.txt").read_text() == "b"
        monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
        cache.store_cached("k", {"x": np.zeros(3)}, {})
        assert _mode(tmp_path / "cache" / "decoded" / "k") == 0o755
        assert cache.load_cached("k") is not None
        os.umask(0o077)
        assert umask() == 0o077
        write_text(tmp_path / "private.txt", "a")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)


def _tricky_tree(root):
    """Names whose string order differs from their path order ('a-c' < 'a/b' as strings), hidden
    files, a link to a folder (listed, not entered), a link to a file, a broken link."""
    for rel in ("a/b", "a-c", "a/.hidden", "a/b2/deep/x.png", "z.txt", ".top"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "empty").mkdir()
    (root / "link-to-a").symlink_to(root / "a", target_is_directory=True)
    (root / "link-to-z").symlink_to(root / "z.txt")
    return root


def test_tree_lists_what_rglob_lists(tmp_path):
    import os

    from cifarlab.fsutil import tree

    root = _tricky_tree(tmp_path / "t")
    want = sorted((str(p.relative_to(root)).replace(os.sep, "/"), p.is_dir()) for p in root.rglob("*"))
    assert sorted((rel, e.is_dir()) for rel, e in tree(root)) == want
    assert ("link-to-a/b", False) not in want and ("link-to-a", True) in want


def test_the_decoded_cache_key_of_a_folder_is_what_earlier_versions_made(tmp_path):
    """Listing the folder faster kept the keys: caches made by earlier versions stay valid."""
    import hashlib
    import json

    from cifarlab.data import cache

    root = _tricky_tree(tmp_path / "t")

    def earlier(path, **options):  # the key as it was computed with pathlib
        h = hashlib.sha256(f"v{cache.CACHE_VERSION} {json.dumps(options, sort_keys=True)}".encode())
        for p in sorted(path.resolve().rglob("*")):
            st = p.stat()
            h.update(f"{p.relative_to(path.resolve())}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    assert cache.source_key(root, skip_bad=False) == earlier(root, skip_bad=False)
    (root / "a" / "b").write_bytes(b"changed size")
    assert cache.source_key(root, skip_bad=True) == earlier(root, skip_bad=True)
    before = cache.source_key(root)
    (root / "broken").symlink_to(root / "gone")
    assert cache.source_key(root) != before  # a broken link, which pathlib's stat could not take, counts too
