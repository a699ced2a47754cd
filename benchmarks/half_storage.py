"""What half-precision weights do to a recipe's accuracy, measured on the CPU.

``--precision fp16-true`` keeps weights, gradients and optimizer state in float16 and needs
CUDA (float16 convolutions run more than a hundred times slower than float32 on a CPU). This script
keeps the *storage* in half precision and the arithmetic in float32, which isolates the
effect that decides whether a small-learning-rate recipe survives half-precision weights:
updates rounded away against the weights' rounding step, and optimizer state (RMSprop's mean
square) underflowing. Each step:

1. the float32 model gets an exact upcast of the half-precision master weights;
2. forward and backward run in float32 on the loss times the static loss scale
   (:func:`cifarlab.runtime.loss_scale`), as ``fp16-true`` trains;
3. the gradients are rounded to the storage dtype and unscaled there;
4. the recipe's optimizer updates the half-precision masters, its state in that dtype.

What it leaves out: the rounding of activations and of intermediate gradients inside the
backward pass (a real fp16 backward rounds at every layer). Its figure is a preview, not the
GPU's. Every storage dtype trains on the same seed, split, batches and dropout masks, so the
runs are paired. Usage:

    python benchmarks/half_storage.py --recipe keras-book --storage fp32 fp16 bf16 [--subset N] [--epochs E]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import SHARED

from cifarlab import cpu_kernels, runtime
from cifarlab.config import Config
from cifarlab.data import load_dataset
from cifarlab.export import preprocess
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer
from cifarlab.recipes import apply_recipe
from cifarlab.train import _epoch_generator, evaluate_arrays, make_arrays, train_step

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HalfStorage:
    """An optimizer front for ``train_step``: ``step`` rounds the float32 model's (loss-scaled)
    gradients to ``dtype``, unscales them there, lets ``inner`` update half-precision master
    copies of the weights and copies the result back into the model (an exact upcast)."""

    def __init__(self, model: torch.nn.Module, cfg, dtype: torch.dtype, scale: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().to(dtype) for p in self.params]
        with torch.no_grad():  # start from weights the storage dtype can hold
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        self.inner = build_optimizer(self.masters, cfg)
        self.dtype, self.scale = dtype, scale

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - as torch.optim.Optimizer's
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:  # noqa: D102 - see the class docstring
        for p, m in zip(self.params, self.masters):
            # The gradient of the scaled loss (exact in float32: a power of two), as fp16-true's backward ends.
            m.grad = (p.grad * self.scale).to(self.dtype)
        torch._foreach_mul_([m.grad for m in self.masters], 1 / self.scale)  # in the storage dtype
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)


def train(cfg: Config, ds, storage: str, log) -> dict:
    """Train ``cfg`` with ``storage``-precision weights and optimizer state; return its figures."""
    device = torch.device("cpu")
    runtime.seed_everything(cfg.train.seed)
    arrays = make_arrays(cfg, ds, device)
    model = create_model(cfg.model.name, num_classes=ds.num_classes).to(memory_format=torch.channels_last).train()
    scale = runtime.loss_scale("fp16-true" if storage == "fp16" else "fp32", cfg.train.batch_size)
    kernels = cpu_kernels.load() is not None
    opt = HalfStorage(model, cfg.optim, DTYPES[storage], scale) if storage != "fp32" else build_optimizer(
        [p for p in model.parameters() if p.requires_grad], cfg.optim, cpu_kernels=kernels)
    step_model = cpu_kernels.fuse(model) if kernels else model  # as training's step runs it
    prep = {"rescale": 1 / 255}
    n, bs = len(arrays.y_train), cfg.train.batch_size
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        gen = _epoch_generator(cfg.train.seed, epoch, device)
        perm = torch.randperm(n, generator=gen)
        total = torch.zeros(())
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            x = preprocess(arrays.x_train[idx], prep).contiguous(memory_format=torch.channels_last)
            loss, _ = train_step(step_model, opt, x, arrays.y_train[idx], cpu_kernels=kernels)
            total += loss
        log(f"{storage} epoch {epoch + 1}: loss {total.item() / n:.4f} ({time.perf_counter() - t0:.0f} s)")
    loss, acc, _ = evaluate_arrays(model, arrays.x_test, arrays.y_test, prep, channels_last=True)
    return {"storage": storage, "test_loss": loss, "test_accuracy": acc, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="keras-book")
    ap.add_argument("--storage", nargs="+", default=["fp32", "fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--subset", type=int, default=None, help="class-balanced training subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(SHARED))
    args = ap.parse_args()
    cfg = apply_recipe(Config(), args.recipe)
    if cfg.optim.schedule != "constant" or cfg.augment.preset != "none" or cfg.data.normalize:
        raise SystemExit(f"recipe '{args.recipe}' is not valid here: this script trains a constant learning rate "
                         "without augmentation or normalisation (keras-book)")
    cfg.train.seed, cfg.data.subset = args.seed, args.subset
    if args.epochs:
        cfg.train.epochs = args.epochs
    runtime.setup("cpu")
    ds = load_dataset(args.data)
    rows = [train(cfg, ds, s, print) for s in args.storage]
    print(f"{args.recipe}, {cfg.train.epochs} epochs, seed {args.seed}, {ds.source}"
          f"{f', subset {args.subset}' if args.subset else ''}; test accuracy without TTA:")
    for r in rows:
        print(f"  {r['storage']:>5} storage: test accuracy {r['test_accuracy']:.4f}, loss {r['test_loss']:.4f}, "
              f"{r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
