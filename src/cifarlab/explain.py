"""``cifarlab explain``: where in an image a trained model finds the evidence for a class.

Attribution maps come from Captum (Kokhlikyan et al., 2020): Grad-CAM (Selvaraju et al., 2017)
on a convolution's output, occlusion (Zeiler and Fergus, 2014) and integrated gradients
(Sundararajan et al., 2017). Such maps can look convincing while saying little about the model:
Adebayo et al. (2018, "Sanity checks for saliency maps") found some methods give nearly the
same maps for a network with random weights. So every explanation here is checked the way
they propose (the model-parameter randomisation test): the maps are computed again with the
weights re-initialised, and the rank correlation between the two sets is reported; a map that
barely changes shows the image's structure, not what the model learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from .config import EXPLAIN_METHODS as METHODS
from .config import EXPLAIN_SELECTIONS as SELECTIONS
from .errors import CifarlabError, did_you_mean, short_list

# Maps whose mean rank correlation with the random-weight maps reaches this are flagged: more
# alike than unlike, so they mostly reflect the image and the architecture (a judgement call;
# Adebayo et al. show the correlations and give no threshold).
SANITY_FLAG = 0.5
MAX_FILES = 256  # image files explained in one call: the grid of more is unreadable
GREY = 127.5  # occlusion's and integrated gradients' baseline: mid-grey pixels, close to CIFAR-10's mean colour
IG_STEPS = 32  # integrated gradients' Riemann steps per image (Sundararajan et al. use 20 to 300)


def require_captum():
    """Captum's attribution classes, with a clear error naming the extra where it is missing."""
    try:
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
    except ImportError:
        raise CifarlabError("cifarlab explain needs the package captum: pip install captum (the explain extra: "
                            "pip install '.[explain]' in a clone)") from None
    return IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion


def check_options(method: str, select: str, count: int, layer: str | None = None) -> None:
    """A clear error for an unknown method or selection, a count below 1, or a layer given to
    a method that takes none; before any data is loaded."""
    if method not in METHODS:
        raise CifarlabError(f"--method '{method}' is not valid{did_you_mean(method, METHODS)}; choose one of "
                            f"{', '.join(METHODS)}")
    if select not in SELECTIONS:
        raise CifarlabError(f"--select '{select}' is not valid{did_you_mean(select, SELECTIONS)}; choose one of "
                            f"{', '.join(SELECTIONS)}")
    if count < 1:
        raise CifarlabError(f"--count {count} is not valid; it must be at least 1, such as 16")
    if layer is not None and method != "gradcam":
        raise CifarlabError(f"--layer is Grad-CAM's; --method {method} looks at the input, not at a layer")


class PixelModel(nn.Module):
    """``model`` taking float pixel values (N, C, H, W) in [0, 255], with the run's
    preprocessing inside: attributions are then of pixels, and the occlusion and integrated
    gradients baselines (grey) are the same for every run."""

    def __init__(self, model: nn.Module, prep: dict[str, Any]):
        super().__init__()
        self.model, self.prep = model, prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .export import normalize

        return self.model(normalize(x * self.prep.get("rescale", 1 / 255), self.prep))


