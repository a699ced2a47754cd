"""The command line as a user meets it: help, clear one-paragraph errors, exit codes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "evaluate", "predict", "audit", "augment", "summary", "list"):
        assert cmd in out
    code, out, _ = run(capsys, "list")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert code == 0 and lines["keras-deep"].split()[1:3] == ["2,168,362", "4x4"]
    assert lines["keras-shallow"].split()[1:3] == ["4,200,842", "2x2"]  # counted on the model, as the README says
    assert "keras-deep, rmsprop (constant lr), batch 128, 20 epochs, augment none, validation 0.2, tta none, " \
        "precision fp32" in lines["keras-book"]  # the notebook's arithmetic
    assert all("precision auto" in lines[r] for r in ("fast", "fast-muon", "best", "best-select"))
    assert "speednet, sgd (triangle lr), batch 1024, 10 epochs" in lines["fast"]
    assert "augment keras" in lines["keras-book-augmented"] and "cutout 12" in lines["best"]
    assert "hardest 0.5 of each batch" in lines["best-select"] and "hardest" not in lines["best"]
    assert "augmentation policies (--auto-augment): none, trivialaugment, randaugment" in out
    assert ("optimizers (--optimizer), with the optim keys each reads besides lr, weight_decay and clipping: "
            "rmsprop (rho, eps, momentum, centered); sgd (momentum, nesterov); adam (beta1, beta2, eps); ") in out


def test_data_help_says_what_each_command_takes_when_it_is_left_out():
    """--data left out: train downloads; the commands that take a run read the run's own data."""
    from cifarlab.cli import _parser

    subs = next(a for a in _parser()._actions if a.dest == "command").choices
    helps = {name: " ".join(next(a.help for a in subs[name]._actions if a.dest == "data").split())
             for name in ("train", "evaluate", "audit", "robustness", "compare", "calibrate", "duplicates")}
    assert helps["train"].endswith("omitted: download --dataset")
    for name in ("evaluate", "audit", "robustness", "compare"):
        assert "other data on every image the run did not train or validate on" in helps[name], name
        assert helps[name].endswith("omitted: the run's own, as its config.yaml names it"), name
    assert helps["calibrate"].endswith("omitted: the run's own, as its config.yaml names it")
    assert helps["duplicates"].endswith("or without a run, download --dataset")


def test_every_option_says_what_it_does():
    """``COMMAND --help`` explains every argument: none is listed with its name alone."""
    import argparse

    from cifarlab.cli import _parser

    bare = []
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bare += [f"{name} {'/'.join(a.option_strings) or a.dest}" for a in sub._actions
                         if not a.help and not isinstance(a, argparse._HelpAction)]
    assert bare == []


def test_summary(capsys):
    code, out, _ = run(capsys, "summary", "--model", "keras-deep")
    assert code == 0 and "Total params: 2,168,362" in out
    code, out, _ = run(capsys, "summary", "--model", "keras-shallow", "--input", "28,28,1")
    assert code == 0 and "(None, 28, 28, 32)" in out
    code, same, _ = run(capsys, "summary", "keras-deep")  # the name without --model, as 'cifarlab list' shows it
    assert code == 0 and "Total params: 2,168,362" in same


def test_summary_of_a_run_has_its_classes_and_image_size(capsys, tmp_path):
    from conftest import random_run

    run_dir = random_run(tmp_path, "keras-shallow", {"scale": 1 / 255})  # 4 classes
    code, out, _ = run(capsys, "summary", str(run_dir))
    assert code == 0 and "(None, 4)" in out and "(None, 32, 32, 32)" in out
    # Those of another model size are refused, not silently replaced by the run's own.
    code, _, err = run(capsys, "summary", str(run_dir), "--input", "28,28,1")
    assert code == 2 and "--num-classes and --input are for a model name" in err


