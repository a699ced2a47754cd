"""data.classes (--classes): a run trained on some of the data's classes, tested on those."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.data import Dataset, only_classes
from cifarlab.errors import CifarlabError


def _ds(classes=("cat", "dog", "frog")):
    x = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    y = np.array([0, 1, 2, 0, 1, 2])
    return Dataset(x, y, x[:3], y[:3], list(classes), "mem", "arrays", test_paths=["a", "b", "c"],
                   train_paths=[f"t{i}" for i in range(6)])


def test_only_classes_keeps_and_renumbers():
    ds = only_classes(_ds(), ["frog", "cat"])
    assert ds.classes == ["frog", "cat"] and ds.y_train.tolist() == [1, 0, 1, 0] and ds.y_test.tolist() == [1, 0]
    assert ds.test_paths == ["a", "c"] and ds.train_paths == ["t0", "t2", "t3", "t5"]
    assert np.array_equal(ds.x_test, _ds().x_test[[0, 2]]) and "dog left out" in ds.notes[-1]
    assert only_classes(_ds(), ["cat", "dog", "frog"]).notes == []
    with pytest.raises(CifarlabError, match="'zebra' of data.classes.*its classes: cat, dog, frog"):
        only_classes(_ds(), ["cat", "zebra"])
    with pytest.raises(CifarlabError, match=r"class\(es\) 'dgo' \(did you mean 'dog'\?\), 'zebra' of data.classes"):
        only_classes(_ds(), ["cat", "dgo", "zebra"])


@pytest.mark.parametrize("value, hint", [(["cat"], "two or more"), (["cat", "cat"], "cat given twice"),
                                         (["cat", " "], "two or more")])
def test_config_refuses_bad_class_lists(value, hint):
    from cifarlab.config import ConfigError, make_config

    with pytest.raises(ConfigError, match=hint):
        make_config("keras-book", data="x", classes=value)
    assert make_config("keras-book", data="x", classes=[" cat", "dog"]).data.classes == ["cat", "dog"]


def test_train_flag_and_evaluation_on_other_data_keep_the_runs_classes(tmp_path, image_folder, capsys):
    from conftest import make_image_folder

    run = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1", "--batch-size",
                 "8", "--classes", "dog, cat", "--out", str(run), "--threads", "1"]) == 0
    assert "classes:\n  - dog\n  - cat" in (run / "config.yaml").read_text()
    capsys.readouterr()
    # other data with more classes: tested on the run's two, in the run's order
    other = make_image_folder(tmp_path / "other", classes=("cat", "ship", "dog"), seed=2)
    assert main(["evaluate", str(run), "--data", str(other), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["num_images"] == 6 and [c["class"] for c in ev["per_class"]] == ["dog", "cat"]
    assert main(["train", "--data", str(image_folder), "--classes", "cat,zebra", "--out", str(tmp_path / "x")]) == 2
    assert "'zebra' of data.classes (--classes) are not in" in capsys.readouterr().err
