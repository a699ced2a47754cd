"""Every registered model runs forward and backward; the Keras-book models match Keras exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.models import classifier_tensors, create_model, has_whitening, list_models, min_image_size
from cifarlab.models.keras_layout import from_keras, to_keras
from cifarlab.models.summary import format_summary, summarize


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_every_model_forward_backward(name, shape):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, in_chans=shape[0], img_size=shape[1:])
    x = torch.randn(4, *shape)
    out = m(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]  # frozen (whitening, BN scale) get none
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if shape[0] == 3:  # the classifier that a fine-tune to other classes starts afresh (train --init-from)
        head = classifier_tensors(m)
        assert head and all(m.state_dict()[k].shape[0] == 7 for k in head)
        with torch.no_grad():
            for k in head:
                m.state_dict()[k].zero_()
            assert torch.equal(m(x), torch.zeros(4, 7))  # it is the last layer: zeroed, the logits are 0


def test_parameter_counts_equal_keras():
    shallow = create_model("keras-shallow")
    deep = create_model("keras-deep")
    assert sum(p.numel() for p in shallow.parameters()) == 4_200_842
    assert sum(p.numel() for p in deep.parameters()) == 2_168_362
    convs = [sum(p.numel() for p in m.parameters()) for m in deep.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [896, 9_248, 18_496, 36_928]


def test_keras_defaults_glorot_uniform_and_zero_bias():
    torch.manual_seed(0)
    m = create_model("keras-deep")
    dense = [x for x in m.modules() if isinstance(x, torch.nn.Linear)][0]
    limit = np.sqrt(6 / (4096 + 512))
    w = dense.weight.detach()
    assert w.abs().max() <= limit and w.abs().max() > 0.95 * limit
    assert abs(w.std().item() - limit / np.sqrt(3)) < 0.01 * limit
    assert all((x.bias == 0).all() for x in m.modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)))
    drop = [x.p for x in m.modules() if isinstance(x, torch.nn.Dropout)]
    assert drop == [0.25, 0.25, 0.5]


def test_flatten_is_channels_last_like_keras():
    """The first Dense unit sees (h, w, c) order: Keras weights computed on an NHWC input agree."""
    torch.manual_seed(0)
    m = create_model("keras-shallow").eval()
    x = torch.rand(2, 3, 32, 32)
    weights = to_keras(m)
    assert weights[0].shape == (3, 3, 3, 32) and weights[2].shape == (8192, 512)
    # Re-implement the Keras forward pass in numpy, channels-last, from the Keras-layout weights.
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x, m[0].weight, m[0].bias, padding=1).relu()
    pooled = torch.nn.functional.max_pool2d(conv, 2).permute(0, 2, 3, 1).reshape(2, -1).numpy()
    h = np.maximum(pooled @ weights[2] + weights[3], 0)
    logits = h @ weights[4] + weights[5]
    np.testing.assert_allclose(m(x).detach().numpy(), logits, rtol=1e-4, atol=1e-5)
    m2 = from_keras(create_model("keras-shallow"), weights).eval()
    assert torch.equal(m2(x), m(x))


def test_unknown_model_lists_valid():
    with pytest.raises(ConfigError, match="unknown model 'resnet9000' \\(did you mean 'resnet20'\\?\\); valid models: "
                                          "keras-deep, "):
        create_model("resnet9000")


def test_summary_table():
    rows, total, trainable = summarize(create_model("keras-deep"), (3, 32, 32))
    assert total == trainable == 2_168_362
    assert rows[0] == ("conv2d_1 (Conv2D)", "(None, 32, 32, 32)", 896)
    assert ("flatten_1 (Flatten)", "(None, 4096)", 0) in rows
    # Keras' names and the notebook's softmax layer last, as its model.summary() prints them
    assert ("max_pooling2d_2 (MaxPooling2D)", "(None, 8, 8, 64)", 0) in rows
    assert rows[-2:] == [("dense_2 (Dense)", "(None, 10)", 5130), ("activation_6 (Activation)", "(None, 10)", 0)]
    assert len(rows) == 18
    text = format_summary(create_model("keras-shallow"), (3, 32, 32), "keras-shallow")
    assert "Total params: 4,200,842" in text and "dense_1 (Dense)" in text
    assert "activation_3 (Activation)" in text and "activation_3 is the softmax" in text


@pytest.mark.parametrize("name", list_models())
def test_each_model_takes_its_smallest_size_and_refuses_smaller(name):
    """The declared smallest image size runs forward; one pixel less, or no classes, is refused
    up front with the value named, instead of failing inside a layer."""
    low = min_image_size(name)
    m = create_model(name, num_classes=2, in_chans=1, img_size=(low, low + 1))
    assert m(torch.randn(2, 1, low, low + 1)).shape == (2, 2)
    with pytest.raises(ConfigError, match=rf"cannot take images of size \({low - 1}, {low}\).*at least {low}"):
        create_model(name, img_size=(low - 1, low))
    with pytest.raises(ConfigError, match="num_classes=0 is not valid"):
        create_model(name, num_classes=0)


def _speednet_params(widths, depth):
    """Parameters of a speednet counted by hand: the whitening conv (24 filters of 3x2x2, bias),
    per group ``depth`` 3x3 convolutions and batch norms (scale and shift), the head."""
    n, cin = 24 * 3 * 4 + 24, 24
    for cout in widths:
        n += cout * cin * 9 + (depth - 1) * cout * cout * 9 + depth * 2 * cout
        cin = cout
    return n + widths[-1] * 10


def test_speed_nets_have_airbenchs_parameter_counts():
    """speednet is airbench94's net, speednet-wide airbench96's (three convolutions per group,
    residual), speednet-wide2 and speednet-proxy airbench96_faster's two: the same parameter
    counts, batch-norm scales included."""
    names = ("speednet", "speednet-wide", "speednet-wide2", "speednet-proxy")
    counts = {n: sum(p.numel() for p in create_model(n).parameters()) for n in names}
    assert counts == {"speednet": 1_972_792, "speednet-wide": 12_721_208, "speednet-wide2": 9_918_776,
                      "speednet-proxy": 146_744}
    assert counts["speednet-wide2"] == _speednet_params((128, 384, 512), 3)
    assert counts["speednet-proxy"] == _speednet_params((32, 64, 64), 2)
    torch.manual_seed(0)
    x = torch.randn(2, 24, 16, 16)
    for name in ("speednet-wide", "speednet-wide2"):
        group = create_model(name).layers[1].eval()
        with torch.no_grad():
            x0 = group.act(group.norm1(group.pool(group.conv1(x))))
            y = group.norm3(group.conv3(group.act(group.norm2(group.conv2(x0)))))
            # speednet-wide2 (airbench96's June 2024 form) applies the last GELU after the sum
            expect = group.act(x0 + y) if name == "speednet-wide2" else x0 + group.act(y)
            assert torch.allclose(group(x), expect)
    momenta = {n: {m.momentum for m in create_model(n).modules() if isinstance(m, torch.nn.BatchNorm2d)}
               for n in names}
    assert momenta == {"speednet": {0.4}, "speednet-wide": {0.4}, "speednet-wide2": {0.1}, "speednet-proxy": {0.1}}


def test_global_max_pool_is_the_adaptive_max_pool_forward_and_backward():
    """The speed nets' final pool gives AdaptiveMaxPool2d(1)'s values and gradients, on maps of
    any size and in channels-last memory."""
    from cifarlab.models.speed import GlobalMaxPool

    for shape in [(4, 6, 3, 3), (2, 5, 4, 7)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(shape[0], shape[1], 1, 1)
        a, b = GlobalMaxPool()(x), torch.nn.AdaptiveMaxPool2d(1)(x2)
        (a * g).sum().backward()
        (b * g).sum().backward()
        assert a.shape == b.shape and torch.equal(a, b) and torch.equal(x.grad, x2.grad)


def test_cifar_resnets_have_the_papers_layers_and_weightless_shortcuts():
    """ResNet-20 and -56 as He et al. (2016) built them for CIFAR-10: 6n + 2 weighted layers,
    0.27 M and 0.85 M parameters, option-A shortcuts (identity; every second pixel and zero
    channels where a stage halves the size), so a block at its start adds no weights."""
    def by_hand(n):
        total, c_in = 3 * 16 * 9 + 2 * 16, 16
        for c_out in (16, 32, 64):
            for _ in range(n):
                total += c_in * c_out * 9 + c_out * c_out * 9 + 2 * 2 * c_out
                c_in = c_out
        return total + 64 * 10 + 10

    for name, n in (("resnet20", 3), ("resnet56", 9)):
        m = create_model(name)
        weighted = [x for x in m.modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))]
        assert len(weighted) == 6 * n + 2 and sum(p.numel() for p in m.parameters()) == by_hand(n)
    assert by_hand(3) == 269_722 and by_hand(9) == 853_018
    block = create_model("resnet20").blocks[3]  # the first of the 32-filter stage
    assert block.stride == 2 and block.pad == 16
    with torch.no_grad():  # with the residual branch zeroed, the block passes its shortcut (through a ReLU)
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(2, 16, 8, 8)
        y = block.eval()(x)
    assert y.shape == (2, 32, 4, 4) and torch.equal(y[:, :16], x[:, :, ::2, ::2].relu())
    assert not y[:, 16:].any()


def test_has_whitening_names_the_models_with_a_whitening_layer():
    assert [n for n in list_models() if has_whitening(n)] == ["speednet", "speednet-proxy", "speednet-wide",
                                                              "speednet-wide2"]
    assert all(hasattr(create_model(n), "whiten") == has_whitening(n) for n in list_models())