@pytest.mark.parametrize("args,msg", [
    (["train", "--model", "lenet"], "--model 'lenet' is not a registered model; valid: keras-deep, keras-shallow"),
    (["train", "--recipe", "warp"], "unknown recipe 'warp'; valid recipes: keras-book"),
    # a typo is named with what it was probably meant to be
    (["train", "--model", "keras-dep"], "--model 'keras-dep' is not a registered model (did you mean 'keras-deep'?); "
                                        "valid: keras-deep"),
    (["train", "--recipe", "fats"], "unknown recipe 'fats' (did you mean 'fast'?); valid recipes"),
    (["train", "--augment", "kera"], "augmentation preset 'kera' is not valid (did you mean 'keras'?); choose one of"),
    (["train", "--optimizer", "lion"], "optimizer = 'lion' is not valid; valid optimizers: rmsprop, sgd, adam"),
    (["train", "--optimizer", "adma"], "optimizer = 'adma' is not valid (did you mean 'adam'?); valid optimizers"),
    (["train", "--lr", "-1"], "learning rate (optim.lr) = -1.0 is not valid"),
    (["train", "--epochs", "0"], "epochs = 0 is not valid"),
    (["train", "--seed", "-1"], "seed = -1 is not valid; with 1 run(s) it must lie in [0, 4294967295]"),
    (["train", "--val-split", "1.2"], "it must lie in [0, 1); 0 trains on every training image"),
    (["train", "--augment", "wild"], "augmentation preset 'wild' is not valid"),
    (["train", "--recipe", "fast", "--early-stopping", "3"], "train.early_stopping = 3 is not valid; it watches "
                                                            "val_loss, so it needs validation images"),
    (["train", "--data", "/no/such/data"], "--data '/no/such/data' does not exist"),
    (["train", "--config", "/no/such.yaml"], "cannot read config file"),
    (["train", "--recipe", "fast", "--cuda-graph"], "train.cuda_graph = True is not valid; a CUDA graph bakes in"),
    (["train", "--resume", "/no/run", "--lr", "0.1"], "only --epochs may be given with it"),
    (["train", "--resume", "/no/run", "--recipe", "fast"], "only --epochs may be given with it"),
    (["train", "--device", "gpu"], "device = 'gpu' is not valid; choose auto, cpu, cuda or cuda:N"),
    (["train", "--device", "cuda:first"], "device = 'cuda:first' is not valid; choose auto, cpu, cuda or cuda:N"),
    (["evaluate", "/no/run"], "run folder '/no/run' does not exist"),
    (["compare", "runs/a", "runs/../runs/a/"], "'runs/a' and 'runs/../runs/a/' are the same folder; give two runs"),
    (["summary", "--model", "x"], "not a registered model"),
    (["summary", "keras-dep"], "'keras-dep' is neither a registered model (did you mean 'keras-deep'?) nor a run"),
    (["summary"], "give a registered model name or a run folder, such as 'cifarlab summary keras-deep'"),
    (["summary", "keras-deep", "--model", "keras-shallow"], "give the model once"),
    (["summary", "--model", "keras-deep", "--num-classes", "0"], "num_classes=0 is not valid"),
    (["summary", "--model", "keras-deep", "--input", "3,3,3"], "needs a height and width of at least 4 pixels"),
    (["augment", "--limit", "0", "--out", "x.npz"], "--limit 0 is not valid; it must be at least 1"),
    (["augment", "--previews", "-1", "--preview-dir", "p"], "--previews -1 is not valid"),
    (["augment", "--preview-dir", "p", "--save-prefix", "../x"], "--save-prefix '../x' is not valid: it starts"),
    (["audit", "/no/run", "--min-group", "0"], "--min-group 0 is not valid"),
])
def test_errors_are_one_paragraph_without_traceback(capsys, args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a train without --out makes runs/ in the working folder
    code, out, err = run(capsys, *args)
    assert code == 2
    assert msg in err and "Traceback" not in err
    assert err.startswith("cifarlab: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("args, usage, msg", [
    (["train", "--epoch", "3", "--lr=0.1"], "usage: cifarlab train ",
     "cifarlab train: error: unrecognized arguments: --epoch 3 (--epoch: did you mean --epochs?)"),
    (["predict", "run", "a.png", "--top-k=5"], "usage: cifarlab predict ",
     "cifarlab predict: error: unrecognized arguments: --top-k=5 (--top-k: did you mean --top?)"),
    (["list", "extra"], "usage: cifarlab list ", "cifarlab list: error: unrecognized arguments: extra\n"),
    (["evaluate", "run", "--subset", "100"], "usage: cifarlab evaluate ",  # every test image is evaluated
     "cifarlab evaluate: error: unrecognized arguments: --subset 100\n"),  # and no far-fetched hint
    (["--bogus"], "usage: cifarlab [-h]", "cifarlab: error: unrecognized arguments: --bogus\n"),
])
def test_unknown_option_gives_its_commands_usage_and_the_closest_option(capsys, args, usage, msg):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and msg in err


def test_download_offline_message(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a train without --out makes runs/ in the working folder
    code, _, err = run(capsys, "train", "--epochs", "1")
    assert code == 2 and "could not download http://127.0.0.1:9/cifar-10-python.tar.gz" in err
    assert "--data" in err and "Traceback" not in err


def test_train_evaluate_predict_end_to_end(capsys, tmp_path, image_folder, monkeypatch):
    out = tmp_path / "run"
    code, o, e = run(capsys, "train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1",
                     "--batch-size", "8", "--out", str(out), "--threads", "1")
    assert code == 0, e
    assert "Test score:" in o and "Test accuracy:" in o and "Epoch 1/1" in o
    assert "\ntesting on 9 images\nTest score:" in o  # said before the test, which can take minutes
    code, o, _ = run(capsys, "evaluate", str(out), "--json")
    rep = json.loads(o, parse_constant=lambda c: pytest.fail(f"--json printed {c}, which is not JSON"))
    assert None in rep["calibration"]["bin_accuracy"]  # 15 bins, 9 test images: empty bins are null
    assert code == 0 and set(rep) >= {"loss", "accuracy", "per_class", "confusion_matrix", "calibration"}
    code, o, _ = run(capsys, "evaluate", str(out), "--tta")
    assert code == 0 and o.startswith("Test score: ") and "Test-time augmentation: flip\n" in o
    code, o, _ = run(capsys, "evaluate", str(out))
    assert code == 0 and "Test-time augmentation: none\n" in o  # the run's own: trained without
    assert "Balanced accuracy" not in o  # 3 test images per class: it is the accuracy
    frog = sorted((image_folder / "test" / "frog").iterdir())
    frog[0].rename(tmp_path / "aside.png")
    try:  # 3, 3 and 2 test images: the mean per-class recall differs from the accuracy
        code, o, _ = run(capsys, "evaluate", str(out), "--data", str(image_folder), "--out", str(tmp_path / "uneq"))
        report = json.loads((tmp_path / "uneq" / "metrics.json").read_text())
        recalls = [c["recall"] for c in report["per_class"]]
        assert code == 0 and f"Balanced accuracy (mean per-class recall): {sum(recalls) / 3:.4f}\n" in o
    finally:
        (tmp_path / "aside.png").rename(frog[0])
    import cifarlab.evaluate

    # Every image given to one class: the others' precision is undefined, printed as n/a.
    with monkeypatch.context() as m:
        m.setattr(cifarlab.evaluate, "probabilities_and_raw",
                  lambda pred, x: (np.tile(np.float32([1, 0, 0]), (len(x), 1)), None))
        code, o, _ = run(capsys, "evaluate", str(out), "--out", str(tmp_path / "one-class"))
    rows = [line.split() for line in o.splitlines() if line.split()[:1] and line.split()[0] in ("cat", "dog")]
    assert code == 0 and len(rows) == 2 and rows[1][2] == "n/a" and rows[0][2] != "n/a", o

    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30, 4), 120, np.uint8), "RGBA").save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    code, o, e = run(capsys, "predict", str(out), str(good), str(tmp_path / "bad.jpg"), "--json")
    res = json.loads(o)
    assert code == 1 and len(res["predictions"]) == 1 and len(res["predictions"][0]["top"]) == 3
    assert res["errors"][0]["file"].endswith("bad.jpg") and "bad.jpg: not an image file" in e
    code, o, _ = run(capsys, "predict", str(out), str(good), "--tta", "flip-translate", "--csv", "--top", "2")
    assert code == 0 and o.splitlines()[0] == "file,rank,class,probability" and len(o.splitlines()) == 3
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, o, e = run(capsys, "predict", str(out), str(tmp_path / "empty"), str(good), "--json")
    res = json.loads(o)
    assert code == 1 and len(res["predictions"]) == 1 and res["errors"][0]["file"] == str(tmp_path / "empty")
    assert "empty: folder holds no image files (.jpg, .jpeg, .png" in e
    # The summary counts the folder as a folder, not as a file that could not be read.
    assert "1 folder(s) held no image files" in e and "could not be read" not in e, e

    code, o, e = run(capsys, "audit", str(out), "--bootstrap", "100")
    assert code == 0, e
    assert (out / "audit" / "MODEL_CARD.md").is_file()


