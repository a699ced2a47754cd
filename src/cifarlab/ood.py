"""``cifarlab ood``: does a run know when an image is unlike anything it was trained on?

A classifier answers every image with one of its classes. Shown a face, a sketch or static, a
CIFAR-10 model still says "frog" or "truck", often with high confidence; that is the misuse
the notebook's essay warns of, a model applied to images outside its scope. Out-of-distribution
(OOD) detection scores each image by how familiar it looks to the model and compares the scores
of the run's own test images with those of images from elsewhere:

* ``msp``: the largest class probability (Hendrycks and Gimpel, 2017, "A baseline for detecting
  misclassified and out-of-distribution examples");
* ``energy``: logsumexp of the logits, the negative free energy (Liu, Wang, Owens and Li, 2020,
  "Energy-based out-of-distribution detection"), which does not saturate as probabilities do;
* ``maxlogit``: the largest logit (Hendrycks et al., 2022, "Scaling out-of-distribution detection
  for real-world settings");
* ``knn``: how near an image's features (the input of the classifier's last layer, scaled to
  length 1) lie to those of the run's training images: minus the distance to the k-th nearest
  (Sun, Ming, Zhu and Li, 2022, "Out-of-distribution detection with deep nearest neighbors"),
  which looks at what the network saw rather than at what it concluded.

Higher means more familiar. The first three use the logits the run predicts with: divided by its
temperature and shifted by its class offsets where ``cifarlab calibrate`` fitted them. ``knn``
uses the plain model's features, without test-time augmentation, and a bank of the features of
up to :data:`KNN_BANK` of the run's training images (class-balanced, seeded), saved beside the
report so that ``predict`` can use it.

How well a score separates the run's test images ("in") from other images ("out") is given as
the area under the ROC curve (AUROC: 0.5 is chance, 1 perfect), the share of out images
accepted when 95% of in images are (FPR at 95% TPR, lower is better) and the areas under the
precision-recall curves with in and with out images as the positives (scikit-learn computes
all of them). A threshold keeping 95% (``--keep``) of the run's validation images (of its test images
where it held out none) says what a deployment that flags unfamiliar images would do:
``cifarlab predict --flag-unfamiliar`` applies it. Of the folder of ``--runs N``, each run is
reported, and their ensemble, the model ``cifarlab predict`` serves for the folder, with its own
threshold (:func:`ensemble_report`).

Images from elsewhere are image files (a folder of photos of other things), other data (any
source ``--data`` reads; images of a class the run knows are left out) or built-in synthetic sets, the sanity checks of Hendrycks, Mazeika and
Dietterich (2019, "Deep anomaly detection with outlier exposure"): a run that accepts static
as a frog has learned little about what frogs look like. Synthetic images are far from every
real photograph, so separating them is necessary, not sufficient: real unfamiliar photographs
are harder, and only they can say how a run would do on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .errors import CifarlabError, did_you_mean

SCORES = ("energy", "msp", "maxlogit")  # from the logits: every run has them
KNN = "knn"  # from the features and a bank of training images': runs whose training images are known
KNN_BANK = 10_000  # training images in the bank by default: a fifth of CIFAR-10's, 10 MB of keras-deep features
# Sun et al.'s k for CIFAR-10's 50,000 training images (their code's); a smaller bank gets a proportionally
# smaller k, so that the k-th neighbour lies about as far away as in the full bank
KNN_K_PER_50K = 50
BANK_FILE = "knn_bank.safetensors"
SYNTHETIC = {
    "gaussian": "each channel of each pixel drawn from a normal distribution of mean 0.5 and standard deviation "
                "1, clipped to [0, 1] (Hendrycks et al., 2019)",
    "uniform": "each channel of each pixel drawn uniformly from [0, 1]",
    "blank": "one colour filling the whole image, drawn uniformly per image",
    "shuffled": "the run's test images with their pixels shuffled: their colours kept, their shapes destroyed",
}
KEEP = 0.95  # the share of in-distribution images a threshold keeps by default: the field's usual 95% TPR
FILE = "ood.json"
SUMMARY_FILE = "ood_summary.json"  # of a --runs N folder, beside its runs
ENSEMBLE_SCORES_FILE = "ood_ensemble_scores.npz"  # its ensemble's scores, beside the summary
SCORES_FILE = "scores.npz"  # a run's scores, in its report's folder


def check_sources(sources: list[str]) -> None:
    """A clear error for a source that is neither a built-in synthetic set nor an existing path,
    before any data is loaded."""
    for s in sources:
        if s.startswith("synthetic:"):
            name = s.split(":", 1)[1]
            if name not in SYNTHETIC:
                raise CifarlabError(f"unknown synthetic set '{s}'{did_you_mean(name, SYNTHETIC, 'synthetic:')}; "
                                    f"choose from {', '.join('synthetic:' + k for k in SYNTHETIC)}")
        elif not Path(s).expanduser().exists():
            raise CifarlabError(f"OOD source '{s}' does not exist; give a data archive or folder, or one of "
                                f"{', '.join('synthetic:' + k for k in SYNTHETIC)}")


def check_keep(keep: float) -> float:
    """``keep`` (``--keep``), refused unless it lies strictly between 0 and 1."""
    if not 0 < keep < 1:
        raise CifarlabError(f"--keep {keep} is not valid; give the share of the run's own images the threshold "
                            "keeps, strictly between 0 and 1, such as 0.95 (the default) or 0.99")
    return keep


def check_score(score: str) -> str:
    """``score``, refused unless it is one of :data:`SCORES` or :data:`KNN`."""
    if score not in SCORES + (KNN,):
        raise CifarlabError(f"--score {score!r} is not valid{did_you_mean(score, SCORES + (KNN,))}; choose from "
                            f"{', '.join(SCORES + (KNN,))}")
    return score


def check_options(score: str, sources: list[str], count: int, knn_bank: int, keep: float) -> None:
    """A clear error for any bad option of ``cifarlab ood``, before any data is loaded."""
    check_score(score)
    check_keep(keep)
    check_sources(sources)
    if count < 1:
        raise CifarlabError(f"--count {count} is not valid; give 1 or more images per set")
    if knn_bank < 0:
        raise CifarlabError(f"--knn-bank {knn_bank} is not valid; give 0 (no knn score) or more training images")
    if score == KNN and not knn_bank:
        raise CifarlabError("--score knn needs a bank of training images; leave out --knn-bank 0")


def last_linear(model):
    """The model's last ``nn.Linear`` (its classifier), whose input are the features ``knn``
    compares; refused where there is none."""
    import torch.nn as nn

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise CifarlabError(f"{type(model).__name__} has no linear layer whose input could serve as features; "
                            f"choose a score of the logits ({', '.join(SCORES)})")
    return found[-1]


@contextlib.contextmanager
def classifier_inputs(model, keep: Callable[[Any], Any] = lambda t: t):
    """While open, each forward pass of ``model`` appends ``keep`` of the input of its last
    linear layer (its features) to the yielded list: the features of any pass, batched or in an
    exported graph, without changing the model."""
    got: list = []
    hook = last_linear(model)[1].register_forward_hook(lambda _m, inp, _out: got.append(keep(inp[0])))
    try:
        yield got
    finally:
        hook.remove()


def features(pred, images: np.ndarray, with_logits: bool = False):
    """The features of uint8 ``images`` (N, H, W, C) for the model of ``pred``: the input of its
    last linear layer, without test-time augmentation, scaled to length 1; float32 (N, D). With
    ``with_logits``, also the logits of that pass: (features, logits)."""
    import torch

    _, layer = last_linear(pred.model)
    # the model runs as predict runs it (its preprocessing and batches); each batch's features
    # go to the CPU at once, so a large set's stay out of GPU memory
    with classifier_inputs(pred.model, lambda t: t.detach().float().flatten(1).cpu()) as got:
        logits = pred.logits(images, tta="none")
    f = torch.cat(got) if got else torch.zeros((0, layer.in_features))
    f = torch.nn.functional.normalize(f, dim=1).numpy()
    return (f, logits) if with_logits else f


def knn_k(bank_size: int) -> int:
    """k for a bank of ``bank_size`` features: :data:`KNN_K_PER_50K` scaled to it, at least 1."""
    return max(1, round(KNN_K_PER_50K * bank_size / 50_000))


def knn_scores(bank: np.ndarray, feats: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Minus the Euclidean distance from each of ``feats`` (N, D, length 1) to its ``k``-th
    nearest of ``bank`` (M, D, length 1), float64 (N,); higher means more familiar."""
    import torch

    b = torch.from_numpy(np.asarray(bank, np.float32))
    out = np.empty(len(feats))
    for i in range(0, len(feats), chunk):  # (chunk, M) similarities at a time: memory stays bounded
        sim = torch.from_numpy(np.asarray(feats[i:i + chunk], np.float32)) @ b.T
        kth = sim.topk(k, dim=1).values[:, -1].double()
        out[i:i + chunk] = -torch.sqrt(torch.clamp(2 - 2 * kth, min=0)).numpy()  # |a - b|^2 = 2 - 2 a.b
    return out


def scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Each score of :data:`SCORES` for ``logits`` (N, K) (calibrated already, where the run is),
    float64 (N,); higher means more like the training images."""
    from scipy.special import logsumexp

    z = np.asarray(logits, np.float64)
    top, lse = z.max(1), logsumexp(z, axis=1)
    return {"energy": lse, "msp": np.exp(top - lse), "maxlogit": top}


def calibrated_logits(pred, logits: np.ndarray) -> np.ndarray:
    """``logits`` of the predictor ``pred`` as its probabilities use them, float64: divided by
    its temperature and shifted by its class offsets where the run was calibrated."""
    cal = pred.calibration()
    return np.asarray(cal.apply(logits) if cal else logits, np.float64)


def synthetic_images(name: str, n: int, shape: tuple[int, int, int], seed: int = 0,
                     like: np.ndarray | None = None) -> np.ndarray:
    """``n`` uint8 images (n, H, W, C) of ``shape`` (H, W, C) from the synthetic set ``name``
    (:data:`SYNTHETIC`), seeded; ``shuffled`` shuffles the pixels of the first ``n`` of ``like``."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    if name == "gaussian":
        x = np.clip(rng.normal(0.5, 1.0, (n, h, w, c)), 0, 1)
    elif name == "uniform":
        x = rng.random((n, h, w, c))
    elif name == "blank":
        x = np.broadcast_to(rng.random((n, 1, 1, c)), (n, h, w, c))
    elif name == "shuffled":
        if like is None or len(like) < n:
            raise CifarlabError(f"the shuffled set needs {n} images to shuffle, got {0 if like is None else len(like)}")
        flat = like[:n].reshape(n, h * w, c)
        order = np.argsort(rng.random((n, h * w)), axis=1)  # one permutation of the pixels per image
        return np.ascontiguousarray(np.take_along_axis(flat, order[:, :, None], 1).reshape(n, h, w, c))
    else:
        raise CifarlabError(f"unknown synthetic set '{name}'{did_you_mean(name, SYNTHETIC)}; choose from "
                            f"{', '.join(SYNTHETIC)}")
    return np.round(x * 255).astype(np.uint8)


def separation(inside: np.ndarray, outside: np.ndarray) -> dict[str, float]:
    """How well scores tell in-distribution images (``inside``) from others (``outside``), higher
    scores meaning in: AUROC, FPR at 95% TPR, and the areas under the precision-recall curves
    with in (``aupr_in``) and with out images (``aupr_out``) as the positives."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    if not len(inside) or not len(outside):
        raise CifarlabError(f"separation needs images of both kinds, got {len(inside)} in and {len(outside)} out")
    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    s = np.r_[inside, outside]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)),
            # the first point of the curve that keeps 95% of in images: the fewest out images accepted with them
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
            "aupr_in": float(average_precision_score(y, s)),
            "aupr_out": float(average_precision_score(1 - y, -s))}


def threshold(scores_in: np.ndarray, keep: float = KEEP) -> float:
    """The highest score that at least ``keep`` of ``scores_in`` reach: images scoring below it
    are flagged as unfamiliar."""
    if not len(scores_in):
        raise CifarlabError("a threshold needs in-distribution images, got none")
    s = np.sort(np.asarray(scores_in, np.float64))
    # at most this many may fall below; the small margin keeps 0.05 x 100 from rounding down to 4
    below = int(math.floor((1 - keep) * len(s) + 1e-9))
    return float(s[below])


def _what_it_calls(probs: np.ndarray, classes: list[str], most: int = 3) -> list[dict[str, Any]]:
    """The classes a run gives a set's images most often, with their shares."""
    counts = np.bincount(probs.argmax(1), minlength=len(classes))
    order = np.argsort(-counts, kind="stable")[:most]
    return [{"class": classes[i], "share": float(counts[i] / len(probs))} for i in order if counts[i]]


