"""Run folders: architecture rebuilds the model; mismatched weights and foreign folders are named."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import Terminal
from PIL import Image
from safetensors.torch import load_file, save_file

import cifarlab
from cifarlab.errors import CifarlabError
from cifarlab.export import load_weights, read_run
from cifarlab.fsutil import write_json
from cifarlab.models import create_model


def test_load_model_api_and_inputs(trained_run, tmp_path):
    model = cifarlab.load_model(trained_run)
    assert model.classes == ["cat", "dog", "frog"]
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 1] = 220
    p_arr = model.predict(img[None])
    p_pil = model.predict([Image.fromarray(img)])
    Image.fromarray(img).save(tmp_path / "x.png")
    p_path = model.predict([tmp_path / "x.png"])
    assert np.array_equal(p_arr, p_pil) and np.array_equal(p_arr, p_path)
    # a larger grayscale image goes through the same conversion as training data
    Image.fromarray(img[..., 1]).resize((64, 64)).save(tmp_path / "g.png")
    assert model.predict([tmp_path / "g.png"]).shape == (1, 3)
    with pytest.raises(CifarlabError, match=r"images have shape \(16, 16, 3\)"):
        model.predict(np.zeros((1, 16, 16, 3), np.uint8))
    # A list may mix arrays, PIL images and paths; an empty one gives no rows.
    mixed = model.predict([img, Image.fromarray(img), tmp_path / "x.png", str(tmp_path / "x.png")])
    assert mixed.shape == (4, 3) and np.allclose(mixed, np.repeat(p_arr, 4, 0), rtol=1e-4, atol=1e-6)  # batch of 4
    assert model.predict([]).shape == (0, 3)
    with pytest.raises(CifarlabError, match=r"images have shape \(30, 32, 3\)"):
        model.predict([np.zeros((30, 32, 3), np.uint8)])
    with pytest.raises(CifarlabError, match="cannot read image file '.*missing.png': No such file"):
        model.predict(tmp_path / "missing.png")
    with pytest.raises(CifarlabError, match="cannot predict on a int; give uint8 arrays"):
        model.predict([img, 7])
    with pytest.raises(CifarlabError, match=r"got float32; for images scaled to \[0, 1\], pass \(x \* 255\)"):
        model.predict(img.astype(np.float32) / 255)  # the notebook's scaled arrays


def test_architecture_json_is_readable(trained_run):
    arch = json.loads((trained_run / "architecture.json").read_text())
    assert arch["model"] == "keras-shallow" and arch["input"] == {
        "channels": 3, "height": 32, "width": 32, "layout": "NCHW", "dtype": "uint8"}
    assert arch["preprocessing"]["rescale"] == pytest.approx(1 / 255)
    m = create_model(arch["model"], **arch["model_kwargs"])
    assert sum(p.numel() for p in m.parameters()) == arch["num_params"]


def test_mismatched_weights_name_tensor_and_shapes(trained_run, tmp_path):
    state = load_file(str(trained_run / "weights.safetensors"))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)
    state[key] = torch.zeros(5, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    model = create_model("keras-shallow", num_classes=3)
    with pytest.raises(CifarlabError, match=rf"tensor '{key}' has shape \(5, 5\) in the file but \(\d+, \d+\) in the model"):
        load_weights(model, bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CifarlabError, match="not a readable safetensors"):
        load_weights(model, tmp_path / "junk.safetensors")


def test_missing_and_foreign_run_folders(tmp_path):
    with pytest.raises(CifarlabError, match="does not exist"):
        read_run(tmp_path / "nope")
    with pytest.raises(CifarlabError, match="not a cifarlab run folder"):
        read_run(tmp_path)
    (tmp_path / "architecture.json").write_text('{"format": "something-else"}')
    with pytest.raises(CifarlabError, match="not a cifarlab architecture file"):
        read_run(tmp_path)


def test_an_architecture_file_missing_a_field_is_refused_by_its_name(trained_run):
    good = json.loads((trained_run / "architecture.json").read_text())
    assert read_run(trained_run)[1] == good
    for change, named in (({"classes": None}, "its classes is missing"),
                          ({"classes": ["cat", 3]}, "its classes is missing"),
                          ({"input": {"channels": 3, "height": 0, "width": 32}}, "its input is missing"),
                          ({"model": 7, "preprocessing": []}, "its model and preprocessing are missing")):
        write_json(trained_run / "architecture.json", {k: v for k, v in {**good, **change}.items() if v is not None})
        with pytest.raises(CifarlabError, match=re.escape(f"architecture.json: {named} or not what cifarlab writes")):
            read_run(trained_run)


def test_one_rule_tells_a_runs_set_from_a_run(trained_run, tmp_path, capsys):
    """A set is known by its summary, its run-K folders, or a config of several runs (a set
    whose first run never started); a run (architecture.json) or any other folder is not one."""
    from cifarlab.cli import main
    from cifarlab.config import load_run_config, save_config
    from cifarlab.export import is_runs_set

    cfg = load_run_config(trained_run / "config.yaml")
    assert not is_runs_set(trained_run) and not is_runs_set(tmp_path / "absent") and not is_runs_set(tmp_path)
    assert not is_runs_set(trained_run / "config.yaml")  # a file
    cases = {"summary": ("runs_summary.json", "{}"), "garbled": ("config.yaml", "train: [")}
    for name, (file, text) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(text)
    (tmp_path / "stopped" / "run-0").mkdir(parents=True)
    (tmp_path / "notrun" / "run-x").mkdir(parents=True)
    for name, runs in (("unstarted", 3), ("single", 1)):
        cfg.train.runs = runs
        save_config(cfg, tmp_path / name / "config.yaml")
    assert {p.name: is_runs_set(p) for p in tmp_path.iterdir() if p.is_dir()} == {
        "run": False, "summary": True, "garbled": False, "stopped": True, "notrun": False, "unstarted": True,
        "single": False, "imgs": False}  # imgs: the image folder the run trained on
    for command in ("evaluate", "audit"):  # the unstarted set: named as a set, not as a run lacking files
        assert main([command, str(tmp_path / "unstarted"), "--data", "unused"]) == 2
        assert "holds no runs of 'cifarlab train --runs'" in capsys.readouterr().err


def test_preprocess_scales_and_standardises_with_per_channel_values_made_once():
    """preprocess is (x / 255 - mean) / (std + 1e-6) per channel, and the per-channel tensors are
    made once and reused, not rebuilt from the lists (a host-to-device copy on a GPU) per batch."""
    from cifarlab.export import channel_values, preprocess

    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    prep = {"rescale": 1 / 255, "mean": [0.1, 0.5, 0.9], "std": [0.2, 0.3, 0.4]}
    mean, std = torch.tensor(prep["mean"]).view(1, 3, 1, 1), torch.tensor(prep["std"]).view(1, 3, 1, 1)
    want = (x.float() * (1 / 255) - mean) / (std + 1e-6)
    assert torch.equal(preprocess(x, prep), want)
    before = channel_values.cache_info()
    preprocess(x, dict(prep))
    after = channel_values.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses
    assert torch.equal(preprocess(x, {"rescale": 0.5, "mean": None, "std": None}), x.float() * 0.5)


def test_cpu_inference_runs_in_cache_sized_batches(trained_run):
    """On the CPU a predictor passes 128 images at a time (runtime.inference_batch_size), and the
    batch size does not change what it predicts."""
    from cifarlab import runtime

    assert runtime.inference_batch_size("cpu") == 128 and runtime.inference_batch_size("cuda:0") == 1000
    model = cifarlab.load_model(trained_run)
    sizes = []
    hook = model.model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    images = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    p_default = model.predict(images)
    assert sizes == [128, 128, 44]
    hook.remove()
    assert np.allclose(p_default, model.predict(images, batch_size=1000), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_logits_keeps_no_batch_output_past_its_batch(dtype):
    """batched_logits copies each batch's logits into one float32 tensor as it goes: no batch's
    output is still alive when the next batch runs (kept in a list, they sat between the next
    batches' activations on the heap and grew the process by gigabytes), and the result is each
    image's own logits, in order, the last batch short."""
    import gc
    import weakref

    from cifarlab.export import batched_logits

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 4 * 4, 5).to(dtype)
            self.outputs, self.alive_at_call = [], []

        def forward(self, x):
            gc.collect()
            self.alive_at_call.append(sum(r() is not None for r in self.outputs))
            z = self.lin(x.flatten(1))
            self.outputs.append(weakref.ref(z))
            return z

    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    prep = {"rescale": 1 / 255, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3]}
    model = Probe()
    got = batched_logits(model, x, prep, batch_size=4, dtype=dtype)
    assert model.alive_at_call == [0, 0, 0]
    assert got.dtype == torch.float32 and got.shape == (10, 5)
    with torch.no_grad():
        want = model.lin(preprocess_for_test(x, prep).to(dtype).flatten(1)).float()
    assert torch.allclose(got, want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(CifarlabError, match="no images"):
        batched_logits(model, x[:0], prep, batch_size=4)


def test_predictor_and_evaluation_keep_no_batch_logits_past_their_batch(trained_run):
    """A predictor's and a training run's evaluation passes hold no earlier batch's logits while
    the next batch runs, so a long prediction does not grow the process (batched_logits)."""
    import gc
    import weakref

    from cifarlab.train import evaluate_arrays

    pred = cifarlab.load_model(trained_run)
    outputs, alive = [], []

    def before(module, args):
        gc.collect()
        alive.append(sum(r() is not None for r in outputs))

    hooks = [pred.model.register_forward_pre_hook(before),
             pred.model.register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))]
    images = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    pred.logits(images, batch_size=100)
    assert alive == [0, 0, 0]
    alive.clear()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    evaluate_arrays(pred.model, x, torch.zeros(300, dtype=torch.long), pred.prep, batch_size=100)
    assert alive == [0, 0, 0]
    for h in hooks:
        h.remove()