def test_an_output_folder_that_cannot_be_made_is_one_line_naming_it(capsys, tmp_path, trained_run, monkeypatch):
    from cifarlab import cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (["augment", "--preview-dir", str(blocker), "--previews", "1"],
                 ["evaluate", str(trained_run), "--out", str(blocker / "eval")],
                 ["audit", str(trained_run), "--out", str(blocker / "audit" / "deeper")],
                 ["evaluate", str(trained_run), "--out", str(blocker)]):
        code, _, err = run(capsys, *args)
        errors = [line for line in err.splitlines() if not line.startswith("data: ")]  # the loader's notes
        assert code == 2 and "Traceback" not in err and len(errors) == 1 and errors[0].startswith("cifarlab: error:"), err
        assert f"'{blocker}" in err and ("Not a directory" in err or "is a file" in err), err
        # evaluate and audit refuse it before loading any data
        monkeypatch.setattr(cli, "_load_eval_data", lambda *a: pytest.fail("data loaded for an unusable --out"))


def test_a_bad_groups_file_fails_before_the_data_is_loaded(capsys, tmp_path, trained_run, monkeypatch):
    import shutil

    from cifarlab import cli

    monkeypatch.setattr(cli, "_load_eval_data", lambda *a: pytest.fail("data loaded for an unusable --groups"))
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    (tmp_path / "one.csv").write_text("index,lighting\n0\n")
    (tmp_path / "key.csv").write_text("file,lighting\n0,dark\n")
    for groups, says in ((tmp_path / "missing.csv", "cannot read groups file"),
                         (tmp_path / "one.csv", "line 2: 1 fields, header has 2"),
                         (tmp_path / "key.csv", "first column is 'file'; it must be 'index' or 'path'")):
        for args in (["audit", str(trained_run)], ["compare", str(trained_run), str(other)],
                     ["export", str(trained_run), "--int8", "--out", str(tmp_path / "m.onnx")]):
            code, _, err = run(capsys, *args, "--groups", str(groups))
            assert code == 2 and "Traceback" not in err and says in err and str(groups) in err, (args, err)


def test_evaluate_prints_the_data_notes_on_stderr(capsys, trained_run):
    code, out, err = run(capsys, "evaluate", str(trained_run), "--json", "--label-mode", "coarse")
    assert code == 0 and json.loads(out)["accuracy"] >= 0
    assert "data: --label-mode coarse applies to CIFAR-100 only" in err, err


def test_no_cpu_kernels_flag_reaches_the_saved_config(capsys, tmp_path, image_folder):
    import yaml

    out = tmp_path / "run"
    code, _, e = run(capsys, "train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1",
                     "--batch-size", "8", "--out", str(out), "--threads", "1", "--no-cpu-kernels")
    assert code == 0, e
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["cpu_kernels"] is False
    assert json.loads((out / "metrics.json").read_text())["cpu_kernels"] is False


def test_augment_command(capsys, tmp_path, image_folder):
    npz = tmp_path / "aug.npz"
    code, o, e = run(capsys, "augment", "--data", str(image_folder), "--per-image", "3", "--out", str(npz),
                     "--preview-dir", str(tmp_path / "prev"), "--previews", "2", "--save-format", "png",
                     "--save-prefix", "cat")
    assert code == 0, e
    z = np.load(npz)
    assert z["x"].shape == (54, 32, 32, 3) and z["y"].tolist()[:3] == [0, 0, 0]
    assert z["source_index"].tolist()[:4] == [0, 0, 0, 1]
    assert not np.array_equal(z["x"][0], z["x"][1])  # copies differ
    names = sorted(p.name for p in (tmp_path / "prev").iterdir())
    # Previews take the classes in turn (the folder is stored class by class): a cat, then a dog.
    assert "grid.png" in names and "cat_0_0.png" in names and "cat_6_2.png" in names and len(names) == 7
    code, _, e = run(capsys, "augment", "--data", str(image_folder), "--out", str(npz))
    assert code == 2 and "already exists" in e
    code, _, e = run(capsys, "augment", "--data", str(image_folder), "--out", str(tmp_path / "folder"),
                     "--per-image", "1", "--split", "test")
    assert code == 0 and len(list((tmp_path / "folder" / "test" / "dog").iterdir())) == 3
    code, o, e = run(capsys, "augment", "--data", str(image_folder), "--out", str(tmp_path / "all.npz"),
                     "--per-image", "1", "--split", "test", "--subset", "50")
    assert code == 0, e
    assert "--subset 50 is more than the 9 test images; using them all" in o
    assert len(np.load(tmp_path / "all.npz")["y"]) == 9
    assert run(capsys, "augment", "--data", str(image_folder), "--per-image", "0", "--out", "x.npz")[0] == 2
    code, o, e = run(capsys, "augment", "--data", str(image_folder), "--out", str(tmp_path / "UPPER.NPZ"),
                     "--per-image", "1", "--limit", "2")
    assert code == 0 and np.load(tmp_path / "UPPER.NPZ")["x"].shape == (2, 32, 32, 3)


