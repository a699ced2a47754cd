"""Time one keras-deep training epoch (the notebook's 40,000 images, batch 128) on the CPU.

Uses the same step as ``cifarlab train`` (preprocess, channels-last, ``train_step``) and prints
the median step time and the whole epoch's time. Usage:
    python benchmarks/cpu_epoch.py [--images 40000] [--threads N] [--no-channels-last] [--no-cpu-kernels]
        [--conv-kernel auto|on|off] [--no-pool-kernel] [--no-optimizer-kernel]
        [--recipe NAME] [--precision fp32|bf16|auto] [--compile]

``--conv-kernel`` overrules the CPU's choice of cifarlab's convolution weight-gradient kernel
(``auto``: on where the CPU lacks AVX-512, as training chooses), to time both on one machine;
``--no-pool-kernel`` leaves ReLU and max pooling to PyTorch, and ``--no-optimizer-kernel`` the
RMSprop update, to time what each of those kernels saves. ``--recipe`` times another recipe's
step (its model, batch size, optimizer and label smoothing; no augmentation) and ``--precision``
another precision (``auto`` as training resolves it on this CPU). ``--compile`` times the model
compiled with ``torch.compile`` (default mode), as ``cifarlab train --compile`` runs it: without
cifarlab's kernels; its first step, which compiles, is printed apart.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from bench_common import cpu_line, timed_epoch, training_images

from cifarlab import runtime
from cifarlab.config import resolve_config
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--recipe", default="keras-book", help="the recipe whose step is timed (default: keras-book)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="model (default: the recipe's)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                    help="fp32, bf16 autocast, or auto as training resolves it on this CPU")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--no-cpu-kernels", action="store_true", help="PyTorch's kernels only")
    ap.add_argument("--conv-kernel", choices=["auto", "on", "off"], default="auto",
                    help="cifarlab's convolution weight-gradient kernel (auto: where it pays off)")
    ap.add_argument("--no-pool-kernel", action="store_true", help="ReLU and max pooling by PyTorch's kernels")
    ap.add_argument("--no-optimizer-kernel", action="store_true", help="RMSprop by PyTorch's multi-tensor ops")
    ap.add_argument("--compile", action="store_true",
                    help="the model compiled by torch.compile, without cifarlab's kernels (as train --compile)")
    args = ap.parse_args()
    device = runtime.setup("cpu", args.threads)
    runtime.seed_everything(0)
    cfg = resolve_config(args.recipe)
    args.model = args.model or cfg.model.name
    args.batch = args.batch or cfg.train.batch_size
    precision = runtime.resolve_precision(device, args.precision)
    x, y, src = training_images(args.images)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))
    fmt = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = create_model(args.model).to(memory_format=fmt).train()
    no_kernels = args.no_cpu_kernels or args.compile  # training leaves them out of compiled runs too
    opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim,
                          cpu_kernels=not (no_kernels or args.no_optimizer_kernel))
    print(cpu_line())
    conv = {"auto": None, "on": True, "off": False}[args.conv_kernel]
    steps, epoch = timed_epoch(runtime.maybe_compile(model, args.compile), opt, xt, yt, args.batch, fmt,
                               kernels=False if no_kernels else None,
                               conv_kernel=conv, pool_kernel=not args.no_pool_kernel,
                               autocast=runtime.autocast(device, precision),
                               label_smoothing=cfg.train.label_smoothing)
    kernels = ("PyTorch's kernels" if no_kernels else
               f"conv kernel {args.conv_kernel}, ReLU-pool kernel {'off' if args.no_pool_kernel else 'on'}, "
               + (f"RMSprop kernel {'off' if args.no_optimizer_kernel else 'on'}" if cfg.optim.name == "rmsprop"
                  else f"optimizer {cfg.optim.name}"))
    if args.compile:  # the first step compiles: the median leaves it out, the epoch does not
        kernels += f", compiled (first step {steps[0]:.1f} s)"
        steps = steps[1:] or steps
    print(f"{args.recipe}'s step, {args.model}, {precision}, {src}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, "
          f"{'NCHW' if args.no_channels_last else 'channels-last'}, {kernels}: epoch {epoch:.1f} s, "
          f"median step {statistics.median(steps) * 1000:.0f} ms over {len(steps)} steps")


if __name__ == "__main__":
    main()
