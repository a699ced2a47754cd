"""One typed configuration: dataclass defaults, then the recipe, then a YAML/TOML file, then flags.

The resolved configuration is saved as ``config.yaml`` in every run folder, and a run can be
repeated from that file alone (``cifarlab train --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .errors import ConfigError, did_you_mean

# Learning-rate schedules (see cifarlab.train._lr_lambda)
SCHEDULES = ("constant", "triangle", "cosine", "step")
# Test-time augmentation levels (see cifarlab.export.tta_logits): airbench's levels 0, 1 and 2.
TTA_LEVELS = ("none", "flip", "flip-translate")
POLICIES = ("none", "trivialaugment", "randaugment")  # augment.auto_augment (see augment_policy)
# fp32; autocast to bf16 or fp16 with float32 weights; or weights in bf16 / fp16 throughout
# (the "-true" ones, Lightning's names; see cifarlab.runtime.cast_model); auto: bf16 where the
# device computes bfloat16 natively, else fp32 (cifarlab.runtime.resolve_precision).
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-true", "fp16-true", "auto")
# How an epoch orders the training images (see TrainConfig.sampling)
SAMPLINGS = ("shuffle", "balanced")
# What early stopping and plateau cuts can watch, and which way is better (Keras' mode "auto"
# infers the same); val_balanced_accuracy, the mean per-class recall, for classes of unequal size
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_balanced_accuracy": "max"}


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    data: str | None = None  # path to an archive or folder; None downloads `dataset`
    dataset: str = "cifar10"  # cifar10 | cifar100, for downloads
    val_split: float = 0.2  # fraction of the training images held out, per class (notebook: 0.2; 0: none)
    subset: int | None = None  # train on a class-balanced subset of this many images
    # seed of the subset and of the validation split; None: the run's train.seed. The runs of
    # --runs N given one hold out the same validation images, on which `cifarlab calibrate` can
    # then fit their ensemble's temperature as well as each run's
    split_seed: int | None = None
    allow_unverified: bool = False  # read official archives whose MD5 differs from the published one
    label_mode: str = "fine"  # CIFAR-100 labels: fine (100) | coarse (20)
    skip_bad_images: bool = False  # leave unreadable images out instead of stopping
    normalize: bool = False  # subtract the training images' per-channel mean, divide by their std
    # HxW (such as 32x32) every image is resized to (bilinear) as it is read, as Keras'
    # image_dataset_from_directory(image_size=...); None: the data's own size (a folder's most
    # common one). Evaluation reads a run's data at its size.
    image_size: str | None = None
    # the share of each class held out as test images from a folder of class folders alone
    # (<class>/<image>, no train/ and test/), chosen by the images' paths (data/folder.py)
    test_split: float = 0.2
    # a CSV file of file,label rows naming each image's class, for images not sorted into class
    # folders (Kaggle's trainLabels.csv, say); the test split is then held out of them, as above
    labels: str | None = None
    # train on these classes only, in this order (Keras' image_dataset_from_directory(class_names=)):
    # the others' images are left out of training, validation and test alike, so that a run can be
    # tested on classes it never saw (cifarlab ood); None: every class of the data
    classes: list[str] | None = None

    def image_hw(self) -> tuple[int, int] | None:
        """``image_size`` as (H, W); None where unset."""
        return None if self.image_size is None else parse_image_size(self.image_size, "image size (data.image_size)")


@dataclass
class ModelConfig:
    """Which registered model to build, and what its weights start from."""

    name: str = "keras-deep"
    # A run folder whose weights this run starts from, to fine-tune it (timm's
    # --initial-checkpoint, Keras' load_weights(skip_mismatch=True)): every tensor whose shape
    # fits is copied but the classifier where that run's classes are not these; the others keep
    # their fresh initialisation, and the run preprocesses images as that run did. None: from
    # scratch.
    init_from: str | None = None


@dataclass
class OptimConfig:
    """Optimizer and its hyperparameters (Keras defaults for the keras-book recipe)."""

    name: str = "rmsprop"  # rmsprop (Keras semantics) | sgd | adam | adamw | muon (filters; SGD for the rest)
    lr: float = 1e-3  # learning rate per step, for the batch size below (muon: of the non-filter tensors)
    rho: float = 0.9  # rmsprop: decay of the squared-gradient average
    eps: float = 1e-7  # rmsprop: added inside the square root; adam: added to the denominator
    # sgd; rmsprop (Keras': a running sum of the steps, decayed by it); muon's SGD groups
    momentum: float = 0.0
    centered: bool = False  # rmsprop (Keras'): divide by the gradients' estimated variance, not their mean square
    nesterov: bool = False  # sgd; muon (both kinds of group)
    beta1: float = 0.9  # adam, adamw
    beta2: float = 0.999  # adam, adamw
    # L2 added to the gradient (Keras-style kernel regularisation is not used); adamw: decoupled,
    # each step shrinking the weights by lr x weight_decay of themselves, as Keras' and PyTorch's AdamW
    weight_decay: float = 0.0
    # Keras' gradient clipping, by one of these at most (0: off), once any loss scale is undone and
    # before the weight decay and the update: clipnorm caps each tensor's gradient norm,
    # global_clipnorm the norm of all of them together (scaled alike), clipvalue each element's size
    clipnorm: float = 0.0
    global_clipnorm: float = 0.0
    clipvalue: float = 0.0
    # constant | triangle (linear warm-up to lr, then linear decay) | cosine (linear warm-up, then
    # half a cosine down: SGDR without restarts, Keras' CosineDecay with warm-up) | step (linear
    # warm-up, then the lr cut by gamma at each milestone: PyTorch's MultiStepLR, Keras'
    # PiecewiseConstantDecay)
    schedule: str = "constant"
    warmup_frac: float = 0.0  # triangle, cosine, step: fraction of all steps spent warming up
    start_lr_frac: float = 1.0  # triangle, cosine, step: lr at step 0, as a fraction of lr
    final_lr_frac: float = 0.0  # triangle, cosine: lr at the last step, as a fraction of lr
    # step: the fractions of all steps at which the lr is multiplied by gamma (He et al. 2016 cut
    # it tenfold at 32,000 and 48,000 of their 64,000 steps)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    # Keras' ReduceLROnPlateau on top of the schedule: after this many epochs in a row without a
    # plateau_monitor better by more than plateau_min_delta (in its own units), multiply every lr
    # by plateau_factor, never taking optim.lr below plateau_min_lr (the others scaled alike); the
    # plateau_cooldown - 1 epochs after a cut count towards no cut (Keras' count); 0: off. Keras'
    # defaults throughout.
    plateau_patience: int = 0
    plateau_factor: float = 0.1
    plateau_min_lr: float = 0.0
    plateau_monitor: str = "val_loss"  # or val_accuracy, val_balanced_accuracy (higher is better)
    plateau_min_delta: float = 1e-4
    plateau_cooldown: int = 0
    # lr multiplier for normalisation-layer biases, their lr x weight decay kept (airbench: 64)
    norm_bias_lr_scale: float = 1.0
    # muon: the convolution filters' lr, a step's length relative to the filters' (fixed) norm, so
    # it does not depend on the batch size or the loss's scale; their momentum; Newton-Schulz rounds
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    ns_steps: int = 3
    # Keras' use_ema: an exponential moving average of the weights, each step moving it by
    # 1 - ema_momentum (the first step's weights start it), which the run ends on; 0: off
    # (Keras' default when on: 0.99, an average over the last hundred or so steps)
    ema_momentum: float = 0.0


@dataclass
class AugmentConfig:
    """Training-time augmentation, with Keras ImageDataGenerator names and meanings.

    ``preset`` picks a named setting (none, keras, crop-flip); the other fields refine it.
    """

    preset: str = "none"
    rotation_range: float = 0.0  # degrees, drawn uniformly in [-r, r]
    # Keras' forms: a float (uniform in [-s, s]), an int (whole pixels in (-s, s)) or a list (one
    # of its values, random sign); a fraction of the width / height when under 1, else pixels
    width_shift_range: int | float | list[float] = 0.0
    height_shift_range: int | float | list[float] = 0.0
    shear_range: float = 0.0  # degrees
    zoom_range: list[float] | float = 0.0  # z gives [1-z, 1+z]
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"  # nearest | reflect | wrap | constant
    cval: float = 0.0  # fill value for constant mode, in the units of the 1/255-scaled images (0..1)
    brightness_range: list[float] | None = None
    channel_shift_range: float = 0.0  # in the units of the 1/255-scaled images, as in the notebook
    featurewise_center: bool = False  # subtract the training images' per-channel mean
    featurewise_std_normalization: bool = False  # and divide by their std (implies centring)
    crop_padding: int = 0  # crop-flip: random crop after reflect padding by this many pixels
    cutout: int = 0  # crop-flip: side of a zeroed square, 0 for none
    alternating_flip: bool = False  # crop-flip: flip each image every other epoch instead of at random
    # Before the preset's crop and flip, a policy of operations drawn per image (augment_policy):
    auto_augment: str = "none"  # none | trivialaugment | randaugment
    randaugment_ops: int = 2  # randaugment: operations per image (its N)
    randaugment_magnitude: int = 9  # randaugment: their strength, a level from 0 to 30 (its M)
    # After any preset, pairs of a batch's images mixed, their labels weighed by the same share:
    mixup: float = 0.0  # MixUp's alpha: the share ~ Beta(alpha, alpha) (0.2 to 1 usual); 0 off
    cutmix: float = 0.0  # CutMix's alpha: a box of the partner's pixels (1.0 usual); 0 off; with mixup, half each


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 20
    batch_size: int = 128
    drop_last: bool = False  # skip each epoch's last, partial batch (airbench does; Keras does not)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads; None uses every core
    out: str | None = None  # run folder; None makes runs/<recipe>-<model>-<time>
    overwrite: bool = False  # allow writing into an existing, non-empty run folder
    deterministic: bool = False  # bit-reproducible kernels (slower on GPU)
    channels_last: bool = True  # NHWC memory for convolutions: keras-deep steps ran 18% faster on a 2-core CPU
    label_smoothing: float = 0.0  # share of the target mass spread evenly over all classes
    lookahead_every: int = 0  # every k steps, pull weights to a slow EMA copy (0: off)
    lookahead_decay: float = 0.95**5  # EMA decay per lookahead update
    whiten_bias_epochs: int = 0  # models with a whitening layer: train its bias for this many epochs only
    # For this many epochs only the classifier (the last layer) trains, the rest frozen: a new
    # head learns on the features before they change, as Keras' transfer-learning guide trains a
    # new top on a frozen base first (with model.init_from). At least the run's epochs: only the
    # classifier ever trains (a linear probe). Batch norms run in inference mode while frozen.
    freeze_epochs: int = 0
    tta: str = "none"  # test-time augmentation for the final test metrics: none | flip | flip-translate
    # Weigh each training example's loss by its class, as Keras' fit(class_weight=...): null (every
    # example alike, the notebook), "balanced" (n_samples / (n_classes x the class's count), so
    # rare classes count as much as common ones in total) or a mapping of class names (or indices)
    # to weights, classes left out weighing 1. Validation and test figures stay unweighted.
    class_weight: str | dict[str, float] | None = None
    # How each epoch orders the training images: shuffle (each once, in a random order: Keras'
    # fit(shuffle=True)) or balanced (as many draws, with replacement, every class equally likely:
    # rare classes' images are seen several times an epoch, common ones' not all; PyTorch's
    # WeightedRandomSampler). An alternative to class_weight, not to be combined with it.
    sampling: str = "shuffle"
    # tau of the logit-adjusted loss (Menon et al., 2021): the training loss sees each logit plus
    # tau x log(the class's share of the training images), so that predictions from the plain
    # logits treat the classes as equally likely; 0: off (the notebook), 1: the paper's choice.
    # Another alternative to class_weight and balanced sampling, not to be combined with them.
    logit_adjustment: float = 0.0
    # fp32 | bf16 (autocast; 14x slower on an AVX2 CPU without bf16 units) | fp16 (autocast, CUDA
    # only) | bf16-true | fp16-true (CUDA only): half-precision weights, batch norms in float32 |
    # auto: bf16 where the device has bfloat16 units (a GPU of compute capability 8.0 or more, a
    # CPU with AVX-512 BF16 or AMX), else fp32; the run's config.yaml records the one it resolved to
    precision: str = "fp32"
    compile: bool = False  # torch.compile the model for training (pays off on long GPU runs only)
    # torch.compile's mode for the model: default | reduce-overhead | max-autotune (CUDA graphs and
    # tuned kernels, as airbench94_muon compiles; minutes of compilation) | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # Replay each training step as one CUDA graph (CUDA, constant lr); with compile, the graph
    # records the compiled (fused) kernels
    cuda_graph: bool = False
    # Convert, augment and normalise each epoch's training images at its start, 8192 per call,
    # so a step only slices (null: on CUDA only, where each small call's fixed cost outweighs
    # its work; the epoch then takes 4 bytes per value of device memory, 614 MB for 50,000
    # CIFAR images, or 2 bytes under the "-true" precisions)
    prepare_ahead: bool | None = None
    # CPU: cifarlab's own kernels (fp32 dropout, 3x3 conv gradients without AVX-512; augmentation), where they build
    cpu_kernels: bool = True
    runs: int = 1  # train this many times with seeds seed, seed+1, ... and report mean/std/min/max
    # Stop after this many epochs in a row without a better early_stopping_monitor, and end on the
    # weights of the best epoch (Keras' EarlyStopping(patience=N, restore_best_weights=True));
    # 0: off, every epoch trains and the last one's weights are kept, as the notebook does
    early_stopping: int = 0
    # What early stopping watches: val_loss (lower is better), val_accuracy or val_balanced_accuracy
    # (the mean per-class recall; higher is better)
    early_stopping_monitor: str = "val_loss"
    # Keras' min_delta: a change of the monitored figure by this much or less is no improvement
    # (in its own units: loss, or accuracy as a fraction); 0: any change counts
    early_stopping_min_delta: float = 0.0
    # Hard-example selection (cifarlab.selection): each step trains on this fraction of its batch,
    # the examples a small proxy net (select_model) finds hardest; the proxy trains alongside, on
    # the examples it keeps, every select_backward_every steps. 1: every example, no proxy
    # (airbench96_faster: 0.5, every 4). optim.lr then applies to the kept examples' mean loss.
    select_fraction: float = 1.0
    select_model: str = "speednet-proxy"
    select_backward_every: int = 4
    # Knowledge distillation (Hinton et al., 2015): a trained run (its folder; or a --runs N folder,
    # whose runs teach as an ensemble, the mean of their logits) whose predictions the model learns
    # from as well as the labels. The loss is (1 - distill_weight) x the cross-entropy
    # with the labels + distill_weight x T^2 x KL(teacher || model) of both softmaxes at temperature
    # T = distill_temperature (higher: softer targets that show which wrong classes the teacher
    # finds likely; T^2 keeps their gradients' scale). null: off (the notebook).
    teacher: str | None = None
    distill_weight: float = 0.5  # the soft targets' share of the loss, in [0, 1]; the labels' is the rest
    distill_temperature: float = 4.0  # T; 1 is the teacher's own probabilities


@dataclass
class Config:
    """Everything a training run needs; see :func:`resolve_config`."""

    recipe: str = "keras-book"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for YAML/JSON)."""
        return dataclasses.asdict(self)


