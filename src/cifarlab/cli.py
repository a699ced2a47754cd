"""The ``cifarlab`` command line: one small function per subcommand."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (CALIBRATION_METHODS, COMPILE_MODES, MONITORS, POLICIES, PRECISIONS, SAMPLINGS, SCHEDULES,
                     TTA_LEVELS, parse_image_size, read_settings)
from .errors import CifarlabError, ConfigError, TrainingInterrupted, did_you_mean

EPILOG = """examples:
  cifarlab train --data cifar10-jpeg.tar.xz                 # the notebook's recipe (keras-deep, 20 epochs)
  cifarlab train --data DATA --augment keras --epochs 5     # with the notebook's ImageDataGenerator
  cifarlab evaluate runs/RUN --data DATA                    # Test score / Test accuracy, per class
  cifarlab calibrate runs/RUN                               # temperature scaling on its validation images
  cifarlab predict runs/RUN cat.png dog.jpg                 # top-3 classes per image
  cifarlab audit runs/RUN --data DATA                       # disaggregated report + MODEL_CARD.md
  cifarlab robustness runs/RUN --data DATA                  # accuracy under noise, blur, fog, JPEG...
  cifarlab datasheet --data DATA                            # the data's classes, copies, colour cues; DATASHEET.md
  cifarlab duplicates runs/RUN --data DATA                  # test images copied in training; accuracy without
  cifarlab explain runs/RUN --class cat                     # where it looks in the cats it gets most wrong
  cifarlab label-issues runs/RUN                            # test images whose label is probably wrong
  cifarlab ood runs/RUN                                     # does it know noise when it sees it?
  cifarlab compare runs/A runs/B --data DATA                # is B really more accurate than A?
  cifarlab export runs/RUN                                  # RUN/model.onnx for ONNX Runtime
  cifarlab import cifar10_weights.h5 --architecture cifar10_architecture.json  # the notebook's saved model
  cifarlab summary keras-deep                               # Keras-style layer table (or of runs/RUN)
  cifarlab cache --clear                                    # free the room that decoded data takes in the cache
"""

# The train flags that set a config key (by config.options_to_overrides' rule: the key's own name,
# or one of config.OPTION_ALIASES); flags left unset (None) override nothing.
_TRAIN_OPTIONS = (
    "data", "dataset", "subset", "image_size", "test_split", "labels", "classes", "val_split", "split_seed",
    "allow_unverified",
    "skip_bad_images", "label_mode",
    "model", "optimizer", "lr", "momentum", "centered", "nesterov", "weight_decay", "epochs", "batch_size", "seed",
    "device", "threads", "out", "overwrite", "deterministic", "augment", "auto_augment", "mixup", "cutmix", "runs", "tta",
    "label_smoothing", "precision",
    "compile", "compile_mode", "cuda_graph", "cpu_kernels", "select_fraction", "early_stopping",
    "early_stopping_monitor", "early_stopping_min_delta", "reduce_lr_on_plateau", "reduce_lr_factor", "min_lr",
    "reduce_lr_monitor", "reduce_lr_min_delta", "reduce_lr_cooldown", "ema", "clipnorm", "global_clipnorm",
    "clipvalue", "schedule", "init_from", "freeze_epochs",
    "class_weight", "sampling", "logit_adjustment", "teacher", "distill_weight", "distill_temperature",
)


def _add_tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", nargs="?", const="flip", choices=TTA_LEVELS,
                   help="test-time augmentation: none, flip (also --tta alone: the image and its mirror) or "
                        "flip-translate; default: the run's own (its train.tta), as its training reported")


def _add_uncalibrated_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uncalibrated", action="store_true",
                   help="the model's own probabilities, without what 'cifarlab calibrate' fitted (its temperature, "
                        "and class offsets where it balanced the classes; by default used where there is a "
                        "calibration for the test-time augmentation)")


def _add_report_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """The options a report command ends with: test-time augmentation, calibration, the
    report's folder (``out_help``), JSON on stdout and the device."""
    _add_tta_arg(p)
    _add_uncalibrated_arg(p)
    p.add_argument("--out", help=out_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_device_arg(p)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda or cuda:N")


_DATA_HEAD = "official CIFAR archive (.tar.gz) or its folder, a CIFAR-10.1 or CIFAR-10.2 file (or their folder), an " \
             ".npz of arrays x_train, y_train, x_test, y_test (as keras.datasets gives them), or " \
             "an image folder/archive with train/<class>/* and test/<class>/* (or <class>/* alone"
_OWN_DATA = "the run's own, as its config.yaml names it"
# --data's help after _DATA_HEAD, by how a command takes a run's data (_add_data_args' ``run``)
_DATA_TAIL = {
    None: ": see --test-split; or images anywhere with --labels); omitted: download --dataset",
    "test": ", or images anywhere with --labels: the run's own data is tested on its held-out split, other data on "
            f"every image the run did not train or validate on); omitted: {_OWN_DATA}",
    "own": f", with a test split held out; or images anywhere with --labels); omitted: {_OWN_DATA}",
    "optional": f", with a test split held out; or images anywhere with --labels); omitted: {_OWN_DATA}, or "
                "without a run, download --dataset",
}


# the destinations of _add_data_args' options (--subset aside), none set unless given
_DATA_OPTIONS = ("data", "dataset", "allow_unverified", "skip_bad_images", "label_mode", "labels")


def _given_flags(args: argparse.Namespace, dests: Sequence[str]) -> list[str]:
    """The flags of ``dests`` given on the command line: set to a value, where they default to
    None or False (a value 0 counts as given)."""
    return [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) is not None and getattr(args, d) is not False]


def _refuse_flags(flags: list[str], applies_to: str, instead: str = "") -> None:
    """Refuse ``flags`` given where they do nothing: '--a and --b apply to ``applies_to``;
    ``instead`` leave them out'."""
    if flags:
        many = len(flags) > 1
        raise ConfigError(f"{' and '.join(flags)} {'apply' if many else 'applies'} to {applies_to}; {instead}leave "
                          f"{'them' if many else 'it'} out")


