"""Hard-example selection: the proxy keeps the highest-loss examples, trains on them every k
steps, survives a checkpoint, and the training loop trains the model on what it keeps."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder

from cifarlab.config import resolve_config
from cifarlab.errors import ConfigError
from cifarlab.selection import HardExampleSelector


def _selector(fraction=0.25, every=3, seed=0, calls=None):
    torch.manual_seed(seed)
    proxy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    opt = torch.optim.SGD(proxy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    from cifarlab.train import train_step

    step = functools.partial(train_step, proxy, opt)
    if calls is not None:
        def step(x, y, real=step):  # noqa: F811 - records, then trains
            calls.append(len(x))
            return real(x, y)
    return HardExampleSelector(proxy, opt, sched, step, fraction, every, label_smoothing=0.1)


def _batch(g, n=8):
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_keeps_the_examples_with_the_highest_proxy_loss():
    sel = _selector(fraction=0.25)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = _batch(g)
        with torch.no_grad():
            losses = F.cross_entropy(sel.model(x), y, label_smoothing=0.1, reduction="none")
        keep = sel(x, y)
        assert len(keep) == 2 == sel.kept(8)
        assert set(keep.tolist()) == set(losses.argsort()[-2:].tolist())
        assert losses[keep].min() > losses[[i for i in range(8) if i not in keep.tolist()]].max()


def test_the_proxy_trains_on_what_it_keeps_every_kth_step_and_its_schedule_steps_every_step():
    calls: list[int] = []
    sel = _selector(fraction=0.5, every=3, calls=calls)
    g = torch.Generator().manual_seed(2)
    before = [p.detach().clone() for p in sel.model.parameters()]
    moved = []
    for _ in range(7):
        sel(*_batch(g))
        now = [p.detach().clone() for p in sel.model.parameters()]
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, now)))
        before = now
    assert moved == [True, False, False, True, False, False, True]  # steps 0, 3 and 6
    assert calls == [4, 4, 4]  # on the kept half of each batch of 8
    assert sel.scheduler.last_epoch == 7 and sel.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 8)


def test_a_restored_selector_selects_and_trains_as_the_original():
    a = _selector(every=2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        a(*_batch(g))
    b = _selector(every=2, seed=9)  # other initial weights, overwritten by the state
    b.load_state_dict(a.state_dict())
    assert b.steps == 3
    for _ in range(4):
        x, y = _batch(g)
        assert torch.equal(a(x, y), b(x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_bad_selector_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="fraction 0 is not valid; it must lie in"):
        _selector(fraction=0)
    with pytest.raises(ValueError, match="backward_every 0 is not valid"):
        _selector(every=0)


@pytest.mark.parametrize("key,value,message", [
    ("select_fraction", 0.0, r"train.select_fraction = 0.0 is not valid; it must lie in \(0, 1\]"),
    ("select_fraction", 1.5, r"train.select_fraction = 1.5 is not valid"),
    ("select_model", "tiny", r"train.select_model = 'tiny' is not valid; valid models: .*speednet-proxy"),
    ("select_backward_every", 0, r"train.select_backward_every = 0 is not valid; it must be at least 1"),
])
def test_bad_selection_settings_are_refused_by_name(key, value, message):
    train = {key: value} if key == "select_fraction" else {key: value, "select_fraction": 0.5}
    with pytest.raises(ConfigError, match=message):
        resolve_config("best-select" if key != "select_fraction" else "fast", overrides={"train": train})


def test_the_model_trains_on_the_kept_examples_and_the_proxy_every_fourth_step(tmp_path, monkeypatch):
    """best-select on a tiny folder of three classes: every step of the model gets the 8 of its 16 images that
    the proxy keeps; the proxy trains on its 8 every fourth step; the proxy never becomes part
    of the saved model."""
    import cifarlab.train as train_mod

    data = make_image_folder(tmp_path / "d", n_train=24, n_test=4)
    cfg = resolve_config("best-select", overrides={
        "data": {"data": str(data)}, "model": {"name": "speednet"},
        "train": {"epochs": 2, "batch_size": 16, "out": str(tmp_path / "r"), "threads": 1}})
    seen: list[tuple[int, int]] = []  # (parameter count of the stepped net, batch)
    real = train_mod.train_step

    def recording(model, optimizer, x, y, *a, **kw):
        seen.append((sum(p.numel() for p in model.parameters()), len(x)))
        return real(model, optimizer, x, y, *a, **kw)

    monkeypatch.setattr(train_mod, "train_step", recording)
    lines: list[str] = []
    m = train_mod.fit(cfg, log=lines.append)
    assert any("each step trains on the 8 of its 16 images that speednet-proxy (146,296 parameters) finds hardest"
               in line for line in lines)
    steps = 2 * (72 // 16)  # 4 a epoch, full batches only
    assert seen.count((1_971_000, 8)) == steps and seen.count((146_296, 8)) == 2  # steps 0 and 4
    assert len(seen) == steps + 2
    assert m["num_params"] == 1_971_000 and 0 <= m["test_accuracy"] <= 1


def test_select_fraction_flag_reaches_the_config():
    from cifarlab.cli import _parser, _train_overrides

    args = _parser().parse_args(["train", "--recipe", "fast", "--select-fraction", "0.25"])
    cfg = resolve_config(args.recipe, overrides=_train_overrides(args))
    assert cfg.train.select_fraction == 0.25 and cfg.train.select_model == "speednet-proxy"
    args = _parser().parse_args(["train", "--select-fraction", "2"])
    with pytest.raises(ConfigError, match="train.select_fraction = 2.0 is not valid"):
        resolve_config(overrides=_train_overrides(args))


def test_the_runs_proxy_trains_with_the_runs_class_weights():
    """train.class_weight weighs the proxy's training loss as the model's (train.train_step's
    class_weight); its scores, the examples' hardness, stay unweighted."""
    from cifarlab.config import resolve_config
    from cifarlab.models import create_model
    from cifarlab.train import _selector

    cfg = resolve_config("fast", overrides={"train": {"select_fraction": 0.5, "precision": "fp32"}})
    weights = torch.tensor([1.0, 2.0, 3.0])
    proxy = create_model("speednet-proxy", num_classes=3)
    sel = _selector(cfg, proxy, torch.device("cpu"), torch.contiguous_format, 10, None, weights)
    assert sel.train_step.keywords["class_weight"] is weights
