"""The real JPEG CIFAR-10 copy: loading it, then training on it (skipped where the copy is absent).

One module, so that its tests run in one process, in this order, and the training reads the
images the first test decoded (``real_data_cache``)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import SHARED_JPEG

from cifarlab.config import resolve_config
from cifarlab.data import load_dataset
from cifarlab.train import fit

pytestmark = pytest.mark.skipif(not SHARED_JPEG.is_file(),
                                reason=f"the shared JPEG copy of CIFAR-10 is absent ({SHARED_JPEG})")


def test_real_jpeg_copy_loads_and_second_load_is_cached(real_data_cache):
    ds = load_dataset(SHARED_JPEG)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    t0 = time.perf_counter()
    again = load_dataset(SHARED_JPEG)
    print(f"second load of the JPEG copy: {time.perf_counter() - t0:.2f} s")
    assert "loaded from the decoded cache" in again.notes


def test_keras_deep_learns_on_real_images(tmp_path, real_data_cache):
    cfg = resolve_config("keras-book", overrides={
        "data": {"data": str(SHARED_JPEG), "subset": 5000},
        "train": {"epochs": 3, "out": str(tmp_path / "run"), "seed": 0}})
    m = fit(cfg, log=print)
    print(f"keras-deep, 4,000 JPEG training images, 3 epochs: test accuracy {m['test_accuracy']:.4f} "
          f"on the 10,000 test images")
    assert m["test_accuracy"] > 0.25  # chance is 0.10
    assert min(m["per_class_accuracy"].values()) >= 0.0
