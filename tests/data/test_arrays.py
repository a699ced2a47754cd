"""Images as numpy arrays in one .npz file, laid out as keras.datasets gives them."""

from __future__ import annotations

import gc
import json
import re
import warnings

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.data import load_dataset
from cifarlab.errors import DataError


def _images(n: int, seed: int, shape=(8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


def test_keras_layout_reads_as_keras_gives_it(tmp_path):
    """(N, 1) labels as cifar10.load_data() returns them; classes by number, with a note saying
    how to name them, or by a classes array."""
    x_tr, x_te = _images(12, 0), _images(6, 1)
    path = tmp_path / "cifar.npz"
    np.savez(path, x_train=x_tr, y_train=_labels(12)[:, None], x_test=x_te, y_test=_labels(6)[:, None])
    ds = load_dataset(path)
    assert ds.kind == "arrays" and ds.test_origin == "named" and ds.classes == ["0", "1", "2"]
    assert np.array_equal(ds.x_train, x_tr) and np.array_equal(ds.x_test, x_te)
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == _labels(12).tolist()
    assert ds.train_paths[:2] == ["x_train#0", "x_train#1"] and ds.test_paths[-1] == "x_test#5"
    assert "cifar.npz names no classes: they are called 0 to 2; to name them, save a classes array" in ds.notes[0]
    np.savez(path, x_train=x_tr, y_train=_labels(12), x_test=x_te, y_test=_labels(6),
             classes=np.array(["cat", "dog", "frog", "horse"]), extra=np.zeros(2))
    ds = load_dataset(path)
    assert ds.classes == ["cat", "dog", "frog", "horse"]  # a class without images keeps its name and number
    assert ds.notes == ["cifar.npz: ignored array(s) extra; read are x_train, y_train, x_test, y_test and classes"]


def test_grey_images_one_hot_labels_and_training_arrays_alone(tmp_path):
    """(N, H, W) images gain their channel; one-hot rows (to_categorical's) give their classes,
    the last one even where no image has it; without test arrays a share of each class is held
    out by the images' names, the same every time."""
    x = _images(40, 2, (6, 5))
    y = np.eye(5)[_labels(40, 4)]  # 5 columns, class 4 never used
    path = tmp_path / "grey.npz"
    np.savez(path, x_train=x, y_train=y)
    ds = load_dataset(path)
    assert ds.x_train.shape[1:] == (6, 5, 1) and ds.classes == ["0", "1", "2", "3", "4"]
    assert ds.test_origin == "held-out" and len(ds.x_test) == 8 and len(ds.x_train) == 32
    assert "grey.npz: y_train read as one-hot rows of 5 classes" in ds.notes
    assert "held out 0.2 of each class's images for testing (8 of 40), by their paths, the same in every command" \
        in ds.notes
    rows = [int(p.partition("#")[2]) for p in ds.test_paths]
    assert np.array_equal(ds.x_test[..., 0], x[rows]) and ds.y_test.tolist() == _labels(40, 4)[rows].tolist()
    assert load_dataset(path).test_paths == ds.test_paths
    assert len(load_dataset(path, test_split=0.5).x_test) == 20


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": _images(4, 0).astype(np.float32) / 255, "y_train": _labels(4)},
     r"x_train is float32; expected uint8 pixels from 0 to 255 \(images scaled to \[0, 1\] as the notebook does: "
     r"save \(x \* 255\).round\(\).astype\('uint8'\)\)"),
    ({"x_train": _images(4, 0)}, "holds x_train but not y_train; give both, or neither"),
    ({"x_test": _images(4, 0), "y_test": _labels(3)}, "x_test holds 4 images but y_test 3 labels"),
    ({"x_train": _images(6, 0), "y_train": _labels(6), "x_test": _images(2, 0, (4, 4, 3)), "y_test": _labels(2)},
     "x_train and x_test hold images of different shapes"),
    ({"x_test": _images(2, 0, (4, 4, 2)), "y_test": _labels(2)}, r"x_test has shape \(2, 4, 4, 2\); expected"),
    ({"x_test": _images(2, 0), "y_test": np.array([[0.5, 0.5], [1, 0]])}, "its rows are not one-hot"),
    ({"x_test": _images(2, 0), "y_test": np.array([0.0, 1.0])}, "y_test is float64 of shape \\(2,\\); expected integer"),
    ({"x_test": _images(2, 0), "y_test": np.array([0, -1])}, "y_test holds the label -1; labels are class numbers"),
    # text labels: as rows of two they were summed as one-hot rows would be, a TypeError (found by the fuzz test)
    ({"x_test": _images(0, 0), "y_test": np.zeros((0, 2), "U3")}, r"y_test is <U3 of shape \(0, 2\); expected integer"),
    ({"x_test": _images(2, 0), "y_test": np.array([["a", "b"], ["c", "d"]])}, "y_test is <U1 of shape"),
    ({"x_test": _images(2, 0), "y_test": np.array([0, 3]), "classes": np.array(["a", "b"])},
     "classes names 2 classes but a label is 3; expected at least 4 names"),
    ({"x_test": _images(2, 0), "y_test": _labels(2), "classes": np.array(["a", "a"])}, "must be distinct"),
    ({"x_test": _images(2, 0), "y_test": _labels(2), "classes": np.arange(2)}, "classes is int64 of shape"),
    ({"x_test": np.array([{"a": 1}, None], dtype=object), "y_test": _labels(2)},
     "its array x_test could not be read as plain numbers or text .*pickled objects are never read"),
    ({"x_test": _images(0, 0), "y_test": _labels(0)}, "its arrays hold no images"),
    ({"x_test": _images(2, 0), "y_test": np.array([0, 2**40])}, "a label is 1099511627776, which would make"),
])
def test_bad_arrays_are_refused_by_name(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_other_npz_files_are_refused_saying_what_they_hold(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, w=np.zeros(3), b=np.zeros(1))
    with pytest.raises(DataError, match="weights.npz: holds the arrays w, b but neither x_train nor x_test; expected "
                                        "x_train, y_train, x_test, y_test"):
        load_dataset(path)
    np.save(tmp_path / "one.npy", np.zeros((2, 3)))  # np.save's one array, under an .npz name
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match=re.escape("one.npz: holds a single array of shape (2, 3), as np.save writes "
                                                  "one, where named arrays were expected: save them with np.savez(")):
        load_dataset(tmp_path / "one.npz")


