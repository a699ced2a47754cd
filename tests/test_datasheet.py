"""cifarlab datasheet: composition, exact copies, colour by class, the colour shortcut, the files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import SHARED_JPEG, make_image_folder

from cifarlab import datasheet as dsh
from cifarlab.cli import main
from cifarlab.data import Dataset, load_dataset


def _ds(x_train, y_train, x_test, y_test, classes=("a", "b", "c"), train_paths=None, test_paths=None) -> Dataset:
    return Dataset(np.asarray(x_train, np.uint8), np.asarray(y_train, np.int64), np.asarray(x_test, np.uint8),
                   np.asarray(y_test, np.int64), list(classes), "memory", "arrays",
                   test_paths=list(test_paths or []), train_paths=list(train_paths or []))


def _random(n, seed, shape=(8, 8, 3)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_image_stats_against_hand_computed_values():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = (255, 0, 0)  # one red pixel: spread 255; three black: 0
    img[0, 1, 1] = (10, 10, 10)  # grey: spread 0
    f = dsh.image_stats(np.concatenate([img, np.full((1, 2, 2, 3), 7, np.uint8)]))
    assert f[0, 0] == pytest.approx(265 / 4) and f[0, 1] == pytest.approx(10 / 4)
    assert f[0, 3] == pytest.approx(np.std([255, 0, 0, 10]))
    assert f[0, 6] == pytest.approx(255 / 4)
    assert f[0, 7] == pytest.approx((0.299 * 255 + 10) / 4, rel=1e-5)
    assert f[1, 6] == 0 and f[1, 7] == pytest.approx(7, rel=1e-5)
    # chunks give the same figures as one pass; one-channel images have no spread
    x = _random(50, 0)
    assert np.allclose(dsh.image_stats(x, chunk=7), dsh.image_stats(x))
    grey = dsh.image_stats(_random(5, 1, (8, 8, 1)))
    assert (grey[:, 6] == 0).all() and np.allclose(grey[:, 0], grey[:, 2])
    with pytest.raises(Exception, match="not \\(N, H, W, 1 or 3\\)"):
        dsh.image_stats(np.zeros((2, 8, 8, 4), np.uint8))


def test_composition_counts_imbalance_and_share_distance():
    ds = _ds(_random(9, 0), [0] * 6 + [1] * 2 + [2], _random(6, 1), [0, 0, 1, 1, 2, 2])
    c = dsh.composition(ds)
    assert [(r["train"], r["test"]) for r in c["classes"]] == [(6, 2), (2, 2), (1, 2)]
    assert c["imbalance_ratio"] == 6.0
    assert c["class_share_distance"] == pytest.approx(0.5 * (abs(6 / 9 - 1 / 3) + abs(2 / 9 - 1 / 3)
                                                             + abs(1 / 9 - 1 / 3)))
    assert c["absent_from_train"] == [] and c["absent_from_test"] == []
    w = dsh.warnings({"composition": c, "exact_copies": dsh.exact_copies(ds), "colour": {}, "colour_shortcut": None})
    assert any("6.0 times" in s for s in w) and any("class shares" in s for s in w)


def test_exact_copies_within_and_across_splits_and_label_conflicts():
    x_train, x_test = _random(6, 0), _random(4, 1)
    x_train[1] = x_train[0]  # within train, same label
    x_test[0] = x_test[1] = x_train[2]  # across (two test images of one training image), three labels
    x_test[2] = x_test[3]  # within test, same label
    ds = _ds(x_train, [0, 0, 1, 1, 2, 2], x_test, [2, 0, 1, 1],
             train_paths=[f"train/{i}.png" for i in range(6)], test_paths=[f"test/{i}.png" for i in range(4)])
    r = dsh.exact_copies(ds)
    assert r["groups"] == 3 and r["images_in_groups"] == 7
    assert (r["groups_within_train"], r["groups_within_test"], r["groups_across_splits"]) == (1, 2, 1)
    assert r["test_images_copied_from_train"] == 2
    assert r["groups_with_different_labels"] == 1
    assert r["different_labels_shown"] == [{"images": ["train/2.png", "test/0.png", "test/1.png"],
                                            "labels": ["a", "b", "c"]}]
    warned = dsh.warnings({"composition": dsh.composition(ds), "exact_copies": r, "colour": {},
                           "colour_shortcut": None})
    assert any(w.startswith("2 test images are exact copies") for w in warned)
    # an image differing in one value is no copy
    x_test[0, 0, 0, 0] ^= 1
    x_test[1, 0, 0, 0] ^= 2
    again = dsh.exact_copies(_ds(x_train, [0, 0, 1, 1, 2, 2], x_test, [2, 0, 1, 1]))
    assert (again["groups"], again["groups_across_splits"], again["different_labels_shown"]) == (2, 0, [])


def test_grey_images_tied_to_a_class_are_found_and_warned_about():
    rng = np.random.default_rng(0)
    n = 300
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = np.repeat([0, 1, 2], n // 3)
    grey = (y == 0) & (np.arange(n) % 2 == 0)  # half of class a is grey, no other class is
    x[grey] = x[grey][..., :1]
    r = dsh.colour_by_class(dsh.image_stats(x), y, ["a", "b", "c"])
    assert [c["grey_share"] for c in r["classes"]] == [0.5, 0.0, 0.0]
    assert r["grey_depends_on_class"]["p_value"] < dsh.ALPHA
    report = {"composition": dsh.composition(_ds(x, y, x, y)), "exact_copies": {"groups_across_splits": 0,
              "groups_with_different_labels": 0}, "colour": {"train": r}, "colour_shortcut": None}
    assert any("50.0% of the a training images" in w for w in dsh.warnings(report))
    # spread evenly: no dependence found, no warning
    even = np.arange(n) % 2 == 0
    x2 = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    x2[even] = x2[even][..., :1]
    r2 = dsh.colour_by_class(dsh.image_stats(x2), y, ["a", "b", "c"])
    assert r2["grey_depends_on_class"]["p_value"] > 0.5
    report["colour"] = {"train": r2}
    assert not any("grey" in w for w in dsh.warnings(report))


def test_colour_shortcut_finds_classes_told_apart_by_colour_alone():
    rng = np.random.default_rng(0)

    def tinted(n):  # class k's images lean to channel k; their content is noise
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 150, (n, 8, 8, 3))
        x[np.arange(n), :, :, y] += 100
        return x.astype(np.uint8), y

    (xa, ya), (xb, yb) = tinted(300), tinted(150)
    s = dsh.colour_shortcut(dsh.image_stats(xa), ya, dsh.image_stats(xb), yb, ["r", "g", "b"])
    assert s["accuracy"] > 0.95 and s["accuracy_ci"][0] > s["commonest_class_share"]
    # noise of one colour for every class: colour tells nothing, the interval reaches chance
    noise_a, noise_b = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (300, 8, 8, 3),
                                                                                          dtype=np.uint8)
    s2 = dsh.colour_shortcut(dsh.image_stats(noise_a), rng.integers(0, 3, 300), dsh.image_stats(noise_b),
                             rng.integers(0, 3, 300), ["r", "g", "b"])
    assert s2["accuracy_ci"][0] < 0.45


def test_cli_writes_the_report_files_and_groups_that_audit_reads(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", n_train=12, n_test=6)
    out = tmp_path / "sheet"
    assert main(["datasheet", "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "36 training and 18 test images of 3 classes" in printed
    assert sorted(p.name for p in out.iterdir()) == ["DATASHEET.md", "colour_by_class.png", "datasheet.json",
                                                     "groups.csv"]
    r = json.loads((out / "datasheet.json").read_text())
    # the folder's classes are told apart by their colour: the shortcut finds it and says so
    assert r["colour_shortcut"]["accuracy"] == 1.0
    assert any("colour statistics alone predict 100.0%" in w for w in r["warnings"])
    md = (out / "DATASHEET.md").read_text()
    assert "## Questions no measurement answers" in md and "**Consent.**" in md
    assert "Tiny Images" not in md  # nothing said of CIFAR's provenance for other classes
    with open(out / "groups.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "lighting", "colour"] and len(rows) == 19
    ds = load_dataset(data)
    from cifarlab.audit import read_groups

    idx, attrs = read_groups(out / "groups.csv", ds)
    assert sorted(idx) == list(range(18)) and set(attrs["lighting"]) == {"dark", "medium", "bright"}
    # read again from the decoded cache: the same report, and no word of how the data was read
    assert "decoded cache" in " ".join(load_dataset(data).notes)
    assert main(["datasheet", "--data", str(data), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "datasheet.json").read_text()) == r
    assert "decoded cache" not in (tmp_path / "again" / "DATASHEET.md").read_text()


def test_cli_json_and_bad_out(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", mode="L")
    assert main(["datasheet", "--data", str(data), "--out", str(tmp_path / "s"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["channels"] == 1 and r["colour"] == {"train": None, "test": None}
    assert not (tmp_path / "s" / "colour_by_class.png").exists()
    (tmp_path / "file").write_text("x")
    assert main(["datasheet", "--data", str(data), "--out", str(tmp_path / "file")]) == 2
    assert "file" in capsys.readouterr().err


def test_cifar_provenance_is_told_for_cifar_classes():
    from cifarlab.data.cifar import CIFAR10_CLASSES

    x = _random(20, 0)
    y = np.arange(20) % 10
    ds = Dataset(x, y, x[:10], y[:10], list(CIFAR10_CLASSES), "somewhere", "image-folder")
    r, groups = dsh.make_datasheet(ds)
    assert groups[0] == "index" and groups[1] == [str(i) for i in range(10)]
    md = dsh.datasheet_markdown(r)
    assert "80 Million Tiny Images" in md and "withdrawn by its authors in 2020" in md
    assert r["exact_copies"]["groups_across_splits"] == 10  # the test images are training images here
    assert any("exact copies of training images" in w for w in r["warnings"])


@pytest.mark.skipif(not SHARED_JPEG.is_file(), reason=f"the shared JPEG copy of CIFAR-10 is absent ({SHARED_JPEG})")
def test_real_cifar10_grey_airplanes_and_colour_shortcut(real_data_cache):
    r, _ = dsh.make_datasheet(load_dataset(SHARED_JPEG))
    grey = {c["class"]: c["grey_share"] for c in r["colour"]["train"]["classes"]}
    s = r["colour_shortcut"]
    print(f"CIFAR-10 JPEG copy: nearly grey airplane {grey['airplane']:.4f}, frog {grey['frog']:.4f}; colour "
          f"shortcut accuracy {s['accuracy']:.4f}")
    assert r["composition"]["imbalance_ratio"] == 1.0
    assert max(grey, key=grey.get) == "airplane"
    assert r["colour"]["train"]["grey_depends_on_class"]["p_value"] < dsh.ALPHA
    assert 0.15 < s["accuracy"] < 0.5


def test_a_test_set_alone_and_many_classes(tmp_path):
    """A test set without training images (CIFAR-10.1) is described without the shortcut; the
    terminal shows the extremes of many classes, the file every class."""
    import cifarlab

    x = _random(40, 0)
    x[:5] = x[:5][..., :1]  # one image of each of c00 to c04 is grey
    y = np.arange(40) % 30
    classes = [f"c{i:02d}" for i in range(30)]
    ds = _ds(np.zeros((0, 8, 8, 3)), [], x, y, classes)
    r, groups = cifarlab.make_datasheet(ds, out=tmp_path / "sheet")
    assert sorted(p.name for p in (tmp_path / "sheet").iterdir()) == ["DATASHEET.md", "colour_by_class.png",
                                                                     "datasheet.json", "groups.csv"]
    assert r["colour"]["train"] is None and r["colour_shortcut"] is None
    assert r["composition"]["imbalance_ratio"] is None and r["composition"]["absent_from_train"] == classes
    assert any("no training images of c00" in w for w in r["warnings"])
    text = dsh.format_datasheet(r, shown=6)
    table = [ln.split()[0] for ln in text.splitlines() if ln.startswith("c") and "%" in ln]
    assert len(table) == 6 and table[:3] == ["c00", "c01", "c02"]  # the five grey images are c00..c04's
    assert "the 3 classes with most and least" in text
    md = dsh.datasheet_markdown(r)
    assert all(f"| {c} |" in md for c in classes)
    assert len(groups[1]) == 40


def test_an_official_cifar100_archive_gets_the_provenance_and_a_path_key(tmp_path, capsys):
    """An archive in CIFAR-100's official layout (its MD5 not the published one, hence
    --allow-unverified): the provenance paragraph, and groups named by the archive's own names."""
    from conftest import make_official

    path, truth = make_official(tmp_path, "cifar100-python")
    assert main(["datasheet", "--data", str(path), "--allow-unverified", "--out", str(tmp_path / "s")]) == 0
    r = json.loads((tmp_path / "s" / "datasheet.json").read_text())
    assert r["kind"] == "cifar100-python" and len(r["classes"]) == 100
    assert r["composition"]["train_images"] == len(truth["train_y"])
    assert "80 Million Tiny Images" in (tmp_path / "s" / "DATASHEET.md").read_text()
    from cifarlab.audit import read_groups

    ds = load_dataset(path, allow_unverified=True)
    idx, attrs = read_groups(tmp_path / "s" / "groups.csv", ds)  # by the archive's file names
    assert (tmp_path / "s" / "groups.csv").read_text().startswith("path,lighting,colour\n")
    assert sorted(idx) == list(range(len(ds.y_test))) and set(attrs) == {"lighting", "colour"}
    assert "and 80 more" in capsys.readouterr().out  # 100 class sizes: the first 20 on the terminal


