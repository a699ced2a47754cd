"""cifarlab's own CPU kernels for the training step and augmentation, and the switch that routes
training to them.

Five kernels in ``csrc/cpu_kernels.cpp``, for where PyTorch's CPU kernels leave speed behind on
small convolutional networks and small images:

- the weight and bias gradient of 3x3, stride-1, 'same' convolutions: on AVX2 CPUs without
  AVX-512, oneDNN computes it at about half the speed of its forward convolution; this kernel
  ran about 1.5 times faster than it on the notebook's layers (2-core AMD EPYC, batch 128,
  caches flushed as in training; ``benchmarks/conv_wgrad.py``). Where the CPU has AVX-512,
  oneDNN's own kernel is the faster one and training leaves the weight gradient to it
  (:func:`conv_kernel_pays_off`);
- inverted dropout in one pass with a counter-based random generator, where PyTorch's draws
  its mask with ``bernoulli_`` and then scales it and multiplies in two more passes;
- ReLU followed by 2x2 max pooling (:func:`relu_max_pool2`), one pass forward and one backward
  with a byte per output element, where PyTorch makes four passes over the full-size tensor
  and keeps int64 indices; and the same pool without the ReLU, for nets that pool a
  convolution's output (the speed recipes' groups), where PyTorch's pool, its backward and
  the zero fill it writes into took about a quarter of the `fast` recipe's bf16 step on an
  AMX Xeon;
- Keras' RMSprop update (:func:`keras_rmsprop_`, for :class:`cifarlab.optim.KerasRMSprop`), one
  pass per tensor where PyTorch's multi-tensor ops make five on the CPU;
- Keras' ``ImageDataGenerator`` transform (:func:`affine_warp`): a per-image affine map with
  order-1 interpolation and scipy's boundary modes, computed straight from the uint8 images,
  one image per task.

Beside them, :func:`fuse` rewrites a model's forward pass so that each ReLU goes into the
operation before or after it: a ReLU that only a 2x2 pool uses into the ReLU-pool kernel, and
the ReLU of a convolution's output into that convolution, which oneDNN then runs with the ReLU
applied as it writes (:func:`conv2d_relu`); either way one pass over a full-size activation
fewer, forward, with PyTorch's results bit for bit.

They are compiled on first use with the system's C++ compiler (about 2 s, then cached on disk)
and checked against PyTorch before they are trusted. Where there is no compiler, no AVX2/FMA,
or the check fails, :func:`load` returns None and training and augmentation use PyTorch's
kernels as before.
The kernels change speed, not meaning: gradients agree with PyTorch's to float32 rounding (the
sums run in another order; ReLU and pooling's exactly), RMSprop's update to float32 rounding
with a correctly rounded square root, dropout keeps each element with probability 1 - p,
scaled by 1 / (1 - p), as PyTorch's does, from a different stream of random numbers, and the
warp agrees with scipy's per-image transform more closely than PyTorch's float32
``grid_sample`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import (TorchFunctionMode, handle_torch_function, has_torch_function,
                             has_torch_function_unary)

from . import runtime
from .errors import CifarlabError
from .fsutil import atomic_path

_SOURCE = "cpu_kernels.cpp"
# -fno-math-errno: without it the compiler keeps a scalar loop around sqrt (which may set errno),
# and RMSprop's update ran at about a third of memory speed; the results are the same, as the
# vector square root and division round correctly, like the scalar ones.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-fopenmp", "-std=c++17"]
_CHUNK = 4  # image rows per chunk of work: 4 rows of a 32x32x32 layer keep X and dY in L2
_why_unavailable: str | None = None
# The dtypes that the dropout and ReLU-pool kernels take (bf16 autocast gives them bfloat16 tensors).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so that a cache shared between machines (a network home
    folder) never hands one CPU a library built for another."""
    info = runtime.cpuinfo_lines()
    return "".join(info) if info is not None else platform.processor() or platform.machine()


# The instruction sets of oneDNN's AVX-512 convolution kernels (its "avx512_core" level).
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def conv_kernel_pays_off(flags: Iterable[str] | None = None) -> bool:
    """Whether training should send 3x3 convolutions' weight gradients to this module's kernel
    rather than leave them to PyTorch's (oneDNN): only where the CPU lacks AVX-512, so that
    oneDNN computes them with its AVX2 kernel. On the notebook's four layers (batch 128, 2
    threads, ``benchmarks/conv_wgrad.py``) this kernel's backward pass took 0.79 times oneDNN's
    time on an AVX2 AMD EPYC, but 1.35 times on an AVX-512 Xeon, whose oneDNN weight gradient
    ran at 242 to 294 GFLOP/s against this kernel's 153 to 174; there a keras-deep epoch
    (``benchmarks/cpu_epoch.py``) took 24.7 and 26.4 s with the dropout kernel alone against
    29.9 and 31.4 s with both; and 1.07 times on an AVX-512 AMD EPYC. ``flags`` are the CPU's
    feature flags as /proc/cpuinfo names them; by default this machine's (where /proc/cpuinfo is
    missing, PyTorch's own reading of the CPU decides)."""
    if flags is None:
        flags = runtime.cpu_flags()
        if flags is None:
            return torch.backends.cpu.get_cpu_capability() != "AVX512"
    return not _AVX512_CORE.issubset(flags)


