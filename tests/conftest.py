"""Shared fixtures: small archives in the exact official CIFAR layouts, image folders, tiny runs."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def _avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ") + " "
    except OSError:
        return False


CAN_BUILD = _avx2() and (shutil.which("g++") or shutil.which("c++")) is not None
# Tests of cifarlab's own CPU kernels (cifarlab.cpu_kernels) need them built here.
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


@pytest.fixture(scope="session")
def _shared_kernels(tmp_path_factory) -> Path:
    """One folder for the compiled CPU kernels of the whole session: a build takes seconds, and
    every test that trains in a subprocess would otherwise compile them again (tests of the build
    itself point CIFARLAB_CACHE at a folder of their own)."""
    return tmp_path_factory.mktemp("kernels")


def _link_kernels(cache: Path, shared: Path) -> None:
    """Point ``cache``'s kernel folder at the session's (where links cannot be made, as for an
    unprivileged user on Windows, the cache builds its own)."""
    try:
        (cache / "kernels").symlink_to(shared, target_is_directory=True)
    except OSError:
        pass


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, _shared_kernels):
    """Every test gets its own cache (but for the compiled kernels) and never reaches the
    internet (mirror: a closed local port). The settings are this fixture's own, not the test's
    ``monkeypatch``, so that a test's ``monkeypatch.undo()`` leaves them in place: it once undid
    them and trained into the cache of whoever ran the tests."""
    cache = tmp_path_factory.mktemp("cache")
    _link_kernels(cache, _shared_kernels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(cache))
        mp.setenv("CIFARLAB_MIRROR", "http://127.0.0.1:9/")
        yield


@pytest.fixture
def real_data_cache(tmp_path_factory, _shared_kernels):
    """A cache shared by the tests on the shared JPEG copy, so that its 60,000 images are decoded
    once per session rather than once per test (which load decodes and which reads the cache is
    the tests' order; each asserts only what holds either way). Under pytest-xdist the workers
    share it too (the folder beside theirs), and the first to need it decodes it while the others
    wait, rather than each decoding beside it."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "real-data-cache"
    try:
        root.mkdir()
    except FileExistsError:
        pass
    else:
        _link_kernels(root, _shared_kernels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(root))
        if SHARED_JPEG.is_file():
            _decode_once(root)
        yield root


def _decode_once(root: Path) -> None:
    """Decode the shared JPEG copy into the cache ``root`` unless a test has, one process at a
    time (where there are no file locks, as on Windows, each test decodes or reads as it comes)."""
    try:
        import fcntl
    except ImportError:
        return
    from cifarlab.data import load_dataset

    with open(root / ".decoding.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not (root / ".decoded").exists():
            load_dataset(SHARED_JPEG)
            (root / ".decoded").touch()


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        dirs = sorted({str(Path(n).parent) for n in members})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def fake_images(n: int, seed: int) -> np.ndarray:
    """Images whose pixels encode their index (for order checks): (n, 3072) planar uint8."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return x


class _OfficialPickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Pickles as the official CIFAR python batches were pickled, by Python 2 with numpy 1:
    byte strings and numpy's own names as Python 2 ``str`` (SHORT_BINSTRING, BINSTRING), arrays rebuilt by
    ``numpy.core.multiarray._reconstruct``, dtypes as ``dtype('u1', 0, 1)`` with int flags
    (numpy 2 writes ``_codecs.encode`` calls, ``numpy._core`` and booleans)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj  # Python 2's str was bytes
        n = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct" and obj.__module__.startswith("numpy"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def reducer_override(self, obj):
        if isinstance(obj, np.dtype):
            make, (name, _, _), state = obj.__reduce__()
            return make, (name, 0, 1), state
        return NotImplemented


def official_pickle(obj) -> bytes:
    """``obj`` pickled as the official CIFAR python batches are (protocol 2, Python 2, numpy 1)."""
    out = io.BytesIO()
    _OfficialPickler(out, protocol=2).dump(obj)
    return out.getvalue()


def make_official(tmp: Path, key: str, n: int = 10, **kw) -> tuple[Path, dict]:
    """Write a small archive in the official layout of ``key``; returns its path and the truth."""
    rng = np.random.default_rng(0)
    truth: dict = {"train_x": [], "train_y": [], "test_x": [], "test_y": [], "coarse_train": [], "coarse_test": []}
    members: dict[str, bytes] = {}
    if key == "cifar10-python":
        folder = "cifar-10-batches-py"
        for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
            x = fake_images(n, i)
            y = rng.integers(0, 10, n).tolist()
            d = {b"batch_label": b"batch", b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n)]}
            members[f"{folder}/{name}"] = official_pickle(d)
            part = "test" if name == "test_batch" else "train"
            truth[f"{part}_x"].append(x)
            truth[f"{part}_y"] += y
        members[f"{folder}/batches.meta"] = official_pickle(
            {b"label_names": [c.encode() for c in kw.get("names", ["airplane", "automobile", "bird", "cat", "deer",
                                                                    "dog", "frog", "horse", "ship", "truck"])],
             b"num_cases_per_batch": n, b"num_vis": 3072})
        members[f"{folder}/readme.html"] = b"<html></html>"
    elif key == "cifar10-binary":
        folder = "cifar-10-batches-bin"
        for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
            x = fake_images(n, i)
            y = rng.integers(0, 10, n)
            members[f"{folder}/{name}"] = np.concatenate([y.astype(np.uint8)[:, None], x], 1).tobytes()
            part = "test" if name.startswith("test") else "train"
            truth[f"{part}_x"].append(x)
            truth[f"{part}_y"] += y.tolist()
        members[f"{folder}/batches.meta.txt"] = "\n".join(
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]).encode() + b"\n\n"
        members[f"{folder}/readme.html"] = b"<html></html>"
    elif key == "cifar100-python":
        folder = "cifar-100-python"
        for i, name in enumerate(["train", "test"]):
            x = fake_images(n, i)
            fine = rng.integers(0, 100, n).tolist()
            coarse = rng.integers(0, 20, n).tolist()
            members[f"{folder}/{name}"] = official_pickle(
                {b"filenames": [f"f{k}.png".encode() for k in range(n)], b"batch_label": b"b", b"fine_labels": fine,
                 b"coarse_labels": coarse, b"data": x})
            truth[f"{name}_x"].append(x)
            truth[f"{name}_y"] += fine
            truth[f"coarse_{name}"] += coarse
        members[f"{folder}/meta"] = official_pickle({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    elif key == "cifar100-binary":
        folder = "cifar-100-binary"
        for i, name in enumerate(["train.bin", "test.bin"]):
            x = fake_images(n, i)
            fine = rng.integers(0, 100, n)
            coarse = rng.integers(0, 20, n)
            members[f"{folder}/{name}"] = np.concatenate(
                [coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], x], 1).tobytes()
            part = name.split(".")[0]
            truth[f"{part}_x"].append(x)
            truth[f"{part}_y"] += fine.tolist()
            truth[f"coarse_{part}"] += coarse.tolist()
        members[f"{folder}/fine_label_names.txt"] = "\n".join(f"fine{i}" for i in range(100)).encode()
        members[f"{folder}/coarse_label_names.txt"] = "\n".join(f"coarse{i}" for i in range(20)).encode()
    else:
        raise ValueError(key)
    members.update(kw.get("extra", {}))
    for k, v in kw.get("replace", {}).items():
        members[f"{folder}/{k}"] = v
    from cifarlab.data.cifar import FORMATS

    path = _tar(tmp / FORMATS[key].archive_name, members)
    for part in ("train", "test"):
        truth[f"{part}_x"] = np.concatenate(truth[f"{part}_x"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        truth[f"{part}_y"] = np.array(truth[f"{part}_y"])
    truth["folder"] = folder
    truth["members"] = members
    return path, truth


def count_calls(monkeypatch, module, *names: str) -> dict[str, int]:
    """Wrap each ``module.<name>`` so that its calls are counted and still made; returns the
    counts, keyed by name (a test's view of which kernels a run reached)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*a, _real=getattr(module, name), _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, name, counted)
    return calls


def make_image_folder(root: Path, classes=("cat", "dog", "frog"), n_train: int = 6, n_test: int = 3,
                      size=(32, 32), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> Path:
    """An image folder train/<class>/*.png, test/<class>/*.png whose class is visible in the colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                arr = np.zeros((*size, 3), np.uint8)
                arr[..., ci % 3] = 200
                arr = (arr + rng.integers(0, 40, arr.shape)).astype(np.uint8)
                Image.fromarray(arr).convert(mode).save(d / f"{k:04d}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "imgs")


class Terminal(io.StringIO):
    """A stand-in for stderr on an interactive terminal, where progress bars show."""

    def isatty(self):
        return True


def tiny_config(data: str, out: str, **train):
    """A config for seconds-long CPU training runs in tests."""
    from cifarlab.config import resolve_config

    t = {"epochs": 1, "batch_size": 8, "out": out, "seed": 0, "threads": 1, "deterministic": True}
    t.update(train)
    return resolve_config("keras-book", overrides={"data": {"data": data, "val_split": 0.25},
                                                    "model": {"name": "keras-shallow"}, "train": t})


@pytest.fixture
def trained_run(tmp_path, image_folder) -> Path:
    from cifarlab.train import fit

    out = tmp_path / "run"
    fit(tiny_config(str(image_folder), str(out), epochs=2), log=lambda s: None)
    return out


def random_run(tmp_path: Path, name: str, prep: dict) -> Path:
    """A run folder of model ``name`` with random weights (4 classes a to d) and preprocessing
    ``prep``, its batch norms holding one random batch's statistics."""
    import torch

    from cifarlab.export import save_architecture, save_weights
    from cifarlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=4)
    model.train()
    for m in model.modules():  # a cumulative average: one batch's statistics, as a trained net's would be its data's
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():  # batch norms with statistics of their own, so eval mode is not identity (and a deep
        model(torch.randn(8, 3, 32, 32))  # net's activations do not grow block by block into saturated outputs)
    run = tmp_path / name
    run.mkdir()
    save_architecture(run, name, {"num_classes": 4}, ["a", "b", "c", "d"], (3, 32, 32), prep,
                      sum(p.numel() for p in model.parameters()))
    save_weights(run / "weights.safetensors", model)
    return run


def pytest_report_header(config):  # noqa: ARG001
    return f"shared JPEG copy: {'present' if SHARED_JPEG.is_file() else 'absent'} ({SHARED_JPEG})"


os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):  # noqa: ARG001
    """The property-based tests draw new examples on every run, which is how they find bugs (a
    reader's TypeError was found so), except where ``CIFARLAB_TEST_PROFILE=ci`` (``.ci/run``):
    there they draw the same examples every time, so that whether a change passes depends on
    the change alone. Set here, before the test modules make their settings from the profile."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)
    name = os.environ.get("CIFARLAB_TEST_PROFILE", "default")
    if name not in ("ci", "default"):
        raise pytest.UsageError(f"CIFARLAB_TEST_PROFILE={name!r} is not a test profile; use ci or leave it unset")
    settings.load_profile(name)


def write_keras_legacy(group, names: list[str], weights: list[np.ndarray], all_names: list[str],
                       as_bytes: bool = True) -> None:
    """Keras 2's ``save_weights`` layout: ``layer_names``, then per layer ``weight_names``; names
    as fixed-length bytes (Keras 2.2) or variable-length strings (tf-keras 2.21, Keras 3)."""
    import h5py

    def text(values):
        return np.array([v.encode() for v in values]) if as_bytes else np.array(values, dtype=h5py.string_dtype())

    group.attrs["layer_names"] = text(all_names)
    for n in all_names:
        g = group.create_group(n)
        if n in names:
            i = names.index(n)
            wn = [f"{n}/kernel:0", f"{n}/bias:0"]
            g.attrs["weight_names"] = text(wn)
            g[wn[0]], g[wn[1]] = weights[2 * i], weights[2 * i + 1]
        else:
            g.attrs["weight_names"] = np.array([], dtype="S1")


def dirichlet_draws(rng, n: int, hard: float = 1.0, classes: int = 4):
    """Probabilities of a model that is unsure in its own way (Dirichlet draws), and labels
    drawn from another rule than its probabilities, so that it is not calibrated: conformal
    sets hold their coverage for any model. ``hard`` < 1 makes class 0 the model's blind spot."""
    p = rng.dirichlet(np.full(classes, 0.7), n)
    w = np.sqrt(p) / np.sqrt(p).sum(1, keepdims=True)
    y = (w.cumsum(1) > rng.random((n, 1))).argmax(1)
    p[y == 0, 0] *= hard  # class 0's own images give it less probability
    return p / p.sum(1, keepdims=True), y
