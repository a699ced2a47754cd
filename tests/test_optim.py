"""Optimizers: RMSprop with Keras' documented numbers."""

from __future__ import annotations

import pytest
import torch

from cifarlab.config import OptimConfig
from cifarlab.errors import ConfigError
from cifarlab.optim import OPTIMIZER_KEYS, OPTIMIZERS, KerasRMSprop, build_optimizer, clip_gradients_


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


def _keras_rmsprop_steps(w, grads, lr, rho, eps, momentum, centered):
    """Keras' RMSprop update_step for dense gradients, written out in float64 from its source."""
    w, v, m, a = w.double(), torch.zeros_like(w, dtype=torch.float64), 0.0, 0.0
    for g in grads:
        g = g.double()
        v = rho * v + (1 - rho) * g.square()
        if centered:
            a = rho * a + (1 - rho) * g
            denominator = v - a * a + eps
        else:
            denominator = v + eps
        increment = lr * g * denominator.rsqrt()
        if momentum > 0:
            m = momentum * m + increment
            w = w - m
        else:
            w = w - increment
    return w


@pytest.mark.parametrize("momentum,centered", [(0.9, False), (0.0, True), (0.5, True)])
@pytest.mark.parametrize("kernel", [False, True])
def test_keras_rmsprop_momentum_and_centered_follow_keras(momentum, centered, kernel):
    """Keras' momentum and centered options over four steps, with or without cifarlab's CPU
    kernel asked for (it has neither option, so the step leaves it aside)."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) * s for s in (1.0, 0.1, 2.0, 0.01)]
    w = torch.nn.Parameter(init.clone())
    opt = KerasRMSprop([w], lr=0.01, rho=0.8, eps=1e-7, momentum=momentum, centered=centered, cpu_kernel=kernel)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    want = _keras_rmsprop_steps(init, grads, 0.01, 0.8, 1e-7, momentum, centered)
    assert torch.allclose(w.detach().double(), want, rtol=1e-5, atol=1e-6)
    plain = torch.nn.Parameter(init.clone())
    plain_opt = KerasRMSprop([plain], lr=0.01, rho=0.8)
    for g in grads:
        plain.grad = g.clone()
        plain_opt.step()
    assert not torch.allclose(plain, w)  # the options change the steps


def test_an_rmsprop_checkpoint_from_before_its_options_resumes_as_it_trained():
    """Optimizer states saved before momentum and centered existed have neither key in their
    groups; loaded, they step as plain RMSprop, as they trained, whatever the new config says."""
    gen = torch.Generator().manual_seed(4)
    init, grads = torch.randn(20, generator=gen), [torch.randn(20, generator=gen) for _ in range(3)]
    results = []
    for old in (True, False):
        w = torch.nn.Parameter(init.clone())
        opt = KerasRMSprop([w], lr=0.01)
        w.grad = grads[0].clone()
        opt.step()
        saved = opt.state_dict()
        if old:
            for group in saved["param_groups"]:
                del group["momentum"], group["centered"]
            opt = KerasRMSprop([w], lr=0.01, momentum=0.9, centered=True)  # the config, read anew
        opt.load_state_dict(saved)
        for g in grads[1:]:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(*results)


def test_rmsprop_options_come_from_the_config():
    p = [torch.nn.Parameter(torch.ones(2))]
    opt = build_optimizer(p, OptimConfig(name="rmsprop", momentum=0.9, centered=True))
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["centered"] is True
    with pytest.raises(ConfigError, match="optim.centered = True is not valid; it is an option of rmsprop, and the "
                                          "optimizer is adam"):
        from cifarlab.config import resolve_config

        resolve_config(overrides={"optim": {"name": "adam", "centered": True}})


def test_build_each_optimizer():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(build_optimizer(p, OptimConfig(name="rmsprop")), KerasRMSprop)
    sgd = build_optimizer(p, OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(p, OptimConfig(name="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(p, OptimConfig(name="adamw")), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="valid optimizers: rmsprop, sgd, adam, adamw, muon"):
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


def test_norm_bias_lr_scaled_says_whether_param_groups_scale_any_tensor():
    """The unused-settings note on ``optim.norm_bias_lr_scale`` rests on this: for every model,
    with SGD and with Muon, it is true exactly where :func:`param_groups` gives some tensor the
    scaled learning rate."""
    from cifarlab.models import create_model, list_models
    from cifarlab.optim import norm_bias_lr_scaled, param_groups

    seen = {}
    for name in list_models():
        m = create_model(name)
        for opt in ("sgd", "muon"):
            cfg = OptimConfig(name=opt, lr=0.5, norm_bias_lr_scale=64.0)
            scaled = any(g["params"] and g.get("lr") == 32.0 for g in param_groups(m, cfg))
            assert norm_bias_lr_scaled(m, cfg) == scaled, (name, opt)
            seen[name, opt] = scaled
    # the notebook's models have no norm layers (only muon scales their biases); the others have
    assert not seen["keras-deep", "sgd"] and not seen["keras-shallow", "sgd"] and seen["keras-deep", "muon"]
    assert seen["resnet20", "sgd"] and seen["speednet", "sgd"]


def test_orthogonalize_many_matches_one_at_a_time():
    """The zero-padded batch gives each matrix, wide or tall, its own result."""
    from cifarlab.optim import orthogonalize, orthogonalize_many

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(*s, generator=g) for s in ((8, 27), (16, 72), (30, 9), (16, 144))]
    for one, many in zip((orthogonalize(m) for m in mats), orthogonalize_many(mats)):
        assert one.shape == many.shape and torch.allclose(one, many, atol=1e-5)
    assert torch.allclose(orthogonalize(torch.stack(mats[1:2] * 2))[1], orthogonalize(mats[1]), atol=1e-6)


def test_adamw_decays_the_weights_apart_from_the_gradient():
    """AdamW (Keras' and PyTorch's) shrinks each weight by lr x weight_decay of itself; Adam's
    weight decay is L2 added to the gradient, which its normalisation turns into a step of
    about lr whatever the decay's size."""
    lr, wd = 0.01, 0.004
    w, v = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    adamw = build_optimizer([w], OptimConfig(name="adamw", lr=lr, weight_decay=wd))
    adam = build_optimizer([v], OptimConfig(name="adam", lr=lr, weight_decay=wd))
    w.grad, v.grad = torch.zeros(3), torch.zeros(3)
    adamw.step()
    adam.step()
    assert torch.equal(w.detach(), torch.full((3,), 1 - lr * wd))
    assert torch.allclose(v.detach(), torch.full((3,), 1 - lr), atol=1e-5)


