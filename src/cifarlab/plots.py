"""PNG plots (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fsutil import write_with


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and accuracy curves per epoch, training and (where there was one) validation, and,
    where the history logs it (a schedule, plateau cuts), the learning rate on a log scale."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    lr_keys = [k for k in ("learning_rate", "muon_learning_rate") if k in history[0]]
    fig, axes = plt.subplots(1, 3 if lr_keys else 2, figsize=(15 if lr_keys else 10, 4))
    a, b = axes[0], axes[1]
    a.plot(ep, [h["loss"] for h in history], "o-", label="train")
    b.plot(ep, [h["accuracy"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:  # absent when training used no validation split
        a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
        b.plot(ep, [h["val_accuracy"] for h in history], "o-", label="validation")
    if "val_balanced_accuracy" in history[0]:  # validation classes of unequal size
        b.plot(ep, [h["val_balanced_accuracy"] for h in history], "o--", label="validation, balanced")
    a.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    if lr_keys:
        c = axes[2]
        for k in lr_keys:  # each epoch's last rate; a log scale shows a plateau cut as a step
            c.plot(ep, [h[k] for h in history], "o-", label={"learning_rate": "lr", "muon_learning_rate": "muon lr"}[k])
        # a rate that decays to 0 has no logarithm: linear then
        c.set(xlabel="epoch", ylabel="learning rate", title="Learning rate",
              yscale="log" if all(h[k] > 0 for h in history for k in lr_keys) else "linear")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Confusion matrix heat map (rows: true class, columns: predicted)."""
    plt = _plt()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * k + 2), max(4, 0.6 * k + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    _save(fig, path)


def plot_reliability(bin_conf: np.ndarray, bin_acc: np.ndarray, bin_count: np.ndarray, ece: float, path: Path,
                     before: tuple[np.ndarray, float, str] | None = None) -> None:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal. ``before``
    (the bins' accuracies, the ECE, and what calibrated them, such as "temperature 1.5") adds
    the probabilities before calibration, as an outline."""
    plt = _plt()
    nb = len(bin_conf)
    edges = np.linspace(0, 1, nb + 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(edges[:-1], np.nan_to_num(bin_acc), width=1 / nb, align="edge", edgecolor="k", alpha=0.7,
           label="accuracy" if before is None else f"accuracy, {before[2]}")
    title = f"Reliability (ECE {ece:.3f})"
    if before is not None:
        acc = np.nan_to_num(np.asarray(before[0], float))
        ax.stairs(acc, edges, color="tab:orange", linewidth=1.5, label="uncalibrated")
        title = f"Reliability (ECE {ece:.3f}; {before[1]:.3f} uncalibrated)"
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    _save(fig, path)


def image_grid(images: np.ndarray, titles: list[str], path: Path, cols: int = 8) -> None:
    """A grid of uint8 images (N, H, W, C) with a title under each."""
    plt = _plt()
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = images[i]
            ax.imshow(im[:, :, 0] if im.shape[2] == 1 else im, cmap="gray" if im.shape[2] == 1 else None,
                      interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    _save(fig, path)


def plot_robustness(names: list[str], severities: list[int], accuracy: np.ndarray, clean: float, mean: float,
                    path: Path) -> None:
    """A heat map of ``accuracy`` (corruption ``names`` x ``severities``), each cell labelled,
    with the ``clean`` accuracy and the ``mean`` under corruption in the title."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(severities) + 3.5, 0.35 * len(names) + 1.6))
    top = max(clean, float(accuracy.max()))
    im = ax.imshow(accuracy, vmin=0, vmax=top, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(accuracy):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 * top else "black")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    ax.set_title(f"accuracy under corruption (clean {clean:.3f}, mean {mean:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def explanation_grid(images: np.ndarray, panels: list[list], path: Path, per_row: int = 4) -> None:
    """Each uint8 image (N, H, W, C) beside its attribution maps: ``panels[i]`` lists image
    ``i``'s cells, the first ``(None, title)`` (the image itself), then ``(map, title)`` with a
    map scaled to [0, 1] drawn over the image, or None for an empty cell; ``per_row`` images a
    row."""
    plt = _plt()
    cells = max(len(p) for p in panels)
    n = len(images)
    rows = max(1, int(np.ceil(n / per_row)))
    cols = cells * min(n, per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (im, cell_list) in enumerate(zip(images, panels)):
        grey = im.shape[2] == 1
        shown = im[:, :, 0] if grey else im
        for j, cell in enumerate(cell_list):
            if cell is None:
                continue
            heat, title = cell
            ax = axes[i // per_row, (i % per_row) * cells + j]
            ax.imshow(shown, cmap="gray" if grey else None, interpolation="nearest")
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7)
    _save(fig, path)


def plot_ood(inside: np.ndarray, sets: list[tuple[str, np.ndarray]], threshold: float, score: str,
             path: Path) -> None:
    """Histograms of an OOD score: the run's own test images filled, each other set as an
    outline, on shared bins spanning the middle 99% of all scores (the rest gathered into the
    end bins), with the threshold below which images are flagged."""
    plt = _plt()
    every = np.concatenate([inside] + [s for _, s in sets])
    lo, hi = np.percentile(every, [0.5, 99.5]) if len(every) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(np.clip(inside, lo, hi), bins, density=True, alpha=0.45, label="the run's test images")
    for name, s in sets:
        ax.hist(np.clip(s, lo, hi), bins, density=True, histtype="step", linewidth=1.5, label=name)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold (below: flagged)")
    ax.set(xlabel=f"{score} score (higher: more familiar; the outermost 0.5% at each end in the end bins)",
           ylabel="density", title="How familiar images look")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_colour_by_class(classes: list[str], splits: dict[str, list[float]], shortcut: list[float | None] | None,
                         path: Path) -> None:
    """Bars per class: the share of nearly grey images in each split of ``splits`` (name ->
    share per class) and, where given, the recall of the colour-only ``shortcut`` classifier."""
    plt = _plt()
    panels = 2 if shortcut is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(min(0.45 * len(classes), 40) * panels + 2, 3.6), squeeze=False)
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(splits))
    ax = axes[0, 0]
    for j, (name, shares) in enumerate(splits.items()):
        ax.bar(x + (j - (len(splits) - 1) / 2) * width, [np.nan if s is None else 100 * s for s in shares], width,
               label=name)
    ax.set_ylabel("nearly grey images (%)")
    ax.legend(fontsize=8)
    if shortcut is not None:
        ax = axes[0, 1]
        ax.bar(x, [np.nan if r is None else 100 * r for r in shortcut], 0.6, color="tab:gray")
        ax.set_ylabel("recalled from colour alone (%)")
    for ax in axes.flat:
        ax.set_xticks(x, classes, rotation=90 if len(classes) > 12 else 45, ha="right", fontsize=7)
    _save(fig, path)