def _build(src: bytes, cxx: str) -> Path:
    """Compile ``src`` once per source, compiler, flags and CPU into the cache folder."""
    from .data.cache import cache_dir, mark_used

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if lib.is_file():
        mark_used(lib)
        return lib
    with atomic_path(lib) as tmp:  # concurrent builds each write their own file, then rename
        cpp = tmp.with_suffix(".cpp")
        cpp.write_bytes(src)
        try:
            res = subprocess.run([cxx, *_FLAGS, "-o", str(tmp), str(cpp)], capture_output=True, text=True,
                                 timeout=300)
        finally:
            cpp.unlink(missing_ok=True)
        if res.returncode != 0:  # not an OSError: atomic_path would report that as a failed write
            last = res.stderr.strip().splitlines()[-1:] or [f"exit status {res.returncode}"]
            raise subprocess.SubprocessError(f"{Path(cxx).name} failed: {last[0]}")
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be used here (:func:`unavailable_reason` says
    why). Built once per machine and cached; loaded and self-checked once per process."""
    global _why_unavailable
    _why_unavailable = None  # a reload (after load.cache_clear) starts afresh
    if os.environ.get("CIFARLAB_NO_CPU_KERNELS"):
        _why_unavailable = "turned off by CIFARLAB_NO_CPU_KERNELS"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        _why_unavailable = (f"needs an x86-64 CPU with AVX2 on Linux or macOS; this is "
                            f"{platform.machine()} {sys.platform}")
        return None
    cxx = _compiler()
    if cxx is None:
        _why_unavailable = "no C++ compiler found (set CXX, or install g++)"
        return None
    try:
        src = resources.files("cifarlab").joinpath("csrc", _SOURCE).read_bytes()
        lib = ctypes.CDLL(str(_build(src, cxx)))
    except (OSError, subprocess.SubprocessError, CifarlabError) as e:
        _why_unavailable = f"could not build it: {e}"
        return None
    lib.cl_conv3x3_wgrad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7
    lib.cl_conv3x3_wgrad.restype = ctypes.c_int
    lib.cl_dropout.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_uint32, ctypes.c_float,
                                                       ctypes.c_uint64, ctypes.c_int]
    lib.cl_dropout.restype = None
    lib.cl_dropout_bf16.argtypes = lib.cl_dropout.argtypes
    lib.cl_dropout_bf16.restype = None
    lib.cl_affine_warp.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                   ctypes.c_float, ctypes.c_int]
    lib.cl_affine_warp.restype = ctypes.c_int
    lib.cl_relu_maxpool2.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    lib.cl_relu_maxpool2.restype = None
    lib.cl_relu_maxpool2_bwd.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    lib.cl_relu_maxpool2_bwd.restype = None
    for name in ("cl_relu_maxpool2_bf16", "cl_relu_maxpool2_bwd_bf16", "cl_maxpool2", "cl_maxpool2_bf16"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = lib.cl_relu_maxpool2.argtypes, None
    lib.cl_keras_rmsprop.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_float] * 5 + [ctypes.c_int]
    lib.cl_keras_rmsprop.restype = None
    # The checks take gradients: run them as plain code whatever the caller's context (no_grad,
    # inference mode, autocast), as load() is first called wherever a kernel is first used.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        checked = _self_check(lib)
    if not checked:
        _why_unavailable = "its self-check against PyTorch failed on this machine"
        return None
    return lib


def _loaded() -> ctypes.CDLL:
    """:func:`load`'s library, for the public kernel functions: RuntimeError with the reason where
    the kernels are unavailable."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {unavailable_reason()}")
    return lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None if it did not, or was not called yet)."""
    return _why_unavailable


def _self_check(lib) -> bool:
    """The gradient kernel in both operand orders, odd sizes and more threads than rows, against
    PyTorch in float64; dropout's output against its mask, its keep rate, and its independence
    of the thread count; ReLU and pooling against PyTorch's, forward and backward, with ties,
    odd sizes and more threads than rows, and pooling alone likewise; RMSprop against its
    formula in float64;
    the warp against its PyTorch formulation."""
    fn = lib.cl_conv3x3_wgrad
    g = torch.Generator().manual_seed(0)
    for n, h, w, ci, co in ((2, 5, 7, 16, 3), (1, 3, 4, 3, 32), (3, 6, 5, 32, 16)):
        x = torch.randn(n, ci, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        got, gb = _wgrad(fn, x, gy, threads=3, bias=True)
        want = _reference_wgrad(x.double(), gy.double())
        if not (torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
                and torch.allclose(gb.double(), gy.double().sum((0, 2, 3)), rtol=1e-4, atol=1e-4)):
            return False
    x = torch.rand(100_001, generator=g) + 0.5
    outs = []
    for threads in (1, 3):
        out, noise = torch.empty_like(x), torch.empty_like(x)
        _dropout_into(lib, x, out, noise, 0.25, seed=12345, threads=threads)
        outs.append((out, noise))
    (out, noise), (out3, noise3) = outs
    kept = noise != 0
    if not (torch.equal(out, out3) and torch.equal(noise, noise3) and torch.equal(out, x * noise)
            and bool((noise[kept] == 1 / 0.75).all()) and abs(kept.double().mean().item() - 0.75) < 0.01):
        return False
    xb = x.bfloat16()
    out_b, noise_b = torch.empty_like(xb), torch.empty_like(xb)
    _dropout_into(lib, xb, out_b, noise_b, 0.25, seed=12345, threads=3)
    if not (torch.equal(noise_b != 0, kept) and torch.equal(out_b, xb * noise_b)
            and bool((noise_b[kept] == torch.tensor(1 / 0.75).bfloat16()).all())):
        return False
    return _relu_pool_self_check(lib, g) and _rmsprop_self_check(lib, g) and _warp_self_check(lib, g)


def _relu_pool_self_check(lib, g: torch.Generator) -> bool:
    for shape, dtype in (((2, 17, 5, 7), torch.float32), ((3, 16, 4, 4), torch.float32),
                         ((2, 19, 5, 6), torch.bfloat16)):
        # values on a coarse grid, so that windows hold ties and all-negative windows occur
        x = (torch.randint(-3, 4, shape, generator=g) / 2).to(dtype).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2, generator=g).to(dtype)
        for relu in (True, False):
            xr = x.clone().requires_grad_()
            want = F.max_pool2d(torch.relu(xr) if relu else xr, 2)
            (want_gx,) = torch.autograd.grad(want, xr, gy)
            out, idx = _relu_pool_into(lib, x, threads=40, relu=relu)
            gx = _relu_pool_grad_into(lib, gy, idx, x.shape, threads=40)
            if not (torch.equal(out, want.detach()) and torch.equal(gx, want_gx)):
                return False
    return True


def rmsprop_reference(p: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, lr: float, rho: float,
                      eps: float, weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Keras' RMSprop in float64, out of place: returns the new weights and
    velocity. What the kernel is checked against; not PyTorch's float32 ops, whose CPU square
    root was at times off by up to 3e-4 relative on part of a tensor (AVX-512 Xeon, PyTorch 2.13)."""
    p, grad, velocity = p.double(), grad.double(), velocity.double()
    grad = grad + weight_decay * p
    velocity = rho * velocity + (1 - rho) * grad * grad
    return p - lr * grad / torch.sqrt(velocity + eps), velocity


