"""cifarlab: train, evaluate, augment, save and audit small-image classifiers.

The public API is imported lazily so that ``import cifarlab`` stays cheap:

>>> import cifarlab
>>> cfg = cifarlab.make_config("keras-book", data="cifar10-jpeg.tar.xz", epochs=5)  # doctest: +SKIP
>>> metrics = cifarlab.fit(cfg)                        # doctest: +SKIP
>>> model = cifarlab.load_model("runs/my-run")          # doctest: +SKIP
>>> probs = model.predict(images)                      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["make_config", "fit", "create_model", "list_models", "load_model", "load_ensemble", "load_dataset",
           "evaluate_run", "evaluate_runs", "calibrate_run", "calibrate_runs", "audit_run", "audit_runs", "import_keras", "compare_runs",
           "robustness_run", "robustness_runs", "corrupt", "duplicates_report", "test_split_for", "run_sweep", "explain_dataset",
           "explain_files", "find_lr", "label_issues_run", "ood_run", "ood_runs", "make_datasheet", "export_onnx",
           "export_int8", "CifarlabError",
           "__version__"]
# Each public name, and the module that defines it (imported on first use).
_HOMES = {"make_config": "config", "fit": "train", "create_model": "models", "list_models": "models",
          "load_model": "export", "load_ensemble": "export", "load_dataset": "data", "evaluate_run": "evaluate",
          "audit_run": "audit",
          "evaluate_runs": "evaluate", "audit_runs": "audit", "calibrate_run": "calibrate",
          "calibrate_runs": "calibrate",
          "import_keras": "keras_files", "compare_runs": "compare", "robustness_run": "robustness",
          "robustness_runs": "robustness", "corrupt": "corruptions",
          "duplicates_report": "duplicates", "test_split_for": "data.seen", "run_sweep": "sweep",
          "explain_dataset": "explain", "explain_files": "explain", "find_lr": "lr_find",
          "label_issues_run": "label_issues", "ood_run": "ood", "ood_runs": "ood", "make_datasheet": "datasheet",
          "export_onnx": "deploy", "export_int8": "quantize", "CifarlabError": "errors"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'cifarlab' has no attribute '{name}'")
