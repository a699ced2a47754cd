"""An int8 copy of an exported run, and what it costs on the run's test images.

Post-training static quantization with ONNX Runtime's tools: the weights of the convolution
and dense layers become 8-bit integers (one scale per output channel), their inputs 8-bit
integers whose ranges are measured once on training images ("calibration"), in the QDQ format
every ONNX runtime reads. The file is about a quarter of the float32 one and runs faster on
CPUs with 8-bit dot-product instructions. What it changes is measured, not assumed: both files
classify the test images and :func:`cifarlab.compare.compare_predictions` compares them image by
image, overall and per class. Compression costs some classes more than the overall accuracy
shows (Hooker et al., 2019, *What Do Compressed Deep Neural Networks Forget?*), so the classes
that lost accuracy beyond chance are named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import CALIBRATION_METHODS
from .errors import CifarlabError, short_list

# The layers with weights. knn's MatMul against the bank of training features stays float: its
# scores are compared with a threshold fitted in float.
QUANTIZED_OPS = ("Conv", "Gemm")
CALIBRATION_BATCH = 100  # images per calibration batch: ranges are kept over all of them either way
PREDICT_BATCH = 500  # images per ONNX Runtime call when classifying the test images
ALPHA = 0.05


def check_calibration(images: int, method: str) -> None:
    """Refuse a calibration set size or method that cannot be used (before any data is read)."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise CifarlabError(f"--calibration-images {images!r} is not valid; give a positive number of training "
                            "images, such as 1000")
    if method not in CALIBRATION_METHODS:
        raise CifarlabError(f"--calibration-method '{method}' is not one of {', '.join(CALIBRATION_METHODS)}")


def _ort_quantization():
    """onnxruntime and its quantization tools, or a clear error naming the package."""
    try:
        import onnxruntime
        from onnxruntime import quantization
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise CifarlabError(f"--int8 needs onnxruntime's quantization tools ({e.name} could not be imported): "
                            "pip install onnxruntime (the onnx extra: pip install '.[onnx]' in a clone)") from None
    return onnxruntime, quantization, quant_pre_process


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization prints its progress to stdout and logs advice through the
    root logger; the command reports what it did itself."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(before)