SECTIONS = ("data", "model", "optim", "augment", "train")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The choices and defaults of commands other than train live here too, so that the CLI can
# offer them without importing the modules (and PyTorch) that carry the commands out.
EXPLAIN_METHODS = ("gradcam", "occlusion", "integrated-gradients")
EXPLAIN_SELECTIONS = ("wrong", "right", "random")
# cifarlab export --int8: how ONNX Runtime takes each tensor's range from the calibration images.
# Not its "entropy": quantize_static builds that histogram with as many bins as it quantizes to,
# leaving one candidate range, the whole one (the same scales as minmax for keras-deep, checked).
CALIBRATION_METHODS = ("minmax", "percentile")
# Chosen by looking at random pairs of the JPEG copy of CIFAR-10 (docs/reports.md, near-copies): 44 of 48 pairs
# scoring 0.96 or more were the same photograph, against about 34 of 48 from 0.95 to 0.96.
DUPLICATES_THRESHOLD = 0.96
DUPLICATES_SHIFT = 3  # pixels each way: the shifts seen among CIFAR's near-duplicates are small
DUPLICATES_CANDIDATES = 20  # more finds a few more shifted copies, at linear cost


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (as a string or type) and convert it."""
    def bad() -> ConfigError:  # in the words of _type_name, so that each type is named one way
        return ConfigError(f"{where}: {value!r} is not valid; expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise bad()
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, where) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise bad()
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(number):  # YAML's .inf and .nan, or --lr inf: no setting means them
            raise ConfigError(f"{where}: {value!r} is not valid; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, os.PathLike):  # a notebook's pathlib.Path for --data, --out, --init-from
            return os.fspath(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        return str(value)
    return value


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}


def _type_name(tp: Any) -> str:
    """What a value of type ``tp`` looks like, in the words of the other messages: ``int | None``
    is "a whole number or null"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = [w for a in args if not (a is int and float in args)  # a number takes whole ones
                 for w in (("true", "false") if a is bool else (_type_name(a),))]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    return {list: "a list", dict: "a mapping"}.get(origin) or _TYPE_WORDS.get(tp, str(tp))


