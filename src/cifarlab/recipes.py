"""Named recipes: each is a set of config values, not a copied script."""

from __future__ import annotations

from typing import Any, Callable

from .config import Config, apply_overrides
from .errors import ConfigError, did_you_mean


def keras_book() -> dict[str, Any]:
    """The notebook's recipe ("Deep Learning with Keras", CIFAR-10 chapter): keras-deep, RMSprop
    (lr 1e-3, rho 0.9, eps 1e-7 inside the root), batch 128, 20 epochs, validation split 0.2,
    categorical cross-entropy, no augmentation unless ``--augment keras`` is given."""
    return {}


def keras_book_augmented() -> dict[str, Any]:
    """The notebook's second half: the keras-book recipe trained on ImageDataGenerator batches
    (rotation 40, shifts 0.2, zoom 0.2, horizontal flip, fill 'nearest')."""
    return {"augment": {"preset": "keras"}}


def _airbench_sgd(lr: float, weight_decay: float = 0.0153, momentum: float = 0.85, batch: int = 1024,
                  trained: int | None = None) -> dict[str, Any]:
    """airbench's optimizer settings in this package's units. airbench states ``lr`` and
    ``weight_decay`` per 1024 examples: its PyTorch lr is ``lr / kilostep`` with
    kilostep = 1024 * (1 + 1 / (1 - momentum)), on a loss summed over the ``trained`` examples
    of a step (the batch, unless hard-example selection keeps fewer), and each step shrinks
    the weights by ``weight_decay * batch / kilostep``. Our loss is a mean over the trained
    examples, so our lr is that lr times their number (1.50 for lr 11.5 at batch 1024), and the
    weight decay that shrinks the weights as much per step is ``weight_decay / lr`` times
    ``batch / trained``."""
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    trained = trained or batch
    return {"name": "sgd", "lr": lr / kilostep * trained, "momentum": momentum, "nesterov": True,
            "weight_decay": weight_decay / lr * batch / trained,
            "norm_bias_lr_scale": 64.0,  # airbench's bias_scaler: batch-norm biases at 64 times the lr
            "schedule": "triangle", "warmup_frac": 0.23, "start_lr_frac": 0.2, "final_lr_frac": 0.07}


def fast() -> dict[str, Any]:
    """94%-class on the official data, after airbench94 (Keller Jordan, 2024): ``speednet`` with a
    whitening first layer, batch norm, label smoothing 0.2, Nesterov SGD (lr 11.5 per 1024
    examples, momentum 0.85, batch-norm biases at 64 times the lr) with a triangular schedule,
    lookahead weights every 5 steps (the run ends on them), 2-pixel random crops with alternating
    flips, flip + translate test-time augmentation, and every training image trained on (no
    validation split) in full batches only, as airbench; bf16 autocast where the device computes
    bfloat16 natively (``precision: auto``), as the records train in half precision. airbench
    trains 9.9 epochs; 10 epochs here are 480 steps against its 476."""
    return {
        "model": {"name": "speednet"},
        "data": {"normalize": True, "val_split": 0.0},
        "optim": _airbench_sgd(lr=11.5),
        "augment": {"preset": "crop-flip", "crop_padding": 2, "alternating_flip": True},
        "train": {"epochs": 10, "batch_size": 1024, "drop_last": True, "label_smoothing": 0.2,
                  "lookahead_every": 5, "whiten_bias_epochs": 3, "tta": "flip-translate",
                  # on a 2-core CPU with AVX-512 BF16 an epoch took 86-104 s, against 182-196 s in fp32
                  "precision": "auto"},
    }


def fast_muon() -> dict[str, Any]:
    """94%-class in fewer, larger steps, after airbench94_muon (Keller Jordan, 2024: 94.01% in
    2.59 s on an A100, against 3.83 s for airbench94): the ``fast`` recipe's net, data and
    test-time augmentation, with Muon for the convolution filters (lr 0.24, momentum 0.6,
    Nesterov), Nesterov SGD for the rest, batch 2000, 8 epochs, lr decaying linearly to 0, no
    lookahead; the whitening bias trains for 3 epochs on a schedule of its own.

    airbench94_muon sums the loss over its batch of 2000, scales its head's output by 1/256
    with unit-variance weights, and gives the biases SGD lr 0.053 and the head 0.67, with
    weight decay 2e-6 per example (lr x decay = 0.004 a step). On this package's mean loss
    and 1/9 head scale with PyTorch's initial weights (the same initial logits), the same
    steps are: head lr 0.67 * 2000 * (9/256)^2 = 1.656, biases at 64 times that (0.053 * 2000
    = 106), and weight decay 0.004 / lr."""
    head_lr = 0.67 * 2000 * (9 / 256) ** 2
    base = fast()
    return {
        **base,
        "optim": {"name": "muon", "muon_lr": 0.24, "muon_momentum": 0.6, "nesterov": True, "ns_steps": 3,
                  "lr": head_lr, "momentum": 0.85, "weight_decay": 0.004 / head_lr, "norm_bias_lr_scale": 64.0,
                  "schedule": "triangle", "warmup_frac": 0.0, "start_lr_frac": 1.0, "final_lr_frac": 0.0},
        "train": {**base["train"], "epochs": 8, "batch_size": 2000, "lookahead_every": 0},
    }


