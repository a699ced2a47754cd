"""``cifarlab train --lr-find``: the learning-rate range test.

Smith (2017, "Cyclical learning rates for training neural networks", section 3.3) trains for a
short while with the learning rate rising from very small to very large and watches the loss:
it first barely moves, then falls, then blows up. fastai's ``lr_find`` and Lightning's
``Tuner.lr_find`` made it a habit: a geometric sweep over a hundred steps or so, a smoothed loss, a
stop once it passes four times its best, and a suggested rate on the falling part of the curve.
Here it runs the run's own config (model, optimizer, batch, augmentation, precision, the
weights of ``--init-from``) through the training step, so the suggestion is for that recipe;
the run's schedule, lookahead, plateau cuts and early stopping are left out, since the test sets
the rate itself. It suggests; a short ``--sweep lr=...`` around the suggestion decides.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import Config, save_config, validate
from .errors import CifarlabError

DIVERGE = 4.0  # stop once the smoothed loss passes this many times its best (fastai's and Lightning's rule)
# ... or this many nats, where lower: the noise of a loss near zero (a test from --init-from weights
# that already fit the data) passes four times its best at once and would end the test at step 2
LOSS_FLOOR = 0.1
BETA = 0.98  # the divergence stop's exponential smoothing (as fastai and Lightning), bias-corrected
MIN_POINTS = 10  # steps the curve needs before it suggests anything
# A smaller fall of the averaged loss below its start than this share cannot tell the rates apart
# (keras-book from scratch on CIFAR-10: 1.8% at the default 200 steps; 7.5% at 600 steps)
MIN_FALL = 0.05


def diverged(smoothed: float, best: float) -> bool:
    """Whether the smoothed loss has blown up: past :data:`DIVERGE` times its lowest so far, or
    times :data:`LOSS_FLOOR` where the lowest is below that."""
    return smoothed > DIVERGE * max(best, LOSS_FLOOR)


def check_options(lr_min: float, lr_max: float, steps: int) -> None:
    """A clear error for a range that is not 0 < min < max, or fewer than 2 steps."""
    if not (math.isfinite(lr_min) and math.isfinite(lr_max) and 0 < lr_min < lr_max):
        raise CifarlabError(f"--lr-range {lr_min:g},{lr_max:g} is not valid; give MIN,MAX with 0 < MIN < MAX, such "
                            "as 1e-7,10")
    if steps < MIN_POINTS:
        raise CifarlabError(f"--lr-find-steps {steps} is not valid; give at least {MIN_POINTS} (200 is the default)")


def parse_range(text: str) -> tuple[float, float]:
    """``MIN,MAX`` as two floats, checked later by :func:`check_options`."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise CifarlabError(f"--lr-range '{text}' is not valid; give MIN,MAX, such as 1e-7,10") from None


def rates(lr_min: float, lr_max: float, steps: int) -> np.ndarray:
    """The ``steps`` learning rates of the test, geometric from ``lr_min`` to ``lr_max``."""
    return np.geomspace(lr_min, lr_max, steps)


def ema_step(avg: float, loss: float, k: int, beta: float = BETA) -> tuple[float, float]:
    """One step of :func:`smooth`: the running average after the ``k``-th (1-based) ``loss``, and
    that average bias-corrected."""
    avg = beta * avg + (1 - beta) * loss
    return avg, avg / (1 - beta ** k)


def smooth(losses: list[float] | np.ndarray, beta: float = BETA) -> np.ndarray:
    """The exponential moving average of ``losses`` with weight ``beta`` on the past, divided by
    1 - beta^k so that the first values are not pulled towards zero."""
    out, avg = [], 0.0
    for k, loss in enumerate(losses, 1):
        avg, corrected = ema_step(avg, loss, k, beta)
        out.append(corrected)
    return np.array(out)


