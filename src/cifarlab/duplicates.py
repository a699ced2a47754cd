"""Test images that are near-copies of training images, and what they do to a test accuracy.

Barz and Denzler (2020, "Do we train on test data? Purging CIFAR of near-duplicates") found that
3.3% of CIFAR-10's test images and 10% of CIFAR-100's have a near-duplicate in the training
set: the same photo, perhaps shifted, re-coloured or re-compressed. A model can get those right
by memory, so its test accuracy says more about the images it has seen than it should. This
module finds such pairs in any data set cifarlab reads, and, given a run, reports its accuracy
with and without the test images whose copy it trained on.

How pairs are found, in two stages per test image:

1. candidates: the ``candidates`` training images most like it at 8x8 (block means, each image
   centred and scaled to unit length, so brightness and contrast do not count), by cosine;
2. score: both images smoothed by a 3x3 box filter, the normalised cross-correlation of the
   test image's centre (``shift`` pixels cropped from each side) with the candidate's windows
   shifted by up to ``shift`` pixels, the best of them. 1 is the same picture up to brightness
   and contrast; JPEG re-compression and resampling cost a little, less after the smoothing.

With ``mirrored``, each test image is also compared, left-right mirrored, in the same two
stages, and its best pair is the better of the two: a model trained with horizontal flips has
seen the mirror image of each of its training images. A pair scoring at least ``threshold``
counts as a duplicate. Rescaled or cropped copies are not looked for, nor are copies of flat
(single-colour) images, whose correlation is undefined (scored 0). Images that are mostly one
colour (a small aircraft on plain sky, a ship on open sea) correlate through their colour alone,
so most false matches are of such images; a mirrored search gives each test image a second
chance to meet one. The threshold is a judgement: :func:`write_files` draws the pairs either
side of it, to be looked at before its figures are quoted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import DUPLICATES_CANDIDATES as DEFAULT_CANDIDATES
from .config import DUPLICATES_SHIFT as DEFAULT_SHIFT
from .config import DUPLICATES_THRESHOLD as DEFAULT_THRESHOLD
from .data import Dataset
from .errors import CifarlabError, ConfigError
from .export import list_to_csv_rows
from .fsutil import report_folder, write_json, write_text

COARSE = 8  # side of the candidate stage's block-mean images
# Smoothing before the correlation: on pairs judged by eye it separated copies from look-alikes
# better than raw pixels, whose JPEG noise and resampling lower the score of true copies.
SMOOTH = 3
REPORTED_THRESHOLDS = (0.94, 0.95, 0.97, 0.98)  # counts at these show how much the threshold matters
_EPS = 1e-6


def check_options(threshold: float = DEFAULT_THRESHOLD, shift: int = DEFAULT_SHIFT,
                  candidates: int = DEFAULT_CANDIDATES, image_size: tuple[int, int] | None = None) -> None:
    """Refuse a threshold outside (0, 1], a negative shift or one that leaves too little of the
    image (``image_size``, height and width, where known), or fewer than one candidate."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ConfigError(f"threshold {threshold!r} is not valid; give a similarity in (0, 1], such as "
                          f"{DEFAULT_THRESHOLD}")
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise ConfigError(f"shift {shift!r} is not valid; give a whole number of pixels, 0 or more "
                          f"(default {DEFAULT_SHIFT})")
    side = None if image_size is None else min(image_size) - (SMOOTH - 1)  # after the smoothing
    if side is not None and 4 * shift >= side:
        most = "" if side < 1 else f", so give at most {(side - 1) // 4}"
        raise ConfigError(f"shift {shift} is too large for {image_size[0]}x{image_size[1]} images; the compared "
                          f"centre of the smoothed image must keep half of each side{most}")
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ConfigError(f"candidates {candidates!r} is not valid; give a whole number, 1 or more "
                          f"(default {DEFAULT_CANDIDATES})")


