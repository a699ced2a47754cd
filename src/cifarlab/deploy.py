"""Export a trained run as one ONNX file that runs without PyTorch or cifarlab.

The file takes what image decoders give: uint8 images, (N, H, W, C), any batch size. The run's
preprocessing (1/255, featurewise mean and std) and its test-time augmentation are inside the
graph, and the softmax (of the logits divided by the run's temperature where ``cifarlab
calibrate`` fitted one, and shifted by its class offsets where it balanced the classes): it
returns class probabilities, (N, classes), the same as ``cifarlab.load_model(run).predict``. The class names, the preprocessing, the test-time
augmentation and the out-of-scope uses of the model card are in the file's metadata, so the
model does not travel without them. Where ``cifarlab ood`` fitted a threshold (of the run, or of
the ensemble of a ``--runs N`` folder), a second output gives each image's familiarity by its
score (for ``knn``, with the bank of training images' features in the file), and the metadata
the threshold: an application can then turn away images unlike the training images, as
``cifarlab predict --flag-unfamiliar`` does. Weights are exported
in float32 whatever the training precision, as :func:`cifarlab.load_model` loads them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .calibrate import Calibration
from .errors import CifarlabError
from .export import Ensemble, channel_values, load_classifier, tta_logits
from .fsutil import write_with

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
FAMILIARITY_NAME = "familiarity"  # the second output, where cifarlab ood fitted a threshold
# Exported probabilities may differ from PyTorch's by float32 rounding in a different order of
# operations; anything larger means the graph computes something else.
TOLERANCE = 1e-4


class ExportedClassifier(nn.Module):
    """A run's model as the ONNX file holds it: uint8 (N, H, W, C) images in, probabilities out,
    computing :func:`cifarlab.export.preprocess` with its constants held as buffers (made here,
    not while the exporter traces, whose fake tensors must not reach ``channel_values``' cache)."""

    def __init__(self, model: nn.Module, prep: dict[str, Any], tta: str, calibration: Calibration | None = None,
                 score: str | None = None, bank: np.ndarray | None = None, k: int | None = None):
        super().__init__()
        self.model = model
        self.score = score  # a score of cifarlab.ood: a second output of it; None: probabilities alone
        # knn: the training images' features (half precision, as cifarlab ood saved and used them) and k
        self.register_buffer("bank", None if bank is None else torch.from_numpy(np.asarray(bank, np.float16)))
        self.k = k
        self.rescale = float(prep.get("rescale", 1 / 255))
        self.tta = tta
        # constants in the graph (None: no division, no offsets), as Predictor.probabilities applies them
        self.temperature = calibration.temperature if calibration else None
        offsets = calibration.class_offsets if calibration else None
        self.register_buffer("offsets", None if offsets is None else torch.tensor(offsets, dtype=torch.float32))
        for name, add in (("mean", 0.0), ("std", 1e-6)):  # preprocess divides by std + 1e-6
            v = prep.get(name)
            self.register_buffer(name, None if v is None else
                                 channel_values(tuple(v), torch.float32, torch.device("cpu"), add).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() * self.rescale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        if self.score == "knn":  # the classifier's input, from the plain pass (as cifarlab.ood.features)
            from .ood import classifier_inputs

            with classifier_inputs(self.model) as feats:
                logits = tta_logits(self.model, x, self.tta)
                if self.tta != "none":  # the test-time augmentation's passes are not the features' pass
                    feats.clear()
                    self.model(x)
        else:
            logits = tta_logits(self.model, x, self.tta)
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.offsets is not None:
            logits = logits + self.offsets
        probs = logits.softmax(1)
        if self.score is None:
            return probs
        if self.score == "knn":  # cifarlab.ood.knn_scores: minus the distance to the k-th nearest, |a - b|^2 = 2 - 2 a.b
            f = torch.nn.functional.normalize(feats[0].float().flatten(1), dim=1)
            kth = (f @ self.bank.float().T).topk(self.k, dim=1).values[:, -1]
            return probs, -torch.sqrt(torch.clamp(2 - 2 * kth, min=0))
        # cifarlab.ood.scores, of the logits as calibrated
        familiarity = {"energy": lambda: logits.logsumexp(1), "msp": lambda: probs.amax(1),
                       "maxlogit": lambda: logits.amax(1)}[self.score]()
        return probs, familiarity


class ExportedEnsemble(nn.Module):
    """The runs of a ``--runs N`` folder as the ONNX file holds them: each run's
    :class:`ExportedClassifier` (its own preprocessing, test-time augmentation and calibration)
    on the same images, and the mean of their probabilities, with the ensemble's own
    ``temperature`` where it has one, as :meth:`cifarlab.export.Ensemble.predict` computes it;
    with ``score``, also the ensemble's score of :func:`cifarlab.ood.ensemble_score` (the members
    then give theirs, except for ``msp``, which is the ensemble's own top probability)."""

    def __init__(self, members: list[ExportedClassifier], temperature: float | None = None, score: str | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperature = temperature
        self.score = score

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        outs = [m(images) for m in self.members]
        mean = torch.stack([o[0] if isinstance(o, tuple) else o for o in outs]).mean(0)
        if self.temperature is not None:
            # cifarlab.calibrate.calibrate_mean, floored at float32's smallest normal (it floors in float64)
            mean = (mean.clamp_min(torch.finfo(torch.float32).tiny).log() / self.temperature).softmax(1)
        if self.score is None:
            return mean
        if self.score == "msp":
            return mean, mean.amax(1)
        return mean, torch.stack([o[1] for o in outs]).mean(0)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence ``logger`` below errors: PyTorch's exporter logs a warning for every torchvision
    operator it cannot register, and cifarlab does not use torchvision."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _onnx_modules():
    """onnx (to write the file and its metadata), after checking that onnxscript, which
    PyTorch's exporter needs, is there too; a clear error naming the extra where either is not."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise CifarlabError(f"ONNX export needs the packages onnx and onnxscript ({e.name} is not installed): "
                            "pip install onnx onnxscript onnxruntime (the onnx extra: pip install '.[onnx]' in a clone)") from None
    return onnx


def _unfamiliar_rule(predictor, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, Any]:
    """The score and threshold of ``cifarlab ood``'s report on the run of ``predictor`` (or on
    the ensemble, for an :class:`~cifarlab.export.Ensemble`), where it was measured with its
    weights, test-time augmentation and calibration, and for ``knn`` the bank of training
    images' features it saved (of an ensemble, each run's); (None, None) where there is none."""
    from .ood import read_rule

    try:
        got = read_rule(predictor)
    except CifarlabError as e:  # a knn bank missing or damaged: the file gives probabilities alone
        log(f"no '{FAMILIARITY_NAME}' output: {e}")
        return None, None
    return (None, None) if got is None else ({"output": FAMILIARITY_NAME, **got[0]}, got[1])


def sets_metadata(cal) -> dict[str, str]:
    """The prediction sets of ``cifarlab calibrate --sets`` (``cal``, a
    :class:`~cifarlab.calibrate.Calibration`) as metadata, for a user of the file to apply to its
    probabilities: a class is in an image's set where its probability reaches its floor. Empty
    where none were fitted."""
    if cal is None or cal.set_floors is None:
        return {}
    return {"prediction_sets": json.dumps({"coverage": cal.set_coverage, "by_class": cal.set_by_class,
                                           "min_probability": list(cal.set_floors)})}


def _metadata(predictor, run: Path, tta: str) -> dict[str, str]:
    """The ONNX file's metadata: what a user of the file needs to feed it and read it, and what
    it must not be used for. ``predictor`` may be an :class:`~cifarlab.export.Ensemble`: the
    figures that are each run's own (preprocessing, temperature, class offsets) are then lists,
    in the order of ``ensemble_of``."""
    from . import __version__
    from .audit import OUT_OF_SCOPE
    from .datasheet import people_classes, people_warning

    if isinstance(predictor, Ensemble):
        members = predictor.members
        first = _metadata(members[0], run, tta)
        first.pop("prediction_sets", None)  # the first run's own; the ensemble's follow, where fitted
        return {**first, **sets_metadata(predictor.calibration),
                "output": f"{OUTPUT_NAME}: the mean of the runs' softmax over the classes"
                          + ("" if predictor.temperature() is None else ", calibrated with the ensemble's temperature")
                          + f", float32 (N, {len(predictor.classes)})",
                "ensemble_of": json.dumps([m.run.name for m in members]),
                # the mean's own temperature: softmax(log(mean) / it); "none" where it has none
                "ensemble_temperature": "none" if predictor.temperature() is None else repr(predictor.temperature()),
                "preprocessing": json.dumps([m.prep for m in members]),
                "temperature": json.dumps([m.temperature() for m in members]),
                "class_offsets": json.dumps([None if m.class_offsets() is None else list(m.class_offsets())
                                             for m in members])}
    c, h, w = predictor.input_shape
    people = people_classes(predictor.classes)
    return {
        "classes": json.dumps(predictor.classes),
        "input": json.dumps({"name": INPUT_NAME, "layout": "NHWC", "dtype": "uint8", "height": h, "width": w,
                             "channels": c}),
        "output": f"{OUTPUT_NAME}: softmax over the classes, float32 (N, {len(predictor.classes)})",
        "preprocessing": json.dumps(predictor.prep),
        "test_time_augmentation": tta,
        # the logits' divisor before the softmax, from `cifarlab calibrate`; "none" where there is none
        "temperature": "none" if predictor.temperature() is None else repr(predictor.temperature()),
        # added to the logits after the temperature (`cifarlab calibrate --balance-classes`), by class
        "class_offsets": "none" if predictor.class_offsets() is None else json.dumps(list(predictor.class_offsets())),
        **sets_metadata(predictor.calibration()),
        "architecture": predictor.arch["model"],
        "source_run": run.name,
        "out_of_scope_uses": json.dumps(OUT_OF_SCOPE),
        # the file travels without its model card: a model that sorts people says so itself
        **({"people_classes": people_warning(people)} if people else {}),
        "producer": f"cifarlab {__version__}",
    }


def _exported(predictor, score: str | None = None, bank: np.ndarray | None = None,
              k: int | None = None) -> ExportedClassifier:
    """``predictor``'s model as the file holds it: float32 and the default memory format, so
    that the file holds one graph for every runtime."""
    return ExportedClassifier(predictor.model.float().to(memory_format=torch.contiguous_format), predictor.prep,
                              predictor.tta, predictor.calibration(), score, bank, k).eval()


def _architecture(predictor) -> str:
    """The model's name, of an ensemble each run's (one name: the runs of a folder train alike)."""
    members = getattr(predictor, "members", [predictor])
    return ", ".join(sorted({m.arch["model"] for m in members}))


def export_onnx(run: str | Path, out: str | Path | None = None, tta: str | None = None,
                opset: int | None = None, check: bool = True,
                log: Callable[[str], None] = print, uncalibrated: bool = False,
                about: str | Path | None = None) -> dict[str, Any]:
    """Write ``run`` as an ONNX file (default ``RUN/model.onnx``) and return what was written.

    ``tta`` is the test-time augmentation built into the graph (default: the run's own, as
    :func:`cifarlab.load_model`), with the run's calibration at that level (temperature, and
    class offsets) unless ``uncalibrated``; ``opset`` the ONNX opset (default: PyTorch's exporter's).
    With ``check`` and ``onnxruntime`` installed, the file is run on seeded random images and
    its probabilities compared with PyTorch's; a difference over :data:`TOLERANCE` is an error
    and no file is left behind. ``about``: an about file (:func:`cifarlab.about.read_about`)
    whose model developers, licence and contact join the metadata.
    """
    from .about import read_about

    given = read_about(about)["model"]  # a bad file fails before the export starts
    onnx = _onnx_modules()
    predictor = load_classifier(run, "cpu", tta, uncalibrated)
    several = isinstance(predictor, Ensemble)
    run = Path(run)
    out = Path(out) if out is not None else run / "model.onnx"
    if out.suffix != ".onnx":
        raise CifarlabError(f"output '{out}' is not a .onnx file name; give a path ending in .onnx (or in .h5 for "
                            "Keras weights, from a keras-shallow or keras-deep run)")
    if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
        raise CifarlabError(f"--opset {opset} is not an ONNX opset this onnx knows (1 to "
                            f"{onnx.defs.onnx_opset_version()}); give one such as 18 or 20")
    c, h, w = predictor.input_shape
    rule, bank = _unfamiliar_rule(predictor, log)
    score, k = (rule["score"], rule.get("k")) if rule else (None, None)
    if several:  # msp is the ensemble's own top probability: its runs need not score
        each = None if score == "msp" else score
        wrapped = ExportedEnsemble([_exported(m, each, b, k) for m, b in
                                    zip(predictor.members, bank or [None] * len(predictor.members))],
                                   predictor.temperature(), score).eval()
    else:
        wrapped = _exported(predictor, score, bank, k)
    outputs = [OUTPUT_NAME] + ([FAMILIARITY_NAME] if rule else [])
    example = torch.zeros((2, h, w, c), dtype=torch.uint8)
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx"), _quiet("onnxscript"):
            warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing chatter
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=outputs,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=opset,
                external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many types; the user needs the model and the reason
        raise CifarlabError(f"PyTorch could not export {_architecture(predictor)} to ONNX "
                            f"(opset {opset or 'default'}): {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") \
            from None
    proto = program.model_proto
    made = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and made != opset:  # the exporter falls back to its own opset when converting fails
        raise CifarlabError(f"--opset {opset}: the ONNX converter could not express this model in opset {opset} "
                            f"(PyTorch's exporter made opset {made}); give a newer one, such as {made}, or omit --opset")
    ttas = predictor.tta  # the test-time augmentation in the graph; of an ensemble, each run's
    meta = _metadata(predictor, run, ttas)
    meta.update({k: given[k] for k in ("developers", "licence", "contact") if k in given})
    if rule:  # what the second output means, and where to draw the line
        meta["unfamiliar_below"] = json.dumps(rule)
    onnx.helper.set_model_props(proto, meta)
    each = predictor.members if several else [predictor]
    temperatures, offsets = [m.temperature() for m in each], [m.class_offsets() for m in each]
    report: dict[str, Any] = {"path": str(out), "opset": made, "tta": ttas, "classes": predictor.classes,
                              # of an ensemble, each run's, in the order of ensemble_of
                              "temperature": temperatures if several else temperatures[0],
                              "class_offsets": offsets if several else offsets[0],
                              "unfamiliar_below": rule, "check": None,
                              **({"ensemble_of": [str(m.run) for m in each],
                                  "ensemble_temperature": predictor.temperature()} if several else {})}

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        if check:
            report["check"] = compare_with_pytorch(tmp, predictor, score=score, bank=bank, k=k)

    write_with(out, write)
    report["bytes"] = out.stat().st_size
    log(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB, opset {report['opset']}): uint8 images (N, {h}, {w}, {c}) "
        f"in '{INPUT_NAME}', probabilities over {len(predictor.classes)} classes out"
        + (f", the mean of the {len(each)} runs' (metadata 'ensemble_of'; each with its own calibration"
           + (f"; the mean with the ensemble's temperature {predictor.temperature():.4g}"
              if predictor.temperature() else "") + ")" if several else "") + f", test-time augmentation {ttas}"
        + (f", temperature {temperatures[0]:.4g}" if not several and temperatures[0] else "")
        + (", classes balanced (calibrate --balance-classes)" if not several and offsets[0] else "")
        + (f"; '{FAMILIARITY_NAME}' out, the {rule['score']} score"
           + (f" (k = {rule['k']}, the features of {rule['bank_images']:,} training images in the file"
              + (", each run's" if several else "") + ")"
              if "k" in rule else "")
           + f", unfamiliar below {rule['threshold']:.4g} (metadata 'unfamiliar_below', from cifarlab ood)"
           if rule else ""))
    chk = report["check"]
    if chk is None:
        log("not checked: " + ("--no-check" if not check else "onnxruntime is not installed (pip install onnxruntime)"))
    else:
        log(f"checked with onnxruntime {chk['onnxruntime']} on {chk['images']} random images: largest difference "
            f"from PyTorch's probabilities {chk['max_abs_diff']:.1e}, same top class for {chk['same_top1']} of "
            f"{chk['images']}")
    return report


def compare_with_pytorch(path: str | Path, predictor, n: int = 16, seed: int = 0, score: str | None = None,
                         bank: Any = None, k: int | None = None) -> dict[str, Any] | None:
    """Run the ONNX file at ``path`` on ``n`` seeded random uint8 images and compare its outputs
    with ``predictor.predict``'s (and, with ``score``, its second output with that score as
    :func:`cifarlab.ood.predict_familiarity` computes it; ``bank`` and ``k`` for ``knn``, of an
    ensemble ``bank`` each run's); None where
    onnxruntime is not installed. Raises when the probabilities differ by more than
    :data:`TOLERANCE`, or the scores by more than it relative to their size."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    c, h, w = predictor.input_shape
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME] + ([FAMILIARITY_NAME] if score else []), {INPUT_NAME: images})
    if score:
        from .ood import predict_familiarity

        want, expected = predict_familiarity(predictor, images, score, bank, k)
    else:  # of an ensemble too, whose probabilities are the mean of its runs'
        want = predictor.predict(images)
    diff = float(np.abs(got[0] - want).max())
    if not diff <= TOLERANCE:  # also catches NaN
        raise CifarlabError(f"the exported graph does not reproduce the model: its probabilities differ from "
                            f"PyTorch's by up to {diff:.2e} (tolerance {TOLERANCE:g}); no file was written")
    out = {"onnxruntime": ort.__version__, "images": n, "max_abs_diff": diff,
           "same_top1": int((got[0].argmax(1) == want.argmax(1)).sum())}
    if score:
        rel = float((np.abs(got[1] - expected) / np.maximum(1.0, np.abs(expected))).max())
        if not rel <= TOLERANCE:
            raise CifarlabError(f"the exported graph's {FAMILIARITY_NAME} differs from cifarlab ood's {score} score by "
                                f"up to {rel:.2e} of its size (tolerance {TOLERANCE:g}); no file was written")
        out["familiarity_max_rel_diff"] = rel
    return out