def _keras_clipped(grads, clipnorm=0.0, global_clipnorm=0.0, clipvalue=0.0):
    """Keras 3's BaseOptimizer._clip_gradients, written out in float64 from its definitions."""
    g64 = [g.double() for g in grads]
    if clipnorm:
        return [g * clipnorm / max(g.norm().item(), clipnorm) for g in g64]
    if global_clipnorm:
        n = torch.stack([g.norm() for g in g64]).norm().item()
        return [g * (global_clipnorm * min(1 / n, 1 / global_clipnorm)) for g in g64]
    return [g.clamp(-clipvalue, clipvalue) for g in g64]


@pytest.mark.parametrize("clip", [{"clipnorm": 1.5}, {"global_clipnorm": 2.0}, {"global_clipnorm": 50.0},
                                  {"clipvalue": 0.3}])
def test_clip_gradients_as_keras(clip):
    """Each tensor's gradient (norms about 0.5, 2 and 10 here) clipped by Keras' rule; a
    gradient under the cap is left exactly as it was; a parameter without one is skipped."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 4), (10,), (3, 3, 3, 3), (2,))]
    for p, norm in zip(params, (0.5, 2.0, 10.0)):
        d = torch.randn(p.shape, generator=g)
        p.grad = d * norm / d.norm()
    before = [p.grad.clone() for p in params[:3]]
    clip_gradients_(params, **clip)
    assert params[3].grad is None
    for p, got, want in zip(params, [p.grad for p in params[:3]], _keras_clipped(before, **clip)):
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)
    if "clipnorm" in clip:  # only the first is under the cap
        assert torch.equal(params[0].grad, before[0]) and params[1].grad.norm() == pytest.approx(1.5, rel=1e-6)
    if clip.get("global_clipnorm") == 50.0:  # under the cap: every gradient as it was
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.parametrize("clip", [{"clipnorm": 1.0}, {"global_clipnorm": 1.0}, {"clipvalue": 1.0}])
def test_clipping_without_any_gradient_does_nothing(clip):
    """A step can come with no gradient at all (every parameter frozen for a while)."""
    p = torch.nn.Parameter(torch.ones(2))
    clip_gradients_([p], **clip)
    assert p.grad is None


def test_global_clipnorm_of_a_non_finite_gradient_is_nan_as_in_keras():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([float("inf"), 1.0]), torch.tensor([1.0, 2.0])
    clip_gradients_([p, q], global_clipnorm=1.0)
    assert torch.isnan(p.grad).all() and torch.isnan(q.grad).all()


def test_clipnorm_of_bfloat16_gradients_keeps_their_dtype():
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    p.grad = torch.full((1000,), 3.0, dtype=torch.bfloat16)  # norm 94.9
    clip_gradients_([p], clipnorm=1.0)
    assert p.grad.dtype == torch.bfloat16 and p.grad.float().norm().item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_on_the_clipped_gradients(name):
    """A config's clipping reaches every optimizer's step: its step equals that of the same
    optimizer, unclipped, given the gradients clipped beforehand."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)]
    grads = [5 * torch.randn(t.shape, generator=g) for t in init]
    results = []
    for clip in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[:1], "muon": True}, {"params": params[1:]}] if name == "muon" else params
        cfg = OptimConfig(name=name, lr=0.01, momentum=0.9 if name == "sgd" else 0.0, clipnorm=1.0 if clip else 0.0)
        opt = build_optimizer(groups, cfg)
        for _ in range(2):
            for p, d in zip(params, grads):
                p.grad = d.clone()
            if not clip:
                clip_gradients_(params, clipnorm=1.0)
            opt.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not torch.equal(results[0][0].detach(), init[0])


