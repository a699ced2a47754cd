"""cifarlab explain: attribution maps, their sanity check, and the command."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from cifarlab import explain
from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model, list_models


class RedSum(nn.Module):
    """Logit 0 is the sum of the red channel (through a 1x1 convolution), logit 1 its negative:
    the evidence for class 0 lies exactly where the image is red."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0

    def forward(self, x):
        s = self.conv(x).sum((1, 2, 3))
        return torch.stack([s, -s], 1)


def _red_corner(n: int = 2) -> torch.Tensor:
    """uint8 images (N, 3, 32, 32), red in the top-left 16x16 corner, black elsewhere."""
    x = torch.zeros((n, 3, 32, 32), dtype=torch.uint8)
    x[:, 0, :16, :16] = 255
    return x


@pytest.mark.parametrize("method", explain.METHODS)
def test_maps_find_the_evidence_where_it_is(method):
    """Every method puts (nearly) all the positive evidence for class 0 in the red corner, and
    Grad-CAM none for class 1, whose logit the red lowers."""
    model = RedSum().eval()
    x = _red_corner()
    maps = explain.attribute(model, {"rescale": 1 / 255}, x, torch.tensor([0, 0]), method, "conv")
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    pos = np.clip(maps, 0, None)
    corner = pos[:, :16, :16].sum((1, 2)) / pos.sum((1, 2))
    # occlusion's 4-pixel windows straddle the corner's edges, so a little evidence spills over
    assert (corner > (0.85 if method == "occlusion" else 0.999)).all(), corner
    if method == "gradcam":
        against = explain.attribute(model, {"rescale": 1 / 255}, x, torch.tensor([1, 1]), method, "conv")
        assert np.abs(against).max() == 0  # Grad-CAM keeps positive evidence only


def test_integrated_gradients_add_up_to_the_logit_change():
    """Integrated gradients' completeness: a map's sum is the logit's change from the grey image
    (exact here, as the logit is linear in the pixels)."""
    model = RedSum().eval()
    x = _red_corner(1)
    maps = explain.attribute(model, {"rescale": 1 / 255}, x, torch.tensor([0]), "integrated-gradients")
    net = explain.PixelModel(model, {"rescale": 1 / 255})
    change = (net(x.float()) - net(torch.full((1, 3, 32, 32), explain.GREY)))[0, 0].item()
    assert maps.sum() == pytest.approx(change, rel=1e-4)


def test_select_images_orders_and_filters():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([1, 1, 1, 0, 0])  # wrong: 0 (0.9), 2 (0.6), 3 (0.7); right: 1 (0.8), 4 (0.55)
    assert explain.select_images(probs, y, "wrong", 10).tolist() == [0, 3, 2]
    assert explain.select_images(probs, y, "wrong", 2).tolist() == [0, 3]
    assert explain.select_images(probs, y, "right", 10).tolist() == [1, 4]
    assert explain.select_images(probs, y, "wrong", 10, class_index=0).tolist() == [3]
    drawn = explain.select_images(probs, y, "random", 3, seed=1)
    assert len(set(drawn.tolist())) == 3 and drawn.tolist() == explain.select_images(probs, y, "random", 3,
                                                                                     seed=1).tolist()
    assert explain.select_images(probs, y, "random", 9, class_index=1).tolist() == [0, 1, 2]


def test_sanity_check_flags_maps_that_ignore_the_weights():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 8, 8))
    same = explain.sanity_check(maps, maps * 3 + 1)  # same ranks
    assert same["flagged"] and same["rank_correlation"]["mean_abs"] == pytest.approx(1.0)
    other = explain.sanity_check(maps, rng.random((6, 8, 8)))
    assert not other["flagged"] and other["rank_correlation"]["mean_abs"] < 0.3
    flat = maps.copy()
    flat[0] = 0  # a Grad-CAM map with no positive evidence: no ranks
    s = explain.sanity_check(flat, maps)
    assert s["undefined"] == 1 and s["rank_correlation"]["images"] == 5
    assert explain.sanity_check(np.zeros((2, 4, 4)), maps[:2])["rank_correlation"] is None


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_can_be_explained(name):
    """Grad-CAM finds a layer in every registered model and gives finite maps of the image's
    size; the default layer is the last convolution with a map larger than 1x1."""
    model = create_model(name, num_classes=10, in_chans=3, img_size=32).eval()
    layer, size = explain.choose_layer(model, (3, 32, 32), None)
    convs = explain.conv_layers(model, (3, 32, 32))
    assert (layer, size) == [c for c in convs if c[1][0] * c[1][1] > 1][-1]
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = explain.attribute(model, {"rescale": 1 / 255}, x, torch.tensor([0, 3]), "gradcam", layer)
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and (maps >= 0).all()


def test_the_default_layer_of_the_notebook_model():
    model = create_model("keras-deep")
    assert explain.choose_layer(model, (3, 32, 32), None) == ("8", (16, 16))  # its fourth convolution
    assert explain.choose_layer(model, (3, 32, 32), "2") == ("2", (32, 32))
    with pytest.raises(CifarlabError, match=r"--layer '9' is not one of the model's convolutions; choose one of "
                                            r"0, 2, 6, 8"):
        explain.choose_layer(model, (3, 32, 32), "9")


