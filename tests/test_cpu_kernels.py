"""cifarlab's CPU kernels (convolution weight gradient, dropout, ReLU with max pooling): against
PyTorch, inside training, and their fallback where they cannot be built."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import count_calls, needs_kernel

from cifarlab import cpu_kernels
from cifarlab.models import create_model


@pytest.fixture
def fresh_load():
    """Forget the built kernel before and after, so a test sees its own build (and leaves none)."""
    cpu_kernels.load.cache_clear()
    yield cpu_kernels.load
    cpu_kernels.load.cache_clear()


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _reference(x, gy):
    w = torch.empty(gy.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    _, gw, gb = torch.ops.aten.convolution_backward(gy.double(), x.double(), w, [gy.shape[1]], [1, 1], [1, 1],
                                                    [1, 1], False, [0, 0], 1, [False, True, True])
    return gw, gb


@needs_kernel
def test_the_kernel_builds_here_and_is_cached(fresh_load, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path))
    assert fresh_load() is not None, cpu_kernels.unavailable_reason()
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left beside it
    before = built[0].stat()
    cpu_kernels.load.cache_clear()
    assert fresh_load() is not None
    after = built[0].stat()
    # reused, not rebuilt (a build renames a new file into place), and its use recorded for cifarlab cache
    assert after.st_ino == before.st_ino and after.st_mtime_ns >= before.st_mtime_ns


@needs_kernel
@pytest.mark.parametrize("n,ci,co,h,w", [
    (4, 3, 32, 32, 32),   # the notebook's first layer: broadcast side has 3 channels
    (3, 32, 32, 9, 9),
    (2, 32, 64, 16, 16),
    (2, 64, 64, 8, 8),
    (1, 16, 5, 1, 1),     # a 1x1 image: only the centre tap sees data
    (5, 48, 7, 7, 3),     # odd sizes, output channels not a multiple of anything
    (1, 7, 16, 4, 13),
])
def test_weight_and_bias_gradients_match_pytorch(n, ci, co, h, w):
    g = torch.Generator().manual_seed(n * 1000 + ci + co + h)
    x = _cl(torch.randn(n, ci, h, w, generator=g))
    gy = _cl(torch.randn(n, co, h, w, generator=g))
    gw, gb = cpu_kernels.conv3x3_weight_grad(x, gy, bias=True)
    want_w, want_b = _reference(x, gy)
    assert gw.shape == (co, ci, 3, 3)
    # float32 sums of up to 4,096 products of unit normals, in another order than PyTorch's
    torch.testing.assert_close(gw.double(), want_w, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb.double(), want_b, rtol=1e-4, atol=1e-3)
    # NCHW inputs are accepted too (copied to the kernel's layout)
    gw2, none = cpu_kernels.conv3x3_weight_grad(x.contiguous(), gy.contiguous())
    assert none is None
    torch.testing.assert_close(gw2, gw)


@needs_kernel
def test_channels_that_the_kernel_does_not_take_are_an_error_naming_them():
    x, gy = _cl(torch.randn(1, 3, 4, 4)), _cl(torch.randn(1, 5, 4, 4))
    assert not cpu_kernels.supports(3, 5)
    with pytest.raises(ValueError, match="channels 3 -> 5"):
        cpu_kernels.conv3x3_weight_grad(x, gy)


def _node_names(t: torch.Tensor) -> list[str]:
    """Names of every node in ``t``'s autograd graph."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(f.name())
        todo += [g for g, _ in f.next_functions]
    return names


def _grads(model: nn.Module, x, y, use: bool, bf16: bool = False):
    """The model's output and weight gradients, with the kernels or without (``use``), under bf16
    autocast when ``bf16``."""
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, cpu_kernels.kernel_mode(use, conv=use):
        out = (cpu_kernels.fuse(model) if use else model)(x)
    F.cross_entropy(out.float(), y).backward()
    return out, [p.grad for p in model.parameters()]


@needs_kernel
@pytest.mark.parametrize("name,n_conv_relu", [("keras-deep", 2), ("keras-shallow", 0)])
def test_models_get_the_same_gradients_with_the_kernel(name, n_conv_relu, monkeypatch):
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last).eval()  # eval: no dropout draws
    x, y = _cl(torch.rand(6, 3, 32, 32)), torch.randint(0, 10, (6,))
    out_a, ga = _grads(model, x, y, use=False)
    calls = count_calls(monkeypatch, cpu_kernels, "conv3x3_weight_grad")
    out_b, gb = _grads(model, x, y, use=True)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    names = _node_names(out_b)
    # every conv's weight gradient went through the kernel, those before a lone ReLU joined to it
    assert calls["conv3x3_weight_grad"] == n_convs and names.count("_ConvReLUBackward") == n_conv_relu
    assert names.count("_Conv3x3Backward") == n_convs - n_conv_relu
    n_pools = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert names.count("_ReluMaxPoolBackward") == n_pools  # and every ReLU-pool pair
    assert names.count("ReluBackward0") == 1  # the Dense layer's: every other ReLU went into a kernel
    assert not {"_Conv3x3Backward", "_ConvReLUBackward"} & set(_node_names(out_a))
    torch.testing.assert_close(out_a, out_b)
    for a, b, (pname, p) in zip(ga, gb, model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=pname)
        assert b.stride() == p.stride(), pname  # gradients keep the parameters' memory layout