def best() -> dict[str, Any]:
    """96%-class, after airbench96 (Keller Jordan, 2024): the ``fast`` recipe on
    ``speednet-wide`` (airbench96's net: widths 128/512/512, three convolutions per group with a
    residual connection), lr 9.0 per 1024 examples, 4-pixel crops, 12-pixel cutout, 40 epochs."""
    cfg = fast()
    cfg["model"] = {"name": "speednet-wide"}
    cfg["optim"] = _airbench_sgd(lr=9.0)
    cfg["augment"] = {"preset": "crop-flip", "crop_padding": 4, "cutout": 12, "alternating_flip": True}
    cfg["train"] = {**cfg["train"], "epochs": 40}
    return cfg


def best_select() -> dict[str, Any]:
    """96%-class in less compute, after airbench96_faster (Keller Jordan, 2024: 96.03% in 27.3 s
    on an A100, against 46.3 s for airbench96): ``speednet-wide2`` (airbench96's June 2024 net,
    widths 128/384/512) trains on the hardest half of each batch of 1024, as ``speednet-proxy``
    scores them (the proxy trains on its own choice every fourth step); 45 epochs of batches,
    lr 9.0 per 1024 examples on the kept 512, weight decay 0.012 per 1024, warm-up over the
    first 10% of steps from 0.2 of the lr, then a linear decay to 0; the ``best`` recipe's
    augmentation, lookahead and test-time augmentation."""
    cfg = best()
    cfg["model"] = {"name": "speednet-wide2"}
    cfg["optim"] = {**_airbench_sgd(lr=9.0, weight_decay=0.012, batch=1024, trained=512),
                    "warmup_frac": 0.1, "final_lr_frac": 0.0}
    cfg["train"] = {**cfg["train"], "epochs": 45, "select_fraction": 0.5, "select_model": "speednet-proxy",
                    "select_backward_every": 4}
    return cfg


def resnet() -> dict[str, Any]:
    """He et al.'s CIFAR-10 recipe for their residual nets ("Deep Residual Learning for Image
    Recognition", 2016, section 4.2): ``resnet20`` (``--model resnet56`` for the deeper one),
    SGD with lr 0.1, momentum 0.9 and weight decay 1e-4, batch 128, the lr divided by 10 at
    32,000 and 48,000 of 64,000 steps (182 epochs of 352 steps on 45,000 images, 5,000 held
    out for validation: 64,064 steps), 4-pixel crops and flips, no test-time augmentation. Two
    departures: the crops are of reflect-padded images (the paper pads with zeros), and the
    images are normalised per channel (the paper subtracts the per-pixel mean). The paper
    reports 8.75% test error for ResNet-20 and 6.97% for ResNet-56 on the official data."""
    return {
        "model": {"name": "resnet20"},
        "data": {"normalize": True, "val_split": 0.1},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step",
                  "milestones": [0.5, 0.75], "gamma": 0.1},
        "augment": {"preset": "crop-flip", "crop_padding": 4},
        "train": {"epochs": 182, "batch_size": 128},
    }


RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "keras-book": keras_book,
    "keras-book-augmented": keras_book_augmented,
    "fast": fast,
    "fast-muon": fast_muon,
    "best": best,
    "best-select": best_select,
    "resnet": resnet,
}


def apply_recipe(cfg: Config, name: str) -> Config:
    """Set the recipe's values on ``cfg``; unknown names raise :class:`ConfigError` listing the valid ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'{did_you_mean(name, RECIPES)}; valid recipes: {', '.join(RECIPES)}")
    cfg.recipe = name
    return apply_overrides(cfg, RECIPES[name](), f"recipe '{name}'")