def test_classes_that_label_people_are_named():
    assert dsh.people_classes(["baby", "boy", "maple_tree", "snowman", "manta_ray", "young_Man", "WOMEN", "cat"]) \
        == ["baby", "boy", "young_Man", "WOMEN"]
    # class folders named in other languages, with their accents or without, and Unicode letters
    # as letters (a word is not cut at the 'ñ' of 'niños')
    named = ["niños", "Mädchen", "Fußgänger", "visages", "mujer_joven", "caracal", "ñandú", "kind", "pingüino"]
    assert dsh.people_classes(named) == ["niños", "Mädchen", "Fußgänger", "visages", "mujer_joven"]
    x = _random(12, 0)
    y = np.arange(12) % 3
    r, _ = dsh.make_datasheet(_ds(x, y, x[:6], y[:6], classes=("man", "woman", "bicycle")))
    assert r["people_classes"] == ["man", "woman"]
    assert r["warnings"][0].startswith("the classes man, woman label people by how they look")
    assert "do not use such a model to infer anyone's age or gender" in dsh.datasheet_markdown(r)
    r2, _ = dsh.make_datasheet(_ds(x, y, x[:6], y[:6], classes=("cat", "dog", "bicycle")))
    assert r2["people_classes"] == [] and not any("label people" in w for w in r2["warnings"])