def _section_hint(name: str) -> str:
    """What a top-level name that is no section may have meant: a key written outside its section
    (``epochs: 3`` for ``train: {epochs: 3}``, as flat option names tempt one to) or a misspelt section."""
    key = name.replace("-", "_")
    if target := option_keys().get(key):
        sec, k = target
        return f" ('{name}' is the key {sec}.{k}: put it inside section '{sec}')"
    return did_you_mean(name, SECTIONS)


def apply_overrides(cfg: Config, values: dict[str, Any], origin: str) -> Config:
    """Set ``values`` (nested ``{section: {key: value}}`` or ``{"recipe": name}``) on ``cfg``.

    Unknown sections or keys raise :class:`ConfigError` listing the valid ones.
    """
    for sec, sub in values.items():
        if sec == "recipe":
            cfg.recipe = _coerce(sub, str, f"{origin}: recipe")
            continue
        if sec not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{sec}'{_section_hint(sec)}; valid sections: "
                              f"recipe, {', '.join(SECTIONS)}")
        if not isinstance(sub, dict):
            raise ConfigError(f"{origin}: section '{sec}' must be a mapping of keys to values, found {sub!r}")
        target = getattr(cfg, sec)
        hints = typing.get_type_hints(type(target))
        for key, value in sub.items():
            if key not in hints:
                raise ConfigError(f"{origin}: unknown key '{sec}.{key}'{_key_hint(sec, key, hints)}; valid "
                                  f"keys in '{sec}': {', '.join(hints)}")
            setattr(target, key, _coerce(value, hints[key], f"{origin}: {sec}.{key}"))
    return cfg


