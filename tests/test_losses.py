"""The training loss and class weights (cifarlab.losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.losses import class_weights, cross_entropy, logit_offsets

CLASSES = ["cat", "dog", "frog"]


def test_balanced_weights_make_every_class_weigh_the_same_in_total():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights("balanced", torch.from_numpy(y), CLASSES)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]))
    totals = [float(w[c]) * int((y == c).sum()) for c in range(3)]
    assert totals == pytest.approx([10 / 3] * 3)
    assert class_weights(None, y, CLASSES) is None


def test_named_weights_by_class_name_or_index_the_others_one():
    y = np.array([0, 1, 2])
    assert class_weights({"dog": 2.5}, y, CLASSES).tolist() == [1.0, 2.5, 1.0]
    assert class_weights({"2": 0.0, "cat": 4.0}, y, CLASSES).tolist() == [4.0, 1.0, 0.0]
    # a class named "1" is that class, not index 1
    assert class_weights({"1": 3.0}, y, ["0", "2", "1"]).tolist() == [1.0, 1.0, 3.0]


def test_weights_that_cannot_apply_are_refused_with_the_classes():
    y = np.array([0, 0, 1])
    with pytest.raises(ConfigError, match=r"names class 'lion', which this data does not have; its classes are "
                                          r"cat, dog, frog \(or their indices 0 to 2\)"):
        class_weights({"lion": 2.0}, y, CLASSES)
    with pytest.raises(ConfigError, match="names class '3'"):
        class_weights({"3": 2.0}, y, CLASSES)
    with pytest.raises(ConfigError, match="'balanced' needs training images of every class, and frog has none"):
        class_weights("balanced", y, CLASSES)
    with pytest.raises(ConfigError, match="every class weight 0"):
        class_weights({"cat": 0, "dog": 0, "frog": 0}, y, CLASSES)


LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.5, 3.0, 0.0], [1.0, 1.0, -2.0]])
LABELS = torch.tensor([0, 2, 1, 2])
WEIGHTS = torch.tensor([0.5, 3.0, 1.25])


@pytest.mark.parametrize("smoothing, weighted, unweighted", [
    # Keras 3.15.1 (TensorFlow backend): CategoricalCrossentropy(from_logits=True,
    # label_smoothing=s)(one_hot(LABELS), LOGITS, sample_weight=WEIGHTS[LABELS]), and without weights
    (0.0, 1.5493988990783691, 1.2550259828567505),
    (0.1, 1.6962740421295166, 1.3075259923934937),
])
def test_weighted_cross_entropy_matches_keras(smoothing, weighted, unweighted):
    assert float(cross_entropy(LOGITS, LABELS, smoothing, WEIGHTS)) == pytest.approx(weighted, rel=1e-6)
    assert float(cross_entropy(LOGITS, LABELS, smoothing)) == pytest.approx(unweighted, rel=1e-6)
    # Keras divides by the batch size, not by the summed weights (PyTorch's weight=)
    torch_style = nn.functional.cross_entropy(LOGITS, LABELS, weight=WEIGHTS, label_smoothing=smoothing)
    assert float(torch_style) != pytest.approx(weighted, rel=1e-3)


def test_a_weight_of_zero_leaves_that_class_out_of_the_gradient():
    logits = LOGITS.clone().requires_grad_()
    cross_entropy(logits, LABELS, 0.0, torch.tensor([1.0, 0.0, 1.0])).backward()
    assert torch.equal(logits.grad[2], torch.zeros(3))  # the one example of class 1
    assert logits.grad[[0, 1, 3]].abs().sum() > 0


def test_logit_offsets_are_tau_times_the_log_training_shares():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    np.testing.assert_allclose(logit_offsets(1.0, y, ["a", "b", "c"]).numpy(), np.log([0.6, 0.3, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(logit_offsets(0.5, torch.from_numpy(y), ["a", "b", "c"]).numpy(),
                               0.5 * np.log([0.6, 0.3, 0.1]), rtol=1e-6)
    assert logit_offsets(0.0, y, ["a", "b", "c"]) is None
    with pytest.raises(ConfigError, match=r"logit_adjustment = 1 needs training images of every class, and d has none"):
        logit_offsets(1.0, y, ["a", "b", "c", "d"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logit_adjusted_cross_entropy_is_that_of_the_shifted_logits(smoothing):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g).bfloat16(), torch.randint(0, 3, (16,), generator=g)
    offset = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    want = torch.nn.functional.cross_entropy(logits.float() + offset, y, label_smoothing=smoothing)
    assert cross_entropy(logits, y, smoothing, logit_offset=offset).item() == pytest.approx(want.item(), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 3.0])  # with class weights too, the weighting of the shifted logits' losses
    per = torch.nn.functional.cross_entropy(logits.float() + offset, y, label_smoothing=smoothing, reduction="none")
    assert cross_entropy(logits, y, smoothing, w, offset).item() == pytest.approx((per * w[y]).mean().item(), rel=1e-6)
    # a rare class's logit is lowered in the loss, so a rare example's loss rises: the push to predict it
    rare = torch.tensor([2])
    assert cross_entropy(torch.zeros(1, 3), rare, logit_offset=offset) > cross_entropy(torch.zeros(1, 3), rare)


def test_distillation_loss_is_t_squared_kl_with_hintons_gradient():
    """Zero where the two agree; T^2 KL(teacher || model) of the softened softmaxes otherwise,
    whose gradient in the model's logits is T (softmax(s/T) - softmax(t/T)) / N (Hinton et al.)."""
    from cifarlab.losses import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g) * 3
    assert distillation_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 4.0):
        loss = distillation_loss(s, t, temp)
        p, q = torch.softmax(s.detach() / temp, 1), torch.softmax(t / temp, 1)
        kl = (q * (q.log() - p.log())).sum(1).mean() * temp**2
        assert loss.item() == pytest.approx(kl.item(), rel=1e-5)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.allclose(grad, temp * (p - q) / len(s), atol=1e-6)
