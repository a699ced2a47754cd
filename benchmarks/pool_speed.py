"""Time 2x2 max pooling, forward and backward, on the fast recipes' feature maps (CUDA):
PyTorch's ``max_pool2d`` against cifarlab's ``MaxPool2x2`` kernels, bf16, channels-last.

    python benchmarks/pool_speed.py [--batch 2000] [--repeats 20]

Prints the median time per call of each, from CUDA events, for each map shape.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from cifarlab.models.speed import _MaxPool2x2Fn

# speednet's pooled maps: (channels, size) after each group's first convolution
SHAPES = ((64, 32), (256, 16), (256, 8))


def time_ms(fn, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of forward + backward of ``fn`` on ``x``."""
    g = None
    times = []
    for k in range(repeats + 3):  # three untimed calls first
        xx = x.detach().requires_grad_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn(xx)
        g = torch.ones_like(y) if g is None else g
        y.backward(g)
        end.record()
        end.synchronize()
        if k >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pool_speed.py times CUDA kernels; no CUDA device here")
    for c, s in SHAPES:
        x = torch.randn(args.batch, c, s, s, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        ours = time_ms(_MaxPool2x2Fn.apply, x, args.repeats)
        theirs = time_ms(lambda t: F.max_pool2d(t, 2), x, args.repeats)
        print(f"{args.batch}x{c}x{s}x{s} bf16 channels-last, forward + backward: PyTorch {theirs:.3f} ms, "
              f"cifarlab {ours:.3f} ms ({theirs / ours:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