def _uses_kernel(conv: nn.Module, x: torch.Tensor) -> bool:
    with cpu_kernels.kernel_mode(conv=True):
        out = conv(x)
    return out.grad_fn is not None and "_Conv3x3" in out.grad_fn.name()


@needs_kernel
def test_only_eligible_convolutions_are_routed_to_the_kernel():
    x = _cl(torch.rand(2, 16, 8, 8))
    assert _uses_kernel(nn.Conv2d(16, 8, 3, padding=1), x)
    assert _uses_kernel(nn.Conv2d(16, 8, 3, padding="same"), x)
    assert not _uses_kernel(nn.Conv2d(16, 8, 3, padding=1, stride=2), x)
    assert not _uses_kernel(nn.Conv2d(16, 8, 5, padding=2), x)
    assert not _uses_kernel(nn.Conv2d(16, 8, 3, padding=0), x)
    assert not _uses_kernel(nn.Conv2d(16, 16, 3, padding=1, groups=2), x)
    assert not _uses_kernel(nn.Conv2d(3, 5, 3, padding=1), _cl(torch.rand(2, 3, 8, 8)))  # 3 -> 5: unsupported
    assert not _uses_kernel(nn.Conv2d(16, 8, 3, padding=1), x.contiguous())  # NCHW memory
    assert not _uses_kernel(nn.Conv2d(16, 8, 3, padding=1).double(), x.double())
    frozen = nn.Conv2d(16, 8, 3, padding=1).requires_grad_(False)
    assert not _uses_kernel(frozen, x)
    with torch.no_grad():
        assert not _uses_kernel(nn.Conv2d(16, 8, 3, padding=1), x)
    w = torch.rand(8, 16, 3, 3, requires_grad=True)
    with cpu_kernels.kernel_mode(conv=True):  # the functional form, with and without keywords
        assert "_Conv3x3" in F.conv2d(x, w, padding=1).grad_fn.name()
        assert "_Conv3x3" in F.conv2d(x, w, None, 1, 1).grad_fn.name()
        assert "_Conv3x3" not in F.conv2d(x, w).grad_fn.name()  # padding 0


def test_the_conv_kernel_is_chosen_only_where_the_cpu_lacks_avx512():
    """oneDNN's AVX-512 weight gradient beat the kernel (and its AVX2 one lost to it), so the
    choice follows the instruction sets oneDNN's AVX-512 kernels need, all four of them."""
    avx2 = "fpu sse4_2 avx avx2 fma f16c".split()
    assert cpu_kernels.conv_kernel_pays_off(avx2)
    assert not cpu_kernels.conv_kernel_pays_off(avx2 + "avx512f avx512dq avx512cd avx512bw avx512vl".split())
    assert cpu_kernels.conv_kernel_pays_off(avx2 + ["avx512f", "avx512cd"])  # AVX-512 without BW/VL/DQ
    assert isinstance(cpu_kernels.conv_kernel_pays_off(), bool)  # this machine's own flags


@needs_kernel
@pytest.mark.parametrize("pays_off", [True, False])
def test_by_default_the_mode_routes_convolutions_where_the_kernel_pays_off(monkeypatch, pays_off):
    monkeypatch.setattr(cpu_kernels, "conv_kernel_pays_off", lambda flags=None: pays_off)
    conv, drop, x = nn.Conv2d(16, 8, 3, padding=1), nn.Dropout(0.25), _cl(torch.rand(2, 16, 8, 8))
    with cpu_kernels.kernel_mode():
        out = drop(conv(x))
    names = _node_names(out)
    assert ("_Conv3x3Backward" in names) is pays_off
    assert "_DropoutBackward" in names  # dropout takes the kernel either way
    with cpu_kernels.kernel_mode(conv=False):
        assert "_Conv3x3Backward" not in _node_names(conv(x))


@needs_kernel
def test_input_gradient_and_bias_free_convolutions():
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    x = _cl(torch.rand(2, 16, 6, 6)).requires_grad_()
    ref = conv(x).square().sum()
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, conv.weight])
    with cpu_kernels.kernel_mode(conv=True):
        got = conv(x).square().sum()
    gx, gw = torch.autograd.grad(got, [x, conv.weight])
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_training_falls_back_with_a_reason(fresh_load, monkeypatch, tmp_path):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert fresh_load() is None
    reason = cpu_kernels.unavailable_reason()
    assert reason and ("could not build" in reason or "needs an x86-64" in reason)
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-built left
    conv = nn.Conv2d(16, 8, 3, padding=1)
    with cpu_kernels.kernel_mode(conv=True):  # a no-op now
        out = conv(_cl(torch.rand(1, 16, 4, 4)))
    assert "_Conv3x3" not in out.grad_fn.name()
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_kernels.conv3x3_weight_grad(_cl(torch.rand(1, 16, 4, 4)), _cl(torch.rand(1, 8, 4, 4)))


