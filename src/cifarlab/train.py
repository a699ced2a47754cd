"""The training loop: one step function, per-epoch checkpoints, exact resume, clean interrupts."""

from __future__ import annotations

import copy
import functools
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import cpu_kernels as kernels
from . import runtime
from .augment import CropFlipCutout, KerasAugment, augmenter_from_config, draw_mix, mix_batch
from .augment_policy import OPS, PolicyAugment, policy_from_config
from .config import MONITORS, Config, load_run_config, save_config, unused_settings, validate
from .data import Dataset, balanced_subset, load_dataset, only_classes, resized, seen, stratified_split, subset_note
from .datasheet import people_classes, people_warning
from .errors import CifarlabError, TrainingInterrupted, short_list
from .evaluate import balanced_accuracy, describe, unequal_classes
from .export import batched_logits, finished_metrics, normalize, preprocess, save_architecture, save_weights
from .fsutil import new_run_folder, read_json, undo_on_failure, write_json, write_text
from .losses import class_weights, cross_entropy, distillation_loss, logit_offsets
from .models import classifier_tensors, create_model
from .optim import build_optimizer, param_groups
from .selection import HardExampleSelector, kept_count

CHECKPOINT = "checkpoint.pt"
MIX_STREAM = 0x6D6978  # "mix": seeds the MixUp / CutMix draws apart from the run's other random streams


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


def split_indices(cfg: Config, y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indices into ``y_train`` of a run's training and validation images: ``data.subset``
    then ``data.val_split``, both seeded by ``data.split_seed`` (default ``train.seed``), so a
    run's folder (its config.yaml) names its validation images for as long as its data stays
    the same."""
    seed = cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed
    idx = np.arange(len(y_train))
    if cfg.data.subset:
        idx = balanced_subset(y_train, cfg.data.subset, seed)
    if not cfg.data.val_split:  # no validation: train on every image (the speed recipes, as airbench)
        return idx, idx[:0]
    tr, va = stratified_split(y_train[idx], cfg.data.val_split, seed)
    return idx[tr], idx[va]


def run_split(run: Path, ds: Dataset) -> tuple[Config, np.ndarray, np.ndarray]:
    """The config of ``run`` (a folder with config.yaml) and the indices into ``ds``'s training
    split of the images it trained on and of those it validated on, chosen again as its training
    chose them (:func:`split_indices`); refused where ``ds`` is not the data it was trained on
    (other image counts, or other images per class, than its metrics.json records). Validation
    images that the weights it started from (``--init-from``) learnt from are left out
    (:func:`cifarlab.data.seen.inherited_rows`), as training left them out
    (:func:`make_arrays`): its own weights carry what they learnt, so those images would
    flatter its calibration, its thresholds and its label checks."""
    cfg = load_run_config(run / "config.yaml")
    if len(ds.y_train) == 0:
        raise CifarlabError(f"{ds.source} ({ds.kind}) holds test images only, not the images '{run}' trained and "
                            "validated on; give the data it was trained on with --data")
    tr, va = split_indices(cfg, ds.y_train)
    fresh = va[~np.isin(va, seen.inherited_rows(run, ds.x_train, va))]  # in the order drawn
    metrics = read_json(run / "metrics.json", absent={})
    data = metrics.get("data", {})
    want = (data.get("train_images"), data.get("val_images"))
    # validated on: the split as drawn less what the starting weights learnt from (as make_arrays
    # leaves them out), or all of it (runs of an older cifarlab, which did not)
    if None not in want and want not in ((len(tr), len(fresh)), (len(tr), len(va))):
        raise CifarlabError(f"'{run}' trained on {want[0]:,} images and validated on {want[1]:,}, but this data "
                            f"splits into {len(tr):,} and {len(fresh):,}: it is not the data the run was trained on "
                            f"('{data.get('source')}'); give that with --data")
    per_class = data.get("train_per_class")
    if per_class is not None:
        have = dict(zip(ds.classes, np.bincount(ds.y_train[tr], minlength=len(ds.classes)).tolist()))
        if have != per_class:
            diff = [c for c in ds.classes if have.get(c) != per_class.get(c)]
            raise CifarlabError(f"this data's training images per class differ from the run's (for "
                                f"{short_list(diff, 5)}): it is not the data '{run}' was trained on; give that "
                                "with --data")
    return cfg, tr, fresh


def make_arrays(cfg: Config, ds: Dataset, device: torch.device, inherited: np.ndarray | None = None) -> Arrays:
    """Subset, split (seeded, stratified) and move the data to ``device`` once, as uint8. The
    validation images with the pixels of an image in ``inherited`` (those the weights a
    fine-tune starts from learnt from: :func:`_inherited`) are left out, as they would flatter
    its validation figures and early stopping.

    Keeping uint8 on the device (a quarter of float32's size) and converting per batch avoids a
    host-to-device copy every step: the whole CIFAR-10 training set is 150 MB.
    """
    tr, va = split_indices(cfg, ds.y_train)
    va = va[~seen.among(ds.x_train, va, inherited)]

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().to(device)

    def lab(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64)).to(device)

    return Arrays(t(ds.x_train[tr]), lab(ds.y_train[tr]), t(ds.x_train[va]), lab(ds.y_train[va]),
                  t(ds.x_test), lab(ds.y_test))


def _record_seen(run: Path, cfg: Config, ds: Dataset, inherited: np.ndarray | None) -> None:
    """Keep hashes of the images the run trains and validates on in its folder, with those its
    starting weights learnt from (``inherited``, :func:`_inherited`), so that it is never tested
    on one of them in other data (:func:`cifarlab.data.seen.test_split_for`)."""
    tr, va = split_indices(cfg, ds.y_train)
    idx = np.concatenate([tr, va])
    named = len(ds.train_paths) == len(ds.x_train)
    seen.record(run / seen.FILE, ds.x_train, idx, [ds.train_paths[i] for i in idx] if named else [], tr, inherited)


def _inherited(cfg: Config) -> np.ndarray | None:
    """The pixel hashes of every image the weights of ``model.init_from`` learnt from (those it
    trained on, and what it inherited in turn: :attr:`cifarlab.data.seen.Record.learnt`); None
    without such a run, or where its record does not tell (none: trained by an older cifarlab,
    imported, or gone since a resumed run started; or one of an older cifarlab that mixes its
    training and validation images)."""
    if not cfg.model.init_from or not Path(cfg.model.init_from).is_dir():
        return None
    rec = seen.read(cfg.model.init_from)
    return None if rec is None else rec.learnt


def _seen_by_start(inherited: np.ndarray | None, cfg: Config, ds: Dataset) -> dict[str, int | None]:
    """How many of the run's validation and test images have the pixels of an image that the
    weights it starts from learnt from (``inherited``, :func:`_inherited`; None where unknown):
    kept in ``init_from.json``, and said in the log where there are any."""
    if inherited is None:
        return {"seen_validation_images": None, "seen_test_images": None}
    va = split_indices(cfg, ds.y_train)[1]
    return {"seen_validation_images": int(seen.among(ds.x_train, va, inherited).sum()),
            "seen_test_images": int(seen.among(ds.x_test, np.arange(len(ds.x_test)), inherited).sum())}


def _start_report(start: _Start, inherited: np.ndarray | None, cfg: Config, ds: Dataset,
                  arrays: Arrays) -> tuple[dict[str, int | None], str | None]:
    """What ``init_from.json`` keeps of the images the weights a fine-tune starts from learnt
    from (:func:`_seen_by_start`), and the log's note on them (:func:`_seen_by_start_note`, with
    the :func:`_split_hint` where some validation images are among them)."""
    counts = _seen_by_start(inherited, cfg, ds)
    hint = _split_hint(start, inherited, cfg, ds) if counts["seen_validation_images"] else None
    return counts, _seen_by_start_note(start, counts, len(arrays.x_val), len(arrays.x_test), hint)


def _split_hint(start: _Start, inherited: np.ndarray | None, cfg: Config, ds: Dataset) -> str | None:
    """For a run some of whose validation images the weights it starts from (``start``) learnt
    from (:func:`_seen_by_start`): where the split seed of the run it starts from would leave it
    none of those (the same data and subset, split as that run split it), the option that says
    so; else None."""
    if inherited is None or not (start.run / "config.yaml").is_file():
        return None
    try:
        theirs = load_run_config(start.run / "config.yaml")
    except CifarlabError:  # a hint, not a check: a config this version cannot read gives none
        return None
    seed = theirs.train.seed if theirs.data.split_seed is None else theirs.data.split_seed
    if seed == (cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed):
        return None
    alt = copy.deepcopy(cfg)
    alt.data.split_seed = seed
    if seen.among(ds.x_train, split_indices(alt, ds.y_train)[1], inherited).any():
        return None
    return f"--split-seed {seed}, as {start.run} drew its split, would keep every validation image"


def _seen_by_start_note(start: _Start, counts: dict[str, int | None], n_val: int, n_test: int,
                        hint: str | None = None) -> str | None:
    """The log line on the images the weights it starts from learnt from (:func:`_seen_by_start`),
    with ``n_val`` validation images left after those, ``n_test`` test images, and the
    :func:`_split_hint` where there is one."""
    if counts["seen_validation_images"] is None:
        return (f"{start.run} keeps no record of the images it trained on ({seen.FILE}, or one of an older cifarlab "
                "that does not tell them from its validation images), so they cannot be told apart from this run's "
                "validation and test images")
    v, t = counts["seen_validation_images"], counts["seen_test_images"]
    learnt = f"the pixels of an image that {start.run}'s weights learnt from"
    test = f"{t:,} of the {n_test:,} test images {'has' if t == 1 else 'have'}"
    counted = f"the test figures count {'it' if t == 1 else 'them'}"
    if not v:
        return f"{test} {learnt}: {counted}" if t else None
    return (f"{v:,} of the {n_val + v:,} validation images have {learnt}: they are left out of training's validation "
            "figures, calibration and the thresholds of cifarlab ood" + (f"; {test} too, and {counted}" if t else "")
            + (f" ({hint})" if hint else ""))


def _check_same_images(run: Path, cfg: Config, ds: Dataset, recorded: seen.Record) -> None:
    """Refuse to resume ``run`` on data whose training and validation images are not those it
    started with (``recorded``, its record: a folder edited since, say): it would go on training
    on other images, and its validation split, drawn again, could hold images it has trained on."""
    before = recorded.pixels
    now = np.sort(seen.pixel_hashes(ds.x_train, np.concatenate(split_indices(cfg, ds.y_train))))
    if np.array_equal(now, before):
        return
    gone, added = np.setdiff1d(before, now).size, np.setdiff1d(now, before).size
    raise CifarlabError(
        f"'{run}' cannot be resumed on this data: of the {len(before):,} training and validation images it started "
        f"with, {gone:,} {'is' if gone == 1 else 'are'} not in {ds.source} now, and of the {len(now):,} there now, "
        f"{added:,} {'is' if added == 1 else 'are'} new. Resumed, the run would train on other images, and its "
        "validation split could hold images it trained on. Give it the data it started with, or start a new run "
        f"from its weights: cifarlab train --data DATA --model {cfg.model.name} --init-from {run}")


def steps_per_epoch(n_train: int, cfg: Config) -> int:
    """Optimizer steps in an epoch of ``n_train`` images: full batches only with
    ``train.drop_last``, else one more for the partial last batch."""
    bs = cfg.train.batch_size
    return n_train // bs if cfg.train.drop_last else math.ceil(n_train / bs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, label_smoothing: float = 0.0, autocast=None,
               cpu_kernels: bool = False, loss_scale: float = 1.0,
               class_weight: torch.Tensor | None = None,
               logit_offset: torch.Tensor | None = None, teacher: nn.Module | None = None,
               distill_weight: float = 0.5, distill_temperature: float = 4.0,
               soft: torch.Tensor | None = None,
               mix: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a prepared batch; returns (summed loss, correct count) as
    device tensors, so the caller can accumulate without a GPU-to-CPU sync every step.
    ``cpu_kernels`` uses cifarlab's own CPU kernels (:mod:`cifarlab.cpu_kernels`: dropout, 2x2
    max pooling, and 3x3 convolution weight gradients on CPUs where they pay off) in the forward
    and backward passes where they apply, and joins ReLUs to their pools and convolutions where
    ``model`` comes from :func:`cifarlab.cpu_kernels.fuse`; the optimizer's kernel is the
    optimizer's choice (:func:`cifarlab.optim.build_optimizer`).
    ``loss_scale`` multiplies the loss before the backward pass and divides the gradients
    after it (see :func:`runtime.loss_scale`). ``class_weight`` (one weight per class) weighs
    each example's loss by its class, as Keras' ``class_weight`` (:func:`losses.cross_entropy`);
    the summed loss returned is then the weighted one, as Keras logs it. ``logit_offset`` makes
    the loss the logit-adjusted one (:func:`losses.logit_offsets`); the correct count is that of
    the plain logits, as predictions use them. ``teacher`` (a frozen model in eval mode taking
    the same input, :class:`TeacherLogits`) adds the distillation loss
    (:func:`losses.distillation_loss` at ``distill_temperature``) with the share
    ``distill_weight``, the cross-entropy keeping the rest; ``soft``, the teacher's logits for
    ``x`` computed beforehand, saves its forward pass. ``mix``, for images that MixUp or CutMix
    mixed (:func:`cifarlab.augment.mix_batch`), is the partners' labels and the share ``lam`` of
    ``y``: the cross-entropy is ``lam`` times that of ``y`` plus ``1 - lam`` times that of the
    partners' labels, and an image counts as correct where it predicts the label of the larger
    share."""
    with autocast or nullcontext(), kernels.kernel_mode(cpu_kernels):
        logits = model(x)
        # categorical cross-entropy on softmax(logits), as Keras; optionally with label smoothing
        loss = cross_entropy(logits, y, label_smoothing, class_weight, logit_offset)
        if mix is not None:
            loss = mix[1] * loss + (1 - mix[1]) * cross_entropy(logits, mix[0], label_smoothing, class_weight,
                                                                logit_offset)
            if mix[1] < 0.5:
                y = mix[0]
        if teacher is not None or soft is not None:
            if soft is None:
                with torch.no_grad():
                    soft = teacher(x)
            loss = (1 - distill_weight) * loss + distill_weight * distillation_loss(logits, soft, distill_temperature)
    optimizer.zero_grad(set_to_none=True)
    if loss_scale == 1:
        loss.backward()
    else:
        (loss * loss_scale).backward()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1 / loss_scale)  # one kernel for all; exact for a power of two
    optimizer.step()
    return loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()


