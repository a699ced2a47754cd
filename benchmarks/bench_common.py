"""Helpers shared by the benchmark scripts: where the data copy lies, the images they time and
a timed training epoch. Importing it needs only numpy (``cpu_speed.py``'s Keras worker runs it in
an interpreter without torch or cifarlab)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def training_images(n: int, path: Path = SHARED) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n`` training images of ``path`` (uint8 NHWC) with labels and a description;
    seeded random images where the file is absent, so the scripts still run. ``path`` may also
    be a folder holding ``train.npz`` (x: uint8 N,32,32,3; y: labels), as ``gpu_speed.py --npz`` reads."""
    if (Path(path) / "train.npz").is_file():
        tr = np.load(Path(path) / "train.npz")
        return tr["x"][:n], tr["y"][:n].astype(np.int64), f"{len(tr['x'][:n]):,} images of {path}/train.npz"
    if Path(path).is_file():
        from cifarlab.data import load_dataset

        ds = load_dataset(path)
        return ds.x_train[:n], ds.y_train[:n], f"{len(ds.x_train[:n]):,} images of {path}"
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
            f"{n:,} random 32x32x3 images (data copy absent)")


def cpu_line() -> str:
    """The CPU's model name and which of cifarlab's CPU kernels training uses on it, for a
    benchmark's header: the same code ranks differently on CPUs with and without AVX-512."""
    from cifarlab import cpu_kernels, runtime

    name = runtime.cpu_name()
    if cpu_kernels.load() is None:
        return f"CPU: {name}; cifarlab's CPU kernels unavailable ({cpu_kernels.unavailable_reason()})"
    conv = "on" if cpu_kernels.conv_kernel_pays_off() else "off (the CPU has AVX-512)"
    return (f"CPU: {name}; cifarlab's dropout, ReLU-pool and RMSprop kernels on, its convolution "
            f"weight-gradient kernel {conv}")


def timed_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int,
                fmt: torch.memory_format, kernels: bool | None = None,
                conv_kernel: bool | None = None, pool_kernel: bool = True,
                autocast=None, label_smoothing: float = 0.0) -> tuple[list[float], float]:
    """One shuffled training epoch with ``cifarlab train``'s step (scale by 1/255, memory format,
    ``train_step``, and on the CPU cifarlab's own kernels unless ``kernels`` is False; its
    convolution weight-gradient kernel where it pays off, or as ``conv_kernel`` says; its
    ReLU-pool kernel unless ``pool_kernel`` is False; under ``autocast``, a mixed-precision
    context from :func:`cifarlab.runtime.autocast`, if given; with ``label_smoothing``)
    over uint8 NCHW ``x`` on its device; returns each step's seconds and the epoch's, by the
    host clock (on a GPU those count launches, not the work: time with CUDA events)."""
    import torch

    from cifarlab import cpu_kernels
    from cifarlab.export import preprocess
    from cifarlab.train import train_step

    if kernels is None:
        kernels = x.device.type == "cpu" and cpu_kernels.load() is not None
    # The kernels through a mode of this function's own, not train_step's switch, so that
    # conv_kernel and pool_kernel can overrule training's choice.
    mode = cpu_kernels.kernel_mode(kernels, conv=conv_kernel, pool=pool_kernel)
    model = cpu_kernels.fuse(model) if kernels else model  # as training's step runs it

    steps = []
    t_epoch = time.perf_counter()
    perm = torch.randperm(len(x), device=x.device)
    for s in range(0, len(x), batch):
        idx = perm[s:s + batch]
        t0 = time.perf_counter()
        with mode:
            train_step(model, opt, preprocess(x[idx], {"rescale": 1 / 255}).contiguous(memory_format=fmt), y[idx],
                       label_smoothing, autocast=autocast)
        steps.append(time.perf_counter() - t0)
    return steps, time.perf_counter() - t_epoch