def centred(losses: list[float] | np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """``losses`` averaged over a centred window of half a decade of rates (at least 3 steps,
    narrower at the ends). The exponential average that stops the test lags: at beta 0.98 by
    about 50 steps, two decades of a 200-step test, which put its lowest point at 0.17 where
    ResNet-20's raw losses were lowest near 0.03 on CIFAR-10. A centred window does not lag."""
    losses = np.asarray(losses, float)
    n = len(losses)
    if n < 2:
        return losses.copy()
    per_decade = (n - 1) / max(np.log10(lrs[n - 1] / lrs[0]), 1e-12)
    half = max(1, int(round(per_decade / 4)))
    return np.array([losses[max(0, i - half):i + half + 1].mean() for i in range(n)])


def longest_fall(values: np.ndarray) -> tuple[int, int]:
    """The first and last index of the longest strictly decreasing subsequence of ``values``
    (of several, the one that starts latest): the longest stretch of the curve along which the
    loss keeps falling, small bumps skipped."""
    n = len(values)
    length, first = np.ones(n, int), np.arange(n)
    for i in range(1, n):
        lower = np.flatnonzero(values[:i] > values[i])
        if len(lower):
            # the longest chain this point can extend; of equally long ones, the one that starts
            # latest, so that a flat stretch before the fall is not counted as falling
            longest = lower[length[lower] == length[lower].max()]
            j = longest[np.argmax(first[longest])]
            length[i], first[i] = length[j] + 1, first[j]
    end = int(np.argmax(length))
    return int(first[end]), end


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> dict[str, Any] | None:
    """Two readings of the smoothed loss (:func:`centred`) against the rate: ``valley``, the
    rate halfway (on the log scale) along the longest stretch over which the loss keeps falling (fastai's "valley"
    rule, 2021), and ``min_over_10``, a tenth of the rate at the lowest loss (fastai's older
    rule); and ``fall``, the share by which the lowest smoothed loss is below the first, too small
    to read below :data:`MIN_FALL`. None where fewer than :data:`MIN_POINTS` steps ran."""
    if len(smoothed) < MIN_POINTS:
        return None
    start, end = longest_fall(smoothed)
    mid = (start + end) // 2
    low = int(np.argmin(smoothed))
    first = float(smoothed[0])
    return {"valley": float(lrs[mid]), "valley_from": float(lrs[start]), "valley_to": float(lrs[end]),
            "min_loss_lr": float(lrs[low]), "min_loss": float(smoothed[low]), "min_over_10": float(lrs[low] / 10),
            "first_loss": first, "fall": (first - float(smoothed[low])) / first if first > 0 else 0.0}


def plot(result: dict[str, Any], path: Path) -> None:
    """The loss against the rate (log scale), raw and smoothed, with the suggestions and the
    config's own rate marked."""
    from .plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs, raw, sm = result["lrs"], result["losses"], result["smoothed"]
    ax.plot(lrs, raw, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, sm, color="tab:blue", label="smoothed loss")
    s = result["suggestion"]
    if s:
        ax.axvspan(s["valley_from"], s["valley_to"], color="tab:red", alpha=0.08, label="longest fall")
        ax.axvline(s["valley"], color="tab:red", linestyle="--", label=f"valley {s['valley']:.2g}")
        ax.axvline(s["min_loss_lr"], color="tab:green", label=f"lowest loss {s['min_loss_lr']:.2g}")
        ax.axvline(s["min_over_10"], color="tab:green", linestyle=":", label=f"lowest / 10 {s['min_over_10']:.2g}")
    ax.axvline(result["config_lr"], color="0.3", linestyle="-.", label=f"config's lr {result['config_lr']:.2g}")
    finite = [v for v in sm if math.isfinite(v)]
    if finite:  # the blow-up at the end would squash the rest of the curve
        top = min(max(finite), 2 * finite[0])
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), top + 0.05 * abs(top))
    ax.set(xscale="log", xlabel="learning rate (optim.lr)", ylabel="training loss",
           title="Learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def find_lr(cfg: Config, lr_min: float = 1e-7, lr_max: float = 10.0, steps: int = 200, dataset=None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the range test on ``cfg``'s model, optimizer and data (``dataset`` where given) and
    write ``config.yaml``, ``lr_find.json``, ``lr_find.csv`` and ``lr_find.png`` into a new
    folder, ``cfg.train.out`` or ``runs/lr-find-<recipe>-<model>-<time>``. Every parameter
    group's rate is its configured one times lr / ``optim.lr`` (Muon's filters keep their ratio
    to the other weights). Returns the figures, as ``lr_find.json`` holds them, with ``folder``."""
    from . import runtime
    from .export import list_to_csv_rows
    from .fsutil import new_run_folder, undo_on_failure, write_json, write_text
    from .train import (_build, _Loop, _load_data, _read_start, _use_cpu_kernels, make_arrays, resolve_precision,
                        steps_per_epoch)

    validate(cfg)
    check_options(lr_min, lr_max, steps)
    if cfg.train.runs > 1:
        raise CifarlabError(f"--lr-find tests one run's config; --runs {cfg.train.runs} is for training (drop it)")
    cfg = copy.deepcopy(cfg)
    if cfg.train.cuda_graph:  # a CUDA graph fixes the rate it was captured with; the test changes it every step
        log("the range test steps eagerly: --cuda-graph would fix the learning rate")
        cfg.train.cuda_graph = False
    device = runtime.setup(cfg.train.device, cfg.train.threads, cfg.train.deterministic)
    cfg = resolve_precision(cfg, device, log)
    runtime.check_device_options(device, cfg.train.precision, cfg.train.cuda_graph)
    runtime.seed_everything(cfg.train.seed)
    start = _read_start(cfg) if cfg.model.init_from else None
    folder, before = new_run_folder(cfg.train.out, cfg.train.overwrite, f"lr-find-{cfg.recipe}-{cfg.model.name}",
                                    "choose another --out, or pass --overwrite to replace its files")
    with undo_on_failure(folder, before):
        save_config(cfg, folder / "config.yaml")
        ds = _load_data(cfg, dataset, log)
        arrays = make_arrays(cfg, ds, device)
        per_epoch = steps_per_epoch(len(arrays.x_train), cfg)
        if per_epoch == 0:
            raise CifarlabError(f"no full batch of {cfg.train.batch_size} in {len(arrays.x_train)} training images; "
                                "use a smaller --batch-size")
        kernels = _use_cpu_kernels(cfg, device, log)
        st = _build(cfg, ds, arrays, device, per_epoch, kernels, start)
        loop = _Loop(cfg, folder, st, arrays, device, per_epoch, kernels)
        lrs = rates(lr_min, lr_max, steps)
        log(f"lr range test: {cfg.model.name}, {cfg.optim.name}, batch {cfg.train.batch_size}, {steps} steps from "
            f"lr {lr_min:g} to {lr_max:g} (optim.lr is {cfg.optim.lr:g}); {len(arrays.x_train):,} training images")
        losses, stop = _run_steps(cfg, loop, lrs, device)
        kept = lrs[:len(losses)]
        smoothed = centred(losses, kept)
        result = {"config_lr": cfg.optim.lr, "optimizer": cfg.optim.name, "model": cfg.model.name,
                  "batch_size": cfg.train.batch_size, "range": [lr_min, lr_max], "steps": steps,
                  "steps_run": len(losses), "stopped": stop, "lrs": kept.tolist(), "losses": losses,
                  "smoothed": smoothed.tolist(), "suggestion": suggest(kept, smoothed),
                  "method": {"smoothing": "mean over a centred half decade of rates",
                             "stop": f"exponential average (beta {BETA}) above {DIVERGE:g} times its lowest, "
                                     f"or {DIVERGE * LOSS_FLOOR:g} where that is more"}}
        write_json(folder / "lr_find.json", result)
        write_text(folder / "lr_find.csv", list_to_csv_rows(
            [{"step": i + 1, "lr": lr, "loss": lo, "smoothed_loss": s}
             for i, (lr, lo, s) in enumerate(zip(kept.tolist(), losses, smoothed.tolist()))]))
        plot(result, folder / "lr_find.png")
    return {**result, "folder": str(folder)}


def _run_steps(cfg: Config, loop, lrs: np.ndarray, device) -> tuple[list[float], str | None]:
    """Train ``loop``'s model (a :class:`cifarlab.train._Loop`) one step at each rate of
    ``lrs``, its batches drawn as training draws them, until the loss blows up; returns each
    step's loss and why it stopped early (None where it did not)."""
    import torch

    from .train import _epoch_generator, epoch_order

    st, arrays, bs = loop.st, loop.arrays, cfg.train.batch_size
    base = [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in st.optimizer.param_groups]
    losses: list[float] = []
    best, avg, order, gen = math.inf, 0.0, None, None
    st.model.train()
    for k, lr in enumerate(lrs):
        epoch, step = divmod(k, loop.steps)
        if step == 0:  # each epoch of the test draws its order and augmentation as training's would
            gen = _epoch_generator(cfg.train.seed, epoch, device)
            order = epoch_order(arrays.y_train, cfg.train.sampling,
                                _epoch_generator(cfg.train.seed, epoch, torch.device("cpu"))).to(device)
        for g, b in zip(st.optimizer.param_groups, base):
            g["lr"] = b * lr / cfg.optim.lr
        x, y = loop.batch(order[step * bs:(step + 1) * bs], gen, epoch)
        x, mix = loop.mixed(x, y, epoch, step)
        l_sum, _ = loop.step_fn(x, y, **mix)
        loss = l_sum.item() / len(y)  # a GPU-to-CPU sync every step: the test's output is each step's loss
        if not math.isfinite(loss):
            return losses, f"the loss became {loss} at lr {lr:.3g}"
        losses.append(loss)
        avg, sm = ema_step(avg, loss, len(losses))  # smooth()'s last value, one step at a time
        best = min(best, sm)
        if diverged(sm, best):
            return losses, f"the smoothed loss passed {DIVERGE:g} times its lowest (or {DIVERGE * LOSS_FLOOR:g}) at " \
                           f"lr {lr:.3g}"
    return losses, None