def test_a_compiler_error_is_reported_not_raised(fresh_load, monkeypatch, tmp_path):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: error: nothing works' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    assert fresh_load() is None
    if "could not build" in (cpu_kernels.unavailable_reason() or ""):
        assert "nothing works" in cpu_kernels.unavailable_reason()
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_the_environment_switch_turns_it_off(fresh_load, monkeypatch):
    monkeypatch.setenv("CIFARLAB_NO_CPU_KERNELS", "1")
    assert fresh_load() is None
    assert "CIFARLAB_NO_CPU_KERNELS" in cpu_kernels.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_dropout_keeps_each_element_with_probability_1_minus_p_independently(p):
    torch.manual_seed(0)
    x = torch.rand(400_000) + 1.0  # never zero, so a zero output means dropped
    out, noise = cpu_kernels.dropout(x, p)
    kept = noise != 0
    assert torch.equal(out, x * noise)
    torch.testing.assert_close(noise[kept], torch.full_like(noise[kept], 1 / (1 - p)))
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sd
    both = (kept[:-1] & kept[1:]).double().mean().item()  # neighbours: no correlation
    assert abs(both - (1 - p) ** 2) < 5 * sd
    apart = (kept[:-1024] & kept[1024:]).double().mean().item()
    assert abs(apart - (1 - p) ** 2) < 5 * sd


@needs_kernel
def test_dropout_repeats_under_manual_seed_on_any_thread_count():
    x = _cl(torch.rand(64, 32, 16, 16))
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(3)
        torch.set_num_threads(1)
        a, _ = cpu_kernels.dropout(x, 0.25)
        torch.manual_seed(3)
        torch.set_num_threads(2)
        b, _ = cpu_kernels.dropout(x, 0.25)
        c, _ = cpu_kernels.dropout(x, 0.25)  # the next draw differs
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert b.stride() == x.stride()  # keeps the channels-last layout


@needs_kernel
def test_dropout_rejects_what_it_does_not_take_naming_the_value():
    with pytest.raises(ValueError, match="p=1.0"):
        cpu_kernels.dropout(torch.rand(10), 1.0)
    with pytest.raises(ValueError, match="torch.float64"):
        cpu_kernels.dropout(torch.rand(10, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="strides"):
        cpu_kernels.dropout(torch.rand(10, 10)[:, ::2], 0.5)


@needs_kernel
def test_the_mode_routes_training_dropout_only():
    drop = nn.Dropout(0.25)
    x = torch.rand(8, 100, requires_grad=True)
    with cpu_kernels.kernel_mode():
        out = drop(x)
        assert out.grad_fn.name() == "_DropoutBackward"
        (g,) = torch.autograd.grad(out.sum() * 2, x)
        kept = out != 0
        torch.testing.assert_close(g, kept.float() * 2 / 0.75)  # gradient flows through kept elements only
        assert "_Dropout" not in str(nn.Dropout(0.25, inplace=True)(x.detach().clone()).grad_fn)
        assert "_Dropout" not in str(F.dropout(x, 0.0).grad_fn)
        drop.eval()
        assert torch.equal(drop(x), x)


@needs_kernel
def test_a_training_step_with_the_kernels_learns_like_without(monkeypatch):
    """Same model, same batches: the loss falls with the kernels as without them (the dropout
    masks differ, so the trajectories match in trend, not in value). On 16x16 images, which take
    the same kernels as 32x32 ones (the training tests use those) in a quarter of the time."""
    from cifarlab.config import OptimConfig
    from cifarlab.optim import build_optimizer
    from cifarlab.train import train_step

    torch.manual_seed(0)
    y = torch.arange(64) % 10
    patterns = torch.rand(10, 3, 16, 16)
    x = _cl((patterns[y] + 0.3 * torch.rand(64, 3, 16, 16)) / 1.3)  # one noisy pattern per class
    names = ("relu_max_pool2", "dropout")  # the step's own kernels (the optimizer's is tested apart)
    for use in (False, True):
        calls = count_calls(monkeypatch, cpu_kernels, *names)
        torch.manual_seed(1)
        model = create_model("keras-deep", img_size=16).to(memory_format=torch.channels_last).train()
        opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-3))
        losses = [float(train_step(model, opt, x, y, cpu_kernels=use)[0]) / 64 for _ in range(40)]
        # both fall from about 2.3 to 0.19 or less here, on 1 or 2 threads and seeds 1 to 3
        assert sum(losses[-5:]) / 5 < 0.35 * losses[0], (use, losses)
        assert all(calls[n] > 0 for n in names) if use else not any(calls.values()), (use, calls)
        monkeypatch.undo()


