"""Optimizers: RMSprop with Keras' documented numbers."""

from __future__ import annotations

import pytest
import torch

from cifarlab.config import OptimConfig
from cifarlab.errors import ConfigError
from cifarlab.optim import KerasRMSprop, build_optimizer


def test_keras_rmsprop_documented_step():
    var = torch.tensor([10.0], requires_grad=True)
    opt = KerasRMSprop([var], lr=0.1)
    (var**2 / 2).sum().backward()
    opt.step()
    assert var.item() == pytest.approx(9.683772, abs=1e-6)


def test_keras_rmsprop_eps_inside_sqrt_differs_from_torch():
    """With tiny gradients, eps inside the root (Keras) and outside (PyTorch) give different steps."""
    a = torch.tensor([1.0], requires_grad=True)
    b = torch.tensor([1.0], requires_grad=True)
    ka, tb = KerasRMSprop([a], lr=0.01, eps=1e-7), torch.optim.RMSprop([b], lr=0.01, alpha=0.9, eps=1e-7)
    for p, o in ((a, ka), (b, tb)):
        p.grad = torch.tensor([1e-4])
        o.step()
    expected = 1 - 0.01 * 1e-4 / (0.1 * 1e-8 + 1e-7) ** 0.5
    assert a.item() == pytest.approx(expected, rel=1e-6)
    assert abs(a.item() - b.item()) > 1e-4


def test_build_each_optimizer():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(build_optimizer(p, OptimConfig(name="rmsprop")), KerasRMSprop)
    sgd = build_optimizer(p, OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(p, OptimConfig(name="adam")), torch.optim.Adam)
    with pytest.raises(ConfigError, match="valid optimizers: rmsprop, sgd, adam"):
        build_optimizer(p, OptimConfig(name="adagrad"))
    with pytest.raises(ConfigError, match="learning rate -1"):
        KerasRMSprop(p, lr=-1)


def test_sgd_is_fused_only_where_every_parameter_is_on_a_cuda_device():
    """CPU training keeps PyTorch's default SGD (results as before); the fused kernel is asked
    for only when every tensor, in groups or not, is on a CUDA device."""
    from cifarlab.config import OptimConfig
    from cifarlab.optim import _all_cuda, build_optimizer

    w = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(iter(w), OptimConfig(name="sgd", lr=0.1, momentum=0.9))
    assert not opt.defaults["fused"] and len(opt.param_groups[0]["params"]) == 2  # a generator is taken whole
    assert not _all_cuda([]) and not _all_cuda([{"params": w[:1]}, w[1]])
    fake = type("T", (), {"is_cuda": True})()
    assert _all_cuda([{"params": [fake]}, fake])
