"""Property-based tests: on any input the readers return valid data or raise the tool's own error."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
from conftest import write_keras_legacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifarlab.data import folder
from cifarlab.data.cifar import FORMATS, parse_binary_batch, parse_python_batch
from cifarlab.data.images import open_image, to_array
from cifarlab.errors import CifarlabError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=3 * 3074 + 7), st.sampled_from(list(FORMATS.values())), st.sampled_from(["fine", "coarse"]))
def test_binary_reader(data, fmt, mode):
    if not fmt.binary:
        return
    try:
        s = parse_binary_batch(data, "fuzz.bin", fmt, mode)
    except CifarlabError:
        return
    assert s.x.dtype == np.uint8 and s.x.shape[1:] == (32, 32, 3) and len(s.x) == len(s.y) >= 1
    assert s.y.min() >= 0 and s.y.max() < (10 if fmt.dataset == "cifar10" else 100 if mode == "fine" else 20)


def _pickles():
    leaf = st.one_of(st.integers(-5, 300), st.binary(max_size=8), st.text(max_size=5), st.none(), st.floats())
    arr = st.builds(lambda n, w, d: np.zeros((n, w), dtype=d), st.integers(0, 3), st.sampled_from([3072, 10]),
                    st.sampled_from([np.uint8, np.float32, np.int64]))
    value = st.one_of(leaf, arr, st.lists(leaf, max_size=4), st.lists(st.integers(-2, 120), max_size=4))
    keys = st.sampled_from([b"data", b"labels", b"fine_labels", b"coarse_labels", b"filenames", "data", b"x"])
    return st.dictionaries(keys, value, max_size=5)


@FUZZ
@given(_pickles(), st.integers(2, 5), st.sampled_from(["cifar10-python", "cifar100-python"]))
def test_pickle_reader_structured(obj, protocol, key):
    _check_python(pickle.dumps(obj, protocol=protocol), key)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["cifar10-python", "cifar100-python"]))
def test_pickle_reader_random_bytes(data, key):
    _check_python(data, key)


@FUZZ
@given(st.binary(min_size=1, max_size=60), st.integers(0, 200))
def test_pickle_reader_mutated_real_batch(patch, at):
    good = pickle.dumps({b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    data = good[:at] + patch + good[at + len(patch):]
    _check_python(data, "cifar10-python")


def _check_python(data, key):
    try:
        s = parse_python_batch(data, "fuzz", FORMATS[key])
    except CifarlabError:
        return
    assert s.x.dtype == np.uint8 and s.x.shape[1:] == (32, 32, 3) and len(s.x) == len(s.y)


@FUZZ
@given(st.binary(max_size=600))
def test_image_decoder(data):
    try:
        im = open_image(data, "fuzz.png")
    except CifarlabError:
        return
    a = to_array(im, 3, (8, 8))
    assert a.shape == (8, 8, 3) and a.dtype == np.uint8


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["train", "test", "x", "train/a", ""]),
                          st.sampled_from(["a", "b", ".h", ""]),
                          st.sampled_from(["1.png", "2.jpg", "n.txt", ""]),
                          st.one_of(st.just(PNG), st.binary(max_size=30))), max_size=8))
def test_image_folder_archive_reader(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("fz") / "d.tar"
    with tarfile.open(path, "w") as tf:
        for split, cls, name, data in entries:
            member = "/".join(p for p in (split, cls, name) if p) or "x"
            ti = tarfile.TarInfo(member)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    try:
        fd = folder.load_image_folder(path, workers=1)
    except CifarlabError:
        return
    for s in ("train", "test"):
        assert fd.x[s].dtype == np.uint8 and fd.x[s].ndim == 4 and len(fd.x[s]) == len(fd.y[s]) >= 1
        assert fd.y[s].max() < len(fd.classes)


_KERAS_MUTATIONS = st.lists(st.tuples(
    st.sampled_from(["drop", "reshape", "strings", "layer_names", "weight_names", "model_config", "scalar"]),
    st.integers(0, 5), st.lists(st.integers(0, 4), max_size=4),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)),
    max_size=4)  # HDF5 strings are UTF-8 without NUL


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_KERAS_MUTATIONS, st.booleans())
def test_keras_weights_reader_mutated_file(tmp_path_factory, mutations, whole_model):
    """A small valid save_weights file (keras-shallow on 2x2 images) with random damage: the
    import either succeeds, with a run folder that loads, or raises the tool's own error."""
    import json

    import h5py

    import cifarlab
    from cifarlab.keras_files import import_keras
    from cifarlab.models import create_model
    from cifarlab.models.keras_layout import to_keras

    tmp = tmp_path_factory.mktemp("keras")
    weights = to_keras(create_model("keras-shallow", img_size=2))
    names = ["conv2d", "dense", "dense_1"]
    with h5py.File(tmp / "w.h5", "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        write_keras_legacy(root, names, weights, names + ["flatten"], as_bytes=False)
        for op, i, dims, text in mutations:
            n = names[i % 3]
            key = f"{n}/{n}/{'kernel' if i % 2 else 'bias'}:0"
            if op == "drop" and key in root:
                del root[key]
            elif op == "reshape" and key in root:
                del root[key]
                root[key] = np.zeros(dims, np.float32)
            elif op == "strings" and key in root:
                del root[key]
                root[key] = np.array([text], dtype=h5py.string_dtype())
            elif op == "scalar" and key in root:
                del root[key]
                root[key] = np.int64(len(text))
            elif op == "layer_names":
                root.attrs["layer_names"] = np.array([text] + names[:i % 4], dtype=h5py.string_dtype())
            elif op == "weight_names" and n in root:
                root[n].attrs["weight_names"] = np.array([text] * (i % 3), dtype=h5py.string_dtype())
            elif op == "model_config":
                f.attrs["model_config"] = text if i % 2 else json.dumps({"config": {"layers": dims}})
    try:
        run = import_keras(tmp / "w.h5", tmp / "run", image_size=(2, 2), log=lambda s: None)
    except CifarlabError:
        assert not (tmp / "run").exists()
        return
    model = cifarlab.load_model(run)
    assert model.predict(np.zeros((1, 2, 2, 3), np.uint8)).shape == (1, 10)


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.tuples(st.sampled_from(["1", "2.png", "a/3", "id", "x", "", " ", '"', "train/1"]),
                                    st.sampled_from(["cat", "dog", "label", "", "7", "\t"]),
                                    st.sampled_from([",", ";", "\t", ",,"])), max_size=8)
                 .map(lambda rows: "".join(f"{f}{sep}{c}\n" for f, c, sep in rows).encode())))