def _relu_pool_reference(x: torch.Tensor, g: torch.Tensor, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    out = F.max_pool2d(torch.relu(xr) if relu else xr, 2)
    return out.detach(), torch.autograd.grad(out, xr, g)[0]


@needs_kernel
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w", [(3, 32, 8, 8), (2, 64, 4, 6), (2, 17, 5, 7), (1, 3, 2, 3), (2, 8, 9, 4),
                                     (2, 64, 31, 31)])
def test_relu_max_pool_matches_pytorch_exactly(n, c, h, w, dtype, relu):
    """Values on a coarse grid, so that windows hold ties and windows with no positive value:
    the first of equal maxima wins, as in PyTorch's pool, and a window ReLU zeroes passes no
    gradient (without the ReLU, it passes the gradient of its first maximum). Channel counts
    off the kernel's 8-wide vectors and odd sizes (the pool's floor; 31x31 is the speed nets'
    first pool). In bfloat16 too: max and ReLU only select, so there is no rounding to differ in."""
    torch.manual_seed(n * c + h * w)
    x = _cl((torch.randint(-4, 5, (n, c, h, w)) / 4).to(dtype))
    g = torch.randn(n, c, h // 2, w // 2).to(dtype)
    want, want_gx = _relu_pool_reference(x, g, relu)
    out, idx = cpu_kernels.relu_max_pool2(x, relu=relu)
    gx = cpu_kernels.relu_max_pool2_grad(g, idx, x.shape)
    assert out.dtype == gx.dtype == dtype
    assert torch.equal(out, want) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gx, want_gx) and gx.is_contiguous(memory_format=torch.channels_last)
    assert idx.dtype == torch.uint8  # a byte per output element, where PyTorch keeps an int64


@needs_kernel
def test_bfloat16_relu_max_pool_keeps_every_bit_of_the_winner():
    """Random bfloat16 values, subnormals, infinities and negative zero among them: the kernel
    widens them to float32 to compare and narrows the winner back, which must give back its bits."""
    torch.manual_seed(3)
    bits = torch.randint(0, 2**16, (2, 24, 6, 6), dtype=torch.int32)
    bits = torch.where(((bits >> 7) & 0xFF) == 0xFF, bits & 0x807F, bits)  # no NaN: it would not compare equal
    x = _cl(bits.to(torch.int16).view(torch.bfloat16))
    x[0, 0, 0, 0], x[0, 1, 0, 0], x[1, 2, 2, 2] = float("inf"), float("-inf"), -0.0
    g = torch.randn(2, 24, 3, 3).bfloat16()
    want, want_gx = _relu_pool_reference(x, g)
    out, idx = cpu_kernels.relu_max_pool2(x)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert torch.equal(cpu_kernels.relu_max_pool2_grad(g, idx, x.shape), want_gx)


@needs_kernel
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_max_pool_propagates_nan_as_pytorch_does(dtype, relu):
    x = _cl(torch.randn(2, 16, 4, 4)).to(dtype)
    x[0, 3, 0, 1] = float("nan")
    x[1, 5, 2, 2] = x[1, 5, 3, 3] = float("nan")
    x[1, 7, 0:2, 0:2] = torch.tensor([[-1.0, float("nan")], [-2.0, -3.0]])
    g = torch.randn(2, 16, 2, 2).to(dtype)
    want, want_gx = _relu_pool_reference(x, g, relu)
    out, idx = cpu_kernels.relu_max_pool2(x, relu=relu)
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(cpu_kernels.relu_max_pool2_grad(g, idx, x.shape), want_gx, rtol=0, atol=0)


