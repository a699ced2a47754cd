"""``cifarlab robustness``: accuracy under corruptions, the published files' layout, the reports."""

from __future__ import annotations

import json
import pickle
import re
import tarfile

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.corruptions import corrupt
from cifarlab.data import load_dataset
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import evaluate_run
from cifarlab.robustness import PUBLISHED_BENCHMARK, choose_corruptions, format_report, robustness_run, \
    robustness_runs

from conftest import tiny_config


def _published(folder, ds, names=("contrast", "fog"), seed=0):
    """A CIFAR-10-C layout of ``ds``'s test images: NAME.npy with the five severities one after
    another, labels.npy likewise."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        np.save(folder / f"{name}.npy", np.concatenate([corrupt(ds.x_test, name, s, seed) for s in range(1, 6)]))
    np.save(folder / "labels.npy", np.tile(ds.y_test, 5).astype(np.uint8))
    return folder


def test_a_run_is_measured_on_each_corruption_and_severity(trained_run, image_folder):
    ds = load_dataset(str(image_folder))
    r = robustness_run(trained_run, ds, severities="1,5", log=lambda _: None, device="cpu")
    out = trained_run / "robustness"
    for f in ("robustness.json", "robustness.csv", "robustness.png", "examples.png"):
        assert (out / f).is_file()
    assert json.loads((out / "robustness.json").read_text())["mean_accuracy"] == pytest.approx(r["mean_accuracy"])
    assert len(r["cells"]) == 11 * 2 and r["severities"] == [1, 5]
    assert [c["name"] for c in r["corruptions"]] == choose_corruptions(None)
    acc = [c["accuracy"] for c in r["cells"]]
    assert r["mean_accuracy"] == pytest.approx(np.mean(acc))
    assert r["relative_accuracy"] == pytest.approx(r["mean_accuracy"] / r["clean"]["accuracy"])
    assert r["worst"]["accuracy"] == min(acc)
    # the clean figures are the run's own, as evaluate reports them
    ev = evaluate_run(trained_run, ds, trained_run / "eval", device="cpu")
    assert r["clean"]["accuracy"] == pytest.approx(ev["accuracy"])
    assert r["clean"]["ece"] == pytest.approx(ev["calibration"]["ece"])
    assert r["images_per_cell"] == len(ds.y_test) and r["source"] == {"kind": "generated", "seed": 0}
    lines = (out / "robustness.csv").read_text().splitlines()
    assert lines[0].startswith("corruption,severity,accuracy,ece") and len(lines) == 23


def test_the_published_files_give_what_the_same_corruption_made_here_gives(trained_run, image_folder, tmp_path):
    ds = load_dataset(str(image_folder))
    folder = _published(tmp_path / "CIFAR-10-C", ds)
    made = robustness_run(trained_run, ds, tmp_path / "made", corruptions="contrast", log=lambda _: None,
                          device="cpu")
    read = robustness_run(trained_run, ds, tmp_path / "read", corruptions="contrast", corrupted_data=folder,
                          log=lambda _: None, device="cpu")
    # contrast draws nothing at random, so the files hold the very images made here
    assert [c["accuracy"] for c in read["cells"]] == [c["accuracy"] for c in made["cells"]]
    assert read["source"]["kind"] == "published" and read["source"]["same_images_as_test_split"]
    # a subset: the same images drawn from the files as from the test split, clean and corrupted
    sub_made, sub_read = (robustness_run(trained_run, ds, tmp_path / f"sub{k}", corruptions="contrast",
                                         images=5, corrupted_data=folder if k else None, log=lambda _: None,
                                         device="cpu") for k in range(2))
    assert [c["accuracy"] for c in sub_read["cells"]] == [c["accuracy"] for c in sub_made["cells"]]
    assert sub_read["clean"] == sub_made["clean"] and sub_read["images_per_cell"] == 5
    assert f"the published files in {folder}" in format_report(sub_read)
    # as the .tar it is published in, members under CIFAR-10-C/
    tar = tmp_path / "CIFAR-10-C.tar"
    with tarfile.open(tar, "w") as t:
        t.add(folder, arcname="CIFAR-10-C")
    from_tar = robustness_run(trained_run, ds, tmp_path / "tar", corruptions="contrast,fog", corrupted_data=tar,
                              log=lambda _: None, device="cpu")
    assert [c["accuracy"] for c in from_tar["cells"][:5]] == [c["accuracy"] for c in made["cells"]]
    assert [c["name"] for c in from_tar["corruptions"]] == ["contrast", "fog"]
    # files of other images (here: their labels in another order): the clean figures are the
    # whole test split's, and the report says the images differ
    np.save(folder / "labels.npy", np.roll(np.tile(ds.y_test, 5), 1))
    other = robustness_run(trained_run, ds, tmp_path / "other", corruptions="contrast", images=5,
                           corrupted_data=folder, log=lambda _: None, device="cpu")
    assert not other["source"]["same_images_as_test_split"]
    assert other["clean"] == robustness_run(trained_run, ds, tmp_path / "all", corruptions="contrast",
                                            log=lambda _: None, device="cpu")["clean"]
    assert "(not the same images as the clean test split)" in format_report(other)


def _refused(run, ds, folder, match, **kw):
    with pytest.raises(CifarlabError, match=match):
        robustness_run(run, ds, folder.parent / "out", corrupted_data=folder, log=lambda _: None, device="cpu", **kw)
    assert not (folder.parent / "out").exists()  # no half-written report


def test_damaged_published_files_are_refused_by_name(trained_run, image_folder, tmp_path):
    ds = load_dataset(str(image_folder))
    folder = _published(tmp_path / "c", ds, names=("contrast",))
    # by default, the benchmark's fifteen: the missing ones are named
    _refused(trained_run, ds, folder, "has no file for gaussian_noise, shot_noise")
    np.save(folder / "labels.npy", np.tile(ds.y_test, 5)[:-1])
    _refused(trained_run, ds, folder, r"labels.npy has shape \(44,\); expected one label per image",
             corruptions="contrast")
    np.save(folder / "labels.npy", np.tile(ds.y_test + 7, 5))
    _refused(trained_run, ds, folder, "labels 7 to 9; the model has 3 classes", corruptions="contrast")
    np.save(folder / "labels.npy", np.array(["cat", "dog", "frog"])[np.tile(ds.y_test, 5)])  # names, not numbers
    _refused(trained_run, ds, folder, "labels.npy holds <U4 values; expected whole-number class labels",
             corruptions="contrast")
    with open(folder / "labels.npy", "wb") as f:  # np.savez's zip of arrays, under an .npy name
        np.savez(f, labels=np.tile(ds.y_test, 5))
    _refused(trained_run, ds, folder, r"labels.npy is an .npz archive of arrays \(labels\); expected one array",
             corruptions="contrast")
    np.save(folder / "labels.npy", np.tile(ds.y_test, 5))
    np.save(folder / "contrast.npy", np.zeros((45, 16, 16, 3), np.uint8))
    _refused(trained_run, ds, folder, r"contrast.npy holds uint8 images of shape \(45, 16, 16, 3\); expected uint8 "
                                      r"\(45, 32, 32, 3\)", corruptions="contrast")
    # a pickle in an .npy file is never unpickled
    with open(folder / "contrast.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused(trained_run, ds, folder, "cannot read .*contrast.npy as a numpy array", corruptions="contrast")
    (folder / "labels.npy").unlink()
    _refused(trained_run, ds, folder, "has no labels.npy", corruptions="contrast")
    _refused(trained_run, ds, tmp_path / "nowhere", "does not exist", corruptions="contrast")
    with pytest.raises(CifarlabError, match="unknown corruption 'snow'; valid: gaussian_noise"):
        robustness_run(trained_run, ds, corruptions="snow", log=lambda _: None)  # not generated here


def test_a_pickled_labels_file_is_not_loaded(trained_run, image_folder, tmp_path):
    ds = load_dataset(str(image_folder))
    folder = _published(tmp_path / "c", ds, names=("contrast",))
    (folder / "labels.npy").write_bytes(pickle.dumps(np.tile(ds.y_test, 5)))  # not the .npy format
    _refused(trained_run, ds, folder, "cannot read .*labels.npy as a numpy array", corruptions="contrast")


def test_only_one_cells_images_are_kept_at_a_time(trained_run, image_folder, tmp_path, monkeypatch):
    import weakref

    import cifarlab.robustness as rob

    made = []

    def recorded(*args, **kw):
        x = corrupt(*args, **kw)
        made.append(weakref.ref(x))
        return x

    alive = []
    monkeypatch.setattr(rob, "corrupt", recorded)
    ds = load_dataset(str(image_folder))
    # the log line of each cell comes after its predictions; the cells before it must be gone by then
    robustness_run(trained_run, ds, tmp_path / "o", corruptions="contrast,fog", severities="1,2,3",
                   log=lambda _: alive.append(sum(r() is not None for r in made[:-1])), device="cpu")
    assert len(made) == 6 and alive == [0] * 6


def test_a_subset_of_the_test_images_is_drawn_once_for_every_cell(trained_run, image_folder, tmp_path):
    ds = load_dataset(str(image_folder))
    r = robustness_run(trained_run, ds, tmp_path / "o", corruptions="contrast,pixelate", severities=[2],
                       images=4, log=lambda _: None, device="cpu")
    assert r["images_per_cell"] == 4 and len(r["cells"]) == 2
    # a subset larger than the test split is the whole split
    r = robustness_run(trained_run, ds, tmp_path / "o2", corruptions="contrast", severities=[2], images=1000,
                       log=lambda _: None, device="cpu")
    assert r["images_per_cell"] == len(ds.y_test)


def test_the_runs_of_a_set_are_measured_on_the_same_images(tmp_path, image_folder, capsys):
    from cifarlab.train import fit

    fit(tiny_config(str(image_folder), str(tmp_path / "set"), runs=2), log=lambda s: None)
    ds = load_dataset(str(image_folder))
    s = robustness_runs(tmp_path / "set", ds, corruptions="fog,contrast", severities="3", log=lambda _: None,
                        device="cpu")
    assert s["runs"] == 2 and (tmp_path / "set" / "robustness_summary.json").is_file()
    each = [json.loads((tmp_path / "set" / f"run-{k}" / "robustness" / "robustness.json").read_text())
            for k in range(2)]
    assert s["mean_accuracy"]["min"] == min(r["mean_accuracy"] for r in each)
    assert [c["name"] for c in s["corruptions"]] == ["fog", "contrast"]
    # their ensemble on the same images, from the runs' probabilities: what predict serves for the folder
    from cifarlab.corruptions import PUBLISHED
    from cifarlab.export import load_ensemble

    e, ens = s["ensemble"], load_ensemble(tmp_path / "set")
    assert e["ensemble_of"] == [str(tmp_path / "set" / f"run-{k}") for k in range(2)] and len(e["weights_sha256"]) == 2
    assert e["clean"]["accuracy"] == pytest.approx(float((ens.predict(ds.x_test).argmax(1) == ds.y_test).mean()))
    fog = corrupt(ds.x_test, "fog", 3, seed=PUBLISHED.index("fog") * 10 + 3)  # the cell's own seed, for seed 0
    assert e["cells"][0]["corruption"] == "fog"
    assert e["cells"][0]["accuracy"] == pytest.approx(float((ens.predict(fog).argmax(1) == ds.y_test).mean()))
    assert e["mean_accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in e["cells"]]))
    # the audit of the set quotes the spread; audited with another test-time augmentation, it says why not
    from cifarlab.audit import audit_runs

    audit_runs(tmp_path / "set", ds, n_boot=100, device="cpu", log=lambda _: None)
    md = (tmp_path / "set" / "audit_summary.md").read_text()
    assert "Under common corruptions (`cifarlab robustness`: 2 corruptions at severities 3" in md
    assert f"accuracy {s['mean_accuracy']['mean']:.3f} ({s['mean_accuracy']['min']:.3f} to" in md
    audit_runs(tmp_path / "set", ds, n_boot=100, device="cpu", log=lambda _: None, tta="flip")
    md = (tmp_path / "set" / "audit_summary.md").read_text()
    assert "not quoted; measured under corruption with test-time augmentation none, audited with flip" in md
    # a run calibrated since: its calibration error under corruption is no longer what was measured
    from cifarlab.calibrate import calibrate_run

    calibrate_run(tmp_path / "set" / "run-1", ds, device="cpu", log=lambda _: None)
    audit_runs(tmp_path / "set", ds, n_boot=100, device="cpu", log=lambda _: None)
    md = (tmp_path / "set" / "audit_summary.md").read_text()
    assert "Under common corruptions: not quoted; " in md and "run-1 measured under corruption with another" in md
    assert "run-0 measured" not in md
    audit_runs(tmp_path / "set", ds, n_boot=100, device="cpu", log=lambda _: None, uncalibrated=True)
    assert "Under common corruptions (`cifarlab robustness`" in (tmp_path / "set" / "audit_summary.md").read_text()
    assert main(["robustness", str(tmp_path / "set"), "--data", str(image_folder), "--corruptions", "fog",
                 "--severities", "3", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    printed, progress = capsys.readouterr()
    assert "2 runs: clean accuracy mean" in printed and str(tmp_path / "o" / "robustness_summary.json") in printed
    assert re.search(r"\[1/1\] fog 3: accuracy [\d.]+, [\d.]+; their ensemble [\d.]+", progress), progress
    assert "their ensemble (probabilities: the mean of the runs'): clean accuracy" in printed
    assert (tmp_path / "o" / "run-1" / "robustness.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--severities", "0"], "severity '0' is not valid"),
    (["--severities", "2,2"], "severity '2' is not valid; give each of 1 to 5 at most once"),
    (["--corruptions", "fog,snow"], "unknown corruption 'snow'"),
    (["--corruptions", "fog,gausian_noise"], "unknown corruption 'gausian_noise' (did you mean 'gaussian_noise'?)"),
    (["--corruptions", "fog,fog"], "give each one once"),
    (["--images", "0"], "--images 0 must be a positive whole number"),
    (["--seed", "-1"], "--seed -1 must be a whole number, 0 or more"),
])
def test_bad_options_are_refused_before_the_data_is_read(trained_run, capsys, argv, message):
    # --data names nothing: the options are checked first
    assert main(["robustness", str(trained_run), "--data", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_command_prints_the_table_and_the_audit_card_quotes_it(trained_run, image_folder, capsys):
    ds = load_dataset(str(image_folder))
    assert main(["robustness"]) == 2 and "needs a run folder" in capsys.readouterr().err
    assert main(["robustness", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "glass_blur" in listed and "(held out)" in listed and "motion_blur" in listed
    assert main(["robustness", str(trained_run), "--data", str(image_folder), "--severities", "1,3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gaussian_noise" in out and "clean accuracy" in out and "expected calibration error" in out
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Under common corruptions (`cifarlab robustness`: 11 corruptions at severities 1, 3" in card
    assert json.loads((trained_run / "audit" / "model_card.json").read_text())["metrics"]["robustness"][
        "severities"] == [1, 3]
    # audited without the calibration it was measured with, or with another test-time
    # augmentation, the report is not the model audited: left out, and the caveat says how to
    # measure it
    from cifarlab.calibrate import calibrate_run

    calibrate_run(trained_run, ds, device="cpu", log=lambda _: None)
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu"]) == 0
    assert "Under common corruptions" not in (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu", "--uncalibrated"]) == 0
    assert "Under common corruptions" in (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--device", "cpu", "--tta", "flip"]) == 0
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Under common corruptions" not in card and "`cifarlab robustness` measures how much lower" in card


def test_the_default_published_set_is_the_benchmarks_fifteen():
    assert choose_corruptions(None, published=True) == list(PUBLISHED_BENCHMARK)
    assert len(PUBLISHED_BENCHMARK) == 15
    assert "saturate" in choose_corruptions("all") and "saturate" not in choose_corruptions(None)
