"""cifarlab: train, evaluate, augment, save and audit small-image classifiers.

The public API is imported lazily so that ``import cifarlab`` stays cheap:

>>> import cifarlab
>>> model = cifarlab.load_model("runs/my-run")          # doctest: +SKIP
>>> probs = model.predict(images)                      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model", "load_dataset", "import_keras", "compare_runs",
           "CifarlabError", "__version__"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from . import models

        return getattr(models, name)
    if name == "load_model":
        from .export import load_model

        return load_model
    if name == "import_keras":
        from .keras_files import import_keras

        return import_keras
    if name == "compare_runs":
        from .compare import compare_runs

        return compare_runs
    if name == "load_dataset":
        from .data import load_dataset

        return load_dataset
    if name == "CifarlabError":
        from .errors import CifarlabError

        return CifarlabError
    raise AttributeError(f"module 'cifarlab' has no attribute '{name}'")
