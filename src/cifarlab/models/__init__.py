"""Model registry: ``create_model(name, **kw)`` and ``list_models()``, as in timm.

Every model is a plain ``nn.Module`` whose ``forward`` returns logits; probabilities come from a
softmax applied by the caller (``cifarlab.export.Predictor``), which keeps training numerically
stable (cross-entropy on logits) while the notebook's softmax output stays one call away.
Each model takes ``num_classes``, ``in_chans`` and ``img_size`` so it fits any data set.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import ConfigError, did_you_mean

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MIN_SIZE: dict[str, int] = {}
_ABOUT: dict[str, str] = {}


def register_model(name: str, min_size: int = 1,
                   about: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``; ``min_size`` is the
    smallest image height and width (pixels) its layers can take; ``about``, a few words on what
    it is, for ``cifarlab list``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        _MIN_SIZE[name] = min_size
        _ABOUT[name] = about
        return fn

    return deco


def _ensure_loaded() -> None:
    from . import keras_book, resnet, speed  # noqa: F401  (register on import)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def min_image_size(name: str) -> int:
    """The smallest image height and width the registered model ``name`` can take."""
    _ensure_loaded()
    return _MIN_SIZE[name]


def model_about(name: str) -> str:
    """A few words on what the registered model ``name`` is."""
    _ensure_loaded()
    return _ABOUT[name]


def meta_model(name: str) -> nn.Module:
    """The registered model ``name`` (default arguments) built on the meta device, which
    allocates nothing: to look at its layers, as the config's checks do, without building it."""
    import torch

    with torch.device("meta"):
        return create_model(name)


def has_whitening(name: str) -> bool:
    """Whether the registered model ``name`` has a first layer that whitens the data's patches
    (``init_whitening``), whose bias ``train.whiten_bias_epochs`` limits."""
    return hasattr(meta_model(name), "init_whitening")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments (num_classes, in_chans, img_size, ...).

    The common arguments are checked first, so that an impossible model (no classes, images
    smaller than its pooling stages allow) is refused with the value at fault rather than
    failing later inside a layer.
    """
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'{did_you_mean(name, _REGISTRY)}; valid models: "
                          f"{', '.join(sorted(_REGISTRY))}")
    _check_common(name, kwargs)
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not take these arguments {sorted(kwargs)}: {e}") from None


def classifier_tensors(model: nn.Module) -> list[str]:
    """The state-dict names of ``model``'s classifier: its last linear layer, whose outputs are
    the classes (the notebook's final Dense, speednet's head); a fine-tune to other classes
    starts it afresh."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{name}.{k}" if name else k for k, _ in model.get_submodule(name).named_parameters()]


def _check_common(name: str, kw: dict) -> None:
    for key in ("num_classes", "in_chans"):
        v = kw.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model '{name}': {key}={v!r} is not valid; it must be a positive integer")
    size = kw.get("img_size", _MIN_SIZE[name])
    hw = (size, size) if isinstance(size, int) else tuple(size)
    low = _MIN_SIZE[name]
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in hw) or min(hw) < low:
        raise ConfigError(f"model '{name}' cannot take images of size {size!r}; it needs a height and width of "
                          f"at least {low} pixels")