def conv_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, tuple[int, int]]]:
    """The convolutions of ``model`` in the order one forward pass runs them, each with its
    output's (height, width) on an input of ``input_shape`` (C, H, W)."""
    device = next(model.parameters()).device
    found: list[tuple[str, tuple[int, int]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: found.append((name, tuple(out.shape[-2:]))))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    return found


def choose_layer(model: nn.Module, input_shape: tuple[int, int, int], layer: str | None) -> tuple[str, tuple[int, int]]:
    """Grad-CAM's layer: ``layer`` (a convolution's name, as ``model.named_modules()`` gives
    it), or by default the last convolution whose map is larger than 1x1, where the features
    are the most specific to the classes that still keep where they are in the image."""
    convs = conv_layers(model, input_shape)
    spatial = [(n, s) for n, s in convs if s[0] * s[1] > 1]
    if layer is None:
        if not spatial:
            raise CifarlabError("the model has no convolution with a map larger than 1x1 for Grad-CAM; use "
                                "--method occlusion or integrated-gradients")
        return spatial[-1]
    for n, s in convs:
        if n == layer:
            return n, s
    raise CifarlabError(f"--layer '{layer}' is not one of the model's convolutions; choose one of "
                        f"{short_list([n for n, _ in convs], 12)}")


def occlusion_window(h: int, w: int) -> int:
    """Occlusion's square, an eighth of the image's shorter side (at least 2 pixels); it moves
    by half its width, so on 32x32 images 4-pixel squares take 15 x 15 positions."""
    return max(2, min(h, w) // 8)


def attribute(model: nn.Module, prep: dict[str, Any], images: torch.Tensor, targets: torch.Tensor, method: str,
              layer: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Attribution maps, float32 (N, H, W), of uint8 ``images`` (N, C, H, W) for the classes
    ``targets`` (N,), by ``method`` (:data:`METHODS`); a channel's attributions are summed.
    Grad-CAM's map (at ``layer``, a convolution's name) is kept positive, as Selvaraju et al.
    do, and upsampled bilinearly to the image; occlusion and integrated gradients are signed
    (positive: evidence for the class), against grey pixels."""
    ig_cls, layer_attr, gradcam_cls, occlusion_cls = require_captum()
    net = PixelModel(model, prep).eval()
    device = next(model.parameters()).device
    h, w = images.shape[-2:]
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device).float()
        t = targets[s:s + batch_size].to(device)
        if method == "gradcam":
            module = dict(model.named_modules())[layer]
            a = gradcam_cls(net, module).attribute(x, target=t, relu_attributions=True)
            a = layer_attr.interpolate(a, (h, w), interpolate_mode="bilinear")
        elif method == "occlusion":
            k, c = occlusion_window(h, w), x.shape[1]
            a = occlusion_cls(net).attribute(x, target=t, sliding_window_shapes=(c, k, k), strides=(c, k // 2, k // 2),
                                             baselines=GREY, perturbations_per_eval=16)
        else:
            a = ig_cls(net).attribute(x, baselines=torch.full_like(x, GREY), target=t, n_steps=IG_STEPS,
                                      internal_batch_size=256)
        out.append(a.sum(1).detach().float().cpu())
    return torch.cat(out).numpy()


def random_weights_model(arch: dict, device: torch.device, seed: int) -> nn.Module:
    """The run's architecture with freshly initialised weights (seeded), in evaluation mode: the
    model of the randomisation test."""
    from .models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch["model"], **arch.get("model_kwargs", {}))
    return model.to(device).eval()


def rank_correlations(maps: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each map with the other's at the same index; NaN where
    either map is constant (a Grad-CAM map that is zero everywhere, for one)."""
    from scipy.stats import spearmanr

    rho = np.full(len(maps), np.nan)
    for i, (a, b) in enumerate(zip(maps, others)):
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            rho[i] = spearmanr(a.ravel(), b.ravel()).statistic
    return rho


def sanity_check(maps: np.ndarray, random_maps: np.ndarray) -> dict[str, Any]:
    """The randomisation test's figures: the rank correlation of each image's map with its map
    under random weights, as mean, min and max over the images where it is defined, how many
    it is not defined for, and whether the mean reaches :data:`SANITY_FLAG`."""
    rho = rank_correlations(maps, random_maps)
    ok = rho[np.isfinite(rho)]
    summary: dict[str, Any] = {"test": "model-parameter randomisation (Adebayo et al., 2018)",
                               "rank_correlation": None, "undefined": int(len(rho) - len(ok)),
                               "flag_at": SANITY_FLAG, "flagged": False}
    if len(ok):
        mean = float(np.mean(np.abs(ok)))
        summary["rank_correlation"] = {"mean_abs": mean, "mean": float(ok.mean()), "min": float(ok.min()),
                                       "max": float(ok.max()), "images": int(len(ok))}
        summary["flagged"] = mean >= SANITY_FLAG
    return summary


def select_images(probs: np.ndarray, y: np.ndarray, select: str, count: int, class_index: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """Indices of up to ``count`` test images: the most confidently ``wrong`` (as the confident
    errors of ``cifarlab evaluate``), the most confidently ``right``, or a seeded ``random``
    draw; of the true class ``class_index`` only where given."""
    pred = probs.argmax(1)
    pool = np.arange(len(y)) if class_index is None else np.flatnonzero(y == class_index)
    if select == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))
    keep = pool[(pred[pool] != y[pool]) if select == "wrong" else (pred[pool] == y[pool])]
    return keep[np.argsort(-probs[keep].max(1), kind="stable")][:count]


def display_map(m: np.ndarray) -> np.ndarray:
    """A map scaled for display: its positive part (the evidence for the class) over its
    maximum, so each map is read for where, not how strongly; zero where nothing is positive."""
    pos = np.clip(m, 0, None)
    top = pos.max()
    return pos / top if top > 0 else pos


def explain_images(pred, images: np.ndarray, labels: np.ndarray | None, method: str, layer: str | None = None,
                   sanity: bool = True, seed: int = 0, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Explain uint8 ``images`` (N, H, W, C) with ``pred`` (a :class:`cifarlab.export.Predictor`):
    its predictions (with its test-time augmentation and calibration), a map for each predicted
    class, one for each true class where ``labels`` are known and differ, and with ``sanity``
    the randomisation test of the predicted-class maps (random weights from ``seed``). Returns
    the maps and figures; :func:`write_explanations` writes them."""
    c, h, w = pred.input_shape
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    probs = pred.predict(images)
    predicted = probs.argmax(1)
    model = pred.model.float().to(memory_format=torch.contiguous_format)
    name, size = choose_layer(model, (c, h, w), layer) if method == "gradcam" else (None, None)
    where = f" at layer {name} ({size[0]}x{size[1]} map)" if name else ""
    log(f"explaining {len(images)} image(s) by {method}{where}")
    maps = {"predicted": attribute(model, pred.prep, x, torch.from_numpy(predicted), method, name)}
    if labels is not None:
        true_maps = maps["predicted"].copy()
        differ = np.flatnonzero(labels != predicted)
        if len(differ):
            true_maps[differ] = attribute(model, pred.prep, x[differ], torch.from_numpy(labels[differ]), method, name)
        maps["true"] = true_maps
    result: dict[str, Any] = {"method": method, "layer": name, "layer_map_size": list(size) if size else None,
                              "probs": probs, "predicted": predicted, "maps": maps, "sanity_check": None}
    if method == "occlusion":
        k = occlusion_window(h, w)
        result["settings"] = {"window": k, "stride": k // 2, "baseline": GREY}
    elif method == "integrated-gradients":
        result["settings"] = {"steps": IG_STEPS, "baseline": GREY}
    else:
        result["settings"] = {"relu": True, "upsampling": "bilinear"}
    if sanity:
        log("sanity check: the same maps with random weights")
        rand = random_weights_model(pred.arch, pred.device, seed)
        maps["random_weights"] = attribute(rand, pred.prep, x, torch.from_numpy(predicted), method, name)
        result["sanity_check"] = {**sanity_check(maps["predicted"], maps["random_weights"]), "seed": seed}
    return result


def write_explanations(out: Path, result: dict[str, Any], pred, images: np.ndarray, labels: np.ndarray | None,
                       names: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``explanations.png`` (each image beside its maps), ``maps.npz`` (the raw maps,
    float32 (N, H, W), by which class they explain) and ``explanations.json`` into ``out``;
    return the report that ``explanations.json`` holds. ``names``: each image's index or path,
    as the report lists it; ``extra``: what the caller adds to the report (the data, the
    selection)."""
    import io

    from .fsutil import make_folder, write_bytes, write_json
    from .plots import explanation_grid

    classes = pred.classes
    probs, predicted, maps = result["probs"], result["predicted"], result["maps"]
    rows = []
    for i in range(len(images)):
        row = {"image": names[i], "predicted": classes[predicted[i]], "confidence": float(probs[i].max())}
        if labels is not None:
            row["true"] = classes[labels[i]]
            row["correct"] = bool(labels[i] == predicted[i])
        rows.append(row)
    # each image, then its map for the predicted class, then (where some are wrong) for the true class
    panels = []
    show_true = labels is not None and bool((labels != predicted).any())
    for i, row in enumerate(rows):
        truth = f"true {row['true']}\n" if labels is not None else ""
        head = f"{truth}pred {row['predicted']} {row['confidence']:.2f}"
        cells = [(None, head), (display_map(maps["predicted"][i]), f"evidence for\n{row['predicted']}")]
        if show_true:
            cells.append((display_map(maps["true"][i]), f"evidence for\n{row['true']}") if not row["correct"]
                         else None)
        panels.append(cells)
    make_folder(out)
    explanation_grid(images, panels, out / "explanations.png")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v.astype(np.float32) for k, v in maps.items()})
    write_bytes(out / "maps.npz", buf.getvalue())
    report = {**extra, "method": result["method"], "settings": result["settings"], "layer": result["layer"],
              "layer_map_size": result["layer_map_size"], "tta": pred.tta, "temperature": pred.temperature(),
              "images": rows, "sanity_check": result["sanity_check"],
              "maps": {"file": "maps.npz", "arrays": sorted(maps), "shape": list(maps["predicted"].shape),
                       "display": "positive part over its maximum, each map on its own"}}
    report["files"] = sorted({p.name for p in out.iterdir() if not p.name.startswith(".")} | {"explanations.json"})
    write_json(out / "explanations.json", report)
    return report


