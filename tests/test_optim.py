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


def test_orthogonalize_flattens_the_spectrum_and_keeps_the_directions():
    """The Newton-Schulz result has singular values near 1 (Muon's iteration leaves them in
    roughly [0.5, 1.5]) and the singular vectors of the input: it lines up with U V^T."""
    from cifarlab.optim import orthogonalize

    g = torch.Generator().manual_seed(0)
    for shape in ((16, 40), (40, 16)):
        a = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(-1, 1, shape[1]))  # condition ~100+
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        o = orthogonalize(a, steps=5)
        so = torch.linalg.svdvals(o)
        assert o.shape == a.shape and so.min() > 0.3 and so.max() < 1.6, so
        cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
        assert cos > 0.9, cos
        assert torch.allclose(orthogonalize(5 * a, steps=5), o, atol=1e-5)  # the input's scale does not matter
    with pytest.raises(ValueError, match=r"2-D tensor or a 3-D batch; got shape \(2, 3, 4, 5\)"):
        orthogonalize(torch.zeros(2, 3, 4, 5))


def test_muon_steps_as_written():
    """One filter tensor under Muon and one vector under its Nesterov SGD, two steps each,
    against the update rules written out by hand."""
    from cifarlab.optim import Muon, orthogonalize

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    b = torch.nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [w], "muon": True}, {"params": [b], "lr": 0.5, "weight_decay": 0.1}],
               lr=0.24, momentum=0.6, aux_momentum=0.85)
    ew, eb = w.detach().clone(), b.detach().clone()
    mw, mb = torch.zeros_like(ew), torch.zeros_like(eb)
    for _ in range(2):
        gw, gb = torch.randn(4, 3, 3, 3), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        mw = 0.6 * mw + gw
        ew = ew * (2.0 / ew.norm()) - 0.24 * orthogonalize((gw + 0.6 * mw).reshape(4, -1)).view(4, 3, 3, 3)
        d = gb + 0.1 * eb
        mb = 0.85 * mb + d
        eb = eb - 0.5 * (d + 0.85 * mb)
        assert torch.allclose(w, ew, atol=1e-6) and torch.allclose(b, eb, atol=1e-6)
        assert torch.equal(w.grad, gw) and torch.equal(b.grad, gb)  # the step leaves the gradients alone
    with pytest.raises(ConfigError, match="momentum 1.0"):
        Muon([w], momentum=1.0)


def test_muon_groups_split_filters_biases_whitening_and_head():
    from cifarlab.models import create_model
    from cifarlab.optim import muon_param_groups

    m = create_model("speednet")
    cfg = OptimConfig(name="muon", lr=2.0, weight_decay=0.01, norm_bias_lr_scale=64.0)
    groups = muon_param_groups(m, cfg)
    filters, whiten, vectors, head = groups
    assert filters["muon"] and len(filters["params"]) == 6  # six 3x3 convolutions; the whitening filters are frozen
    assert whiten["params"] == [m.whiten.bias] and whiten["schedule"] == "whiten_bias"
    assert all(p.ndim == 1 for p in vectors["params"]) and len(vectors["params"]) == 6  # batch-norm shifts
    assert (vectors["lr"], vectors["weight_decay"]) == (128.0, 0.01 / 64) == (whiten["lr"], whiten["weight_decay"])
    assert head["params"] == [m.head.weight] and (head["lr"], head["weight_decay"]) == (2.0, 0.01)
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)  # each once
    opt = build_optimizer(groups, cfg)
    assert opt.param_groups[3]["lr"] == 2.0 and not opt.param_groups[3]["muon"]


def test_orthogonalize_many_matches_one_at_a_time():
    """The zero-padded batch gives each matrix, wide or tall, its own result."""
    from cifarlab.optim import orthogonalize, orthogonalize_many

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(*s, generator=g) for s in ((8, 27), (16, 72), (30, 9), (16, 144))]
    for one, many in zip((orthogonalize(m) for m in mats), orthogonalize_many(mats)):
        assert one.shape == many.shape and torch.allclose(one, many, atol=1e-5)
    assert torch.allclose(orthogonalize(torch.stack(mats[1:2] * 2))[1], orthogonalize(mats[1]), atol=1e-6)
