"""Prediction sets that hold the true class with a chosen probability (split conformal prediction).

A top-1 answer hides how unsure the model is; a confidence threshold (``predict
--min-confidence``) only says whether to trust it. A prediction set instead names every class
the image may plausibly be, as many as the model's doubt needs: one where it is sure, several
where it is torn between, say, cat and dog. Split conformal prediction (Vovk et al., 2005;
Angelopoulos and Bates, 2021, "A Gentle Introduction to Conformal Prediction") makes the sets
hold the true class for at least a chosen share of images (``coverage``, such as 0.9), whatever
the model, on the one assumption that the images to predict are drawn as the held-out images
the sets were fitted on were (exchangeable: the same source, not another collection).

The sets here are those of Sadinle, Lei and Wasserman (2019), the smallest on average for a
coverage: a class enters an image's set where its probability reaches a floor. The floor is fitted
on ``n`` held-out images as the probability of the true class that ``ceil((n + 1) * coverage)``
of them reach, so that a new image's true class reaches it with probability at least
``coverage`` (and below ``coverage + 1 / (n + 1)``, without ties), on average over the draw of
the ``n``: one fit's coverage varies about it, the less the more images it was fitted on
(:func:`expected_range`). That holds on average over images, not for each class: a class the
model finds hard may be covered far less often, as the easy classes are covered more.
``by_class`` fits a floor per class on the held-out images of that class (Mondrian conformal
prediction; Sadinle et al.'s class-specific sets), which gives each class its coverage: a hard
class enters sets at a lower probability, so the sets grow. The evaluation reports coverage
class by class either way, so that a shortfall is seen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import CifarlabError


def check_coverage(coverage: float, name: str = "--sets") -> float:
    """``coverage`` if it lies strictly between 0 and 1, else a :class:`CifarlabError` naming it."""
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
        raise CifarlabError(f"{name} {coverage!r} is not valid; give the share of images whose set should hold "
                            "their true class, between 0 and 1, such as 0.9")
    return float(coverage)


def _rank(n: int, coverage: float) -> int:
    """ceil((n + 1) * coverage): how many of ``n`` held-out images the floor must cover. The guard
    keeps a product such as 10 * 0.9, a hair above 9 in floating point, from rounding up past 9."""
    return math.ceil((n + 1) * coverage - 1e-9)


def conformal_floor(p_true: np.ndarray, coverage: float) -> float:
    """The probability floor that the true class of a new image reaches with probability at least
    ``coverage``, from ``p_true``, the probabilities held-out images gave their true class: the
    ``ceil((n + 1) * coverage)``-th largest of the ``n``. Where that exceeds ``n`` (too few
    images for the coverage: fewer than ``coverage / (1 - coverage)``), 0: every class."""
    p = np.sort(np.asarray(p_true, np.float64))
    n = len(p)
    k = _rank(n, coverage)
    return 0.0 if k > n else float(p[n - k])


def fit_floors(probs: np.ndarray, y: np.ndarray, coverage: float, by_class: bool = False) -> np.ndarray:
    """One probability floor per class (float64, ``probs.shape[1]`` of them) for sets of
    ``coverage``, fitted on held-out images' probabilities ``probs`` (N, classes) and labels
    ``y``: the same floor for every class, or with ``by_class`` each class's own, from the images
    of that class (0, every image's set holding it, for a class with too few images)."""
    check_coverage(coverage, "coverage")
    probs, y = np.asarray(probs), np.asarray(y)
    if len(y) == 0:
        raise CifarlabError("prediction sets need held-out images to fit their floor on, and there are none")
    p_true = probs[np.arange(len(y)), y]
    k = probs.shape[1]
    if not by_class:
        return np.full(k, conformal_floor(p_true, coverage))
    return np.array([conformal_floor(p_true[y == c], coverage) for c in range(k)])


def fit_image_counts(y: np.ndarray, n_classes: int, by_class: bool = False) -> list[int]:
    """The held-out images each class's floor is fitted on, from their labels ``y``: its own
    images with ``by_class``, else all of them (as :func:`set_report` takes ``fit_images``)."""
    return np.bincount(y, minlength=n_classes).tolist() if by_class else [len(y)] * n_classes


def min_images(coverage: float) -> int:
    """The fewest held-out images for which :func:`conformal_floor` is above 0 at ``coverage``."""
    n = 1
    while _rank(n, coverage) > n:
        n += 1
    return n


def prediction_sets(probs: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Which classes each image's set holds: ``probs`` (N, classes) at or above each class's
    floor, as a boolean (N, classes) array. A set may be empty, where no class reaches its floor."""
    return np.asarray(probs, np.float64) >= np.asarray(floors, np.float64)[None, :]


def expected_range(n_test: int, n_fit: int, coverage: float, alpha: float = 0.05) -> list[float] | None:
    """The share of ``n_test`` new images whose sets would hold their true class in ``1 - alpha``
    of draws, for images drawn as the ``n_fit`` the floor was fitted on were: given the fit, the
    coverage is Beta(k, n_fit + 1 - k) with k = ceil((n_fit + 1) * coverage) (Vovk, 2012), and the
    count covered beta-binomial. Both the fit's draw and the test images' count, so a shortfall
    outside this range is beyond chance; an exact binomial interval on the test images alone
    would take a floor fitted on few images for a broken promise. None where ``n_test`` is 0;
    [1, 1] where the fit had too few images (every set holds every class)."""
    from scipy.stats import betabinom

    if n_test == 0:
        return None
    k = _rank(n_fit, coverage)
    if k > n_fit:
        return [1.0, 1.0]
    d = betabinom(n_test, k, n_fit + 1 - k)
    return [float(d.ppf(alpha / 2)) / n_test, float(d.ppf(1 - alpha / 2)) / n_test]


def set_report(sets: np.ndarray, y: np.ndarray, classes: list[str], coverage: float,
               fit_images: list[int], by_class: bool = False) -> dict[str, Any]:
    """How prediction sets ``sets`` (N, classes; :func:`prediction_sets`) fared on images labelled
    ``y``: the share whose set held the true class (coverage) with its exact 95% interval, beside
    the ``coverage`` they were fitted for and the range of coverage chance allows
    (:func:`expected_range`; ``fit_images``: the images each class's floor was fitted on, the
    same number for every class where one floor serves all; ``by_class``: a floor per class,
    whose overall coverage averages the classes' and has no range of its own here); the sets'
    mean size and how many had each size; the empty ones; the accuracy where the set was one class; each class's
    coverage, range and mean size; and ``short_of_coverage``, the classes below their range."""
    from .audit import proportion_ci

    sets, y = np.asarray(sets, bool), np.asarray(y)
    n = len(y)
    held = sets[np.arange(n), y]
    size = sets.sum(1)
    one = size == 1
    per_class = []
    for c, name in enumerate(classes):
        mine = y == c
        k = int(mine.sum())
        per_class.append({"class": name, "images": k, "coverage": float(held[mine].mean()) if k else None,
                          "coverage_ci": proportion_ci(int(held[mine].sum()), k) if k else None,
                          "expected_range": expected_range(k, fit_images[c], coverage),
                          "mean_size": float(size[mine].mean()) if k else None})
    return {"coverage_target": float(coverage), "images": int(n),
            "coverage": float(held.mean()) if n else None,
            "coverage_ci": proportion_ci(int(held.sum()), n) if n else None,
            # one floor's range; by class, the classes' own ranges say it
            "expected_range": None if by_class else expected_range(n, fit_images[0], coverage),
            "mean_size": float(size.mean()) if n else None,
            "sizes": {str(s): int(c) for s, c in enumerate(np.bincount(size, minlength=1)) if c},
            "empty": float((size == 0).mean()) if n else None,
            "singletons": float(one.mean()) if n else None,
            "singleton_accuracy": float(held[one].mean()) if one.any() else None,
            "per_class": per_class,
            "short_of_coverage": [r["class"] for r in per_class if below_range(r["coverage"], r["expected_range"])]}


def below_range(coverage: float | None, expected: list[float] | None) -> bool:
    """Whether a coverage lies below the range of :func:`expected_range`: covered less often than
    promised, beyond what the fit's draw and the test images' count explain."""
    return coverage is not None and expected is not None and coverage < expected[0]