def explain_dataset(run: str | Path, ds, out: str | Path | None = None, method: str = "gradcam",
                    select: str = "wrong", count: int = 16, class_name: str | None = None, layer: str | None = None,
                    sanity: bool = True, seed: int = 0, tta: str | None = None, device: str = "auto",
                    uncalibrated: bool = False, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Explain ``count`` of ``ds``'s test images chosen by ``select`` (:func:`select_images`;
    of the true class ``class_name`` only where given) and write the report into ``out``, by
    default ``RUN/explain`` (``RUN/explain-<data>`` on other data than the run's own)."""
    from .evaluate import _check_compatible
    from .export import default_report_folder, load_model
    from .fsutil import report_folder

    check_options(method, select, count, layer)
    require_captum()  # a missing library is named before the test images are predicted
    out = Path(out) if out is not None else default_report_folder(run, "explain", ds)
    pred = load_model(run, device, tta, uncalibrated)
    _check_compatible(pred, ds)
    class_index = None
    if class_name is not None:
        if class_name not in pred.classes:
            raise CifarlabError(f"--class '{class_name}' is not one of the model's classes"
                                f"{did_you_mean(class_name, pred.classes)}; choose one of "
                                f"{short_list(pred.classes, 12)}")
        class_index = pred.classes.index(class_name)
    if method == "gradcam":  # a bad --layer is named before the test images are predicted
        choose_layer(pred.model, pred.input_shape, layer)
    with report_folder(out):
        log(f"predicting the {len(ds.x_test):,} test images")
        idx = select_images(pred.predict(ds.x_test), ds.y_test, select, count, class_index, seed)
        if not len(idx):
            which = f" of class {class_name}" if class_name else ""
            raise CifarlabError(f"no test image{which} is {'predicted ' if select != 'random' else ''}"
                                f"{select if select != 'random' else 'there'}: nothing to explain; try --select "
                                f"{'right' if select == 'wrong' else 'wrong'}")
        images, labels = ds.x_test[idx], ds.y_test[idx]
        result = explain_images(pred, images, labels, method, layer, sanity, seed, log)
        names = [ds.test_paths[i] if ds.test_paths else f"#{i}" for i in idx]
        extra = {"run": str(pred.run), "data": ds.source, "test_origin": ds.test_origin, "select": select,
                 "class": class_name, "count": count, "indices": [int(i) for i in idx]}
        return write_explanations(out, result, pred, images, labels, names, extra)


def explain_files(run: str | Path, paths: list[str], out: str | Path | None = None, method: str = "gradcam",
                  layer: str | None = None, sanity: bool = True, seed: int = 0, tta: str | None = None,
                  device: str = "auto", uncalibrated: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Explain image files (folders searched for them) by their predicted classes and write the
    report into ``out``, by default ``RUN/explain-files``. Unreadable files are reported in
    ``errors`` and left out; refused where none can be read or more than :data:`MAX_FILES`
    are given."""
    from .export import load_model, read_run
    from .fsutil import report_folder
    from .predict import _expand, _read

    check_options(method, "wrong", 1, layer)
    require_captum()
    run, _ = read_run(run)
    files, failures = _expand(paths)
    if len(files) > MAX_FILES:
        raise CifarlabError(f"{len(files)} image files given; explain at most {MAX_FILES} at a time (their grid "
                            "is read image by image)")
    out = Path(out) if out is not None else run / "explain-files"
    pred = load_model(run, device, tta, uncalibrated)
    c, h, w = pred.input_shape
    if method == "gradcam":
        choose_layer(pred.model, pred.input_shape, layer)
    ok, arrays = _read(files, c, (h, w), failures)
    if not arrays:
        raise CifarlabError("no image could be read: nothing to explain")
    with report_folder(out):
        images = np.stack(arrays)
        result = explain_images(pred, images, None, method, layer, sanity, seed, log)
        extra = {"run": str(run), "data": None, "errors": [{"file": f, "error": e} for f, e in failures]}
        return write_explanations(out, result, pred, images, None, [str(p) for p in ok], extra)


def format_report(report: dict[str, Any], out: Path) -> str:
    """The report as a few lines for the terminal."""
    n = len(report["images"])
    how = {"gradcam": f"Grad-CAM at layer {report['layer']} ({'x'.join(map(str, report['layer_map_size'] or []))} "
                      "map, upsampled)",
           "occlusion": f"occlusion ({report['settings'].get('window')}-pixel grey windows)",
           "integrated-gradients": f"integrated gradients ({report['settings'].get('steps')} steps from grey)"}
    what = {"wrong": "most confidently wrong", "right": "most confidently right", "random": "randomly drawn"}
    sel = report.get("select")
    lines = [f"Explained {n} {'test ' if sel else ''}image(s)"
             + (f", the {what[sel]}" + (f" of class {report['class']}" if report.get("class") else "") if sel else "")
             + f", by {how[report['method']]}"]
    for r in report["images"][:10]:
        truth = f"true {r['true']:<12}" if "true" in r else ""
        lines.append(f"  {str(r['image']):<28} {truth}predicted {r['predicted']} ({r['confidence']:.2f})")
    if n > 10:
        lines.append(f"  ... {n - 10} more in explanations.json")
    s = report["sanity_check"]
    if s is None:
        lines.append("Sanity check: not run (--no-sanity-check)")
    elif s["rank_correlation"] is None:
        lines.append(f"Sanity check: undefined (the maps of all {s['undefined']} image(s) are constant)")
    else:
        rc = s["rank_correlation"]
        verdict = ("the maps look much the same with random weights: they show the image's structure more than "
                   "what the model learned; do not read them as its reasons") if s["flagged"] else \
            f"not flagged (below {SANITY_FLAG:g}): the maps depend on the trained weights"
        lines.append(f"Sanity check (random weights): rank correlation with the trained maps mean |rho| "
                     f"{rc['mean_abs']:.2f} (min {rc['min']:.2f}, max {rc['max']:.2f}, {rc['images']} images"
                     + (f", {s['undefined']} undefined" if s["undefined"] else "") + f"): {verdict}")
    for e in report.get("errors") or []:
        lines.append(f"could not read {e['file']}")
    lines.append(f"Report files in {out}")
    return "\n".join(lines)
