"""Images labelled by a CSV file (--labels): Kaggle's CIFAR-10 layout and the like."""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
from conftest import make_official
from PIL import Image

from cifarlab.data import load_dataset
from cifarlab.data.labels_csv import class_order
from cifarlab.errors import DataError


def _images(root, names, size=(12, 12)):
    """One PNG per name under ``root``, each filled with its own colour; returns {name: array}."""
    out = {}
    for k, n in enumerate(names):
        a = np.full((*size, 3), (k * 37 % 256, k * 11 % 256, 200 - k), np.uint8)
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / n)
        out[n] = a
    return out


def _kaggle(tmp_path, n=30):
    """Kaggle's CIFAR-10 layout: train/<id>.png and trainLabels.csv of id,label rows."""
    root = tmp_path / "train"
    arrays = _images(root, [f"{i}.png" for i in range(1, n + 1)])
    labels = {i: ("cat", "dog", "ship")[i % 3] for i in range(1, n + 1)}
    csv = tmp_path / "trainLabels.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{c}\n" for i, c in labels.items()))
    return root, csv, arrays, labels


def test_kaggle_layout_ids_with_a_test_split_held_out_by_path(tmp_path):
    root, csv, arrays, labels = _kaggle(tmp_path)
    ds = load_dataset(root, labels=csv)
    assert ds.classes == ["cat", "dog", "ship"] and ds.kind == "image-folder"
    assert len(ds.y_train) + len(ds.y_test) == 30 and np.bincount(ds.y_test).tolist() == [2, 2, 2]
    cats = sorted((f"{i}.png" for i in range(1, 31) if labels[i] == "cat"),
                  key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert [p for p in ds.test_paths if labels[int(p[:-4])] == "cat"] == sorted(cats[:2])
    for p, x, y in zip(ds.test_paths, ds.x_test, ds.y_test):
        assert np.array_equal(x, arrays[p]) and ds.classes[y] == labels[int(p[:-4])]
    notes = " ".join(ds.notes)
    assert f"labels from {csv}: 30 image(s) in 3 classes" in notes
    assert "held out 0.2 of each class's images for testing (6 of 30)" in notes


def test_rows_that_name_no_image_and_images_without_a_row_are_counted(tmp_path):
    root, csv, _, _ = _kaggle(tmp_path)
    csv.write_text(csv.read_text() + "31,cat\n")
    (root / "30.png").unlink()
    _images(root, ["extra/unlabelled.png"])
    ds = load_dataset(root, labels=csv, use_cache=False)
    notes = " ".join(ds.notes)
    assert f"2 row(s) of {csv} name no image in {root} and are left out (first: '30' on line 31)" in notes
    assert f"ignored 1 image(s) that {csv} does not label (first: extra/unlabelled.png)" in notes
    assert len(ds.y_train) + len(ds.y_test) == 29


def test_headers_columns_separators_and_paths(tmp_path):
    """Columns found by their headers in any order; no header where the first row names an
    image; semicolons, a byte-order mark, backslashes and ./ as spreadsheets and Windows write."""
    names = [f"img/{c}{k}.png" for c in "ab" for k in range(5)]
    _images(tmp_path / "d", names)
    rows = [(n, "apple" if n[4] == "a" else "banana") for n in names]
    (tmp_path / "named.csv").write_text("Class,Filename\n" + "".join(f"{c},{n}\n" for n, c in rows))
    (tmp_path / "bare.csv").write_text("".join(f"{n},{c}\n" for n, c in rows))
    (tmp_path / "semi.csv").write_text("\ufeffpath;label\n" + "".join(
        f".\\{n.replace('/', chr(92))};{c}\n" for n, c in rows), encoding="utf-8")
    (tmp_path / "other.csv").write_text("picture,kind\n" + "".join(f"{n[:-4]},{c}\n" for n, c in rows))
    (tmp_path / "beside.csv").write_text("".join(f"d/{n},{c}\n" for n, c in rows))  # through the folder's name
    want = load_dataset(tmp_path / "d", labels=tmp_path / "named.csv")
    assert want.classes == ["apple", "banana"] and len(want.y_train) + len(want.y_test) == 10
    for f in ("bare.csv", "semi.csv", "other.csv", "beside.csv"):
        ds = load_dataset(tmp_path / "d", labels=tmp_path / f, use_cache=False)
        assert ds.test_paths == want.test_paths and np.array_equal(ds.y_test, want.y_test), f
        assert np.array_equal(ds.x_train, want.x_train) and np.array_equal(ds.y_train, want.y_train), f


def test_an_archive_with_a_wrapper_folder_and_numbered_classes(tmp_path):
    """Rows may name paths inside the archive's one wrapper folder or through it; integer labels
    are ordered as numbers (2 before 10)."""
    names = [f"{k:02d}.png" for k in range(24)]
    _images(tmp_path / "shots", names)
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(
        f"{'shots/' if k % 2 else ''}{n},{(2, 10, 1)[k % 3]}\n" for k, n in enumerate(names)))
    tar = tmp_path / "shots.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(tmp_path / "shots", arcname="shots")
    ds = load_dataset(tar, labels=tmp_path / "labels.csv")
    assert ds.classes == ["1", "2", "10"] and len(ds.y_train) + len(ds.y_test) == 24
    assert all(not p.startswith("shots/") for p in ds.test_paths)
    assert all(ds.classes[y] == str((2, 10, 1)[int(p[:2]) % 3]) for p, y in zip(ds.test_paths, ds.y_test))
    assert class_order(["b", "a", "10"]) == ["10", "a", "b"] and class_order(["-1", "3", "+2"]) == ["-1", "+2", "3"]


