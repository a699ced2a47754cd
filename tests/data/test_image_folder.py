"""Image folders and archives of them: layout, conversion, bad files, the decoded cache."""

from __future__ import annotations

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
from conftest import Terminal, make_image_folder
from PIL import Image

from cifarlab.data import balanced_subset, load_dataset, stratified_split
from cifarlab.data.cache import cache_dir
from cifarlab.errors import DataError


def test_folder_reads_classes_and_order(image_folder):
    ds = load_dataset(image_folder)
    assert ds.classes == ["cat", "dog", "frog"]
    assert ds.x_train.shape == (18, 32, 32, 3) and ds.x_test.shape == (9, 32, 32, 3)
    assert ds.test_paths[0] == "test/cat/0000.png" and ds.test_paths[-1] == "test/frog/0002.png"
    np.testing.assert_array_equal(ds.y_test, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # class is visible in the colour channel the fixture wrote
    assert ds.x_train[ds.y_train == 1][..., 1].mean() > 150


def test_decoding_shows_a_transient_progress_bar_on_a_terminal_only(image_folder, monkeypatch):
    """A first decode of a large data set takes a while: on an interactive stderr a bar counts the
    images and is cleared when done; piped to a file, stderr gets nothing."""
    import sys

    from cifarlab.data.folder import load_image_folder

    want = load_image_folder(image_folder, workers=1)
    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        got = load_image_folder(image_folder, workers=1)
        assert all(np.array_equal(got.x[k], want.x[k]) for k in ("train", "test"))
        shown = stream.getvalue()
        assert ("Decoding" in shown and "/27 " in shown) == bar, shown  # 18 training and 9 test images


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w"])
def test_archive_of_folder_with_wrapper_dir(tmp_path, image_folder, mode):
    path = tmp_path / f"data.tar{'.' + mode[2:] if ':' in mode else ''}"
    with tarfile.open(path, mode) as tf:
        tf.add(image_folder, arcname="mydata")
    a, b = load_dataset(path), load_dataset(image_folder)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.test_paths == b.test_paths


def test_grayscale_folder_keeps_one_channel(tmp_path):
    ds = load_dataset(make_image_folder(tmp_path / "g", mode="L"))
    assert ds.x_train.shape[-1] == 1


def test_mixed_sizes_and_modes_are_converted_with_notes(tmp_path):
    root = make_image_folder(tmp_path / "m")
    Image.new("L", (40, 20), 7).save(root / "train" / "cat" / "gray_big.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(root / "train" / "dog" / "rgba.png")
    Image.new("P", (32, 32)).save(root / "test" / "dog" / "pal.gif")
    ds = load_dataset(root)
    assert ds.x_train.shape[1:] == (32, 32, 3)
    joined = " ".join(ds.notes)
    assert "resized 1 image(s) to the most common size 32x32 (HxW, as --image-size takes it)" in joined
    assert "converted 3 image(s) to RGB" in joined


def test_the_most_common_size_is_named_height_first(tmp_path):
    """Photos 48 wide and 24 high are named 24x48, the order --image-size takes, so the size
    in the note can be given back to it."""
    root = make_image_folder(tmp_path / "w", size=(24, 48))
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "square.png")
    ds = load_dataset(root)
    assert ds.x_train.shape[1:3] == (24, 48)
    assert "resized 1 image(s) to the most common size 24x48 (HxW" in " ".join(ds.notes)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    root = make_image_folder(tmp_path / "s", mode="L")
    arr = np.full((32, 32), 65535 // 2, dtype=np.uint16)
    Image.fromarray(arr).save(root / "train" / "cat" / "deep.png")
    ds = load_dataset(root)
    row = ds.test_paths  # noqa: F841 - load must succeed
    vals = ds.x_train[..., 0]
    assert (vals == 127).all(axis=(1, 2)).any() or (vals == 128).all(axis=(1, 2)).any()


def test_no_class_folders(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    (tmp_path / "d" / "train" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no 'train/<class>/' folders|no class folders"):
        load_dataset(tmp_path / "d")


def test_empty_class_named(tmp_path):
    root = make_image_folder(tmp_path / "e")
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="train/zebra"):
        load_dataset(root)


def test_non_image_files_ignored_with_note(tmp_path, image_folder):
    (image_folder / "train" / "cat" / "notes.txt").write_text("hello")
    ds = load_dataset(image_folder)
    assert len(ds.y_train) == 18 and "ignored 1 file(s) without an image suffix" in ds.notes
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(image_folder, arcname=".")
    assert "ignored 1 file(s) without an image suffix" in load_dataset(path).notes


def test_images_outside_class_folders_are_counted_and_named(tmp_path, image_folder):
    png = (image_folder / "train" / "cat" / "0000.png").read_bytes()
    (image_folder / "train" / "cat" / "2019").mkdir()
    (image_folder / "train" / "cat" / "2019" / "a.png").write_bytes(png)
    (image_folder / "test" / "stray.png").write_bytes(png)
    (image_folder / "train" / ".ipynb_checkpoints").mkdir()  # hidden: neither a class nor counted
    (image_folder / "train" / ".ipynb_checkpoints" / "b.png").write_bytes(png)
    for path in (image_folder, tmp_path / "d.zip"):
        if path.suffix == ".zip":
            import shutil

            shutil.make_archive(str(path.with_suffix("")), "zip", image_folder)
        ds = load_dataset(path)
        assert ds.classes == ["cat", "dog", "frog"] and len(ds.y_train) == 18, path
        assert ("ignored 2 image(s) not directly in a class folder (first: test/stray.png); only "
                "train/<class>/<image> and test/<class>/<image> are read") in ds.notes, ds.notes
    # A class whose images all sit one level too deep: the error says where they are.
    (image_folder / "test" / "dog" / "jpg").mkdir()
    for f in sorted((image_folder / "test" / "dog").glob("*.png")):
        f.rename(image_folder / "test" / "dog" / "jpg" / f.name)
    with pytest.raises(DataError, match=r"test/dog hold no images .*3 image\(s\) sit in subfolders of them "
                                        r"\(first: test/dog/jpg/0000.png\).*move them up"):
        load_dataset(image_folder)


def test_corrupt_and_truncated_images(image_folder):
    good = (image_folder / "train" / "cat" / "0000.png").read_bytes()
    (image_folder / "train" / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    (image_folder / "train" / "dog" / "fake.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"2 unreadable image file\(s\)") as e:
        load_dataset(image_folder)
    assert "fake.jpg" in str(e.value) and "--skip-bad-images" in str(e.value)
    ds = load_dataset(image_folder, skip_bad_images=True)
    assert len(ds.y_train) == 18 and any("skipped 2" in n for n in ds.notes)


def _jpeg_with_orientation(a: np.ndarray, orientation: int | None, exif: bytes | None = None) -> bytes:
    im, buf = Image.fromarray(a), io.BytesIO()
    if orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = orientation  # the EXIF Orientation tag
        exif = ex.tobytes()
    im.save(buf, "JPEG", quality=95, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    from cifarlab.data.images import open_image, to_array

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = 255  # a white band on the left of a landscape image
    plain = to_array(open_image(_jpeg_with_orientation(wide, None), "plain.jpg"), 3)
    assert plain.shape == (20, 40, 3) and plain[:, :8].min() > 200
    # Orientation 6: stored sideways, shown turned 90 degrees clockwise, so the band is on top.
    turned = to_array(open_image(_jpeg_with_orientation(wide, 6), "phone.jpg"), 3)
    assert turned.shape == (40, 20, 3) and turned[:8].min() > 200 and turned[12:].max() < 50
    # A malformed EXIF block leaves the pixels as decoded rather than refusing the photo (Pillow
    # itself may warn about it on opening).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        odd = to_array(open_image(_jpeg_with_orientation(wide, None, exif=b"Exif\x00\x00MM\x00*junk"), "odd.jpg"), 3)
    assert odd.shape == (20, 40, 3)
    # The same through a folder, as training and prediction read it.
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(3):
                (tmp_path / "f" / split / c / f"{i}.jpg").write_bytes(_jpeg_with_orientation(wide, 6))
    ds = load_dataset(tmp_path / "f")
    assert ds.x_train.shape[1:] == (40, 20, 3) and ds.x_train[0, :8].min() > 200


def test_decompression_bomb_refused(image_folder, monkeypatch):
    import cifarlab.data.images as images

    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")  # compresses to a few kB
    (image_folder / "train" / "cat" / "bomb.png").write_bytes(buf.getvalue())
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_dataset(image_folder)


def test_decoded_cache_is_used_and_keyed_by_content(tmp_path, image_folder):
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(image_folder, arcname=".")
    first = load_dataset(path)
    second = load_dataset(path)
    assert "loaded from the decoded cache" in second.notes
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert second.test_paths == first.test_paths and second.train_paths == first.train_paths
    assert second.test_origin == "named" and second.train_paths[0] == "train/cat/0000.png"
    # an entry written before the cache kept the training paths is decoded again
    (entry,) = (cache_dir() / "decoded").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    del meta["train_paths"], meta["test_origin"]
    (entry / "meta.json").write_text(json.dumps(meta))
    again = load_dataset(path)
    assert "loaded from the decoded cache" not in again.notes and again.train_paths == first.train_paths
    third = load_dataset(path)  # the stale entry was replaced, not left to be decoded again every time
    assert "loaded from the decoded cache" in third.notes and third.train_paths == first.train_paths
    assert [p.name for p in (cache_dir() / "decoded").iterdir()] == [entry.name]
    # a damaged entry (an array file emptied or cut short) is decoded again, not a crash
    for damage in (b"", (entry / "x_test.npy").read_bytes()[:-50]):
        (entry / "x_test.npy").write_bytes(damage)
        again = load_dataset(path)
        assert "loaded from the decoded cache" not in again.notes
        np.testing.assert_array_equal(again.x_test, first.x_test)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image_folder / "train" / "cat" / "new.png")
    with tarfile.open(path, "w:gz") as tf:
        tf.add(image_folder, arcname=".")
    third = load_dataset(path)
    assert "loaded from the decoded cache" not in third.notes and len(third.y_train) == 19


def test_stratified_split_and_subset():
    y = np.repeat(np.arange(10), 100)
    tr, va = stratified_split(y, 0.2, seed=1)
    assert len(va) == 200 and set(np.bincount(y[va])) == {20}
    assert not set(tr) & set(va)
    tr2, va2 = stratified_split(y, 0.2, seed=1)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=2)[1])
    sub = balanced_subset(y, 50, seed=0)
    assert len(sub) == 50 and set(np.bincount(y[sub])) == {5}
    for seed in range(20):  # fewer images than classes: each from another class
        few = balanced_subset(y, 7, seed)
        assert len(few) == 7 and len(set(y[few])) == 7
    assert not np.array_equal(balanced_subset(y, 7, 0), balanced_subset(y, 7, 1))
    # A rare class still gets an image where there are enough for every class: one of 2 in 1,000
    # (stratification rounds its share of 20 down to none) and one of 1 (stratification fails)
    for rare in (np.r_[np.repeat(np.arange(9), 111)[:998], 9, 9], np.r_[np.repeat(np.arange(9), 111), 9]):
        for seed in range(10):
            sub = balanced_subset(rare, 20, seed)
            assert len(set(sub)) == 20 and set(rare[sub]) == set(range(10)), seed
            assert np.array_equal(sub, balanced_subset(rare, 20, seed))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="strictly between 0 and 1"):
            stratified_split(y, bad, 0)
    # Too few images to hold out one per class: the counts that fall short are named.
    with pytest.raises(DataError, match=r"0.2 of 15 images.*10 class\(es\) the validation part \(3 images\).*"
                                        r"need at least 10.*smallest has 1.*--subset"):
        stratified_split(np.r_[np.arange(10), np.zeros(5, int)], 0.2, 0)


def test_truncated_xz_archive(tmp_path, image_folder):
    path = tmp_path / "d.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        tf.add(image_folder, arcname=".")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(path)


def test_zip_of_folder_as_macos_makes_it(tmp_path, image_folder):
    """A zip with a wrapper folder, folder entries, and the __MACOSX/ and '._' copies that
    macOS's 'Compress' adds (they carry image suffixes but are not images)."""
    import zipfile

    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(image_folder.rglob("*")):
            rel = f.relative_to(image_folder).as_posix()
            if f.is_dir():
                zf.writestr(f"mydata/{rel}/", b"")
            else:
                zf.write(f, f"mydata/{rel}")
                zf.writestr(f"__MACOSX/mydata/{f.parent.relative_to(image_folder).as_posix()}/._{f.name}", b"\0\5junk")
    a, b = load_dataset(path, use_cache=False), load_dataset(image_folder, use_cache=False)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.classes == b.classes and a.test_paths == b.test_paths


def test_image_size_resizes_every_image_from_its_file(tmp_path):
    """image_size resizes each image once, from its decoded file (bilinear, as predict does),
    whatever its own size; the cache keeps the resized and the native arrays apart."""
    from cifarlab.data.images import open_image, to_array

    root = make_image_folder(tmp_path / "photos", size=(48, 64))
    odd = root / "train" / "cat" / "0000.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(odd)
    ds = load_dataset(root, image_size=(24, 16))
    assert ds.x_train.shape[1:] == (24, 16, 3) and ds.x_test.shape[1:] == (24, 16, 3)
    want = to_array(open_image(odd.read_bytes(), str(odd)), 3, (24, 16))
    assert np.array_equal(ds.x_train[0], want)  # from the 30x20 file, not from the most common 48x64
    assert any("resized 27 image(s) to 24x16 (the image size asked for, HxW)" in n for n in ds.notes), ds.notes
    native = load_dataset(root)
    assert native.x_train.shape[1:] == (48, 64, 3) and "loaded from the decoded cache" not in native.notes
    again = load_dataset(root, image_size=(24, 16))
    assert "loaded from the decoded cache" in again.notes and np.array_equal(again.x_train, ds.x_train)
    for bad in ((0, 16), (24,), (24, 16, 3)):
        with pytest.raises(DataError, match="image size .* is not valid; expected \\(height, width\\)"):
            load_dataset(root, image_size=bad)


def test_decoding_workers_give_what_one_process_gives(tmp_path, monkeypatch):
    """Large folders are decoded in worker processes, and resized to an asked-for size after;
    the result is the same as decoding in this process, grey images included."""
    from cifarlab.data import folder

    root = make_image_folder(tmp_path / "photos", size=(48, 64))
    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(root / "train" / "dog" / "grey.png")
    one = folder.load_image_folder(root, workers=1, size=(24, 16))
    monkeypatch.setattr(folder, "POOL_MIN_FILES", 0)
    pooled = folder.load_image_folder(root, workers=2, size=(24, 16))
    for s in folder.SPLITS:
        assert pooled.paths[s] == one.paths[s] and np.array_equal(pooled.x[s], one.x[s])
    assert pooled.notes == one.notes and "converted 1 image(s) to RGB" in one.notes
    assert one.x["train"][one.paths["train"].index("train/dog/grey.png")].shape == (24, 16, 3)


def test_image_size_resizes_data_read_as_arrays(tmp_path):
    """An official archive (read as arrays) is resized image by image, with a note; at its own
    size it is returned as read."""
    from conftest import make_official

    from cifarlab.data import resized
    from cifarlab.data.images import to_array

    path, _ = make_official(tmp_path, "cifar10-python", n=4)
    plain = load_dataset(path, allow_unverified=True)
    big = load_dataset(path, allow_unverified=True, image_size=(40, 48))
    assert big.x_train.shape == (20, 40, 48, 3) and big.x_test.shape == (4, 40, 48, 3)
    assert np.array_equal(big.x_test[2], to_array(Image.fromarray(plain.x_test[2]), 3, (40, 48)))
    assert np.array_equal(big.y_train, plain.y_train) and big.test_paths == plain.test_paths
    assert "resized all 24 image(s) from 32x32 to 40x48 (the image size asked for, HxW)" in big.notes
    assert resized(plain, (32, 32)) is plain
    grey = resized(type(plain)(plain.x_train[..., :1], plain.y_train, plain.x_test[..., :1], plain.y_test,
                               plain.classes, "s", "k"), (8, 8))
    assert grey.x_train.shape == (20, 8, 8, 1)


def _class_folders(root, counts, size=(16, 16)):
    """<class>/<image> folders alone, ``counts`` images per class, each image's colour its own."""
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{k:03d}.png")
    return root


def test_class_folders_alone_have_a_test_split_held_out_by_path(tmp_path):
    """<class>/<image> without train/ and test/: each class's test_split is held out, chosen by
    the paths alone (the same on every load, whatever the order or the cache), with a note."""
    import hashlib

    root = _class_folders(tmp_path / "flowers", {"daisy": 10, "rose": 7, "tulip": 5})
    Image.new("RGB", (16, 16)).save(root / "loose.png")  # not in a class folder
    (root / "rose" / "notes.txt").write_text("not an image")  # counted as ignored
    (root / "rose" / ".DS_Store").write_bytes(b"hidden")  # hidden: not counted
    (root / "rose" / "deeper").mkdir()
    Image.new("RGB", (16, 16)).save(root / "rose" / "deeper" / "x.png")
    ds = load_dataset(root)
    assert ds.classes == ["daisy", "rose", "tulip"] and ds.kind == "image-folder"
    assert np.bincount(ds.y_test).tolist() == [2, 1, 1] and np.bincount(ds.y_train).tolist() == [8, 6, 4]
    by_hash = sorted((f"daisy/{k:03d}.png" for k in range(10)), key=lambda n: hashlib.sha256(
        f"{n}".encode()).hexdigest())
    assert [p for p in ds.test_paths if p.startswith("daisy/")] == sorted(by_hash[:2])
    want = np.asarray(Image.open(root / ds.test_paths[0]))
    assert np.array_equal(ds.x_test[0], want)
    notes = " ".join(ds.notes)
    assert "no train/ and test/ folders: read 3 class folders, and held out 0.2 of each class's images" in notes
    assert "(4 of 22)" in notes
    assert "ignored 2 image(s) not directly in a class folder" in notes and "only <class>/<image> are read" in notes
    assert "ignored 1 file(s) without an image suffix" in ds.notes
    assert ds.test_origin == "held-out" and len(ds.train_paths) == 18 and not set(ds.train_paths) & set(ds.test_paths)
    again = load_dataset(root)
    assert "loaded from the decoded cache" in again.notes and again.test_paths == ds.test_paths
    assert again.train_paths == ds.train_paths and again.test_origin == "held-out"
    quarter = load_dataset(root, test_split=0.5)
    assert np.bincount(quarter.y_test).tolist() == [5, 4, 2]  # Python's round: 3.5 to 4, 2.5 to 2 (half to even)
    assert "loaded from the decoded cache" not in quarter.notes


def test_class_folders_split_moves_little_when_images_are_added(tmp_path):
    root = _class_folders(tmp_path / "c", {"a": 40, "b": 40})
    before = set(load_dataset(root, use_cache=False).test_paths)
    _class_folders(tmp_path / "extra", {"a": 1})
    (tmp_path / "extra" / "a" / "000.png").rename(root / "a" / "new.png")
    after = set(load_dataset(root, use_cache=False).test_paths)
    assert len(before - after) <= 1 and len(after - before) <= 1


def test_class_folders_in_an_archive_and_their_errors(tmp_path):
    root = _class_folders(tmp_path / "pets", {"cat": 5, "dog": 5})
    Image.new("RGB", (16, 16)).save(root / "cover.png")  # beside the class folders: not read
    tar = tmp_path / "pets.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(root, arcname="pets")  # one wrapper folder, as archiving a folder makes
    ds = load_dataset(tar)
    assert ds.classes == ["cat", "dog"] and len(ds.x_test) == 2 and ds.test_paths[0].startswith("cat/")
    assert any("ignored 1 image(s) not directly in a class folder (first: cover.png)" in n for n in ds.notes)
    (root / "cover.png").unlink()
    _class_folders(root, {"lynx": 1})
    with pytest.raises(DataError, match="class folder 'lynx' holds 1 image\\(s\\), too few to hold out a test split"):
        load_dataset(root)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(DataError, match="no class folders found.*or <class>/<image> alone"):
        load_dataset(loose)
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(DataError, match="--test-split .* is not valid; it must lie strictly between 0 and 1"):
            load_dataset(root, test_split=bad)


def test_test_split_is_named_as_ignored_where_the_data_has_test_images(tmp_path, image_folder):
    from conftest import make_official

    archive, _ = make_official(tmp_path, "cifar10-python", n=4)
    for data in (image_folder, image_folder, archive):  # the folder decoded, then from the cache
        ds = load_dataset(data, test_split=0.3, allow_unverified=True)
        ignored = [n for n in ds.notes if n.startswith("--test-split 0.3 applies to a folder of class folders alone "
                                                       "(or images named by --labels); ignored")]
        assert len(ignored) == 1 and ignored[0].endswith(f"({ds.kind}) names its own test images"), ds.notes
    assert len(load_dataset(image_folder, test_split=0.3).x_test) == 9

