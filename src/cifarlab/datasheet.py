"""A datasheet of a data set: what can be measured of its images and labels before any model
is trained on them, and the questions that only the people who gathered it can answer.

After Gebru et al., "Datasheets for Datasets" (2018/2021). Measured here:

* composition: images per class in each split, how unequal the classes are, and how far the
  test split's class shares are from the training split's;
* exact copies: images whose decoded pixels are identical, within a split and across the two,
  and copies that carry different labels (near-copies, shifted or re-compressed, are
  ``cifarlab duplicates``' job);
* colour and light by class: mean luminance, colourfulness and the share of nearly grey
  images, and whether greyness depends on the class (a chi-squared test): a class photographed
  more often in black and white or at night teaches a model that cue along with the object;
* a colour shortcut: how much of the test labels a linear classifier of eight colour
  statistics per image, fitted on the training images, predicts, against the commonest-class
  rate. A class it recognises well from colour alone (ships on blue water, frogs on green
  leaves) is one a network may also recognise partly from colour.

Classes whose names label people (CIFAR-100's man and woman) are named first: a model of them
sorts people by how they look. Nothing here looks at what the images show; the questions of
motivation, collection, consent and licence are written into ``DATASHEET.md`` for a person to
answer, with the answers of an about file (:mod:`cifarlab.about`) where one is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import CifarlabError

# An image counts as nearly grey where a pixel's strongest and weakest channels differ by less
# than this, on average, in 0-255 levels: grey photographs saved as colour JPEG files differ
# by a level or two from JPEG's colour rounding, and on CIFAR-10 images below 4 looked grey
# while those from 4 up showed colour (a red tail fin, a blue sky).
GREY_SPREAD = 4.0
# largest over smallest class: above it, the remedies of 'Classes of unequal size' (docs/training.md) apply
IMBALANCE = 1.5
SHIFT = 0.05  # total variation distance between the splits' class shares worth a warning
ALPHA = 0.001  # greyness "depends on the class" below this p-value (a large sample makes small ones common)
FEATURES = ("mean red", "mean green", "mean blue", "std red", "std green", "std blue", "colour spread", "luminance")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's convert("L")
# Words that make a class name a label of people (CIFAR-100 has baby, boy, girl, man and woman):
# such classes sort people by how they look, which the model card and the datasheet then say.
PEOPLE_WORDS = frozenset(
    "person persons people human humans man men woman women boy boys girl girls baby babies child children kid kids "
    "toddler toddlers teen teens teenager teenagers adult adults male males female females lady ladies gentleman "
    "gentlemen face faces pedestrian pedestrians "
    # the same in the languages class folders are most often named in after English, written
    # without accents as names are compared (nino for niño); German's 'kind' is left out, as it
    # is an English word of another sense
    "persona personas gente humano humanos hombre hombres mujer mujeres nino ninos nina ninas bebe bebes chico "
    "chicos chica chicas cara caras rostro rostros peaton peatones adulto adultos "  # Spanish
    "personne personnes gens humain humains homme hommes femme femmes enfant enfants garcon garcons fille filles "
    "visage visages pieton pietons adulte adultes "  # French
    "mensch menschen personen leute mann manner frau frauen kinder junge jungen madchen babys gesicht gesichter "
    "fussganger erwachsene "  # German
    "pessoa pessoas homem homens mulher mulheres crianca criancas menino meninos menina meninas rosto rostos "
    "pedestre pedestres "  # Portuguese
    "persone uomo uomini donna donne bambino bambini bambina bambine ragazzo ragazzi ragazza ragazze viso visi "
    "volto volti pedone pedoni".split())  # Italian
# groups of the test images for audit --groups: key column name, its values, attribute columns
Groups = tuple[str, list[str], dict[str, list[str]]]


def image_stats(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Eight colour statistics of each uint8 image of ``x`` (N, H, W, C), float32 (N, 8), in
    0-255 levels: the mean and standard deviation of each channel, the mean spread between a
    pixel's strongest and weakest channels (0 for grey) and the mean luminance. One-channel
    images repeat their channel: their spread is 0."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise CifarlabError(f"images of shape {x.shape} are not (N, H, W, 1 or 3)")
    out = np.empty((len(x), len(FEATURES)), np.float32)
    for s in range(0, len(x), chunk):  # float copies of a chunk at a time: memory stays bounded
        c = x[s:s + chunk]
        if c.shape[-1] == 1:
            c = np.repeat(c, 3, axis=-1)
        f = c.reshape(len(c), -1, 3).astype(np.float32)
        out[s:s + len(c), 0:3] = f.mean(1)
        out[s:s + len(c), 3:6] = f.std(1)
        out[s:s + len(c), 6] = (c.max(-1) - c.min(-1)).reshape(len(c), -1).mean(1)  # uint8: max >= min
        out[s:s + len(c), 7] = (f @ LUMA).mean(1)
    return out


def people_classes(classes: list[str]) -> list[str]:
    """The classes whose names label people: a whole word of the name, in any case and with
    or without accents, is one of :data:`PEOPLE_WORDS` ('woman', 'young_man' and 'niños' are
    such classes, 'snowman' and 'manta_ray' not)."""
    import re
    import unicodedata

    def words(name: str) -> set[str]:
        # accents dropped (ñ to n, ä to a, ß to ss); words split at anything but a letter
        plain = "".join(ch for ch in unicodedata.normalize("NFKD", name.casefold()) if not unicodedata.combining(ch))
        return set(re.split(r"[\W\d_]+", plain))

    return [c for c in classes if PEOPLE_WORDS & words(c)]


def composition(ds) -> dict[str, Any]:
    """Images per class in each split, the largest over the smallest training class, and the
    total variation distance between the two splits' class shares (0: the same shares)."""
    k = len(ds.classes)
    train = np.bincount(ds.y_train, minlength=k)
    test = np.bincount(ds.y_test, minlength=k)
    present = train[train > 0]
    ratio = float(present.max() / present.min()) if len(present) else None
    tvd = (float(0.5 * np.abs(train / train.sum() - test / test.sum()).sum())
           if train.sum() and test.sum() else None)
    return {"train_images": int(train.sum()), "test_images": int(test.sum()),
            "classes": [{"class": c, "train": int(train[i]), "test": int(test[i])} for i, c in enumerate(ds.classes)],
            "imbalance_ratio": ratio, "absent_from_train": [c for i, c in enumerate(ds.classes) if not train[i]],
            "absent_from_test": [c for i, c in enumerate(ds.classes) if not test[i]],
            "class_share_distance": tvd}