@needs_kernel
def test_relu_max_pool_rejects_what_it_does_not_take_naming_the_value():
    with pytest.raises(ValueError, match="strides"):
        cpu_kernels.relu_max_pool2(torch.rand(2, 16, 4, 4))  # NCHW memory
    with pytest.raises(ValueError, match="torch.float64"):
        cpu_kernels.relu_max_pool2(_cl(torch.rand(2, 16, 4, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"\(2, 16, 1, 4\)"):
        cpu_kernels.relu_max_pool2(_cl(torch.rand(2, 16, 1, 4)))
    _, idx = cpu_kernels.relu_max_pool2(_cl(torch.rand(2, 16, 4, 4)))
    with pytest.raises(ValueError, match=r"\(2, 16, 3, 2\)"):
        cpu_kernels.relu_max_pool2_grad(torch.rand(2, 16, 3, 2), idx, (2, 16, 4, 4))


def _pooled_names(f, x, **mode) -> list[str]:
    with cpu_kernels.kernel_mode(**mode):
        return _node_names(f(x))


class _Net(nn.Module):
    """A forward function as a module, for :func:`cpu_kernels.fuse` to trace."""

    def __init__(self, f, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.f, self.conv = f, conv

    def forward(self, x):
        return self.f(self, x)


def _fused_names(f, x, conv: nn.Module | None = None, **mode) -> tuple[list[str], str]:
    """The autograd node names of ``f`` (a function of the net and the input, or a module)
    fused and run under the kernels' mode, and the fused forward's code; checks that the result
    and the input's gradient are the unfused ones bit for bit."""
    net = f if isinstance(f, nn.Module) else _Net(f, conv)
    fused = cpu_kernels.fuse(net)
    with cpu_kernels.kernel_mode(conv=False, **mode):
        out = fused(x)
    want = net(x)
    assert torch.equal(out, want)
    (g,), (want_g,) = torch.autograd.grad(out.sum(), x), torch.autograd.grad(want.sum(), x)
    assert torch.equal(g, want_g)
    return _node_names(out), fused.code if fused is not net else ""


@needs_kernel
def test_fuse_joins_a_relu_only_with_the_2x2_pool_that_alone_uses_it():
    x = _cl(torch.randn(2, 16, 8, 8)).requires_grad_()
    fused = "_ReluMaxPoolBackward"
    assert fused in _fused_names(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), x)[0]
    assert fused in _fused_names(lambda m, t: F.max_pool2d(F.relu(t), (2, 2), stride=2), x)[0]
    assert fused in _fused_names(lambda m, t: F.max_pool2d(t.relu(), 2), x)[0]
    assert fused in _fused_names(lambda m, t: F.max_pool2d(torch.relu(t), kernel_size=2), x)[0]
    names, code = _fused_names(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, 2)), x, pool=False)
    assert "relu_max_pool2d" in code and fused not in names  # the mode's pool=False: PyTorch's two ops
    for f in (lambda m, t: F.max_pool2d(F.relu(t), 3), lambda m, t: F.max_pool2d(F.relu(t), 2, stride=1),
              lambda m, t: F.max_pool2d(F.relu(t), 2, ceil_mode=True),
              lambda m, t: F.max_pool2d(F.relu(t), 2, padding=1),
              lambda m, t: F.max_pool2d(torch.relu(t) + 1, 2),  # not the ReLU's output
              lambda m, t: F.max_pool2d(F.relu(t * 1, inplace=True), 2),
              nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
              lambda m, t: (lambda r: F.max_pool2d(r, 2).sum() + r.sum())(F.relu(t))):  # a second use
        names, code = _fused_names(f, x)
        assert fused not in names and "relu_max_pool2d(" not in code
    # of two ReLUs, the one that only a pool uses
    names, code = _fused_names(lambda m, t: F.max_pool2d(F.relu(t), 2) + F.relu(t).mean(), x)
    assert code.count("relu_max_pool2d(") == names.count(fused) == 1 and "ReluBackward0" in names
    # where the kernel does not take the tensor, the fused call is PyTorch's two operations
    assert fused not in _fused_names(lambda m, t: F.max_pool2d(F.relu(t.contiguous()), 2), x)[0]  # NCHW memory
    assert fused not in _fused_names(lambda m, t: F.max_pool2d(F.relu(t.double()), 2), x)[0]
    # an eligible pool of something else still takes the plain pool kernel
    assert "_MaxPoolBackward" in _fused_names(lambda m, t: F.max_pool2d(torch.relu(t) + 1, 2), x)[0]


@needs_kernel
def test_fuse_joins_a_relu_to_the_convolution_whose_only_use_it_is():
    x = _cl(torch.randn(2, 4, 9, 8)).requires_grad_()
    joined = "_ConvReLUBackward"
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                 nn.Conv2d(4, 5, (3, 1), bias=False),
                 nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)):
        names, code = _fused_names(lambda m, t: F.relu(m.conv(t)), x, conv)
        assert joined in names and "conv2d_relu(" in code and "ReluBackward0" not in names, conv
    conv = nn.Conv2d(4, 8, 3, padding=1)
    for f in (lambda m, t: F.relu(m.conv(t)) + m.conv(t).mean(),  # the second call's output is not fused
              lambda m, t: (lambda c: F.relu(c) + c)(m.conv(t))):  # the output has a second use
        names, code = _fused_names(f, x, conv)
        assert code.count("conv2d_relu(") == names.count(joined) == (1 if "mean" in code else 0)
    for other in (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 8, 3, padding="same")):
        names, code = _fused_names(lambda m, t: F.relu(m.conv(t)), x, other)
        assert joined not in names, other  # reflect: not rewritten; "same": rewritten, run as two operations
    # where the tensors are not the kernel's, the fused call is PyTorch's two operations
    assert joined not in _fused_names(lambda m, t: F.relu(m.conv(t.contiguous())), x, conv)[0]  # NCHW memory
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert joined not in _fused_names(lambda m, t: F.relu(m.conv(t)), x, conv)[0]
    names, code = _fused_names(lambda m, t: F.max_pool2d(F.relu(m.conv(t)), 2), x, conv)
    assert "relu_max_pool2d(" in code and "conv2d_relu(" not in code  # before a pool, the ReLU joins the pool
    seen = []
    hook = conv.register_forward_hook(lambda *a: seen.append(1))
    names, code = _fused_names(lambda m, t: F.relu(m.conv(t)), x, conv)
    assert joined not in names and len(seen) == 2  # a hooked convolution is left as it is: its hook still runs
    hook.remove()