def test_missing_captum_is_named_before_the_data_is_read(monkeypatch, trained_run, capsys):
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(CifarlabError, match=r"needs the package captum: pip install captum"):
        explain.attribute(RedSum(), {}, _red_corner(1), torch.tensor([0]), "occlusion")
    from cifarlab import cli

    loaded = []
    monkeypatch.setattr(cli, "_load_eval_data", lambda *a, **k: loaded.append(1))
    assert main(["explain", str(trained_run)]) == 2
    assert "needs the package captum" in capsys.readouterr().err and not loaded


def test_explain_test_images_through_the_cli(trained_run, capsys):
    """The run's own test images: the report, the maps and the grid in RUN/explain; the images
    are those the selection names, and their predictions are the run's."""
    assert main(["explain", str(trained_run), "--select", "random", "--count", "4"]) == 0
    out = capsys.readouterr().out
    assert "Sanity check (random weights)" in out or "Sanity check: undefined" in out
    folder = trained_run / "explain"
    report = json.loads((folder / "explanations.json").read_text())
    assert report["files"] == ["explanations.json", "explanations.png", "maps.npz"]
    assert sorted(p.name for p in folder.iterdir()) == report["files"]
    assert report["method"] == "gradcam" and report["layer"] == "0" and report["select"] == "random"
    assert len(report["images"]) == 4 == len(report["indices"])
    maps = np.load(folder / "maps.npz")
    assert sorted(maps.files) == ["predicted", "random_weights", "true"]
    assert maps["predicted"].shape == (4, 32, 32)
    # each image's prediction is what predict gives for the same file
    from cifarlab.export import load_model

    pred = load_model(trained_run)
    for row in report["images"]:
        p = pred.predict([str(trained_run.parent / "imgs" / row["image"])])[0]
        assert row["predicted"] == pred.classes[p.argmax()]
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-5)
        assert row["correct"] == (row["true"] == row["predicted"])
        assert row["image"].startswith("test/")


def test_explain_selections_classes_and_methods(trained_run, capsys):
    assert main(["explain", str(trained_run), "--select", "right", "--class", "dog", "--method", "occlusion",
                 "--no-sanity-check", "--json", "--out", str(trained_run / "ex")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sanity_check"] is None and report["method"] == "occlusion"
    assert report["settings"] == {"window": 4, "stride": 2, "baseline": explain.GREY}
    assert all(r["true"] == "dog" and r["correct"] for r in report["images"])
    assert sorted(np.load(trained_run / "ex" / "maps.npz").files) == ["predicted", "true"]


def test_explain_refusals(trained_run, image_folder, capsys):
    cases = [
        (["--class", "horse"], "--class 'horse' is not one of the model's classes; choose one of cat, dog, frog"),
        (["--class", "frgo"], "--class 'frgo' is not one of the model's classes (did you mean 'frog'?); choose"),
        (["--count", "0"], "--count 0 is not valid; it must be at least 1"),
        (["--layer", "5"], "--layer '5' is not one of the model's convolutions; choose one of 0"),
        (["--layer", "0", "--method", "occlusion"], "--layer is Grad-CAM's; --method occlusion looks at the input"),
        ([str(image_folder / "test"), "--data", str(image_folder)], "--data chooses test images, but image files "
                                                                     "were given: give one or the other"),
        ([str(image_folder / "test"), "--class", "cat"], "--class chooses test images"),
    ]
    for extra, message in cases:
        assert main(["explain", str(trained_run), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (trained_run / "explain").exists()  # nothing half-written


def test_explain_files_and_other_data(trained_run, image_folder, tmp_path, capsys):
    """Image files, one of them unreadable (reported, exit code 1, the others explained), into
    RUN/explain-files; other data's test images into RUN/explain-<data>."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    files = sorted(str(f) for f in (image_folder / "test" / "cat").glob("*.png"))
    assert main(["explain", str(trained_run), *files, str(bad), "--method", "integrated-gradients"]) == 1
    captured = capsys.readouterr()
    assert f"could not read {bad}" in captured.out and "bad.png" in captured.err
    report = json.loads((trained_run / "explain-files" / "explanations.json").read_text())
    assert [r["image"] for r in report["images"]] == files
    assert "true" not in report["images"][0] and report["data"] is None
    assert sorted(np.load(trained_run / "explain-files" / "maps.npz").files) == ["predicted", "random_weights"]

    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", seed=5)
    assert main(["explain", str(trained_run), "--data", str(other), "--count", "2", "--select", "random"]) == 0
    folders = sorted(p.name for p in trained_run.iterdir() if p.name.startswith("explain-other"))
    assert len(folders) == 1
    assert json.loads((trained_run / folders[0] / "explanations.json").read_text())["data"] == str(other)


def test_flagged_maps_are_named_on_the_terminal(trained_run, capsys, monkeypatch):
    """Where the maps' mean rank correlation with random weights' reaches the flag, the terminal
    says not to read them as the model's reasons, and the report marks them."""
    monkeypatch.setattr(explain, "SANITY_FLAG", 0.0)
    assert main(["explain", str(trained_run), "--select", "random", "--count", "3", "--method", "occlusion"]) == 0
    assert "do not read them as its reasons" in capsys.readouterr().out
    report = json.loads((trained_run / "explain" / "explanations.json").read_text())
    assert report["sanity_check"]["flagged"] and report["sanity_check"]["flag_at"] == 0.0