def _add_data_args(p: argparse.ArgumentParser, subset: str | None = None, run: str | None = None) -> None:
    """The data options, and ``--subset`` with the help text ``subset`` where the command uses
    it (evaluation reads every test image). ``run``: how the command takes a run's data, where
    it takes a run: 'test' (tests it), 'own' (must be its own) or 'optional' (a run or none)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help=_DATA_HEAD + _DATA_TAIL[run])
    g.add_argument("--dataset", choices=["cifar10", "cifar100"], help="data set to download when --data is omitted")
    if subset:
        g.add_argument("--subset", type=int, help=subset)
    g.add_argument("--allow-unverified", action="store_true", default=None,
                   help="read an official archive whose MD5 differs from the published one")
    g.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="leave unreadable image files out instead of stopping")
    g.add_argument("--label-mode", choices=["fine", "coarse"], help="CIFAR-100 labels (default fine)")
    g.add_argument("--labels", metavar="CSV",
                   help="CSV file of file,label rows naming each image's class, for --data whose images are not "
                        "in class folders (such as Kaggle's trainLabels.csv); a test split is held out of them")


def _add_read_args(p: argparse.ArgumentParser) -> None:
    """How image folders are read: ``--image-size`` and ``--test-split``, for the commands that
    read data without a run (a run's commands read it as the run was trained)."""
    p.add_argument("--image-size", metavar="HxW",
                   help="resize every image to HxW (bilinear) as it is read, such as 32x32 for larger photos "
                        "(default: the data's own size; an image folder's most common one)")
    p.add_argument("--test-split", type=float, metavar="FRACTION",
                   help="share of each class held out as test images where the data is a folder of class folders "
                        "alone, <class>/<image> without train/ and test/ (default 0.2; chosen by the images' paths)")


class _Parser(argparse.ArgumentParser):
    """Subcommand parser: no abbreviated options (``--epoch`` must not silently mean ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab train``'s options."""
    t = sub.add_parser("train", help="train a model; writes a run folder",
                       description="Train a model. Values come from the recipe, then --config, then flags.")
    t.add_argument("--config", help="YAML or TOML file with sections data/model/optim/augment/train")
    t.add_argument("--recipe", help="named recipe (default keras-book; see 'cifarlab list')")
    t.add_argument("--model", help="registered model name (see 'cifarlab list')")
    t.add_argument("--init-from", metavar="RUN",
                   help="start from RUN's weights, to fine-tune it: the classifier (where RUN's classes are "
                        "others) and tensors whose shape differs here start fresh; images are preprocessed as "
                        "RUN's were")
    t.add_argument("--freeze-epochs", type=int, metavar="N",
                   help="train only the classifier (the last layer) for the first N epochs, the rest frozen, then "
                        "everything (default 0; N >= --epochs: only the classifier)")
    _add_data_args(t, subset="use a class-balanced subset of N training images")
    _add_read_args(t)
    t.add_argument("--classes", type=_class_names, metavar="NAME,NAME,...",
                   help="train on these classes only, in this order (default: every class of the data); the "
                        "others' images are left out, to test later with 'cifarlab ood' how the run meets them")
    t.add_argument("--val-split", type=float,
                   help="fraction of training images held out, per class (default 0.2; 0: no validation)")
    t.add_argument("--split-seed", type=int, metavar="N",
                   help="seed of --subset and of the validation split (default: --seed); with --runs N, every run "
                        "holds out the same validation images, on which 'cifarlab calibrate OUT' can also calibrate "
                        "their ensemble")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="passes over the training images (keras-book: 20)")
    g.add_argument("--batch-size", type=int, help="images per step (keras-book: 128)")
    g.add_argument("--optimizer",
                   help="rmsprop (Keras semantics), sgd, adam, adamw (Adam with decoupled weight decay) or muon "
                        "(convolution filters; SGD for the rest)")
    g.add_argument("--lr", type=float, help="learning rate per step, as given: a new --batch-size does not rescale it "
                                          "(keras-book: 0.001, Keras' RMSprop default)")
    g.add_argument("--momentum", type=float,
                   help="momentum of sgd, and of rmsprop as Keras' RMSprop has it (a running sum of the steps); "
                        "default 0")
    g.add_argument("--centered", action="store_true", default=None,
                   help="rmsprop: divide by the gradients' estimated variance rather than their mean square "
                        "(Keras' centered)")
    g.add_argument("--nesterov", action="store_true", default=None, help="sgd with Nesterov momentum")
    g.add_argument("--weight-decay", type=float,
                   help="L2 penalty added to each gradient (keras-book: 0); with adamw, the share of the lr by which "
                        "each step shrinks the weights (Keras' AdamW default: 0.004)")
    g.add_argument("--clipnorm", type=float, metavar="C",
                   help="scale each weight tensor's gradient down to a norm of at most C (Keras' clipnorm; "
                        "default 0: off)")
    g.add_argument("--global-clipnorm", type=float, metavar="C",
                   help="scale all the gradients alike, down to a joint norm of at most C (Keras' global_clipnorm; "
                        "default 0: off)")
    g.add_argument("--clipvalue", type=float, metavar="V",
                   help="clamp each gradient element to [-V, V] (Keras' clipvalue; default 0: off); one of the "
                        "three clippings at most")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning rate over the run: constant (keras-book), triangle (linear warm-up over "
                        "optim.warmup_frac of the steps, then linear decay; fast, best) or cosine (the same "
                        "warm-up, then half a cosine down), each decay ending at optim.final_lr_frac of --lr "
                        "(default 0); or step (the lr multiplied by optim.gamma, default 0.1, at each of "
                        "optim.milestones, fractions of all steps, default 0.5 and 0.75; resnet)")
    g.add_argument("--reduce-lr-on-plateau", type=int, metavar="PATIENCE",
                   help="multiply the lr by --reduce-lr-factor after PATIENCE epochs without a better "
                        "--reduce-lr-monitor (Keras' ReduceLROnPlateau; default 0: off)")
    g.add_argument("--reduce-lr-factor", type=float, metavar="F", help="the plateau cut's factor (default 0.1)")
    g.add_argument("--min-lr", type=float, metavar="LR", help="plateau cuts stop at this lr (default 0)")
    g.add_argument("--reduce-lr-monitor", choices=list(MONITORS),
                   help="what plateau cuts watch: val_loss (default; lower is better), val_accuracy or "
                        "val_balanced_accuracy (the mean per-class recall)")
    g.add_argument("--reduce-lr-min-delta", type=float, metavar="DELTA",
                   help="a change of the watched figure by DELTA or less is no improvement (Keras' min_delta; "
                        "default 1e-4)")
    g.add_argument("--reduce-lr-cooldown", type=int, metavar="N",
                   help="Keras' cooldown: the N-1 epochs after a cut count towards no cut (default 0)")
    g.add_argument("--ema", type=float, metavar="MOMENTUM",
                   help="end on an exponential moving average of the weights, each step moving it by 1 - MOMENTUM "
                        "(Keras' use_ema and ema_momentum; 0.99 usual; default 0: off)")
    g.add_argument("--augment", help="augmentation preset: none, keras (the notebook's ImageDataGenerator), crop-flip")
    g.add_argument("--auto-augment", choices=POLICIES,
                   help="a policy of image operations before the preset's crop and flip: trivialaugment (one "
                        "operation per image at a random strength) or randaugment (augment.randaugment_ops of them "
                        "at augment.randaugment_magnitude, default 2 at 9 of 30); default none")
    g.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="MixUp: each step's images mixed in pairs, and their labels by the same shares, drawn from "
                        "Beta(ALPHA, ALPHA) (0.2 to 1 usual; default 0: off)")
    g.add_argument("--cutmix", type=float, metavar="ALPHA",
                   help="CutMix: a box of each image filled from its partner's, its area's share from "
                        "Beta(ALPHA, ALPHA) (1 usual; default 0: off); with --mixup, each step one of the two")
    g.add_argument("--select-fraction", type=float,
                   help="train each step on this fraction of its batch, the examples a small proxy net finds "
                        "hardest (default 1: all; best-select: 0.5); --lr then applies to their mean loss")
    g = t.add_argument_group("run")
    g.add_argument("--label-smoothing", type=float, help="share of target mass spread over all classes")
    g.add_argument("--class-weight", type=_class_weight_arg, metavar="balanced|NAME=W,...",
                   help="weigh each training example's loss by its class (Keras' class_weight): balanced "
                        "(n_samples / (n_classes x the class's count), for classes of unequal size), "
                        "NAME=WEIGHT,... (class names or indices; the others weigh 1), or none (default)")
    g.add_argument("--sampling", choices=SAMPLINGS,
                   help="how each epoch orders the training images: shuffle (default: each once) or balanced "
                        "(as many draws with replacement, every class equally likely; instead of --class-weight)")
    g.add_argument("--logit-adjustment", type=float, metavar="TAU",
                   help="the logit-adjusted loss (Menon et al., 2021), for classes of unequal size: the loss sees "
                        "each logit plus TAU x log(its class's training share), so predictions treat the classes "
                        "as equally likely (1: as published; default 0, off; instead of --class-weight and "
                        "--sampling balanced)")
    g.add_argument("--teacher", metavar="RUN",
                   help="knowledge distillation (Hinton et al., 2015): learn from RUN's softened predictions as "
                        "well as from the labels, such as a small model from a large one (same classes and image "
                        "size; the teacher's own preprocessing); a --runs N folder teaches as an ensemble, the mean "
                        "of its runs' logits")
    g.add_argument("--distill-weight", type=float, metavar="A",
                   help="with --teacher: the soft targets' share of the loss, the labels' being 1 - A (default 0.5)")
    g.add_argument("--distill-temperature", type=float, metavar="T",
                   help="with --teacher: the softmax temperature of both models' soft targets (default 4)")
    g.add_argument("--tta", choices=TTA_LEVELS, help="test-time augmentation for the final test")
    g.add_argument("--runs", type=int, help="train N times (seeds seed..seed+N-1); report mean/std/min/max")
    g.add_argument("--sweep", action="append", metavar="OPTION=V1,V2,...",
                   help="train once (or --runs N times) for each combination of the values given, each in its own "
                        "folder of --out, and rank them by validation accuracy in sweep_summary.json; OPTION is an "
                        "option of train (lr, batch-size), a config key (optim.rho) or recipe; quote a value that "
                        "holds commas (class-weight=balanced,'cat=2,dog=1'); repeatable")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better --early-stopping-monitor and keep the best "
                        "epoch's weights (Keras' EarlyStopping with restore_best_weights; default 0: off)")
    g.add_argument("--early-stopping-monitor", choices=list(MONITORS),
                   help="what early stopping watches: val_loss (default; lower is better), val_accuracy or "
                        "val_balanced_accuracy (the mean per-class recall)")
    g.add_argument("--early-stopping-min-delta", type=float, metavar="DELTA",
                   help="a change of the monitored figure by DELTA or less is no improvement (Keras' min_delta; "
                        "default 0)")
    g.add_argument("--seed", type=int, help="seed of the weights, the validation split, batch order, dropout "
                                          "and augmentation (default 0)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--deterministic", action="store_true", default=None, help="bit-reproducible kernels")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 (default); bf16 or fp16 autocast; bf16-true or fp16-true: half-precision weights; "
                        "auto: bf16 where the device has bfloat16 units, else fp32")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (long GPU runs)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode with --compile (default: default; max-autotune adds CUDA graphs "
                        "and tuned kernels, after minutes of compilation)")
    g.add_argument("--cuda-graph", action="store_true", default=None,
                   help="replay each step as one CUDA graph (small models on a GPU; constant lr only)")
    g.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false", default=None,
                   help="on the CPU, use PyTorch's kernels only, not cifarlab's own (dropout, ReLU with pooling, "
                        "augmentation, RMSprop, and conv gradients on CPUs without AVX-512)")
    g.add_argument("--out", help="run folder (default runs/<recipe>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", default=None, help="write into an existing run folder")
    g.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint with its saved config "
                   "(the folder of --runs N: finish all its runs); with --epochs, train a constant-lr run longer "
                   "(or shorter)")
    g.add_argument("--print-config", action="store_true",
                   help="print the config these options resolve to, as YAML that --config reads back, and exit "
                        "without reading data or training")
    f = t.add_argument_group("learning-rate range test (instead of training)")
    f.add_argument("--lr-find", action="store_true",
                   help="train these options for a few steps with the lr rising geometrically over --lr-range, "
                        "plot the loss against it and suggest an lr (Smith's range test, as fastai's lr_find); "
                        "writes --out (default runs/lr-find-<recipe>-<model>-<time>), no model")
    f.add_argument("--lr-range", metavar="MIN,MAX", default="1e-7,10",
                   help="the lrs the test runs from and to (default 1e-7,10); Muon's filters keep their ratio")
    f.add_argument("--lr-find-steps", type=int, default=200, metavar="N",
                   help="steps of the test (default 200); it stops sooner once the loss blows up")
    t.set_defaults(func=cmd_train)


def _class_names(text: str) -> list[str]:
    """``--classes``' comma-separated names, as a list (config.validate checks them)."""
    return [c.strip() for c in text.split(",")]


