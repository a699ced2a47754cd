"""The four official archive layouts, read from archives generated here in the exact layouts."""

from __future__ import annotations

import hashlib
import shutil
import tarfile

import numpy as np
import pytest
from conftest import make_official

from cifarlab.data import cifar, load_dataset
from cifarlab.errors import DataError

KEYS = ["cifar10-python", "cifar10-binary", "cifar100-python", "cifar100-binary"]


@pytest.fixture
def verified(monkeypatch):
    """Make the generated archive's MD5 the 'official' one, so the verified path is exercised."""

    def _verify(key, path):
        fmt = cifar.FORMATS[key]
        monkeypatch.setitem(cifar.FORMATS, key, cifar.OfficialFormat(**{**fmt.__dict__, "md5": cifar.md5sum(path)}))

    return _verify


@pytest.mark.parametrize("key", KEYS)
def test_reads_each_official_archive(tmp_path, key, verified):
    path, truth = make_official(tmp_path, key)
    verified(key, path)
    ds = load_dataset(path)
    assert ds.kind == key
    np.testing.assert_array_equal(ds.x_train, truth["train_x"])
    np.testing.assert_array_equal(ds.y_train, truth["train_y"])
    np.testing.assert_array_equal(ds.x_test, truth["test_x"])
    np.testing.assert_array_equal(ds.y_test, truth["test_y"])
    assert ds.x_train.shape[1:] == (32, 32, 3) and ds.x_train.dtype == np.uint8
    assert len(ds.classes) == (10 if key.startswith("cifar10-") else 100)
    if key.startswith("cifar10-"):
        assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    else:
        assert ds.classes[:2] == ["fine0", "fine1"]


@pytest.mark.parametrize("key", ["cifar100-python", "cifar100-binary"])
def test_cifar100_coarse_labels(tmp_path, key):
    path, truth = make_official(tmp_path, key)
    ds = load_dataset(path, allow_unverified=True, label_mode="coarse")
    np.testing.assert_array_equal(ds.y_train, truth["coarse_train"])
    assert ds.classes == [f"coarse{i}" for i in range(20)]
    assert not any("--label-mode" in n for n in ds.notes)


def test_options_for_cifar100_on_other_data_are_ignored_with_a_note(tmp_path, image_folder):
    path, truth = make_official(tmp_path, "cifar10-python")
    ds = load_dataset(path, "cifar100", allow_unverified=True, label_mode="coarse")
    np.testing.assert_array_equal(ds.y_train, truth["train_y"])
    assert len(ds.classes) == 10
    assert any(n.startswith("--label-mode coarse applies to CIFAR-100 only; ignored") and "(cifar10-python) has its "
               "own 10 classes" in n for n in ds.notes), ds.notes
    assert any(n.startswith("--dataset cifar100 only chooses what to download; ignored") for n in ds.notes)
    ds = load_dataset(image_folder, label_mode="coarse")
    assert ds.classes == ["cat", "dog", "frog"] and any("(image-folder) has its own 3 classes" in n for n in ds.notes)


def test_pixel_layout_is_planar_rgb(tmp_path):
    """The first 1024 bytes of a record are the red plane, row by row."""
    path, truth = make_official(tmp_path, "cifar10-binary")
    ds = load_dataset(path, allow_unverified=True)
    rec = np.frombuffer(truth["members"]["cifar-10-batches-bin/data_batch_1.bin"], np.uint8)[:3073]
    assert ds.x_train[0, 0, 1, 0] == rec[1 + 1]  # red, row 0, column 1
    assert ds.x_train[0, 1, 0, 2] == rec[1 + 2048 + 32]  # blue, row 1, column 0


@pytest.mark.parametrize("key", KEYS)
def test_extracted_folder(tmp_path, key):
    path, truth = make_official(tmp_path, key)
    with tarfile.open(path) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    for p in (tmp_path / "x", tmp_path / "x" / truth["folder"]):
        ds = load_dataset(p)
        np.testing.assert_array_equal(ds.y_test, truth["test_y"])


