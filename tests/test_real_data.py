"""Training on the real JPEG CIFAR-10 copy (skipped where the copy is absent)."""

from __future__ import annotations

import pytest
from conftest import SHARED_JPEG

from cifarlab.config import resolve_config
from cifarlab.train import fit

pytestmark = pytest.mark.skipif(not SHARED_JPEG.is_file(),
                                reason=f"the shared JPEG copy of CIFAR-10 is absent ({SHARED_JPEG})")


def test_keras_deep_learns_on_real_images(tmp_path):
    cfg = resolve_config("keras-book", overrides={
        "data": {"data": str(SHARED_JPEG), "subset": 5000},
        "train": {"epochs": 3, "out": str(tmp_path / "run"), "seed": 0}})
    m = fit(cfg, log=print)
    print(f"keras-deep, 4,000 JPEG training images, 3 epochs: test accuracy {m['test_accuracy']:.4f} "
          f"on the 10,000 test images")
    assert m["test_accuracy"] > 0.25  # chance is 0.10
    assert min(m["per_class_accuracy"].values()) >= 0.0
