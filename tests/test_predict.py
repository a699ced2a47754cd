"""cifarlab predict: image files in, top-k classes out."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cifarlab import predict


def _files(image_folder, tmp_path):
    """Seven files: six images and, in the middle, one that is not an image."""
    files = sorted(str(f) for f in (image_folder / "test").rglob("*.png"))[:6]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    return files[:3] + [str(bad)] + files[3:]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_files_are_read_and_written_a_chunk_at_a_time(trained_run, image_folder, tmp_path, monkeypatch, fmt):
    """Chunked, the output is what one pass over all files gives; a table's or CSV's rows for a
    chunk are written before the next chunk is read, and no pass predicts more than a chunk."""
    files = _files(image_folder, tmp_path)
    whole = io.StringIO()
    assert predict.predict_files(str(trained_run), files, fmt=fmt, out=whole, min_confidence=0.5) == 1

    monkeypatch.setattr(predict, "CHUNK_FILES", 2)
    real_read, real_load = predict._read, predict.load_classifier
    out = io.StringIO()
    written_before_read, predicted = [], []

    def read(chunk, *args):
        written_before_read.append(len(out.getvalue()))
        return real_read(chunk, *args)

    def load(*args):
        model = real_load(*args)
        model_logits = model.logits
        model.logits = lambda x, *rest: (predicted.append(len(x)), model_logits(x, *rest))[1]
        return model

    monkeypatch.setattr(predict, "_read", read)
    monkeypatch.setattr(predict, "load_classifier", load)
    assert predict.predict_files(str(trained_run), files, fmt=fmt, out=out, min_confidence=0.5) == 1
    assert predicted == [2, 1, 2, 1] and len(written_before_read) == 4
    if fmt == "json":  # in full precision, other batches may change a probability's last bits
        got, want = json.loads(out.getvalue()), json.loads(whole.getvalue())
        # written as it comes, laid out as json.dump lays out the whole document
        assert out.getvalue() == json.dumps(got, indent=2) + "\n"
        probs = [[t.pop("probability") for t in r["top"]] for doc in (got, want) for r in doc["predictions"]]
        assert got == want and np.allclose(probs[:6], probs[6:], rtol=1e-4, atol=1e-7)
    else:
        assert out.getvalue() == whole.getvalue()
    assert all(a < b for a, b in zip(written_before_read, written_before_read[1:]))
    if fmt == "table":  # one column width for all rows, and the uncertain count over all chunks
        rows = out.getvalue().splitlines()
        assert len(rows) == 7 and len({r.index("  ") for r in rows[:6]}) == 1
        assert rows[-1].endswith("of 6 image(s) below confidence 0.5: uncertain")
    elif fmt == "json":
        assert len(json.loads(out.getvalue())["predictions"]) == 6


def test_unreadable_files_alone_give_no_rows(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = io.StringIO()
    assert predict.predict_files(str(trained_run), [str(bad), str(tmp_path / "missing.png")], fmt="csv", out=out) == 1
    assert out.getvalue().splitlines() == ["file,rank,class,probability"]
    out = io.StringIO()
    assert predict.predict_files(str(trained_run), [str(bad)], fmt="json", out=out) == 1
    doc = json.loads(out.getvalue())
    assert doc["predictions"] == [] and out.getvalue() == json.dumps(doc, indent=2) + "\n"
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "2 of 2 file(s) could not be read" in err


def test_a_runs_folder_predicts_with_the_mean_of_its_runs_probabilities(tmp_path, image_folder, capsys):
    """The folder of --runs N predicts as an ensemble: each run's probabilities with its own
    calibration, then their mean; the JSON names the runs and each one's calibration, and a
    table says what the probabilities are. --flag-unfamiliar (one run's threshold) is refused,
    and so are runs that classify different classes."""
    from conftest import tiny_config

    from cifarlab.cli import main
    from cifarlab.data.images import open_image, to_array
    from cifarlab.errors import CifarlabError
    from cifarlab.export import load_model
    from cifarlab.train import fit

    base = tmp_path / "set"
    fit(tiny_config(str(image_folder), str(base), runs=2), log=lambda s: None)
    assert main(["calibrate", str(base / "run-0")]) == 0  # run-1 stays uncalibrated
    capsys.readouterr()
    files = sorted(str(f) for f in (image_folder / "test").rglob("*.png"))[:5]
    out = io.StringIO()
    assert predict.predict_files(str(base), files, fmt="json", out=out, top=4) == 0
    doc = json.loads(out.getvalue())
    assert doc["runs"] == [str(base / "run-0"), str(base / "run-1")] and doc["probabilities"] == "mean of the runs'"
    assert doc["temperature"][0] > 0 and doc["temperature"][1] is None and doc["balanced_classes"] == [False, False]

    images = np.stack([to_array(open_image(open(f, "rb").read(), f), 3, (32, 32)) for f in files])
    each = [load_model(base / f"run-{k}").predict(images) for k in range(2)]
    assert not np.allclose(each[0], each[1], atol=1e-5)  # two seeds: an average that could be told from either
    mean = np.mean(each, axis=0)
    for r, p in zip(doc["predictions"], mean):
        classes = [t["class"] for t in r["top"]]
        assert classes == [load_model(base / "run-0").classes[i] for i in np.argsort(-p)]
        assert np.allclose([t["probability"] for t in r["top"]], np.sort(p)[::-1], atol=1e-5)

    assert main(["predict", str(base), *files[:2]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"the probabilities are the mean of the 2 runs' in {base}"
    assert main(["predict", str(base), files[0], "--flag-unfamiliar"]) == 2
    assert (f"--flag-unfamiliar needs the threshold of their ensemble that 'cifarlab ood {base}' fits") \
        in capsys.readouterr().err  # test_ood applies one

    from cifarlab.export import Ensemble

    with pytest.raises(CifarlabError, match="an ensemble needs at least one run"):
        Ensemble([])
    arch = base / "run-1" / "architecture.json"
    a = json.loads(arch.read_text())
    a["classes"] = a["classes"][::-1]
    arch.write_text(json.dumps(a))
    with pytest.raises(CifarlabError, match=r"the runs of '.*set' differ: run-0 classifies cat, dog, frog from 32x32x3 "
                                            r"images, run-1 frog, dog, cat from 32x32x3"):
        predict.predict_files(str(base), files, out=io.StringIO())