class TeacherLogits(nn.Module):
    """A trained run's model as a teacher (``train.teacher``): frozen and always in eval mode (its
    dropout off, its batch norms on their running statistics), taking the images as the student
    gets them, preprocessed with the student's ``prep``, and giving its logits for the same images
    preprocessed as it was trained, with ``teacher_prep``."""

    def __init__(self, model: nn.Module, prep: dict, teacher_prep: dict) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.prep, self.teacher_prep = dict(prep), dict(teacher_prep)
        keys = ("rescale", "mean", "std")
        self.same = all(self.prep.get(k) == self.teacher_prep.get(k) for k in keys)

    def train(self, mode: bool = True) -> TeacherLogits:  # noqa: ARG002 - a teacher never trains
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:  # back to the 0-255 scale, then as the teacher was trained (export.preprocess)
            from .export import channel_values

            p = self.prep
            if p.get("std") is not None:
                x = x * channel_values(tuple(p["std"]), x.dtype, x.device, 1e-6)
            if p.get("mean") is not None:
                x = x + channel_values(tuple(p["mean"]), x.dtype, x.device)
            x = normalize(x * (self.teacher_prep.get("rescale", 1 / 255) / p.get("rescale", 1 / 255)),
                          self.teacher_prep)
        return self.model(x)


class EnsembleLogits(nn.Module):
    """Several teachers as one: the mean of their logits, whose softmax at any temperature is
    the normalised geometric mean of their softened distributions (one of the two ensemble
    targets Hinton et al. distil)."""

    def __init__(self, members: list[TeacherLogits]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.members]).mean(0)


def _read_teacher(cfg: Config) -> tuple[list[Path], dict]:
    """Check ``cfg.train.teacher`` before any data is loaded: a run folder with its weights, or
    the folder of ``cifarlab train --runs N`` whose runs have all finished (an ensemble teacher).
    Returns the runs and what the run's metrics and model card say of the teacher."""
    from .export import check_weights, finished_runs, is_runs_set, read_run

    try:
        runs = finished_runs(cfg.train.teacher) if is_runs_set(cfg.train.teacher) else [Path(cfg.train.teacher)]
        archs = [read_run(r)[1] for r in runs]
        for r in runs:
            check_weights(r)
    except CifarlabError as e:
        raise CifarlabError(f"train.teacher (--teacher): {e}") from None
    metrics = [read_json(r / "metrics.json", absent={}) for r in runs]
    accuracies = [m.get("test_accuracy") for m in metrics]
    about = {"run": str(cfg.train.teacher), "model": ", ".join(sorted({a["model"] for a in archs})),
             # of an ensemble, its runs' mean (the ensemble's own is not measured)
             "test_accuracy": None if None in accuracies else sum(accuracies) / len(accuracies),
             "data": metrics[0].get("data", {}).get("source"), "weight": cfg.train.distill_weight,
             "temperature": cfg.train.distill_temperature}
    return runs, about | ({"runs": len(runs)} if len(runs) > 1 else {})


def _teacher(cfg: Config, ds: Dataset, shape: tuple[int, int, int], prep: dict, device: torch.device,
             fmt: torch.memory_format) -> tuple[nn.Module, dict]:
    """The teacher of ``cfg.train.teacher`` for this run's data (its classes, image ``shape``)
    and preprocessing ``prep``, on ``device`` in the run's precision and memory format ``fmt``
    (:class:`TeacherLogits`, or :class:`EnsembleLogits` of a ``--runs N`` folder's runs); and
    what the run's metrics say of it."""
    from .export import load_model

    runs, about = _read_teacher(cfg)
    members = []
    for run in runs:
        # Building it draws initial weights: the run's own random draws stay as they were. Its
        # logits as trained, uncalibrated: the temperature is distillation's.
        with torch.random.fork_rng(devices=[]):
            p = load_model(run, "cpu", "none", uncalibrated=True)
        if p.classes != list(ds.classes):
            raise CifarlabError(f"train.teacher (--teacher) '{run}' tells apart {len(p.classes)} classes "
                                f"({short_list(p.classes, 5)}) and this run's data {len(ds.classes)} "
                                f"({short_list(ds.classes, 5)}); a teacher needs the same classes in the same order")
        if tuple(p.input_shape) != tuple(shape):
            (c, h, w), (tc, th, tw) = shape, p.input_shape
            raise CifarlabError(f"train.teacher (--teacher) '{run}' takes {th}x{tw}x{tc} images (HxWxC) and this run's "
                                f"are {h}x{w}x{c}; give a teacher trained on images of this size (--image-size)")
        model = runtime.cast_model(p.model.float().to(device), device, cfg.train.precision).to(memory_format=fmt)
        members.append(TeacherLogits(model, prep, p.prep))
    return (members[0] if len(members) == 1 else EnsembleLogits(members)), about


