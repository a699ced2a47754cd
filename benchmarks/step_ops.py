"""Operations per training step, by recipe and precision: how many non-view ATen operations one
step of ``train_step`` (forward, backward, optimizer) runs, and how many of them are dtype
copies. On a GPU nearly every such operation is a kernel launch, so the count is a proxy, taken
on any machine, for the launch-bound small steps (the keras-book recipe at batch 128): autocast
adds a cast of every weight in the forward pass and of its gradient back, which the ``-true``
precisions (half-precision weights) leave out. Some operations decompose differently on a GPU:
there dropout is one fused kernel, here three operations, and cuDNN may run more than one kernel
for a convolution.

Usage: python benchmarks/step_ops.py [--batch 32] [--recipes keras-book fast-muon]
[--precisions fp32 bf16 bf16-true]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cifarlab import runtime
from cifarlab.config import resolve_config
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, param_groups
from cifarlab.train import train_step

# Operations that make no kernel of their own (views, allocations, profiler marks).
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
             "squeeze", "detach", "alias", "as_strided", "reshape", "_reshape_alias", "split", "unbind", "empty",
             "empty_like", "empty_strided", "_record_function_enter_new", "_record_function_exit"}
COPIES = {"_to_copy", "copy_"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations run inside it, by name, leaving out :data:`NO_KERNEL`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(recipe: str, precision: str, batch: int) -> collections.Counter:
    """The operations of one training step of ``recipe``'s model and optimizer under
    ``precision``, on the CPU, after two untimed steps (optimizer state made)."""
    cfg = resolve_config(recipe, overrides={"train": {"precision": precision}})
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model(cfg.model.name)
    x, y = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    if hasattr(model, "init_whitening"):
        model.init_whitening(x)
    runtime.cast_model(model, cpu, precision)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    x = x.to(runtime.compute_dtype(precision)).contiguous(memory_format=torch.channels_last)
    autocast = runtime.autocast(cpu, precision, cache=False)  # as the CUDA-graph step runs it
    for _ in range(2):
        train_step(model, opt, x, y, cfg.train.label_smoothing, autocast)
    with OpCounter() as counter:
        train_step(model, opt, x, y, cfg.train.label_smoothing, autocast)
    return counter.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--recipes", nargs="+", default=["keras-book", "fast-muon"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "bf16-true"])
    args = ap.parse_args()
    print(f"{'recipe':<14}{'precision':<12}{'ops per step':>13}{'copies':>8}")
    for recipe in args.recipes:
        for precision in args.precisions:
            c = count_step(recipe, precision, args.batch)
            print(f"{recipe:<14}{precision:<12}{sum(c.values()):>13}{sum(c[k] for k in COPIES):>8}", flush=True)


if __name__ == "__main__":
    main()
