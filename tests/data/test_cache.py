"""What cifarlab keeps in its cache folder, and ``cifarlab cache`` listing and clearing it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_image_folder

from cifarlab.cli import main
from cifarlab.data import load_dataset
from cifarlab.data.cache import LEFTOVER_AGE_S, cache_entries, clear_entries, format_size, remove_entry

CACHED = "loaded from the decoded cache"
KEY = "0123456789abcdef0123456789abcdef"


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own (not the session's shared kernels), holding two decoded entries
    of one folder read two ways, a download, a compiled kernel, what a stopped write left, a
    write in progress, and a file that is not cifarlab's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CIFARLAB_CACHE", str(root))
    data = make_image_folder(tmp_path / "photos", n_train=4, n_test=2)
    load_dataset(data)
    load_dataset(data, image_size=(16, 16))
    (root / "cifar-10-python.tar.gz").write_bytes(b"x" * 2000)
    (root / "kernels").mkdir()
    (root / "kernels" / "cpu_kernels-0123456789abcdef.so").write_bytes(b"k" * 300)
    stopped = root / "decoded" / f".{KEY}.abc123"
    stopped.mkdir()
    (stopped / "x_train.npy").write_bytes(b"half")
    _age(stopped, LEFTOVER_AGE_S + 60)
    (root / "decoded" / f".{KEY}.inprogress").mkdir()
    (root / "notes.txt").write_text("someone else's")
    return root


def test_entries_are_listed_by_kind_with_source_size_and_only_cifarlabs_names(cache, tmp_path):
    entries = cache_entries()
    assert [(e.kind, e.leftover) for e in entries] == [("decoded", False), ("decoded", False), ("decoded", True),
                                                       ("downloads", False), ("kernels", False)]
    decoded = entries[:2]
    assert {e.source for e in decoded} == {str((tmp_path / "photos").resolve())}
    assert sorted(e.read_with for e in decoded) == [(), ("--image-size 16x16",)]
    assert {e.describe() for e in decoded} == {str((tmp_path / "photos").resolve()),
                                              f"{(tmp_path / 'photos').resolve()} (--image-size 16x16)"}
    assert all(e.size > 16 * 16 * 3 * 18 for e in decoded)  # the arrays, at the least
    assert entries[2].size == 4 and entries[3].size == 2000 and entries[4].size == 300
    # the write in progress and the file that is not cifarlab's are neither listed nor counted
    assert not any(e.path.name in (f".{KEY}.inprogress", "notes.txt") for e in entries)


def test_cache_command_lists_and_totals(cache, capsys):
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {cache}" in out
    assert "decoded image folders and archives (read again from their source when removed): 2," in out
    assert "(--image-size 16x16)" in out and "cifar-10-python.tar.gz" in out and "cpu_kernels-" in out
    assert "left by stopped writes: 1, 4 B (cifarlab cache --clear removes them)" in out
    assert main(["cache", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["folder"] == str(cache) and "removed" not in doc
    assert [e["kind"] for e in doc["entries"]] == ["decoded", "decoded", "decoded", "downloads", "kernels"]
    assert doc["entries"][0]["read_with"] in ([], ["--image-size 16x16"])
    assert sum(e["bytes"] for e in doc["entries"]) == sum(e.size for e in cache_entries())


def test_clear_removes_the_decoded_data_and_leftovers_and_keeps_the_rest(cache, tmp_path, capsys):
    assert main(["cache", "--clear"]) == 0
    assert "removed the decoded data: 2 entries" in capsys.readouterr().out
    assert [e.kind for e in cache_entries()] == ["downloads", "kernels"]
    assert sorted(p.name for p in (cache / "decoded").iterdir()) == [f".{KEY}.inprogress"]
    assert (cache / "notes.txt").read_text() == "someone else's"
    again = load_dataset(tmp_path / "photos")  # decoded from its source again, and cached again
    assert CACHED not in again.notes and CACHED in load_dataset(tmp_path / "photos").notes
    assert main(["cache", "--clear", "all"]) == 0
    out = capsys.readouterr().out
    assert "removed everything cifarlab keeps: 3 entries" in out and "nothing cached now" in out
    assert sorted(p.name for p in cache.iterdir()) == ["decoded", "kernels", "notes.txt"]
    assert main(["cache"]) == 0 and "nothing cached yet" in capsys.readouterr().out


def test_clear_unused_days_goes_by_last_use_which_each_load_records(cache, tmp_path, capsys):
    small, full = sorted((e for e in cache_entries() if e.kind == "decoded" and not e.leftover),
                         key=lambda e: e.read_with, reverse=True)
    _age(small.path / "meta.json", 3 * 86400)
    _age(full.path / "meta.json", 3 * 86400)
    assert CACHED in load_dataset(tmp_path / "photos").notes  # a use: the full entry is now recent
    assert time.time() - (full.path / "meta.json").stat().st_mtime < 60
    assert main(["cache", "--clear", "--unused-days", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(e["path"], e["leftover"]) for e in doc["removed"]] == [(str(small.path), False),
                                                                    (str(cache / "decoded" / f".{KEY}.abc123"), True)]
    assert full.path.is_dir() and not small.path.exists() and (cache / "cifar-10-python.tar.gz").is_file()


def test_clear_one_kind(cache, capsys):
    assert main(["cache", "--clear", "kernels"]) == 0
    # the stopped write is the decoded data's, and stays for a clearing of that
    assert "removed the compiled kernels: 1 entry, 300 B\n" in capsys.readouterr().out
    assert [(e.kind, e.leftover) for e in cache_entries()] == [("decoded", False), ("decoded", False),
                                                              ("decoded", True), ("downloads", False)]


@pytest.mark.parametrize("args,msg", [
    (["--unused-days", "2"], "--unused-days 2 is not valid; it chooses what --clear removes: give --clear too"),
    (["--clear", "--unused-days", "-1"], "--unused-days -1 is not valid; give a number of days, 0 or more"),
    (["--clear", "--unused-days", "nan"], "--unused-days nan is not valid"),
])
def test_cache_refuses_bad_options(cache, capsys, args, msg):
    assert main(["cache", *args]) == 2
    assert msg in capsys.readouterr().err
    assert len(cache_entries()) == 5  # nothing removed


def test_an_entry_removed_meanwhile_is_passed_over(cache):
    entry = next(e for e in cache_entries() if e.kind == "decoded")
    assert remove_entry(entry) and not entry.path.exists()
    assert not remove_entry(entry)
    assert not any(p.name.startswith(f".{entry.path.name}.removing") for p in (cache / "decoded").iterdir())


def test_clear_entries_leaves_out_what_another_process_removed_first(cache):
    entries = cache_entries()
    decoded = [e for e in entries if e.kind == "decoded"]
    assert remove_entry(decoded[0])  # gone before the clearing reaches it
    removed = clear_entries(entries, ("decoded",), unused_days=0)
    assert removed == decoded[1:]  # the other entry, unused for more than 0 days, and the leftover
    assert [e.kind for e in cache_entries()] == ["downloads", "kernels"]
    assert clear_entries(cache_entries(), ("downloads", "kernels"), unused_days=1) == []  # all used just now


def test_an_empty_or_absent_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "none"))
    assert cache_entries() == []
    assert main(["cache", "--clear", "all"]) == 0
    assert "removed everything cifarlab keeps: 0 entries, 0 B" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_format_size():
    assert [format_size(n) for n in (0, 999, 1000, 186_325, 184_320_000, 3 * 10**9)] == \
        ["0 B", "999 B", "1.0 kB", "186.3 kB", "184.3 MB", "3.0 GB"]


def test_listing_the_cache_and_reading_data_do_not_import_torch(cache):
    """Listing the cache is a quick look at a folder: importing torch would take it from a
    fraction of a second to several seconds."""
    import subprocess
    import sys

    code = ("import sys\nfrom cifarlab.cli import main\nimport cifarlab.data\n"
            "assert main(['cache']) == 0\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_skipping_bad_images_shares_the_entry_of_a_folder_that_has_none(tmp_path, monkeypatch):
    """--skip-bad-images changes nothing where every image reads, so it decodes no second copy;
    an entry that did leave images out serves only reads that skip them, and a plain read of
    that folder is refused naming the files, as a first read would be."""
    from cifarlab.errors import DataError

    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    good = make_image_folder(tmp_path / "good", n_train=4, n_test=2)
    load_dataset(good)
    ds = load_dataset(good, skip_bad_images=True)
    assert CACHED in ds.notes and len(cache_entries()) == 1

    bad = make_image_folder(tmp_path / "bad", n_train=4, n_test=2)
    (bad / "train" / "dog" / "fake.jpg").write_bytes(b"this is not a jpeg")
    first = load_dataset(bad, skip_bad_images=True)
    again = load_dataset(bad, skip_bad_images=True)
    assert CACHED not in first.notes and CACHED in again.notes and len(again.y_train) == 12
    assert any("skipped 1 unreadable image file(s), first: train/dog/fake.jpg" in n for n in again.notes)
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\): .*fake.jpg.* or pass --skip-bad-images"):
        load_dataset(bad)
    entry = next(e for e in cache_entries() if e.source == str(bad.resolve()))
    assert entry.read_with == ("--skip-bad-images",) and len(cache_entries()) == 2
