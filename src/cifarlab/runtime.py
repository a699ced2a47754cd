"""Device, threads, precision and determinism: set up in one place for every command."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys

import numpy as np
import torch

from .config import PRECISIONS, is_device_name
from .errors import ConfigError



def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable CUDA device is an error."""
    if not is_device_name(name):  # the rule config validation applies to train.device
        raise ConfigError(f"device '{name}' is not valid; choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu or auto")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse, whatever their size; True if applied.

    By default glibc hands every block over its (adaptive) mmap threshold back to the
    kernel on free, so each large batch-sized tensor costs fresh page faults: on the 2-core
    development machine this made a 6 MB elementwise op 3 to 7 times slower and the batched
    augmentation half as fast. So mapping is turned off (``M_MMAP_MAX`` 0) and every block
    comes from the heap: raising the threshold instead would serve blocks of up to 32 MiB
    only, the most glibc allows on 64-bit, and the speed recipes' batch-1024 activations are
    larger (126 MB for the `fast` recipe's first group in bf16). Free memory at the heap's top
    beyond 512 MiB still goes back to the system. The cost is that the process keeps its peak
    heap. (PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc.)
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    # With mapping off, the mmap threshold (32 MiB here before) no longer decides anything.
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))


def setup(device: str = "auto", threads: int | None = None, deterministic: bool = False) -> torch.device:
    """Select the device and configure threads, host memory reuse and determinism; returns the device.

    On CPU every core is used by default (PyTorch's default can undercount in containers).
    ``deterministic`` asks for bit-reproducible kernels, which resume tests rely on.
    """
    dev = select_device(device)
    keep_freed_memory()
    n = threads or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (threads or os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free accuracy-wise for these nets
        torch.backends.cudnn.allow_tf32 = True
    return dev


def _check_precision(device: torch.device, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not valid; choose {', '.join(PRECISIONS)}")
    if precision == "auto":  # a caller's slip: every use takes the resolved one
        raise ConfigError("precision 'auto' must be resolved for the device first (runtime.resolve_precision)")
    if precision.startswith("fp16") and device.type != "cuda":
        raise ConfigError(f"precision {precision} needs a CUDA device; use bf16, bf16-true or fp32 on the CPU")


def check_device_options(device: torch.device, precision: str, cuda_graph: bool) -> None:
    """Refuse, before any data is read, the options that ``device`` cannot run: the fp16
    precisions and CUDA graphs need a CUDA device."""
    _check_precision(device, precision)
    if cuda_graph and device.type != "cuda":
        raise ConfigError(f"train.cuda_graph needs a CUDA device; this run is on {device}. "
                          "Leave --cuda-graph off on the CPU")


def resolve_precision(device: torch.device, precision: str, flags: frozenset[str] | None = None) -> str:
    """``precision`` itself, or for ``auto`` the one that trains fastest on ``device`` without
    loss scaling: bf16 (autocast) where it computes bfloat16 natively, a CUDA GPU of compute
    capability 8.0 or more or an x86 CPU with AVX-512 BF16 or AMX (``flags``: this machine's, by
    default), else fp32. Only these two: fp16 autocast would need a GPU without bf16 units, where
    it has not been measured. On a 2-core AVX-512 BF16 CPU the fast recipe trained an epoch in 86
    to 104 s in bf16 against 182 to 196 s in fp32; on an AVX2 CPU bf16 is many times slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    known = _x86_flags(flags) if device.type == "cpu" else None
    return "bf16" if known is not None and BF16_UNITS & known else "fp32"


def _x86_flags(flags: frozenset[str] | None = None) -> frozenset[str] | None:
    """``flags`` (by default this CPU's) where they can be read as x86 flag names; None where
    they are unknown or another architecture's, whose bfloat16 units go by other names."""
    flags = cpu_flags() if flags is None else flags
    return flags if flags is not None and platform.machine().lower() in ("x86_64", "amd64") else None


def autocast(device: torch.device, precision: str = "fp32", cache: bool = True):
    """The mixed-precision context for ``precision`` (fp32: none; bf16 on CPU or GPU; fp16 on GPU).

    bf16 needs no loss scaling. The issue's measurements of the keras-book step on a GPU found
    bf16 slower than fp32 there (the step is bound by kernel launches, not arithmetic), so
    fp32 stays the default and bf16 is for the larger speed-recipe networks. ``cache=False``
    turns off autocast's cache of cast weights, as CUDA graph capture requires. The ``-true``
    precisions need no autocast (see :func:`cast_model`), so they get none.
    """
    _check_precision(device, precision)
    if precision == "fp32" or precision.endswith("-true"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights and inputs under ``precision``: half for the ``-true`` ones,
    float32 otherwise (autocast casts per operation)."""
    return {"bf16-true": torch.bfloat16, "fp16-true": torch.float16}.get(precision, torch.float32)


def loss_scale(precision: str, batch_size: int) -> float:
    """The static loss scale for ``precision``: under fp16 and fp16-true the largest power of two
    not above ``batch_size``, else 1. Gradients of a mean loss are about 1/batch the size of a
    summed loss's, and in float16 (smallest normal 6e-5) many would round to zero; scaled, the
    backward pass sees roughly the summed loss, which is how airbench trains in float16. A
    power of two makes the scaling and the unscaling exact. Static, so no step waits to check
    for overflow (a dynamic scaler reads a flag back every step); an overflow shows up as a
    non-finite loss."""
    if not precision.startswith("fp16"):
        return 1.0
    return float(2 ** max(0, int(batch_size).bit_length() - 1))


def cast_model(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Cast ``model`` in place for ``precision``: under ``fp16-true`` / ``bf16-true`` (Lightning's
    names) every weight, and with it every activation, gradient and optimizer state, is half
    precision, with no fp32 master copy and no autocast. This is how the airbench speed records
    train: it saves the per-step casts of weights that autocast makes and halves the memory
    traffic of the update. Batch norms stay float32, as there: their running statistics
    average many steps, which half precision would round away, and the kernels take half
    inputs with float32 parameters. Suited to SGD and Muon at the speed recipes' learning rates;
    updates much smaller than a weight's rounding step (fp16 keeps 11 significant bits, bf16 8)
    are lost. Other precisions leave the model as it is."""
    _check_precision(device, precision)
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return model
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.float()
    return model


def maybe_compile(model: torch.nn.Module, enabled: bool, mode: str = "default") -> torch.nn.Module:
    """``torch.compile`` the model when asked: it pays off only for long runs (compilation takes
    tens of seconds) and on GPUs where kernel fusion cuts launches. On the 2-core development
    CPU it did not: the compiled keras-deep training step took 392 to 424 ms against 258 to 347
    ms eager (same process, interleaved), as oneDNN's convolutions dominate either way. The
    returned module shares parameters with ``model``. ``mode`` is ``torch.compile``'s (see
    :data:`cifarlab.config.COMPILE_MODES`)."""
    if not enabled:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def inference_batch_size(device: torch.device | str) -> int:
    """Images per forward pass when evaluating or predicting on ``device``. On a CPU, 128 keeps a
    batch's activations in cache: 10,000 images through keras-deep took 3.3 s at 128 and 6.4 s
    at 1000 (2 cores, channels-last), speednet 12.3 against 17.1 s; a GPU wants large batches."""
    return 128 if torch.device(device).type == "cpu" else 1000


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.cache
def cpuinfo_lines() -> tuple[str, ...] | None:
    """The first CPU's "model name" and "flags" lines of /proc/cpuinfo, as written there; None
    where there is no such file (macOS, Windows). Read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            return tuple([ln for ln in f if ln.startswith(("model name", "flags"))][:2])
    except OSError:
        return None


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them (None without that file); parsed
    once, as every training step of the CPU kernels asks for them."""
    info = cpuinfo_lines()
    if info is None:
        return None
    return frozenset(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))


# The x86 instruction sets with bfloat16 arithmetic, which oneDNN uses for bf16 convolutions and
# matrix products; without either it converts to float32 and back around every operation.
BF16_UNITS = frozenset({"avx512_bf16", "amx_bf16"})


def slow_bf16_note(device: torch.device, precision: str, flags: frozenset[str] | None = None) -> str | None:
    """A one-line note where ``precision`` computes in bfloat16 on a CPU without bfloat16 units
    (by default this machine's flags; no note where they are unknown or not x86's): on an AVX2
    CPU a keras-book epoch of 480 images took 14.7 s in bf16 against 1.0 s in fp32."""
    if device.type != "cpu" or precision not in ("bf16", "bf16-true"):
        return None
    known = _x86_flags(flags)
    if known is None or BF16_UNITS & known:
        return None
    return (f"note: --precision {precision} on a CPU without bfloat16 units (no avx512_bf16 or amx_bf16 among its "
            "flags) computes bfloat16 by conversion, which made training many times slower than fp32 on an AVX2 "
            "CPU; fp32 is likely the faster choice here")


def cpu_name() -> str:
    """The host CPU's model name (from /proc/cpuinfo, else what the platform module reports),
    saved with each run's metrics: training times, and which of cifarlab's CPU kernels pay off,
    depend on it."""
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo_lines() or () if ln.startswith("model name")), "")
    return name or platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for run folders and model cards."""
    import platform

    import PIL
    import sklearn

    from . import __version__

    out = {"cifarlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__,
           "platform": platform.platform()}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