def test_the_decoded_cache_follows_the_labels_file(tmp_path):
    root, csv, _, _ = _kaggle(tmp_path)
    first = load_dataset(root, labels=csv)
    assert "loaded from the decoded cache" in load_dataset(root, labels=csv).notes
    csv.write_text(csv.read_text().replace("1,dog", "1,cat", 1))  # id 1: dog -> cat
    again = load_dataset(root, labels=csv)
    assert "loaded from the decoded cache" not in again.notes
    assert np.bincount(again.y_train).sum() + len(again.y_test) == 30
    assert np.bincount(np.concatenate([again.y_train, again.y_test]))[0] == \
        np.bincount(np.concatenate([first.y_train, first.y_test]))[0] + 1


@pytest.mark.parametrize("content, match", [
    ("id,label\n1,cat\n1,dog\n", r"1.png is labelled 'cat' on line 2 and 'dog' on line 3; give each image one label"),
    ("id,label\n7,cat\n", r"line 2 names '7', which matches more than one image .* give the file's full name"),
    ("id,label\n100,cat\n200,dog\n", r"none of its 2 row\(s\) names an image in .* \(first row's file '100', first "
                                     r"image '1.png'\)"),
    ("id\n1\n", r"line 1 has one column \('id'\); expected two, file and label"),
    ("id,label\n1,\n", r"line 2 \('1,'\) lacks a file or a label; every row needs both"),
    ("\n\n", r"holds no rows; expected file,label rows"),
    ("id,label\n1,cat\n2,cat\n3,dog\n4,dog\n5,dog\n", r"class 'cat' holds 2 image\(s\), too few to hold out a test "
                                                       r"split of 0.2"),
])
def test_bad_labels_files_are_refused_by_line(tmp_path, content, match):
    root, _, _, _ = _kaggle(tmp_path, n=6)
    _images(root, ["7.png", "7.jpg"])
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(root, labels=csv, use_cache=False)


def test_labels_need_an_image_folder(tmp_path):
    root, csv, _, _ = _kaggle(tmp_path)
    with pytest.raises(DataError, match="--labels '.*missing.csv' does not exist; give a CSV file"):
        load_dataset(root, labels=tmp_path / "missing.csv")
    with pytest.raises(DataError, match="--labels '.*' is a folder; give a CSV file"):
        load_dataset(root, labels=tmp_path)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,label\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="--labels '.*latin.csv' is not UTF-8 text \\(line 2: invalid continuation "
                                        "byte\\); save it as UTF-8"):
        load_dataset(root, labels=latin)
    with pytest.raises(DataError, match="--labels '' is empty; give a CSV file"):
        load_dataset(root, labels="")
    with pytest.raises(DataError, match="--labels .* names the classes of the images in --data; give --data too"):
        load_dataset(None, labels=csv)
    path, _ = make_official(tmp_path, "cifar10-python", n=4)
    with pytest.raises(DataError, match="applies to image folders and archives; .* holds CIFAR data with its own "
                                        "labels"):
        load_dataset(path, allow_unverified=True, labels=csv)
    with pytest.raises(DataError, match="no class folders found.*need a CSV file of their labels \\(--labels\\)"):
        load_dataset(root)