def test_augment_notes_a_config_files_settings_its_preset_ignores(capsys, tmp_path, image_folder):
    (tmp_path / "c.yaml").write_text("augment:\n  crop_padding: 2\n  rotation_range: 10\n")
    code, o, e = run(capsys, "augment", "--data", str(image_folder), "--per-image", "1", "--limit", "2",
                     "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "a.npz"))
    assert code == 0, e
    assert ("note: the keras augmentation preset does not use augment.crop_padding = 2 (options of other presets, "
            "from the recipe or given; ignored)") in o.splitlines()
    # the notebook's flip cannot be switched off under its preset: refused, not ignored
    (tmp_path / "c.yaml").write_text("augment:\n  horizontal_flip: false\n")
    code, o, e = run(capsys, "augment", "--data", str(image_folder), "--per-image", "1", "--limit", "2",
                     "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b.npz"))
    assert code == 2 and not (tmp_path / "b.npz").exists()
    assert "augment.horizontal_flip = False cannot switch off the keras preset's horizontal_flip = True" in e


def test_augment_checks_its_output_before_reading_the_data(capsys, tmp_path, monkeypatch):
    """A file name other than .npz would have become a folder of PNG files; these mistakes are
    refused before the data set is read."""
    import cifarlab.augment_cli as augment_cli

    monkeypatch.setattr(augment_cli, "load_dataset", lambda *a, **k: pytest.fail("read the data first"))
    (tmp_path / "taken.npz").write_bytes(b"x")
    for out, msg in [("copies.npy", "--out '{}' is not valid: it writes a .npz file or an image folder; give a name "
                                    "ending in .npz or a folder name without '.npy'"),
                     ("taken.npz", "output '{}' already exists; choose another --out or pass --overwrite")]:
        code, _, e = run(capsys, "augment", "--data", "unread", "--out", str(tmp_path / out))
        assert code == 2 and msg.format(tmp_path / out) in e
        assert not (tmp_path / out).is_dir()
    code, _, e = run(capsys, "augment", "--data", "unread")
    assert code == 2 and "nothing to write: give --out" in e


def test_augment_images_reads_the_uint8_images_as_training_does():
    """``cifarlab augment`` hands a Keras augmenter the uint8 images (input_scale 1/255): the
    same copies as augmenting the 1/255-scaled floats, to within rounding to 8 bits."""
    import torch

    from cifarlab.augment import KERAS_NOTEBOOK, KerasAugment
    from cifarlab.augment_cli import augment_images

    x = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    assert np.array_equal(augment_images(x, KerasAugment(), 2, seed=0), np.repeat(x, 2, 0))  # identity
    aug = KerasAugment(**KERAS_NOTEBOOK)
    got = augment_images(x, aug, 3, seed=1)
    ref = aug(torch.from_numpy(np.repeat(x, 3, 0)).permute(0, 3, 1, 2).float() / 255, torch.Generator().manual_seed(1))
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert not np.array_equal(got, np.repeat(x, 3, 0))
    assert np.abs(got.astype(int) - ref).max() <= 1  # a value on a .5 boundary may round either way


@pytest.mark.parametrize("preset", ["keras", "crop-flip"])
def test_train_with_augmentation(capsys, tmp_path, image_folder, preset):
    code, o, e = run(capsys, "train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1",
                     "--batch-size", "8", "--out", str(tmp_path / preset), "--augment", preset, "--threads", "1")
    assert code == 0, e
    import yaml

    assert yaml.safe_load((tmp_path / preset / "config.yaml").read_text())["augment"]["preset"] == preset