def test_clipping_sees_the_gradients_with_the_loss_scale_undone():
    """train_step divides a loss scale out of the gradients before the optimizer's step, and so
    before its clipping: a power-of-two scale changes no bit of a clipped step."""
    from cifarlab.train import train_step

    x, y = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 2
    results = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        opt = build_optimizer(model.parameters(), OptimConfig(name="sgd", lr=0.5, global_clipnorm=0.05))
        for _ in range(3):
            train_step(model, opt, x, y, loss_scale=scale)
        results.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# A value away from OptimConfig's default for each optimizer-specific key.
_OTHER_VALUE = {"rho": 0.5, "eps": 0.5, "momentum": 0.5, "centered": True, "nesterov": True, "beta1": 0.5,
                "beta2": 0.5, "muon_lr": 0.05, "muon_momentum": 0.2, "ns_steps": 5}


def _three_steps(cfg: OptimConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    opt = build_optimizer([{"params": params[:1], "muon": True}, {"params": params[1:]}] if cfg.name == "muon"
                          else params, cfg)
    for step in grads:
        for p, d in zip(params, step):
            p.grad = d.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_keys_are_the_ones_each_optimizer_reads(name):
    """OPTIMIZER_KEYS, which config.unused_settings relies on, says which keys move each
    optimizer's steps: every key listed changes them, every other one leaves them bit for bit."""
    base = {"name": name, "lr": 0.01, "momentum": 0.3}  # nesterov needs a momentum to act on
    ref = _three_steps(OptimConfig(**base))
    assert set(_OTHER_VALUE) == {k for keys in OPTIMIZER_KEYS.values() for k in keys}
    for key, value in _OTHER_VALUE.items():
        if key == "momentum":
            value = 0.6
        moved = _three_steps(OptimConfig(**{**base, key: value}))
        same = all(torch.equal(a, b) for a, b in zip(ref, moved))
        assert same == (key not in OPTIMIZER_KEYS[name]), (name, key)