def exact_copies(ds, shown: int = 10) -> dict[str, Any]:
    """Groups of images whose decoded pixels are identical: how many lie within the training
    split, within the test split and across them, and the groups whose labels differ (the first
    ``shown`` named by their paths or indices)."""
    x = np.concatenate([ds.x_train, ds.x_test]) if len(ds.x_test) else ds.x_train
    y = np.concatenate([ds.y_train, ds.y_test])
    n_train = len(ds.x_train)

    def name(i: int) -> str:  # its path, else split and index; only the few shown are named
        split, paths, j, n = ("train", ds.train_paths, i, n_train) if i < n_train else \
            ("test", ds.test_paths, i - n_train, len(ds.x_test))
        return paths[j] if len(paths) == n else f"{split} #{j}"
    # each image's bytes as one opaque value, so that np.unique groups identical images exactly
    rows = np.ascontiguousarray(x.reshape(len(x), -1))
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, group, counts = np.unique(keys, return_inverse=True, return_counts=True)
    group = group.ravel()
    copied = np.flatnonzero(counts[group] > 1)  # images with a copy, then sorted into their groups
    copied = copied[np.argsort(group[copied], kind="stable")]
    within_train = within_test = across = test_copied = 0
    conflicts: list[dict[str, Any]] = []
    conflict_groups = 0
    for members in np.split(copied, np.flatnonzero(np.diff(group[copied])) + 1) if len(copied) else []:
        in_train = members < n_train
        within_train += int(in_train.sum() > 1)
        within_test += int((~in_train).sum() > 1)
        if in_train.any() and (~in_train).any():
            across += 1
            test_copied += int((~in_train).sum())
        labels = sorted({ds.classes[int(v)] for v in y[members]})
        if len(labels) > 1:
            conflict_groups += 1
            if len(conflicts) < shown:
                conflicts.append({"images": [name(int(i)) for i in members], "labels": labels})
    return {"groups": int((counts > 1).sum()), "images_in_groups": int(len(copied)),
            "groups_within_train": within_train, "groups_within_test": within_test,
            "groups_across_splits": across, "test_images_copied_from_train": test_copied,
            "groups_with_different_labels": conflict_groups, "different_labels_shown": conflicts}


