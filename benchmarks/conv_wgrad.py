"""Backward pass of the notebook's four convolutions on the CPU: PyTorch's kernels (oneDNN) against
cifarlab's own weight-gradient kernel (``cifarlab.cpu_kernels``) with PyTorch's input gradient.

Each layer's backward (input, weight and bias gradients; the first layer has no input gradient,
as in training) is timed with the caches flushed first, as in a training step where the layer's
input was written long before; PyTorch and cifarlab alternate within each round, so slow
phases of a shared machine hit both. Prints the median milliseconds and the weight-gradient
part's GFLOP/s; then each layer's forward pass and PyTorch's whole backward pass in GFLOP/s
beside a large float32 matrix product's, the rate the CPU reaches on dense arithmetic: where
the convolutions come near it, a faster float32 step needs fewer operations, not faster kernels.
Usage: python benchmarks/conv_wgrad.py [--batch 128] [--rounds 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cifarlab import cpu_kernels, runtime

LAYERS = [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16)]  # in channels, out channels, image side


def time_layer(ci: int, co: int, s: int, batch: int, rounds: int, flush: torch.Tensor) -> dict[str, float]:
    """Median milliseconds of each way of computing one layer's backward, caches flushed each time."""
    cl = torch.channels_last
    x = torch.randn(batch, ci, s, s).contiguous(memory_format=cl)
    w = torch.randn(co, ci, 3, 3).contiguous(memory_format=cl)
    gy = torch.randn(batch, co, s, s).contiguous(memory_format=cl)
    need_x = ci != 3  # the first layer's input is the image: no gradient wanted

    def aten(mask, bias_sizes):
        return torch.ops.aten.convolution_backward(gy, x, w, bias_sizes, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   mask)

    def ours():
        if need_x:
            aten([True, False, False], None)
        cpu_kernels.conv3x3_weight_grad(x, gy, bias=True)

    fns = {"forward": lambda: torch.ops.aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
           "pytorch": lambda: aten([need_x, True, True], [co]), "cifarlab": ours,
           "wgrad pytorch": lambda: aten([False, True, True], [co]),
           "wgrad cifarlab": lambda: cpu_kernels.conv3x3_weight_grad(x, gy, bias=True)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):
        for k, f in fns.items():
            flush.fill_(1.0)
            t0 = time.perf_counter()
            f()
            if r >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    runtime.setup("cpu", args.threads)
    if cpu_kernels.load() is None:
        raise SystemExit(f"cifarlab's kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    flush = torch.empty(64 << 18)  # 64 MiB, twice the development machine's L3
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; median ms of {args.rounds} rounds, caches flushed")
    tot = {"pytorch": 0.0, "cifarlab": 0.0}
    rates = []
    for ci, co, s in LAYERS:
        med = time_layer(ci, co, s, args.batch, args.rounds, flush)
        gflop = 2 * args.batch * s * s * ci * co * 9 / 1e9
        rates.append(((ci, co, s), gflop, med))
        tot["pytorch"] += med["pytorch"]
        tot["cifarlab"] += med["cifarlab"]
        print(f"conv {ci:>2} -> {co} on {s}x{s}: backward {med['pytorch']:5.1f} ms PyTorch, {med['cifarlab']:5.1f} ms "
              f"cifarlab ({med['pytorch'] / med['cifarlab']:.2f}x); weight gradient alone "
              f"{gflop / med['wgrad pytorch'] * 1000:.0f} against {gflop / med['wgrad cifarlab'] * 1000:.0f} GFLOP/s")
    print(f"all four: {tot['pytorch']:.1f} ms PyTorch, {tot['cifarlab']:.1f} ms cifarlab "
          f"({tot['pytorch'] / tot['cifarlab']:.2f}x)")
    for (ci, co, s), gflop, med in rates:
        back = gflop * (2 if ci != 3 else 1)  # input and weight gradients; the image needs no gradient
        print(f"conv {ci:>2} -> {co} on {s}x{s}: forward {gflop / med['forward'] * 1000:.0f} GFLOP/s, PyTorch's "
              f"backward {back / med['pytorch'] * 1000:.0f} GFLOP/s")
    print(f"a 2048 x 2048 float32 matrix product: {matmul_rate(args.rounds):.0f} GFLOP/s")


def matmul_rate(rounds: int, n: int = 2048) -> float:
    """GFLOP/s of a float32 ``n`` x ``n`` matrix product, median of ``rounds`` after one untimed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


if __name__ == "__main__":
    main()