def test_augment_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails part-way (a full disk) leaves neither the folder nor its temporary
    sibling, and says which folder; a successful write lays out SPLIT/CLASS/IMAGE_COPY.png."""
    from cifarlab.augment_cli import _write_folder
    from cifarlab.errors import CifarlabError

    copies = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    out = tmp_path / "copies"
    _write_folder([copies], labels, ["cat", "dog"], "train", 3, out)
    assert sorted(p.name for p in (out / "train" / "dog").iterdir()) == ["000001_0.png", "000001_1.png",
                                                                        "000001_2.png"]
    assert np.array_equal(np.asarray(Image.open(out / "train" / "cat" / "000000_2.png")), copies[2])

    real_save, calls = Image.Image.save, []

    def failing_save(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) % 4 == 0:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(CifarlabError, match="could not write the image folder '.*fresh': No space left on device"):
        _write_folder([copies], labels, ["cat", "dog"], "train", 3, fresh)
    assert len(calls) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["copies"]
    with pytest.raises(CifarlabError, match="previous output is as it was"):  # overwriting fails part-way
        _write_folder([copies[::-1].copy()], labels, ["cat", "dog"], "train", 3, out)
    assert np.array_equal(np.asarray(Image.open(out / "train" / "cat" / "000000_2.png")), copies[2])
    monkeypatch.setattr(Image.Image, "save", real_save)
    _write_folder([copies[::-1].copy()], labels, ["cat", "dog"], "train", 3, out)  # overwriting succeeds
    assert np.array_equal(np.asarray(Image.open(out / "train" / "cat" / "000000_2.png")), copies[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copies"]


def test_augment_streams_in_chunks_with_the_same_copies(tmp_path, monkeypatch, capsys, image_folder):
    """Copies are made and written a chunk at a time (memory stays flat for any --per-image):
    the chunks join into augment_images' array, the .npz reads back as np.savez's would, and
    previews alone are the very copies that --out writes."""
    from cifarlab.augment import KERAS_NOTEBOOK, KerasAugment
    from cifarlab.augment_cli import _write_npz, augment_images, iter_augmented

    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    aug = KerasAugment(**KERAS_NOTEBOOK)
    chunks = list(iter_augmented(x, aug, 3, seed=2, rows_per_chunk=6))  # 2 images a chunk
    assert [len(c) for c in chunks] == [6, 6, 6, 3]
    whole = augment_images(x, aug, 3, seed=2, rows_per_chunk=6)
    assert np.array_equal(np.concatenate(chunks), whole)
    _write_npz(tmp_path / "a.npz", iter(chunks), whole.shape, {"y": np.arange(21), "classes": np.array(["a"])})
    z = np.load(tmp_path / "a.npz", allow_pickle=False)
    assert np.array_equal(z["x"], whole) and z["y"].tolist() == list(range(21)) and z["classes"].tolist() == ["a"]

    monkeypatch.chdir(tmp_path)
    common = ["augment", "--data", str(image_folder), "--per-image", "2", "--previews", "3", "--save-format", "png"]
    assert run(capsys, *common, "--out", "o.npz", "--preview-dir", "with")[0] == 0
    assert run(capsys, *common, "--preview-dir", "alone")[0] == 0
    written = np.load("o.npz")["x"]
    for i, k in ((0, 0), (6, 1), (12, 1)):  # the first cat, dog and frog
        a, b = (np.asarray(Image.open(f"{d}/aug_{i}_{k}.png")) for d in ("with", "alone"))
        assert np.array_equal(a, b) and np.array_equal(a, written[2 * i + k])


def test_preview_indices_take_the_classes_in_turn():
    from cifarlab.augment_cli import preview_indices

    y = np.array([2, 2, 2, 0, 0, 1])  # stored class by class, classes unbalanced
    assert preview_indices(y, 4).tolist() == [0, 1, 3, 5]
    assert preview_indices(y, 10).tolist() == [0, 1, 2, 3, 4, 5]
    assert preview_indices(y, 1).tolist() == [0]


def test_evaluate_names_the_runs_own_data_path_when_it_does_not_hold_from_here(capsys, tmp_path, image_folder,
                                                                              monkeypatch):
    """A run trained with a relative --data path, evaluated from another folder."""
    monkeypatch.chdir(image_folder.parent)
    out = tmp_path / "run"
    code, _, e = run(capsys, "train", "--data", image_folder.name, "--model", "keras-shallow", "--epochs", "1",
                     "--batch-size", "8", "--out", str(out), "--threads", "1")
    assert code == 0, e
    assert run(capsys, "evaluate", str(out))[0] == 0  # from where it was trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, e = run(capsys, "audit", str(out))
    assert code == 2 and (f"the run's data '{image_folder.name}' (from {out / 'config.yaml'}) does not exist "
                          f"from {elsewhere}; give its path with --data") in e
    assert run(capsys, "evaluate", str(out), "--data", str(image_folder))[0] == 0


@pytest.mark.parametrize("name", ["gpu", "cuda:first", "cuda0", "cuda:"])
def test_a_bad_device_name_is_named_whether_or_not_cuda_is_here(name):
    """evaluate, predict and audit take --device straight to ``select_device``: a malformed
    name is refused as such, never with a bare traceback from parsing its number."""
    from cifarlab.errors import ConfigError
    from cifarlab.runtime import select_device

    with pytest.raises(ConfigError, match=f"device '{name}' is not valid; choose auto, cpu, cuda or cuda:N"):
        select_device(name)


def test_print_config_shows_what_the_options_resolve_to_and_reads_back_as_a_config_file(tmp_path, capsys,
                                                                                         monkeypatch):
    from cifarlab.config import resolve_config

    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--recipe", "fast", "--epochs", "3", "--schedule", "cosine", "--print-config")
    assert code == 0 and err == ""
    assert "epochs: 3" in out and "schedule: cosine" in out and "name: speednet" in out
    (tmp_path / "fast3.yaml").write_text(out)
    expected = resolve_config("fast", overrides={"train": {"epochs": 3}, "optim": {"schedule": "cosine"}})
    assert resolve_config(file=tmp_path / "fast3.yaml") == expected  # the file alone gives the same run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast3.yaml"]  # nothing trained, no runs/ folder
    code, out, err = run(capsys, "train", "--epochs", "0", "--print-config")
    assert code == 2 and "epochs = 0 is not valid" in err and out == ""  # validated as for training
    code, out, err = run(capsys, "train", "--runs", "3", "--split-seed", "7", "--print-config")
    assert code == 0 and "split_seed: 7" in out
    code, out, err = run(capsys, "train", "--mixup", "0.2", "--cutmix", "1", "--print-config")
    assert code == 0 and "mixup: 0.2" in out and "cutmix: 1.0" in out
    code, out, err = run(capsys, "train", "--augment", "crop-flip", "--auto-augment", "trivialaugment",
                         "--print-config")
    assert code == 0 and "auto_augment: trivialaugment" in out
    code, out, err = run(capsys, "train", "--ema", "0.99", "--print-config")
    assert code == 0 and "ema_momentum: 0.99" in out
    code, out, err = run(capsys, "train", "--momentum", "0.9", "--centered", "--print-config")
    assert code == 0 and "  momentum: 0.9" in out and "  centered: true" in out
    for key in ("clipnorm", "global_clipnorm", "clipvalue"):
        code, out, err = run(capsys, "train", "--" + key.replace("_", "-"), "0.5", "--print-config")
        assert code == 0 and f"  {key}: 0.5" in out
    code, out, err = run(capsys, "train", "--recipe", "fast", "--optimizer", "adamw", "--print-config")
    assert code == 0 and "name: adamw" in out and "note:" not in out  # the notes go to stderr
    assert err == ("note: adamw does not use optim.momentum = 0.85, optim.nesterov = True (options of other "
                   "optimizers, from the recipe or given; ignored)\n")
    code, _, err = run(capsys, "train", "--resume", "runs/x", "--print-config")
    assert code == 2 and "--print-config shows a new run's config; the config of 'runs/x' is its config.yaml" in err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`cifarlab list | head -1`: once the pipe's reader has gone, the command stops with the
    status a shell gives a tool stopped by SIGPIPE (141) and no traceback."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "cifarlab", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader goes away before the first line
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait() == 141 and err == "", err


def test_commands_refuse_an_unfinished_run_before_loading_data(trained_run, tmp_path, capsys):
    import shutil

    done = tmp_path / "done"
    shutil.copytree(trained_run, done)
    (trained_run / "weights.safetensors").unlink()  # as a run stopped before its first epoch ended
    missing = str(tmp_path / "no-such-data")  # loading it would fail with another message
    for argv in (["evaluate", str(trained_run)], ["calibrate", str(trained_run)], ["audit", str(trained_run)],
                 ["compare", str(done), str(trained_run)], ["compare", str(trained_run), str(done)]):
        assert main([*argv, "--data", missing]) == 2
        err = capsys.readouterr().err
        assert f"run folder '{trained_run}' has no weights.safetensors" in err and "--resume" in err


def test_train_image_size_and_the_commands_that_read_the_run_data(capsys, tmp_path):
    """--image-size trains on images resized to HxW; evaluate, calibrate and audit read the run's
    data at that size (without it they would refuse the data's native size)."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "photos", size=(48, 40), n_train=8)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", str(data), "--model", "keras-shallow", "--epochs", "1",
                         "--batch-size", "8", "--threads", "1", "--image-size", "24X20", "--out", str(run_dir))
    assert code == 0, err
    assert "resized 33 image(s) to 24x20 (the image size asked for, HxW)" in out
    arch = json.loads((run_dir / "architecture.json").read_text())
    assert (arch["input"]["height"], arch["input"]["width"]) == (24, 20)
    assert "image_size: 24x20" in (run_dir / "config.yaml").read_text()
    for command in (["evaluate", str(run_dir), "--json"], ["calibrate", str(run_dir)],
                    ["audit", str(run_dir), "--bootstrap", "100"]):
        code, out, err = run(capsys, *command)
        assert code == 0 and "trained on" not in err, (command, err)
    code, out, err = run(capsys, "train", "--data", str(data), "--image-size", "24x0", "--out", str(tmp_path / "x"))
    assert code == 2 and "image size (data.image_size) '24x0' is not valid; expected HxW such as 32x32" in err, err


