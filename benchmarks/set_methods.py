"""Which kind of prediction set: the sets ``cifarlab calibrate --sets`` offers against the adaptive ones.

cifarlab's prediction sets are the least-ambiguous sets of Sadinle, Lei and Wasserman (2019): a
class enters where its probability reaches a floor, one for all classes or, with
``--sets-by-class``, one per class. The adaptive sets of Romano, Sesia and Candes (2020, "APS")
and their regularised form (Angelopoulos et al., 2021, "RAPS") are the other common choice: a
class enters while the probability mass ranked above it is below a threshold, which is meant to
spread coverage more evenly over easy and hard images, at the cost of larger sets, and, to hit
the coverage rather than exceed it, of a random draw per image (the same image may get another
set the next time). This script fits each kind on a calibrated run's held-out images (those
``calibrate`` fits on) and measures it on the test images, so the choice rests on figures:

- ``lac``: one floor (``--sets``);  ``lac-by-class``: a floor per class (``--sets-by-class``);
- ``aps``: APS without the random draw (the class that crosses the threshold included);
- ``aps-random``: APS with it;  ``raps``: RAPS with it, penalty ``--raps-lambda`` per rank past
  ``--raps-k``.

For each run and kind it prints the test coverage, mean set size, share of empty sets, the least
covered class, the spread of the classes' coverage and how many classes fall below their chance
range (:func:`cifarlab.conformal.set_report`), then the mean over the runs. Usage:

    python benchmarks/set_methods.py RUN [RUN ...] --data DATA [--coverage 0.9] [--seed 0]

Each RUN must be a run folder that holds out validation images; its probabilities are calibrated
where ``cifarlab calibrate`` fitted a temperature, as ``predict`` gives them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cifarlab.conformal import conformal_floor, fit_floors, fit_image_counts, min_images, prediction_sets, set_report

METHODS = ("lac", "lac-by-class", "aps", "aps-random", "raps")


def mass_above(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each image and class, the probability mass of the classes ranked above it (most
    probable first, ties by class order), and its rank (1 for the most probable)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, 1)
    above = np.empty_like(probs)
    np.put_along_axis(above, order, np.cumsum(ranked, 1) - ranked, 1)
    rank = np.empty(probs.shape, np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(1, probs.shape[1] + 1), probs.shape), 1)
    return above, rank


def adaptive_scores(probs: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int) -> np.ndarray:
    """Every class's APS/RAPS score (N, classes): the mass ranked above it, plus its own
    probability (times ``u``, each image's uniform draw, where randomised), plus ``lam`` for each
    rank past ``k_reg``; a class enters a set where its score is at most the threshold."""
    above, rank = mass_above(probs)
    own = probs if u is None else u[:, None] * probs
    return above + own + lam * np.maximum(rank - k_reg, 0)


def fit_sets(method: str, probs: np.ndarray, y: np.ndarray, coverage: float, rng: np.random.Generator,
             lam: float = 0.01, k_reg: int = 2):
    """Fit ``method`` on held-out ``probs`` and labels ``y``; return the function that gives
    the sets (boolean N x classes) of new images' probabilities."""
    if method in ("lac", "lac-by-class"):
        floors = fit_floors(probs, y, coverage, by_class=method == "lac-by-class")
        return lambda p: prediction_sets(p, floors)
    randomised = method != "aps"
    lam, k_reg = (lam, k_reg) if method == "raps" else (0.0, 0)
    scores = adaptive_scores(probs, rng.random(len(y)) if randomised else None, lam, k_reg)[np.arange(len(y)), y]
    # the score that ceil((n + 1) * coverage) of the n held-out images stay at or under, as
    # cifarlab's floor is the probability that as many reach; too few images: every class
    q = np.inf if len(y) < min_images(coverage) else -conformal_floor(-scores, coverage)
    if randomised:
        return lambda p: adaptive_scores(p, rng.random(len(p)), lam, k_reg) <= q
    # without the draw, the class whose own probability carries the mass past q enters too: the
    # sets are then never smaller than those of scores <= q, so the coverage still holds
    return lambda p: mass_above(p)[0] < q


def measure(run: Path, ds, coverage: float, seed: int, lam: float, k_reg: int) -> dict[str, dict]:
    """Each method's :func:`cifarlab.conformal.set_report` on the test images of ``ds`` for ``run``."""
    from cifarlab.calibrate import held_out_images
    from cifarlab.export import load_model

    pred = load_model(run, "cpu")
    held = held_out_images(run, ds)
    p_fit, y_fit = pred.predict(ds.x_train[held]), ds.y_train[held]
    p_test = pred.predict(ds.x_test)
    out = {}
    for method in METHODS:
        rng = np.random.default_rng(seed)
        sets = fit_sets(method, p_fit, y_fit, coverage, rng, lam, k_reg)(p_test)
        fit_images = fit_image_counts(y_fit, len(pred.classes), by_class=method == "lac-by-class")
        out[method] = set_report(sets, ds.y_test, pred.classes, coverage, fit_images, method == "lac-by-class")
    return out


def row(method: str, r: dict) -> list:
    """The figures the table prints for one report."""
    cov = [c["coverage"] for c in r["per_class"] if c["coverage"] is not None]
    worst = min((c for c in r["per_class"] if c["coverage"] is not None), key=lambda c: c["coverage"])
    return [method, r["coverage"], r["mean_size"], r["empty"], worst["coverage"], worst["class"], float(np.std(cov)),
            len(r["short_of_coverage"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (calibrated, with validation images)")
    ap.add_argument("--data", required=True, help="the data the runs were trained on")
    ap.add_argument("--coverage", type=float, default=0.9, help="the share of images whose set should hold their class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random draws of aps-random and raps")
    ap.add_argument("--raps-lambda", type=float, default=0.01, help="RAPS' penalty per rank past --raps-k")
    ap.add_argument("--raps-k", type=int, default=2, help="ranks RAPS leaves unpenalised")
    args = ap.parse_args(argv)
    from cifarlab.conformal import check_coverage
    from cifarlab.data import load_dataset
    from cifarlab.errors import CifarlabError

    try:
        check_coverage(args.coverage, "--coverage")
        ds = load_dataset(args.data)
        reports = [measure(Path(r), ds, args.coverage, args.seed, args.raps_lambda, args.raps_k) for r in args.runs]
    except CifarlabError as e:
        print(f"set_methods: error: {e}", file=sys.stderr)
        return 1
    head = f"{'method':<13} {'coverage':>8} {'size':>6} {'empty':>6} {'least covered class':>24} {'class sd':>8} " \
           f"{'below range':>11}"
    for run, rep in zip(args.runs, reports):
        print(f"{run} (coverage {args.coverage:g}, {len(ds.y_test):,} test images)")
        print(head)
        for method in METHODS:
            m, c, s, e, w, wn, sd, short = row(method, rep[method])
            print(f"{m:<13} {c:>8.4f} {s:>6.2f} {e:>6.3f} {f'{wn} {w:.4f}':>24} {sd:>8.4f} {short:>11}")
    if len(reports) > 1:
        print(f"mean over {len(reports)} runs")
        print(head)
        for method in METHODS:
            rows = [row(method, rep[method]) for rep in reports]
            c, s, e, w, sd, short = (np.mean([r[i] for r in rows]) for i in (1, 2, 3, 4, 6, 7))
            print(f"{method:<13} {c:>8.4f} {s:>6.2f} {e:>6.3f} {f'{w:.4f}':>24} {sd:>8.4f} {short:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
