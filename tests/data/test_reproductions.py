"""CIFAR-10.1 and CIFAR-10.2 files, written here in their publishers' layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab.data import load_dataset
from cifarlab.data.cifar import CIFAR10_CLASSES
from cifarlab.errors import CifarlabError, DataError


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10


def _v1(folder, version="v6", n=20, seed=0):
    """CIFAR-10.1: cifar10.1_<version>_data.npy and _labels.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _images(n, seed)
    np.save(folder / f"cifar10.1_{version}_data.npy", x)
    np.save(folder / f"cifar10.1_{version}_labels.npy", y)
    return x, y


def _v2(folder, split, n, seed):
    """CIFAR-10.2: cifar102_<split>.npz with images, labels and the object arrays it also holds."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _images(n, seed)
    np.savez(folder / f"cifar102_{split}.npz", images=x, labels=y, ti_indices=np.arange(n),
             label_names=np.array(CIFAR10_CLASSES, dtype=object), keywords=np.array(["kw"] * n, dtype=object))
    return x, y


def test_cifar10_1_reads_from_its_data_file_its_labels_file_or_its_folder(tmp_path):
    x, y = _v1(tmp_path / "datasets")
    for given in ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy", ""):
        ds = load_dataset(tmp_path / "datasets" / given)
        assert ds.kind == "cifar10.1-v6" and ds.classes == CIFAR10_CLASSES and len(ds.x_train) == 0
        assert np.array_equal(ds.x_test, x) and np.array_equal(ds.y_test, y) and ds.y_test.dtype == np.int64
        assert ds.test_paths[3] == "cifar10.1_v6_data.npy#3" and ds.test_origin == "named"
    _v1(tmp_path / "datasets", "v4", n=21)
    with pytest.raises(DataError, match="holds CIFAR-10.1 v4 and CIFAR-10.1 v6; give one data set's file with --data"):
        load_dataset(tmp_path / "datasets")
    assert len(load_dataset(tmp_path / "datasets" / "cifar10.1_v4_data.npy").x_test) == 21


def test_cifar10_2_trains_from_its_folder_and_tests_on_either_file_alone(tmp_path):
    x_tr, y_tr = _v2(tmp_path / "c", "train", 30, 1)
    x_te, y_te = _v2(tmp_path / "c", "test", 12, 2)
    ds = load_dataset(tmp_path / "c")
    assert ds.kind == "cifar10.2" and np.array_equal(ds.x_train, x_tr) and np.array_equal(ds.y_test, y_te)
    assert ds.train_paths[0] == "cifar102_train.npz#0" and ds.test_paths[-1] == "cifar102_test.npz#11"
    alone = load_dataset(tmp_path / "c" / "cifar102_test.npz")
    assert alone.kind == "cifar10.2-test" and len(alone.x_train) == 0 and np.array_equal(alone.x_test, x_te)
    assert load_dataset(tmp_path / "c" / "cifar102_train.npz").kind == "cifar10.2-train"
    with pytest.raises(DataError, match="holds CIFAR data with its own labels: leave --labels out"):
        load_dataset(tmp_path / "c", labels="x.csv")


class _Marker:
    """Unpickled, it would create a file: a loader that unpickles runs this."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_bad_files_are_refused_with_what_was_expected_and_no_pickle_is_loaded(tmp_path):
    d = tmp_path / "d"
    x, y = _v1(d)
    np.save(d / "cifar10.1_v6_labels.npy", y[:-1])
    with pytest.raises(DataError, match=r"cifar10.1_v6_labels.npy: expected 20 integer labels \(one per image\), "
                                        r"found int64 of shape \(19,\)"):
        load_dataset(d)
    np.save(d / "cifar10.1_v6_labels.npy", y + 1)
    with pytest.raises(DataError, match="label 10 is not one of CIFAR-10's classes 0 to 9"):
        load_dataset(d)
    np.save(d / "cifar10.1_v6_labels.npy", y)
    np.save(d / "cifar10.1_v6_data.npy", x.astype(np.float32))
    with pytest.raises(DataError, match=r"expected uint8 images of shape \(N, 32, 32, 3\), N at least 1, found "
                                        r"float32 of shape"):
        load_dataset(d)
    marker = tmp_path / "ran"
    np.save(d / "cifar10.1_v6_data.npy", np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cifar10.1_v6_data.npy: not a readable numpy file"):
        load_dataset(d)
    assert not marker.exists()
    (d / "cifar10.1_v6_labels.npy").unlink()
    np.save(d / "cifar10.1_v6_data.npy", x)
    with pytest.raises(DataError, match="cifar10.1_v6_labels.npy is missing: CIFAR-10.1's labels lie beside"):
        load_dataset(d / "cifar10.1_v6_data.npy")
    e = tmp_path / "e"
    e.mkdir()
    np.savez(e / "cifar102_test.npz", data=x, labels=y)
    with pytest.raises(DataError, match="expected the arrays images, labels, found data, labels"):
        load_dataset(e)
    (e / "cifar102_test.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="cifar102_test.npz: not a readable numpy file"):
        load_dataset(e)


def test_a_run_is_tested_on_cifar10_1_and_a_test_set_alone_cannot_be_trained_on(tmp_path, capsys):
    from cifarlab.cli import main
    from cifarlab.train import fit
    from conftest import tiny_config

    _v2(tmp_path / "c102", "train", 40, 1)
    _v2(tmp_path / "c102", "test", 10, 2)
    x, y = _v1(tmp_path / "c101", n=20, seed=3)
    cfg = tiny_config(str(tmp_path / "c102"), str(tmp_path / "run"))
    cfg.data.val_split = 0.0
    fit(cfg, log=lambda s: None)
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "c101"), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["num_images"] == 20 and report["data"] == str(tmp_path / "c101")
    assert [c["support"] for c in report["per_class"]] == [2] * 10
    assert main(["audit", str(tmp_path / "run"), "--data", str(tmp_path / "c101"), "--bootstrap", "100"]) == 0
    # a report on other data is kept apart from the run's own: audit-<data name>-<hash of its path>
    (folder,) = (tmp_path / "run").glob("audit-c101-*")
    assert not (tmp_path / "run" / "audit").exists()
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"- Source: `{tmp_path / 'c101'}`, 20 images; the test images of other data than the model was trained on" \
        in card
    capsys.readouterr()
    for command, says in ((["calibrate", str(tmp_path / "run")], "holds test images only, not the images"),
                          (["duplicates"], "holds test images only: duplicates looks for test images that copy "
                                           "training images"),
                          (["augment", "--out", str(tmp_path / "a.npz")], "holds no train images; it holds 20 test "
                                                                          "images: give --split test")):
        assert main([*command, "--data", str(tmp_path / "c101")]) == 2
        assert says in capsys.readouterr().err, command
    cfg = tiny_config(str(tmp_path / "c101" / "cifar10.1_v6_data.npy"), str(tmp_path / "run2"))
    with pytest.raises(CifarlabError, match=r"\(cifar10.1-v6\) holds test images only: test a trained run on it"):
        fit(cfg, log=lambda s: None)
    assert not (tmp_path / "run2").exists()