def test_train_on_class_folders_alone_and_evaluate_the_same_test_images(capsys, tmp_path):
    """A folder of <class>/<image> trains with --test-split held out; evaluate reads the run's
    own split (its test images, not another 0.2), as config.yaml records it."""
    from conftest import make_image_folder

    made = make_image_folder(tmp_path / "made", n_train=8, n_test=0)
    data = made / "train"  # cat/, dog/, frog/ and nothing else
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", str(data), "--model", "keras-shallow", "--epochs", "1",
                         "--batch-size", "8", "--threads", "1", "--test-split", "0.25", "--val-split", "0",
                         "--out", str(run_dir))
    assert code == 0, err
    assert "held out 0.25 of each class's images for testing (6 of 24)" in out and "testing on 6 images" in out
    assert "test_split: 0.25" in (run_dir / "config.yaml").read_text()
    code, out, err = run(capsys, "evaluate", str(run_dir), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6, (out, err)
    code, out, err = run(capsys, "train", "--data", str(data), "--test-split", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "test split (data.test_split) = 1.0 is not valid; it must lie strictly between 0 and 1" in err


def test_other_class_folders_are_tested_on_every_image_the_run_has_not_seen(capsys, tmp_path):
    """Class folders alone hold a test split out: on the run's own data, evaluate keeps it; on
    new class folders, every image is a test image; on the run's data with images added, every
    image but those it trained or validated on (kept as hashes in its folder). The model card
    says which."""
    import shutil

    from conftest import make_image_folder

    from cifarlab.data import seen

    data = make_image_folder(tmp_path / "made", n_train=8, n_test=0) / "train"
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    for k, r in enumerate(runs):
        code, out, err = run(capsys, "train", "--data", str(data), "--model", "keras-shallow", "--epochs", "1",
                             "--batch-size", "8", "--threads", "1", "--seed", str(k), "--out", str(r))
        assert code == 0, err
    pixels, paths, _, _ = seen.read(runs[0])
    assert len(pixels) == len(paths) == 18  # 24 images, 6 held out for testing: 18 trained or validated on
    code, out, err = run(capsys, "evaluate", str(runs[0]), "--data", str(data), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6 and "every image is a test image" not in err, err
    assert json.loads(out)["test_origin"] == "held-out"

    new = make_image_folder(tmp_path / "new", n_train=5, n_test=0, seed=1) / "train"
    code, out, err = run(capsys, "evaluate", str(runs[0]), "--data", str(new), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 15 and json.loads(out)["test_origin"] == "unseen", err
    assert f"{new} is not the data the run was trained on (its training images are not all in it), so every image " \
           "is a test image, not the held-out split alone: 15 of 15" in err
    # the loader's note of the split it held out is left out, since none is held out
    assert "data: no train/ and test/ folders: read 3 class folders\n" in err and "held out 0.2" not in err
    code, out, err = run(capsys, "audit", str(runs[0]), "--data", str(new), "--bootstrap", "100", "--out",
                         str(tmp_path / "audit"))
    assert code == 0, err
    card = (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert f"- Source: `{new}`, 15 images; not the data the model was trained on: every one of its images" in card
    assert f"Accuracy is measured on `{new}`, not on the training data" in card

    # the run's data and 5 new images per class, named to come last in the hash order that holds the test split
    # out: the split grows from 2 to 3 per class by one image the runs trained or validated on
    def sha(name):
        return hashlib.sha256(name.encode()).hexdigest()

    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    for c in ("cat", "dog", "frog"):
        last = max(sha(f"{c}/{p.name}") for p in (data / c).iterdir())
        late = (f"new{i}.png" for i in range(10_000) if sha(f"{c}/new{i}.png") > last)
        for k, name in zip(range(5), late):
            shutil.copy(new / c / f"{k:04d}.png", grown / c / name)
    code, out, err = run(capsys, "compare", str(runs[0]), str(runs[1]), "--data", str(grown), "--bootstrap", "100",
                         "--json")
    both = set(seen.read(runs[0])[0].tolist()) | set(seen.read(runs[1])[0].tolist())
    assert code == 0 and json.loads(out)["images"] == 39 - len(both) == 21, err
    assert ": 21 of 39, leaving out 18 with the pixels of an image one of the runs trained or validated on" in err
    code, out, err = run(capsys, "robustness", str(runs[0]), "--data", str(new), "--corruptions", "fog",
                         "--severities", "1", "--json")
    assert code == 0 and json.loads(out)["images_per_cell"] == 15, err


def test_reports_on_other_data_are_kept_beside_the_runs_own(capsys, tmp_path, trained_run, image_folder):
    """evaluate, robustness, duplicates and audit on other data write RUN/<kind>-<data> by
    default, leaving the report on the run's own test images as it was; the model card quotes
    the robustness and near-copy reports made on the data it was audited on; a --runs folder
    keeps its summaries on other data in OUT/<kind>-<data>."""
    from conftest import make_image_folder

    from cifarlab.export import data_tag

    new = make_image_folder(tmp_path / "new", seed=5)
    tag = data_tag(str(new))
    code, out, err = run(capsys, "evaluate", str(trained_run))
    assert code == 0 and f"Report files in {trained_run / 'eval'}" in out, err
    own_report = (trained_run / "eval" / "metrics.json").read_bytes()
    code, out, err = run(capsys, "evaluate", str(trained_run), "--data", str(new))
    assert code == 0 and f"Report files in {trained_run / f'eval-{tag}'}\n" in out, err
    assert json.loads((trained_run / f"eval-{tag}" / "metrics.json").read_text())["num_images"] == 9
    assert (trained_run / "eval" / "metrics.json").read_bytes() == own_report

    fog = ["--corruptions", "fog", "--severities", "1"]
    code, out, err = run(capsys, "robustness", str(trained_run), "--data", str(new), *fog)
    assert code == 0 and f"Report files in {trained_run / f'robustness-{tag}'}" in out, err
    assert not (trained_run / "robustness").exists()
    code, out, err = run(capsys, "duplicates", str(trained_run), "--data", str(new), "--json")
    assert code == 0 and (trained_run / f"duplicates-{tag}" / "duplicates.json").is_file(), err
    code, out, err = run(capsys, "audit", str(trained_run), "--data", str(new), "--bootstrap", "100")
    assert code == 0 and f"wrote {trained_run / f'audit-{tag}' / 'audit.md'}" in out, err
    card = (trained_run / f"audit-{tag}" / "MODEL_CARD.md").read_text()
    assert "Under common corruptions (`cifarlab robustness`: 1 corruptions" in card
    assert "near-copy among" in card  # the duplicates report made on `new`
    code, out, err = run(capsys, "audit", str(trained_run), "--bootstrap", "100")
    assert code == 0 and f"wrote {trained_run / 'audit' / 'audit.md'}" in out, err
    card = (trained_run / "audit" / "MODEL_CARD.md").read_text()
    assert "Under common corruptions" not in card and "near-copy among" not in card  # measured on other data only

    base = tmp_path / "set"
    code, out, err = run(capsys, "train", "--data", str(image_folder), "--model", "keras-shallow", "--epochs", "1",
                         "--batch-size", "8", "--threads", "1", "--runs", "2", "--out", str(base))
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", str(base), "--data", str(new))
    assert code == 0 and f"summary in {base / f'eval-{tag}' / 'eval_summary.json'}" in out, err
    assert (base / f"eval-{tag}" / "run-1" / "metrics.json").is_file() and not (base / "eval_summary.json").exists()
    code, out, err = run(capsys, "robustness", str(base), "--data", str(new), *fog)
    assert code == 0 and f"each run's report in {base / f'robustness-{tag}'}/run-K" in out, err
    code, out, err = run(capsys, "audit", str(base), "--data", str(new), "--bootstrap", "100")
    assert code == 0 and f"wrote {base / f'audit-{tag}' / 'audit_summary.md'}" in out, err
    assert "Under common corruptions (`cifarlab robustness`: 1 corruptions" in \
        (base / f"audit-{tag}" / "audit_summary.md").read_text()
    code, out, err = run(capsys, "evaluate", str(base))
    assert code == 0 and f"summary in {base / 'eval_summary.json'}" in out, err


def test_train_on_images_labelled_by_a_csv_and_evaluate_them_again(capsys, tmp_path, monkeypatch):
    """--labels: Kaggle's layout (train/<id>.png, trainLabels.csv) trains; config.yaml records the
    file, and evaluate reads the run's own data with it; other --data does not take it."""
    from conftest import make_image_folder

    made = make_image_folder(tmp_path / "made", n_train=8, n_test=0)
    flat = tmp_path / "kaggle" / "train"
    flat.mkdir(parents=True)
    rows = ["id,label"]
    for k, p in enumerate(sorted((made / "train").rglob("*.png")), 1):
        p.rename(flat / f"{k}.png")
        rows.append(f"{k},{p.parent.name}")
    (tmp_path / "kaggle" / "trainLabels.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path / "kaggle")
    code, out, err = run(capsys, "train", "--data", "train", "--labels", "trainLabels.csv", "--model", "keras-shallow",
                         "--epochs", "1", "--batch-size", "8", "--threads", "1", "--val-split", "0",
                         "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "labels from trainLabels.csv: 24 image(s) in 3 classes" in out and "testing on 6 images" in out
    assert "labels: trainLabels.csv" in (tmp_path / "run" / "config.yaml").read_text()
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6, (out, err)
    code, out, err = run(capsys, "audit", str(tmp_path / "run"), "--bootstrap", "100")
    assert code == 0, err
    assert "- Labels: from `trainLabels.csv` (file,label rows)" in (tmp_path / "run" / "audit" / "MODEL_CARD.md").read_text()
    (tmp_path / "kaggle" / "trainLabels.csv").rename(tmp_path / "moved.csv")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"))
    assert code == 2 and "the run's labels file 'trainLabels.csv' (from " in err and "give its path with --labels" in err
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--labels", str(tmp_path / "moved.csv"), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6, (out, err)
    (tmp_path / "moved.csv").rename(tmp_path / "kaggle" / "trainLabels.csv")
    other = make_image_folder(tmp_path / "other", n_train=2, n_test=2)  # class folders: the CSV is not for it
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--data", str(other), "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6 and "labels from" not in err, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--data", "kaggle/train")
    assert code != 0 and "need a CSV file of their labels (--labels)" in err, err
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--data", "kaggle/train", "--labels",
                         "kaggle/trainLabels.csv", "--json")
    assert code == 0 and json.loads(out)["num_images"] == 6, (out, err)
    code, out, err = run(capsys, "train", "--labels", "x.csv", "--out", str(tmp_path / "x"))
    assert code == 2 and "data.labels = 'x.csv' is not valid; it names the classes of the images in data.data" in err


def test_reports_on_two_labellings_of_the_same_images_are_kept_apart(capsys, tmp_path, trained_run):
    """Other data's images named by two labels files: each labelling's report has a folder of
    its own, as its accuracy is its own."""
    from conftest import make_image_folder

    made = make_image_folder(tmp_path / "made", n_train=0, n_test=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    right, swapped = ["file,label"], ["file,label"]
    for k, p in enumerate(sorted((made / "test").rglob("*.png"))):
        p.rename(flat / f"{k}.png")
        right.append(f"{k}.png,{p.parent.name}")
        swapped.append(f"{k}.png,{ {'cat': 'dog', 'dog': 'cat'}.get(p.parent.name, p.parent.name) }")
    (tmp_path / "right.csv").write_text("\n".join(right) + "\n")
    (tmp_path / "swapped.csv").write_text("\n".join(swapped) + "\n")
    folders = []
    for labels in ("right.csv", "swapped.csv"):
        code, out, err = run(capsys, "evaluate", str(trained_run), "--data", str(flat), "--labels",
                             str(tmp_path / labels))
        assert code == 0, err
        folders.append(out.strip().splitlines()[-1].removeprefix("Report files in "))
    assert folders[0] != folders[1] and all(f.startswith(str(trained_run / "eval-flat-")) for f in folders)


def test_evaluation_commands_resize_other_data_to_the_run_input(capsys, tmp_path, trained_run):
    """--data of another size is resized to the run's input, with a note, as predict resizes a
    file; the API, given a data set of another size, says how to resize it."""
    from conftest import make_image_folder

    from cifarlab.data import load_dataset
    from cifarlab.errors import CifarlabError
    from cifarlab.evaluate import evaluate_run

    other = make_image_folder(tmp_path / "larger", size=(48, 40))
    for command in (["evaluate", str(trained_run), "--json"], ["calibrate", str(trained_run)]):
        code, out, err = run(capsys, *command, "--data", str(other))
        assert code == 0, err
        assert "data: resized all 27 image(s) from 48x40 to 32x32 (the run's input, HxW)" in err, err
    with pytest.raises(CifarlabError, match=r"48x40x3 \(HxWxC\) but the model was trained on 32x32x3; resize them with "
                                            r"cifarlab.data.resized\(ds, \(32, 32\)\)"):
        evaluate_run(trained_run, load_dataset(other), tmp_path / "eval", device="cpu")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"], ["duplicates", "--help"],
                                  ["explain", "--help"], ["ood", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    """Help and the version answer at once: building the parser imports no PyTorch (about
    1.5 s on a 2-core machine), only the modules of the command that runs do."""
    import subprocess
    import sys

    code = ("import sys\nfrom cifarlab.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr
    assert "usage: cifarlab" in p.stdout or p.stdout.startswith("cifarlab ")


def test_commands_that_read_data_without_a_run_take_its_image_size_and_test_split(tmp_path, trained_run, capsys):
    """datasheet, augment and duplicates (without a run) read a folder of class folders as train
    does with --image-size and --test-split, so that they describe the same test images; with a
    run, the run's own settings hold, and the flags are refused."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "photos" / c / f"{i}.png")
    read = ["--data", str(tmp_path / "photos"), "--image-size", "16x20", "--test-split", "0.5"]
    assert main(["datasheet", *read, "--out", str(tmp_path / "sheet"), "--json"]) == 0
    sheet = json.loads(capsys.readouterr().out)
    assert sheet["image_size"] == [16, 20] and sheet["composition"]["test_images"] == 10
    assert main(["augment", *read, "--per-image", "2", "--out", str(tmp_path / "aug.npz")]) == 0
    with np.load(tmp_path / "aug.npz") as z:
        assert z["x"].shape == (20, 16, 20, 3)  # the 10 training images left, twice each
    assert main(["duplicates", *read, "--out", str(tmp_path / "dup"), "--json"]) == 0
    assert "held out 0.5 of each class's images for testing (10 of 20)" in capsys.readouterr().err
    assert main(["datasheet", "--data", str(tmp_path / "photos"), "--test-split", "1.5"]) == 2
    assert "test split (data.test_split) = 1.5 is not valid" in capsys.readouterr().err
    assert main(["augment", "--data", str(tmp_path / "photos"), "--image-size", "big", "--out",
                 str(tmp_path / "bad.npz")]) == 2
    assert "image size (data.image_size) 'big' is not valid" in capsys.readouterr().err
    assert main(["duplicates", str(trained_run), "--test-split", "0.5"]) == 2
    assert (f"--test-split applies to data read without a run; '{trained_run}' reads its data as it was trained"
            in capsys.readouterr().err)