def _flagged_by_class(flagged: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """The share of each class's own test images a threshold flags as unfamiliar (classes with
    test images): the images a deployment that flags would turn away, by class. A threshold
    keeping 95% overall may turn away far more of one class than of the others."""
    labels = np.asarray(labels)
    return [{"class": c, "images": int((labels == i).sum()), "flagged_share": float(flagged[labels == i].mean())}
            for i, c in enumerate(classes) if (labels == i).any()]


def _per_class(labels: list[str], accepted: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[dict]:
    """For a data source's images, by their own class: how many, the share accepted, and what
    the run calls them most (a ship called airplane is a near miss; static called frog is not)."""
    names = np.asarray(labels)
    rows = []
    for c in sorted(set(labels)):
        m = names == c
        rows.append({"class": c, "images": int(m.sum()), "accepted_share": float(accepted[m].mean()),
                     "called": _what_it_calls(probs[m], classes, most=1)[0]})
    return rows


def score_images(pred, x: np.ndarray, bank: np.ndarray | None = None,
                 k: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each score of uint8 images ``x`` for the run of ``pred``, float64 (N,): those of
    :data:`SCORES`, and ``knn`` with ``bank`` (as saved: half precision) and ``k``; and its
    probabilities, float64 (N, classes)."""
    if bank is not None and pred.tta == "none":  # one pass gives both: the features are the plain model's
        f, raw = features(pred, x, with_logits=True)
    else:
        raw, f = pred.logits(x), features(pred, x) if bank is not None else None
    z = calibrated_logits(pred, raw)
    s = scores(z)
    if bank is not None:
        s[KNN] = knn_scores(bank, f, k)
    return s, np.exp(z - s["energy"][:, None])  # the probabilities: softmax is exp(z - logsumexp z)


def images_digest(x: np.ndarray) -> str:
    """The SHA-256 of the uint8 images ``x``, their shape included: two reports scored the same
    images, in the same order, where their digests agree (``cifarlab compare`` pairs them so)."""
    x = np.ascontiguousarray(x)
    return hashlib.sha256(f"{x.dtype.str}{x.shape}".encode() + x.data).hexdigest()


def _figures(scored_in: tuple[dict[str, np.ndarray], np.ndarray], scores_thr: dict[str, np.ndarray],
             fitted_on: str, sets: list[dict[str, Any]], scored_sets: list[tuple[dict[str, np.ndarray], np.ndarray]],
             score: str, keep: float, classes: list[str], y_in: np.ndarray | None, x_in: np.ndarray) -> dict[str, Any]:
    """The figures of a report from the scores and probabilities (:func:`score_images`) of the
    test images ``x_in`` (``scored_in``) and of each of ``sets`` (``scored_sets``), the threshold
    of each score keeping ``keep`` of ``scores_thr``, which are of the ``fitted_on`` images."""
    s_in, p_in = scored_in
    thr = {n: threshold(scores_thr[n], keep) for n in s_in}
    fig: dict[str, Any] = {
        "score": score, "keep": keep, "threshold_fitted_on": fitted_on,
        "threshold_images": int(len(scores_thr[score])), "threshold": thr[score], "thresholds": thr,
        "in_distribution": {"images": int(len(p_in)), "images_sha256": images_digest(x_in),
                            "flagged_share": float((s_in[score] < thr[score]).mean()),
                            "mean_confidence": float(p_in.max(1).mean()),
                            **({"per_class": _flagged_by_class(s_in[score] < thr[score], y_in, classes)}
                               if y_in is not None else {})},
        "sets": []}
    for st, (s_out, p_out) in zip(sets, scored_sets):
        fig["sets"].append({
            "name": st["name"], "source": st["source"], "images": int(len(st["images"])),
            "images_sha256": images_digest(st["images"]), "notes": list(st.get("notes", [])),
            **{n: separation(s_in[n], s_out[n]) for n in s_in},
            "accepted_share": float((s_out[score] >= thr[score]).mean()),
            "mean_confidence": float(p_out.max(1).mean()),
            "called": _what_it_calls(p_out, classes),
            **({"per_class": _per_class(st["labels"], s_out[score] >= thr[score], p_out, classes)}
               if st.get("labels") is not None else {})})
    return fig


def ood_report(pred, x_in: np.ndarray, x_val: np.ndarray | None, sets: list[dict[str, Any]], out: str | Path,
               score: str = "energy", about: dict[str, Any] | None = None,
               log: Callable[[str], None] = lambda _: None, bank: np.ndarray | None = None,
               keep: float = KEEP, y_in: np.ndarray | None = None, collect: dict | None = None) -> dict[str, Any]:
    """Score the run of ``pred`` (a :class:`cifarlab.export.Predictor`) on its test images
    ``x_in`` (``y_in``: their labels, indices into its classes, for the share of each class the
    threshold flags; None: no breakdown), on its validation images ``x_val`` (None: it held out
    none, and the threshold comes from ``x_in``) and on each of ``sets`` (dicts with ``name``,
    ``source`` and uint8 ``images``);
    write ``ood.json``, ``ood.png`` and ``scores.npz`` into ``out``; return the report.
    ``bank``: the features (:func:`features`) of training images, for the ``knn`` score, saved
    as ``knn_bank.safetensors``; None: the scores of the logits alone. ``score`` sets the
    threshold (which keeps ``keep`` of the validation images) and the plot; every score is
    measured. ``collect``: where given, the scores and probabilities (:func:`score_images`) of
    the test images (``in``), the validation images (``val``, None where there were none) and
    each set (``sets``) are put in it, for an ensemble's report to combine."""
    from . import plots
    from .fsutil import write_bytes, write_json

    check_score(score)
    check_keep(keep)
    if score == KNN and bank is None:
        raise CifarlabError("--score knn needs a bank of the run's training images' features, which a run without "
                            "config.yaml or training images cannot have; choose " + ", ".join(SCORES))
    if bank is not None:  # the scores use the bank as saved (half precision), so predict's match them
        bank = as_saved(bank)
    k = knn_k(len(bank)) if bank is not None else None
    out = Path(out)

    def scored(x: np.ndarray, what: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        log(f"predicting the {len(x):,} {what}")
        return score_images(pred, x, bank, k)

    got_in = scored(x_in, "test images")
    got_val = scored(x_val, "validation images") if x_val is not None and len(x_val) else None
    got_sets = [scored(st["images"], f"images of {st['name']}") for st in sets]
    if collect is not None:
        collect.update({"in": got_in, "val": got_val, "sets": got_sets})
    report: dict[str, Any] = dict(about or {})
    report.update(_figures(got_in, (got_val or got_in)[0], "test" if got_val is None else "validation", sets,
                           got_sets, score, keep, pred.classes, y_in, x_in))
    if bank is not None:
        from safetensors.numpy import save

        name, layer = last_linear(pred.model)
        # half precision, half the file: a feature of length 1 keeps about three decimal digits
        data = save({"features": bank.astype(np.float16)})  # see export.save_weights
        # 'length 1' alone reads as one number: the count says what is compared, the norm how
        report[KNN] = {"bank_images": int(len(bank)), "k": k,
                       "features": f"the {layer.in_features} inputs of layer '{name}', scaled to length 1",
                       "tta": "none", "file": BANK_FILE, "bank_sha256": hashlib.sha256(data).hexdigest()}
        write_bytes(out / BANK_FILE, data)
    data = _scores_npz(got_in, got_sets)
    write_bytes(out / SCORES_FILE, data)
    report["scores_file"] = {"file": SCORES_FILE, "sha256": hashlib.sha256(data).hexdigest()}
    plots.plot_ood(got_in[0][score], [(st["name"], s_out[score]) for st, (s_out, _) in zip(sets, got_sets)],
                   report["threshold"], score, out / "ood.png")
    write_json(out / FILE, report)
    return report


def _scores_npz(got_in: tuple[dict[str, np.ndarray], np.ndarray],
                got_sets: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> bytes:
    """The ``scores.npz`` file of a report: each score of the test images (``in_<score>``, in
    the order of the test split) and of each set (``set<i>_<score>``), from :func:`score_images`."""
    arrays = {f"in_{n}": v for n, v in got_in[0].items()}
    for i, (s_out, _) in enumerate(got_sets):
        arrays.update({f"set{i}_{n}": v for n, v in s_out.items()})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def as_saved(bank: np.ndarray) -> np.ndarray:
    """The ``knn`` bank ``bank`` as the report saves it and ``predict`` reads it back: half
    precision, as float32."""
    return np.asarray(bank, np.float16).astype(np.float32)


def load_source(source: str, pred, known: list[str], count: int, seed: int, like: np.ndarray,
                skip_bad_images: bool = False, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The images of one OOD ``source`` for the model of ``pred``: ``synthetic:NAME`` made at
    its input size (``like``, the run's test images, are what ``shuffled`` shuffles); image files
    (an image, or a folder with images at its top, searched through), read as ``predict`` reads
    them; or a data path's test images resized to it, those of a class in ``known`` (the run's)
    left out; at most ``count`` of them, chosen at random (``seed``) where there are more."""
    from .data import load_dataset, resized

    c, h, w = pred.input_shape
    rng = np.random.default_rng(seed)
    if source.startswith("synthetic:"):
        name = source.split(":", 1)[1]
        n = min(count, len(like))
        return {"name": name, "source": source, "notes": [SYNTHETIC[name]],
                "images": synthetic_images(name, n, (h, w, c), seed, like[rng.permutation(len(like))[:n]])}
    if _loose_images(Path(source).expanduser()):
        return _image_files(Path(source).expanduser(), pred, count, rng, skip_bad_images)
    ds = load_dataset(source, image_size=(h, w), skip_bad_images=skip_bad_images)
    if ds.x_test.shape[1:3] != (h, w):
        ds = resized(ds, (h, w), "the run's input")
    for note in ds.notes:
        log(f"data ({source}): {note}")
    notes = []
    keep = ~np.isin(np.asarray(ds.classes)[ds.y_test], known) if len(ds.y_test) else np.zeros(0, bool)
    shared = sorted(set(ds.classes) & set(known))
    if shared:
        notes.append(f"its images of {', '.join(shared)} were left out: the run knows those classes")
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise CifarlabError(f"{source} holds no test images of a class the run does not know (its classes: "
                            f"{', '.join(ds.classes[:10])}{', ...' if len(ds.classes) > 10 else ''}); give other data")
    if len(idx) > count:
        notes.append(f"{count} of its {len(idx)} test images, chosen at random (seed {seed})")
        idx = np.sort(rng.choice(idx, count, replace=False))
    x = ds.x_test[idx]
    if x.shape[3] != c:  # grey digits against a colour model, say: converted as predict converts a file
        from PIL import Image

        from .data.images import to_array

        notes.append(f"its {'grey' if x.shape[3] == 1 else 'colour'} images converted to "
                     f"{'colour' if c == 3 else 'grey'}, as predict converts image files")
        x = np.stack([to_array(Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), c) for im in x])
    from .export import data_tag

    return {"name": data_tag(ds.source, ds.labels), "source": str(ds.source), "notes": notes,
            "images": x, "labels": [ds.classes[k] for k in ds.y_test[idx]]}


def _loose_images(path: Path) -> bool:
    """Whether ``path`` is image files rather than a data set: an image file, or a folder with
    image files at its top (a data set's folder holds class or split folders there)."""
    from .data.images import is_image_name

    if path.is_file():
        return is_image_name(path.name)
    return path.is_dir() and any(f.is_file() and is_image_name(f.name) for f in path.iterdir())


def _image_files(path: Path, pred, count: int, rng: np.random.Generator, skip_bad: bool) -> dict[str, Any]:
    """The image files of ``path`` (an image, or every image in a folder and its subfolders) as
    one unfamiliar set, read and resized as ``predict`` reads them; an unreadable one is
    refused, or left out and counted with ``skip_bad``."""
    from .export import data_tag
    from .predict import _expand

    files, _ = _expand([str(path)])  # the files predict would read, in its order
    notes = [f"{len(files)} image file(s), read as predict reads them"]
    if len(files) > count:
        notes.append(f"{count} of them, chosen at random")
        files = [files[i] for i in np.sort(rng.choice(len(files), count, replace=False))]
    arrays, bad = [], []
    for f in files:
        try:
            arrays.append(pred.to_uint8([f])[0].permute(1, 2, 0).numpy())
        except CifarlabError as e:
            if not skip_bad:
                raise CifarlabError(f"{e}; leave unreadable files out with --skip-bad-images") from None
            bad.append(f)
    if bad:
        notes.append(f"{len(bad)} unreadable file(s) left out (--skip-bad-images), such as {bad[0]}")
    if not arrays:
        raise CifarlabError(f"{path} holds no readable image file")
    return {"name": data_tag(str(path)), "source": str(path), "notes": notes, "images": np.stack(arrays)}


def ood_run(run: str | Path, ds, sources: list[str] | None = None, out: str | Path | None = None,
            score: str = "energy", count: int = 10_000, seed: int = 0, tta: str | None = None,
            device: str = "auto", uncalibrated: bool = False, skip_bad_images: bool = False,
            log: Callable[[str], None] = lambda _: None, knn_bank: int = KNN_BANK,
            keep: float = KEEP) -> dict[str, Any]:
    """:func:`ood_report` of the run ``run`` with ``ds``, the data it was trained on: its test
    images as the familiar ones, its validation images for the threshold, ``knn_bank`` of its
    training images (class-balanced, ``seed``; 0: no ``knn`` score) as the bank of the ``knn``
    score, and ``sources`` (default every synthetic set) as the unfamiliar ones; the threshold
    keeps ``keep`` of the validation images; into ``out``, by default ``RUN/ood``."""
    from .fsutil import report_folder

    sources = _checked_sources(sources, score, count, knn_bank, keep)
    run = Path(run)
    out = Path(out) if out is not None else run / "ood"
    sub = _subject(run, ds, device, tta, uncalibrated, knn_bank, seed, log)
    sets = _load_sources(sources, sub.pred, count, seed, ds.x_test, skip_bad_images, log)
    with report_folder(out):
        return ood_report(sub.pred, ds.x_test, sub.x_val, sets, out, score, sub.about, log, sub.bank, keep, ds.y_test)


def ood_runs(base: str | Path, ds, sources: list[str] | None = None, out: str | Path | None = None,
             score: str = "energy", count: int = 10_000, seed: int = 0, tta: str | None = None,
             device: str = "auto", uncalibrated: bool = False, skip_bad_images: bool = False,
             log: Callable[[str], None] = lambda _: None, knn_bank: int = KNN_BANK,
             keep: float = KEEP) -> dict[str, Any]:
    """:func:`ood_run` for every run of the ``--runs N`` folder ``base``, all against the same
    unfamiliar images (each run's threshold from its own validation images), each report into
    ``RUN/ood`` (or ``out/run-K``), and the spread over the runs in ``ood_summary.json`` (in
    ``out``, by default ``base``): one seed may tell static from photographs and the next not.
    The summary's ``ensemble`` is the report of their ensemble, the model ``cifarlab predict
    BASE`` serves (:func:`ensemble_score`), from the runs' own scores and probabilities, with
    its threshold fitted on training images no run trained on (:func:`ensemble_report`)."""
    from .export import ensemble_calibration, finished_runs
    from .fsutil import report_folder, write_json

    sources = _checked_sources(sources, score, count, knn_bank, keep)
    base = Path(base)
    runs = finished_runs(base)
    own = ensemble_calibration(base, runs, tta, uncalibrated)  # a stale one is refused before any run is scored
    out = Path(out) if out is not None else None
    reports: list[dict[str, Any]] = []
    subjects: list[_Subject] = []
    collected: list[dict] = []
    sets = None
    for r in runs:
        sub = _subject(r, ds, device, tta, uncalibrated, knn_bank, seed, log)
        if sets is None:  # once: the runs of a set share their model and input, so the same images serve all
            sets = _load_sources(sources, sub.pred, count, seed, ds.x_test, skip_bad_images, log)
        folder = out / r.name if out else r / "ood"
        subjects.append(sub)
        collected.append({})
        with report_folder(folder):
            reports.append(ood_report(sub.pred, ds.x_test, sub.x_val, sets, folder, score, sub.about, log, sub.bank,
                                      keep, ds.y_test, collected[-1]))
        log(f"{r.name}: report in {folder}")
    summary = summarise_ood(reports)
    summary["ensemble"] = ensemble_report(base, ds, subjects, collected, reports, own, sets, score, keep, log,
                                          out or base)
    write_json((out or base) / SUMMARY_FILE, summary)
    return summary


def ensemble_score(score: str, member_scores: list[np.ndarray], probabilities: np.ndarray) -> np.ndarray:
    """An ensemble's ``score`` of each image, float64 (N,): for ``msp`` the largest of its own
    ``probabilities`` (the mean of its runs', as it predicts), which falls where its runs
    disagree; for the others, which a mean of probabilities does not have, the mean of its
    runs' scores ``member_scores`` (one array per run)."""
    if score == "msp":
        return np.asarray(probabilities, np.float64).max(1)
    return np.mean(np.asarray(member_scores, np.float64), axis=0)


UNSEEN = "unseen training"  # the ensemble's threshold images: training images that no run trained on


def _ensemble_rule_words(score: str) -> str:
    """What an ensemble's ``score`` is (:func:`ensemble_score`), in the words the reports record."""
    if score == "msp":
        return "the largest of the ensemble's own probabilities (it falls where the runs disagree)"
    return f"the mean of the runs' {score} scores"


def _combined(ens, each: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The ensemble ``ens``'s scores and probabilities of a set of images from its runs'
    (:func:`score_images`, one per run, in its order): every score all the runs have."""
    probs = ens.combine(p for _, p in each)
    names = [n for n in each[0][0] if all(n in s for s, _ in each)]
    return {n: ensemble_score(n, [s[n] for s, _ in each], probs) for n in names}, probs


def ensemble_report(base: Path, ds, subjects: list[_Subject], collected: list[dict], reports: list[dict[str, Any]],
                    own, sets: list[dict[str, Any]], score: str, keep: float,
                    log: Callable[[str], None] = lambda _: None, dest: Path | None = None) -> dict[str, Any]:
    """The report of the ensemble of ``subjects`` (the runs of ``base``, with ``own``, the
    ensemble's temperature or None) from what their reports ``collected`` (:func:`ood_report`):
    its scores of the test images and of each set (:func:`ensemble_score`), and thresholds
    keeping ``keep`` of the training images that no run trained on (as the ensemble's
    temperature is fitted: at most :data:`cifarlab.calibrate.ENSEMBLE_MAX_IMAGES`, the runs'
    scores of their own validation images serving where those are the same images), or of the
    test images where there are fewer than :data:`cifarlab.calibrate.ENSEMBLE_MIN_IMAGES`.
    It records what it was measured on top of (each run's weights, calibration and ``knn``
    bank, and the ensemble's temperature), which ``predict --flag-unfamiliar`` checks. Its
    scores are written to ``dest``'s :data:`ENSEMBLE_SCORES_FILE` (as a run's ``scores.npz``),
    whose SHA-256 it records, so that the audit reads them back as measured (None: not written).
    """
    from .calibrate import ENSEMBLE_MIN_IMAGES, untrained_images
    from .export import Ensemble, ensemble_probabilities
    from .fsutil import write_bytes

    ens = Ensemble([s.pred for s in subjects], base, own)
    got_in = _combined(ens, [c["in"] for c in collected])
    got_sets = [_combined(ens, [c["sets"][i] for c in collected]) for i in range(len(sets))]
    unseen = (untrained_images([s.trained for s in subjects], len(ds.y_train))
              if all(s.trained is not None for s in subjects) else np.zeros(0, np.int64))
    if len(unseen) >= ENSEMBLE_MIN_IMAGES:
        each = []
        for s, c in zip(subjects, collected):
            if c["val"] is not None and np.array_equal(np.sort(s.held), unseen):  # its validation images: scored
                each.append(c["val"])
            else:
                log(f"{s.pred.run.name}: predicting the {len(unseen):,} training images no run trained on")
                each.append(score_images(s.pred, ds.x_train[unseen], s.bank, knn_k(len(s.bank)) if s.bank is not
                                         None else None))
        scores_thr, fitted_on = _combined(ens, each)[0], UNSEEN
    else:
        log(f"their ensemble: {len(unseen):,} training images were trained on by no run, fewer than "
            f"{ENSEMBLE_MIN_IMAGES:,}; its threshold comes from the test images (train with --split-seed N for more)")
        scores_thr, fitted_on = got_in[0], "test"
    fig = _figures(got_in, scores_thr, fitted_on, sets, got_sets, score, keep, ens.classes, ds.y_test, ds.x_test)
    if dest is not None:
        data = _scores_npz(got_in, got_sets)
        write_bytes(dest / ENSEMBLE_SCORES_FILE, data)
        fig["scores_file"] = {"file": ENSEMBLE_SCORES_FILE, "sha256": hashlib.sha256(data).hexdigest()}
    return {"probabilities": ensemble_probabilities(ens.temperature()), "ensemble_temperature": ens.temperature(),
            "tta": ens.tta, "scored": {n: _ensemble_rule_words(n) for n in got_in[0]},
            **fig,
            "runs": [{"run": s.pred.run.name, "weights_sha256": r["weights_sha256"], "temperature": r["temperature"],
                      "class_offsets": r["class_offsets"],
                      "knn_bank_sha256": r[KNN]["bank_sha256"] if KNN in r else None}
                     for s, r in zip(subjects, reports)]}


def read_ensemble_report(ens) -> dict[str, Any] | None:
    """The report on the ensemble ``ens`` (:func:`cifarlab.export.load_ensemble`) that ``cifarlab
    ood`` wrote in its folder's ``ood_summary.json`` (:func:`ensemble_report`), where it was
    measured with the weights, test-time augmentation and calibration the runs and the ensemble
    have now (and for ``knn``, the banks in the runs' ``ood`` folders); None otherwise."""
    from .calibrate import same_calibration

    got = read_runs_summary(ens.folder) if ens.folder is not None else None
    e = (got or {}).get("summary", {}).get("ensemble")
    try:
        was = e["runs"]
        if (e["tta"] != ens.tta or e["ensemble_temperature"] != ens.temperature() or e["score"] not in e["thresholds"]
                or [m["run"] for m in was] != [p.run.name for p in ens.members]
                or not all(same_calibration(m, p.temperature(), p.class_offsets()) for m, p in zip(was, ens.members))):
            return None
        if e["score"] == KNN and [m["knn_bank_sha256"] for m in was] != [bank_digest(p.run) for p in ens.members]:
            return None  # a run's bank was measured again since (cifarlab ood RUN), with other images
        return e
    except (KeyError, TypeError, AttributeError):  # none, or not the summary this version writes
        return None


def read_report(model) -> dict[str, Any] | None:
    """The report of ``cifarlab ood`` on ``model`` as it is now: for a
    :class:`cifarlab.export.Predictor` its run's (:func:`read_ood`), for an
    :class:`cifarlab.export.Ensemble` the ensemble's (:func:`read_ensemble_report`); None where
    there is none measured with its current weights, test-time augmentation and calibration."""
    from .export import Ensemble

    if isinstance(model, Ensemble):
        return read_ensemble_report(model)
    return read_ood(model.run, model.tta, model.temperature(), model.class_offsets())


def read_rule(model) -> tuple[dict[str, Any], Any] | None:
    """The score and threshold ``cifarlab ood`` fitted for ``model``: for a
    :class:`cifarlab.export.Predictor` its run's (:func:`read_ood`), for an
    :class:`cifarlab.export.Ensemble` the ensemble's (:func:`read_ensemble_report`), as measured
    with its current weights, test-time augmentation and calibration; and for ``knn`` its bank
    (of an ensemble, each run's), refused by name where it is missing or damaged. None where
    there is none."""
    from .export import Ensemble

    r = read_report(model)
    if r is None:
        return None
    several = isinstance(model, Ensemble)
    runs = [p.run for p in model.members] if several else [model.run]
    extra = {"runs": len(runs), "scored": _ensemble_rule_words(r["score"])} if several else {}
    rule = {"score": r["score"], "threshold": float(r["threshold"]), "keep": r["keep"],
            "fitted_on": r["threshold_fitted_on"], **extra}
    if r["score"] != KNN:
        return rule, None
    banks = [read_bank(run) for run in runs]
    return rule | {"k": knn_k(len(banks[0])), "bank_images": len(banks[0])}, \
        banks if several else banks[0]


def bank_digest(run: str | Path, name: str = "ood") -> str | None:
    """The SHA-256 of the ``knn`` bank that ``cifarlab ood`` saved in ``RUN/<name>``; None where
    there is none."""
    try:
        return hashlib.sha256((Path(run) / name / BANK_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def predict_familiarity(model, images: np.ndarray, score: str, bank: Any = None,
                        k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities of ``model`` (a :class:`cifarlab.export.Predictor`, or an
    :class:`cifarlab.export.Ensemble` with ``bank`` its runs' banks) for uint8 ``images``, as
    its ``predict`` gives them, and each image's ``score`` as ``cifarlab ood`` scores it."""
    from .export import Ensemble

    if isinstance(model, Ensemble):
        each = [predict_familiarity(m, images, score, b, k)
                for m, b in zip(model.members, bank or [None] * len(model.members))]
        probs = model.combine(p for p, _ in each)
        return probs, ensemble_score(score, [f for _, f in each], probs)
    logits = model.logits(images)
    return model.probabilities(logits), familiarity(model, images, logits, score, bank, k)


def _checked_sources(sources: list[str] | None, score: str, count: int, knn_bank: int, keep: float) -> list[str]:
    """``sources``, or every synthetic set where none are given, once the options are checked."""
    sources = list(sources or [f"synthetic:{k}" for k in SYNTHETIC])
    check_options(score, sources, count, knn_bank, keep)
    return sources


class _Subject(NamedTuple):
    """What :func:`ood_report` needs of one run, and an ensemble's report of its runs."""

    pred: Any  # its Predictor
    x_val: np.ndarray | None  # its validation images; None where it held out none or its split is unknown
    bank: np.ndarray | None  # the features of its training images, as saved; None: no knn score
    about: dict[str, Any]  # what the report records of it
    trained: np.ndarray | None  # indices of the training images its weights learnt from; None where unknown
    held: np.ndarray | None  # indices of its validation images; None where unknown


def _subject(run: Path, ds, device: str, tta: str | None, uncalibrated: bool, knn_bank: int, seed: int,
             log: Callable[[str], None]) -> _Subject:
    """The run ``run`` loaded and its images found (:class:`_Subject`), with the features of
    ``knn_bank`` of its training images (class-balanced, ``seed``) where it knows them."""
    from .calibrate import weights_digest
    from .data.seen import learnt_from
    from .evaluate import _check_compatible
    from .export import load_model
    from .train import run_split

    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    tr = va = None
    if (run / "config.yaml").is_file() and len(ds.y_train):
        _, tr, va = run_split(run, ds)
    bank = None
    if knn_bank and tr is not None and len(tr):
        from .data import balanced_subset

        pick = tr[balanced_subset(ds.y_train[tr], min(knn_bank, len(tr)), seed)]
        log(f"computing the features of {len(pick):,} training images for the knn score")
        bank = as_saved(features(pred, ds.x_train[pick]))
    elif knn_bank:
        log("no knn score: the run's training images are unknown (no config.yaml) or not in this data")
    offsets = pred.class_offsets()
    about = {"run": str(pred.run), "data": str(ds.source), "tta": pred.tta, "temperature": pred.temperature(),
             "class_offsets": None if offsets is None else list(offsets), "weights_sha256": weights_digest(pred.run)}
    x_val = ds.x_train[va] if va is not None and len(va) else None
    return _Subject(pred, x_val, bank, about, None if tr is None else learnt_from(run, ds.x_train, tr), va)


def _load_sources(sources: list[str], pred, count: int, seed: int, like: np.ndarray, skip_bad_images: bool,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """:func:`load_source` of each source, the i-th with seed ``seed + i``."""
    return [load_source(s, pred, pred.classes, count, seed + i, like, skip_bad_images, log)
            for i, s in enumerate(sources)]


def summarise_ood(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The spread over runs measured against the same images (:func:`ood_report`'s reports, one
    per run): per set and score, AUROC and FPR at 95% TPR as mean, std, min and max; the share
    each run's threshold accepts; the class each run calls the set most, with in how many runs;
    and each run's figures and weights' digest."""
    from collections import Counter

    from .evaluate import describe

    first = reports[0]
    names = [n for n in SCORES + (KNN,) if all(n in r.get("thresholds", {}) for r in reports)]
    sets = []
    for i, st in enumerate(first["sets"]):
        each = [r["sets"][i] for r in reports]
        called = Counter(s["called"][0]["class"] for s in each if s["called"])
        sets.append({"name": st["name"], "source": st["source"], "images": st["images"],
                     "images_sha256": st.get("images_sha256"), "notes": st["notes"],
                     **{n: {k: describe([s[n][k] for s in each]) for k in ("auroc", "fpr_at_95_tpr")}
                        for n in names},
                     "accepted_share": describe([s["accepted_share"] for s in each]),
                     "mean_confidence": describe([s["mean_confidence"] for s in each]),
                     "called_most": [{"class": c, "runs": k} for c, k in called.most_common()]})
    return {
        "runs": len(reports), "data": first["data"], "score": first["score"], "keep": first["keep"],
        "scores": names, "tta": sorted({r["tta"] for r in reports}),
        "threshold_fitted_on": sorted({r["threshold_fitted_on"] for r in reports}),
        "in_distribution": {"images": first["in_distribution"]["images"],
                            "flagged_share": describe([r["in_distribution"]["flagged_share"] for r in reports]),
                            "mean_confidence": describe([r["in_distribution"]["mean_confidence"] for r in reports]),
                            **({"per_class": [{"class": c["class"], "images": c["images"],
                                               "flagged_share": describe([r["in_distribution"]["per_class"][i][
                                                   "flagged_share"] for r in reports])}
                                              for i, c in enumerate(first["in_distribution"]["per_class"])]}
                               if all("per_class" in r["in_distribution"] for r in reports) else {})},
        "sets": sets,
        "per_run": [{"run": r["run"], "weights_sha256": r["weights_sha256"], "temperature": r["temperature"],
                     "class_offsets": r["class_offsets"], "threshold": r["threshold"],
                     "flagged_share": r["in_distribution"]["flagged_share"],
                     "auroc": [s[r["score"]]["auroc"] for s in r["sets"]],
                     "accepted_share": [s["accepted_share"] for s in r["sets"]]} for r in reports],
    }


def read_ood(run: str | Path, tta: str, temperature: float | None = None,
             class_offsets: tuple[float, ...] | None = None, name: str = "ood") -> dict[str, Any] | None:
    """The report of ``cifarlab ood`` in ``RUN/<name>`` where it was measured with the run's
    current weights, test-time augmentation ``tta`` and calibration; None where there is none,
    it is unreadable, or it was measured otherwise (its scores and threshold would not hold)."""
    from .calibrate import read_current_report

    r = read_current_report(Path(run) / name / FILE, run, tta, temperature, class_offsets)
    return r if r is not None and r.get("score") in SCORES + (KNN,) else None


def saved_scores(model, report: dict[str, Any]) -> dict[str, Any] | None:
    """The scores that ``cifarlab ood`` saved with ``report``, its current report on ``model``
    (:func:`read_ood` of a :class:`cifarlab.export.Predictor`'s run, :func:`read_ensemble_report`
    of an :class:`cifarlab.export.Ensemble`), for the report's score: ``in``, of each test image
    in the order of the test split, and ``sets``, of each set's images, float64. None where the
    file is missing, unreadable or not the one the report recorded (its SHA-256; a run's report
    written before it recorded one is taken as it is)."""
    import zipfile

    from .export import Ensemble

    f = report.get("scores_file")
    digest = f.get("sha256") if isinstance(f, dict) else None
    if isinstance(model, Ensemble):
        if model.folder is None or digest is None:
            return None
        path = Path(model.folder) / ENSEMBLE_SCORES_FILE
    else:
        path = Path(model.run) / "ood" / SCORES_FILE
    score = report["score"]
    try:
        data = path.read_bytes()
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {"in": np.asarray(z[f"in_{score}"], np.float64),
                    "sets": [np.asarray(z[f"set{i}_{score}"], np.float64) for i in range(len(report["sets"]))]}
    # missing, damaged, cut short, empty, or one array (np.save's, which is no context manager)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, TypeError):
        return None


def read_runs_summary(folder: str | Path) -> dict[str, Any] | None:
    """``folder``'s ``ood_summary.json`` (``cifarlab ood`` of a ``--runs N`` folder) as
    ``{"summary": ...}`` where every run still holds the weights it measured, else ``{"note":
    why not}``; None where there is none."""
    from .calibrate import read_runs_summary_file

    return read_runs_summary_file(Path(folder) / SUMMARY_FILE, folder, "cifarlab ood", lambda s: None if isinstance(
        s.get("sets"), list) and s.get("score") in SCORES + (KNN,) else "sets")


def read_bank(run: str | Path, name: str = "ood") -> np.ndarray:
    """The ``knn`` score's bank of training features that ``cifarlab ood`` saved in
    ``RUN/<name>``, float32 (M, D); refused, naming the command, where it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(run) / name / BANK_FILE
    try:
        return load_file(str(path))["features"].astype(np.float32)
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise CifarlabError(f"cannot read the knn score's bank {path} ({e}); run 'cifarlab ood {run} --score knn' "
                            "again") from None


def familiarity(pred, images: np.ndarray, logits: np.ndarray, score: str, bank: np.ndarray | None = None,
                k: int | None = None) -> np.ndarray:
    """The ``score`` of each of ``images`` for the model of ``pred``, from their ``logits``
    (the run's own, before calibration) or, for ``knn``, their features and ``bank``."""
    if score == KNN:
        return knn_scores(bank, features(pred, images), k)
    return scores(calibrated_logits(pred, logits))[score]


def image_count(n: int | None) -> str:
    """``n`` images as a report's text counts them ("1,687 "), or nothing for a report of an
    older cifarlab that did not record how many (``threshold_images``)."""
    return f"{n:,} " if isinstance(n, int) else ""


def format_report(r: dict[str, Any], out: Path) -> str:
    """The report as a few lines for the terminal."""
    s = r["score"]
    ind = r["in_distribution"]
    names = SCORES + ((KNN,) if KNN in r else ())
    lines = [f"{ind['images']} test images of the run's own data against {len(r['sets'])} other set(s); "
             f"higher AUROC and lower FPR95 are better (AUROC 0.5: no better than chance)",
             f"{'set':<24} {'images':>7} " + " ".join(f"{k + ' AUROC':>14} {'FPR95':>6}" for k in names)
             + f" {'accepted':>9}  called mostly"]
    for st in r["sets"]:
        called = ", ".join(f"{c['class']} {c['share']:.0%}" for c in st["called"])
        lines.append(f"{st['name'][:24]:<24} {st['images']:>7} "
                     + " ".join(f"{st[k]['auroc']:>14.4f} {st[k]['fpr_at_95_tpr']:>6.3f}" for k in names)
                     + f" {st['accepted_share']:>9.2%}  {called}")
    for st in r["sets"]:
        for note in st["notes"] if not st["source"].startswith("synthetic:") else ():
            lines.append(f"  {st['name']}: {note}")
        if st.get("per_class"):
            lines.append(f"  {st['name']} by class: " + "; ".join(
                f"{c['class']} {c['accepted_share']:.0%} accepted, called {c['called']['class']} "
                f"{c['called']['share']:.0%}" for c in st["per_class"][:10])
                + (f"; ... ({len(st['per_class'])} classes in ood.json)" if len(st["per_class"]) > 10 else ""))
    if KNN in r:
        kn = r[KNN]
        lines.append(f"knn: minus the distance to the k-th nearest (k = {kn['k']}) of {kn['bank_images']} training "
                     f"images' features ({kn['features']}; without test-time augmentation)")
    lines.append(f"accepted: the share scoring at or above the {s} threshold {r['threshold']:.4g}, which keeps "
                 f"{r['keep']:.0%} of the run's {image_count(r.get('threshold_images'))}{r['threshold_fitted_on']} "
                 f"images ({ind['flagged_share']:.2%} of "
                 f"its test images fall below it); cifarlab predict --flag-unfamiliar applies it")
    lines += _flagged_lines(ind)
    upside = [st["name"] for st in r["sets"] if st[s]["auroc"] < 0.5]
    if upside:
        lines.append(f"AUROC below 0.5: the run finds {', '.join(upside)} more familiar than its own test images "
                     "(confident answers for images of nothing it knows)")
    worst = [st for st in r["sets"] if st["accepted_share"] > 0.5]
    if worst:
        lines.append("Most images of " + ", ".join(st["name"] for st in worst) + " pass as familiar: the run "
                     "cannot tell them from its own kind of image, and would label them with confidence.")
    lines.append(f"Report files in {out}")
    return "\n".join(lines)


def _flagged_lines(ind: dict[str, Any], most: int = 3) -> list[str]:
    """The classes of the run's own test images the threshold flags most, where the report has
    them by class (its share of each class, or for several runs their mean)."""
    rows = ind.get("per_class")
    if not rows or len(rows) < 2:
        return []

    def share(c: dict) -> float:
        f = c["flagged_share"]
        return f["mean"] if isinstance(f, dict) else f

    ranked = sorted(rows, key=lambda c: -share(c))
    worst = ", ".join(f"{c['class']} {share(c):.1%}" for c in ranked[:most])
    return [f"its own test images flagged, by class: most {worst}; least {ranked[-1]['class']} "
            f"{share(ranked[-1]):.1%}"]


def format_runs(s: dict[str, Any], folder: Path, reports: Path | None = None) -> str:
    """A ``--runs N`` summary for the terminal: each set's separation and share accepted over
    the runs, whose summary is in ``folder`` and reports in ``reports/run-K`` (each run's ``ood``
    folder where None)."""
    def spread(d: dict[str, float], f: str = ".4f") -> str:
        return f"{d['mean']:{f}} ({d['min']:{f}} to {d['max']:{f}})"

    n, sc = s["runs"], s["score"]
    lines = [f"{r['run']}: {sc} threshold {r['threshold']:.4g}, AUROC "
             + ", ".join(f"{a:.3f}" for a in r["auroc"]) + "; accepted "
             + ", ".join(f"{a:.1%}" for a in r["accepted_share"]) for r in s["per_run"]]
    lines += [f"{n} runs, {s['in_distribution']['images']} test images of their own data against {len(s['sets'])} "
              f"other set(s): mean (min to max) over the runs",
              f"{'set':<24} {'images':>7} {sc + ' AUROC':>26} {'FPR95':>22} {'accepted':>24}  called mostly"]
    for st in s["sets"]:
        called = ", ".join(f"{c['class']} in {c['runs']} of {n}" for c in st["called_most"])
        lines.append(f"{st['name'][:24]:<24} {st['images']:>7} {spread(st[sc]['auroc']):>26} "
                     f"{spread(st[sc]['fpr_at_95_tpr'], '.3f'):>22} {spread(st['accepted_share'], '.1%'):>24}  "
                     f"{called}")
    others = [k for k in s["scores"] if k != sc]
    if others:
        lines.append("AUROC by the other scores, mean over the runs: " + "; ".join(
            f"{st['name']}: " + ", ".join(f"{k} {st[k]['auroc']['mean']:.3f}" for k in others) for st in s["sets"]))
    lines.append(f"accepted: the share at or above each run's {sc} threshold, which keeps {s['keep']:.0%} of its "
                 f"{'/'.join(s['threshold_fitted_on'])} images ({spread(s['in_distribution']['flagged_share'], '.2%')} "
                 f"of the test images fall below it)")
    lines += _flagged_lines(s["in_distribution"])
    for st in s["sets"]:
        a = st[sc]["auroc"]
        if a["min"] < 0.5 < a["max"]:
            lines.append(f"{st['name']}: AUROC from {a['min']:.3f} to {a['max']:.3f} over the runs, on both sides of "
                         "0.5: whether a run finds these images more or less familiar than its own depends on its seed")
    lines += _ensemble_lines(s.get("ensemble"), folder if reports is None else None)
    lines.append(f"each run's report in {f'{reports}/run-K' if reports else 'its ood folder'}; summary in "
                 f"{folder / SUMMARY_FILE}")
    return "\n".join(lines)


def _ensemble_lines(e: dict[str, Any] | None, folder: Path | None) -> list[str]:
    """The summary's ensemble (:func:`ensemble_report`) in two lines; the command that applies
    its threshold where the summary is the folder's own (``folder``; None: it went to ``--out``)."""
    if not e:
        return []
    sc = e["score"]
    on = (f"{e['threshold_images']:,} training images no run trained on" if e["threshold_fitted_on"] == UNSEEN
          else f"the {e['threshold_images']:,} test images (too few training images were trained on by no run: "
               "train with --split-seed N for more)")
    return [f"their ensemble (probabilities: the {e['probabilities']}; {sc} score: {e['scored'][sc]}): AUROC "
            + ", ".join(f"{st['name']} {st[sc]['auroc']:.3f}" for st in e["sets"]) + "; accepted "
            + ", ".join(f"{st['accepted_share']:.1%}" for st in e["sets"]),
            f"  its {sc} threshold {e['threshold']:.4g} keeps {e['keep']:.0%} of {on} "
            f"({e['in_distribution']['flagged_share']:.2%} of the test images fall below it)"
            + (f"; cifarlab predict {folder} --flag-unfamiliar applies it" if folder is not None else "")]