def test_labels_file_reader(tmp_path_factory, data):
    """Any bytes as a labels file, matched with a few images: rows assigned, or the tool's error."""
    from cifarlab.data import labels_csv

    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_bytes(data)
    try:
        rows = labels_csv.read_rows(path)
        prefix, by_class, notes = labels_csv.assign(["1.png", "2.png", "a/3.jpg", "notes.txt"], rows, "train")
    except CifarlabError:
        return
    named = [n for members in by_class.values() for n in members]
    assert prefix == "" and len(named) == len(set(named)) and set(named) <= {"1.png", "2.png", "a/3.jpg"}
    assert sorted(labels_csv.class_order(by_class)) == sorted(by_class)
    assert notes[0].endswith(f": {len(named)} image(s) in {len(by_class)} classes")


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda shape, dtype: _npy(np.zeros(shape, dtype)),
                           st.lists(st.integers(0, 33), min_size=0, max_size=4).map(tuple),
                           st.sampled_from([np.uint8, np.int64, np.float32, object]))),
       st.one_of(st.binary(max_size=100),
                 st.builds(lambda n, lo, dtype: _npy((np.arange(n) + lo).astype(dtype)),
                           st.integers(0, 40), st.integers(-3, 12), st.sampled_from([np.int64, np.uint8, np.float64]))),
       st.integers(0, 300))
def test_cifar10_1_reader(tmp_path_factory, data, labels, cut):
    """Any CIFAR-10.1 data and labels files (arrays of any shape and type, or any bytes, cut
    short): a test set of CIFAR-10's classes, or the tool's error."""
    from cifarlab.data import reproductions

    folder = tmp_path_factory.mktemp("c101")
    (folder / "cifar10.1_v6_data.npy").write_bytes(data[:len(data) - cut] if cut < len(data) else data)
    (folder / "cifar10.1_v6_labels.npy").write_bytes(labels)
    try:
        ds = reproductions.load(folder)
    except CifarlabError:
        return
    assert ds.x_test.dtype == np.uint8 and ds.x_test.shape[1:] == (32, 32, 3) and len(ds.x_test) == len(ds.y_test)
    assert ds.y_test.dtype == np.int64 and len(ds.y_test) >= 1 and 0 <= ds.y_test.min() <= ds.y_test.max() <= 9


_ARRAY = st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                   st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
                   st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, "U3", object]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "classes", "other"]),
                       st.one_of(_ARRAY, st.builds(lambda n, lo: np.arange(n) + lo, st.integers(0, 6),
                                                   st.integers(-2, 3))), max_size=6),
       st.integers(0, 400), st.booleans())
def test_keras_arrays_reader(tmp_path_factory, arrays, cut, single):
    """Any .npz of Keras' array names (any shapes and types, objects among them, the file cut
    short), or np.save's one array under an .npz name (``single``): a data set whose images are
    uint8 (N, H, W, C) with a label per image, each a class, or the tool's error."""
    from cifarlab.data import arrays as arrays_format

    path = tmp_path_factory.mktemp("npz") / "data.npz"
    buf = io.BytesIO()
    if single:
        np.save(buf, next(iter(arrays.values()), np.zeros(0)))
    else:
        np.savez(buf, **arrays)
    data = buf.getvalue()
    path.write_bytes(data[:len(data) - cut] if 0 < cut < len(data) else data)
    assert arrays_format.detect(path)  # by its name: load names what is wrong with it
    try:
        ds = arrays_format.load(path, 0.2)
    except CifarlabError:
        return
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] in (1, 3) and len(x) == len(y)
        assert y.dtype == np.int64 and (len(y) == 0 or 0 <= y.min() <= y.max() < len(ds.classes))
    assert len(ds.x_train) + len(ds.x_test) >= 1 and len(set(ds.classes)) == len(ds.classes)


def test_the_ci_profile_draws_the_same_examples_every_time():
    """``.ci/run``'s profile (tests/conftest.py): a change passes or fails there on its own merits,
    not on the examples a run happened to draw."""
    assert settings.get_profile("ci").derandomize
    assert not settings.get_profile("default").derandomize
