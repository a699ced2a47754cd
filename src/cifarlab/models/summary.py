"""A Keras-style model summary: layer, output shape, parameters, totals."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

_KERAS_NAMES = {"Conv2d": "Conv2D", "Linear": "Dense", "MaxPool2d": "MaxPooling2D", "ReLU": "Activation",
                "Dropout": "Dropout", "FlattenChannelsLast": "Flatten"}


def _snake_case(name: str) -> str:
    """A layer type as Keras names its instances: MaxPooling2D -> max_pooling2d."""
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)).lower()


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[tuple[str, str, int]], int, int]:
    """Rows of (layer, output shape, params) for each leaf module, then the softmax, plus total
    and trainable counts.

    Output shapes are shown channels-last, ``(None, H, W, C)``, as Keras prints them. The last
    row is the notebook's ``Activation('softmax')``: a cifarlab model returns logits and the
    softmax is applied to them where probabilities are wanted (see :mod:`cifarlab.models`).
    """
    rows: list[tuple[str, str, int]] = []
    counts: dict[str, int] = {}
    hooks = []

    def hook(mod, inp, out):
        kind = type(mod).__name__
        name = _KERAS_NAMES.get(kind, kind)
        counts[name] = counts.get(name, 0) + 1
        shape = tuple(out.shape[1:])
        shape = (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape
        rows.append((f"{_snake_case(name)}_{counts[name]} ({name})", str((None, *shape)),
                     sum(p.numel() for p in mod.parameters(recurse=False))))

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    kind = "Activation"  # Activation('softmax'), numbered after the ReLU Activation layers as Keras numbers it
    rows.append((f"{_snake_case(kind)}_{counts.get(kind, 0) + 1} ({kind})", str((None, *logits.shape[1:])), 0))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rows, total, trainable


def format_summary(model: nn.Module, input_shape: tuple[int, int, int], name: str = "") -> str:
    """The summary as a printable table."""
    rows, total, trainable = summarize(model, input_shape)
    w1 = max(28, *(len(r[0]) for r in rows)) + 2
    w2 = max(22, *(len(r[1]) for r in rows)) + 2
    line = "=" * (w1 + w2 + 12)
    out = [f"Model: \"{name}\"", "_" * (w1 + w2 + 12),
           f"{'Layer (type)':<{w1}}{'Output Shape':<{w2}}{'Param #':>10}", line]
    for r in rows:
        out.append(f"{r[0]:<{w1}}{r[1]:<{w2}}{r[2]:>10,}")
    out += [line, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", "_" * (w1 + w2 + 12),
            f"{rows[-1][0].split()[0]} is the softmax: the model returns logits, and the softmax is applied to them "
            "where probabilities are wanted."]
    return "\n".join(out)