def _key_hint(sec: str, key: str, hints: dict) -> str:
    """Where a key unknown in section ``sec`` is one of another section (``train.lr`` for
    ``optim.lr``), that section's key; else the closest key of ``sec``, if any."""
    homes = [f"'{other}.{key}'" for other in _key_sections().get(key, []) if other != sec]
    if homes:
        return f" ({key} is set in another section: {' or '.join(homes)})"
    return did_you_mean(key, hints)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so 'epochs: 2' and a later 'epochs: 3' would train 3 without a word); TOML
    refuses it already."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                break  # the safe loader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first at line {seen[key].line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def read_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file; syntax errors name the line, and
    messages call the file ``what``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{what} '{path}': TOML syntax error: {e}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{what} '{path}': YAML syntax error{where}: {problem}") from None
    else:
        raise ConfigError(f"{what} '{path}' must end in .yaml, .yml or .toml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections, found {type(data).__name__}")
    return data


def given_augment_keys(*layers: dict[str, Any]) -> list[str]:
    """The augment keys that ``layers`` (augment sections, earliest first: a file's, the flags')
    set with the preset or after it, for :func:`settle_preset`. Those of a layer before the one
    that picks the preset give way to it, as a later setting wins; and a layer that holds every
    key is a saved ``config.yaml``, whose fields at their defaults meant the preset's values where
    it was written before presets were written out, so it sets none."""
    every = {f.name for f in dataclasses.fields(AugmentConfig)}
    start = max((i for i, a in enumerate(layers) if "preset" in a), default=0)
    return [k for a in layers[start:] if not every <= set(a) for k in a]


def settle_preset(a: AugmentConfig, given: Iterable[str], origin: str = "command line") -> None:
    """Write the augmentation preset's own settings into the fields of ``a`` left at their
    defaults, so that a saved config shows what trains (and reads back to the same). A field in
    ``given`` (the augment keys set with the preset or after it) that is at its default where the
    preset's value differs is refused: under a preset, a field at its default keeps the preset's
    value, so ``rotation_range: 0`` could not switch the notebook's rotation off, and would be
    ignored."""
    from .augment import PRESET_SETTINGS

    default, given = AugmentConfig(), set(given)
    own = PRESET_SETTINGS.get(a.preset, {})
    unset = [k for k, v in own.items() if getattr(a, k) == getattr(default, k) != v]  # the preset's to fill in
    off = [k for k in unset if k in given]
    if off:
        add = ", ".join(f"{k}: {str(own[k]).lower() if isinstance(own[k], bool) else repr(own[k])}"
                        for k in unset if k not in off)
        instead = (f"give preset none with the rest of the notebook's settings ({add})" if a.preset == "keras" else
                   "for random flips alone, give preset none with horizontal_flip: true")
        raise ConfigError(f"{origin}: {', '.join(f'augment.{k} = {getattr(a, k)!r}' for k in off)} cannot switch off "
                          f"the {a.preset} preset's {', '.join(f'{k} = {own[k]!r}' for k in off)}: under a preset a "
                          f"setting at its default keeps the preset's; {instead}")
    for k in unset:
        setattr(a, k, own[k])


def resolve_config(recipe: str | None = None, file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, origin: str = "command line") -> Config:
    """Defaults, then the recipe's settings, then the config file, then ``overrides`` (CLI flags;
    ``origin`` is where error messages say they came from).

    The recipe is taken from ``recipe`` if given, else from the file, else ``keras-book``.
    """
    from .recipes import apply_recipe

    file_values = read_config_file(file) if file else {}
    name = recipe or file_values.get("recipe") or "keras-book"
    cfg = apply_recipe(Config(), str(name))
    if file_values:
        apply_overrides(cfg, file_values, f"config file '{file}'")
    if overrides:
        apply_overrides(cfg, overrides, origin)
    if recipe:
        cfg.recipe = recipe
    layers = [v["augment"] if isinstance(v.get("augment"), dict) else {} for v in (file_values, overrides or {})]
    settle_preset(cfg.augment, given_augment_keys(*layers), f"config file '{file}' and {origin}" if file and overrides
                  else f"config file '{file}'" if file else origin)
    validate(cfg)
    return cfg


# Options by one flat name, as `cifarlab train` flags and `make_config` keywords take them: every
# key by its own name where no other section has it, and these by the CLI's name, where the key's
# own is shared (model.name, optim.name) or the flag says more (--augment PRESET, Keras'
# --reduce-lr-on-plateau PATIENCE).
OPTION_ALIASES: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "optimizer": ("optim", "name"), "augment": ("augment", "preset"),
    "reduce_lr_on_plateau": ("optim", "plateau_patience"), "reduce_lr_factor": ("optim", "plateau_factor"),
    "min_lr": ("optim", "plateau_min_lr"), "reduce_lr_monitor": ("optim", "plateau_monitor"),
    "reduce_lr_min_delta": ("optim", "plateau_min_delta"), "reduce_lr_cooldown": ("optim", "plateau_cooldown"),
    "ema": ("optim", "ema_momentum"),
}


def _key_sections() -> dict[str, list[str]]:
    """Each config key's name, and the sections that have a key of that name."""
    owners: dict[str, list[str]] = {}
    for sec in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), sec)):
            owners.setdefault(f.name, []).append(sec)
    return owners


def option_keys() -> dict[str, tuple[str, str]]:
    """Every option name :func:`make_config` takes, and the (section, key) it sets."""
    unique = {name: (secs[0], name) for name, secs in _key_sections().items() if len(secs) == 1}
    return {**unique, **OPTION_ALIASES}


