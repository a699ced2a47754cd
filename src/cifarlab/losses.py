"""The training loss: categorical cross-entropy, optionally with label smoothing and with each
example weighted by its class (Keras' ``fit(class_weight=...)``).

Class weights answer a training set whose classes are not equally common: unweighted, a class
with a tenth of the images gets a tenth of the say in every gradient, and the model learns to
guess it less often. ``balanced`` weighs each class by n_samples / (n_classes x its count), so
every class weighs the same in total (scikit-learn's and Keras' usual choice).

The logit-adjusted loss (Menon et al., 2021, "Long-tail learning via logit adjustment") answers
it another way: the loss sees each logit plus tau x log(the class's training share), so the
model's own logits need not carry the classes' shares and learn what tells the classes apart;
predictions, from the plain logits, then treat the classes as equally likely (for tau = 1).

Knowledge distillation (Hinton et al., 2015, "Distilling the knowledge in a neural network")
adds a second target: a trained teacher's probabilities, softened by a temperature, which say
which wrong classes an image resembles as well as which class is right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, short_list


def class_weights(spec: str | Mapping[str, float] | None, labels: np.ndarray | torch.Tensor,
                  classes: Sequence[str]) -> torch.Tensor | None:
    """The per-class weight vector (float32, one entry per class, on the CPU) that ``spec``
    (``train.class_weight``) gives for training ``labels`` (class indices) of ``classes``.

    ``None``: no weighting. ``"balanced"``: n_samples / (n_classes x count), computed by
    scikit-learn's ``compute_class_weight``; a class without training images is refused, since
    its weight would be infinite. A mapping: each key a class name (or its index, as Keras'
    ``class_weight`` dict takes it) and its weight; classes not named weigh 1.
    """
    if spec is None:
        return None
    y = _as_numpy(labels)
    k = len(classes)
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        _counts_of_every_class(y, classes, "train.class_weight = 'balanced'",
                               "name the weights instead (--class-weight NAME=WEIGHT,...) or train on other data")
        weights = compute_class_weight("balanced", classes=np.arange(k), y=y)
        return torch.tensor(weights, dtype=torch.float32)
    out = torch.ones(k, dtype=torch.float32)
    index = {name: i for i, name in enumerate(classes)}
    for key, weight in spec.items():
        if key in index:  # a class name first: a folder's classes may be named "0", "1", ...
            i = index[key]
        elif str(key).isdigit() and int(key) < k:
            i = int(key)
        else:
            raise ConfigError(f"train.class_weight names class {key!r}, which this data does not have; its "
                              f"classes are {short_list(list(classes))} (or their indices 0 to {k - 1})")
        out[i] = float(weight)
    if not out.any():
        raise ConfigError("train.class_weight gives every class weight 0, so nothing would train; give at least "
                          "one class a weight above 0")
    return out


def logit_offsets(tau: float, labels: np.ndarray | torch.Tensor, classes: Sequence[str]) -> torch.Tensor | None:
    """tau x log(each class's share of the training ``labels``), float32 on the CPU: what the
    logit-adjusted loss adds to the logits (``train.logit_adjustment``); None for tau 0. A
    class without training images is refused, its offset being minus infinity."""
    if not tau:
        return None
    counts = _counts_of_every_class(_as_numpy(labels), classes, f"train.logit_adjustment = {tau:g}",
                                    "leave it out or train on other data")
    return torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


def _as_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def _counts_of_every_class(y: np.ndarray, classes: Sequence[str], setting: str, remedy: str) -> np.ndarray:
    """The number of labels ``y`` of each of ``classes``; refused, naming ``setting`` (such as
    "train.class_weight = 'balanced'") and the ``remedy``, where a class has none, since a
    setting computed from the counts would then divide by 0 or take log 0."""
    counts = np.bincount(y, minlength=len(classes))
    if empty := [classes[i] for i in np.flatnonzero(counts == 0)]:
        raise ConfigError(f"{setting} needs training images of every class, and {short_list(empty)} "
                          f"{'has' if len(empty) == 1 else 'have'} none here; {remedy}")
    return counts


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                  class_weight: torch.Tensor | None = None,
                  logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (computed in float32) against class indices ``y``, as
    Keras' categorical cross-entropy on a softmax. With ``class_weight``, each example's loss
    is multiplied by its class's weight and the sum divided by the batch size, as Keras reduces
    a sample-weighted loss ("sum_over_batch_size"): a batch of rare classes counts for more than
    one of common classes, where PyTorch's ``weight=`` would divide by the batch's summed weights.
    With ``logit_offset`` (one per class, :func:`logit_offsets`), the loss is that of the logits
    plus the offsets: the logit-adjusted loss."""
    logits = logits.float() if logit_offset is None else logits.float() + logit_offset
    if class_weight is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    per_example = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
    return (per_example * class_weight[y]).mean()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: T^2 x KL(softmax(teacher / T) || softmax(logits / T)),
    the mean over the batch (computed in float32). The factor T^2 keeps its gradients' size
    independent of T, as the paper asks, so that a weight mixing it with the cross-entropy means
    the same at any temperature."""
    t = float(temperature)
    model = F.log_softmax(logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(model, teacher, reduction="batchmean", log_target=True) * (t * t)
