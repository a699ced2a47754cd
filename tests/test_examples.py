"""The scripts in examples/, run as the README runs them."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import make_image_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / args[0]), *args[1:]], capture_output=True, text=True)


def test_class_split_writes_two_folders_from_a_folder_or_an_archive(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=("cat", "dog", "frog"), n_train=2, n_test=1)
    archive = tmp_path / "d.tar.xz"
    with tarfile.open(archive, "w:xz") as t:
        t.add(data, arcname="cifar")  # one top folder, as many archives have
    for source, out in ((data, tmp_path / "s1"), (archive, tmp_path / "s2")):
        r = _run("class_split.py", str(source), str(out), "frog,cat")
        assert r.returncode == 0, r.stderr
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
        assert files == [f"{part}/{split}/{c}/{k:04d}.png" for part, cs in (("a", ["cat", "frog"]), ("b", ["dog"]))
                         for split, n in (("test", 1), ("train", 2)) for c in cs for k in range(n)]
    r = _run("class_split.py", str(data), str(tmp_path / "s3"), "cat,horse")
    assert r.returncode == 1 and "give some, not all, of the classes cat, dog, frog; got 'cat,horse'" in r.stderr
    assert not (tmp_path / "s3").exists()
    r = _run("class_split.py", str(data), str(tmp_path / "s1"), "cat")
    assert r.returncode == 1 and "exists; give a new folder" in r.stderr
