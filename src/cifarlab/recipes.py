"""Named recipes: each is a set of config values, not a copied script."""

from __future__ import annotations

from typing import Any, Callable

from .config import Config, apply_overrides
from .errors import ConfigError


def keras_book() -> dict[str, Any]:
    """The notebook's recipe ("Deep Learning with Keras", CIFAR-10 chapter): keras-deep, RMSprop
    (lr 1e-3, rho 0.9, eps 1e-7 inside the root), batch 128, 20 epochs, validation split 0.2,
    categorical cross-entropy, no augmentation unless ``--augment keras`` is given."""
    return {}


def keras_book_augmented() -> dict[str, Any]:
    """The notebook's second half: the keras-book recipe trained on ImageDataGenerator batches
    (rotation 40, shifts 0.2, zoom 0.2, horizontal flip, fill 'nearest')."""
    return {"augment": {"preset": "keras"}}


RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "keras-book": keras_book,
    "keras-book-augmented": keras_book_augmented,
}


def apply_recipe(cfg: Config, name: str) -> Config:
    """Set the recipe's values on ``cfg``; unknown names raise :class:`ConfigError` listing the valid ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; valid recipes: {', '.join(RECIPES)}")
    cfg.recipe = name
    return apply_overrides(cfg, RECIPES[name](), f"recipe '{name}'")
