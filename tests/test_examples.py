"""The scripts in examples/, run as the README runs them."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
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


def test_long_tail_keeps_the_profile_of_training_images_and_every_test_image(tmp_path):
    import importlib.util

    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c", "d", "e"), n_train=20, n_test=2)
    out = tmp_path / "lt"
    r = _run("long_tail.py", str(data), str(out), "10")
    assert r.returncode == 0, r.stderr
    # 20 x 10 ** (-k / 4): 20, 11.2, 6.3, 3.6, 2
    kept = {c: len(list((out / "train" / c).iterdir())) for c in "abcde"}
    assert kept == {"a": 20, "b": 11, "c": 6, "d": 3, "e": 2}
    assert sorted(p.name for p in (out / "train" / "b").iterdir()) == [f"{k:04d}.png" for k in range(11)]
    assert all(len(list((out / "test" / c).iterdir())) == 2 for c in "abcde")
    assert "training images kept per class: a 20, b 11, c 6, d 3, e 2" in r.stdout
    # CIFAR-10-LT's counts (Cui et al., 2019) at ratio 100
    spec = importlib.util.spec_from_file_location("long_tail", EXAMPLES / "long_tail.py")
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert module.kept_counts([5000] * 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for bad in ("0.5", "x", "inf"):
        r = _run("long_tail.py", str(data), str(tmp_path / "bad"), bad)
        assert r.returncode == 1 and f"RATIO {bad!r} is not valid" in r.stderr
        assert not (tmp_path / "bad").exists()


def test_digits_folder_writes_sklearns_digits_as_unfamiliar_images(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    r = _run("digits_folder.py", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert len(files) == 1797 and "wrote 1797 images" in r.stdout and not (tmp_path / "digits.partial").exists()
    d = load_digits()
    first = np.asarray(Image.open(out / f"digit{d.target[0]}-0000.png"))
    assert first.shape == (8, 8) and first.dtype == np.uint8
    # ink dark on white: intensity 16 is black, 0 white
    assert (first == np.round(255 - d.images[0] * 255 / 16)).all() and first.max() == 255
    r = _run("digits_folder.py", str(out))
    assert r.returncode == 1 and "exists; give a new folder" in r.stderr
