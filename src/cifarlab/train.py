"""The training loop: one step function, per-epoch checkpoints, exact resume, clean interrupts."""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import runtime
from .augment import CropFlipCutout, KerasAugment, augmenter_from_config
from .config import Config, load_run_config, save_config
from .data import Dataset, balanced_subset, load_dataset, stratified_split
from .errors import CifarlabError
from .export import preprocess, save_architecture, save_weights
from .fsutil import write_json, write_text
from .models import create_model
from .optim import build_optimizer

CHECKPOINT = "checkpoint.pt"


class TrainingInterrupted(CifarlabError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint."""


class NonFiniteLoss(CifarlabError):
    """The loss became NaN or infinite."""


@dataclass
class Arrays:
    """Training, validation and test images as uint8 (N, C, H, W) tensors on the device, with labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_arrays(cfg: Config, ds: Dataset, device: torch.device) -> Arrays:
    """Subset, split (seeded, stratified) and move the data to ``device`` once, as uint8.

    Keeping uint8 on the device (a quarter of float32's size) and converting per batch avoids a
    host-to-device copy every step: the whole CIFAR-10 training set is 150 MB.
    """
    idx = np.arange(len(ds.y_train))
    if cfg.data.subset:
        idx = balanced_subset(ds.y_train, cfg.data.subset, cfg.train.seed)
    tr, va = stratified_split(ds.y_train[idx], cfg.data.val_split, cfg.train.seed)
    tr, va = idx[tr], idx[va]

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().to(device)

    def lab(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64)).to(device)

    return Arrays(t(ds.x_train[tr]), lab(ds.y_train[tr]), t(ds.x_train[va]), lab(ds.y_train[va]),
                  t(ds.x_test), lab(ds.y_test))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a prepared batch; returns (summed loss, correct count) as
    device tensors, so the caller can accumulate without a GPU-to-CPU sync every step."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)  # categorical cross-entropy on softmax(logits), as Keras
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def evaluate_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: dict,
                    batch_size: int = 1000) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy and logits (on CPU) of ``model`` over uint8 images ``x``."""
    was = model.training
    model.eval()
    outs = [model(preprocess(x[i:i + batch_size], prep)) for i in range(0, len(x), batch_size)]
    model.train(was)
    logits = torch.cat(outs).float()
    loss = F.cross_entropy(logits, y).item()  # one sync per evaluation
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc, logits.cpu()


class _Interrupts:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is never taken
    in the middle of an optimizer update. A second signal stops at once."""

    def __init__(self) -> None:
        self.flag: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.flag is not None:
            raise KeyboardInterrupt
        self.flag = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)