def preprocess_for_test(x, prep):
    mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
    return (x.float() * prep["rescale"] - mean) / (std + 1e-6)


def test_long_inference_shows_a_transient_progress_bar_on_a_terminal_only(trained_run, monkeypatch):
    """Predicting (and so evaluating) several batches draws a progress bar on an interactive
    stderr, which it clears when done; piped to a file, stderr gets nothing."""
    import io

    model = cifarlab.load_model(trained_run)
    images = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    want = model.predict(images)
    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert np.array_equal(model.predict(images), want)
        shown = stream.getvalue()
        assert ("Predicting" in shown and "/3 " in shown) == bar, shown
        assert shown.endswith("\r") or not bar  # cleared: the line is blanked and the cursor back at its start
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    model.predict(images[:128])  # one batch: nothing to show
    assert terminal.getvalue() == ""


def test_data_tag_names_the_data_and_tells_two_folders_of_one_name_apart(tmp_path):
    from cifarlab.export import data_tag

    a, b = tmp_path / "a" / "test", tmp_path / "b" / "test"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert data_tag(str(a)).startswith("test-") and data_tag(str(b)).startswith("test-")
    assert data_tag(str(a)) != data_tag(str(b))
    assert data_tag(str(a)) == data_tag(str(tmp_path / "b" / ".." / "a" / "test"))  # the same folder, however named
    assert data_tag("/x/cifar10.1_v6_data.npy").startswith("cifar10.1_v6_data-")
    assert data_tag("/x/photos.TAR.GZ").startswith("photos-")
    assert data_tag("/x/my photos (2024)").startswith("my_photos_2024-")
    assert data_tag("/x/...").startswith("data-")
    # two labels files for the same images: two tags, each another than the images' alone
    (tmp_path / "one.csv").write_text("id,label\n")
    (tmp_path / "two.csv").write_text("id,label\n")
    tags = {data_tag(str(a)), data_tag(str(a), str(tmp_path / "one.csv")), data_tag(str(a), str(tmp_path / "two.csv"))}
    assert len(tags) == 3 and all(t.startswith("test-") for t in tags)