@needs_kernel
def test_the_fused_model_is_the_model_and_only_where_something_joins():
    model = create_model("keras-deep")
    fused = cpu_kernels.fuse(model)
    assert fused is not model and all(a is b for a, b in zip(model.parameters(), fused.parameters()))
    assert list(fused.state_dict()) == list(model.state_dict())
    x = _cl(torch.rand(3, 3, 32, 32))
    model.eval()  # the model's own switch reaches the fused forward's dropout layers
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    model.to(memory_format=torch.channels_last)
    with cpu_kernels.kernel_mode(conv=False):  # oneDNN's gradients, as on CPUs with AVX-512
        out = fused(x)
    assert _node_names(out).count("_ConvReLUBackward") == 2
    out.sum().backward()
    for name, p in model.named_parameters():  # as the RMSprop kernel needs them (rmsprop_takes)
        assert p.grad.stride() == p.stride(), name
    for name in ("resnet20", "speednet"):  # nothing to join; fx cannot trace the speed nets
        other = create_model(name, img_size=16)
        assert cpu_kernels.fuse(other) is other, name


@needs_kernel
@pytest.mark.parametrize("name", ["keras-deep", "keras-shallow"])
@pytest.mark.parametrize("chans,size", [(1, 28), (4, 20), (3, (24, 40)), (1, 5)])
def test_fused_notebook_models_give_pytorchs_results_on_other_images(name, chans, size):
    """Grey, four-channel, non-square and odd-sized images (pools that drop a row): outputs and
    every weight gradient as PyTorch's two operations give them, bit for bit (oneDNN's weight
    gradients, as on CPUs with AVX-512)."""
    torch.manual_seed(0)
    model = create_model(name, in_chans=chans, img_size=size, num_classes=7).to(memory_format=torch.channels_last)
    model.eval()  # no dropout draws
    h, w = (size, size) if isinstance(size, int) else size
    x = _cl(torch.rand(5, chans, h, w))
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with cpu_kernels.kernel_mode(fused, conv=False):
            out = (cpu_kernels.fuse(model) if fused else model)(x)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()], _node_names(out)))
    (want, want_g, _), (got, got_g, names) = results
    assert "_ReluMaxPoolBackward" in names and torch.equal(got, want)
    for a, b in zip(want_g, got_g):
        assert torch.equal(a, b)


def test_the_fused_calls_are_the_two_operations_outside_the_mode():
    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    assert torch.equal(cpu_kernels.conv2d_relu(x, w, b, 1, 1), F.relu(F.conv2d(x, w, b, 1, 1)))
    assert torch.equal(cpu_kernels.relu_max_pool2d(x), F.max_pool2d(F.relu(x), 2))


@needs_kernel
def test_the_mode_sends_only_2x2_pools_of_tensors_the_kernel_takes_to_the_plain_pool():
    x = _cl(torch.randn(2, 16, 9, 9)).requires_grad_()
    plain = "_MaxPoolBackward"
    assert plain in _pooled_names(lambda t: nn.MaxPool2d(2)(t * 2), x)
    assert plain in _pooled_names(lambda t: F.max_pool2d(t * 2, kernel_size=(2, 2), stride=[2, 2]), x)
    assert plain in _pooled_names(lambda t: F.max_pool2d(t.bfloat16(), 2), x)
    assert plain not in _pooled_names(lambda t: nn.MaxPool2d(2)(t * 2), x, pool=False)
    for f in (lambda t: F.max_pool2d(t, 3), lambda t: F.max_pool2d(t, 2, stride=1),
              lambda t: F.max_pool2d(t, 2, ceil_mode=True), lambda t: F.max_pool2d(t, 2, padding=1),
              lambda t: F.max_pool2d(t.contiguous(), 2), lambda t: F.max_pool2d(t.double(), 2)):
        assert plain not in _pooled_names(f, x)
    with cpu_kernels.kernel_mode():  # the result and return_indices stay PyTorch's where it is not taken
        out, ind = F.max_pool2d(x, 2, return_indices=True)
    assert ind.dtype == torch.int64 and torch.equal(out, F.max_pool2d(x, 2))


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", ["speednet", "speednet-wide2"])
def test_speed_nets_pool_through_the_kernel_with_pytorchs_results(name, bf16):
    """The speed recipes' nets pool a convolution's output (conv, pool, batch norm, GELU): each
    of their 2x2 pools takes the kernel without a ReLU, in float32 and under bf16 autocast, and
    outputs and weight gradients are PyTorch's bit for bit (the convolution kernel kept off, so
    that the pools are the only difference; training mode, whose batch norms use batch statistics)."""
    torch.manual_seed(0)
    model = create_model(name, img_size=16).to(memory_format=torch.channels_last).train()
    x, y = _cl(torch.rand(8, 3, 16, 16)), torch.randint(0, 10, (8,))
    outs, grads, names = [], [], []
    for use in (False, True):
        model.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast, cpu_kernels.kernel_mode(use, conv=False):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])  # not the frozen whitening
        names.append(_node_names(out))
    n_pools = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert n_pools >= 3 and names[1].count("_MaxPoolBackward") == n_pools and "_MaxPoolBackward" not in names[0]
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _rmsprop_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(64, 300, generator=g), _cl(torch.randn(32, 16, 3, 3, generator=g)), torch.randn(7, generator=g)]