class GraphedStep:
    """:func:`train_step` replayed as one CUDA graph: forward, backward and optimizer update.

    Small networks at small batches (the keras-book recipe) are bound by kernel launches, not
    arithmetic: a graph launches the step's hundred-odd kernels with one call. The first
    ``warmup`` steps run eagerly on a side stream (as CUDA graph capture requires, so that
    lazy initialisation, and compilation for a compiled model, happen outside the capture);
    the next full batch is captured and replayed, and every later full batch is copied into
    the captured input buffers and replayed. A batch of another size (the last, partial batch
    of an epoch) runs eagerly, updating the same weights and optimizer state.

    The optimizer's hyperparameters are baked into the graph, so the learning rate must be
    constant (the config check refuses other schedules); the dropout masks still differ per
    replay (the graph advances the CUDA generator).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, label_smoothing: float = 0.0,
                 autocast=None, warmup: int = 3, loss_scale: float = 1.0, class_weight: torch.Tensor | None = None,
                 logit_offset: torch.Tensor | None = None):
        self.model, self.optimizer, self.label_smoothing = model, optimizer, label_smoothing
        self.autocast, self.warmup, self.loss_scale = autocast, warmup, loss_scale
        # read by the graph from their fixed addresses: never replaced
        self.class_weight, self.logit_offset = class_weight, logit_offset
        self.steps = self.largest = 0
        self.replay: Callable[[], None] | None = None
        self.static: tuple[torch.Tensor, ...] = ()  # input x, y, then the outputs (loss sum, correct)

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ordinary step."""
        return train_step(self.model, self.optimizer, x, y, self.label_smoothing, self.autocast,
                          loss_scale=self.loss_scale, class_weight=self.class_weight, logit_offset=self.logit_offset)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on ``x``, ``y``; returns (summed loss, correct count) as device tensors, which
        after a replay are the graph's output buffers: read them before the next call."""
        self.steps += 1
        if self.replay is not None:
            if x.shape != self.static[0].shape:
                return self.eager(x, y)
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.replay()
            return self.static[2], self.static[3]
        self.largest = max(self.largest, len(x))
        # Capture a full batch: a partial one captured by chance would leave every later step eager.
        if self.steps <= self.warmup or len(x) < self.largest:
            return self._warmup_step(x, y)
        xs, ys = x.clone(), y.clone()  # clone keeps the memory format
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates grads inside the graph
        self.replay, out = self._capture(lambda: self.eager(xs, ys))
        self.static = (xs, ys, *out)
        self.replay()  # capturing records the step without running it
        return out

    def _warmup_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.eager(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, step: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[Callable[[], None], tuple[torch.Tensor, torch.Tensor]]:
        """Record ``step`` into a CUDA graph; returns the replay function and the step's outputs,
        whose memory every replay rewrites."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph.replay, out


@torch.no_grad()
def evaluate_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: dict,
                    batch_size: int | None = None, tta: str = "none", channels_last: bool = False,
                    dtype: torch.dtype = torch.float32, desc: str = "Evaluating") -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy and logits (on CPU) of ``model`` over uint8 images ``x``,
    which reach the model as ``dtype`` (the weights' dtype, see :func:`runtime.cast_model`), in
    batches of ``batch_size`` (default :func:`runtime.inference_batch_size` for ``x``'s device);
    ``desc`` names the pass on the progress bar of an interactive terminal."""
    batch_size = batch_size or runtime.inference_batch_size(x.device)
    was = model.training
    model.eval()
    try:
        logits = batched_logits(model, x, prep, batch_size, tta, channels_last, dtype, desc=desc)
    finally:
        model.train(was)
    loss = F.cross_entropy(logits, y).item()  # one sync per evaluation
    acc = (logits.argmax(1) == y).sum().item() / len(y)  # exact, as evaluate's numpy mean (not float32's 0.33333334)
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


def _new_run_dir(cfg: Config) -> tuple[Path, str | Path]:
    """The run's folder, created (see :func:`cifarlab.fsutil.new_run_folder`)."""
    return new_run_folder(cfg.train.out, cfg.train.overwrite, f"{cfg.recipe}-{cfg.model.name}",
                          "choose another --out, pass --overwrite to replace its files, or --resume it")


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    # One generator per (seed, epoch): the data order and augmentation of an epoch do not depend
    # on what ran before it, which keeps resumed runs identical to uninterrupted ones.
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def epoch_order(labels: torch.Tensor, sampling: str, gen: torch.Generator) -> torch.Tensor:
    """The indices of one epoch's training images, in the order the steps take them, drawn with
    ``gen`` (on the CPU): with ``sampling`` "shuffle", each image once in a random order; with
    "balanced", as many draws with replacement, each image's chance the inverse of its class's
    count, so every class present is drawn equally often in expectation."""
    n = len(labels)
    if sampling == "shuffle":
        return torch.randperm(n, generator=gen)
    y = labels.cpu()
    chance = (1.0 / torch.bincount(y).double())[y]  # a class without images has none to draw
    return torch.multinomial(chance, n, replacement=True, generator=gen)


def _save_checkpoint(run: Path, state: dict) -> None:
    import io

    from .fsutil import write_bytes

    # serialised in memory, then written: torch.save on a full disk raises an internal RuntimeError
    # (a traceback), where a plain file write raises the OSError that names the cause
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(run / CHECKPOINT, buf.getvalue())


def _load_checkpoint(run: Path) -> dict:
    path = run / CHECKPOINT
    if not path.is_file():
        raise CifarlabError(f"'{run}' has no {CHECKPOINT} to resume from; it was not written by "
                            "'cifarlab train' or finished and was cleaned up")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        # Of a refused unpickling only the restricted unpickler's own reason: the rest of torch's
        # message suggests loading with weights_only=False, which would run whatever the file holds.
        text = str(e).split("WeightsUnpickler error:")[-1].strip()
        first = (text.splitlines() or [""])[0]
        raise CifarlabError(f"{path}: not a checkpoint cifarlab can read: damaged, or not written by "
                            f"'cifarlab train' ({type(e).__name__}: {first}). Its weights.safetensors, if "
                            "any, still evaluates; to train on, start a new run from it with --init-from") from None


class Lookahead:
    """Slow weights for lookahead (Zhang et al., 2019) as the speed records use it: every k
    steps the slow copy moves toward the fast weights by ``1 - decay`` and the fast weights are
    reset to it. ``decay`` grows from 0 with the cube of training progress, so lookahead only
    smooths the end of training."""

    def __init__(self, model: nn.Module):
        self.slow = [t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        fast = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(self.slow, fast, 1 - decay)  # one fused op for all tensors
        torch._foreach_copy_(fast, self.slow)


class WeightAverage:
    """Keras' ``use_ema``: an exponential moving average of the model's parameters, moved after
    every step by ``1 - momentum`` towards them (the first step's parameters start it, as Keras'
    first update uses momentum 0), which the run ends on (:meth:`apply`, Keras'
    ``finalize_variable_values``). Buffers (batch norms' running statistics) are not averaged, as
    Keras averages trainable variables only. The average is kept in float32, where half-precision
    weights could not hold a step of a hundredth."""

    def __init__(self, model: nn.Module, momentum: float):
        self.params = list(model.parameters())
        self.average = [p.detach().float().clone() for p in self.params]
        self.momentum = momentum

    @torch.no_grad()
    def update(self, first: bool = False) -> None:
        current = [p.detach().float() for p in self.params]  # the parameters themselves where float32
        torch._foreach_lerp_(self.average, current, 1.0 if first else 1 - self.momentum)  # one fused op for all

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_copy_(self.params, self.average)


class EarlyStopping:
    """Keras' ``EarlyStopping(monitor, min_delta, patience=N, restore_best_weights=True)``:
    after each epoch, a ``monitor`` (``val_loss``, lower is better, or ``val_accuracy``, higher)
    better than the best so far by more than ``min_delta`` keeps a copy of the weights; N epochs in
    a row without one stop the run, which then ends on the kept weights. Patience 0 is off. Its
    state goes into the checkpoint, so a resumed run stops where the whole one would."""

    def __init__(self, patience: int, monitor: str = "val_loss", min_delta: float = 0.0):
        self.patience, self.monitor, self.min_delta = patience, monitor, min_delta
        self.lower_is_better = MONITORS[monitor] == "min"
        self.best = math.inf if self.lower_is_better else -math.inf
        self.best_epoch = 0
        self.wait = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, logs: dict[str, float], model: nn.Module) -> bool:
        """Record epoch ``epoch``'s (1-based) figures (``logs`` holds the monitored one); True
        when the run should stop now."""
        if not self.patience:
            return False
        value = logs[self.monitor]
        # Keras' test: better by strictly more than min_delta (with 0, any change the right way)
        if (value < self.best - self.min_delta) if self.lower_is_better else (value > self.best + self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            # a copy, not a reference: training goes on changing the weights in place
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.wait += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Whether ``patience`` epochs in a row have passed without a better monitored figure."""
        return bool(self.patience) and self.wait >= self.patience

    def describe(self) -> str:
        """The best epoch in words, for the log: "the lowest val_loss"."""
        return f"the {'lowest' if self.lower_is_better else 'highest'} {self.monitor}"

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps (None when off)."""
        if not self.patience:
            return None
        # "stopped" follows from wait and patience; it is kept for readers of the checkpoint (_stopped_early)
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "stopped": self.stopped,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (None: nothing recorded yet)."""
        if state:
            self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
            self.best_state = state["best_state"]

    def summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the settings, the epoch whose weights the run kept and its
        monitored figure, and the epoch after which it stopped (None if it trained every epoch)."""
        return {"patience": self.patience, "monitor": self.monitor, "min_delta": self.min_delta,
                "best_epoch": self.best_epoch, f"best_{self.monitor}": self.best,
                "stopped_after_epoch": self.best_epoch + self.wait if self.stopped else None}


class Plateau:
    """Keras' ``ReduceLROnPlateau(monitor, factor, patience, min_delta, cooldown, min_lr)`` as a
    multiplier on the schedule: after ``patience`` epochs in a row without a ``monitor``
    (``val_loss``, lower is better, or ``val_accuracy``, higher) better than the best by more
    than ``min_delta``, :attr:`scale` is multiplied by ``factor``, but never below ``min_scale``
    (``min_lr`` over the main lr). A cut starts a cooldown of ``cooldown`` epochs counted from
    the next epoch on, as Keras counts it: the first ``cooldown - 1`` epochs after a cut count
    towards no cut (a better figure still becomes the best), so a cooldown of 1 changes nothing
    (PyTorch's ``ReduceLROnPlateau`` leaves ``cooldown`` epochs out). Patience 0 is off. Its
    state goes into the checkpoint, so a resumed run cuts where the whole one would."""

    def __init__(self, patience: int, factor: float = 0.1, min_scale: float = 0.0, monitor: str = "val_loss",
                 min_delta: float = 1e-4, cooldown: int = 0):
        self.patience, self.factor, self.min_scale = patience, factor, min_scale
        self.monitor, self.min_delta, self.cooldown = monitor, min_delta, cooldown
        self.lower_is_better = MONITORS[monitor] == "min"
        self.scale, self.best, self.wait = 1.0, math.inf if self.lower_is_better else -math.inf, 0
        self.cooldown_left = 0

    def update(self, value: float) -> bool:
        """Record an epoch's monitored figure; True when it cuts the lr now."""
        if not self.patience:
            return False
        if self.cooldown_left:  # Keras' order: the cooldown counts down before the figure is judged
            self.cooldown_left -= 1
            self.wait = 0
        if (value < self.best - self.min_delta) if self.lower_is_better else (value > self.best + self.min_delta):
            self.best, self.wait = value, 0
            return False
        if self.cooldown_left:
            return False
        self.wait += 1
        # Keras cuts only while the lr is above its floor (with a little tolerance for rounding)
        if self.wait < self.patience or self.scale <= self.min_scale * (1 + 1e-9):
            return False
        self.scale, self.wait, self.cooldown_left = max(self.scale * self.factor, self.min_scale), 0, self.cooldown
        return True

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps."""
        return {"scale": self.scale, "best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (None: a checkpoint from before plateaus;
        one from before cooldowns has none left)."""
        if state:
            self.scale, self.best, self.wait = state["scale"], state["best"], state["wait"]
            self.cooldown_left = int(state.get("cooldown_left", 0))


def _lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """The lr of step ``step`` (0-based) as a fraction of optim.lr: constant; or a linear warm-up
    over warmup_frac of the steps from start_lr_frac to 1, then a decay to final_lr_frac at the
    last step, linear (triangle) or along half a cosine (cosine: SGDR without restarts,
    Loshchilov and Hutter 2017, as Keras' CosineDecay with warm-up), or by gamma from each of the
    milestones' steps on (step: He et al. 2016, as PyTorch's MultiStepLR)."""
    o = cfg.optim
    if o.schedule == "constant":
        return lambda step: 1.0
    peak = max(1, round(o.warmup_frac * total_steps))
    cosine = o.schedule == "cosine"
    cuts = [round(m * total_steps) for m in o.milestones]  # the first step at each lower lr

    def warmup_then_decay(step: int) -> float:
        if step < peak:
            return o.start_lr_frac + (1 - o.start_lr_frac) * step / peak
        if o.schedule == "step":
            return o.gamma ** sum(step >= c for c in cuts)
        t = (step - peak) / max(1, total_steps - peak)  # 0 at the peak, 1 at the last step
        if cosine:
            t = (1 - math.cos(math.pi * t)) / 2
        return 1 + (o.final_lr_frac - 1) * t

    return warmup_then_decay


def _whiten_bias_lambda(steps: int, main: Callable[[int], float]) -> Callable[[int], float]:
    """The schedule of a group marked ``schedule="whiten_bias"`` (Muon's grouping): linear
    decay from 1 to 0 over the ``steps`` in which the whitening bias trains, as
    airbench94_muon; ``main`` when it trains all along (``steps`` 0)."""
    if steps <= 0:
        return main
    return lambda step: max(0.0, 1 - step / steps)


@dataclass
class _Start:
    """What a run with ``model.init_from`` starts from: that run's weights (from safetensors),
    its preprocessing, and what this run's metrics and model card say of it."""

    run: Path
    state: dict[str, torch.Tensor]
    prep: dict
    channels: int
    about: dict  # the source run, its model, its data and classes, for metrics.json


def _read_start(cfg: Config) -> _Start:
    """Read and check ``cfg.model.init_from`` before any data is loaded: a run folder of the same
    model, with its weights."""
    from .export import read_run, read_weights

    what = "model.init_from (--init-from)"  # as the config and the CLI name it
    try:
        run, arch = read_run(cfg.model.init_from)
    except CifarlabError as e:
        raise CifarlabError(f"{what}: {e}") from None
    if arch["model"] != cfg.model.name:
        raise CifarlabError(f"{what} '{run}' holds a {arch['model']} model and this run trains {cfg.model.name}; "
                            f"set the model to {arch['model']} (--model), or start from a {cfg.model.name} run")
    if not (run / "weights.safetensors").is_file():
        raise CifarlabError(f"{what} '{run}' has no weights.safetensors yet (an unfinished run?); finish it "
                            f"first: cifarlab train --resume {run}")
    metrics = read_json(run / "metrics.json", absent={})
    about = {"run": str(run), "model": arch["model"], "classes": arch["classes"],
             "data": metrics.get("data", {}).get("source")}
    return _Start(run, read_weights(run / "weights.safetensors"), arch["preprocessing"], arch["input"]["channels"],
                  about)


def _saved_prep(run: Path) -> dict:
    """The preprocessing a run started with, from its ``architecture.json``."""
    from .export import read_run

    return read_run(run)[1]["preprocessing"]


def _start_note(start: _Start, fresh: dict[str, str]) -> str:
    """The log line of a run that starts from ``start``'s weights: which tensors start fresh
    (``fresh``, from :func:`_copy_matching`), and why."""
    head = [k for k, why in fresh.items() if why == "classifier"]
    misfit = [k for k, why in fresh.items() if why != "classifier"]
    classes = start.about["classes"]
    why = ([f"{', '.join(head)} (the classifier: {start.run} was trained on other classes, "
            f"{short_list(classes)})"] if head else []) + \
        ([f"{', '.join(misfit)} (other shapes there)"] if misfit else [])
    return f"weights from {start.run}" + (f"; fresh: {'; '.join(why)}" if why else ", all of them")


def _class_weight_note(cfg: Config, ds: Dataset, weights: torch.Tensor, most: int = 10) -> str:
    """Training's log line on the class weights: the lightest and heaviest classes first."""
    order = sorted(range(len(ds.classes)), key=lambda i: (float(weights[i]), i))
    shown = [f"{ds.classes[i]} {float(weights[i]):.4g}" for i in order]
    if len(shown) > most:
        shown = shown[:most // 2] + ["..."] + shown[-(most // 2):]
    how = "balanced" if cfg.train.class_weight == "balanced" else "as given, the others 1"
    return f"loss weighted by class ({how}): {', '.join(shown)}"


def _copy_matching(model: nn.Module, state: dict[str, torch.Tensor], skip: list[str]) -> dict[str, str]:
    """Copy into ``model`` every tensor of ``state`` with its name and shape (as Keras'
    ``load_weights(skip_mismatch=True)``) but the classifier's, named in ``skip``; return the
    model's tensors left at their fresh initialisation, each with why: "classifier" (skipped) or
    "shape" (absent there, or of another shape)."""
    own = model.state_dict()
    fits = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and v.shape == own[k].shape and k not in skip}
    model.load_state_dict(fits, strict=False)
    return {k: "classifier" if k in skip else "shape" for k in own if k not in fits}


@dataclass
class _Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    augmenter: Any
    prep: dict
    lookahead: Lookahead | None
    model_kwargs: dict
    num_params: int
    init_time: float = 0.0  # seconds of data-dependent initialisation (the whitening layers')
    selector: HardExampleSelector | None = None  # picks the examples each step trains on
    plateau: Plateau | None = None  # cuts the lr when the validation loss stops falling (None: off)
    fresh: dict[str, str] | None = None  # with model.init_from: the tensors not copied from that run, and why
    class_weight: torch.Tensor | None = None  # train.class_weight's weight per class, on the device (None: off)
    logit_offset: torch.Tensor | None = None  # train.logit_adjustment's offset per class, on the device (None: off)
    teacher: nn.Module | None = None  # train.teacher's model, or its runs' ensemble (None: no distillation)
    teacher_about: dict | None = None  # the teacher run, its model, accuracy and data, and the loss's settings
    policy: PolicyAugment | None = None  # augment.auto_augment's TrivialAugment or RandAugment (None: off)
    average: WeightAverage | None = None  # optim.ema_momentum's average of the weights (None: off)


def _build(cfg: Config, ds: Dataset, arrays: Arrays, device: torch.device, steps_per_epoch: int,
           cpu_kernels: bool = False, start: _Start | None = None, saved_prep: dict | None = None) -> _Setup:
    """Model, optimizer, schedule, augmentation and preprocessing for one run; ``cpu_kernels``:
    the optimizer uses cifarlab's CPU kernel where it has one (RMSprop). ``start``: the run the
    weights start from (``model.init_from``), whose preprocessing the run takes; ``saved_prep``:
    the preprocessing to take instead of computing it (a resumed run's, as it started)."""
    c, h, w = arrays.x_train.shape[1:]
    model_kwargs = {"num_classes": ds.num_classes, "in_chans": int(c), "img_size": [int(h), int(w)]}
    model = create_model(cfg.model.name, **model_kwargs).to(device)
    augmenter = augmenter_from_config(cfg.augment)
    prep: dict[str, Any] = {"rescale": 1 / 255, "mean": None, "std": None}
    if cfg.data.normalize:
        x = arrays.x_train.float() / 255
        prep["mean"] = x.mean(dim=(0, 2, 3)).tolist()
        prep["std"] = x.std(dim=(0, 2, 3)).tolist()
    if isinstance(augmenter, KerasAugment):
        augmenter.cpu_kernel = cfg.train.cpu_kernels  # on the CPU: cifarlab's warp kernel (see augment.py)
        augmenter.compiled = cfg.train.compile  # elsewhere: one fused, compiled kernel for the transform
        if augmenter.featurewise_center:
            augmenter.fit(arrays.x_train.float() * prep["rescale"])
            prep["mean"] = augmenter.mean.flatten().tolist()
            prep["std"] = augmenter.std.flatten().tolist() if augmenter.featurewise_std_normalization else None
            # Applied by normalize() after the transform (Keras' order) and saved with the run.
            augmenter.featurewise_center = augmenter.featurewise_std_normalization = False
    if start is not None or saved_prep is not None:
        # the weights were trained on images preprocessed so; other statistics would shift every
        # input they see (timm, likewise, keeps a pretrained model's mean and std)
        prep = dict(start.prep if start is not None else saved_prep)
    proxy = create_model(cfg.train.select_model, **model_kwargs).to(device) if cfg.train.select_fraction < 1 else None
    init_time = 0.0
    whitened = [m for m in (model, proxy) if hasattr(m, "init_whitening")]
    if whitened:
        clock = _Clock(device)  # counted as training time, as airbench counts it
        g = torch.Generator().manual_seed(cfg.train.seed)
        sample = preprocess(arrays.x_train[torch.randperm(len(arrays.x_train), generator=g)[:5000].to(device)], prep)
        for m in whitened:
            m.init_whitening(sample)
        init_time = clock.elapsed()
    fresh = None
    if start is not None:  # after the whitening: the source run's, where it fits, wins
        # A classifier for other classes (or the same in another order) maps the features to the
        # wrong outputs whatever its shape, so it starts fresh, as timm resets a pretrained head.
        same_classes = start.about["classes"] == list(ds.classes)
        fresh = _copy_matching(model, start.state, [] if same_classes else classifier_tensors(model))
    runtime.cast_model(model, device, cfg.train.precision)  # after the whitening, computed in float32
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim, capturable=cfg.train.cuda_graph,
                                cpu_kernels=cpu_kernels)
    o = cfg.optim
    plateau = Plateau(o.plateau_patience, o.plateau_factor, o.plateau_min_lr / o.lr if o.lr else 0.0,
                      o.plateau_monitor, o.plateau_min_delta, o.plateau_cooldown) if o.plateau_patience else None
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch, plateau)
    lookahead = Lookahead(model) if cfg.train.lookahead_every else None
    weights = class_weights(cfg.train.class_weight, arrays.y_train, ds.classes)
    weights = weights.to(device) if weights is not None else None
    offsets = logit_offsets(cfg.train.logit_adjustment, arrays.y_train, ds.classes)
    offsets = offsets.to(device) if offsets is not None else None
    selector = _selector(cfg, proxy, device, fmt, steps_per_epoch, plateau, weights, offsets) \
        if proxy is not None else None
    teacher, about = _teacher(cfg, ds, (int(c), int(h), int(w)), prep, device, fmt) if cfg.train.teacher \
        else (None, None)
    return _Setup(model, optimizer, scheduler, augmenter, prep, lookahead, model_kwargs,
                  sum(p.numel() for p in model.parameters()), init_time, selector, plateau, fresh, weights, offsets,
                  teacher, about, policy_from_config(cfg.augment),
                  WeightAverage(model, cfg.optim.ema_momentum) if cfg.optim.ema_momentum else None)