def _new_run_dir(cfg: Config) -> Path:
    if cfg.train.out:
        run = Path(cfg.train.out)
        if run.exists() and not run.is_dir():
            raise CifarlabError(f"output '{run}' exists and is a file; give a folder path")
        if run.is_dir() and any(run.iterdir()) and not cfg.train.overwrite:
            raise CifarlabError(f"output folder '{run}' already exists and is not empty; choose another --out, "
                                "pass --overwrite to replace its files, or --resume it")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path("runs") / f"{cfg.recipe}-{cfg.model.name}-{stamp}"
        n = 1
        while run.exists():
            n += 1
            run = Path("runs") / f"{cfg.recipe}-{cfg.model.name}-{stamp}-{n}"
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CifarlabError(f"cannot create output folder '{run}': {e.strerror or e}") from None
    return run


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    # One generator per (seed, epoch): the data order and augmentation of an epoch do not depend
    # on what ran before it, which keeps resumed runs identical to uninterrupted ones.
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def _save_checkpoint(run: Path, state: dict) -> None:
    from .fsutil import write_with

    write_with(run / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(run: Path) -> dict:
    path = run / CHECKPOINT
    if not path.is_file():
        raise CifarlabError(f"'{run}' has no {CHECKPOINT} to resume from; it was not written by "
                            "'cifarlab train' or finished and was cleaned up")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise CifarlabError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def fit(cfg: Config | None = None, *, resume: str | Path | None = None, dataset: Dataset | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train per ``cfg`` (or resume the run folder ``resume``) and write the run folder.

    Returns the final metrics dict (also saved as ``metrics.json``).
    """
    ckpt = None
    if resume is not None:
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise CifarlabError(f"cannot resume '{run}': no config.yaml there; give a run folder written by "
                                "'cifarlab train'")
        cfg = load_run_config(run / "config.yaml")
        ckpt = _load_checkpoint(run)
    assert cfg is not None
    device = runtime.setup(cfg.train.device, cfg.train.threads, cfg.train.deterministic)
    runtime.seed_everything(cfg.train.seed)
    if resume is None:
        run = _new_run_dir(cfg)
        save_config(cfg, run / "config.yaml")
    ds = dataset if dataset is not None else load_dataset(
        cfg.data.data, cfg.data.dataset, allow_unverified=cfg.data.allow_unverified,
        label_mode=cfg.data.label_mode, skip_bad_images=cfg.data.skip_bad_images)
    for note in ds.notes:
        log(f"data: {note}")
    arrays = make_arrays(cfg, ds, device)
    c, h, w = arrays.x_train.shape[1:]
    model_kwargs = {"num_classes": ds.num_classes, "in_chans": int(c), "img_size": [int(h), int(w)]}
    model = create_model(cfg.model.name, **model_kwargs).to(device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    augmenter = augmenter_from_config(cfg.augment)
    prep: dict[str, Any] = {"rescale": 1 / 255, "mean": None, "std": None}
    if isinstance(augmenter, KerasAugment) and augmenter.featurewise_center:
        augmenter.fit(preprocess(arrays.x_train, prep))
        prep["mean"] = augmenter.mean.flatten().tolist()
        prep["std"] = augmenter.std.flatten().tolist() if augmenter.featurewise_std_normalization else None
        augmenter.featurewise_center = augmenter.featurewise_std_normalization = False  # applied by preprocess
    num_params = sum(p.numel() for p in model.parameters())
    save_architecture(run, cfg.model.name, model_kwargs, ds.classes, (int(c), int(h), int(w)), prep, num_params)

    history: list[dict[str, float]] = []
    start_epoch, start_step, train_time = 0, 0, 0.0
    partial = (0.0, 0.0, 0)
    aug_state = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        history = list(ckpt["history"])
        start_epoch, start_step, train_time = ckpt["epoch"], ckpt["step"], ckpt["train_time_s"]
        partial = (ckpt["partial_loss"], ckpt["partial_correct"], ckpt["partial_seen"])
        aug_state = ckpt.get("aug_state")
        log(f"resuming {run} at epoch {start_epoch + 1}, step {start_step}")
    log(f"run folder: {run}")
    log(f"model {cfg.model.name} ({num_params:,} parameters) on {device}; {len(arrays.x_train):,} training, "
        f"{len(arrays.x_val):,} validation, {len(arrays.x_test):,} test images")

    n = len(arrays.x_train)
    bs = cfg.train.batch_size
    steps = math.ceil(n / bs)
    interactive = sys.stderr.isatty()
    interrupts = _Interrupts()

    def checkpoint(epoch: int, step: int, sums: tuple, gen: torch.Generator | None) -> None:
        _save_checkpoint(run, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "epoch": epoch, "step": step, "history": history, "train_time_s": train_time,
            "partial_loss": float(sums[0]), "partial_correct": float(sums[1]), "partial_seen": int(sums[2]),
            "aug_state": gen.get_state() if gen is not None else None,
        })

    model.train()
    try:
        with interrupts.installed():
            for epoch in range(start_epoch, cfg.train.epochs):
                gen = _epoch_generator(cfg.train.seed, epoch, device)
                perm = torch.randperm(n, generator=_epoch_generator(cfg.train.seed, epoch, torch.device("cpu")))
                perm = perm.to(device)
                first = start_step if epoch == start_epoch else 0
                if first and aug_state is not None:
                    gen.set_state(aug_state)
                loss_sum = torch.tensor(partial[0] if first else 0.0, device=device, dtype=torch.float64)
                correct = torch.tensor(partial[1] if first else 0.0, device=device, dtype=torch.float64)
                seen = partial[2] if first else 0
                bar = tqdm(total=steps, initial=first, desc=f"Epoch {epoch + 1}/{cfg.train.epochs}",
                           disable=not interactive, leave=False, unit="step")
                t0 = _Clock(device)
                for step in range(first, steps):
                    idx = perm[step * bs:(step + 1) * bs]
                    x = preprocess(arrays.x_train[idx], prep)
                    if isinstance(augmenter, KerasAugment):
                        x = augmenter(x, gen)
                    elif isinstance(augmenter, CropFlipCutout):
                        x = augmenter(x, gen)
                    x = x.contiguous(memory_format=fmt)
                    y = arrays.y_train[idx]
                    l_sum, corr = train_step(model, optimizer, x, y)
                    if device.type == "cpu" and not math.isfinite(l_sum.item()):  # free on CPU: no device sync
                        raise NonFiniteLoss(_nan_message(epoch, step, cfg))
                    loss_sum += l_sum
                    correct += corr
                    seen += len(y)
                    bar.update(1)
                    if interactive and step % 50 == 0:  # GPU sync, only for the live progress bar
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
                    if interrupts.flag:
                        train_time += t0.elapsed()
                        checkpoint(epoch, step + 1, (loss_sum.item(), correct.item(), seen), gen)
                        raise TrainingInterrupted(
                            f"training stopped by {interrupts.flag} at epoch {epoch + 1}, step {step + 1}; "
                            f"a checkpoint was saved. Resume with: cifarlab train --resume {run}")
                train_time += t0.elapsed()
                bar.close()
                tr_loss, tr_acc = loss_sum.item() / seen, correct.item() / seen  # one sync per epoch
                if not math.isfinite(tr_loss):
                    raise NonFiniteLoss(_nan_message(epoch, None, cfg))
                v_loss, v_acc, _ = evaluate_arrays(model, arrays.x_val, arrays.y_val, prep)
                history.append({"epoch": epoch + 1, "loss": tr_loss, "accuracy": tr_acc, "val_loss": v_loss,
                                "val_accuracy": v_acc, "train_time_s": train_time})
                log(f"Epoch {epoch + 1}/{cfg.train.epochs} - {train_time:.1f}s - loss: {tr_loss:.4f} - "
                    f"accuracy: {tr_acc:.4f} - val_loss: {v_loss:.4f} - val_accuracy: {v_acc:.4f}")
                checkpoint(epoch + 1, 0, (0.0, 0.0, 0), None)
    except torch.cuda.OutOfMemoryError:
        raise CifarlabError(f"the GPU ran out of memory with batch size {bs}; try a smaller one, for example "
                            f"--batch-size {max(1, bs // 2)}") from None

    t_loss, t_acc, logits = evaluate_arrays(model, arrays.x_test, arrays.y_test, prep)
    y_test = arrays.y_test.cpu().numpy()
    pred = logits.argmax(1).numpy()
    per_class = {cls: float((pred[y_test == i] == i).mean()) if (y_test == i).any() else None
                 for i, cls in enumerate(ds.classes)}
    save_weights(run / "weights.safetensors", model)
    write_history(run, history)
    metrics = {"test_loss": t_loss, "test_accuracy": t_acc, "per_class_accuracy": per_class,
               "train_time_s": train_time, "epochs": cfg.train.epochs, "num_params": num_params,
               "data": {"source": ds.source, "kind": ds.kind, "train_images": len(arrays.x_train),
                        "val_images": len(arrays.x_val), "test_images": len(arrays.x_test)},
               "device": str(device), "versions": runtime.versions()}
    write_json(run / "metrics.json", metrics)
    log(f"Test score: {t_loss:.4f}")
    log(f"Test accuracy: {t_acc:.4f}")
    metrics["run"] = str(run)
    return metrics


class _Clock:
    """Training-time clock: CUDA events on the GPU (no sync until read), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()  # sync: once per epoch
            return self.start.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.t0


def _nan_message(epoch: int, step: int | None, cfg: Config) -> str:
    where = f"epoch {epoch + 1}, step {step + 1}" if step is not None else f"epoch {epoch + 1}"
    return (f"the training loss became NaN or infinite at {where}. The usual cause is a learning rate too high "
            f"for this model (now {cfg.optim.lr:g}); try --lr {cfg.optim.lr / 10:g}. The checkpoint of the last "
            "completed epoch is kept.")


def write_history(run: Path, history: list[dict[str, float]]) -> None:
    """Save the history as JSON, CSV and a PNG of the loss and accuracy curves."""
    from .export import list_to_csv_rows
    from .plots import plot_history

    write_json(run / "history.json", history)
    write_text(run / "history.csv", list_to_csv_rows(history))
    if history:
        plot_history(history, run / "history.png")