def _rmsprop_steps(cpu_kernel: bool, weight_decay: float, steps: int = 4):
    from cifarlab.optim import KerasRMSprop

    params = [p.clone().requires_grad_() for p in _rmsprop_params()]
    opt = KerasRMSprop(params, lr=1e-2, weight_decay=weight_decay, cpu_kernel=cpu_kernel)
    g, grads = torch.Generator().manual_seed(4), []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).contiguous(memory_format=_layout(p))
        grads = [p.grad.clone() for p in params]
        opt.step()
    return params, [opt.state[p]["velocity"] for p in params], grads, [p.grad for p in params]


def _layout(t):
    return torch.channels_last if t.dim() == 4 else torch.contiguous_format


@needs_kernel
@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_rmsprop_kernel_updates_as_keras_defines_it(monkeypatch, weight_decay):
    """The kernel against the formula in float64, to float32 rounding; the velocities (no square
    root in them) also against the multi-tensor ops. The weights are compared with those only
    loosely: PyTorch's CPU square root is at times far from correctly rounded (see
    :func:`cifarlab.cpu_kernels.rmsprop_reference`). The gradients are left as they were."""
    calls = count_calls(monkeypatch, cpu_kernels, "keras_rmsprop_")
    want_p, want_v, _, _ = _rmsprop_steps(False, weight_decay)
    assert calls["keras_rmsprop_"] == 0
    got_p, got_v, grads_before, grads_after = _rmsprop_steps(True, weight_decay)
    assert calls["keras_rmsprop_"] == 4
    for a, b, va, vb in zip(got_p, want_p, got_v, want_v):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=0)
        assert a.stride() == b.stride() and va.stride() == vb.stride()
    assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_after))
    # the same four steps in float64, from the same start and the same gradients
    g = torch.Generator().manual_seed(4)
    want = [(p.double(), torch.zeros_like(p, dtype=torch.float64)) for p in _rmsprop_params()]
    for _ in range(4):
        want = [cpu_kernels.rmsprop_reference(w, torch.randn(w.shape, generator=g), v, 1e-2, 0.9, 1e-7, weight_decay)
                for w, v in want]
    for got, got_v, (w, v) in zip(got_p, got_v, want):
        torch.testing.assert_close(got.detach().double(), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_v.double(), v, rtol=1e-5, atol=1e-8)


@needs_kernel
def test_rmsprop_kernel_keeps_keras_documented_step():
    from cifarlab.optim import KerasRMSprop

    var = torch.tensor([10.0], requires_grad=True)
    opt = KerasRMSprop([var], lr=0.1, cpu_kernel=True)
    (var**2 / 2).sum().backward()
    v0 = var._version
    opt.step()
    assert var.item() == pytest.approx(9.683772, abs=1e-6)
    assert var._version > v0  # counted as an in-place change, as PyTorch's own ops count it


@needs_kernel
def test_rmsprop_takes_float32_cpu_tensors_only_and_names_what_it_refuses():
    from cifarlab.optim import KerasRMSprop

    p = torch.ones(5, dtype=torch.float64, requires_grad=True)  # not the kernel's: the usual ops update it
    opt = KerasRMSprop([p], lr=0.1, cpu_kernel=True)
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    assert torch.allclose(p, torch.full((5,), 1 - 0.1 / (0.1 + 1e-7) ** 0.5, dtype=torch.float64))
    w = _cl(torch.rand(4, 8, 3, 3))
    with pytest.raises(ValueError, match=r"strides \(72, 9, 3, 1\)"):
        cpu_kernels.keras_rmsprop_([w], [torch.rand(4, 8, 3, 3)], [torch.zeros_like(w)], 0.1, 0.9, 1e-7)