def test_a_bar_in_a_class_name_stays_in_its_table_cell():
    x = _random(12, 0)
    y = np.arange(12) % 3
    r, _ = dsh.make_datasheet(_ds(x, y, x[:6], y[:6], classes=("a|b", "c", "d")))
    rows = [ln for ln in dsh.datasheet_markdown(r).splitlines() if ln.startswith("| a")]
    assert rows == ["| a\\|b | 4 | 2 |", "| a\\|b | " + rows[1].split(" | ", 1)[1]] and rows[1].count(" | ") == 4


def test_audit_quotes_the_training_datas_datasheet_in_the_model_card(trained_run, image_folder, tmp_path, capsys):
    sheet = tmp_path / "sheet"
    assert main(["datasheet", "--data", str(image_folder), "--out", str(sheet)]) == 0
    warned = json.loads((sheet / "datasheet.json").read_text())["warnings"]
    assert warned  # the folder's classes are told apart by colour: at least the shortcut's warning
    assert main(["audit", str(trained_run), "--datasheet", str(sheet), "--out", str(tmp_path / "audit")]) == 0
    card = json.loads((tmp_path / "audit" / "model_card.json").read_text())
    assert card["training_data"]["datasheet"]["warnings"] == warned
    md = (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert "- Datasheet (`cifarlab datasheet` of " in md and all(f"  - {w}" in md for w in warned)
    capsys.readouterr()
    # the datasheet of other classes, or a file that is none, is refused before anything is written
    other = tmp_path / "other"
    assert main(["datasheet", "--data", str(make_image_folder(tmp_path / "o", classes=("owl", "emu"))), "--out",
                 str(other)]) == 0
    assert main(["audit", str(trained_run), "--datasheet", str(other), "--out", str(tmp_path / "a2")]) == 2
    assert "describes data of the classes emu, owl" in capsys.readouterr().err and not (tmp_path / "a2").exists()
    assert main(["audit", str(trained_run), "--datasheet", str(trained_run / "config.yaml"), "--out",
                 str(tmp_path / "a3")]) == 2
    assert "cannot read the datasheet" in capsys.readouterr().err and not (tmp_path / "a3").exists()
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert main(["audit", str(trained_run), "--datasheet", str(tmp_path / "x.json")]) == 2
    assert "is not a datasheet written by 'cifarlab datasheet'" in capsys.readouterr().err