def _rmsprop_self_check(lib, g: torch.Generator) -> bool:
    for wd in (0.0, 1e-2):
        p = torch.randn(40_003, generator=g)
        grad = torch.randn(p.shape, generator=g)
        got, v = p.clone(), torch.zeros_like(p)
        want, want_v = p.double(), v.double()
        for _ in range(3):
            _rmsprop_into(lib, got, grad, v, 1e-2, 0.9, 1e-7, wd, threads=3)
            want, want_v = rmsprop_reference(want, grad, want_v, 1e-2, 0.9, 1e-7, wd)
        # float32 rounding: about 1e-7 of a weight's size; more, relative, for tiny velocities
        # (a gradient nearly cancelled by the weight decay)
        if not (torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
                and torch.allclose(v.double(), want_v, rtol=1e-5, atol=1e-8)):
            return False
    return True


def _warp_self_check(lib, g: torch.Generator) -> bool:
    """The warp kernel against PyTorch's grid_sample formulation (:func:`cifarlab.augment.affine_sample`)
    for every boundary mode, from uint8 and from float images, odd sizes, more threads than images."""
    from .augment import affine_sample  # imported here: augment imports this module

    for mode in _FILL_CODES:
        x = torch.randint(0, 256, (3, 3, 7, 6), generator=g, dtype=torch.uint8)
        mats = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
        mats[:, :2] += (torch.rand(3, 2, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([[0.8, 0.8, 9.0]])
        want = affine_sample(x.float() / 255, mats, mode, 0.25)
        for src, in_scale in ((x, 1 / 255), (x.float() / 255, 1.0)):
            got = torch.empty(x.shape, dtype=torch.float32)
            _warp_into(lib, src, got, mats, mode, 0.25, in_scale, 1.0, threads=5)
            if not torch.allclose(got, want, atol=1e-4, rtol=0):
                return False
    return True


def _reference_wgrad(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    w = torch.empty(gy.shape[1], x.shape[1], 3, 3, dtype=x.dtype)
    return torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


def supports(ci: int, co: int) -> bool:
    """Whether the kernel takes a layer with these channel counts (one of them a multiple of 16)."""
    return ci % 16 == 0 or co % 16 == 0


def _dropout_into(lib, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor, p: float, seed: int,
                  threads: int | None = None) -> None:
    drop_below = min(round(p * 2**32), 2**32 - 1)
    fn, scale = lib.cl_dropout, 1.0 / (1.0 - p)
    if x.dtype == torch.bfloat16:  # scaled by 1 / (1 - p) rounded to bfloat16, as PyTorch's bf16 dropout is
        fn, scale = lib.cl_dropout_bf16, float(torch.tensor(scale).to(torch.bfloat16))
    fn(x.data_ptr(), out.data_ptr(), noise.data_ptr(), x.numel(), drop_below, scale, seed,
       threads or torch.get_num_threads())


_FILL_CODES = {"nearest": 0, "reflect": 1, "wrap": 2, "constant": 3}  # as cl_affine_warp numbers them


def _warp_into(lib, x: torch.Tensor, out: torch.Tensor, mats: torch.Tensor, fill_mode: str, cval: float,
               in_scale: float, out_scale: float, threads: int | None = None) -> None:
    n, c, h, w = x.shape
    m = mats[:, :2].to(torch.float64).contiguous()
    rc = lib.cl_affine_warp(x.data_ptr(), int(x.dtype == torch.uint8), out.data_ptr(), m.data_ptr(), n, c, h, w,
                            _FILL_CODES[fill_mode], cval * out_scale, in_scale * out_scale,
                            threads or torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"affine warp kernel: fill mode {fill_mode!r} was not accepted")


def warp_takes(x) -> bool:
    """Whether :func:`affine_warp` takes tensor ``x``: (N, C, H, W) uint8 or float32 on the CPU,
    each image's padded planes indexable with 32-bit integers."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.uint8, torch.float32) and x.numel() > 0
            and x.shape[1] * (x.shape[2] + 1) * (x.shape[3] + 1) < 2**31)


def affine_warp(x: torch.Tensor, mats: torch.Tensor, fill_mode: str = "nearest", cval: float = 0.0,
                in_scale: float = 1.0, out_scale: float = 1.0) -> torch.Tensor:
    """Keras' affine transform of a batch, on the CPU: float32 ``out_scale * T(x * in_scale)``,
    where T samples each image ``x[i]`` (C, H, W) at ``mats[i] @ (row, col, 1)`` with order-1
    interpolation and scipy's boundary mode ``fill_mode`` (``cval`` in the units of
    ``x * in_scale``), as ``scipy.ndimage.affine_transform(..., order=1)`` does per channel.

    ``x`` is uint8 or float32 (N, C, H, W); ``mats`` (N, 3, 3) or (N, 2, 3) maps output pixels
    to input pixels (:func:`cifarlab.augment.keras_matrices`). Coordinates are computed in
    float64. Raises RuntimeError where the kernels are unavailable, ValueError for input they
    do not take."""
    lib = _loaded()
    if not warp_takes(x):
        raise ValueError(f"affine warp kernel takes a non-empty (N, C, H, W) uint8 or float32 CPU tensor of images "
                         f"under 2**31 values each; got "
                         f"{x.dtype} on {x.device}, shape {tuple(x.shape)}")
    if fill_mode not in _FILL_CODES:
        raise ValueError(f"fill_mode={fill_mode!r} is not valid; choose one of {', '.join(_FILL_CODES)}")
    n = x.shape[0]
    if mats.shape not in ((n, 3, 3), (n, 2, 3)):
        raise ValueError(f"mats must be ({n}, 3, 3) or ({n}, 2, 3) for {n} images; got {tuple(mats.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    _warp_into(lib, x, out, mats.cpu(), fill_mode, float(cval), float(in_scale), float(out_scale))
    return out


def _relu_pool_into(lib, x: torch.Tensor, threads: int | None = None,
                    relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    out = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, memory_format=torch.channels_last)
    idx = torch.empty(out.shape, dtype=torch.uint8, memory_format=torch.channels_last)
    name = ("cl_relu_maxpool2" if relu else "cl_maxpool2") + ("" if x.dtype == torch.float32 else "_bf16")
    fn = getattr(lib, name)
    fn(x.data_ptr(), out.data_ptr(), idx.data_ptr(), n, h, w, c, threads or torch.get_num_threads())
    return out, idx


def _relu_pool_grad_into(lib, grad_out: torch.Tensor, idx: torch.Tensor, shape: torch.Size,
                         threads: int | None = None) -> torch.Tensor:
    n, c, h, w = shape
    g = grad_out.contiguous(memory_format=torch.channels_last)  # the layout the kernel reads
    gx = torch.empty(n, c, h, w, dtype=g.dtype, memory_format=torch.channels_last)
    fn = lib.cl_relu_maxpool2_bwd if g.dtype == torch.float32 else lib.cl_relu_maxpool2_bwd_bf16
    fn(g.data_ptr(), idx.data_ptr(), gx.data_ptr(), n, h, w, c, threads or torch.get_num_threads())
    return gx


def _relu_pool_takes(x) -> bool:
    """Whether :func:`relu_max_pool2` takes tensor ``x``: float32 or bfloat16 (N, C, H, W) on the
    CPU in dense channels-last memory, H and W at least 2, under 2**31 elements."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in _KERNEL_DTYPES and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last) and x.shape[2] >= 2 and x.shape[3] >= 2
            and 0 < x.numel() < 2**31)


def relu_max_pool2(x: torch.Tensor, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_pool2d(relu(x), 2)`` of a float32 or bfloat16 channels-last CPU tensor ``x`` in one
    pass (``max_pool2d(x, 2)`` when ``relu`` is false): returns the pooled output
    (channels-last, ``x``'s dtype) and a uint8 tensor of its shape recording, for the backward
    pass (:func:`relu_max_pool2_grad`), which element of each 2x2 window won and whether ReLU
    zeroed it. Values equal PyTorch's exactly. Raises RuntimeError where the kernels are
    unavailable, ValueError for a tensor it does not take."""
    lib = _loaded()
    if not _relu_pool_takes(x):
        raise ValueError(f"ReLU-pool kernel takes a float32 or bfloat16 (N, C, H, W) CPU tensor in channels-last "
                         f"memory, H and W at least 2; got {x.dtype} on {x.device}, shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    return _relu_pool_into(lib, x, relu=relu)


def relu_max_pool2_grad(grad_out: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The gradient with respect to ``x`` (of ``shape``, channels-last) of
    :func:`relu_max_pool2`, given the output's gradient (float32 or bfloat16: the result's
    dtype) and the indices it returned."""
    lib = _loaded()
    n, c, h, w = shape
    if grad_out.shape != idx.shape or tuple(idx.shape) != (n, c, h // 2, w // 2) \
            or grad_out.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"grad_out must be float32 or bfloat16 of the indices' shape {tuple(idx.shape)}, the pooled "
                         f"shape of {tuple(shape)}; got {grad_out.dtype} {tuple(grad_out.shape)}")
    return _relu_pool_grad_into(lib, grad_out, idx.contiguous(memory_format=torch.channels_last), torch.Size(shape))


def rmsprop_takes(p: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor) -> bool:
    """Whether :func:`keras_rmsprop_` takes these: float32 CPU tensors of one shape and one dense
    memory layout."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (p, grad, velocity))
            and p.shape == grad.shape == velocity.shape and p.stride() == grad.stride() == velocity.stride()
            and _dense(p))


def keras_rmsprop_(params: list[torch.Tensor], grads: list[torch.Tensor], velocities: list[torch.Tensor],
                   lr: float, rho: float, eps: float, weight_decay: float = 0.0) -> None:
    """Keras' RMSprop step in place, one pass per tensor: ``g += weight_decay * p``;
    ``v = rho * v + (1 - rho) * g**2``; ``p -= lr * g / sqrt(v + eps)`` (the gradients themselves
    are left unchanged). Every triple must satisfy :func:`rmsprop_takes`. Raises RuntimeError
    where the kernels are unavailable, ValueError naming a tensor they do not take."""
    lib = _loaded()
    threads = torch.get_num_threads()
    for i, (p, g, v) in enumerate(zip(params, grads, velocities, strict=True)):
        if not rmsprop_takes(p, g, v):
            raise ValueError(f"RMSprop kernel takes float32 CPU tensors of one shape and dense layout; tensor {i} "
                             f"has parameter {p.dtype} {tuple(p.shape)} on {p.device}, gradient {g.dtype} "
                             f"{tuple(g.shape)} strides {g.stride()}, velocity {v.dtype} strides {v.stride()}")
        _rmsprop_into(lib, p, g, v, lr, rho, eps, weight_decay, threads)


_bump_version = getattr(torch.autograd.graph, "increment_version", None)  # PyTorch 2.3 on


def _rmsprop_into(lib, p: torch.Tensor, g: torch.Tensor, v: torch.Tensor, lr: float, rho: float, eps: float,
                  weight_decay: float, threads: int) -> None:
    lib.cl_keras_rmsprop(p.data_ptr(), g.data_ptr(), v.data_ptr(), p.numel(), -lr, rho, 1 - rho, eps, weight_decay,
                         threads)
    for t in (p, v) if _bump_version else ():  # written behind autograd's back: count it as in-place ops do
        _bump_version(t)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _dropout_takes(x) -> bool:
    """Whether the dropout kernel takes tensor ``x``: dense float32 or bfloat16 on the CPU, under
    2**32 elements."""
    return (isinstance(x, torch.Tensor) and x.dtype in _KERNEL_DTYPES and x.device.type == "cpu" and _dense(x)
            and x.numel() < 2**32)


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout of a dense float32 or bfloat16 CPU tensor ``x`` in training: returns
    ``(x * noise, noise)`` in ``x``'s dtype, where each element of ``noise`` is 1 / (1 - p)
    (rounded to bfloat16 for a bfloat16 ``x``, as PyTorch's dropout rounds it) with
    probability 1 - p, else 0; the same mask for either dtype under the same seed.
    The random stream is seeded from PyTorch's default generator, so ``torch.manual_seed``
    makes it repeatable (on any number of threads). Raises RuntimeError where the kernel is
    unavailable, ValueError for a tensor or ``p`` it does not take."""
    lib = _loaded()
    if not (0 < p < 1):
        raise ValueError(f"dropout probability p={p!r} is not valid here; expected 0 < p < 1")
    if not _dropout_takes(x):
        raise ValueError(f"dropout kernel takes a dense float32 or bfloat16 CPU tensor of under 2**32 elements; "
                         f"got {x.dtype} on {x.device}, shape {tuple(x.shape)}, strides {x.stride()}")
    out, noise = torch.empty_like(x), torch.empty_like(x)  # same dense layout as x
    seed = int(torch.empty((), dtype=torch.int64).random_())  # from the default generator: manual_seed governs it
    _dropout_into(lib, x, out, noise, p, seed)
    return out, noise


def _wgrad(fn, x: torch.Tensor, gy: torch.Tensor, threads: int | None = None,
           bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, ci, h, w = x.shape
    co = gy.shape[1]
    # channels-last memory is the (n, h, w, c) layout the kernel reads; a no-op for the training path
    xn = x.contiguous(memory_format=torch.channels_last)
    gn = gy.contiguous(memory_format=torch.channels_last)
    vec_x = ci % 16 == 0
    out = torch.empty(9, co if vec_x else ci, ci if vec_x else co, dtype=torch.float32)
    gb = torch.empty(co, dtype=torch.float32) if bias else None
    rc = fn(xn.data_ptr(), gn.data_ptr(), out.data_ptr(), gb.data_ptr() if bias else None, n, h, w, ci, co,
            threads or torch.get_num_threads(), _CHUNK)
    if rc != 0:
        raise ValueError(f"conv3x3 weight-gradient kernel: channels {ci} -> {co}: neither is a multiple of 16")
    out = out.view(3, 3, *out.shape[1:])
    return (out.permute(2, 3, 0, 1) if vec_x else out.permute(3, 2, 0, 1)), gb


def conv3x3_weight_grad(x: torch.Tensor, grad_out: torch.Tensor,
                        bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight gradient (C_out, C_in, 3, 3) of a 3x3, stride-1, padding-1 convolution of ``x``
    (N, C_in, H, W) given the output gradient (N, C_out, H, W), float32 CPU tensors, and the bias
    gradient (C_out) when ``bias`` (else None). Raises RuntimeError where the kernel is
    unavailable (see :func:`unavailable_reason`)."""
    lib = _loaded()
    return _wgrad(lib.cl_conv3x3_wgrad, x, grad_out, bias=bias)


def _conv3x3_grads(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, needs: tuple[bool, ...],
                   has_bias: bool) -> tuple[torch.Tensor | None, ...]:
    """The input, weight and bias gradients (None where ``needs`` says no) of a 3x3 same
    convolution: oneDNN's input gradient and this module's weight and bias gradients."""
    gx = gw = gb = None
    if needs[0]:
        gx = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], 1, [True, False, False])[0]
    want_b = has_bias and needs[2]
    if needs[1]:
        gw, gb = conv3x3_weight_grad(x, grad_out, bias=want_b)
        gw = gw.contiguous(memory_format=_layout(weight))
    elif want_b:
        gb = grad_out.sum((0, 2, 3))
    return gx, gw, gb


class _Conv3x3(torch.autograd.Function):
    """A 3x3 same convolution: PyTorch's forward and input gradient, this module's weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.conv2d(x, weight, bias, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        return _conv3x3_grads(x, weight, grad_out, ctx.needs_input_grad, ctx.has_bias)


class _ConvReLU(torch.autograd.Function):
    """``relu(conv2d(x))`` as one oneDNN convolution that applies the ReLU as it writes its
    output, which saves a pass over the output forward; the backward pass is ReLU's as autograd
    runs it (``threshold_backward`` on the output), then the convolution's, by oneDNN or, with
    ``wgrad_kernel``, by :func:`_conv3x3_grads`: the gradients are PyTorch's for the two
    operations bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, wgrad_kernel):
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                      "relu", [None], "")
        ctx.save_for_backward(x, weight, out)
        ctx.conf = (stride, padding, dilation, groups, bias is not None, wgrad_kernel)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, wgrad_kernel = ctx.conf
        gy = torch.ops.aten.threshold_backward(grad_out, out, 0)
        needs = ctx.needs_input_grad
        if wgrad_kernel:
            grads = _conv3x3_grads(x, weight, gy, needs, has_bias)
        else:
            grads = torch.ops.aten.convolution_backward(
                gy, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0],
                groups, [needs[0], needs[1], has_bias and needs[2]])
        return (*grads, None, None, None, None, None)


def _layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def _pair_is(v, k: int) -> bool:
    return v == k or (isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1] == k)


def _eligible(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> bool:
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.shape[2:] == (3, 3) and weight.requires_grad
            and (bias is None or bias.dtype == torch.float32) and groups == 1 and _pair_is(stride, 1)
            and (_pair_is(padding, 1) or (padding == "same")) and _pair_is(dilation, 1)
            and x.is_contiguous(memory_format=torch.channels_last) and supports(x.shape[1], weight.shape[0]))


class _Dropout(torch.autograd.Function):
    """Inverted dropout through :func:`dropout`; the backward multiplies by the same noise."""

    @staticmethod
    def forward(ctx, x, p):
        out, noise = dropout(x, p)
        ctx.save_for_backward(noise)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (noise,) = ctx.saved_tensors
        return grad_out * noise, None


def _pool_forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:
    out, idx = relu_max_pool2(x, relu)
    ctx.save_for_backward(idx)  # the backward pass needs only the byte indices, not x
    ctx.in_shape = tuple(x.shape)
    return out


class _ReluMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(x), 2)`` through :func:`relu_max_pool2`."""

    @staticmethod
    def forward(ctx, x):
        return _pool_forward(ctx, x, relu=True)

    @staticmethod
    def backward(ctx, grad_out):  # autograd hands it in the output's dtype, which is x's
        (idx,) = ctx.saved_tensors
        return relu_max_pool2_grad(grad_out, idx, ctx.in_shape)


class _MaxPool(_ReluMaxPool):
    """``max_pool2d(x, 2)`` through :func:`relu_max_pool2` without its ReLU; the same backward
    (its indices are never marked blocked). A class of its own, so that graphs name it apart."""

    @staticmethod
    def forward(ctx, x):
        return _pool_forward(ctx, x, relu=False)


def _autocasting() -> bool:
    """Whether CPU autocast is on: the convolution kernel is float32-only, and under autocast a
    float32 input still gives a bfloat16 output and gradient."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def _dropout_args(input, p=0.5, training=True, inplace=False):
    return input, p, training, inplace


def _is_2x2_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                 return_indices=False) -> bool:
    return (_pair_is(kernel_size, 2) and (stride is None or _pair_is(stride, 2) or stride == [])
            and _pair_is(padding, 0) and _pair_is(dilation, 1) and not ceil_mode and not return_indices)


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv2d(input, weight, bias, stride, padding, dilation, groups))``, as one call that
    :func:`fuse` writes into a model's forward: :func:`kernel_mode` runs it as one oneDNN
    convolution that applies the ReLU as it writes its output, where that applies; anywhere else
    it is the two operations."""
    args = (input, weight, bias, stride, padding, dilation, groups)
    tensors = tuple(t for t in (input, weight, bias) if isinstance(t, torch.Tensor))
    if has_torch_function(tensors):  # how kernel_mode, a torch function mode, gets to see the call
        return handle_torch_function(conv2d_relu, tensors, *args)
    return F.relu(F.conv2d(*args))


def relu_max_pool2d(input):
    """``max_pool2d(relu(input), 2)``, as one call that :func:`fuse` writes into a model's
    forward: :func:`kernel_mode` runs it through :func:`relu_max_pool2` where that takes
    ``input``; anywhere else it is the two operations."""
    if has_torch_function_unary(input):
        return handle_torch_function(relu_max_pool2d, (input,), input)
    return F.max_pool2d(F.relu(input), 2)


def _pairs(v) -> list[int] | None:
    """An int or a pair of ints as a list of two (as oneDNN's calls take them), else None."""
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    return None


@functools.cache
def _conv_relu_available() -> bool:
    """Whether this PyTorch has oneDNN's convolution with a fused ReLU and it gives
    ``relu(conv2d(...))`` exactly here (checked once per process, with and without a bias, a
    stride and groups; never on a tensor of the caller's)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        for ci, co, stride, groups, bias in ((3, 8, 1, 1, True), (4, 6, 2, 2, False)):
            x = torch.randn(2, ci, 7, 6, generator=g).contiguous(memory_format=torch.channels_last)
            w = torch.randn(co, ci // groups, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
            b = torch.randn(co, generator=g) if bias else None
            try:
                got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [stride] * 2, [1, 1], groups,
                                                              "relu", [None], "")
            except RuntimeError:
                return False
            if not torch.equal(got, F.relu(F.conv2d(x, w, b, stride, 1, 1, groups))):
                return False
    return True


def _conv_relu_takes(x, weight, bias, stride, padding, dilation) -> bool:
    """Whether :class:`_ConvReLU` takes these: float32 CPU tensors, the input 4-D in channels-last
    memory, padding, stride and dilation as numbers (not 'same'), outside autocast."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last) and weight.dim() == 4
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and None not in (_pairs(stride), _pairs(padding), _pairs(dilation))
            and not _autocasting() and _conv_relu_available())


class _KernelMode(TorchFunctionMode):
    """Sends eligible ``conv2d`` calls made while grad is enabled and autocast is off to
    :class:`_Conv3x3` (when ``conv``), training-time ``dropout`` calls on float32 and bfloat16
    CPU tensors to :class:`_Dropout`, :func:`conv2d_relu` calls on float32 channels-last CPU
    tensors to :class:`_ConvReLU`, and (when ``pool``) :func:`relu_max_pool2d` calls to
    :class:`_ReluMaxPool` and 2x2 ``max_pool2d`` calls to :class:`_MaxPool`, for the float32 or
    bfloat16 channels-last CPU tensors that those take."""

    def __init__(self, conv: bool, pool: bool = True) -> None:
        super().__init__()
        self.conv, self.pool = conv, pool

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is conv2d_relu:
            return self._conv_relu(*args, **kwargs)
        if self.conv and func is F.conv2d and torch.is_grad_enabled() and not _autocasting() \
                and _eligible(*args, **kwargs):
            return _Conv3x3.apply(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if training and not inplace and isinstance(p, float) and 0 < p < 1 and _dropout_takes(x):
                return _Dropout.apply(x, p)
        if func is relu_max_pool2d:
            x = args[0] if args else kwargs["input"]
            return _ReluMaxPool.apply(x) if self.pool and _relu_pool_takes(x) else F.max_pool2d(F.relu(x), 2)
        if self.pool and func is F.max_pool2d and _is_2x2_pool(*args, **kwargs):
            x = args[0] if args else kwargs.get("input")
            if _relu_pool_takes(x):
                return _MaxPool.apply(x)
        return func(*args, **kwargs)

    def _conv_relu(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
        if _conv_relu_takes(x, weight, bias, stride, padding, dilation):
            wgrad = self.conv and torch.is_grad_enabled() and _eligible(x, weight, bias, stride, padding, dilation,
                                                                       groups)
            return _ConvReLU.apply(x, weight, bias, _pairs(stride), _pairs(padding), _pairs(dilation), groups, wgrad)
        # the convolution as this mode runs any other (its weight-gradient kernel, where eligible)
        return F.relu(self.__torch_function__(F.conv2d, (), (x, weight, bias, stride, padding, dilation, groups)))


def kernel_mode(enabled: bool = True, conv: bool | None = None, pool: bool = True):
    """A context in which training uses this module's kernels where they apply: dropout on
    float32 and bfloat16 CPU tensors; when ``pool``, 2x2 max pooling, with the ReLU before it
    where there is one, on float32 or bfloat16 channels-last CPU tensors; and, when ``conv``
    (by default where :func:`conv_kernel_pays_off`) and autocast is off, the weight gradient
    of convolutions that are 3x3, stride 1, padding 1, float32, channels-last on the CPU, with
    input or output channels a multiple of 16. Everything else runs as usual. A no-op where
    the kernels are unavailable or ``enabled`` is false. Enter it around the forward pass; the
    backward pass needs nothing."""
    if not enabled or load() is None:
        return contextlib.nullcontext()
    return _KernelMode(conv_kernel_pays_off() if conv is None else conv, pool)


def _module(node, modules: dict, cls: type) -> torch.nn.Module | None:
    """The module of class ``cls`` (exactly) that fx ``node`` calls, if it has no forward hooks
    (which a rewritten call would skip); else None."""
    m = modules.get(node.target) if getattr(node, "op", None) == "call_module" else None
    return m if type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks) else None


def _is_relu(node, modules: dict) -> bool:
    """Whether fx ``node`` is an out-of-place ReLU: an ``nn.ReLU``, ``F.relu`` or ``torch.relu``."""
    if node.op == "call_module":
        m = _module(node, modules, torch.nn.ReLU)
        return m is not None and not m.inplace
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return not node.kwargs.get("inplace", False) and not (len(node.args) > 1 and node.args[1])
    return node.op == "call_method" and node.target == "relu"


def _is_pool2(node, modules: dict) -> bool:
    """Whether fx ``node`` is a 2x2, stride-2 max pool without padding, returning only its output."""
    if node.op == "call_module":
        m = _module(node, modules, torch.nn.MaxPool2d)
        return m is not None and _is_2x2_pool(None, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                              m.return_indices)
    return node.op == "call_function" and node.target is F.max_pool2d and _is_2x2_pool(*node.args, **node.kwargs)


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s forward pass with two patterns rewritten as single calls that
    :func:`kernel_mode` runs in one pass each: a ReLU whose only use is a 2x2 max pool as
    :func:`relu_max_pool2d`, and a ReLU of a ``Conv2d``'s output (its only use) as
    :func:`conv2d_relu`; modules with forward hooks are left out, so that their hooks still run.
    Outside :func:`kernel_mode` the result computes what ``model`` computes with the same
    operations.

    The result is a ``torch.fx.GraphModule`` that holds ``model``'s own submodules, so training
    it trains ``model``; ``model`` itself is left as it is. Returns ``model`` where nothing
    matched, or where ``torch.fx`` cannot trace it (control flow on the input, as in the speed
    recipes' nets, whose pools take :func:`kernel_mode`'s plain pool anyway)."""
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - fx raises several kinds: any means "run the model as it is"
        return model
    modules, graph, changed = dict(gm.named_modules()), gm.graph, False
    for node in list(graph.nodes):
        if not _is_relu(node, modules):
            continue
        src, users = node.args[0], list(node.users)
        if len(users) == 1 and _is_pool2(users[0], modules):
            with graph.inserting_before(users[0]):
                new = graph.call_function(relu_max_pool2d, (src,))
            users[0].replace_all_uses_with(new)
            graph.erase_node(users[0])
        elif (conv := _module(src, modules, torch.nn.Conv2d)) is not None and len(src.users) == 1 \
                and conv.padding_mode == "zeros":
            with graph.inserting_before(node):
                w = graph.get_attr(f"{src.target}.weight")
                b = graph.get_attr(f"{src.target}.bias") if conv.bias is not None else None
                new = graph.call_function(conv2d_relu, (src.args[0], w, b, conv.stride, conv.padding,
                                                        conv.dilation, conv.groups))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            node = src  # erased below: the convolution, now inside conv2d_relu
        else:
            continue
        graph.erase_node(node)
        changed = True
    if not changed:
        return model
    graph.lint()
    gm.recompile()
    return gm