def _float(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) as float32 (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()


def coarse_features(images: np.ndarray) -> torch.Tensor:
    """Unit-length, zero-mean 8x8 block means of uint8 (N, H, W, C) images, (N, C*64): the
    candidate stage's description, tolerant of small shifts, brightness and contrast."""
    f = F.adaptive_avg_pool2d(_float(images), COARSE).flatten(1)
    return F.normalize(f - f.mean(1, keepdim=True), dim=1)


def _box_sums(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sums of ``x`` (..., H, W) over every ``kh`` x ``kw`` window, no padding: (..., H - kh + 1,
    W - kw + 1). Summed along the rows, then the columns: on the CPU several times faster than
    avg_pool2d, which sums each window afresh."""
    return x.unfold(-1, kw, 1).sum(-1).unfold(-2, kh, 1).sum(-1)


def _smoothed_sums(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images summed over SMOOTH x SMOOTH windows (no padding, so SMOOTH - 1
    pixels smaller each way), float32 (N, C, H', W'): the box filter's means times SMOOTH ** 2,
    in whole numbers (so exactly), which the correlation, blind to scale, scores alike."""
    return _box_sums(_float(images), SMOOTH, SMOOTH)


def _templates(queries: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's centre, ``shift`` pixels cropped from each side, mean-centred and scaled to
    unit length (float32 (N, C, h, w)), and whether it is flat (then all zero)."""
    n, _, h, w = queries.shape
    t = queries[:, :, shift:h - shift, shift:w - shift].double()  # float64: a flat centre comes out exactly 0
    t = t - t.mean((1, 2, 3), keepdim=True)
    norm = t.flatten(1).norm(dim=1)
    flat = norm < _EPS
    return (t / norm.clamp_min(_EPS).view(n, 1, 1, 1)).float(), flat


def _window_norms(others: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """For float (M, C, H, W) images, the centred norm of each window of ``size`` (h, w) over
    all channels, the windows in row-major order: (M, (H - h + 1) * (W - w + 1)), float32; 0
    for a flat window (norm at most _EPS per value), which then scores 0. In float64, so that a
    flat window's is exactly 0 (its pixels are whole numbers here)."""
    o = others.double()
    s1 = _box_sums(o.sum(1), *size).flatten(1)
    s2 = _box_sums((o * o).sum(1), *size).flatten(1)
    n = size[0] * size[1] * others.shape[1]
    norm = (s2 - s1 * s1 / n).clamp_min(0).sqrt().float()
    return torch.where(norm > _EPS * n, norm, torch.zeros_like(norm))


def _correlations(templates: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """The correlation of each of the N ``templates`` (N, C, h, w) with every window of its own
    k other images (``others``, (N * k, C, H, W), each template's k in a row): (N * k,
    (H - h + 1) * (W - w + 1)), windows in row-major order.

    By FFT: a direct grouped convolution, one group per pair, ran four times slower on the
    CPU. Each image's mean is taken out first: the templates have zero mean, so the
    correlation is the same, and the transform's rounding, relative to the image's size, is
    smaller."""
    n, c, h, w = templates.shape
    m, _, hh, ww = others.shape
    k = m // n
    others = others - others.mean((1, 2, 3), keepdim=True)
    t = torch.fft.rfft2(templates, s=(hh, ww)).conj().unsqueeze(1)  # (N, 1, C, hh, ww // 2 + 1)
    o = torch.fft.rfft2(others).view(n, k, c, hh, -1)
    # circular cross-correlation; shifts 0 .. H - h keep every window inside the image
    full = torch.fft.irfft2((o * t).sum(2), s=(hh, ww))
    return full[:, :, :hh - h + 1, :ww - w + 1].reshape(m, -1)


def _best_score(num: torch.Tensor, norm: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Each row's best normalised correlation over its windows, from :func:`_correlations`'
    ``num``, :func:`_window_norms`' ``norm`` and whether the row's template is ``flat``; a flat
    template or window scores 0."""
    ok = (norm > 0) & ~flat.view(-1, 1)
    score = torch.where(ok, num / norm.clamp_min(_EPS), torch.zeros_like(num))
    return score.max(1).values.clamp(-1, 1)


def shifted_similarity(queries: torch.Tensor, others: torch.Tensor, shift: int) -> torch.Tensor:
    """For float (N, C, H, W) ``queries`` and ``others`` (pairs by position), the largest
    normalised cross-correlation of each query's centre, ``shift`` pixels cropped from each side,
    with the windows of its other image shifted by up to ``shift`` pixels each way; (N,).
    ``others`` may also hold k images per query, (N * k, C, H, W), each query's in a row.

    Each image's brightness and contrast are taken out (the correlation of the mean-centred
    pixels), so 1 means the same picture up to those; a flat window scores 0."""
    t, flat = _templates(queries, shift)
    k = len(others) // len(queries)
    return _best_score(_correlations(t, others), _window_norms(others, t.shape[2:]), flat.repeat_interleave(k))


class _Pool:
    """What the search needs of the images compared with, computed once for all queries (and
    for their mirror images): the coarse features, the smoothed images as whole-number window
    sums (int16: at most SMOOTH ** 2 * 255, 2295, they fit, in half the memory of float32) and
    each image's window norms."""

    def __init__(self, images: np.ndarray, shift: int, chunk: int = 4096) -> None:
        self.coarse = coarse_features(images)
        n, h, w, c = images.shape
        sh, sw = h - SMOOTH + 1, w - SMOOTH + 1
        size = (sh - 2 * shift, sw - 2 * shift)  # a template's height and width
        self.smoothed = torch.empty((n, c, sh, sw), dtype=torch.int16)
        self.norms = torch.empty((n, (2 * shift + 1) ** 2))
        for start in range(0, n, chunk):
            s = _smoothed_sums(images[start:start + chunk])
            self.smoothed[start:start + len(s)] = s.to(torch.int16)
            self.norms[start:start + len(s)] = _window_norms(s, size)


def candidate_scores(queries: np.ndarray, pool: np.ndarray, *, shift: int = DEFAULT_SHIFT,
                     candidates: int = DEFAULT_CANDIDATES, same_set: bool = False, chunk: int = 250,
                     log: Callable[[str], None] | None = None,
                     prepared: _Pool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``candidates`` images of ``pool`` most like each of ``queries`` (both uint8 (N, H, W,
    C)), and their scores (see the module's docstring): (indices into ``pool``, scores), each
    (len(queries), candidates), best first. ``same_set``: ``queries`` is ``pool``, and an image is
    not its own candidate. ``prepared``: ``_Pool(pool, shift)``, where the caller reuses it."""
    k = min(candidates, len(pool) - int(same_set))
    if k < 1:
        raise CifarlabError(f"{len(pool)} images to compare with: too few to look for duplicates")
    p = prepared if prepared is not None else _Pool(pool, shift)
    fq = coarse_features(queries)
    index = np.empty((len(queries), k), np.int64)
    score = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        sim = fq[start:stop] @ p.coarse.T
        if same_set:
            sim[torch.arange(stop - start), torch.arange(start, stop)] = -2  # not itself
        cand = sim.topk(k, dim=1).indices
        t, flat = _templates(_smoothed_sums(queries[start:stop]), shift)
        num = _correlations(t, p.smoothed[cand.flatten()].float())
        sc = _best_score(num, p.norms[cand.flatten()], flat.repeat_interleave(k)).view(stop - start, k)
        order = sc.argsort(1, descending=True)
        index[start:stop] = cand.gather(1, order).numpy()
        score[start:stop] = sc.gather(1, order).numpy()
        if log and (stop == len(queries) or stop // chunk % 8 == 0):
            log(f"  {stop:,} of {len(queries):,} images compared")
    return index, score


def best_column(index: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first column of :func:`candidate_scores`' ``index`` (rows best first) with
    ``allowed[index]`` true where ``allowed`` (a mask over the pool) is given: (column, whether
    the row has one)."""
    ok = np.ones(index.shape, bool) if allowed is None else allowed[index]
    first = ok.argmax(1)
    return first, ok[np.arange(len(index)), first]


def best_among(index: np.ndarray, score: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Each row's best candidate of :func:`candidate_scores` (rows best first), among those with
    ``allowed[index]`` true where ``allowed`` (a mask over the pool) is given: (index, score), -1
    and NaN for a row with none allowed."""
    first, has = best_column(index, allowed)
    rows = np.arange(len(index))
    return np.where(has, index[rows, first], -1), np.where(has, score[rows, first], np.nan).astype(np.float32)


def best_is_mirrored(found: dict[str, Any], allowed: np.ndarray | None = None) -> np.ndarray:
    """Whether each test image's best training pair in :func:`find_duplicates`' result (among
    ``allowed``, as :func:`best_among`) is its mirror image's (all false where mirror images were
    not compared; a row with none allowed reads its first column, so mask it with the score)."""
    col, _ = best_column(found["train_index"], allowed)
    return found["train_mirrored"][np.arange(len(col)), col]


def _with_mirrored(queries: np.ndarray, pool: np.ndarray, mirrored: bool,
                   **kw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`candidate_scores` of ``queries`` and, with ``mirrored``, of their left-right mirror
    images too, merged per row best first: (index, score, whether each pair is mirrored)."""
    prepared = _Pool(pool, kw.get("shift", DEFAULT_SHIFT))  # once for the images and their mirror images
    index, score = candidate_scores(queries, pool, prepared=prepared, **kw)
    flag = np.zeros(index.shape, bool)
    if not mirrored:
        return index, score, flag
    m_index, m_score = candidate_scores(queries[:, :, ::-1], pool, prepared=prepared, **kw)
    index, score = np.concatenate([index, m_index], 1), np.concatenate([score, m_score], 1)
    flag = np.concatenate([flag, np.ones(m_index.shape, bool)], 1)
    order = np.argsort(-score, axis=1, kind="stable")  # ties: the unmirrored pair first
    return tuple(np.take_along_axis(a, order, 1) for a in (index, score, flag))


def find_duplicates(ds: Dataset, threshold: float = DEFAULT_THRESHOLD, shift: int = DEFAULT_SHIFT,
                    candidates: int = DEFAULT_CANDIDATES, mirrored: bool = False,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Look for a near-duplicate of each of ``ds``'s test images among its training images and
    among its other test images, with ``mirrored`` also for their mirror images. Returns the
    candidates (``train_index``, ``train_score``, ``train_mirrored``, ``test_index``,
    ``test_score``, ``test_mirrored``, arrays) and the settings; :func:`summarise` makes the
    report."""
    check_options(threshold, shift, candidates, ds.x_test.shape[1:3])
    if len(ds.x_train) == 0:
        raise CifarlabError(f"{ds.source} ({ds.kind}) holds test images only: duplicates looks for test images that "
                            "copy training images, so it needs data with both")
    what = "test images and their mirror images" if mirrored else "test images"
    if log:
        log(f"comparing {len(ds.x_test):,} {what} with {len(ds.x_train):,} training images")
    kw = {"shift": shift, "candidates": candidates, "log": log}
    ti, ts, tm = _with_mirrored(ds.x_test, ds.x_train, mirrored, **kw)
    qi, qs = np.full(len(ds.x_test), -1), np.full(len(ds.x_test), np.nan, np.float32)
    qm = np.zeros(len(ds.x_test), bool)
    if len(ds.x_test) > 1:
        if log:
            log(f"comparing the {what} with the other test images")
        # same_set leaves an image out of its own candidates, its mirror image included
        q_index, q_score, q_mirrored = _with_mirrored(ds.x_test, ds.x_test, mirrored, same_set=True, **kw)
        qi, qs, qm = q_index[:, 0], q_score[:, 0], q_mirrored[:, 0]
    return {"threshold": float(threshold), "shift": shift, "candidates": candidates, "mirrored": bool(mirrored),
            "train_index": ti, "train_score": ts, "train_mirrored": tm, "test_index": qi, "test_score": qs,
            "test_mirrored": qm}


def _count_at(scores: np.ndarray, t: float) -> int:
    return int(np.sum(np.nan_to_num(scores, nan=-2) >= t))


def summarise(found: dict[str, Any], ds: Dataset) -> dict[str, Any]:
    """The report of :func:`find_duplicates`' result: how many test images have a training
    duplicate (overall, at other thresholds, by class), how many of those pairs disagree on the
    class, and how many test images have a copy among the other test images."""
    t = found["threshold"]
    idx, score = best_among(found["train_index"], found["train_score"])
    dup = score >= t
    differ = dup & (ds.y_train[np.maximum(idx, 0)] != ds.y_test)
    mirror = best_is_mirrored(found)
    by_class = []
    for c, name in enumerate(ds.classes):
        m = ds.y_test == c
        by_class.append({"class": name, "test_images": int(m.sum()), "with_train_duplicate": int((dup & m).sum()),
                         "share": float((dup & m).sum() / m.sum()) if m.any() else None})
    n = len(ds.y_test)
    return {
        "data": ds.source, "train_images": len(ds.y_train), "test_images": n,
        "method": {"threshold": t, "shift": found["shift"], "candidates": found["candidates"], "coarse": COARSE,
                   "mirrored": found["mirrored"], "score": "normalised cross-correlation, best over shifts"},
        "test_with_train_duplicate": int(dup.sum()), "share": float(dup.mean()) if n else None,
        # of those, the ones whose best pair is the mirror image (0 where mirror images were not compared)
        "mirrored_pairs": int((dup & mirror).sum()),
        "at_thresholds": {f"{x:.2f}": _count_at(score, x) for x in sorted({*REPORTED_THRESHOLDS, t})},
        "label_disagreements": int(differ.sum()),
        "test_with_test_duplicate": _count_at(found["test_score"], t),
        "by_class": by_class,
    }


def run_accuracy(run: str | Path, ds: Dataset, found: dict[str, Any], tta: str | None = None,
                 device: str = "auto", uncalibrated: bool = False) -> dict[str, Any]:
    """A run's test accuracy over all test images, over those with a near-duplicate among the
    images it trained on (its own split of the training images, chosen again from its
    config.yaml), and over the others, with the difference and its 95% interval (Newcombe's,
    :func:`cifarlab.audit.difference_ci`: the images with a copy are often few)."""
    from .audit import difference_ci
    from .calibrate import weights_digest
    from .evaluate import _check_compatible, predict_dataset
    from .export import load_model

    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    trained, note = _trained_mask(Path(run), ds)
    _, score = best_among(found["train_index"], found["train_score"], trained)
    dup = np.nan_to_num(score, nan=-2) >= found["threshold"]
    mirror = dup & best_is_mirrored(found, trained)
    correct = predict_dataset(pred, ds.x_test).argmax(1) == ds.y_test
    a, b = np.flatnonzero(dup), np.flatnonzero(~dup)

    def acc(ix: np.ndarray) -> float | None:
        return float(correct[ix].mean()) if len(ix) else None

    with_duplicate: dict[str, Any] = {"images": len(a), "accuracy": acc(a)}
    if found["mirrored"]:  # a model trained without flips may know a mirrored copy less well
        m, u = np.flatnonzero(mirror), np.flatnonzero(dup & ~mirror)
        with_duplicate.update(mirrored={"images": len(m), "accuracy": acc(m)},
                              unmirrored={"images": len(u), "accuracy": acc(u)})
    diff, ci = None, [None, None]
    if len(a) and len(b):
        diff = acc(a) - acc(b)
        ci = difference_ci(int(correct[a].sum()), len(a), int(correct[b].sum()), len(b))
    return {"run": str(run), "tta": pred.tta, "temperature": pred.temperature(), "class_offsets": pred.class_offsets(),
            "weights_sha256": weights_digest(pred.run), "trained_on": note, "accuracy": float(correct.mean()),
            "with_duplicate": with_duplicate, "without_duplicate": {"images": len(b), "accuracy": acc(b)},
            "difference": diff, "difference_ci": ci}


def _trained_mask(run: Path, ds: Dataset) -> tuple[np.ndarray, str]:
    """A mask over ``ds``'s training images of those ``run``'s weights learnt from (those it
    trained on and, for a fine-tune, those its starting weights had:
    :func:`cifarlab.data.seen.learnt_from`), and a note of which."""
    from .data.seen import learnt_from
    from .train import run_split

    mask = np.zeros(len(ds.y_train), bool)
    if not (run / "config.yaml").is_file():  # an imported model: its training images are unknown
        mask[:] = True
        return mask, f"all {len(mask):,} training images (the run has no config.yaml naming those it trained on)"
    _, tr, _ = run_split(run, ds)
    learnt = learnt_from(run, ds.x_train, tr)
    mask[learnt] = True
    more = len(learnt) - len(tr)
    if len(learnt) == len(mask):
        who = "it or the weights it started from" if more else "it"
        return mask, f"all {len(learnt):,} training images, which {who} trained on"
    also = f" and {more:,} more that the weights it started from learnt from" if more else ""
    return mask, f"the {len(tr):,} images it trained on{also} (of the {len(mask):,} training images)"


_FIGURES = ("accuracy", "without_duplicate", "with_duplicate", "difference")


def _figure(r: dict[str, Any], key: str) -> float | None:
    """One of :data:`_FIGURES` from a :func:`run_accuracy` result."""
    v = r[key]
    return v["accuracy"] if isinstance(v, dict) else v


def duplicates_report(ds: Dataset, runs: list[str | Path] | None = None, threshold: float = DEFAULT_THRESHOLD,
                      shift: int = DEFAULT_SHIFT, candidates: int = DEFAULT_CANDIDATES, tta: str | None = None,
                      device: str = "auto", uncalibrated: bool = False, log: Callable[[str], None] | None = None,
                      mirrored: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Find the near-duplicates of ``ds``'s test images (:func:`find_duplicates`; with
    ``mirrored``, mirrored copies too) and summarise them; with ``runs``, also each run's accuracy
    with and without the test images whose copy it trained on, and over several runs the mean,
    min and max. Returns (report, found)."""
    found = find_duplicates(ds, threshold, shift, candidates, mirrored, log)
    report = summarise(found, ds)
    if runs:
        from .evaluate import describe

        report["runs"] = [run_accuracy(r, ds, found, tta, device, uncalibrated) for r in runs]
        if len(runs) > 1:
            figures = {k: [_figure(r, k) for r in report["runs"]] for k in _FIGURES}
            report["runs_summary"] = {k: describe(v) for k, v in figures.items() if None not in v}
    return report, found


def write_files(report: dict[str, Any], found: dict[str, Any], ds: Dataset, out: str | Path,
                review: int = 16) -> None:
    """Into ``out``: ``duplicates.json`` (the report), ``duplicates.csv`` (each test image, its
    most similar training and test images and their scores), ``groups.csv`` (``index`` and
    ``train_duplicate`` yes/no, for ``cifarlab audit --groups`` and ``compare --groups``) and
    ``duplicates.png``: the ``review`` scoring pairs just above the threshold and just below it,
    to judge the threshold by."""
    from .plots import image_grid

    out = Path(out)
    t = found["threshold"]
    idx, score = best_among(found["train_index"], found["train_score"])
    mirror = best_is_mirrored(found)

    def yes_no(flag: bool) -> str:  # empty where mirror images were not compared
        return ("yes" if flag else "no") if found["mirrored"] else ""

    rows = []
    for i in range(len(ds.y_test)):
        j, q, qs = int(idx[i]), int(found["test_index"][i]), float(found["test_score"][i])
        rows.append({"index": i, "path": ds.test_paths[i] if ds.test_paths else "",
                     "class": ds.classes[ds.y_test[i]], "train_index": j, "train_class": ds.classes[ds.y_train[j]],
                     "train_score": round(float(score[i]), 4), "train_mirrored": yes_no(mirror[i]),
                     "train_duplicate": "yes" if score[i] >= t else "no",
                     # a single test image has no other to compare with
                     "test_index": q if q >= 0 else "", "test_score": round(qs, 4) if q >= 0 else "",
                     "test_mirrored": yes_no(found["test_mirrored"][i]) if q >= 0 else ""})
    order = np.argsort(-score, kind="stable")
    above = [i for i in order if score[i] >= t][-review:]
    below = [i for i in order if score[i] < t][:review]
    with report_folder(out):
        write_json(out / "duplicates.json", report)
        write_text(out / "duplicates.csv", list_to_csv_rows(rows))
        write_text(out / "groups.csv", list_to_csv_rows({"index": r["index"], "train_duplicate": r["train_duplicate"]}
                                                        for r in rows))
        pairs, rejected = [*above, *below], set(below)
        if pairs:
            gap = np.full((ds.x_test.shape[1], 2, ds.x_test.shape[3]), 255, np.uint8)
            # a mirrored pair's training image is shown mirrored back, so that the two face the
            # same way and can be judged as the others are; its title says so
            images = np.stack([np.concatenate([ds.x_test[i], gap, ds.x_train[idx[i]][:, ::-1] if mirror[i]
                                               else ds.x_train[idx[i]]], axis=1) for i in pairs])
            titles = [f"{'not ' if i in rejected else ''}dup {score[i]:.3f}{' mirrored' if mirror[i] else ''}\n"
                      f"{ds.classes[ds.y_test[i]]}"
                      + ("" if ds.y_test[i] == ds.y_train[idx[i]] else f" / {ds.classes[ds.y_train[idx[i]]]}")
                      for i in pairs]
            image_grid(images, titles, out / "duplicates.png", cols=8)


def read_duplicates(run: str | Path, tta: str, class_offsets: tuple[float, ...] | None = None,
                    name: str = "duplicates") -> dict[str, Any] | None:
    """What ``cifarlab duplicates`` measured for ``run`` with its current weights, test-time
    augmentation ``tta`` and class offsets (which change predictions; a temperature does not):
    the report's settings and counts with the run's entry as ``"run"`` and the folder it is in as
    ``"where"``, from ``RUN/duplicates`` or, for a run of a ``--runs N`` folder, the folder's
    ``duplicates`` (``name``, where not ``duplicates``: ``duplicates-<data>``, measured on other
    data); None where there is none, or where it is unreadable or out of date: what the model
    card quotes."""
    import json

    from .calibrate import same_offsets, weights_digest

    run = Path(run)
    try:
        digest = weights_digest(run)
    except CifarlabError:  # no readable weights: nothing measured can be theirs
        return None
    for path, where in ((run / name / "duplicates.json", "the run folder"),
                        (run.parent / name / "duplicates.json", "the folder of its runs")):
        try:
            r = json.loads(path.read_text())
            for entry in r.get("runs") or []:
                if (entry.get("weights_sha256") == digest and entry.get("tta") == tta
                        and same_offsets(entry.get("class_offsets"), class_offsets)):
                    return {**{k: v for k, v in r.items() if k not in ("runs", "runs_summary")}, "run": entry,
                            "where": where}
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return None


def format_report(r: dict[str, Any]) -> str:
    """The report as lines for the terminal."""
    m = r["method"]
    n, k = r["test_images"], r["test_with_train_duplicate"]
    mirrored = f", {r['mirrored_pairs']:,} of them mirrored" if m.get("mirrored") else ""
    lines = [f"{k:,} of {n:,} test images ({100 * (r['share'] or 0):.2f}%) have a near-duplicate among the "
             f"{r['train_images']:,} training images{mirrored} (score >= {m['threshold']}, shifts up to "
             f"{m['shift']} pixels{', mirror images compared' if m.get('mirrored') else ''})",
             "  at other thresholds: " + ", ".join(f">= {t}: {c:,}" for t, c in r["at_thresholds"].items()),
             f"  pairs whose classes differ: {r['label_disagreements']:,}; test images with a near-duplicate among "
             f"the other test images: {r['test_with_test_duplicate']:,}",
             "  by class: " + ", ".join(f"{c['class']} {c['with_train_duplicate']}" for c in r["by_class"])]
    for a in r.get("runs", []):
        w, o = a["with_duplicate"], a["without_duplicate"]
        diff = "" if a["difference"] is None else \
            f"; difference {a['difference']:+.4f} (95% CI {a['difference_ci'][0]:+.4f} to {a['difference_ci'][1]:+.4f})"
        split = "" if "mirrored" not in w else \
            (f" (the {w['mirrored']['images']:,} mirrored pairs {_acc(w['mirrored']['accuracy'])}, the "
             f"{w['unmirrored']['images']:,} others {_acc(w['unmirrored']['accuracy'])})")
        lines.append(f"{a['run']}: test accuracy {a['accuracy']:.4f}; on the {o['images']:,} test images without a "
                     f"near-duplicate among {a['trained_on']}: {_acc(o['accuracy'])}; on the {w['images']:,} "
                     f"with one: {_acc(w['accuracy'])}{split}{diff}")
    s = r.get("runs_summary")
    if s:
        lines.append(f"over {len(r['runs'])} runs (mean, min, max): " + "; ".join(
            f"{k.replace('_', ' ')} {v['mean']:+.4f} ({v['min']:+.4f}, {v['max']:+.4f})" if k == "difference" else
            f"{k.replace('_', ' ')} {v['mean']:.4f} ({v['min']:.4f}, {v['max']:.4f})" for k, v in s.items()))
    return "\n".join(lines)


def _acc(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