def _class_weight_arg(text: str) -> str | dict[str, float]:
    """``--class-weight``'s value: balanced, none, or NAME=WEIGHT pairs separated by commas."""
    from .config import parse_class_weight

    try:
        return parse_class_weight(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab evaluate``'s options."""
    e = sub.add_parser("evaluate", help="test a trained run: loss, accuracy, per-class metrics, plots")
    e.add_argument("run", help="run folder written by 'cifarlab train' (the folder of --runs N: each run, and "
                               "mean, std, min and max over them)")
    _add_data_args(e, run="test")
    _add_tta_arg(e)
    _add_uncalibrated_arg(e)
    e.add_argument("--out", help="folder for the report files (default RUN/eval, or RUN/eval-<data name>-<hash> on "
                                 "other data than the run's own, so each data's report is kept; for a --runs folder, "
                                 "OUT/run-K and OUT/eval_summary.json)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_device_arg(e)
    e.set_defaults(func=cmd_evaluate)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab predict``'s options."""
    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("run", help="run folder written by 'cifarlab train' (or 'cifarlab import'); the folder of --runs N "
                                "predicts with the mean of its runs' probabilities (their ensemble)")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    pr.add_argument("--min-confidence", type=float, metavar="P",
                    help="mark an image 'uncertain' where its top probability is below P (0 < P <= 1), to leave it "
                         "to a person; 'cifarlab evaluate' shows the share answered and the accuracy at thresholds")
    pr.add_argument("--flag-unfamiliar", action="store_true",
                    help="mark an image 'unfamiliar' where its OOD score is below the threshold 'cifarlab ood RUN' "
                         "fitted (kept by 95%% of the run's validation images): unlike the images it was trained on; "
                         "for the folder of --runs N, their ensemble's threshold from 'cifarlab ood OUT'")
    pr.add_argument("--sets", action="store_true",
                    help="also give each image's prediction set: the classes it may be, as many as the model's "
                         "doubt needs, which hold the true class for the share of images 'cifarlab calibrate "
                         "--sets' fitted them for (an empty set: no class is plausible enough)")
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the predictions as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the predictions as CSV")
    _add_tta_arg(pr)
    _add_uncalibrated_arg(pr)
    pr.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    pr.set_defaults(func=cmd_predict)


def _add_audit_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab audit``'s options."""
    a = sub.add_parser("audit", help="disaggregated evaluation and a model card")
    a.add_argument("run", help="run folder written by 'cifarlab train' (the folder of --runs N: each run, and each "
                               "class's and group's accuracy as mean, std, min and max over them)")
    _add_data_args(a, run="test")
    a.add_argument("--groups", help="CSV: first column 'index' or 'path', other columns group attributes")
    a.add_argument("--intersections", action="store_true",
                   help="also each pair of the groups file's attributes, such as 'lighting & colour' with groups "
                        "such as 'dark & nearly grey': a gap may show only in a combination")
    a.add_argument("--about", metavar="FILE",
                   help="YAML or TOML file of what only the model's owner knows (developers, licence, contact, the "
                        "data's consent...), which the model card states ('cifarlab datasheet --about-template' "
                        "prints one to fill in)")
    a.add_argument("--datasheet", metavar="FOLDER",
                   help="the folder 'cifarlab datasheet' wrote of the run's training data (or its datasheet.json), "
                        "whose warnings the model card quotes")
    a.add_argument("--margin", type=float, default=0.05, help="flag classes/groups this far below overall accuracy")
    a.add_argument("--min-group", type=int, default=30, help="groups smaller than this are too small to judge")
    a.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    _add_tta_arg(a)
    _add_uncalibrated_arg(a)
    a.add_argument("--out", help="folder for the report (default RUN/audit, or RUN/audit-<data name>-<hash> on other "
                                 "data than the run's own; for a --runs folder, OUT/run-K and OUT/audit_summary.json "
                                 "and .md)")
    _add_device_arg(a)
    a.set_defaults(func=cmd_audit)


def _add_robustness_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab robustness``'s options."""
    r = sub.add_parser("robustness", help="accuracy and calibration under common image corruptions (noise, blur, "
                                          "weather, compression) at five severities")
    r.add_argument("run", nargs="?", help="run folder written by 'cifarlab train' (the folder of --runs N: each run on "
                                          "the same corrupted images, and mean, std, min and max over them)")
    _add_data_args(r, run="test")
    r.add_argument("--corruptions", metavar="NAMES",
                   help="comma-separated corruptions, or 'all' (default: the benchmark's; 'cifarlab robustness "
                        "--list' names them)")
    r.add_argument("--severities", metavar="LEVELS", help="comma-separated severities from 1 to 5 (default all five)")
    r.add_argument("--images", type=int, metavar="N",
                   help="a random N of the test images (drawn from --seed): quicker, rougher figures")
    r.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random draws (default 0)")
    r.add_argument("--corrupted-data", metavar="PATH",
                   help="read the published CIFAR-10-C or CIFAR-100-C files (the folder of NAME.npy and labels.npy, "
                        "or its .tar) instead of corrupting the test images here")
    r.add_argument("--list", action="store_true", help="list the corruptions and exit")
    _add_report_args(r, "folder for the report (default RUN/robustness, or RUN/robustness-<data name>-<hash> "
                        "on other data than the run's own; for a --runs folder, OUT/run-K and "
                        "OUT/robustness_summary.json)")
    r.set_defaults(func=cmd_robustness)


def _add_datasheet_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab datasheet``'s options."""
    d = sub.add_parser("datasheet", help="measure a data set before training on it: class sizes, exact copies, "
                                         "colour cues by class; and DATASHEET.md, with the questions left",
                       description="Describe a data set as a datasheet (Gebru et al., 2021): images per class in "
                                   "each split, exact copies within and across the splits and those with "
                                   "different labels, luminance, colourfulness and nearly grey images by class "
                                   "(with a chi-squared test of whether greyness depends on the class), and how "
                                   "much of the test labels colour statistics alone predict. Writes "
                                   "datasheet.json, DATASHEET.md (with the questions of motivation, collection, "
                                   "consent and licence that only the data's makers can answer), "
                                   "colour_by_class.png and groups.csv (the test images by colour and lighting, "
                                   "for audit --groups).")
    _add_data_args(d)
    _add_read_args(d)
    d.add_argument("--about", metavar="FILE",
                   help="YAML or TOML file of what only the data's owner knows (its section 'data': motivation, "
                        "collection, consent, labelling, coverage, licence, uses_to_avoid, maintenance), written "
                        "into DATASHEET.md under its questions")
    d.add_argument("--about-template", action="store_true",
                   help="print an about file with every key and what it asks, to fill in, and exit")
    d.add_argument("--out", help="folder for the report (default ./datasheet)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=cmd_datasheet)


def _add_duplicates_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab duplicates``' options."""
    from .config import DUPLICATES_CANDIDATES, DUPLICATES_SHIFT, DUPLICATES_THRESHOLD

    d = sub.add_parser("duplicates", help="test images that are near-copies of training images, and a run's "
                                          "accuracy without them",
                       description="Look for a near-duplicate of each test image among the training images (and "
                                   "the other test images): the same photo, perhaps shifted by a few pixels, "
                                   "re-coloured or re-compressed (Barz and Denzler, 2020). Given a run, also its "
                                   "test accuracy with and without the test images whose copy it trained on. "
                                   "Writes duplicates.json, duplicates.csv, groups.csv (for audit --groups) and "
                                   "duplicates.png, the pairs either side of the threshold, to judge it by.")
    d.add_argument("run", nargs="?", help="run folder written by 'cifarlab train' (or the folder of --runs N: each "
                                          "run, and the mean, min and max over them); omitted: the data alone")
    _add_data_args(d, run="optional")
    _add_read_args(d)
    d.add_argument("--threshold", type=float, default=DUPLICATES_THRESHOLD,
                   help="similarity from which a pair counts as a duplicate, in (0, 1] "
                        f"(default {DUPLICATES_THRESHOLD})")
    d.add_argument("--shift", type=int, default=DUPLICATES_SHIFT,
                   help=f"pixels a copy may be shifted by, each way (default {DUPLICATES_SHIFT})")
    d.add_argument("--candidates", type=int, default=DUPLICATES_CANDIDATES,
                   help=f"training images compared closely with each test image (default {DUPLICATES_CANDIDATES}; "
                        "more finds a few more shifted copies, slower)")
    d.add_argument("--mirrored", action="store_true",
                   help="also compare each test image's left-right mirror image, as a model trained with "
                        "horizontal flips has seen each training image both ways (twice the time)")
    _add_report_args(d, "folder for the report (default RUN/duplicates, or RUN/duplicates-<data name>-<hash> "
                        "on other data than the run's own, or ./duplicates without a run)")
    d.set_defaults(func=cmd_duplicates)


def _add_explain_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab explain``'s options."""
    from .config import EXPLAIN_METHODS, EXPLAIN_SELECTIONS

    x = sub.add_parser("explain", help="attribution maps (Grad-CAM, occlusion, integrated gradients): where in an "
                                       "image the model finds its class, checked against random weights")
    x.add_argument("run", help="run folder written by 'cifarlab train' (or 'cifarlab import')")
    x.add_argument("images", nargs="*", help="image files or folders to explain by their predicted class; omitted: "
                                             "test images of the data, chosen by --select")
    _add_data_args(x, run="test")
    x.add_argument("--method", default="gradcam", choices=EXPLAIN_METHODS,
                   help="gradcam (default: a convolution's features weighted by their gradients; coarse, cheap), "
                        "occlusion (the change in the class's logit as grey windows cover the image; model-agnostic) "
                        "or integrated-gradients (gradients along the path from a grey image)")
    x.add_argument("--select", default="wrong", choices=EXPLAIN_SELECTIONS,
                   help="which test images: the most confidently wrong (default), the most confidently right, or "
                        "a random draw (--seed)")
    x.add_argument("--count", type=int, default=16, help="test images to explain (default 16)")
    x.add_argument("--class", dest="class_name", metavar="NAME", help="test images of this true class only")
    x.add_argument("--layer", help="Grad-CAM's convolution, by its module name (default: the last one whose map is "
                                   "larger than 1x1)")
    x.add_argument("--seed", type=int, default=0, help="seed of --select random and of the random weights of the "
                                                        "sanity check (default 0)")
    x.add_argument("--no-sanity-check", action="store_true",
                   help="skip computing the maps again with random weights (Adebayo et al.'s randomisation test), "
                        "which doubles the time")
    _add_report_args(x, "folder for the report (default RUN/explain, or RUN/explain-<data name>-<hash> on "
                        "other data than the run's own; RUN/explain-files for image files given)")
    x.set_defaults(func=cmd_explain)


def _add_ood_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab ood``'s options."""
    from .ood import KNN, KNN_BANK, SCORES, SYNTHETIC

    o = sub.add_parser("ood", help="does the run know an unfamiliar image when it sees one? how well its scores tell "
                                   "its own test images from other data and synthetic images")
    o.add_argument("run", help="run folder written by 'cifarlab train' (or 'cifarlab import'); the folder of --runs N: "
                               "each run against the same images, the spread over them, and their ensemble "
                               "(the model 'cifarlab predict OUT' serves), with its own threshold")
    o.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="unfamiliar images: image files (an image, or a folder with images at its top, read as "
                        "predict reads them), a data archive or folder (its test images; those of a class the run "
                        "knows are left out), or a built-in set, " + ", ".join(f"synthetic:{k}" for k in SYNTHETIC)
                        + "; omitted: every built-in set")
    _add_data_args(o, run="own")
    o.add_argument("--score", default="energy", choices=SCORES + (KNN,),
                   help="the score that sets the threshold and the plot (default energy: logsumexp of the logits; "
                        "msp: the largest probability; maxlogit: the largest logit; knn: minus the distance from "
                        "the image's features to the k-th nearest training image's); every score is measured")
    o.add_argument("--knn-bank", type=int, default=KNN_BANK, metavar="N",
                   help=f"training images whose features the knn score compares with (default {KNN_BANK}, chosen "
                        "class-balanced with --seed; 0: no knn score)")
    o.add_argument("--keep", type=float, default=0.95, metavar="FRACTION",
                   help="the share of the run's validation images the threshold keeps (default 0.95, the usual "
                        "95%% TPR; 0.99 flags fewer of its own kind of image and lets more unfamiliar ones through)")
    o.add_argument("--count", type=int, default=10_000, help="at most this many images of each source (default "
                                                              "10000; the built-in sets: as many as test images)")
    o.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and of the choice of --count "
                                                        "images (default 0)")
    _add_report_args(o, "folder for the report (default RUN/ood; for --runs N, OUT/run-K and the summary "
                        "in OUT, by default each run's ood folder and the summary in the runs' folder)")
    o.set_defaults(func=cmd_ood)


def _add_label_issues_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab label-issues``' options."""
    li = sub.add_parser("label-issues", help="test images whose given label the run's predictions put in doubt "
                                             "(confident learning): candidates to look at, and the accuracy without "
                                             "them")
    li.add_argument("run", help="run folder written by 'cifarlab train' (or 'cifarlab import'); the folder of --runs N: "
                                "the mean of its runs' probabilities, whose doubts are fewer of its own mistakes")
    _add_data_args(li, run="test")
    li.add_argument("--split", choices=["test", "val"], default="test",
                    help="whose labels to doubt: the test images (default), or the run's validation images, a share "
                         "of the training data it never trained on (the run's own data only; into "
                         "RUN/label-issues-val)")
    li.add_argument("--review", type=int, default=32, metavar="N",
                    help="the N most doubtful images in label_issues.png (default 32)")
    _add_report_args(li, "folder for the report (default RUN/label-issues, or RUN/label-issues-<data name>-"
                         "<hash> on other data than the run's own; likewise in the folder of --runs N)")
    li.set_defaults(func=cmd_label_issues)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab compare``'s options."""
    m = sub.add_parser("compare", help="are two runs' accuracies really different? a paired test on the same images",
                       description="Compare two runs on the same test images, image by image: their accuracies, "
                                   "B minus A with a paired bootstrap 95% interval, McNemar's exact test, and the "
                                   "same per class (Holm-corrected), and where 'cifarlab ood' measured both on the "
                                   "same images, DeLong's paired test of their AUROCs against each set of unfamiliar "
                                   "images. The data is run A's unless --data is given. "
                                   "Given two folders of 'cifarlab train --runs N', it compares their runs' "
                                   "accuracies instead (Welch's t-test), overall and per class (Holm-corrected), "
                                   "from the runs' own figures; no data is loaded (--ensembles compares their "
                                   "ensembles image by image instead). A --runs N folder beside a single run is "
                                   "compared as its ensemble, the model 'cifarlab predict' serves for it.")
    m.add_argument("run_a", metavar="RUN_A", help="the first run folder (or the folder of --runs N)")
    m.add_argument("run_b", metavar="RUN_B", help="the second; the differences are B minus A")
    _add_data_args(m, run="test")
    m.add_argument("--groups", help="CSV as audit --groups reads it: the comparison per group of each attribute")
    m.add_argument("--intersections", action="store_true",
                   help="also per group of each pair of the groups file's attributes, as audit --intersections")
    m.add_argument("--bootstrap", type=int, help="bootstrap resamples for the interval (default 1000)")
    m.add_argument("--ensembles", action="store_true",
                   help="given two --runs N folders, compare their ensembles image by image, as two runs are, "
                        "rather than their runs' accuracies (a --runs N folder beside a single run is always "
                        "compared as its ensemble)")
    _add_tta_arg(m)
    _add_uncalibrated_arg(m)
    m.add_argument("--json", action="store_true", help="print the comparison as JSON")
    m.add_argument("--device", help="where the models run (default auto)")
    m.set_defaults(func=cmd_compare)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab export``'s options."""
    x = sub.add_parser("export", help="write a run as one ONNX file (uint8 images in, probabilities out), or its "
                                      "weights for Keras",
                       description="Export a run as an ONNX file that runs without PyTorch or cifarlab: uint8 "
                                   "images (N, H, W, C) in, class probabilities out, with the run's preprocessing "
                                   "and test-time augmentation inside and its class names in the metadata. Needs "
                                   "the onnx extra: pip install '.[onnx]' in a clone, or onnx onnxscript onnxruntime. "
                                   "With --out NAME.h5 it writes a keras-shallow or keras-deep run's weights for "
                                   "Keras' model.load_weights instead (needs h5py).")
    x.add_argument("run", help="run folder written by 'cifarlab train' (the folder of --runs N: one ONNX file of their "
                               "ensemble, the mean of their probabilities)")
    x.add_argument("--out", help="the .onnx file to write (default RUN/model.onnx); a name ending in .h5 writes "
                                 "the weights for Keras' model.load_weights instead (keras-shallow, keras-deep)")
    _add_tta_arg(x)
    _add_uncalibrated_arg(x)
    x.add_argument("--opset", type=int, help="ONNX opset version (default: PyTorch's exporter's)")
    x.add_argument("--no-check", dest="check", action="store_false",
                   help="do not compare the file's outputs with PyTorch's (done when onnxruntime is installed)")
    x.add_argument("--about", metavar="FILE",
                   help="about file (as audit --about reads it) whose model developers, licence and contact join "
                        "the ONNX file's metadata")
    q = x.add_argument_group("int8")
    q.add_argument("--int8", action="store_true",
                   help="write an int8 copy instead (default RUN/model.int8.onnx; of a --runs N folder, of their "
                        "ensemble): int8 convolution and dense "
                        "layers, about a quarter of the size, calibrated on the run's training images; both files "
                        "classify the test images and RUN/model.int8.json says what changed, overall and per class")
    q.add_argument("--calibration-images", type=int, metavar="N",
                   help="training images the int8 ranges are measured on, class-balanced (default 1000)")
    q.add_argument("--calibration-method", choices=CALIBRATION_METHODS,
                   help="how each range is taken from them: minmax (default: all values seen) or percentile "
                        "(the 0.001%% most extreme left out)")
    q.add_argument("--groups", help="CSV as audit --groups reads it: the int8 file against the float32 one per "
                                    "group of each attribute too")
    q.add_argument("--intersections", action="store_true", default=None,
                   help="with --groups: each pair of its attributes as groups of their own too")
    _add_data_args(x, run="test")
    x.set_defaults(func=cmd_export)


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab calibrate``'s options."""
    c = sub.add_parser("calibrate", help="fit a temperature on a run's validation images, so that its "
                                         "confidences match how often it is right",
                       description="Temperature scaling (Guo et al., 2017): fit the one number T that the logits are "
                                   "divided by before the softmax, minimising the loss on the run's own validation "
                                   "images (never the test images), and record it in RUN/calibration.json. "
                                   "evaluate, predict, audit, compare and export then use it (--uncalibrated leaves "
                                   "it out). The predicted classes, and every accuracy, stay the same, unless "
                                   "--balance-classes is given. The data is the run's own unless --data is given; "
                                   "it must be the data the run was trained on. Given the folder of --runs N, each "
                                   "run, then their ensemble (the mean of their probabilities, which averaging makes "
                                   "underconfident): one more temperature for the mean, fitted on training images no "
                                   "run trained on (outside every run's --subset, or the validation images that "
                                   "train --split-seed makes shared), recorded in OUT/ensemble_calibration.json.")
    c.add_argument("run", help="run folder written by 'cifarlab train' with validation images (the folder of "
                               "--runs N: each run, and their ensemble)")
    _add_data_args(c, run="own")
    _add_tta_arg(c)
    c.add_argument("--balance-classes", action="store_true",
                   help="for a run trained on classes of unequal size: also correct the probabilities to every "
                        "class being equally likely, as in a balanced test set, by adding log(1/classes) - "
                        "log(training share) to each class's logit (Menon et al., 2021). This changes predictions "
                        "(rare classes are predicted more often); the validation balanced accuracy before and "
                        "after is printed")
    c.add_argument("--sets", type=float, metavar="COVERAGE",
                   help="also fit prediction sets on the same images: the classes each image may be, as many as "
                        "the model's doubt needs, so that the set holds the true class for at least this share of "
                        "images (split conformal prediction; 0.9 usual) from the same source; 'predict --sets' "
                        "prints them and evaluate measures their coverage on the test images")
    c.add_argument("--sets-by-class", action="store_true",
                   help="with --sets: that share for each class, not only on average over the images (a class "
                        "the model finds hard enters sets at a lower probability, so they grow)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_arg(c)
    c.set_defaults(func=cmd_calibrate)


def _add_import_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab import``'s options."""
    k = sub.add_parser("import", help="make a run folder of a model the Keras notebook trained and saved",
                       description="Import the notebook's Keras model (keras-shallow or keras-deep) as a run folder, "
                                   "so evaluate, predict, audit and export work on it. FILE is what save_weights "
                                   "wrote (.h5 or .weights.h5) or a saved model (.h5, .keras); its arrays are read, "
                                   "nothing in it runs. Needs h5py: pip install h5py (or '.[keras]' in a clone).")
    k.add_argument("file", help="Keras weights or model file")
    k.add_argument("--architecture", help="the notebook's model.to_json() file; checks every layer, not only the "
                                          "weight shapes")
    k.add_argument("--classes", help="class names in label order, comma-separated (default CIFAR-10's, for 10 "
                                     "classes)")
    k.add_argument("--image-size", help="HxW of the training images where no architecture says (default 32x32)")
    k.add_argument("--out", help="run folder to write (default runs/keras-import-MODEL-TIME)")
    k.add_argument("--overwrite", action="store_true", help="write into an existing run folder")
    k.set_defaults(func=cmd_import)


def _add_augment_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab augment``'s options."""
    g = sub.add_parser("augment", help="write augmented copies of images, previews and a grid")
    _add_data_args(g, subset="augment a class-balanced subset of N images of --split")
    _add_read_args(g)
    g.add_argument("--config", help="YAML/TOML file whose 'augment' section sets the options")
    g.add_argument("--augment", help="preset (default keras: the notebook's settings; none with --auto-augment)")
    g.add_argument("--auto-augment", choices=POLICIES,
                   help="a policy of image operations before the preset (see 'cifarlab train --help')")
    g.add_argument("--per-image", type=int, default=5, help="augmented copies per image (default 5)")
    g.add_argument("--split", choices=["train", "test"], default="train", help="images to augment (default train)")
    g.add_argument("--limit", type=int, help="augment only the first N images")
    g.add_argument("--out", help="output: .npz array file or a folder (image folder layout)")
    g.add_argument("--preview-dir", help="write preview images here")
    g.add_argument("--save-prefix", default="aug", help="file name prefix of previews")
    g.add_argument("--save-format", choices=["jpeg", "png"], default="jpeg",
                   help="file format of previews (default jpeg, as the notebook)")
    g.add_argument("--previews", type=int, default=8, help="images to preview, the classes taken in turn (default 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random transforms and --subset (default 0)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.set_defaults(func=cmd_augment)


def _add_summary_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab summary``'s options."""
    s = sub.add_parser("summary", help="print a Keras-style table of a model's layers")
    s.add_argument("target", nargs="?", metavar="MODEL|RUN",
                   help="a registered model name (see 'cifarlab list'), or a run folder: the model it trained, with "
                        "its classes and image size")
    s.add_argument("--model", help="registered model name, the same as giving it as MODEL")
    s.add_argument("--num-classes", type=int, help="classes of the last layer (default 10; a run's own)")
    s.add_argument("--input", help="H,W,C (default 32,32,3; a run's own)")
    s.set_defaults(func=cmd_summary)


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab cache``'s options."""
    c = sub.add_parser("cache", help="what cifarlab keeps in its cache folder (decoded data, downloads, compiled "
                                     "kernels), and clearing it",
                       description="List what cifarlab keeps in its cache folder ($CIFARLAB_CACHE, else "
                                   "$XDG_CACHE_HOME/cifarlab, else ~/.cache/cifarlab) and how much room it takes, "
                                   "or remove it. Every entry is made again when next needed. Only names cifarlab "
                                   "writes are listed or removed; other files in that folder are left alone.")
    c.add_argument("--clear", nargs="?", const="decoded", choices=("decoded", "downloads", "kernels", "all"),
                   help="remove the decoded data (the default), the downloaded archives, the compiled kernels or "
                        "all three; with any of them, what stopped writes left behind")
    c.add_argument("--unused-days", type=float, metavar="DAYS",
                   help="with --clear: only what has not been used for DAYS days")
    c.add_argument("--json", action="store_true", help="print the entries (and what was removed) as JSON")
    c.set_defaults(func=cmd_cache)


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    """``cifarlab list``'s options."""
    ls = sub.add_parser("list", help="list models, recipes and augmentation presets")
    ls.set_defaults(func=cmd_list)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="cifarlab", description="Train, evaluate, augment, save and audit "
                                "small-image classifiers (CIFAR-10, CIFAR-100, your own image folders).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_train_parser, _add_evaluate_parser, _add_calibrate_parser, _add_predict_parser,
                _add_audit_parser, _add_datasheet_parser, _add_robustness_parser, _add_duplicates_parser,
                _add_explain_parser, _add_label_issues_parser, _add_ood_parser, _add_compare_parser, _add_export_parser,
                _add_import_parser, _add_augment_parser, _add_summary_parser, _add_list_parser, _add_cache_parser):
        add(sub)  # in the order --help lists the commands
    return p


def _train_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from .config import options_to_overrides

    return options_to_overrides({dest: v for dest in _TRAIN_OPTIONS if (v := getattr(args, dest, None)) is not None})


def cmd_train(args: argparse.Namespace) -> int:
    """``cifarlab train``."""
    from .config import config_yaml, resolve_config, unused_settings
    from .sweep import is_sweep, parse_axes, resume_sweep, sweep_with_overrides
    from .train import fit, set_of

    if args.lr_find and (args.resume or args.sweep or args.print_config):
        given = "--resume" if args.resume else "--sweep" if args.sweep else "--print-config"
        raise ConfigError(f"--lr-find tests a new run's options; {given} cannot be given with it")
    if args.resume and args.print_config:
        raise ConfigError(f"--print-config shows a new run's config; the config of '{args.resume}' is its "
                          "config.yaml")
    if args.sweep and (args.resume or args.print_config):
        raise ConfigError(f"--sweep starts a sweep; {'--resume' if args.resume else '--print-config'} cannot be given "
                          "with it (a sweep folder resumes with --resume alone)")
    if args.resume:
        given = {f"{sec}.{key}" for sec, values in _train_overrides(args).items() for key in values}
        if given - {"train.epochs"} or args.config or args.recipe:
            raise ConfigError("--resume continues a run with its saved config; only --epochs may be given with "
                              "it (to train a constant-lr run longer); start a new run for other options")
        if is_sweep(args.resume):
            if args.epochs is not None:
                raise ConfigError(f"--epochs cannot change the points of the sweep '{args.resume}'; resume it alone")
            resume_sweep(args.resume)
            return 0
        fit(resume=args.resume, epochs=args.epochs)
        if (parent := set_of(args.resume)) is not None:
            base, base_cfg = parent
            print(f"note: '{args.resume}' is one of the {base_cfg.train.runs} runs of '{base}', whose "
                  f"runs_summary.json this does not update; 'cifarlab train --resume {base}' finishes its "
                  "other runs and writes the summary again")
        return 0
    if args.model is not None:
        _check_model(args.model)
    if args.sweep:
        sweep_with_overrides(parse_axes(args.sweep), args.recipe, args.config, _train_overrides(args), args.out,
                             bool(args.overwrite))
        return 0
    cfg = resolve_config(args.recipe, args.config, _train_overrides(args))
    if args.print_config:  # to start a config file from a recipe, or check what flags resolve to
        print(config_yaml(cfg), end="")
        for note in unused_settings(cfg):  # on stderr, so that stdout stays a config file
            print(f"note: {note}", file=sys.stderr)
        return 0
    if args.lr_find:
        from .lr_find import find_lr, format_result, parse_range

        lo, hi = parse_range(args.lr_range)
        print(format_result(find_lr(cfg, lo, hi, args.lr_find_steps)))
        return 0
    fit(cfg)
    return 0


def _load_eval_data(args: argparse.Namespace, run: Path, tested: list[Path] | None = None):
    """The data a command evaluates ``run`` (a run, or a ``--runs N`` folder) on: ``--data``, or
    the run's own, read as it was trained on. With ``tested``, the runs to be tested on its test
    images, those are chosen for them (:func:`cifarlab.data.seen.test_split_for`): on other
    data that names no test images, every image none of them trained or validated on."""
    from .config import load_run_config
    from .export import check_weights

    if (run / "architecture.json").is_file():  # one run: an unfinished one is refused before the data loads
        check_weights(run)
    cfg = load_run_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if not args.data and cfg and cfg.data.data and not Path(cfg.data.data).exists():
        # The run's own data path, as typed when it was trained: relative paths hold only there.
        raise ConfigError(f"the run's data '{cfg.data.data}' (from {run / 'config.yaml'}) does not exist from "
                          f"{Path.cwd()}; give its path with --data")
    own_labels = None if args.labels else _labels(args, cfg)
    if own_labels and not Path(own_labels).expanduser().exists():
        raise ConfigError(f"the run's labels file '{own_labels}' (from {run / 'config.yaml'}) does not exist "
                          f"from {Path.cwd()}; give its path with --labels")
    ds = _load_data(args, cfg, show=False)
    size = _input_size(run)
    if size is not None and ds.x_test.shape[1:3] != size:
        # Other data (--data) of another size is resized to the model's input, as predict resizes
        # each file: a run trained on 32x32 images can then be tested on larger photos.
        from .data import resized

        ds = resized(ds, size, "the run's input")
    note = None
    if tested:
        from .data.seen import test_split_for

        ds, note = test_split_for(ds, tested)
    for line in ds.notes + ([note] if note else []):  # once the test images are chosen: they may change them
        print(f"data: {line}", file=sys.stderr)
    return ds


def _input_size(run: Path) -> tuple[int, int] | None:
    """The (H, W) a run (or the first run of a ``--runs N`` folder) takes; None where unknown."""
    from .export import read_run, runs_of

    first = run if (run / "architecture.json").is_file() else next(iter(runs_of(run)), None)
    if first is None:
        return None
    inp = read_run(first)[1].get("input", {})
    return (inp["height"], inp["width"]) if "height" in inp and "width" in inp else None


def _labels(args: argparse.Namespace, cfg=None) -> str | None:
    """``--labels``, else the run's own labels file where the data is the run's own (``--data``
    left out, or the same path): another folder's images are not named in it."""
    if args.labels:
        return args.labels
    if cfg and cfg.data.labels and (not args.data or args.data == cfg.data.data):
        return cfg.data.labels
    return None


def _load_data(args: argparse.Namespace, cfg=None, show: bool = True):
    """The data of ``--data`` (or the download of ``--dataset``) with the data options given;
    options left unset take ``cfg``'s (a run's config, read as it was trained) where given. Its
    notes are printed with ``show``."""
    from .data import load_dataset

    data = args.data or (cfg.data.data if cfg else None)
    dataset = args.dataset or (cfg.data.dataset if cfg else "cifar10")
    label_mode = args.label_mode or (cfg.data.label_mode if cfg else "fine")
    # unset flags take the run's own setting: the data it was trained on, read as it was
    skip_bad = args.skip_bad_images if args.skip_bad_images is not None else bool(cfg and cfg.data.skip_bad_images)
    # the size the run was trained at, where it chose one, and its own test images; without a
    # run, those that --image-size and --test-split give
    own = cfg.data if cfg else read_settings(getattr(args, "image_size", None), getattr(args, "test_split", None))
    ds = load_dataset(data, dataset, allow_unverified=bool(args.allow_unverified), label_mode=label_mode,
                      skip_bad_images=skip_bad, image_size=own.image_hw(), test_split=own.test_split,
                      labels=_labels(args, cfg))
    if own.classes:  # a run trained on some classes is tested on those, of whichever data
        from .data import only_classes

        ds = only_classes(ds, own.classes)
    for note in ds.notes if show else ():  # on stderr: stdout may be --json
        print(f"data: {note}", file=sys.stderr)
    return ds


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cifarlab evaluate``."""
    from .evaluate import evaluate_run, unequal_classes
    from .export import default_report_folder, is_runs_set, read_run
    from .fsutil import check_folder_path, json_text

    if args.out:
        check_folder_path(args.out)  # before the data is loaded
    if is_runs_set(args.run):
        return _evaluate_runs(args)
    run, _ = read_run(args.run)
    ds = _load_eval_data(args, run, [run])
    out = Path(args.out) if args.out else default_report_folder(run, "eval", ds)
    report = evaluate_run(run, ds, out, tta=args.tta, device=args.device, uncalibrated=args.uncalibrated)
    if args.json:
        print(json_text(report))
    else:
        print(f"Test score: {report['loss']:.4f}")
        print(f"Test accuracy: {report['accuracy']:.4f}")
        if unequal_classes(c["support"] for c in report["per_class"]):  # else the same figure as the accuracy
            print(f"Balanced accuracy (mean per-class recall): {report['balanced_accuracy']:.4f}")
        print(f"Top-{report['top_k']['k']} accuracy: {report['top_k']['accuracy']:.4f}")
        print(f"Expected calibration error: {report['calibration']['ece']:.4f}")
        if report["temperature"]:
            raw = report["uncalibrated"]
            balanced = report["class_offsets"] is not None
            print(f"Temperature: {report['temperature']:.4f} (cifarlab calibrate"
                  + (", with the classes balanced" if balanced else "") + f"); without {'them' if balanced else 'it'}, "
                  f"Test score {raw['loss']:.4f} and expected calibration error {raw['ece']:.4f}"
                  + (f", Test accuracy {raw['accuracy']:.4f} and balanced accuracy {raw['balanced_accuracy']:.4f}"
                     if balanced else ""))
        if report["prediction_sets"]:
            print(_sets_line(report["prediction_sets"]))
        print("Answering only at a confidence of at least (predict --min-confidence; the rest left to a person):")
        for r in report["selective"]:
            print(f"  {r['threshold']:<5g} {r['coverage']:>6.1%} of the images ({r['images']:,}), accuracy "
                  + ("n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"))
        print(f"{'class':<16}{'accuracy':>10}{'precision':>11}{'recall':>9}{'f1':>8}{'support':>9}")

        def num(v, width):  # an undefined figure (a class never predicted, or not in the data) is n/a
            return f"{v:>{width}.4f}" if v is not None else f"{'n/a':>{width}}"

        for c in report["per_class"]:
            print(f"{c['class']:<16}{num(c['accuracy'], 10)}{num(c['precision'], 11)}{num(c['recall'], 9)}"
                  f"{num(c['f1'], 8)}{c['support']:>9}")
        pairs = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in report["confused_pairs"][:5])
        print(f"Most confused: {pairs}")
        print(f"Test-time augmentation: {report['tta']}")
        print(f"Report files in {out}")
    return 0


def _sets_line(r: dict[str, Any], whose: str = "Prediction sets") -> str:
    """A line on prediction sets' test figures (:func:`cifarlab.evaluate.sets_report`): coverage
    against the target and its chance range, mean size, and the classes covered less often than
    chance allows."""
    lo, hi = r["coverage_ci"]
    worst = min((c for c in r["per_class"] if c["coverage"] is not None), key=lambda c: c["coverage"])
    per = " of each class" if r["by_class"] else ""
    short = (f"; covered less often than chance allows: {', '.join(r['short_of_coverage'])}"
             if r["short_of_coverage"] else "")
    chance = (f", chance range {r['expected_range'][0]:.4f} to {r['expected_range'][1]:.4f}"
              if r["expected_range"] else "")
    return (f"{whose} (cifarlab calibrate --sets {r['coverage_target']:g}{per}): they held the true class "
            f"for {r['coverage']:.4f} of the test images (95% CI {lo:.4f} to {hi:.4f}{chance}), mean size "
            f"{r['mean_size']:.2f}, {r['singletons']:.1%} one class, {r['empty']:.1%} empty; least covered class "
            f"{worst['class']} {worst['coverage']:.4f}{short}")


def _evaluate_runs(args: argparse.Namespace) -> int:
    """``cifarlab evaluate`` of a ``--runs N`` folder: each run, then the spread over them."""
    from .evaluate import evaluate_runs
    from .export import finished_runs, other_data_folder, predict_command
    from .fsutil import json_text

    base = Path(args.run)
    runs = finished_runs(base)  # before the data is loaded
    ds = _load_eval_data(args, base, runs)
    out = Path(args.out) if args.out else other_data_folder(base, "eval", ds, runs)
    summary = evaluate_runs(base, ds, out, tta=args.tta, device=args.device, uncalibrated=args.uncalibrated)
    if args.json:
        print(json_text(summary))
        return 0
    for r in summary["per_run"]:
        print(f"{r['run']}: Test score {r['loss']:.4f}, Test accuracy {r['accuracy']:.4f}")
    a, lo = summary["accuracy"], summary["loss"]
    print(f"{summary['runs']} runs (test-time augmentation {', '.join(summary['tta'])}): test accuracy mean "
          f"{a['mean']:.4f} (std {a['std']:.4f}, min {a['min']:.4f}, max {a['max']:.4f}); test score mean "
          f"{lo['mean']:.4f} (min {lo['min']:.4f}, max {lo['max']:.4f})")
    en = summary["ensemble"]
    own = "" if en["temperature"] is None else f", calibrated with their ensemble's temperature {en['temperature']:.4f}"
    command = predict_command(base, args.tta, args.uncalibrated)
    print(f"Their ensemble (the mean of their probabilities{own}, as '{command}' gives them): test accuracy "
          f"{en['accuracy']:.4f}, test score {en['loss']:.4f}, expected calibration error {en['ece']:.4f}"
          + (f" ({en['uncalibrated_ece']:.4f} without its temperature)" if "uncalibrated_ece" in en else ""))
    if "prediction_sets" in summary:
        c, m = summary["prediction_sets"]["coverage"], summary["prediction_sets"]["mean_size"]
        print(f"Prediction sets of the runs (cifarlab calibrate --sets): coverage mean {c['mean']:.4f} (min "
              f"{c['min']:.4f}, max {c['max']:.4f}), mean size {m['mean']:.2f} (min {m['min']:.2f}, "
              f"max {m['max']:.2f})")
    if en["prediction_sets"]:
        print(_sets_line(en["prediction_sets"], "Their ensemble's prediction sets"))
    e = summary["ece"]
    print(f"Expected calibration error mean {e['mean']:.4f} (min {e['min']:.4f}, max {e['max']:.4f})"
          + (f"; without the runs' calibration (cifarlab calibrate) mean {summary['uncalibrated_ece']['mean']:.4f}"
             if "uncalibrated_ece" in summary else ""))
    if any(r["balanced_classes"] for r in summary["per_run"]) and "uncalibrated_accuracy" in summary:
        u, ub = summary["uncalibrated_accuracy"], summary["uncalibrated_balanced_accuracy"]
        print(f"Without the runs' class balancing (cifarlab calibrate --balance-classes): test accuracy mean "
              f"{u['mean']:.4f} (min {u['min']:.4f}, max {u['max']:.4f}), balanced accuracy mean {ub['mean']:.4f}")
    if summary["unequal_classes"]:
        b = summary["balanced_accuracy"]
        print(f"Balanced accuracy (mean per-class recall) mean {b['mean']:.4f} (std {b['std']:.4f}, min "
              f"{b['min']:.4f}, max {b['max']:.4f})")
    print(f"Report files in each run's {f'folder under {out}' if out else 'eval folder'}; summary in "
          f"{(out or base) / 'eval_summary.json'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cifarlab calibrate``: one run, or each run of a ``--runs N`` folder."""
    from .calibrate import calibrate_run, calibrate_runs
    from .conformal import check_coverage
    from .export import finished_runs, is_runs_set, read_run
    from .fsutil import json_text

    if args.sets is not None:
        check_coverage(args.sets)  # before the data is loaded
    elif args.sets_by_class:
        raise CifarlabError("--sets-by-class refines --sets COVERAGE; give that too, such as --sets 0.9")
    several = is_runs_set(args.run)
    if several:
        finished_runs(args.run)  # before the data is loaded
        folder = Path(args.run)
    else:
        folder, _ = read_run(args.run)
    ds = _load_eval_data(args, folder)
    log = (lambda _: None) if args.json else print
    if several:
        result = calibrate_runs(folder, ds, args.tta, args.device, log, args.balance_classes, args.sets,
                                args.sets_by_class)
        entries = result["per_run"]
    else:
        result = calibrate_run(folder, ds, args.tta, args.device, log, args.balance_classes, args.sets,
                               args.sets_by_class)
        entries = [result]
    if args.json:
        print(json_text(result))
        return 0
    for e in entries:
        loss, ece = e["validation_loss"], e["validation_ece"]
        print(f"{e['run']}: temperature {e['temperature']:.4f}"
              + (" (at the search's bound: too few validation images, or a broken model?)" if e["at_bound"] else "")
              + f"; on its {e['validation_images']:,} validation images, loss {loss['before']:.4f} -> "
                f"{loss['after']:.4f}, expected calibration error {ece['before']:.4f} -> {ece['after']:.4f}"
              + ("; with the classes balanced, balanced accuracy {before:.4f} -> {after:.4f}".format(
                  **e["balance_classes"]["validation_balanced_accuracy"]) if "balance_classes" in e else ""))
    if several:
        t, b, a = result["temperature"], result["validation_ece_before"], result["validation_ece_after"]
        print(f"{result['runs']} runs: temperature mean {t['mean']:.4f} (min {t['min']:.4f}, max {t['max']:.4f}); "
              f"validation calibration error mean {b['mean']:.4f} -> {a['mean']:.4f}"
              + ("; validation balanced accuracy mean {:.4f} -> {:.4f}".format(
                  result["validation_balanced_accuracy_before"]["mean"],
                  result["validation_balanced_accuracy_after"]["mean"]) if args.balance_classes else ""))
    if several:
        en = result["ensemble"]
        if en["calibrated"]:
            loss, ece = en["validation_loss"], en["validation_ece"]
            print(f"their ensemble: temperature {en['temperature']:.4f}"
                  + (" (at the search's bound)" if en["at_bound"] else "")
                  + f"; on {en['validation_images']:,} training images no run trained on, loss {loss['before']:.4f} "
                    f"-> {loss['after']:.4f}, expected calibration error {ece['before']:.4f} -> {ece['after']:.4f}; "
                    f"written to {folder / 'ensemble_calibration.json'}")
        else:
            print(f"their ensemble (the mean of their probabilities) is not calibrated: {en['why']}")
    fits = [(str(e["run"]), e) for e in entries]
    if several and result["ensemble"]["calibrated"]:
        fits.append(("their ensemble", result["ensemble"]))
    note = _ece_rose_note(fits)
    if note:
        print(note)
    for name, e in fits:
        if "prediction_sets" in e:
            print(f"{name}: {_sets_fitted(e['prediction_sets'])}")
    print("written to calibration.json in each run's folder" if several else
          f"written to {folder / 'calibration.json'}; evaluate, predict, audit, compare and export now use it "
          f"(--uncalibrated leaves it out)")
    return 0


def _sets_fitted(sets: dict[str, Any]) -> str:
    """What ``calibrate --sets`` fitted, in words: the coverage and the probability floors."""
    floors = sets["min_probability"]
    if sets["by_class"]:
        low, high = min(floors, key=floors.get), max(floors, key=floors.get)
        what = (f"a class enters an image's set where its probability reaches its own floor, from "
                f"{floors[low]:.4f} ({low}) to {floors[high]:.4f} ({high})")
    else:
        what = f"a class enters an image's set where its probability reaches {next(iter(floors.values())):.4f}"
    per = " of each class" if sets["by_class"] else ""
    return (f"prediction sets for coverage {sets['coverage']:g}{per}, fitted on {sets['images']:,} images: {what}; "
            "'cifarlab evaluate' measures their coverage on the test images")


def _ece_rose_note(fits: list[tuple[str, dict[str, Any]]]) -> str | None:
    """A note for the fitted temperatures (name, calibration entry) whose expected calibration
    error on their own images is higher after than before, which reads as a failure but is not
    one: None where every error fell or stayed."""
    rose = [(name, e) for name, e in fits if e["validation_ece"]["after"] > e["validation_ece"]["before"]]
    if not rose:
        return None
    fewest = min(e["validation_images"] for _, e in rose)
    return (f"note: the expected calibration error rose ({', '.join(name for name, _ in rose)}). The temperature is "
            "the one with the lowest loss on these images, not the lowest calibration error, and the error, over 15 "
            f"confidence bins of {fewest:,} images{' or more' if len(rose) > 1 else ''}, is a rough figure: "
            "'cifarlab evaluate' measures both on the test images, with and without the temperature")


def cmd_predict(args: argparse.Namespace) -> int:
    """``cifarlab predict``: failures are reported per file; the exit code is 1 if any failed."""
    from .predict import predict_files

    fmt = "json" if args.json else "csv" if args.csv else "table"
    return predict_files(args.run, args.images, top=args.top, fmt=fmt, device=args.device, tta=args.tta,
                         uncalibrated=args.uncalibrated, min_confidence=args.min_confidence,
                         flag_unfamiliar=args.flag_unfamiliar, sets=args.sets)


def cmd_audit(args: argparse.Namespace) -> int:
    """``cifarlab audit``."""
    from .audit import CLI_NAMES, audit_run, check_groups_args, check_options, read_card_files
    from .export import is_runs_set, read_run
    from .fsutil import check_folder_path

    check_options(args.margin, args.min_group, args.bootstrap, CLI_NAMES)  # before the data is loaded
    check_groups_args(args.intersections, args.groups)
    read_card_files(args.about, args.datasheet)  # a bad about file or datasheet fails before the data is loaded
    if args.out:
        check_folder_path(args.out)
    if is_runs_set(args.run):
        return _audit_runs(args)
    run, _ = read_run(args.run)
    ds = _load_eval_data(args, run, [run])
    # without --out, RUN/audit, or RUN/audit-<data> on other data: audit_run names it as it writes
    audit_run(run, ds, Path(args.out) if args.out else None, groups_csv=args.groups, margin=args.margin,
              min_group=args.min_group, n_boot=args.bootstrap, tta=args.tta, device=args.device, log=print,
              uncalibrated=args.uncalibrated, intersections=args.intersections, about=args.about,
              datasheet=args.datasheet)
    return 0


def _audit_runs(args: argparse.Namespace) -> int:
    """``cifarlab audit`` of a ``--runs N`` folder: each run, then each class's and group's spread."""
    from .audit import audit_runs
    from .export import finished_runs, other_data_folder

    base = Path(args.run)
    runs = finished_runs(base)  # before the data is loaded
    ds = _load_eval_data(args, base, runs)
    out = Path(args.out) if args.out else other_data_folder(base, "audit", ds, runs)
    s = audit_runs(base, ds, out, groups_csv=args.groups, margin=args.margin, min_group=args.min_group,
                   n_boot=args.bootstrap, tta=args.tta, device=args.device, log=print,
                   uncalibrated=args.uncalibrated, intersections=args.intersections, about=args.about,
                   datasheet=args.datasheet)
    n, acc = s["runs"], s["overall_accuracy"]
    print(f"{n} runs: overall accuracy mean {acc['mean']:.4f} (min {acc['min']:.4f}, max {acc['max']:.4f})")
    print(f"{'class':<16}{'mean':>8}{'min':>8}{'max':>8}  flagged in")
    for r in s["classes"]["per_class"]:
        a = r["accuracy"]
        figures = "".join(f"{a[k]:>8.4f}" for k in ("mean", "min", "max")) if a else f"{'n/a':>24}"
        print(f"{r['class']:<16}{figures}  {r['flagged_in']} of {n}")
    sp = s["classes"]["spread"]
    worst = ", ".join(f"{c} in {k} of {n}" for c, k in sp["worst"].items())
    print(f"best-to-worst class gap mean {sp['difference']['mean']:.4f} (min {sp['difference']['min']:.4f}, max "
          f"{sp['difference']['max']:.4f}); worst class: {worst}")
    for w in s["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {(out or base) / 'audit_summary.md'}; each run's report and model card in its "
          f"{f'folder under {out}' if out else 'audit folder'}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    """``cifarlab robustness``: one run, or each run of a ``--runs N`` folder."""
    from .export import default_report_folder, other_data_folder
    from .fsutil import check_folder_path, json_text
    from .robustness import check_options, format_report, format_runs, list_corruptions, robustness_run, \
        robustness_runs

    if args.list:
        print(list_corruptions())
        return 0
    if args.run is None:
        raise ConfigError("robustness needs a run folder: cifarlab robustness RUN (or --list to name the corruptions)")
    # the options first: a mistake in them should cost no data loading
    check_options(args.corruptions, args.severities, args.images, args.seed, args.corrupted_data is not None)
    if args.out:
        check_folder_path(args.out)
    folder, runs, several = _folder_and_runs(args.run)
    ds = _load_eval_data(args, folder, runs)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    kw = dict(corruptions=args.corruptions, severities=args.severities, seed=args.seed, images=args.images,
              corrupted_data=args.corrupted_data, tta=args.tta, device=args.device, uncalibrated=args.uncalibrated,
              log=log)
    if several:
        out = Path(args.out) if args.out else other_data_folder(folder, "robustness", ds, runs)
        result = robustness_runs(folder, ds, out, **kw)
        print(json_text(result) if args.json else format_runs(result, out or folder, out))
        return 0
    out = Path(args.out) if args.out else default_report_folder(folder, "robustness", ds)
    result = robustness_run(folder, ds, out, **kw)
    print(json_text(result) if args.json else f"{format_report(result)}\nReport files in {out}")
    return 0


def cmd_datasheet(args: argparse.Namespace) -> int:
    """``cifarlab datasheet``: the data alone."""
    from .about import read_about, template
    from .datasheet import format_datasheet, make_datasheet
    from .fsutil import check_folder_path, json_text

    if args.about_template:
        print(template(), end="")
        return 0
    out = Path(args.out or "datasheet")
    check_folder_path(out)  # these checks before the data is loaded
    facts = read_about(args.about)
    ds = _load_data(args)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    report, _ = make_datasheet(ds, out, log, facts["data"])
    print(json_text(report) if args.json else format_datasheet(report, out))
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    """``cifarlab duplicates``: the data alone, one run, or each run of a ``--runs N`` folder."""
    from .duplicates import check_options, duplicates_report, format_report, write_files
    from .export import report_name
    from .fsutil import check_folder_path, json_text

    check_options(args.threshold, args.shift, args.candidates)  # before the data is loaded
    if args.run is None and (args.tta or args.uncalibrated):
        raise ConfigError(f"{'--tta' if args.tta else '--uncalibrated'} applies to a run's predictions; give the run "
                          "folder: cifarlab duplicates RUN")
    if args.run is not None:
        _refuse_flags(_given_flags(args, ("image_size", "test_split")), "data read without a run",
                      f"'{args.run}' reads its data as it was trained (its config.yaml): ")
    if args.out:
        check_folder_path(args.out)
    runs: list[Path] = []
    if args.run is None:
        ds = _load_data(args)
        out = Path(args.out or "duplicates")
    else:
        folder, runs, _ = _folder_and_runs(args.run)
        ds = _load_eval_data(args, folder)
        out = Path(args.out) if args.out else folder / report_name("duplicates", ds, runs)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    report, found = duplicates_report(ds, runs, args.threshold, args.shift, args.candidates, tta=args.tta,
                                      device=args.device, uncalibrated=args.uncalibrated, log=log,
                                      mirrored=args.mirrored)
    write_files(report, found, ds, out)
    print(json_text(report) if args.json else f"{format_report(report)}\nReport files in {out}; look at "
                                              f"{out / 'duplicates.png'} before quoting the figures")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``cifarlab explain``: test images chosen from the data, or image files."""
    from .explain import check_options, explain_dataset, explain_files, format_report, require_captum
    from .export import default_report_folder, read_run
    from .fsutil import check_folder_path, json_text

    check_options(args.method, args.select, args.count, args.layer)  # before the data is loaded
    require_captum()
    if args.out:
        check_folder_path(args.out)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    kw = dict(method=args.method, layer=args.layer, sanity=not args.no_sanity_check, seed=args.seed, tta=args.tta,
              device=args.device, uncalibrated=args.uncalibrated, log=log)
    if args.images:
        given = [flag for dest, flag in (("data", "--data"), ("labels", "--labels"), ("class_name", "--class"))
                 if getattr(args, dest)]
        if given:
            raise ConfigError(f"{', '.join(given)} chooses test images, but image files were given: give one or the "
                              "other")
    run, _ = read_run(args.run)
    if args.images:
        out = Path(args.out) if args.out else run / "explain-files"
        report = explain_files(run, args.images, out, **kw)
    else:
        ds = _load_eval_data(args, run, [run])
        out = Path(args.out) if args.out else default_report_folder(run, "explain", ds)
        report = explain_dataset(run, ds, out, select=args.select, count=args.count, class_name=args.class_name,
                                 **kw)
    print(json_text(report) if args.json else format_report(report, out))
    return 1 if report.get("errors") else 0


def cmd_label_issues(args: argparse.Namespace) -> int:
    """``cifarlab label-issues``: one run, or the runs of a ``--runs N`` folder together."""
    from .export import default_report_folder, finished_runs, is_runs_set, other_data_folder, read_run
    from .fsutil import check_folder_path, json_text
    from .label_issues import check_review, format_report, label_issues_run, label_issues_runs, validation_images

    check_review(args.review)  # before the data is loaded
    if args.out:
        check_folder_path(args.out)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    kw = dict(tta=args.tta, device=args.device, uncalibrated=args.uncalibrated, log=log)
    if args.split == "val":  # the run's own data, its validation images as the images to doubt
        if is_runs_set(args.run):
            raise ConfigError(f"--split val takes one run, whose validation images are its own; give one of the runs "
                              f"of '{args.run}', such as '{Path(args.run) / 'run-0'}'")
        run, _ = read_run(args.run)
        ds = validation_images(run, _load_eval_data(args, run))
        out = Path(args.out) if args.out else run / "label-issues-val"
        report = label_issues_run(run, ds, out, args.review, **kw)
    elif is_runs_set(args.run):  # the runs' mean probabilities
        base = Path(args.run)
        runs = finished_runs(base)
        ds = _load_eval_data(args, base, runs)
        out = Path(args.out) if args.out else other_data_folder(base, "label-issues", ds, runs) or \
            base / "label-issues"
        report = label_issues_runs(base, ds, out, args.review, **kw)
    else:
        run, _ = read_run(args.run)
        ds = _load_eval_data(args, run, [run])
        out = Path(args.out) if args.out else default_report_folder(run, "label-issues", ds)
        report = label_issues_run(run, ds, out, args.review, **kw)
    print(json_text(report) if args.json else format_report(report, out))
    return 0


def cmd_ood(args: argparse.Namespace) -> int:
    """``cifarlab ood``: the run's own test images against other data and synthetic images; or
    each run of a ``--runs N`` folder against the same images."""
    from .export import finished_runs, is_runs_set, read_run
    from .fsutil import check_folder_path, json_text
    from .ood import check_options, format_report, format_runs, ood_run, ood_runs

    check_options(args.score, args.sources, args.count, args.knn_bank, args.keep)  # before the data is loaded
    if args.out:
        check_folder_path(args.out)
    log = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr))
    kw = dict(score=args.score, count=args.count, seed=args.seed, tta=args.tta, device=args.device,
              uncalibrated=args.uncalibrated, skip_bad_images=bool(args.skip_bad_images), log=log,
              knn_bank=args.knn_bank, keep=args.keep)
    if is_runs_set(args.run):
        base = Path(args.run)
        finished_runs(base)  # unfinished runs are refused before the data is loaded
        ds = _load_eval_data(args, base)  # its test images, as for one run
        out = Path(args.out) if args.out else None
        summary = ood_runs(base, ds, args.sources, out, **kw)
        print(json_text(summary) if args.json else format_runs(summary, out or base, out))
        return 0
    run, _ = read_run(args.run)
    ds = _load_eval_data(args, run)
    out = Path(args.out) if args.out else run / "ood"
    report = ood_run(run, ds, args.sources, out, **kw)
    print(json_text(report) if args.json else format_report(report, out))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``cifarlab compare``."""
    from .audit import CLI_NAMES, check_bootstrap, check_groups_args
    from .compare import check_same_classes, compare_run_sets, compare_runs, format_comparison, format_run_sets
    from .export import check_weights, is_runs_set
    from .fsutil import json_text

    if Path(args.run_a).resolve() == Path(args.run_b).resolve():  # the same weights and settings: nothing to test
        raise ConfigError(f"'{args.run_a}' and '{args.run_b}' are the same folder; give two runs (or two --runs "
                          "folders) to compare")
    sets = [is_runs_set(r) for r in (args.run_a, args.run_b)]
    if args.ensembles and not any(sets):
        raise ConfigError(f"--ensembles compares the ensembles of --runs N folders, and neither '{args.run_a}' nor "
                          f"'{args.run_b}' is one; leave it out to compare the two runs")
    if all(sets) and not args.ensembles:  # two recipes, several seeds each: their summaries, no data needed
        given = _given_flags(args, (*_DATA_OPTIONS, "groups", "intersections", "bootstrap", "tta", "device",
                                    "uncalibrated"))
        if given:
            raise ConfigError(f"{', '.join(given)}: two --runs folders are compared from their summaries, with no "
                              "data and no model run; leave these out, compare their ensembles (--ensembles), or "
                              "compare two single runs (RUN/run-K)")
        result = compare_run_sets(args.run_a, args.run_b)
        print(json_text(result) if args.json else format_run_sets(result))
        return 0
    n_boot = 1000 if args.bootstrap is None else args.bootstrap
    check_bootstrap(n_boot, CLI_NAMES)  # these checks before the data is loaded
    check_groups_args(args.intersections, args.groups)
    # A --runs folder beside a run (or with --ensembles, two) is compared as its ensemble: one model.
    (run_a, runs_a, classes_a), (run_b, runs_b, classes_b) = (_compared(r) for r in (args.run_a, args.run_b))
    if not runs_b:
        check_weights(run_b)  # run A's before its data loads
    check_same_classes(run_a, classes_a, run_b, classes_b)
    ds = _load_eval_data(args, run_a, (runs_a or [run_a]) + (runs_b or [run_b]))
    result = compare_runs(run_a, run_b, ds, tta=args.tta, device=args.device or "auto", n_boot=n_boot,
                          groups_csv=args.groups, uncalibrated=args.uncalibrated, intersections=args.intersections)
    print(json_text(result) if args.json else format_comparison(result))
    return 0


def _folder_and_runs(given: str) -> tuple[Path, list[Path], bool]:
    """The run folder a command was given and ``[it]``, or the folder of ``--runs N`` and its
    runs (refused, before any data loads, where one has not finished); and which of the two."""
    from .export import finished_runs, is_runs_set, read_run

    if is_runs_set(given):
        return Path(given), finished_runs(given), True
    run, _ = read_run(given)
    return run, [run], False


def _compared(folder: str) -> tuple[Path, list[Path], list[str]]:
    """One side of ``cifarlab compare``: the folder, its finished runs where it is a ``--runs N``
    folder (else an empty list), and the classes its model tells apart."""
    from .export import read_run

    folder, runs, several = _folder_and_runs(folder)
    return folder, runs if several else [], read_run(runs[0])[1]["classes"]


def cmd_export(args: argparse.Namespace) -> int:
    """``cifarlab export``."""
    from .deploy import export_onnx

    int8_only = _given_flags(args, ("calibration_images", "calibration_method", "groups", "intersections",
                                    *_DATA_OPTIONS))
    if args.out and args.out.endswith(".h5"):
        from .keras_files import export_keras_weights

        onnx_only = (_given_flags(args, ("tta", "opset")) + ([] if args.check else ["--no-check"])  # stores False
                     + _given_flags(args, ("uncalibrated", "about", "int8")))
        _refuse_flags(onnx_only + int8_only, f"ONNX files, not to Keras weights ('{args.out}')")
        export_keras_weights(args.run, args.out)
        return 0
    if not args.int8:
        _refuse_flags(int8_only, "--int8 (the float32 file needs no data)", "add --int8, or ")
        export_onnx(args.run, args.out, tta=args.tta, opset=args.opset, check=args.check,
                    uncalibrated=args.uncalibrated, about=args.about)
        return 0
    from .audit import check_groups_args
    from .quantize import check_calibration, export_int8

    n = 1000 if args.calibration_images is None else args.calibration_images
    method = args.calibration_method or "minmax"
    check_calibration(n, method)  # before the data is loaded
    check_groups_args(bool(args.intersections), args.groups)
    run, runs, _ = _folder_and_runs(args.run)  # a --runs N folder: their ensemble
    ds = _load_eval_data(args, run, runs)
    export_int8(run, ds, args.out, n, method, tta=args.tta, opset=args.opset, check=args.check,
                uncalibrated=args.uncalibrated, about=args.about, groups_csv=args.groups,
                intersections=bool(args.intersections), progress=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """``cifarlab import``."""
    from .keras_files import import_keras

    size = None if args.image_size is None else parse_image_size(args.image_size)
    import_keras(args.file, args.out, architecture=args.architecture, classes=args.classes, image_size=size,
                 overwrite=args.overwrite)
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    """``cifarlab augment``."""
    from .augment_cli import augment_command

    return augment_command(args)


def _check_model(name: str) -> None:
    """Refuse a ``--model`` that is not in the registry, naming the registered ones."""
    from .models import list_models

    if name not in list_models():
        raise ConfigError(f"--model '{name}' is not a registered model{did_you_mean(name, list_models())}; valid: "
                          f"{', '.join(list_models())}")


def cmd_summary(args: argparse.Namespace) -> int:
    """``cifarlab summary``: the table of a registered model, or of the model a run folder trained."""
    from .models import create_model, list_models
    from .models.summary import format_summary

    if args.target and args.model:
        raise ConfigError(f"give the model once: '{args.target}' and --model '{args.model}' were both given")
    target = args.target or args.model
    if target is None:
        raise ConfigError("give a registered model name or a run folder, such as 'cifarlab summary keras-deep' "
                          f"(models: {', '.join(list_models())})")
    if target not in list_models():
        if Path(target).is_dir():
            from .export import read_run

            if args.num_classes is not None or args.input is not None:
                raise ConfigError(f"'{target}' is a run folder, whose classes and image size are its own; "
                                  "--num-classes and --input are for a model name")
            _, arch = read_run(target)
            inp = arch["input"]
            model = create_model(arch["model"], **arch.get("model_kwargs", {}))
            print(format_summary(model, (inp["channels"], inp["height"], inp["width"]), arch["model"]))
            return 0
        if args.target:
            raise ConfigError(f"'{target}' is neither a registered model{did_you_mean(target, list_models())} nor "
                              f"a run folder; models: {', '.join(list_models())}")
        _check_model(target)  # as --model, refused in its words
    text = args.input or "32,32,3"
    try:
        h, w, c = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input '{text}' is not valid; expected H,W,C such as 32,32,3") from None
    model = create_model(target, num_classes=10 if args.num_classes is None else args.num_classes, in_chans=c,
                         img_size=(h, w))
    print(format_summary(model, (c, h, w), target))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cifarlab cache``: each entry of the cache folder with its size and last use; ``--clear``
    removes those of one kind (or all), ``--unused-days`` only the ones unused that long."""
    import time

    from .data.cache import KIND_TITLES, KINDS, cache_dir, cache_entries, clear_entries, format_size
    from .fsutil import json_text

    days = args.unused_days
    if days is not None and (args.clear is None or not days >= 0 or days == float("inf")):
        raise ConfigError(f"--unused-days {days:g} is not valid; " + (
            "it chooses what --clear removes: give --clear too" if args.clear is None
            else "give a number of days, 0 or more"))
    now = time.time()
    entries = cache_entries(now)
    removed = []
    if args.clear:
        removed = clear_entries(entries, KINDS if args.clear == "all" else (args.clear,), days, now)
        gone = {id(e) for e in removed}
        entries = [e for e in entries if id(e) not in gone]
    if args.json:
        print(json_text({"folder": str(cache_dir()), "entries": [e.as_json() for e in entries],
                         **({"removed": [e.as_json() for e in removed]} if args.clear else {})}))
        return 0
    print(f"cache folder: {cache_dir()}")
    if args.clear:
        what = {"all": "everything cifarlab keeps", "decoded": "the decoded data", "downloads": "the downloads",
                "kernels": "the compiled kernels"}[args.clear]
        whole = [e for e in removed if not e.leftover]
        left = [e for e in removed if e.leftover]
        print(f"removed {what}" + (f" not used for {days:g} day{'' if days == 1 else 's'}" if days is not None else "")
              + f": {len(whole)} entr{'y' if len(whole) == 1 else 'ies'}, {format_size(sum(e.size for e in whole))}"
              + (f"; and {len(left)} left by stopped writes, {format_size(sum(e.size for e in left))}" if left else ""))
    for kind in KINDS:
        mine = [e for e in entries if e.kind == kind and not e.leftover]
        if not mine:
            continue
        print(f"{KIND_TITLES[kind]}: {len(mine)}, {format_size(sum(e.size for e in mine))}")
        for e in mine:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            print(f"  {format_size(e.size):>10}  last used {used}  {e.describe()}")
    left = [e for e in entries if e.leftover]
    if left:
        print(f"left by stopped writes: {len(left)}, {format_size(sum(e.size for e in left))} "
              "(cifarlab cache --clear removes them)")
    if not entries:
        print("nothing cached" + (" now" if removed else " yet"))
    else:
        print(f"total {format_size(sum(e.size for e in entries))}" + (
            "" if args.clear else "; cifarlab cache --clear removes the decoded data, --clear all everything"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:  # noqa: ARG001
    """``cifarlab list``: each model with its size, each recipe with the settings it resolves to."""
    import torch

    from .augment import PRESETS
    from .config import resolve_config
    from .models import create_model, list_models, min_image_size, model_about
    from .optim import OPTIMIZER_KEYS
    from .recipes import RECIPES

    print("models (parameters for 32x32 RGB images and 10 classes; the smallest image each takes):")
    for name in list_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            params = sum(p.numel() for p in create_model(name, num_classes=10, in_chans=3, img_size=32).parameters())
        size = min_image_size(name)
        print(f"  {name:<16}{params:>12,}  {f'{size}x{size}':>5}  {model_about(name)}")
    print("recipes (cifarlab train --recipe NAME; any setting can be overridden):")
    for name in RECIPES:
        c = resolve_config(name)
        aug = c.augment.preset + (f", cutout {c.augment.cutout}" if c.augment.cutout else "")
        picked = f", trains on the hardest {c.train.select_fraction:g} of each batch" \
            if c.train.select_fraction < 1 else ""
        print(f"  {name:<22}{c.model.name}, {c.optim.name} ({c.optim.schedule} lr), batch {c.train.batch_size}, "
              f"{c.train.epochs} epochs, augment {aug}, validation {c.data.val_split:g}, tta {c.train.tta}, "
              f"precision {c.train.precision}{picked}")
    print("augmentation presets (--augment): " + ", ".join(PRESETS))
    print("augmentation policies (--auto-augment): " + ", ".join(POLICIES))
    print("optimizers (--optimizer), with the optim keys each reads besides lr, weight_decay and clipping: "
          + "; ".join(f"{name} ({', '.join(keys)})" for name, keys in OPTIMIZER_KEYS.items()))
    return 0


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Exit with the usage of the command the unknown arguments were given to (argparse names
    only the top level's) and the closest option to each unknown one."""
    sub = next((a.choices.get(args.command) for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)), None) if args.command else None
    target = sub or parser
    # Matched without their dashes, which every option shares and which would make '--subset'
    # look like '--out'.
    known = {o.lstrip("-"): o for a in target._actions for o in a.option_strings}
    hints = []
    for e in extra:
        if e.startswith("-"):
            name = e.split("=", 1)[0]
            close = difflib.get_close_matches(name.lstrip("-"), list(known), n=1, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {known[close[0]]}?")
    target.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one paragraph (no traceback) and exit with status 2."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args, extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away is caught below, not at exit
        return code
    except BrokenPipeError:
        # The reader stopped early (`cifarlab list | head`): stop quietly, as Unix tools do. The
        # interpreter's own flush at exit would fail again, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except TrainingInterrupted as e:
        print(f"cifarlab: {e}", file=sys.stderr)
        return 130
    except CifarlabError as e:
        print(f"cifarlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
