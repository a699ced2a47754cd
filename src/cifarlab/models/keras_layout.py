"""Converting weights between cifarlab's PyTorch layout and Keras' layout.

Keras stores Conv2D kernels as (kh, kw, in, out) and Dense kernels as (in, out); PyTorch as
(out, in, kh, kw) and (out, in). Because the Keras-book models flatten channels-last, the
Dense rows already follow Keras' order and a plain transpose suffices.
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn


def to_keras(model: nn.Module) -> list[np.ndarray]:
    """The model's weights as Keras' ``model.get_weights()`` list (kernel, bias per layer)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            out += [m.weight.detach().cpu().numpy().transpose(2, 3, 1, 0), m.bias.detach().cpu().numpy()]
        elif isinstance(m, nn.Linear):
            out += [m.weight.detach().cpu().numpy().T, m.bias.detach().cpu().numpy()]
    return out


def from_keras(model: nn.Module, weights: list[np.ndarray]) -> nn.Module:
    """Load a Keras ``get_weights()`` list into ``model`` in place (inverse of :func:`to_keras`)."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(weights) != 2 * len(layers):
        raise ValueError(f"expected {2 * len(layers)} arrays (kernel and bias for {len(layers)} layers), "
                         f"got {len(weights)}")
    for i, m in enumerate(layers):
        k, b = weights[2 * i], weights[2 * i + 1]
        k = k.transpose(3, 2, 0, 1) if isinstance(m, nn.Conv2d) else k.T
        if tuple(k.shape) != tuple(m.weight.shape):
            raise ValueError(f"layer {i} ({type(m).__name__}): Keras kernel maps to {tuple(k.shape)}, "
                             f"model expects {tuple(m.weight.shape)}")
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(k)))
            m.bias.copy_(torch.from_numpy(b))
    return model