def _scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
               plateau: Plateau | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's learning-rate schedule over ``optimizer``'s groups (a whitening bias's group on
    its own), times ``plateau``'s scale where there is one."""
    main = _lr_lambda(cfg, cfg.train.epochs * steps_per_epoch)
    whiten = _whiten_bias_lambda(cfg.train.whiten_bias_epochs * steps_per_epoch, main)
    lambdas = [whiten if g.get("schedule") == "whiten_bias" else main for g in optimizer.param_groups]
    if plateau is not None:
        lambdas = [lambda step, f=f: f(step) * plateau.scale for f in lambdas]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _reapply(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the lrs of the step to come from ``scheduler``'s lambdas again, after a plateau cut
    changed them: the scheduler set them at the last step, before the cut."""
    for g, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * f(scheduler.last_epoch)


def _trained_per_step(cfg: Config) -> int:
    """Examples a full batch's step trains on: the batch, or the share that selection keeps."""
    return kept_count(cfg.train.select_fraction, cfg.train.batch_size)


def _selector(cfg: Config, proxy: nn.Module, device: torch.device, fmt: torch.memory_format,
              steps_per_epoch: int, plateau: Plateau | None = None, class_weight: torch.Tensor | None = None,
              logit_offset: torch.Tensor | None = None) -> HardExampleSelector:
    """The hard-example selector around ``proxy`` (whitened already): prepared as the model is
    (precision, memory format ``fmt``), with an optimizer and schedule of its own built from the run's
    settings, its loss weighted by ``class_weight`` and adjusted by ``logit_offset`` as the model's
    (its scores, the examples' hardness, are not). Its whitening bias stays fixed, as
    airbench96_faster's proxy's. It runs eagerly: ``train.compile`` compiles the model only."""
    bias = getattr(getattr(proxy, "whiten", None), "bias", None)
    if bias is not None:
        bias.requires_grad_(False)
    runtime.cast_model(proxy, device, cfg.train.precision)
    proxy = proxy.to(memory_format=fmt)
    optimizer = build_optimizer(param_groups(proxy, cfg.optim), cfg.optim)
    autocast = runtime.autocast(device, cfg.train.precision)
    step = functools.partial(train_step, proxy, optimizer, label_smoothing=cfg.train.label_smoothing,
                             autocast=autocast, class_weight=class_weight, logit_offset=logit_offset,
                             loss_scale=runtime.loss_scale(cfg.train.precision, _trained_per_step(cfg)))
    return HardExampleSelector(proxy, optimizer, _scheduler(cfg, optimizer, steps_per_epoch, plateau), step,
                               cfg.train.select_fraction, cfg.train.select_backward_every,
                               cfg.train.label_smoothing, autocast)


def _extend(run: Path, cfg: Config, ckpt: dict, epochs: int) -> Config:
    """``cfg`` with ``epochs`` in place of its own, for resuming ``run`` longer or shorter (Keras'
    ``fit(initial_epoch=...)``). Only where no part of training depends on the number of epochs,
    so the result is the run that would have been trained with ``epochs`` from the start, and not
    for a run that early stopping has ended."""
    if _stopped_early(ckpt):
        watched = cfg.train.early_stopping_monitor.replace("val_", "validation ").replace("_", " ")
        raise CifarlabError(f"'{run}' stopped early after epoch {ckpt['epoch']}, its {watched} no longer "
                            "improving, and ended on its best epoch's weights; it cannot train on. Train a new "
                            f"run with --epochs {epochs} instead")
    done = ckpt["epoch"] + (1 if ckpt["step"] else 0)  # a started epoch counts
    if epochs < max(1, done):
        raise CifarlabError(f"--epochs {epochs} is not valid for '{run}': it has trained "
                            f"{ckpt['epoch']} epoch(s){' and part of the next' if ckpt['step'] else ''}, "
                            f"so give at least {max(1, done)}")
    _check_epochs_change(run, cfg, epochs)
    cfg.train.epochs = epochs
    return cfg


def _stopped_early(ckpt: dict) -> bool:
    """Whether the checkpoint is that of a run early stopping has ended (see :class:`EarlyStopping`)."""
    return bool((ckpt.get("early_stopping") or {}).get("stopped"))


def _check_epochs_change(run: Path, cfg: Config, epochs: int) -> None:
    """Refuse another number of epochs where the run's training depends on its own."""
    if cfg.optim.schedule != "constant":
        raise CifarlabError(f"'{run}' cannot be resumed with another number of epochs: its learning-rate "
                            f"schedule ({cfg.optim.schedule!r}) is laid out over its {cfg.train.epochs} epochs, "
                            "so more epochs would not continue the same run; train a new run with --epochs "
                            f"{epochs} instead")
    if cfg.train.lookahead_every:
        raise CifarlabError(f"'{run}' cannot be resumed with another number of epochs: its lookahead "
                            f"(train.lookahead_every {cfg.train.lookahead_every}) ramps up over its "
                            f"{cfg.train.epochs} epochs; train a new run with --epochs {epochs} instead")


def fit(cfg: Config | None = None, *, resume: str | Path | None = None, epochs: int | None = None,
        dataset: Dataset | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train per ``cfg`` (a :class:`~cifarlab.config.Config`, from
    :func:`cifarlab.make_config`), or resume the run folder ``resume``, and write the run folder.

    ``cfg`` is validated again here, so fields changed after :func:`~cifarlab.make_config` are
    checked too. ``dataset``: images already loaded, trained on instead of loading ``cfg.data``'s
    (the run's config still names ``cfg.data``'s, so they should be the same). ``log`` receives
    each line of progress (default: print). ``epochs`` with ``resume`` changes the run's number
    of epochs, where its schedule allows (a constant learning rate, no lookahead): a finished run
    trains on, an unfinished one stops sooner, each exactly as a run given that number from the
    start. With ``cfg.train.runs > 1``, trains that many times (see :func:`fit_runs`). Returns the
    final metrics dict (saved as ``metrics.json``; ``runs_summary.json`` for several runs) with the
    run folder's path as ``run``.
    """
    if epochs is not None and resume is None:
        raise CifarlabError("epochs= is for resuming a run; set cfg.train.epochs for a new one")
    if resume is None:
        if not isinstance(cfg, Config):
            raise CifarlabError(f"fit() takes a Config, from cifarlab.make_config(recipe, **options), or "
                                f"resume=RUN; got {type(cfg).__name__} {cfg!r:.60}")
        validate(cfg)
        if cfg.train.runs > 1:
            return fit_runs(cfg, dataset=dataset, log=log)
    elif cfg is not None:
        raise CifarlabError("fit(resume=RUN) continues the run with its saved config; give no cfg with it")
    run, ckpt = None, None
    if resume is not None:
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise CifarlabError(f"cannot resume '{run}': no config.yaml there; give a run folder written by "
                                "'cifarlab train'")
        cfg = load_run_config(run / "config.yaml")
        if cfg.train.runs > 1:  # the parent folder of --runs N
            return resume_runs(run, epochs=epochs, dataset=dataset, log=log)
        ckpt = _load_checkpoint(run)
        if epochs is not None and epochs != cfg.train.epochs:
            # The set's own --epochs change (resume_runs) sets its config first, so only a run
            # changed by hand differs from it.
            if (parent := set_of(run)) is not None and epochs != parent[1].train.epochs:
                base, base_cfg = parent
                raise CifarlabError(
                    f"'{run}' is one of the {base_cfg.train.runs} runs of '{base}', which all train "
                    f"{base_cfg.train.epochs} epoch(s); change every run's epochs together: "
                    f"cifarlab train --resume {base} --epochs {epochs}")
            old_epochs = cfg.train.epochs
            cfg = _extend(run, cfg, ckpt, epochs)
            save_config(cfg, run / "config.yaml")
            log(f"{run}: epochs {old_epochs} -> {epochs} (config.yaml updated)")
    assert cfg is not None
    return _train_one(cfg, run, ckpt, dataset, log)


def set_of(run: str | Path) -> tuple[Path, Config] | None:
    """The ``--runs N`` folder that ``run`` is one of (``OUT`` for ``OUT/run-K`` with K < N) and
    its config, or None for a run of its own."""
    run = Path(run)
    base = run.parent
    k = run.name.removeprefix("run-")
    if not k.isdigit() or not (base / "config.yaml").is_file():
        return None
    try:
        cfg = load_run_config(base / "config.yaml")
    except CifarlabError:
        return None
    return (base, cfg) if cfg.train.runs > 1 and int(k) < cfg.train.runs else None


def resolve_precision(cfg: Config, device: torch.device, log: Callable[[str], None]) -> Config:
    """``cfg``, or for ``train.precision: auto`` a copy with the precision it resolves to on
    ``device`` (:func:`runtime.resolve_precision`), said in one line; the run's config.yaml then
    records the resolved one, so resuming or repeating the run elsewhere keeps it."""
    if cfg.train.precision != "auto":
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = runtime.resolve_precision(device, "auto")
    units = "compute capability 8.0 or more" if device.type == "cuda" else "AVX-512 BF16 or AMX"
    if cfg.train.precision == "bf16":
        log(f"precision auto: bf16 autocast, as this {device.type.upper()} computes bfloat16 natively ({units})")
    else:
        log(f"precision auto: fp32, as this {device.type.upper()} has no bfloat16 units known to cifarlab ({units})")
    return cfg


def _split_and_record(run: Path, cfg: Config, ds: Dataset, device: torch.device,
                      new: bool) -> tuple[Arrays, np.ndarray | None]:
    """The run's images on ``device`` (:func:`make_arrays`) and the pixel hashes of those its
    starting weights learnt from (:func:`_inherited`; for a resumed run, its own record's, as the
    run it started from may be gone or trained on since), which its validation leaves out; and
    its record of its images, written for a new run (and a resumed one of an older cifarlab that
    has none), checked against the data for a resumed one (:func:`_check_same_images`)."""
    rec = None if new else seen.read(run)
    inherited = _inherited(cfg) if new else (rec.inherited if rec is not None else None)
    arrays = make_arrays(cfg, ds, device, inherited)
    if cfg.data.val_split and not len(arrays.x_val):  # else validation's figures, early stopping, would fail
        raise CifarlabError(f"every validation image has the pixels of an image that the weights of "
                            f"model.init_from (--init-from) '{cfg.model.init_from}' learnt from, so none is left to "
                            "validate on; give data those weights did not learn all of, or train without validation "
                            "(--val-split 0)")
    if rec is None:
        _record_seen(run, cfg, ds, inherited)
    else:
        _check_same_images(run, cfg, ds, rec)
    return arrays, inherited


def _resume_note(run: Path, ckpt: dict, epochs: int) -> str:
    """The log line of a resumed run: where it resumes, or that it has nothing left to train."""
    if _stopped_early(ckpt):
        return (f"{run} stopped early after epoch {ckpt['epoch']}; nothing to resume, the final weights and test "
                "figures are written again")
    if ckpt["epoch"] >= epochs:
        return (f"{run} has trained all its {epochs} epochs; nothing to resume, the final weights and test figures "
                f"are written again (to train longer: --resume {run} --epochs N)")
    return f"resuming {run} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}"


def _describe_setup(cfg: Config, ds: Dataset, arrays: Arrays, st: _Setup, device: torch.device,
                    start: _Start | None, seen_note: str | None, log: Callable[[str], None]) -> None:
    """The log lines, before the first epoch, on what the run trains (the model, the images) and
    whatever changes how: a warning on classes that label people, class weights, the
    logit-adjusted loss, balanced sampling, the weights it starts from (``start``, with
    ``seen_note`` of :func:`_seen_by_start_note`), a teacher, an augmentation policy, MixUp or
    CutMix, an average of the weights, hard-example selection."""
    n, bs = len(arrays.x_train), cfg.train.batch_size
    log(f"model {cfg.model.name} ({st.num_params:,} parameters) on {device}; {n:,} training, "
        f"{len(arrays.x_val):,} validation, {len(arrays.x_test):,} test images")
    if people := people_classes(ds.classes):  # said before training, while there is time to reconsider
        log(f"note: {people_warning(people)}")
    if st.class_weight is not None:
        log(_class_weight_note(cfg, ds, st.class_weight))
    if st.logit_offset is not None:
        log(f"logit-adjusted loss (train.logit_adjustment {cfg.train.logit_adjustment:g}): each logit plus "
            f"{cfg.train.logit_adjustment:g} x log(its class's training share), from "
            f"{float(st.logit_offset.min()):.3g} to {float(st.logit_offset.max()):.3g}")
    if cfg.train.sampling == "balanced":
        present = int(arrays.y_train.unique().numel())
        log(f"each epoch draws {n:,} of the training images with replacement, every class equally likely "
            f"(train.sampling balanced): about {n / present:,.0f} draws per class")
    if start is not None:
        log(_start_note(start, st.fresh))
        if seen_note:
            log(f"note: {seen_note}")
    if st.teacher is not None:
        t = st.teacher_about
        what = "mean test accuracy" if "runs" in t else "test accuracy"
        acc = f", {what} {t['test_accuracy']:.4f}" if t["test_accuracy"] is not None else ""
        of = f"the {t['runs']} runs of {t['run']}" if "runs" in t else t["run"]
        log(f"distilling from {of} ({t['model']}{acc}): loss = {1 - t['weight']:g} x cross-entropy + "
            f"{t['weight']:g} x T^2 x KL to its softmax at T = {t['temperature']:g}")
    if st.policy is not None:
        a = cfg.augment
        what = (f"one of {len(OPS)} operations at a random strength (TrivialAugment)"
                if a.auto_augment == "trivialaugment" else
                f"{a.randaugment_ops} of {len(OPS)} operations in turn at level {a.randaugment_magnitude} of 30 "
                "(RandAugment)")
        log(f"each training image gets {what}, each drawn at random"
            + (f", before the {a.preset} preset" if a.preset != "none" else ""))
    if mixes := [f"{name} (alpha {alpha:g})" for name, alpha in (("MixUp", cfg.augment.mixup),
                                                                     ("CutMix", cfg.augment.cutmix)) if alpha]:
        log(f"each step mixes pairs of its images by {' or '.join(mixes)}"
            f"{', one of the two at random' if len(mixes) == 2 else ''}, and their labels by the same shares")
    if st.average is not None:
        log(f"the run ends on a moving average of its weights, each step moving it by "
            f"{1 - cfg.optim.ema_momentum:.4g} (Keras' use_ema, ema_momentum {cfg.optim.ema_momentum:g}); the "
            "validation figures are those of each epoch's own weights")
    for key, what in (("clipnorm", "each weight tensor's to a norm of at most {v:g}"),
                      ("global_clipnorm", "all together to a norm of at most {v:g}"),
                      ("clipvalue", "each element to [-{v:g}, {v:g}]")):
        if v := getattr(cfg.optim, key):
            log(f"each step's gradients are clipped, {what.format(v=v)} (Keras' {key})")
    for note in unused_settings(cfg):
        log(f"note: {note}")
    if st.selector is not None:
        log(f"each step trains on the {_trained_per_step(cfg)} of its {bs} images that {cfg.train.select_model} "
            f"({sum(p.numel() for p in st.selector.model.parameters()):,} parameters) finds hardest")


def _train_one(cfg: Config, run: Path | None, ckpt: dict | None, dataset: Dataset | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    """One run of :func:`fit`: into a new folder, or continuing ``run`` from ``ckpt``."""
    new = run is None
    device = runtime.setup(cfg.train.device, cfg.train.threads, cfg.train.deterministic)
    cfg = resolve_precision(cfg, device, log)
    runtime.check_device_options(device, cfg.train.precision, cfg.train.cuda_graph)  # fail before the data load
    if note := runtime.slow_bf16_note(device, cfg.train.precision):
        log(note)
    runtime.seed_everything(cfg.train.seed)
    before = "used"  # a resumed run's folder is never removed
    if new:
        run, before = _new_run_dir(cfg)
    with undo_on_failure(run, before):
        if new:
            save_config(cfg, run / "config.yaml")
        # the weights to start from, checked before the data load; a resumed run has its own
        start = _read_start(cfg) if new and cfg.model.init_from else None
        if cfg.train.teacher:
            _read_teacher(cfg)  # checked before the data load too
        ds = _load_data(cfg, dataset, log)
        if cfg.data.subset and (note := subset_note(cfg.data.subset, len(ds.y_train),
                                                    f"training images of {ds.source}", len(ds.classes))):
            log(note)
        arrays, inherited = _split_and_record(run, cfg, ds, device, new)
        n, bs = len(arrays.x_train), cfg.train.batch_size
        steps = steps_per_epoch(n, cfg)
        if steps == 0:
            raise CifarlabError(f"train.drop_last leaves no full batch: {n} training images, batch size {bs}; "
                                "use a smaller --batch-size, or keep the last partial batch with 'drop_last: false' "
                                "under 'train:' in a --config file")
        use_kernels = _use_cpu_kernels(cfg, device, log)
        if start is not None and start.channels != arrays.x_train.shape[1]:
            raise CifarlabError(f"model.init_from (--init-from) '{start.run}' takes {start.channels}-channel images "
                                f"and this data has {arrays.x_train.shape[1]}-channel ones")
        # a resumed fine-tune keeps the preprocessing it started with, without its source run
        saved_prep = _saved_prep(run) if not new and cfg.model.init_from else None
        st = _build(cfg, ds, arrays, device, steps, use_kernels, start, saved_prep)
        c, h, w = arrays.x_train.shape[1:]
        save_architecture(run, cfg.model.name, st.model_kwargs, ds.classes, (int(c), int(h), int(w)), st.prep,
                          st.num_params, cfg.train.channels_last)
        if ckpt is not None:
            log(_resume_note(run, ckpt, cfg.train.epochs))
        log(f"run folder: {run}")
        counts, seen_note = _start_report(start, inherited, cfg, ds, arrays) if start is not None else ({}, None)
        _describe_setup(cfg, ds, arrays, st, device, start, seen_note, log)
        if start is not None:  # kept beside the run, as keras_import.json is: its model card names where it started
            write_json(run / "init_from.json", {**start.about, "fresh": list(st.fresh), **counts})
        loop = _Loop(cfg, run, st, arrays, device, steps, use_kernels, ckpt)
    interrupts = _Interrupts()
    st.model.train()
    try:
        with interrupts.installed():
            for epoch in range(loop.start_epoch, cfg.train.epochs):
                if loop.stopping.stopped:
                    break
                log(loop.run_epoch(epoch, interrupts))
    except torch.cuda.OutOfMemoryError:
        also = "; or set train.prepare_ahead: false, which prepares each batch as it comes instead of " \
               "holding the whole epoch's" if loop.prepare_ahead else ""
        raise CifarlabError(f"the GPU ran out of memory with batch size {bs}; try a smaller one, for example "
                            f"--batch-size {max(1, bs // 2)}{also}") from None

    return _finish(cfg, run, ds, arrays, st, loop, device, log)


def _finish(cfg: Config, run: Path, ds: Dataset, arrays: Arrays, st: _Setup, loop: _Loop, device: torch.device,
            log: Callable[[str], None]) -> dict[str, Any]:
    """After the last epoch: the final weights, the history, and the test figures."""
    clock = _Clock(device)  # the final weights are training's work: airbench times its last lookahead update
    if st.lookahead is not None:
        st.lookahead.update(st.model, 1.0)  # end on the slow weights, as airbench does
    if st.average is not None:
        st.average.apply()
    loop.train_time += clock.elapsed()
    if st.average is not None:
        log(f"ending on the moving average of the weights (optim.ema_momentum {cfg.optim.ema_momentum:g})")
    if loop.stopping.best_state is not None:
        st.model.load_state_dict(loop.stopping.best_state)
        if loop.stopping.best_epoch != len(loop.history):
            log(f"restoring the weights of epoch {loop.stopping.best_epoch}, {loop.stopping.describe()} "
                f"({loop.stopping.best:.4f})")
    save_weights(run / "weights.safetensors", st.model)
    write_history(run, loop.history)
    # Said before it starts: with test-time augmentation on a CPU the test takes a minute or more.
    tta = "" if cfg.train.tta == "none" else f" with test-time augmentation {cfg.train.tta}"
    log(f"testing on {len(arrays.x_test):,} images{tta}")
    clock = _Clock(device)
    metrics = _test_metrics(cfg, ds, arrays, st, device, loop.train_time)
    # Timed apart from training: airbench's published times count their final test-time-augmented
    # evaluation, so a side-by-side comparison needs this figure too.
    metrics["test_time_s"] = clock.elapsed()
    if not math.isfinite(metrics["test_loss"]):  # without validation images, the first sign of a last step's overflow
        (run / "weights.safetensors").unlink()  # weights whose outputs overflow are no trained run
        raise NonFiniteLoss(_nan_message(len(loop.history) - 1, None, cfg, "the test loss is NaN or infinite (the "
                                         "model's outputs overflow after the last steps)", "Its weights are not kept."))
    metrics["cpu_kernels"] = loop.cpu_kernels  # whether cifarlab's own CPU kernels ran (see cpu_kernels)
    metrics["epochs_trained"] = len(loop.history)
    if (run / "init_from.json").is_file():  # the run it started from, and what kept fresh weights
        metrics["init_from"] = read_json(run / "init_from.json")
    if st.teacher_about is not None:  # for the model card: the teacher's data shaped this model too
        metrics["teacher"] = st.teacher_about
    if loop.stopping.patience:
        metrics["early_stopping"] = loop.stopping.summary()
    if st.class_weight is not None:
        metrics["class_weight"] = _class_weight_summary(cfg, ds, st.class_weight)
    if st.logit_offset is not None:  # for the model card, beside the images per class
        metrics["logit_adjustment"] = {"tau": cfg.train.logit_adjustment, "offsets": {
            c: float(f"{v:.7g}") for c, v in zip(ds.classes, st.logit_offset.cpu().tolist())}}
    metrics["sampling"] = cfg.train.sampling  # for the model card, beside the images per class
    # the conv gradients too: float32 only, so never under bf16 autocast
    metrics["cpu_conv_kernel"] = loop.cpu_kernels and cfg.train.precision == "fp32" and kernels.conv_kernel_pays_off()
    write_json(run / "metrics.json", metrics)
    log(f"Test score: {metrics['test_loss']:.4f}")
    log(f"Test accuracy: {metrics['test_accuracy']:.4f}")
    for hint in (_divergence_hint(cfg, metrics["test_loss"], len(ds.classes)),
                 _balance_hint(cfg, metrics["data"].get("train_per_class") or {}, run)):
        if hint:
            log(hint)
    metrics["run"] = str(run)
    return metrics


def _divergence_hint(cfg: Config, test_loss: float, n_classes: int, limit: float = 100.0) -> str | None:
    """A warning for a finite test loss of ``limit`` nats or more: the true class's probability
    e^-100 on average, which weights that diverged give (RMSprop at lr 0.3 on keras-deep: 5.8e8)
    and the NaN checks miss. A model that overfits is confidently wrong too, but by a few nats:
    ten times a uniform guess's loss (7 for two classes of random images) is no mark of divergence."""
    if test_loss < limit:
        return None
    return (f"warning: the test loss {test_loss:.4g} is far above the {math.log(max(n_classes, 2)):.3f} of a uniform "
            f"guess over the {n_classes} classes: the model is confidently wrong on many images, and its weights "
            f"most likely diverged; train again with a lower --lr than {cfg.optim.lr:g}")


def _balance_hint(cfg: Config, per_class: dict[str, int], run: Path, ratio: float = 2.0) -> str | None:
    """A pointer to ``cifarlab calibrate --balance-classes`` for a run trained on the data as it
    is (no class weights, no balanced sampling, no logit adjustment), with validation images to calibrate on, whose
    largest training class had at least ``ratio`` times the images of its smallest."""
    counts = [n for n in per_class.values() if n]
    if (not counts or max(counts) < ratio * min(counts) or not cfg.data.val_split
            or cfg.train.class_weight is not None or cfg.train.sampling != "shuffle" or cfg.train.logit_adjustment):
        return None
    return (f"note: its training classes were unequal ({min(counts):,} to {max(counts):,} images); to predict as if "
            f"they were equally likely, as in a balanced test set: cifarlab calibrate {run} --balance-classes")


def _class_weight_summary(cfg: Config, ds: Dataset, weights: torch.Tensor) -> dict[str, Any]:
    """train.class_weight as given and the weight it gave each class, for metrics.json and the model card."""
    # float32 weights, shown to the digits they hold
    return {"setting": cfg.train.class_weight,
            "weights": {c: float(f"{w:.7g}") for c, w in zip(ds.classes, weights.cpu().tolist())}}


class _Loop:
    """The epochs of one run, and the state a checkpoint keeps between them: where the run
    stands (epoch, step, and the running sums of an interrupted epoch), its history and its
    training time so far. Checkpoints are taken at the end of every epoch and on an interrupt,
    never inside an optimizer update, so a resumed run is identical to an uninterrupted one."""

    def __init__(self, cfg: Config, run: Path, st: _Setup, arrays: Arrays, device: torch.device, steps: int,
                 cpu_kernels: bool, ckpt: dict | None = None):
        self.cfg, self.run, self.st, self.arrays, self.device = cfg, run, st, arrays, device
        self.steps, self.total_steps, self.cpu_kernels = steps, cfg.train.epochs * steps, cpu_kernels
        self.lr_fraction = _lr_lambda(cfg, self.total_steps)  # the schedule, for the history's learning_rate
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.dtype = runtime.compute_dtype(cfg.train.precision)  # of the model's inputs
        self.whiten_bias = getattr(getattr(st.model, "whiten", None), "bias", None)
        # what train.freeze_epochs freezes: every trainable tensor but the classifier's (the
        # whitening bias has its own switch; tensors frozen by design stay so)
        head = set(classifier_tensors(st.model))
        self.body = [p for name, p in st.model.named_parameters()
                     if p.requires_grad and name not in head and p is not self.whiten_bias]
        # and its batch norms, which a frozen phase runs in inference mode, as Keras runs a frozen
        # BatchNormalization: their running statistics stay the starting run's, as its weights do
        self.norms = [m for m in st.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.start_epoch, self.start_step, self.train_time = 0, 0, st.init_time
        self.history: list[dict[str, float]] = []
        self.partial: tuple[float, float, int] = (0.0, 0.0, 0)  # loss sum, correct, seen before the interrupt
        self.aug_state: torch.Tensor | None = None
        self.stopping = EarlyStopping(cfg.train.early_stopping, cfg.train.early_stopping_monitor,
                                      cfg.train.early_stopping_min_delta)
        if ckpt is not None:
            _restore(ckpt, st, device)
            self.history = list(ckpt["history"])
            self.start_epoch, self.start_step, self.train_time = ckpt["epoch"], ckpt["step"], ckpt["train_time_s"]
            self.partial = (ckpt["partial_loss"], ckpt["partial_correct"], ckpt["partial_seen"])
            self.aug_state = ckpt.get("aug_state")
            self.stopping.load_state_dict(ckpt.get("early_stopping"))
        self.step_fn = _step_function(cfg, st, device, cpu_kernels)
        # Without augmentation each training image reaches the teacher the same way every epoch:
        # its logits are computed once, in one inference pass, instead of in every step.
        self.soft = None
        self.mixing = bool(cfg.augment.mixup or cfg.augment.cutmix)
        if st.teacher is not None and st.augmenter is None and st.policy is None and not self.mixing:
            clock = _Clock(device)
            self.soft = self._teacher_logits()
            self.train_time += clock.elapsed()  # the teacher's work, as the steps would have done it
        # Where the validation classes are unequally many the accuracy mostly weighs the common
        # ones, so the history adds the mean per-class recall (also where a monitor watches it).
        watched = {cfg.train.early_stopping_monitor if cfg.train.early_stopping else None,
                   cfg.optim.plateau_monitor if cfg.optim.plateau_patience else None}
        self.val_balanced = len(arrays.y_val) > 0 and (unequal_classes(torch.bincount(arrays.y_val.cpu()).tolist())
                                                       or "val_balanced_accuracy" in watched)
        if self.history and "val_balanced_accuracy" not in self.history[0]:
            self.val_balanced = False  # resumed from a version without it: its history's columns stay
        ahead = cfg.train.prepare_ahead
        self.prepare_ahead = device.type == "cuda" if ahead is None else ahead

    def save(self, epoch: int, step: int, sums: tuple[float, float, int], gen: torch.Generator | None) -> None:
        """Checkpoint: the run resumes at ``step`` of ``epoch`` with the running ``sums``."""
        st = self.st
        _save_checkpoint(self.run, {
            "model": st.model.state_dict(), "optimizer": st.optimizer.state_dict(),
            "scheduler": st.scheduler.state_dict(),
            "lookahead": st.lookahead.slow if st.lookahead is not None else None,
            "average": st.average.average if st.average is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "epoch": epoch, "step": step, "history": self.history, "train_time_s": self.train_time,
            "partial_loss": float(sums[0]), "partial_correct": float(sums[1]), "partial_seen": int(sums[2]),
            "aug_state": gen.get_state() if gen is not None else None,
            "selector": st.selector.state_dict() if st.selector is not None else None,
            "early_stopping": self.stopping.state_dict(),
            "plateau": st.plateau.state_dict() if st.plateau is not None else None,
        })

    def _last_lr(self, base: float) -> float:
        """The lr ``base`` (optim.lr, or muon_lr), scheduled and cut, of the step just taken, as
        Keras logs it."""
        scale = self.st.plateau.scale if self.st.plateau is not None else 1.0
        return base * self.lr_fraction(max(0, self.st.scheduler.last_epoch - 1)) * scale

    def _plateau(self, epoch: int, logs: dict[str, float], cut: bool = True) -> str:
        """The plateau cut after epoch ``epoch`` (0-based), judged on ``logs``' monitored figure,
        where ``cut``; it applies from the next step on. Returns the log line's addition."""
        st, o = self.st, self.cfg.optim
        if not (cut and st.plateau.update(logs[st.plateau.monitor])):
            return ""
        _reapply(st.scheduler)
        if st.selector is not None:
            _reapply(st.selector.scheduler)
        lr = f"{o.lr * st.plateau.scale:.4g}" + ("" if o.schedule == "constant" else " times the schedule")
        return f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {lr}."

    def batch(self, idx: torch.Tensor, gen: torch.Generator, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of images ``idx``: converted, augmented, normalised, on the device."""
        st, x_train = self.st, self.arrays.x_train
        if isinstance(st.augmenter, KerasAugment):
            # Keras' order: the random transform of the rescaled images, then the featurewise
            # standardisation; the augmenter reads the uint8 images itself.
            x = normalize(st.augmenter(x_train[idx], gen, input_scale=st.prep["rescale"]), st.prep)
        else:
            x = x_train[idx]
            if st.policy is not None:  # it reads the 8-bit levels, so it comes before the preprocessing
                x = st.policy(x, gen)
            x = preprocess(x, st.prep)
            if isinstance(st.augmenter, CropFlipCutout):
                x = st.augmenter(x, gen, indices=idx, epoch=epoch, seed=self.cfg.train.seed)
        return x.to(self.dtype).contiguous(memory_format=self.fmt), self.arrays.y_train[idx]

    def mixed(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch ``x`` of step ``step`` of epoch ``epoch`` as MixUp or CutMix mix it, where
        the run mixes, with the step function's ``mix`` argument (:func:`train_step`); else
        ``x`` as it is, with none."""
        if not self.mixing:
            return x, {}
        # Drawn from the run's seed, the epoch and the step alone, so a resumed epoch mixes alike.
        rng = np.random.default_rng([self.cfg.train.seed, MIX_STREAM, epoch, step])
        lam, box = draw_mix(rng, self.cfg.augment.mixup, self.cfg.augment.cutmix, tuple(x.shape[-2:]))
        x, partners = mix_batch(x, y, lam, box)
        return x, {"mix": (partners, lam)}

    def _teacher_logits(self) -> torch.Tensor:
        """The teacher's logits (float32) for every training image, made as a step would make
        them (the batch as :meth:`batch` prepares it, the run's precision and CPU kernels), in
        batches of the training batch size. Only for runs without augmentation."""
        x, bs = self.arrays.x_train, self.cfg.train.batch_size
        out = torch.empty((len(x), self.st.model_kwargs["num_classes"]), device=self.device)
        autocast = runtime.autocast(self.device, self.cfg.train.precision)
        with torch.no_grad(), autocast or nullcontext(), kernels.kernel_mode(self.cpu_kernels):
            for s in range(0, len(x), bs):
                idx = torch.arange(s, min(s + bs, len(x)), device=x.device)
                out[s:s + bs] = self.st.teacher(self.batch(idx, None, 0)[0]).float()
        return out

    def prepare_epoch(self, perm: torch.Tensor, gen: torch.Generator, epoch: int, chunk: int = 8192) -> torch.Tensor:
        """The images of every step of the epoch at once, in ``perm`` order, each made by
        :meth:`batch` as the step would make it, ``chunk`` images per call (airbench prepares
        its epochs the same way): on a GPU a few large calls instead of several small ones per
        step. The random augmentations are drawn per call, so ``chunk`` is part of what a seed
        reproduces."""
        n = min(len(perm), self.steps * self.cfg.train.batch_size)  # drop_last leaves a tail unused
        out = torch.empty((n, *self.arrays.x_train.shape[1:]), dtype=self.dtype, device=self.device,
                          memory_format=self.fmt)
        for s in range(0, n, chunk):
            out[s:s + chunk] = self.batch(perm[s:min(s + chunk, n)], gen, epoch)[0]
        return out

    def run_epoch(self, epoch: int, interrupts: _Interrupts) -> str:
        """Train one epoch (from the saved step if it was interrupted), evaluate on the validation
        images, append to the history, checkpoint; returns the epoch's log line."""
        cfg, st, device, steps = self.cfg, self.st, self.device, self.steps
        bs = cfg.train.batch_size
        frozen = epoch < cfg.train.freeze_epochs  # no gradient, so the optimizer skips them: no update, no decay
        for p in self.body:
            p.requires_grad_(not frozen)
        for m in self.norms:  # the validation pass at the epoch's end leaves them in training mode again
            m.train(not frozen)
        if self.whiten_bias is not None:
            self.whiten_bias.requires_grad_(epoch < cfg.train.whiten_bias_epochs and not frozen)
        gen = _epoch_generator(cfg.train.seed, epoch, device)
        perm = epoch_order(self.arrays.y_train, cfg.train.sampling,
                           _epoch_generator(cfg.train.seed, epoch, torch.device("cpu"))).to(device)
        first = self.start_step if epoch == self.start_epoch else 0
        if first and self.aug_state is not None and not self.prepare_ahead:
            gen.set_state(self.aug_state)
        partial = self.partial if first else (0.0, 0.0, 0)
        # Running sums stay on the device: reading them is a GPU-to-CPU sync.
        loss_sum = torch.tensor(partial[0], device=device, dtype=torch.float64)
        correct = torch.tensor(partial[1], device=device, dtype=torch.float64)
        seen = partial[2]
        interactive = sys.stderr.isatty()
        bar = tqdm(total=steps, initial=first, desc=f"Epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not interactive, leave=False, unit="step")
        clock = _Clock(device)
        # Prepared ahead, the epoch's images come from its fresh generator, also when resuming
        # mid-epoch, so a resumed epoch sees the same images.
        epoch_x = self.prepare_epoch(perm, gen, epoch) if self.prepare_ahead else None
        for step in range(first, steps):
            idx = perm[step * bs:(step + 1) * bs]
            if epoch_x is None:
                x, y = self.batch(idx, gen, epoch)
            else:
                x, y = epoch_x[step * bs:(step + 1) * bs], self.arrays.y_train[idx]
            soft = None if self.soft is None else self.soft[idx]
            if st.selector is not None:
                keep = st.selector(x, y)  # the examples the proxy finds hardest
                x, y = x[keep], y[keep]
                soft = None if soft is None else soft[keep]
            x, extra = self.mixed(x, y, epoch, step)
            if soft is not None:
                extra["soft"] = soft
            l_sum, corr = self.step_fn(x, y, **extra)
            st.scheduler.step()
            global_step = epoch * steps + step + 1
            if st.lookahead is not None and global_step % cfg.train.lookahead_every == 0:
                st.lookahead.update(st.model, cfg.train.lookahead_decay * (global_step / self.total_steps) ** 3)
            if st.average is not None:
                st.average.update(first=global_step == 1)
            if device.type == "cpu" and not math.isfinite(l_sum.item()):  # free on CPU: no device sync
                raise NonFiniteLoss(_nan_message(epoch, step, cfg))
            loss_sum += l_sum
            correct += corr
            seen += len(y)
            bar.update(1)
            if interactive and step % 50 == 0:  # GPU sync, only for the live progress bar
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
            if interrupts.flag:
                self.train_time += clock.elapsed()
                self.save(epoch, step + 1, (loss_sum.item(), correct.item(), seen), gen)
                raise TrainingInterrupted(
                    f"training stopped by {interrupts.flag} at epoch {epoch + 1}, step {step + 1}", self.run)
        self.train_time += clock.elapsed()
        bar.close()
        tr_loss, tr_acc = loss_sum.item() / seen, correct.item() / seen  # one sync per epoch
        if not math.isfinite(tr_loss):
            raise NonFiniteLoss(_nan_message(epoch, None, cfg))
        row = {"epoch": epoch + 1, "loss": tr_loss, "accuracy": tr_acc}
        if cfg.optim.schedule != "constant" or st.plateau is not None:  # an lr that changes is logged
            row["learning_rate"] = self._last_lr(cfg.optim.lr)
            if cfg.optim.name == "muon":  # the filters' own rate, on the same schedule
                row["muon_learning_rate"] = self._last_lr(cfg.optim.muon_lr)
        # The epoch's own training time, as Keras prints it; the history keeps the running total.
        epoch_time = self.train_time - (self.history[-1]["train_time_s"] if self.history else 0.0)
        line = f"Epoch {epoch + 1}/{cfg.train.epochs} - {epoch_time:.1f}s - loss: {tr_loss:.4f} - " \
               f"accuracy: {tr_acc:.4f}"
        if len(self.arrays.x_val):
            v_loss, v_acc, v_logits = evaluate_arrays(st.model, self.arrays.x_val, self.arrays.y_val, st.prep,
                                                      channels_last=cfg.train.channels_last, dtype=self.dtype,
                                                      desc="Validation")
            if not math.isfinite(v_loss):  # the epoch's last steps overflowed the weights after their loss was summed
                raise NonFiniteLoss(_nan_message(epoch, None, cfg, "the validation loss became NaN or infinite (the "
                                                                   "model's outputs overflow)"))
            row.update(val_loss=v_loss, val_accuracy=v_acc)
            line += f" - val_loss: {v_loss:.4f} - val_accuracy: {v_acc:.4f}"
            if self.val_balanced:
                row["val_balanced_accuracy"] = balanced_accuracy(self.arrays.y_val.cpu(), v_logits.argmax(1))
                line += f" - val_balanced_accuracy: {row['val_balanced_accuracy']:.4f}"
            stopped = self.stopping.update(epoch + 1, row, st.model)
            if st.plateau is not None:
                line += self._plateau(epoch, row, cut=not stopped)  # no cut for a run that ends here
            if stopped:
                es = self.stopping
                better = f"{'lower' if es.lower_is_better else 'higher'} {es.monitor}" + \
                    (f" by more than {es.min_delta:g}" if es.min_delta else "")
                line += f"\nEpoch {epoch + 1}: early stopping (no {better} for {es.patience} epochs; " \
                        f"{es.describe()}, {es.best:.4f}, was epoch {es.best_epoch}'s)"
        self.history.append({**row, "train_time_s": self.train_time})
        self.save(epoch + 1, 0, (0.0, 0.0, 0), None)
        return line


def _step_function(cfg: Config, st: _Setup, device: torch.device,
                   cpu_kernels: bool) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`train_step` bound to this run's model (compiled with ``train.compile``), optimizer,
    loss and precision: replayed as a CUDA graph with ``train.cuda_graph``, else run eagerly.
    Both together record the compiled model's fused kernels in the step's graph: compilation
    cuts the number of kernels, the graph their launch cost (the compiler's own graphs are
    refused by the config check; :func:`fit` has refused what ``device`` cannot run)."""
    model = runtime.maybe_compile(st.model, cfg.train.compile, cfg.train.compile_mode)
    if cpu_kernels:  # the step's ReLUs fused with their convolutions and pools (never with compile)
        model = kernels.fuse(model)
    scale = runtime.loss_scale(cfg.train.precision, _trained_per_step(cfg))
    if cfg.train.cuda_graph:
        # Autocast's cache of cast weights cannot live across graph replays.
        return GraphedStep(model, st.optimizer, cfg.train.label_smoothing,
                           runtime.autocast(device, cfg.train.precision, cache=False), loss_scale=scale,
                           class_weight=st.class_weight, logit_offset=st.logit_offset)
    return functools.partial(train_step, model, st.optimizer,
                             label_smoothing=cfg.train.label_smoothing, class_weight=st.class_weight,
                             logit_offset=st.logit_offset, teacher=st.teacher,
                             distill_weight=cfg.train.distill_weight,
                             distill_temperature=cfg.train.distill_temperature,
                             autocast=runtime.autocast(device, cfg.train.precision),  # built once per run
                             cpu_kernels=cpu_kernels, loss_scale=scale)


def _use_cpu_kernels(cfg: Config, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether this run's steps use :mod:`cifarlab.cpu_kernels`: fp32 or bf16-autocast eager
    training on the CPU with ``train.cpu_kernels`` on, and the kernels built and checked here
    (else a note says why). Under bf16 autocast the float32-only one (the convolution weight
    gradient) simply does not apply."""
    if not (cfg.train.cpu_kernels and device.type == "cpu" and cfg.train.precision in ("fp32", "bf16")
            and not cfg.train.compile):
        return False
    if kernels.load() is None:
        log(f"note: cifarlab's CPU kernels are not used ({kernels.unavailable_reason()}); "
            "PyTorch's kernels train the same model, more slowly")
        return False
    return True


def _load_data(cfg: Config, dataset: Dataset | None, log: Callable[[str], None]) -> Dataset:
    """The given data set, or the one ``cfg.data`` names; logs the loader's notes."""
    size = cfg.data.image_hw()
    ds = dataset if dataset is not None else load_dataset(
        cfg.data.data, cfg.data.dataset, allow_unverified=cfg.data.allow_unverified,
        label_mode=cfg.data.label_mode, skip_bad_images=cfg.data.skip_bad_images, image_size=size,
        test_split=cfg.data.test_split, labels=cfg.data.labels)
    if size is not None:
        ds = resized(ds, size)  # a data set handed in is resized too; a loaded one already is
    if cfg.data.classes:
        ds = only_classes(ds, cfg.data.classes)
    for note in ds.notes:
        log(f"data: {note}")
    if ds.num_classes < 2:
        raise CifarlabError(f"{ds.source} has {ds.num_classes} class ({', '.join(ds.classes)}); a classifier needs "
                            "at least 2, each a folder of its images under train/ and test/")
    if len(ds.x_train) == 0:
        raise CifarlabError(f"{ds.source} ({ds.kind}) holds test images only: test a trained run on it (cifarlab "
                            f"evaluate RUN --data {ds.source}), and train on data with training images")
    return ds


def load_data_for(cfg: Config, log: Callable[[str], None] = print) -> Dataset:
    """The data set ``cfg.data`` names, loaded and checked as training loads it (its notes
    logged), to be handed to :func:`fit` for several configs that read the same data."""
    return _load_data(cfg, None, log)


def _restore(ckpt: dict, st: _Setup, device: torch.device) -> None:
    """Load model, optimizer, schedule, lookahead, weight average, selector and random-number states from a
    checkpoint."""
    st.model.load_state_dict(ckpt["model"])
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scheduler.load_state_dict(ckpt["scheduler"])
    if st.lookahead is not None:
        st.lookahead.slow = list(ckpt["lookahead"])
    if st.average is not None:
        st.average.average = list(ckpt["average"])
    if st.selector is not None:
        st.selector.load_state_dict(ckpt["selector"])
    if st.plateau is not None:
        st.plateau.load_state_dict(ckpt.get("plateau"))
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)


def _test_metrics(cfg: Config, ds: Dataset, arrays: Arrays, st: _Setup, device: torch.device,
                  train_time: float) -> dict[str, Any]:
    """Test loss, accuracy (with the recipe's TTA) and per-class accuracy, with provenance.
    Computed in float32, as ``cifarlab evaluate`` loads the saved weights, so that it reproduces
    these figures: a model trained with half-precision weights is evaluated as a float32 copy
    (the upcast is exact)."""
    model = st.model
    if runtime.compute_dtype(cfg.train.precision) != torch.float32:
        model = copy.deepcopy(st.model).float()
    t_loss, t_acc, logits = evaluate_arrays(model, arrays.x_test, arrays.y_test, st.prep, tta=cfg.train.tta,
                                            channels_last=cfg.train.channels_last, desc="Test")
    y_test = arrays.y_test.cpu().numpy()
    pred = logits.argmax(1).numpy()
    per_class = {cls: float((pred[y_test == i] == i).mean()) if (y_test == i).any() else None
                 for i, cls in enumerate(ds.classes)}
    # how many images each class trained on: the model card names an imbalance
    counts = torch.bincount(arrays.y_train.cpu(), minlength=ds.num_classes).tolist()
    return {"test_loss": t_loss, "test_accuracy": t_acc, "tta": cfg.train.tta, "per_class_accuracy": per_class,
            "train_time_s": train_time, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
            "num_params": st.num_params,
            "data": {"source": ds.source, "kind": ds.kind, "train_images": len(arrays.x_train),
                     "val_images": len(arrays.x_val), "test_images": len(arrays.x_test),
                     "train_per_class": dict(zip(ds.classes, counts))},
            "device": str(device), "precision": cfg.train.precision,  # as resolved (train.precision auto)
            "cpu": runtime.cpu_name(), "versions": runtime.versions()}


def fit_runs(cfg: Config, dataset: Dataset | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg.train.runs`` times with seeds ``seed``, ``seed + 1``, ... into ``OUT/run-K``.

    Writes ``OUT/runs_summary.json`` with accuracy and training time as mean, std, min and max
    (a single run proves little at this scale) and returns it. Stopped with Ctrl-C or SIGTERM,
    ``resume_runs(OUT)`` (``cifarlab train --resume OUT``) finishes the runs.
    """
    base, before = _new_run_dir(cfg)
    with undo_on_failure(base, before):
        save_config(cfg, base / "config.yaml")
        if cfg.model.init_from:
            _read_start(cfg)  # checked before the data load, as for one run
        if cfg.train.teacher:
            _read_teacher(cfg)
        ds = _load_data(cfg, dataset, log)
    return _train_runs(base, cfg, ds, log, resume=False)


def resume_runs(base: str | Path, epochs: int | None = None, dataset: Dataset | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Finish the ``--runs N`` folder ``base``: finished runs are kept as they are, the stopped
    one resumes from its checkpoint, those not started are trained, each exactly as
    :func:`fit_runs` would have; then ``runs_summary.json`` is written again. ``epochs`` changes
    every run's number of epochs, as for a single run (see :func:`fit`)."""
    base = Path(base)
    cfg = load_run_config(base / "config.yaml")
    if epochs is not None and epochs != cfg.train.epochs:
        _check_epochs_change(base, cfg, epochs)
        for k in range(cfg.train.runs):  # every run's progress, before any file changes
            if (base / f"run-{k}" / CHECKPOINT).is_file():
                _extend(base / f"run-{k}", copy.deepcopy(cfg), _load_checkpoint(base / f"run-{k}"), epochs)
        log(f"{base}: epochs {cfg.train.epochs} -> {epochs} for all {cfg.train.runs} runs (config.yaml updated)")
        cfg.train.epochs = epochs
        save_config(cfg, base / "config.yaml")
    return _train_runs(base, cfg, dataset, log, resume=True)


def _train_runs(base: Path, cfg: Config, dataset: Dataset | None, log: Callable[[str], None],
                resume: bool) -> dict[str, Any]:
    """Train ``base/run-K`` for K < ``cfg.train.runs`` (with ``resume``, only those not finished,
    from their checkpoint where they have one), then summarise them into ``base/runs_summary.json``."""
    n = cfg.train.runs
    results = []
    for k in range(n):
        run, seed = base / f"run-{k}", cfg.train.seed + k
        m = finished_metrics(run, cfg.train.epochs) if resume else None
        if m is not None:
            log(f"--- run {k + 1}/{n} (seed {seed}): finished, test accuracy {m['test_accuracy']:.4f} ---")
        else:
            if dataset is None:  # loaded once, for the first run that trains
                dataset = _load_data(cfg, None, log)
            try:
                if resume and (run / CHECKPOINT).is_file():
                    log(f"--- run {k + 1}/{n} (seed {seed}), from its checkpoint ---")
                    m = fit(resume=run, epochs=cfg.train.epochs, dataset=dataset, log=log)
                elif resume and run.exists() and any(run.iterdir()):
                    raise CifarlabError(f"'{run}' holds files but neither a checkpoint nor the metrics of a "
                                        f"finished run, so run {k + 1} of '{base}' cannot go on from it; "
                                        "move it away and resume again to train it anew")
                else:
                    c = copy.deepcopy(cfg)
                    c.train.runs, c.train.seed, c.train.out = 1, seed, str(run)
                    log(f"--- run {k + 1}/{n} (seed {seed}) ---")
                    m = fit(c, dataset=dataset, log=log)
            except TrainingInterrupted as e:
                raise TrainingInterrupted(f"{e.what} of run {k + 1} of {n} ({run.name})", base) from None
        results.append({"seed": seed, "test_accuracy": m["test_accuracy"], "train_time_s": m["train_time_s"],
                        "test_time_s": m.get("test_time_s"),  # None from runs trained before it was timed
                        "epochs_trained": m.get("epochs_trained", m["epochs"]), "run": str(run),
                        "precision": m.get("precision")})  # the time depends on it; None from older runs
        source = m["data"]["source"]

    if dataset is None:  # every run had finished: their ensemble is tested again all the same
        dataset = _load_data(cfg, None, log)
    try:
        ensemble = _ensemble_test(base, cfg, dataset, log)
    except KeyboardInterrupt:  # no training signal handler is installed here: Ctrl-C lands as itself
        # runs_summary.json stands for a finished folder (compare, sweeps), so it waits for this test
        raise TrainingInterrupted("the test of their ensemble was interrupted", base,
                                  f"all {n} runs had finished and are kept") from None
    summary = {"runs": len(results), "recipe": cfg.recipe, "model": cfg.model.name, "data": source,
               "test_accuracy": describe([r["test_accuracy"] for r in results]),
               "train_time_s": describe([r["train_time_s"] for r in results]),
               "test_time_s": (describe([r["test_time_s"] for r in results])
                               if all(r["test_time_s"] is not None for r in results) else None),
               "ensemble": ensemble, "per_run": results}
    write_json(base / "runs_summary.json", summary)
    a, t = summary["test_accuracy"], summary["train_time_s"]
    log(f"{len(results)} runs: test accuracy mean {a['mean']:.4f} (std {a['std']:.4f}, min {a['min']:.4f}, "
        f"max {a['max']:.4f}); training time mean {t['mean']:.2f} s (std {t['std']:.2f}, min {t['min']:.2f}, "
        f"max {t['max']:.2f})")
    log(f"their ensemble (the mean of their probabilities, uncalibrated): test accuracy "
        f"{summary['ensemble']['test_accuracy']:.4f}; 'cifarlab calibrate {base}' calibrates it, 'cifarlab evaluate "
        f"{base}' gives its loss and calibration error")
    summary["run"] = str(base)
    return summary


def _ensemble_test(base: Path, cfg: Config, ds: Dataset, log: Callable[[str], None]) -> dict[str, Any]:
    """The test accuracy of the ensemble of ``base``'s runs, each with its own test-time
    augmentation, uncalibrated (a run's calibration comes after its training; ``cifarlab
    evaluate BASE`` gives the calibrated figures). Its test images are those each run was tested
    on, ``ds``'s test split."""
    from .export import ensemble_probabilities, load_ensemble

    log(f"testing their ensemble on {len(ds.y_test):,} images")
    device = runtime.select_device(cfg.train.device)
    probs = load_ensemble(base, str(device), uncalibrated=True).predict(ds.x_test)
    return {"test_accuracy": float((probs.argmax(1) == ds.y_test).mean()),
            "probabilities": ensemble_probabilities(None) + ", uncalibrated"}


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


def _nan_message(epoch: int, step: int | None, cfg: Config, what: str = "the training loss became NaN or infinite",
                 kept: str = "The checkpoint of the last completed epoch is kept.") -> str:
    where = f"epoch {epoch + 1}, step {step + 1}" if step is not None else f"epoch {epoch + 1}"
    return (f"{what} at {where}. The usual cause is a learning rate too high for this model (now "
            f"{cfg.optim.lr:g}); try --lr {cfg.optim.lr / 10:g}. {kept}")


def write_history(run: Path, history: list[dict[str, float]]) -> None:
    """Save the history as JSON, CSV and a PNG of the loss and accuracy curves."""
    from .export import list_to_csv_rows
    from .plots import plot_history

    write_json(run / "history.json", history)
    write_text(run / "history.csv", list_to_csv_rows(history))
    if history:
        plot_history(history, run / "history.png")