def test_a_damaged_npz_is_named_and_its_file_closed(tmp_path):
    whole = tmp_path / "whole.npz"
    np.savez(whole, x_test=_images(4, 0), y_test=_labels(4))
    path = tmp_path / "cut.npz"
    path.write_bytes(whole.read_bytes()[:-40])  # the zip's index cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="cut.npz: not a readable numpy file"):
            load_dataset(path)
        gc.collect()  # an unclosed file warns as it is collected
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_train_evaluate_and_test_on_a_test_set_alone(tmp_path, capsys):
    """A run trains on the arrays, evaluate reads them again as config.yaml names them; test
    arrays alone are a set to test on, which train refuses."""
    path = tmp_path / "data.npz"
    np.savez(path, x_train=_images(30, 3, (8, 8)), y_train=_labels(30), x_test=_images(9, 4, (8, 8)),
             y_test=_labels(9), classes=np.array(["cat", "dog", "frog"]))
    run = tmp_path / "run"
    assert main(["train", "--data", str(path), "--model", "keras-shallow", "--epochs", "1", "--batch-size", "8",
                 "--threads", "1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "24 training, 6 validation, 9 test images" in out, out
    assert main(["evaluate", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 9 and [c["class"] for c in report["per_class"]] == ["cat", "dog", "frog"]
    test_only = tmp_path / "new.npz"
    np.savez(test_only, x_test=_images(5, 5, (8, 8)), y_test=_labels(5))  # classes by number: not the run's
    assert main(["evaluate", str(run), "--data", str(test_only)]) == 2
    assert "the data's 3 classes differ from the model's 3 (not among the model's: 0, 1, 2" in capsys.readouterr().err
    np.savez(test_only, x_test=_images(5, 5, (8, 8)), y_test=_labels(5), classes=np.array(["cat", "dog", "frog"]))
    assert main(["evaluate", str(run), "--data", str(test_only), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
    assert main(["train", "--data", str(test_only), "--out", str(tmp_path / "x")]) == 2
    assert "(arrays) holds test images only: test a trained run on it" in capsys.readouterr().err