def quantize_file(float_path: str | Path, out: str | Path, images: np.ndarray, method: str = "minmax",
                  input_name: str = "images") -> None:
    """Write an int8 copy of the ONNX file ``float_path`` to ``out``: weights of the layers in
    :data:`QUANTIZED_OPS` int8 per output channel, their inputs uint8 with ranges calibrated by
    ``method`` on ``images`` (uint8, as the file takes them). ``out`` is written as it is made;
    :func:`export_int8` writes to a temporary name first."""
    check_calibration(len(images), method)
    _, q, pre_process = _ort_quantization()

    class Batches(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(images):
                return None
            batch = images[self.start:self.start + CALIBRATION_BATCH]
            self.start += CALIBRATION_BATCH
            return {input_name: np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory(prefix="cifarlab-int8-") as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and ONNX Runtime's graph optimisations first (batch norms folded into the
        # convolutions before them), as its quantization guide asks: fewer tensors to calibrate.
        # ONNX's shape inference is enough for these graphs; ONNX Runtime's symbolic one (for
        # dynamic shapes inside transformers) fails on them in version 1.18, leaving files in the
        # working folder.
        pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(str(prepared), str(out), Batches(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=list(QUANTIZED_OPS),
                          calibrate_method={"minmax": q.CalibrationMethod.MinMax,
                                            "percentile": q.CalibrationMethod.Percentile}[method])


def run_file(path: str | Path, images: np.ndarray, outputs: list[str], input_name: str = "images"
             ) -> tuple[list[np.ndarray], float]:
    """``outputs`` of the ONNX file ``path`` for ``images`` (in batches of :data:`PREDICT_BATCH`)
    with ONNX Runtime on the CPU, and the seconds the runs took (session start left out)."""
    ort, _, _ = _ort_quantization()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    start = time.perf_counter()
    for i in range(0, len(images), PREDICT_BATCH):
        for part, got in zip(parts, session.run(outputs, {input_name: images[i:i + PREDICT_BATCH]})):
            part.append(got)
    seconds = time.perf_counter() - start
    return [np.concatenate(p) for p in parts], seconds


def compare_files(float_path: str | Path, int8_path: str | Path, images: np.ndarray, labels: np.ndarray,
                  classes: list[str], familiarity: dict[str, Any] | None = None, seed: int = 0,
                  groups: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
                  sets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Classify ``images`` with both files and compare them (:func:`cifarlab.compare.compare_predictions`:
    accuracies, int8 minus float32 with a bootstrap interval, McNemar's test, the same per class,
    and per group of each attribute of ``groups``, as :func:`cifarlab.audit.load_groups` reads a
    groups file). Also the seconds each took, and with ``familiarity`` (the export's
    ``unfamiliar_below`` rule) the share of images on the same side of its threshold in both files.
    ``sets``: the float32 and the int8 file's prediction sets (each a
    :class:`~cifarlab.calibrate.Calibration` holding floors), measured on the images as
    ``cifarlab evaluate`` measures a run's (:func:`cifarlab.evaluate.sets_report`)."""
    from .compare import compare_predictions
    from .deploy import FAMILIARITY_NAME, OUTPUT_NAME
    from .evaluate import calibration, log_loss, sets_report

    outputs = [OUTPUT_NAME] + ([FAMILIARITY_NAME] if familiarity else [])
    (p_float, *f_float), t_float = run_file(float_path, images, outputs)
    (p_int8, *f_int8), t_int8 = run_file(int8_path, images, outputs)
    # a: the float32 file, b: the int8 one (their difference: int8 minus float32)
    c = {"a": "float32", "b": "int8"} | compare_predictions(labels, p_float.argmax(1), p_int8.argmax(1), classes,
                                                             seed=seed, groups=groups)
    c["seconds_float"], c["seconds_int8"] = t_float, t_int8
    # the confidences move too: Test score and calibration error of each, as cifarlab evaluate reports them
    c["loss_float32"], c["loss_int8"] = log_loss(p_float, labels), log_loss(p_int8, labels)
    c["ece_float32"], c["ece_int8"] = calibration(p_float, labels)["ece"], calibration(p_int8, labels)["ece"]
    c["max_abs_diff"] = float(np.abs(p_float - p_int8).max()) if len(images) else 0.0
    if familiarity:
        t = familiarity["threshold"]
        c["familiarity_same_side"] = float(((f_float[0] >= t) == (f_int8[0] >= t)).mean())
    if sets is not None:
        c["prediction_sets"] = {"float32": sets_report(sets[0], p_float, labels, classes),
                                "int8": sets_report(sets[1], p_int8, labels, classes)}
    # classes whose accuracy fell beyond chance (McNemar's test per class, Holm-adjusted)
    c["classes_lost"] = [r["class"] for r in c["per_class"] if r["difference"] < 0 and r["p_value_holm"] < ALPHA]
    if groups is not None:  # the same by group, Holm-adjusted within each attribute
        c["groups_lost"] = [{"attribute": attr, "group": r["group"], "difference": r["difference"],
                             "p_value_holm": r["p_value_holm"]}
                            for attr, a in c["by_attribute"].items() for r in a["groups"]
                            if r["difference"] < 0 and r["p_value_holm"] < ALPHA]
    return c


def export_int8(run: str | Path, ds, out: str | Path | None = None, calibration_images: int = 1000,
                method: str = "minmax", tta: str | None = None, opset: int | None = None, check: bool = True,
                uncalibrated: bool = False, about: str | Path | None = None, seed: int = 0,
                groups_csv: str | Path | None = None, intersections: bool = False,
                log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``run`` as an int8 ONNX file (default ``RUN/model.int8.onnx``) and its comparison
    with the float32 file on ``ds``'s test images (``<out>.json`` beside it, and in the file's
    metadata ``quantization``); return that report.

    The float32 file is exported first as :func:`cifarlab.deploy.export_onnx` makes it (``tta``,
    ``opset``, ``check``, ``uncalibrated`` and ``about`` as there) and quantized with
    :func:`quantize_file`, calibrated on ``calibration_images`` of ``ds``'s training images
    (class-balanced, drawn with ``seed``), never its test images. Where the float32 file carries
    prediction sets, the int8 file's own are fitted on its probabilities of the held-out images
    those were fitted on (which the ranges are then not calibrated on), and both files' sets are
    measured on the test images. ``groups_csv`` (a groups file
    as ``cifarlab audit --groups`` reads it, with each pair of its attributes where
    ``intersections``) adds the comparison per group. ``run`` may be the folder of
    ``cifarlab train --runs N``: the file is then its ensemble's (see ``export_onnx``), and the
    report records each run's weights' SHA-256. Nothing is written where any step fails.
    ``log`` receives what was written and measured, ``progress`` (default ``log``) each step as
    it starts.
    """
    import onnx

    from .audit import load_groups
    from .calibrate import weights_digest
    from .data import balanced_subset
    from .deploy import export_onnx, sets_metadata
    from .evaluate import _check_compatible
    from .export import Ensemble, load_classifier
    from .fsutil import atomic_path, write_json

    check_calibration(calibration_images, method)
    _ort_quantization()
    pred = load_classifier(run, "cpu", tta, uncalibrated)
    several = isinstance(pred, Ensemble)
    _check_compatible(pred, ds)  # its labels must be the model's classes
    groups = load_groups(groups_csv, ds, intersections)  # a bad file fails before anything is exported
    run = Path(run)
    out = Path(out) if out is not None else run / "model.int8.onnx"
    if out.suffix != ".onnx":
        raise CifarlabError(f"output '{out}' is not a .onnx file name; give a path ending in .onnx")
    if not len(ds.x_train) or not len(ds.x_test):
        raise CifarlabError(f"the data has {len(ds.x_train)} training and {len(ds.x_test)} test images: the int8 "
                            "ranges are calibrated on training images and the file is measured on test images; give "
                            "the run's own data, or other data with both splits")
    with tempfile.TemporaryDirectory(prefix="cifarlab-export-") as tmp:
        float_path = Path(tmp) / "model.onnx"
        exported = export_onnx(run, float_path, tta=tta, opset=opset, check=check, log=lambda _: None,
                               uncalibrated=uncalibrated, about=about)
        sets, held = _sets_to_refit(pred, run, ds, several, log)
        # the ranges never come from the images the sets are refitted on: they must not shape the
        # file whose probabilities are fitted there
        pool = np.setdiff1d(np.arange(len(ds.y_train)), held if held is not None else [])
        calib = ds.x_train[pool[balanced_subset(ds.y_train[pool], calibration_images, seed)]]
        progress = progress or log
        progress(f"calibrating the int8 ranges ({method}) on {len(calib):,} training images")
        quantized = Path(tmp) / "model.int8.onnx"
        quantize_file(float_path, quantized, calib, method)
        if sets is not None:
            progress(f"refitting the prediction sets on the int8 file's probabilities of the {len(held):,} held-out "
                     "images the float32 file's were fitted on")
            sets = (sets, _refit_sets(sets, quantized, ds.x_train[held], ds.y_train[held]))
        progress(f"classifying the {len(ds.x_test):,} test images with the float32 and the int8 file")
        c = compare_files(float_path, quantized, ds.x_test, ds.y_test, exported["classes"],
                          exported["unfamiliar_below"], seed, groups, sets)
        # what it was measured with, so the model card quotes it only while the run is unchanged
        report = {"path": str(out), "float32_bytes": float_path.stat().st_size, "tta": exported["tta"],
                  # of an ensemble, each run's, in the order of ensemble_of
                  "weights_sha256": [weights_digest(m.run) for m in pred.members] if several else weights_digest(run),
                  **({"ensemble_of": exported["ensemble_of"], "ensemble_temperature": exported["ensemble_temperature"]}
                     if several else {}),
                  "temperature": exported["temperature"],
                  "class_offsets": exported["class_offsets"], "data": ds.source, "opset": exported["opset"],
                  "weights": "int8, symmetric, a scale per output channel",
                  "activations": "uint8, a static range per tensor", "layers": list(QUANTIZED_OPS),
                  "calibration": {"images": len(calib), "method": method, "split": "training", "seed": seed},
                  "onnxruntime": _ort_quantization()[0].__version__, "test": c}
        proto = onnx.load(str(quantized))
        meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        # the float32 floors were fitted to its probabilities, which rounding moves: the int8
        # file carries its own, or none where they could not be refitted
        meta.pop("prediction_sets", None)
        if sets is not None:
            meta.update(sets_metadata(sets[1]))
            report["prediction_sets"] = {"refitted_on_images": int(len(held)), "coverage": sets[1].set_coverage,
                                         "by_class": sets[1].set_by_class,
                                         "min_probability": dict(zip(exported["classes"], sets[1].set_floors)),
                                         "float32_min_probability": dict(zip(exported["classes"], sets[0].set_floors))}
        meta["quantization"] = json.dumps(
            {k: report[k] for k in ("weights", "activations", "layers", "calibration")}
            | {"test_images": c["images"], "test_accuracy_float32": c["accuracy_a"], "test_accuracy_int8": c["accuracy_b"],
               "agreement": c["agreement"]}
            | ({"prediction_sets": f"refitted to this file's probabilities of {len(held):,} held-out images",
                "test_set_coverage": c["prediction_sets"]["int8"]["coverage"]} if sets is not None else {}))
        onnx.helper.set_model_props(proto, meta)
        with atomic_path(out) as tmp_out:
            onnx.save_model(proto, str(tmp_out))
            report["bytes"] = tmp_out.stat().st_size
            write_json(out.with_suffix(".json"), report)
    log(format_int8_report(report))
    return report


def _sets_to_refit(pred, run: Path, ds, several: bool, log: Callable[[str], None]) -> tuple[Any, Any]:
    """The prediction sets of ``pred`` (its :class:`~cifarlab.calibrate.Calibration`, as the
    float32 file carries them) and the indices into ``ds``'s training split of the held-out images
    they were fitted on, where the int8 file can have its own fitted there; (None, None) where
    there are none, or where ``ds`` does not give back those images (said in a line: the int8
    file then carries no sets)."""
    from .calibrate import held_out_images
    from .conformal import fit_image_counts

    cal = pred.calibration if several else pred.calibration()
    if cal is None or cal.set_floors is None:
        return None, None
    why = "the int8 file carries no prediction sets: its own are fitted on the held-out images the float32 file's were"
    try:
        held = held_out_images(run, ds, several)
    except CifarlabError as e:
        log(f"{why}, and {e}")
        return None, None
    if fit_image_counts(ds.y_train[held], len(cal.set_floors), cal.set_by_class) != list(cal.set_fit_images):
        by_class = " --sets-by-class" if cal.set_by_class else ""
        log(f"{why}, and these are not those: {len(held):,} held-out images here against "
            f"{sum(cal.set_fit_images) if cal.set_by_class else cal.set_fit_images[0]:,} then; calibrate again "
            f"with: cifarlab calibrate {run} --sets {cal.set_coverage:g}{by_class}")
        return None, None
    return cal, held


def _refit_sets(cal, int8_path: Path, images: np.ndarray, labels: np.ndarray):
    """``cal`` with its prediction sets' floors fitted afresh, at the same coverage and by class
    alike, on the int8 file's probabilities of the held-out ``images`` labelled ``labels``."""
    from .conformal import fit_floors
    from .deploy import OUTPUT_NAME

    (probs,), _ = run_file(int8_path, images, [OUTPUT_NAME])
    floors = fit_floors(probs, labels, cal.set_coverage, cal.set_by_class)
    return dataclasses.replace(cal, set_floors=tuple(floors.tolist()))


def read_int8(run: str | Path, pred) -> dict[str, Any] | None:
    """``RUN/model.int8.json`` where it was measured with the weights, test-time augmentation and
    calibration of ``pred`` (a :class:`cifarlab.export.Predictor` of ``run``, or the
    :class:`cifarlab.export.Ensemble` of the ``--runs N`` folder ``run``: each of its runs', and
    its own temperature); None where there is none or a run has changed since. Only the default
    file is looked for."""
    from .calibrate import read_current_report, same_calibration, weights_digest
    from .export import Ensemble

    path = Path(run) / "model.int8.json"
    if not isinstance(pred, Ensemble):
        return read_current_report(path, run, pred.tta, pred.temperature(), pred.class_offsets())
    try:
        r = json.loads(path.read_text())
        each = pred.members
        current = (r["tta"] == pred.tta and r["ensemble_temperature"] == pred.temperature()
                   and r["weights_sha256"] == [weights_digest(m.run) for m in each]
                   and len(r["temperature"]) == len(r["class_offsets"]) == len(each)
                   and all(same_calibration({"temperature": t, "class_offsets": o}, m.temperature(), m.class_offsets())
                           for t, o, m in zip(r["temperature"], r["class_offsets"], each)))
    except (OSError, ValueError, TypeError, KeyError, CifarlabError):  # none, damaged, or a single run's report
        return None
    return r if current else None


def format_int8_report(r: dict[str, Any], most: int = 3) -> str:
    """What :func:`export_int8` wrote and measured, for the screen."""
    c = r["test"]
    lines = [f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB against {r['float32_bytes'] / 1e6:.1f} MB in float32): "
             f"int8 convolution and dense layers, ranges calibrated ({r['calibration']['method']}) on "
             f"{r['calibration']['images']:,} training images; report {Path(r['path']).with_suffix('.json')}"]
    lo, hi = c["difference_ci"]
    changed = round((1 - c["agreement"]) * c["images"])
    lines.append(f"on {c['images']:,} test images: accuracy {c['accuracy_b']:.4f} int8 against {c['accuracy_a']:.4f} "
                 f"float32 ({c['difference']:+.4f}, 95% CI {lo:+.4f} to {hi:+.4f}; McNemar p = {c['p_value']:.2g}); "
                 f"{changed:,} images ({1 - c['agreement']:.1%}) changed class; {c['seconds_int8']:.2f} s against "
                 f"{c['seconds_float']:.2f} s with ONNX Runtime on this CPU")
    if "loss_int8" in c:
        lines.append(f"Test score {c['loss_int8']:.4f} int8 against {c['loss_float32']:.4f} float32; expected "
                     f"calibration error {c['ece_int8']:.4f} against {c['ece_float32']:.4f}")
    if "familiarity_same_side" in c:
        lines.append(f"familiarity: {c['familiarity_same_side']:.1%} of the test images on the same side of the "
                     "threshold as in float32")
    if "prediction_sets" in c:
        f32, q = c["prediction_sets"]["float32"], c["prediction_sets"]["int8"]
        chance = f" (chance range {q['expected_range'][0]:.4f} to {q['expected_range'][1]:.4f})" \
            if q["expected_range"] else ""
        lines.append(f"prediction sets ({q['coverage_target']:g}{' of each class' if q['by_class'] else ''}), refitted "
                     f"on the int8 file's probabilities of {r['prediction_sets']['refitted_on_images']:,} held-out "
                     f"images: they held the true class for {q['coverage']:.4f} of the test images{chance}, mean size "
                     f"{q['mean_size']:.2f}, against {f32['coverage']:.4f} and {f32['mean_size']:.2f} with the "
                     "float32 file's" + "".join(
                         f"; below their chance range with the {name} file's: {short_list(rep['short_of_coverage'])}"
                         for name, rep in (("int8", q), ("float32", f32)) if rep["short_of_coverage"]))
    worst = sorted((row for row in c["per_class"] if row["difference"] < 0), key=lambda row: row["difference"])
    lines.append("largest drops by class: " + ", ".join(
        f"{row['class']} {row['difference']:+.4f} (Holm p = {row['p_value_holm']:.2g})" for row in worst[:most])
        if worst else "no class's accuracy fell")
    if "by_attribute" in c and not c["groups_lost"]:
        rows = [(attr, r) for attr, a in c["by_attribute"].items() for r in a["groups"]]
        attr, low = min(rows, key=lambda ar: ar[1]["difference"]) if rows else (None, None)
        lines.append(f"by group ({', '.join(c['by_attribute'])}): none less accurate beyond chance"
                     + (f"; largest drop {attr} '{low['group']}' {low['difference']:+.4f} ({low['support']:,} images, "
                        f"Holm p = {low['p_value_holm']:.2g})" if low is not None and low["difference"] < 0 else ""))
    for g in c.get("groups_lost", []):
        lines.append(f"WARNING: the int8 file is less accurate on the {g['attribute']} group '{g['group']}' beyond "
                     f"chance ({g['difference']:+.4f}, Holm-adjusted p = {g['p_value_holm']:.2g} within the attribute)")
    if c["classes_lost"]:
        lines.append(f"WARNING: the int8 file is less accurate on {short_list(c['classes_lost'])} beyond chance "
                     f"(McNemar per class, Holm-adjusted, alpha {ALPHA}): its smaller size is paid for by "
                     f"{'that class' if len(c['classes_lost']) == 1 else 'those classes'}; weigh that before "
                     "deploying it")
    else:
        lines.append(f"no class lost accuracy beyond chance (McNemar per class, Holm-adjusted, alpha {ALPHA})")
    return "\n".join(lines)
