"""Model registry: ``create_model(name, **kw)`` and ``list_models()``, as in timm.

Every model is a plain ``nn.Module`` whose ``forward`` returns logits; probabilities come from a
softmax applied by the caller (``cifarlab.export.Predictor``), which keeps training numerically
stable (cross-entropy on logits) while the notebook's softmax output stays one call away.
Each model takes ``num_classes``, ``in_chans`` and ``img_size`` so it fits any data set.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _ensure_loaded() -> None:
    from . import keras_book, speed  # noqa: F401  (register on import)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments (num_classes, in_chans, img_size, ...)."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; valid models: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not take these arguments {sorted(kwargs)}: {e}") from None