@needs_kernel
def test_the_kernels_load_when_first_used_without_grad(fresh_load):
    """The self-check takes gradients; a first use under no_grad or inference mode (a forward
    pass in evaluation) must still load the kernels, not fail the check."""
    x = _cl(torch.randn(2, 16, 4, 4))
    with torch.inference_mode():
        out, _ = cpu_kernels.relu_max_pool2(x)
    assert cpu_kernels.unavailable_reason() is None
    torch.testing.assert_close(out, F.max_pool2d(torch.relu(x), 2), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("n,c,h,w", [(2, 17, 5, 7), (3, 16, 4, 6), (1, 8, 3, 3)])
def test_relu_pool_and_rmsprop_kernels_write_only_their_outputs(n, c, h, w):
    """Each output lies inside a larger buffer filled with a sentinel: after the kernels run,
    every value around it is still the sentinel (no write past either end, odd sizes included)."""
    lib = cpu_kernels.load()
    pad = 64

    def framed(numel, dtype):
        buf = torch.full((numel + 2 * pad,), 77, dtype=dtype)
        return buf, buf[pad:pad + numel]

    x = _cl(torch.randn(n, c, h, w))
    ho, wo = h // 2, w // 2
    obuf, out_flat = framed(n * ho * wo * c, torch.float32)
    ibuf, idx_flat = framed(n * ho * wo * c, torch.uint8)
    lib.cl_relu_maxpool2(x.data_ptr(), out_flat.data_ptr(), idx_flat.data_ptr(), n, h, w, c, 3)
    gbuf, gx_flat = framed(n * h * w * c, torch.float32)
    grad = torch.randn(n * ho * wo * c)
    lib.cl_relu_maxpool2_bwd(grad.data_ptr(), idx_flat.data_ptr(), gx_flat.data_ptr(), n, h, w, c, 3)
    pbuf, p_flat = framed(4099, torch.float32)
    vbuf, v_flat = framed(4099, torch.float32)
    v_flat.zero_()
    cpu_kernels._rmsprop_into(lib, p_flat, torch.randn(4099), v_flat, 1e-2, 0.9, 1e-7, 0.01, threads=3)
    for buf in (obuf, ibuf, gbuf, pbuf, vbuf):
        assert bool((buf[:pad] == 77).all()) and bool((buf[-pad:] == 77).all())
    want, want_gx = _relu_pool_reference(x, grad.view(n, ho, wo, c).permute(0, 3, 1, 2))
    assert torch.equal(out_flat.view(n, ho, wo, c).permute(0, 3, 1, 2), want)
    assert torch.equal(gx_flat.view(n, h, w, c).permute(0, 3, 1, 2), want_gx)


@needs_kernel
def test_bfloat16_dropout_draws_the_float32_mask_and_rounds_as_pytorch():
    x = torch.randn(3, 40_001)
    torch.manual_seed(7)
    out, noise = cpu_kernels.dropout(x, 0.25)
    torch.manual_seed(7)
    out_b, noise_b = cpu_kernels.dropout(x.bfloat16(), 0.25)
    assert out_b.dtype == noise_b.dtype == torch.bfloat16
    assert torch.equal(noise_b != 0, noise != 0)  # the same elements kept
    scale = torch.tensor(1 / 0.75).bfloat16()  # PyTorch's bfloat16 dropout scales by this rounded value
    assert bool((noise_b[noise_b != 0] == scale).all())
    assert torch.equal(out_b, x.bfloat16() * noise_b)  # one rounding of the product, as PyTorch's multiply
    special = torch.tensor([float("nan"), float("inf"), -0.0, 3.0e38]).bfloat16()
    torch.manual_seed(0)
    got, n = cpu_kernels.dropout(special, 0.25)
    torch.testing.assert_close(got, special * n, equal_nan=True, rtol=0, atol=0)


@needs_kernel
def test_under_autocast_the_mode_keeps_convolutions_off_the_float32_kernel():
    """Under bf16 autocast a float32 input still gives a bfloat16 output and gradient, which the
    float32-only weight-gradient kernel must not see; dropout takes the bfloat16 kernel."""
    conv, x = nn.Conv2d(3, 32, 3, padding=1), _cl(torch.rand(2, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_kernels.kernel_mode(conv=True):
        y = conv(x)
        out = F.dropout(y, 0.25)
    assert y.dtype == out.dtype == torch.bfloat16
    names = _node_names(out)
    assert "_Conv3x3Backward" not in names and "_DropoutBackward" in names
    out.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    with cpu_kernels.kernel_mode(conv=True):  # and outside autocast the same call takes the kernel
        assert "_Conv3x3Backward" in _node_names(conv(x))


@needs_kernel
def test_under_autocast_relu_and_pool_take_the_bfloat16_kernel_with_pytorchs_gradients():
    """The keras-deep model under bf16 autocast, with and without the kernels: every ReLU-pool
    pair goes through the kernel in bfloat16, and outputs and weight gradients are PyTorch's
    (dropout off, eval mode; the convolutions are oneDNN's either way)."""
    torch.manual_seed(0)
    model = create_model("keras-deep").to(memory_format=torch.channels_last).eval()
    x, y = _cl(torch.rand(4, 3, 32, 32)), torch.randint(0, 10, (4,))
    out_a, ga = _grads(model, x, y, use=False, bf16=True)
    out_b, gb = _grads(model, x, y, use=True, bf16=True)
    names_a, names_b = _node_names(out_a), _node_names(out_b)
    assert names_b.count("_ReluMaxPoolBackward") == 2 and "_ReluMaxPoolBackward" not in names_a
    assert "_Conv3x3Backward" not in names_b  # conv=True is ignored under autocast
    assert torch.equal(out_a, out_b)
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)