def test_md5_mismatch_refused_with_both_sums(tmp_path):
    path, _ = make_official(tmp_path, "cifar10-python")
    with pytest.raises(DataError) as e:
        load_dataset(path)
    found = hashlib.md5(path.read_bytes()).hexdigest()
    assert found in str(e.value) and "c58f30108f718f92721af3b95e74349a" in str(e.value)
    assert "--allow-unverified" in str(e.value)
    assert load_dataset(path, allow_unverified=True).x_train.shape == (50, 32, 32, 3)


def test_truncated_archive(tmp_path):
    path, _ = make_official(tmp_path, "cifar10-binary")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(path, allow_unverified=True)


def test_corrupt_gzip(tmp_path):
    path, _ = make_official(tmp_path, "cifar10-binary")
    data = bytearray(path.read_bytes())
    data[40:60] = bytes(20)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(path, allow_unverified=True)


def test_binary_size_not_multiple_of_record(tmp_path):
    path, _ = make_official(tmp_path, "cifar10-binary", replace={"test_batch.bin": bytes(3073 * 2 + 5)})
    with pytest.raises(DataError, match="not a positive multiple of the 3073-byte record"):
        load_dataset(path, allow_unverified=True)


def test_binary_label_out_of_range(tmp_path):
    rec = bytes([10]) + bytes(3072)
    path, _ = make_official(tmp_path, "cifar10-binary", replace={"test_batch.bin": rec})
    with pytest.raises(DataError, match=r"label 10 at record 0 is out of range; valid labels are 0..9"):
        load_dataset(path, allow_unverified=True)


def test_python_label_out_of_range(tmp_path):
    import pickle

    bad = pickle.dumps({b"labels": [3, 12], b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    path, _ = make_official(tmp_path, "cifar10-python", replace={"test_batch": bad})
    with pytest.raises(DataError, match="label 12 at record 1 is out of range"):
        load_dataset(path, allow_unverified=True)


def test_missing_batch_named(tmp_path):
    path, truth = make_official(tmp_path, "cifar10-binary")
    with tarfile.open(path) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / truth["folder"] / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="missing 'cifar-10-batches-bin/data_batch_3.bin'"):
        load_dataset(tmp_path / "x")


def test_wrong_data_shape(tmp_path):
    import pickle

    bad = pickle.dumps({b"labels": [1], b"data": np.zeros((1, 100), np.uint8)}, protocol=2)
    path, _ = make_official(tmp_path, "cifar10-python", replace={"test_batch": bad})
    with pytest.raises(DataError, match=r"uint8 array of shape \(N, 3072\)"):
        load_dataset(path, allow_unverified=True)


def test_missing_path_and_non_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(DataError, match="not a tar or zip archive"):
        load_dataset(f)
    with pytest.raises(DataError, match=r"--data '' is empty; give a path, or leave --data out"):
        load_dataset("")  # not the current folder


def test_copy_of_archive_under_other_name_is_detected(tmp_path):
    path, _ = make_official(tmp_path, "cifar100-binary")
    other = tmp_path / "my-data.tar.gz"
    shutil.copy(path, other)
    assert load_dataset(other, allow_unverified=True).kind == "cifar100-binary"


def test_official_layout_repacked_as_zip(tmp_path):
    """A zip of the official folder is read as the archive is; its MD5 is not the published
    one, so it needs --allow-unverified like any re-packed archive."""
    import zipfile

    _, truth = make_official(tmp_path, "cifar10-python")
    path = tmp_path / "repacked.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in truth["members"].items():
            zf.writestr(name, data)
    with pytest.raises(DataError, match="MD5"):
        load_dataset(path)
    ds = load_dataset(path, allow_unverified=True)
    assert ds.kind == "cifar10-python"
    np.testing.assert_array_equal(ds.x_train, truth["train_x"])
    np.testing.assert_array_equal(ds.y_test, truth["test_y"])