def options_to_overrides(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat options (``epochs=5``, ``model="keras-shallow"``) as the nested overrides that
    :func:`resolve_config` takes; an unknown name raises :class:`ConfigError` with the nearest
    valid ones."""
    import difflib

    keys, out = option_keys(), {}
    for name, value in options.items():
        if name not in keys:
            if secs := _key_sections().get(name):  # model.name and optim.name
                names = [a for a, (sec, key) in OPTION_ALIASES.items() if key == name and sec in secs]
                hint = f"it is a key of {' and '.join(f'{s}.{name}' for s in secs)}: give {' or '.join(names)}"
            elif near := difflib.get_close_matches(name, list(keys), n=3):
                hint = f"did you mean {' or '.join(near)}?"
            else:
                hint = ("give a flag of 'cifarlab train' without its dashes (lr, epochs, batch_size) or a config "
                        "key as section.key, such as optim.rho ('cifarlab train --print-config' shows every key; "
                        "in Python, cifarlab.config.option_keys() lists every option)")
            raise ConfigError(f"unknown option '{name}'; {hint}")
        sec, key = keys[name]
        out.setdefault(sec, {})[key] = value
    return out


def make_config(recipe: str | None = None, file: str | Path | None = None, **options: Any) -> Config:
    """The configuration of a training run, validated: the recipe's settings (default
    ``keras-book``), then the YAML/TOML ``file``, then ``options`` by the names of
    ``cifarlab train``'s flags (``data=``, ``epochs=``, ``model=``, ``lr=``) or of any other
    config key (``rho=``, ``schedule=``; :func:`option_keys` lists them all). Change its fields
    and pass it to :func:`cifarlab.fit`, which checks it again.

    >>> cfg = make_config("keras-book", data="cifar10-jpeg.tar.xz", epochs=5)  # doctest: +SKIP
    """
    return resolve_config(recipe, file, options_to_overrides(options), origin="make_config()")


def read_settings(image_size: str | None = None, test_split: float | None = None) -> DataConfig:
    """The data section that ``--image-size`` and ``--test-split`` give (the defaults where
    None), checked as ``train`` checks them: how a command without a run reads an image folder."""
    cfg = Config()
    given = {"image_size": image_size, "test_split": test_split}
    apply_overrides(cfg, {"data": {k: v for k, v in given.items() if v is not None}}, "command line")
    validate(cfg)
    return cfg.data


def parse_image_size(text: str, where: str = "--image-size") -> tuple[int, int]:
    """(H, W) from "HxW" (such as 32x32 or 64X48) or one number for square images; a clear
    error naming ``where`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", str(text))
    if not m or int(m[1]) < 1 or int(m[2] or m[1]) < 1:
        raise ConfigError(f"{where} '{text}' is not valid; expected HxW such as 32x32, or one number for square "
                          "images")
    return int(m[1]), int(m[2] or m[1])


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of auto, cpu, cuda or cuda:N, the devices cifarlab can be told to use."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def _bad(key: str, value: Any, valid: str, names: Iterable[str] = ()) -> NoReturn:
    """Refuse ``value`` of ``key``, saying what is ``valid``; of a name among ``names``, the
    one it was probably meant to be too."""
    near = did_you_mean(value, names) if isinstance(value, str) else ""
    raise ConfigError(f"{key} = {value!r} is not valid{near}; {valid}")


def _refuse_set(sec: Any, section: str, keys: tuple[str, ...], why: str) -> None:
    """Options that would do nothing in this config: set away from their defaults, they are
    taken for a mistake and refused, saying ``why``."""
    for key in keys:
        if getattr(sec, key) != getattr(type(sec)(), key):
            _bad(f"{section}.{key}", getattr(sec, key), why)


def _refuse_unused(sec: Any, section: str, switch: str, flag: str, feature: str, keys: tuple[str, ...]) -> None:
    """Options of a feature switched on by a number of epochs, while it is off (:func:`_refuse_set`)."""
    _refuse_set(sec, section, keys, f"it only applies with {feature} on: set {section}.{switch} ({flag}) to a number "
                                    "of epochs too")


def _check_model(m: ModelConfig) -> None:
    from .models import list_models

    if m.name not in list_models():
        _bad("model", m.name, f"valid models: {', '.join(list_models())}", list_models())
    if m.init_from is not None and not str(m.init_from).strip():
        _bad("model.init_from", m.init_from, "give a run folder written by 'cifarlab train', or leave it out")


def _check_data(d: DataConfig) -> None:
    if not 0 <= d.val_split < 1:
        _bad("validation split (data.val_split)", d.val_split,
             "it must lie in [0, 1); 0 trains on every training image with no validation")
    if d.subset is not None and d.subset < 1:
        _bad("subset", d.subset, "it must be a positive number of images")
    if d.split_seed is not None and not 0 <= d.split_seed < 2**32:  # NumPy's and scikit-learn's seed range
        _bad("data.split_seed", d.split_seed, f"it must lie in [0, {2**32 - 1}], or be left out for the run's seed")
    if not d.val_split and not d.subset:
        _refuse_set(d, "data", ("split_seed",), "it seeds --subset and the validation split, and this config has "
                                                "neither: set data.val_split (--val-split) above 0")
    if d.dataset not in ("cifar10", "cifar100"):
        _bad("dataset", d.dataset, "choose cifar10 or cifar100", ("cifar10", "cifar100"))
    if d.label_mode not in ("fine", "coarse"):
        _bad("data.label_mode", d.label_mode, "choose fine or coarse", ("fine", "coarse"))
    if not 0 < d.test_split < 1:
        _bad("test split (data.test_split)", d.test_split, "it must lie strictly between 0 and 1, such as 0.2")
    if d.labels is not None and not d.data:
        _bad("data.labels", d.labels, "it names the classes of the images in data.data (--data); give that too")
    if d.classes is not None:
        names = [str(c).strip() for c in d.classes]
        doubled = sorted({c for c in names if c and names.count(c) > 1})
        if len(names) < 2 or "" in names or doubled:
            why = ("an empty name" if "" in names else f"{', '.join(doubled)} given twice" if doubled else "")
            _bad("data.classes", d.classes, "give two or more different class names of the data, such as "
                 "airplane,automobile,bird" + (f" ({why})" if why else ""))
        d.classes = names
    if d.image_size is not None:
        h, w = d.image_hw()
        d.image_size = f"{h}x{w}"  # one spelling in the saved config


def _check_optim(o: OptimConfig) -> None:
    from .optim import CLIPPING, OPTIMIZERS

    if o.name not in OPTIMIZERS:
        _bad("optimizer", o.name, f"valid optimizers: {', '.join(OPTIMIZERS)}", OPTIMIZERS)
    if not o.lr > 0:
        _bad("learning rate (optim.lr)", o.lr, "it must be greater than 0")
    if o.weight_decay < 0:
        _bad("optim.weight_decay", o.weight_decay, "it must be 0 or more")
    if not 0 <= o.momentum < 1:
        _bad("optim.momentum", o.momentum, "it must lie in [0, 1)")
    if o.name != "rmsprop":
        _refuse_set(o, "optim", ("centered",), f"it is an option of rmsprop, and the optimizer is {o.name}")
    for key in CLIPPING:
        if getattr(o, key) < 0:
            _bad(f"optim.{key}", getattr(o, key), "it must be 0 (off) or a positive number")
    if sum(bool(getattr(o, key)) for key in CLIPPING) > 1:
        given = " and ".join(f"optim.{key} = {getattr(o, key):g}" for key in CLIPPING if getattr(o, key))
        raise ConfigError(f"{given} are not valid together: clip the gradients by one of --clipnorm, "
                          "--global-clipnorm and --clipvalue at most, as Keras allows; set the others to 0")
    if not 0 < o.rho < 1:
        _bad("optim.rho", o.rho, "it must lie strictly between 0 and 1")
    if not o.muon_lr > 0:
        _bad("optim.muon_lr", o.muon_lr, "it must be greater than 0")
    if not 0 <= o.muon_momentum < 1:
        _bad("optim.muon_momentum", o.muon_momentum, "it must lie in [0, 1)")
    if not 1 <= o.ns_steps <= 20:
        _bad("optim.ns_steps", o.ns_steps, "it must lie in [1, 20]")
    if not 0 <= o.ema_momentum < 1:
        _bad("optim.ema_momentum", o.ema_momentum, "it must lie in [0, 1): 0 for no average, such as 0.99 (Keras' "
             "default) for one over about the last hundred steps")
    if o.schedule not in SCHEDULES:
        _bad("optim.schedule", o.schedule, f"choose {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}", SCHEDULES)
    if not o.norm_bias_lr_scale > 0:
        _bad("optim.norm_bias_lr_scale", o.norm_bias_lr_scale, "it must be greater than 0")
    if not 0 <= o.warmup_frac <= 1:
        _bad("optim.warmup_frac", o.warmup_frac, "it must lie in [0, 1]")
    if not o.milestones or any(not 0 < m < 1 for m in o.milestones) or o.milestones != sorted(set(o.milestones)):
        _bad("optim.milestones", o.milestones, "give fractions of all steps in increasing order, each strictly "
             "between 0 and 1, such as [0.5, 0.75]")
    if not 0 < o.gamma < 1:
        _bad("optim.gamma", o.gamma, "it must lie in (0, 1): each milestone multiplies the lr by it")
    if o.schedule != "step":
        _refuse_set(o, "optim", ("milestones", "gamma"), "it only applies with optim.schedule step (--schedule step); "
                    f"the schedule is {o.schedule}")
    if o.plateau_patience < 0:
        _bad("optim.plateau_patience", o.plateau_patience, "it must be 0 (off) or a number of epochs")
    if not 0 < o.plateau_factor < 1:
        _bad("optim.plateau_factor", o.plateau_factor, "it must lie in (0, 1): each cut multiplies the lr by it")
    if not (0 <= o.plateau_min_lr < math.inf):
        _bad("optim.plateau_min_lr", o.plateau_min_lr, "it must be 0 or more")
    if o.plateau_monitor not in MONITORS:
        _bad("optim.plateau_monitor", o.plateau_monitor, f"choose {' or '.join(MONITORS)}", MONITORS)
    if not (o.plateau_min_delta >= 0 and math.isfinite(o.plateau_min_delta)):
        _bad("optim.plateau_min_delta", o.plateau_min_delta, "it must be 0 or more, in the monitored figure's units")
    if o.plateau_cooldown < 0:
        _bad("optim.plateau_cooldown", o.plateau_cooldown, "it must be 0 or a number of epochs")
    if not o.plateau_patience:
        _refuse_unused(o, "optim", "plateau_patience", "--reduce-lr-on-plateau", "plateau cuts",
                       ("plateau_factor", "plateau_min_lr", "plateau_monitor", "plateau_min_delta",
                        "plateau_cooldown"))


def parse_class_weight(text: str) -> str | dict[str, float]:
    """A class weighting as text: ``balanced``, ``none``, or ``NAME=WEIGHT`` pairs separated by
    commas (``cat=2,dog=0.5``), as the mapping :class:`TrainConfig` keeps."""
    if text.strip() in ("balanced", "none"):
        return text.strip()
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{text!r} is not valid; give balanced, none or NAME=WEIGHT,NAME=WEIGHT (for example "
                              "cat=2,dog=0.5)")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ConfigError(f"{part!r}: the weight {weight!r} is not a number") from None
    return weights


def _check_class_balance(t: TrainConfig) -> None:
    """Class weights, balanced sampling and the logit-adjusted loss: one of them at most."""
    if isinstance(t.class_weight, str) and "=" in t.class_weight:  # the text of --class-weight (a sweep's value)
        try:
            t.class_weight = parse_class_weight(t.class_weight)
        except ConfigError as e:
            raise ConfigError(f"train.class_weight: {e}") from None
    if t.class_weight == "none":  # --class-weight none: as if left out
        t.class_weight = None
    cw = t.class_weight
    if isinstance(cw, str) and cw != "balanced":
        _bad("train.class_weight", cw, "give balanced, a mapping of class names to weights (on the command line "
             "NAME=WEIGHT,NAME=WEIGHT), or leave it out")
    if isinstance(cw, dict) and (bad_weights := {k: v for k, v in cw.items() if v < 0}):
        _bad("train.class_weight", bad_weights, "a class's weight must be 0 or more")
    if t.sampling not in SAMPLINGS:
        _bad("train.sampling", t.sampling, f"choose {' or '.join(SAMPLINGS)}", SAMPLINGS)
    if t.sampling == "balanced" and cw is not None:
        _bad("train.sampling", t.sampling, "with train.class_weight set too, rare classes would be favoured "
             "twice over (drawn more often and weighed more); choose one of them")
    la = t.logit_adjustment
    if isinstance(la, bool) or not isinstance(la, (int, float)) or not math.isfinite(la) or la < 0:
        _bad("train.logit_adjustment", la, "it must be a number of 0 or more (1: the logit-adjusted loss as "
             "published; 0: off)")
    if la and (cw is not None or t.sampling == "balanced"):
        _bad("train.logit_adjustment", la, "with train.class_weight or train.sampling balanced set too, rare "
             "classes would be favoured twice over; choose one of them")


def _check_train(t: TrainConfig) -> None:
    from .models import list_models

    if t.epochs < 1:
        _bad("epochs", t.epochs, "it must be at least 1")
    if t.batch_size < 1:
        _bad("batch size", t.batch_size, "it must be at least 1")
    _check_class_balance(t)
    if not 0 <= t.label_smoothing < 1:
        _bad("train.label_smoothing", t.label_smoothing, "it must lie in [0, 1)")
    if t.tta not in TTA_LEVELS:
        _bad("train.tta", t.tta, "choose none, flip or flip-translate", TTA_LEVELS)
    if t.precision not in PRECISIONS:
        _bad("train.precision", t.precision, f"choose {', '.join(PRECISIONS)}", PRECISIONS)
    if t.freeze_epochs < 0:
        _bad("train.freeze_epochs", t.freeze_epochs, "it must be 0 (off) or a number of epochs")
    if t.compile_mode not in COMPILE_MODES:
        _bad("train.compile_mode", t.compile_mode, f"choose {', '.join(COMPILE_MODES)}", COMPILE_MODES)
    if t.compile_mode != "default" and not t.compile:
        _bad("train.compile_mode", t.compile_mode, "it takes effect only with train.compile: true (--compile); "
             "set that too, or leave the mode at default")
    if t.early_stopping < 0:
        _bad("train.early_stopping", t.early_stopping, "it must be 0 (off) or a number of epochs")
    if t.early_stopping_monitor not in MONITORS:
        _bad("train.early_stopping_monitor", t.early_stopping_monitor, f"choose {' or '.join(MONITORS)}",
             MONITORS)
    if not (t.early_stopping_min_delta >= 0 and math.isfinite(t.early_stopping_min_delta)):
        _bad("train.early_stopping_min_delta", t.early_stopping_min_delta,
             "it must be 0 or more, in the monitored figure's units")
    if not t.early_stopping:
        _refuse_unused(t, "train", "early_stopping", "--early-stopping", "early stopping",
                       ("early_stopping_monitor", "early_stopping_min_delta"))
    if t.runs < 1:
        _bad("runs", t.runs, "it must be at least 1")
    if not 0 <= t.seed <= 2**32 - t.runs:  # NumPy's and scikit-learn's seed range
        _bad("seed", t.seed, f"with {t.runs} run(s) it must lie in [0, {2**32 - t.runs}]")
    if t.lookahead_every < 0:
        _bad("train.lookahead_every", t.lookahead_every, "it must be 0 (off) or a number of steps")
    if not 0 <= t.lookahead_decay < 1:
        _bad("train.lookahead_decay", t.lookahead_decay, "it must lie in [0, 1)")
    if not t.lookahead_every:
        _refuse_set(t, "train", ("lookahead_decay",),
                    "it only applies with lookahead on: set train.lookahead_every to a number of steps too")
    if not 0 < t.select_fraction <= 1:
        _bad("train.select_fraction", t.select_fraction, "it must lie in (0, 1]; 1 trains on every example")
    if t.select_fraction < 1 and t.select_model not in list_models():
        _bad("train.select_model", t.select_model, f"valid models: {', '.join(list_models())}", list_models())
    if t.select_backward_every < 1:
        _bad("train.select_backward_every", t.select_backward_every, "it must be at least 1")
    if t.teacher is not None and not str(t.teacher).strip():
        _bad("train.teacher", t.teacher, "give a run folder written by 'cifarlab train', or leave it out")
    if isinstance(t.distill_weight, bool) or not isinstance(t.distill_weight, (int, float)) \
            or not 0 <= t.distill_weight <= 1:
        _bad("train.distill_weight", t.distill_weight, "it must lie in [0, 1]: the soft targets' share of the loss")
    if isinstance(t.distill_temperature, bool) or not isinstance(t.distill_temperature, (int, float)) \
            or not (math.isfinite(t.distill_temperature) and t.distill_temperature > 0):
        _bad("train.distill_temperature", t.distill_temperature, "it must be a number above 0, such as 4")
    if t.teacher is None:
        _refuse_set(t, "train", ("distill_weight", "distill_temperature"),
                    "it only applies with a teacher: set train.teacher (--teacher) to a run folder too")
    if t.threads is not None and t.threads < 1:
        _bad("threads", t.threads, "it must be at least 1")
    if not is_device_name(t.device):
        _bad("device", t.device, "choose auto, cpu, cuda or cuda:N")


def _check_mixing(a: AugmentConfig) -> None:
    """The mixing alphas; the presets' own values are checked as the augmenter is built
    (:func:`cifarlab.augment.augmenter_from_config`)."""
    for key in ("mixup", "cutmix"):
        if getattr(a, key) < 0:  # a number already: not NaN or infinite
            _bad(f"augment.{key}", getattr(a, key), "it is the alpha of a Beta(alpha, alpha) draw: a number above 0, "
                 "or 0 for off")


def _check_policy(a: AugmentConfig) -> None:
    """The augmentation policy: its name, RandAugment's values and the preset it goes with are
    checked as it is built (:func:`cifarlab.augment_policy.policy_from_config`)."""
    from .augment_policy import policy_from_config

    policy_from_config(a)
    if a.auto_augment != "randaugment":
        _refuse_set(a, "augment", ("randaugment_ops", "randaugment_magnitude"),
                    "it only applies to RandAugment: set augment.auto_augment (--auto-augment) to randaugment too")


def _check_across_sections(cfg: Config) -> None:
    """Settings valid alone that cannot go together: what a CUDA graph fixes at capture, and
    what watches validation figures without validation images."""
    from .models import has_whitening

    t, o = cfg.train, cfg.optim
    if t.cuda_graph and t.teacher is not None:
        _bad("train.cuda_graph", True, "the captured step does not run a teacher; train with train.teacher "
             "(--teacher) without the CUDA graph")
    if t.cuda_graph and o.schedule != "constant":
        _bad("train.cuda_graph", True, f"a CUDA graph bakes in the learning rate, so it needs optim.schedule "
             f"constant (this config has {o.schedule!r})")
    if t.cuda_graph and o.plateau_patience:
        _bad("train.cuda_graph", True, "a CUDA graph bakes in the learning rate, so it cannot cut it on a plateau; "
             "set optim.plateau_patience to 0")
    if t.cuda_graph and (cfg.augment.mixup or cfg.augment.cutmix):
        _bad("train.cuda_graph", True, "a CUDA graph fixes the step's images and labels at capture, and MixUp and "
             "CutMix draw new pairs and weights every step; train without one of the two")
    if t.cuda_graph and t.freeze_epochs:
        _bad("train.cuda_graph", True, "a CUDA graph fixes which parameters train, so it cannot unfreeze the model "
             f"after train.freeze_epochs = {t.freeze_epochs}; set that to 0")
    if t.cuda_graph and t.whiten_bias_epochs and has_whitening(cfg.model.name):
        _bad("train.cuda_graph", True, "a CUDA graph fixes which parameters train, so it cannot stop training the "
             f"whitening bias after train.whiten_bias_epochs = {t.whiten_bias_epochs}; set that to 0")
    if t.cuda_graph and t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        _bad("train.compile_mode", t.compile_mode, "with train.cuda_graph the whole step is already one CUDA "
             "graph, and this mode records graphs of its own; choose default or max-autotune-no-cudagraphs, whose "
             "kernels the step's graph records")
    if o.plateau_patience and not cfg.data.val_split:
        _bad("optim.plateau_patience", o.plateau_patience, f"it watches {o.plateau_monitor}, so it "
             "needs validation images: set data.val_split (--val-split) above 0")
    if t.early_stopping and not cfg.data.val_split:
        _bad("train.early_stopping", t.early_stopping, f"it watches {t.early_stopping_monitor}, so "
             "it needs validation images: set data.val_split (--val-split) above 0")
    if t.early_stopping and t.lookahead_every:
        _bad("train.early_stopping", t.early_stopping, "a run with lookahead ends on its slow weights, not "
             "on one epoch's; set train.lookahead_every to 0 or turn early stopping off")
    if o.ema_momentum and t.early_stopping:
        _bad("optim.ema_momentum", o.ema_momentum, "a run with early stopping ends on one epoch's weights, not on "
             "their average; set it to 0 or turn early stopping off")
    if o.ema_momentum and t.lookahead_every:
        _bad("optim.ema_momentum", o.ema_momentum, "a run with lookahead ends on its own slow weights, an average "
             "of another kind; set it to 0 or train.lookahead_every to 0")


def validate(cfg: Config) -> None:
    """Check types (converting as a config file's values are: a ``Path`` to text, say), value
    ranges and names; raise :class:`ConfigError` naming the first bad value. Types are checked
    here, not only where values are read, for fields a notebook set by hand."""
    from .augment import augmenter_from_config

    for sec in SECTIONS:
        target = getattr(cfg, sec)
        for key, tp in typing.get_type_hints(type(target)).items():
            setattr(target, key, _coerce(getattr(target, key), tp, f"{sec}.{key}"))
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_train(cfg.train)
    _check_mixing(cfg.augment)
    _check_policy(cfg.augment)
    _check_across_sections(cfg)
    augmenter_from_config(cfg.augment)  # raises ConfigError for bad augmentation values


def unused_settings(cfg: Config) -> list[str]:
    """What ``cfg`` sets away from the defaults that its choices do not read, one note per
    choice: another optimizer's options (``optim.momentum`` with adamw), another schedule's
    (a warm-up under ``constant``), another augmentation preset's (``crop_padding`` under
    ``keras``), a whitening layer's (``train.whiten_bias_epochs`` for a model without one),
    normalisation layers' (``optim.norm_bias_lr_scale`` for a model without them, muon aside).
    Training logs them rather than refusing them: they are what a recipe leaves behind when a
    flag swaps one of its choices (``--recipe fast --optimizer adamw`` keeps fast's SGD
    momentum), and one sweep may compare optimizers under the same flags."""
    from .augment import PRESET_KEYS
    from .models import has_whitening, meta_model
    from .optim import OPTIMIZER_KEYS, SCHEDULE_KEYS, norm_bias_lr_scaled

    notes = []
    for section, table, chosen, what, kind in (
            ("optim", OPTIMIZER_KEYS, cfg.optim.name, cfg.optim.name, "optimizers"),
            ("optim", SCHEDULE_KEYS, cfg.optim.schedule, f"the {cfg.optim.schedule} schedule", "schedules"),
            ("augment", PRESET_KEYS, cfg.augment.preset, f"the {cfg.augment.preset} augmentation preset",
             "presets")):
        sec, default = getattr(cfg, section), type(getattr(cfg, section))()
        others = sorted({k for keys in table.values() for k in keys} - set(table.get(chosen, ())))
        if unused := [f"{section}.{k} = {getattr(sec, k)!r}" for k in others
                      if getattr(sec, k) != getattr(default, k)]:
            notes.append(f"{what} does not use {', '.join(unused)} (options of other {kind}, from the recipe or "
                         "given; ignored)")
    if cfg.train.whiten_bias_epochs and not has_whitening(cfg.model.name):
        notes.append(f"{cfg.model.name} has no whitening layer, so train.whiten_bias_epochs = "
                     f"{cfg.train.whiten_bias_epochs} does nothing (an option of the speednet models; ignored)")
    if cfg.optim.norm_bias_lr_scale != 1 and not norm_bias_lr_scaled(meta_model(cfg.model.name), cfg.optim):
        notes.append(f"{cfg.model.name} has no normalisation layer, so optim.norm_bias_lr_scale = "
                     f"{cfg.optim.norm_bias_lr_scale!r} does nothing under {cfg.optim.name} (it scales the lr of "
                     "norm layers' biases; with muon, of every 1-D tensor; ignored)")
    return notes


def config_yaml(cfg: Config) -> str:
    """The config as the YAML text that ``--config`` and :func:`load_run_config` read back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .fsutil import write_text

    write_text(path, config_yaml(cfg))


def load_run_config(path: str | Path) -> Config:
    """Read a saved ``config.yaml`` back into a :class:`Config` (no recipe re-applied)."""
    values = read_config_file(path)
    cfg = Config()
    apply_overrides(cfg, values, f"config file '{path}'")
    return cfg