def colour_by_class(stats: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per class of the images whose :func:`image_stats` are ``stats``: mean luminance, mean
    colour spread and the share of nearly grey images (spread below :data:`GREY_SPREAD`); and
    the chi-squared test of whether greyness depends on the class."""
    from scipy.stats import chi2_contingency

    grey = stats[:, 6] < GREY_SPREAD
    rows = []
    for i, c in enumerate(classes):
        k = y == i
        rows.append({"class": c, "images": int(k.sum()),
                     "luminance": float(stats[k, 7].mean()) if k.any() else None,
                     "colour_spread": float(stats[k, 6].mean()) if k.any() else None,
                     "grey_share": float(grey[k].mean()) if k.any() else None})
    table = np.array([[int((grey & (y == i)).sum()), int((~grey & (y == i)).sum())] for i in range(len(classes))])
    table = table[table.sum(1) > 0]
    test = None
    if len(table) > 1 and table[:, 0].sum() and table[:, 1].sum():  # both kinds present in two classes or more
        r = chi2_contingency(table)
        test = {"chi2": float(r.statistic), "dof": int(r.dof), "p_value": float(r.pvalue)}
    return {"grey_images": int(grey.sum()), "grey_share": float(grey.mean()) if len(grey) else None,
            "classes": rows, "grey_depends_on_class": test}


def colour_shortcut(train_stats: np.ndarray, y_train: np.ndarray, test_stats: np.ndarray, y_test: np.ndarray,
                    classes: list[str]) -> dict[str, Any]:
    """The test accuracy (with its 95% Clopper-Pearson interval) and per-class recall of a
    logistic regression of the eight :func:`image_stats`, standardised, fitted on the training
    images; beside the share of the commonest test class, what always answering it scores."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_stats, y_train)
    pred = clf.predict(test_stats)
    right = int((pred == y_test).sum())
    ci = binomtest(right, len(y_test)).proportion_ci(0.95)
    labels = list(range(len(classes)))
    recall = recall_score(y_test, pred, labels=labels, average=None, zero_division=np.nan)
    present = np.bincount(y_test, minlength=len(classes)) > 0
    return {"features": list(FEATURES), "model": "logistic regression",
            "accuracy": right / len(y_test), "accuracy_ci": [float(ci.low), float(ci.high)],
            "commonest_class_share": float(np.bincount(y_test).max() / len(y_test)),
            "recall": [{"class": c, "recall": float(recall[i]) if present[i] else None}
                       for i, c in enumerate(classes)]}


def image_groups(ds, stats: np.ndarray) -> Groups:
    """Groups of the test images for ``cifarlab audit --groups``, from their :func:`image_stats`
    ``stats``: ``colour`` (nearly grey or in colour; one-channel images have none) and ``lighting``
    (dark, medium, bright: terciles of luminance). Returns the key column ('path' where the
    data names its test images, else 'index'), its values and the attribute columns."""
    if len(ds.test_paths) == len(ds.y_test) and len(set(ds.test_paths)) == len(ds.y_test):
        key, keys = "path", list(ds.test_paths)
    else:
        key, keys = "index", [str(i) for i in range(len(ds.y_test))]
    lum = stats[:, 7]
    lo, hi = np.quantile(lum, [1 / 3, 2 / 3]) if len(lum) else (0.0, 0.0)
    cols = {"lighting": np.where(lum < lo, "dark", np.where(lum < hi, "medium", "bright")).tolist()}
    if ds.image_shape[0] == 3:
        cols["colour"] = np.where(stats[:, 6] < GREY_SPREAD, "nearly grey", "in colour").tolist()
    return key, keys, cols


def make_datasheet(ds, out: str | Path | None = None, log: Callable[[str], None] = lambda _: None,
                   answers: dict[str, str] | None = None) -> tuple[dict[str, Any], Groups]:
    """Everything this module measures of the data set ``ds`` (a :class:`cifarlab.data.Dataset`),
    with the warnings it gives rise to, as one JSON-ready dict; and the :func:`image_groups` of
    its test images. With ``out``, both are written there (:func:`write_datasheet`).
    ``answers``: the owner's answers to :data:`QUESTIONS`, the ``data`` section of
    :func:`cifarlab.about.read_about`, written under them."""
    from .data import content_notes

    report: dict[str, Any] = {"data": str(ds.source), "kind": ds.kind, "test_origin": ds.test_origin,
                              "image_size": list(ds.image_shape[1:]), "channels": ds.image_shape[0],
                              "notes": content_notes(ds.notes),
                              "classes": list(ds.classes), "answers": dict(answers or {})}
    report["composition"] = composition(ds)
    report["people_classes"] = people_classes(ds.classes)
    log("looking for exact copies")
    report["exact_copies"] = exact_copies(ds)
    log(f"colour statistics of {len(ds.x_train) + len(ds.x_test):,} images")
    tr, te = image_stats(ds.x_train), image_stats(ds.x_test)
    colour = ds.image_shape[0] == 3  # one-channel images have no colour to measure
    report["colour"] = {split: colour_by_class(s, y, ds.classes) if colour and len(y) else None
                        for split, s, y in (("train", tr, ds.y_train), ("test", te, ds.y_test))}
    trained = np.unique(ds.y_train)
    if len(trained) > 1 and len(ds.y_test):
        log("fitting the colour shortcut")
        report["colour_shortcut"] = colour_shortcut(tr, ds.y_train, te, ds.y_test, ds.classes)
    else:
        report["colour_shortcut"] = None
    report["warnings"] = warnings(report)
    groups = image_groups(ds, te)
    if out is not None:
        write_datasheet(report, groups, out)
    return report, groups


def people_warning(classes: list[str]) -> str:
    """What the datasheet and the model card say of data whose ``classes`` label people."""
    return (f"the classes {', '.join(classes)} label people by how they look (their apparent age or gender, as "
            "labellers saw it): a model learns to sort people into these boxes, which is often wrong and may not be "
            "how they see themselves. Answer the consent question before training on it, and do not use such a "
            "model to infer anyone's age or gender or to make decisions about people")


def warnings(r: dict[str, Any]) -> list[str]:
    """What in the report ``r`` deserves attention before training on the data."""
    out = []
    if r.get("people_classes"):
        out.append(people_warning(r["people_classes"]))
    comp = r["composition"]
    if comp["absent_from_train"]:
        out.append(f"no training images of {', '.join(comp['absent_from_train'])}: a model cannot learn them")
    if comp["imbalance_ratio"] is not None and comp["imbalance_ratio"] > IMBALANCE:
        out.append(f"the largest training class has {comp['imbalance_ratio']:.1f} times the images of the smallest: "
                   "see 'Classes of unequal size' in cifarlab's docs/training.md (--class-weight, --sampling balanced) "
                   "and read the balanced accuracy, not only the accuracy")
    if comp["class_share_distance"] is not None and comp["class_share_distance"] > SHIFT:
        out.append(f"the class shares of the test split differ from the training split's (total variation "
                   f"{comp['class_share_distance']:.3f}): test accuracy weighs the classes otherwise than training did")
    cp = r["exact_copies"]
    if cp["groups_across_splits"]:
        out.append(f"{cp['test_images_copied_from_train']:,} test images are exact copies of training images: "
                   "their test answers measure memory, not generalisation ('cifarlab duplicates' finds near-copies "
                   "too)")
    if cp["groups_with_different_labels"]:
        out.append(f"{cp['groups_with_different_labels']:,} groups of identical images carry different labels")
    g = (r["colour"].get("train") or {}).get("grey_depends_on_class")
    if g and g["p_value"] < ALPHA:
        rows = [c for c in r["colour"]["train"]["classes"] if c["grey_share"] is not None]
        hi, lo = max(rows, key=lambda c: c["grey_share"]), min(rows, key=lambda c: c["grey_share"])
        out.append(f"nearly grey images are not spread evenly over the classes (chi-squared p = {g['p_value']:.1e}): "
                   f"{hi['grey_share']:.1%} of the {hi['class']} training images against {lo['grey_share']:.1%} of "
                   f"the {lo['class']}; a model may take greyness as a cue for {hi['class']}: see how a run does on "
                   "the nearly grey test images with cifarlab audit RUN --groups on this report's groups.csv")
    s = r["colour_shortcut"]
    if s and s["accuracy_ci"][0] > s["commonest_class_share"]:
        best = max((c for c in s["recall"] if c["recall"] is not None), key=lambda c: c["recall"])
        out.append(f"colour statistics alone predict {s['accuracy']:.1%} of the test labels (95% CI "
                   f"{s['accuracy_ci'][0]:.1%} to {s['accuracy_ci'][1]:.1%}) against {s['commonest_class_share']:.1%} "
                   f"for always answering the commonest class; {best['class']} most ({best['recall']:.1%} "
                   "recalled): part of what a model learns of these classes may be their colours")
    return out


def _shape(r: dict[str, Any]) -> str:
    h, w = r["image_size"]
    return f"{h}x{w} pixels, {r['channels']} channel{'s' if r['channels'] > 1 else ''}"


def format_datasheet(r: dict[str, Any], out: Path | None = None, shown: int = 20) -> str:
    """The report as lines for the terminal; of more than ``shown`` classes, the half with most
    nearly grey images and the half with least."""
    comp = r["composition"]
    lines = [f"{r['data']}: {comp['train_images']:,} training and {comp['test_images']:,} test images of "
             f"{len(r['classes'])} classes, {_shape(r)}"]
    ratio = comp["imbalance_ratio"]
    lines.append("class sizes (train/test): "
                 + ", ".join(f"{c['class']} {c['train']:,}/{c['test']:,}" for c in comp["classes"][:shown])
                 + (f" and {len(comp['classes']) - shown} more" if len(comp["classes"]) > shown else "")
                 + ("" if ratio is None else f"; largest/smallest training class {ratio:.2f}"))
    cp = r["exact_copies"]
    lines.append(f"exact copies: {cp['groups']:,} groups of identical images ({cp['groups_within_train']:,} within "
                 f"train, {cp['groups_within_test']:,} within test, {cp['groups_across_splits']:,} across the splits, "
                 f"{cp['test_images_copied_from_train']:,} test images copied from training images; "
                 f"{cp['groups_with_different_labels']:,} with different labels)")
    col = r["colour"].get("train") or r["colour"].get("test")
    if col:
        rows = [c for c in col["classes"] if c["images"]]
        most = len(rows) > shown  # many classes: the greyest and the most colourful only, DATASHEET.md has all
        if most:
            rows = sorted(rows, key=lambda c: -c["grey_share"])
            rows = rows[:shown // 2] + rows[-(shown // 2):]
        lines.append(f"{'class':<16}{'luminance':>10}{'colour spread':>15}{'nearly grey':>13}")
        for c in rows:
            lines.append(f"{c['class'][:15]:<16}{c['luminance']:>10.1f}{c['colour_spread']:>15.1f}"
                         f"{c['grey_share']:>13.2%}")
        which = "training" if r["colour"].get("train") else "test"
        lines.append(f"({which} images; {f'the {shown // 2} classes with most and least nearly grey; ' if most else ''}"
                     f"0-255 levels; nearly grey: colour spread below {GREY_SPREAD:g})")
    s = r["colour_shortcut"]
    if s:
        lines.append(f"colour shortcut: {s['accuracy']:.2%} test accuracy from colour statistics alone (95% CI "
                     f"{s['accuracy_ci'][0]:.2%} to {s['accuracy_ci'][1]:.2%}; commonest class "
                     f"{s['commonest_class_share']:.2%})")
    lines += [f"warning: {w}" for w in r["warnings"]]
    if out is not None:
        lines.append(f"Report files in {out}: DATASHEET.md lists the questions no measurement answers; groups.csv "
                     "groups the test images by colour and lighting for cifarlab audit --groups")
    return "\n".join(lines)


# Known of the data behind these classes; said only of data whose source or classes are CIFAR's
CIFAR_PROVENANCE = (
    "CIFAR-10 and CIFAR-100 are 32x32 photographs chosen from the 80 Million Tiny Images collection (Torralba, "
    "Fergus and Freeman, 2008), which was gathered by searching the web for English nouns; paid students labelled "
    "them by hand (Krizhevsky, 2009). No consent of the people pictured, or of the owners of what is pictured, is "
    "recorded. The Tiny Images collection was withdrawn by its authors in 2020, after offensive labels and "
    "images were found in it (Birhane and Prabhu, 2021); CIFAR-10 and CIFAR-100 were not withdrawn. Known "
    "faults: some test images are near-copies of training images (Barz and Denzler, 2020; `cifarlab "
    "duplicates`) and some test labels are wrong (Northcutt et al., 2021; `cifarlab label-issues`).")

# Datasheets for Datasets' questions that the pixels cannot answer, in short, by their key in the
# 'data' section of an about file (cifarlab.about)
QUESTIONS = (
    ("motivation", "Motivation", "Why was the data set made, by whom, and who paid for it?"),
    ("collection", "Collection", "How were the images gathered (web searches, cameras, other data sets), when, and "
                                 "where?"),
    ("consent", "Consent", "Do the images show people, their faces, homes or cars? Were those people told, did they "
                           "agree, and can they withdraw?"),
    ("labelling", "Labelling", "Who gave the labels, following which instructions, and were they paid fairly? How "
                               "were disagreements settled?"),
    ("coverage", "Coverage", "Whose world do the images show? Which countries, seasons, kinds of camera and kinds of "
                             "each class are missing or rare?"),
    ("licence", "Licence", "Under what terms may the images be used, shared and changed?"),
    ("uses_to_avoid", "Uses to avoid", "What should the data not be used for (recognising or tracking people, "
                                       "decisions about them)?"),
    ("maintenance", "Maintenance", "Who looks after the data, and how are errors reported and put right?"),
)


def _is_cifar(r: dict[str, Any]) -> bool:
    from .data.cifar import CIFAR10_CLASSES

    return r["kind"].startswith("cifar") or r["classes"] == CIFAR10_CLASSES


def datasheet_markdown(r: dict[str, Any]) -> str:
    """``DATASHEET.md``: the measurements of the report ``r`` and the questions they leave."""
    from . import __version__
    from .fsutil import md_cell

    comp, cp, s = r["composition"], r["exact_copies"], r["colour_shortcut"]
    lines = [f"# Datasheet: {Path(r['data']).name}", "",
             f"Measured by cifarlab {__version__} from `{r['data']}` ({r['kind']}): "
             f"{comp['train_images']:,} training and {comp['test_images']:,} test images of {len(r['classes'])} "
             f"classes, {_shape(r)}; test images: {r['test_origin']}.", ""]
    lines += [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    lines += ["## Composition", "", "| class | training images | test images |", "|---|---:|---:|"]
    lines += [f"| {md_cell(c['class'])} | {c['train']:,} | {c['test']:,} |" for c in comp["classes"]]
    ratio, tvd = comp["imbalance_ratio"], comp["class_share_distance"]
    lines += ["", ("" if ratio is None else f"Largest over smallest training class: {ratio:.2f}. ")
              + ("" if tvd is None else f"Total variation distance between the splits' class shares: {tvd:.3f} "
                                        "(0: the same shares)."), ""]
    lines += ["## Exact copies", "",
              f"{cp['groups']:,} groups of images with identical pixels ({cp['images_in_groups']:,} images): "
              f"{cp['groups_within_train']:,} within the training split, {cp['groups_within_test']:,} within the "
              f"test split, {cp['groups_across_splits']:,} across them ({cp['test_images_copied_from_train']:,} test "
              f"images copied from training images); {cp['groups_with_different_labels']:,} carry different labels. "
              "Near-copies (shifted, re-coloured, re-compressed) are found by `cifarlab duplicates`.", ""]
    lines += [f"- {', '.join(g['images'])}: {', '.join(g['labels'])}" for g in cp["different_labels_shown"]]
    lines += [""] if cp["different_labels_shown"] else []
    tr, te = r["colour"].get("train"), r["colour"].get("test")
    if tr or te:
        lines += ["## Colour and light", "",
                  f"Luminance and colour spread (the mean difference between a pixel's strongest and weakest "
                  f"channel) in 0-255 levels; nearly grey: colour spread below {GREY_SPREAD:g}.", "",
                  "| class | luminance | colour spread | nearly grey (train) | nearly grey (test) |",
                  "|---|---:|---:|---:|---:|"]
        ref = tr or te

        def share(side, i):
            v = side["classes"][i]["grey_share"] if side else None
            return "n/a" if v is None else f"{v:.2%}"

        for i, c in enumerate(ref["classes"]):
            if c["images"]:
                lines.append(f"| {md_cell(c['class'])} | {c['luminance']:.1f} | {c['colour_spread']:.1f} | "
                             f"{share(tr, i)} | {share(te, i)} |")
        g = ref["grey_depends_on_class"]
        if g:
            lines += ["", f"Does greyness depend on the class ({'training' if tr else 'test'} images)? Chi-squared "
                          f"{g['chi2']:.1f} on {g['dof']} degrees of freedom, p = {g['p_value']:.2g}."]
        lines += ["", "![nearly grey images by class](colour_by_class.png)", "",
                  "`groups.csv` groups the test images by colour (nearly grey or in colour) and lighting (dark, "
                  "medium, bright: terciles of luminance); `cifarlab audit RUN --groups groups.csv` gives a "
                  "run's accuracy in each group, with the gap between them.", ""]
    if s:
        lines += ["## Colour shortcut", "",
                  f"A {s['model']} of {len(s['features'])} colour statistics per image ({', '.join(s['features'])}), "
                  f"standardised and fitted on the training images, labels {s['accuracy']:.2%} of the test images "
                  f"correctly (95% CI {s['accuracy_ci'][0]:.2%} to {s['accuracy_ci'][1]:.2%}); always answering the "
                  f"commonest class scores {s['commonest_class_share']:.2%}. Recall by class: "
                  + ", ".join(f"{c['class']} {c['recall']:.1%}" for c in s["recall"] if c["recall"] is not None)
                  + ".", ""]
    lines += ["## Questions no measurement answers", "",
              "From Gebru et al., *Datasheets for Datasets* (2021). Answer them before the data is used for "
              "anything that affects people: in the section `data` of an about file (`cifarlab datasheet "
              "--about-template` prints one), which `--about FILE` writes in here.", ""]
    if _is_cifar(r):
        lines += [f"What is known if these are CIFAR's images: {CIFAR_PROVENANCE}", ""]
    answers = r.get("answers") or {}
    for key, head, q in QUESTIONS:
        lines += [f"**{head}.** {q}", "", answers.get(key, "*Not recorded.*"), ""]
        if key == "labelling" and "label_caveats" in answers:
            lines += [f"Known faults of the labels: {answers['label_caveats']}", ""]
    return "\n".join(lines).rstrip() + "\n"


def read_datasheet(path: str | Path) -> dict[str, Any]:
    """The report that :func:`write_datasheet` wrote, from its folder or its ``datasheet.json``;
    anything else is refused, naming what was found."""
    import json

    path = Path(path)
    file = path / "datasheet.json" if path.is_dir() else path
    try:
        r = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CifarlabError(f"cannot read the datasheet '{file}' ({e}); give the folder that 'cifarlab datasheet' "
                            "wrote, or its datasheet.json") from None
    if not isinstance(r, dict) or not {"data", "classes", "warnings", "composition"} <= set(r):
        raise CifarlabError(f"'{file}' is not a datasheet written by 'cifarlab datasheet' (it lacks data, classes, "
                            "warnings or composition)")
    return r


def write_datasheet(r: dict[str, Any], groups: Groups, out: str | Path) -> Path:
    """``datasheet.json``, ``DATASHEET.md``, ``colour_by_class.png`` (where the images have
    colour) and ``groups.csv`` (the :func:`image_groups` ``groups``, for ``cifarlab audit
    --groups``) of the report ``r`` into the folder ``out``, each written whole or not at all."""
    import csv
    import io

    from .fsutil import report_folder, write_json, write_text
    from .plots import plot_colour_by_class

    key, keys, cols = groups
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([key, *cols])
    w.writerows(zip(keys, *cols.values()))
    with report_folder(out) as folder:
        write_json(folder / "datasheet.json", r)
        if keys:
            write_text(folder / "groups.csv", buf.getvalue())
        splits = {name: [c["grey_share"] for c in side["classes"]] for name, side in r["colour"].items() if side}
        if splits:
            shortcut = [c["recall"] for c in r["colour_shortcut"]["recall"]] if r["colour_shortcut"] else None
            plot_colour_by_class(r["classes"], splits, shortcut, folder / "colour_by_class.png")
        write_text(folder / "DATASHEET.md", datasheet_markdown(r))
    return Path(out)