def format_result(r: dict[str, Any]) -> str:
    """The test's outcome, for the terminal."""
    lines = [f"{r['steps_run']} of {r['steps']} steps" + (f"; stopped early: {r['stopped']}" if r["stopped"] else "")]
    s = r["suggestion"]
    if s is None:
        lines.append("too few steps ran to suggest a rate: try a smaller --lr-range maximum, or more --lr-find-steps")
    else:
        lines.append(f"lowest loss {s['min_loss']:.4f} at lr {s['min_loss_lr']:.3g}; a tenth of that, "
                     f"{s['min_over_10']:.3g} (fastai's older rule); the loss fell longest from lr "
                     f"{s['valley_from']:.3g} to {s['valley_to']:.3g}, halfway {s['valley']:.3g} (fastai's valley); "
                     f"the config's lr is {r['config_lr']:.3g}")
        if s["fall"] < MIN_FALL:
            lines.append(f"warning: the averaged loss fell only {s['fall']:.1%} below where it started "
                         f"({s['first_loss']:.4f} to {s['min_loss']:.4f}): too little to tell the rates apart, so "
                         f"these readings rest mostly on noise (the model may not have begun to learn); more "
                         f"--lr-find-steps than {r['steps']} give each rate more steps")
        lo, hi = s["min_over_10"], s["min_loss_lr"]
        lines.append(f"suggestions, not answers: compare rates in short runs, such as --sweep "
                     f"\"lr={lo:.2g},{math.sqrt(lo * hi):.2g},{hi:.2g}\"")
    lines.append(f"curve in {Path(r['folder']) / 'lr_find.png'} (figures in lr_find.json, lr_find.csv)")
    return "\n".join(lines)