def test_report_name_is_the_kind_on_the_runs_own_data_and_names_other_data(tmp_path, trained_run, image_folder):
    """The run's own data keeps RUN/<kind>; other data gets <kind>-<tag>; a run without a record
    of its images falls back on the data path in its metrics.json."""
    from conftest import make_image_folder

    from cifarlab.data import load_dataset, seen
    from cifarlab.export import data_tag, default_report_folder, other_data_folder, report_name

    own = load_dataset(image_folder)
    other = load_dataset(make_image_folder(tmp_path / "other", seed=3))
    assert report_name("eval", own, [trained_run]) == "eval"
    assert report_name("eval", other, [trained_run]) == f"eval-{data_tag(other.source)}"
    assert default_report_folder(trained_run, "audit", own) == trained_run / "audit"
    assert default_report_folder(trained_run, "audit", other) == trained_run / f"audit-{data_tag(other.source)}"
    assert other_data_folder(tmp_path / "set", "eval", own, [trained_run]) is None
    assert other_data_folder(tmp_path / "set", "eval", other, [trained_run]) == \
        tmp_path / "set" / f"eval-{data_tag(other.source)}"
    (trained_run / seen.FILE).unlink()  # as a run of an older cifarlab: its data by path
    assert report_name("eval", own, [trained_run]) == "eval"
    assert report_name("eval", other, [trained_run]) != "eval"
    metrics = json.loads((trained_run / "metrics.json").read_text())
    del metrics["data"]["source"]  # nothing recorded (an imported model): as before, RUN/<kind>
    (trained_run / "metrics.json").write_text(json.dumps(metrics))
    assert report_name("eval", other, [trained_run]) == "eval"
