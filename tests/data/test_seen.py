"""What a run trained on, kept as hashes, and the test images chosen from it on other data."""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab.data import Dataset, every_image_as_test, seen
from cifarlab.errors import DataError


def _images(n: int, seed: int, size=(4, 4)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def _held_out(x_train, x_test, train_paths, test_paths, source="data") -> Dataset:
    """A data set whose test split was held out of class folders, labels from the paths."""
    def labels(paths):
        return np.array([0 if p.startswith("cat/") else 1 for p in paths], np.int64)

    return Dataset(x_train, labels(train_paths), x_test, labels(test_paths), ["cat", "dog"], source, "image-folder",
                   test_paths=list(test_paths), train_paths=list(train_paths), test_origin="held-out")


def _names(prefix: str, n: int) -> list[str]:
    return [f"{('cat', 'dog')[i % 2]}/{prefix}{i:03d}.png" for i in range(n)]


def test_pixel_hashes_tell_images_apart_and_count_their_shape():
    x = _images(50, 0)
    h = seen.pixel_hashes(x)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 50
    assert (seen.pixel_hashes(x[::-1].copy()) == h[::-1]).all()
    y = x.copy()
    y[7, 3, 3, 2] ^= 1  # one bit of one pixel
    assert (seen.pixel_hashes(y) != h).sum() == 1
    # the same bytes in another shape are another image
    assert seen.pixel_hashes(x.reshape(50, 8, 2, 3))[0] != h[0]
    assert seen.pixel_hashes(x[:0]).shape == (0,)
    assert (seen.pixel_hashes(x, [3, 1]) == h[[3, 1]]).all() and seen.pixel_hashes(x, []).shape == (0,)


def test_record_reads_back_and_a_bad_record_is_named(tmp_path):
    x = _images(6, 1)
    seen.record(tmp_path / seen.FILE, x, range(6), _names("a", 6), trained=[0, 2, 3, 5])
    pixels, paths, trained, inherited = seen.read(tmp_path)
    assert sorted(trained.tolist()) == sorted(seen.pixel_hashes(x, [0, 2, 3, 5]).tolist())
    assert inherited.dtype == np.uint64 and len(inherited) == 0
    assert sorted(pixels.tolist()) == sorted(seen.pixel_hashes(x).tolist())
    assert sorted(paths.tolist()) == sorted(seen.path_hashes(_names("a", 6)).tolist())
    assert seen.read(tmp_path / "none") is None
    (tmp_path / seen.FILE).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=f"{seen.FILE}: not a readable record of a run's images"):
        seen.read(tmp_path)


def test_a_fine_tunes_record_keeps_what_its_starting_weights_learnt_from(tmp_path):
    """A run started from another run's weights records as inherited the images that run
    trained on (not those it validated on, which it only measured itself on): its own weights
    learnt from them, so they count as seen (``saw``) and learnt from (``learnt``), and the
    rows of any data with their pixels are found (``inherited_rows``, ``learnt_from``). A record
    of an older cifarlab, without the images it trained on, does not tell (``learnt`` None)."""
    from safetensors.numpy import save

    x = _images(10, 30)
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir(), child.mkdir()
    seen.record(parent / seen.FILE, x, [0, 1, 2, 3], _names("a", 4), trained=[0, 1, 2])  # validated on 3
    assert len(seen.read(parent).inherited) == 0 and len(seen.inherited_rows(parent, x)) == 0
    assert sorted(seen.read(parent).learnt.tolist()) == sorted(seen.pixel_hashes(x, [0, 1, 2]).tolist())
    seen.record(child / seen.FILE, x, [5, 6, 3], _names("b", 3), [5, 6], inherited=seen.read(parent).learnt)
    rec = seen.read(child)
    assert sorted(rec.inherited.tolist()) == sorted(seen.pixel_hashes(x, [0, 1, 2]).tolist())
    assert sorted(rec.saw.tolist()) == sorted(seen.pixel_hashes(x, [0, 1, 2, 3, 5, 6]).tolist())
    assert sorted(rec.learnt.tolist()) == sorted(seen.pixel_hashes(x, [0, 1, 2, 5, 6]).tolist())
    # the same pixels elsewhere in other data are found; the rows asked about are searched alone
    shuffled = x[[9, 2, 8, 0, 3]]
    assert seen.inherited_rows(child, shuffled).tolist() == [1, 3]
    assert seen.inherited_rows(child, shuffled, np.array([3, 4, 0])).tolist() == [3]
    assert seen.learnt_from(child, shuffled, np.array([4])).tolist() == [1, 3, 4]
    # a grandchild inherits what the child learnt from, the parent's images with it
    grand = tmp_path / "grand"
    grand.mkdir()
    seen.record(grand / seen.FILE, x, [8], [], [8], inherited=rec.learnt)
    assert seen.inherited_rows(grand, x).tolist() == [0, 1, 2, 5, 6]
    # an older record: its images, with neither those it trained on nor any inherited
    old = tmp_path / "old"
    old.mkdir()
    tensors = {"pixels": np.sort(seen.pixel_hashes(x, [0, 1])), "paths": np.zeros(0, np.uint64)}
    (old / seen.FILE).write_bytes(save(tensors, metadata={"format": "cifarlab seen images 1"}))
    assert seen.read(old).learnt is None and len(seen.read(old).saw) == 2


def test_a_fine_tune_is_not_tested_on_what_its_starting_weights_learnt_from(tmp_path):
    """On other data, the images the starting weights learnt from are left out of the test
    images too; on the run's own data, its held-out split stays, with a note counting them."""
    x_tr, x_te = _images(8, 31), _images(4, 32)
    tr_names, te_names = _names("t", 8), _names("h", 4)
    parent_x = np.concatenate([x_te[:1], _images(3, 33)])  # one of the child's test images among them
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir(), child.mkdir()
    seen.record(parent / seen.FILE, parent_x, range(4), [], range(4))
    seen.record(child / seen.FILE, x_tr, range(8), tr_names, range(6), inherited=seen.read(parent).learnt)
    own = _held_out(x_tr, x_te, tr_names, te_names)
    ds, note = seen.test_split_for(own, [child])
    assert ds is own and note == ("1 of the 4 test images of data have the pixels of an image the run trained or "
                                  "validated on, or that the weights it started from had learnt from; they stay in, as "
                                  "the run's own held-out test split")
    other = _held_out(parent_x[:3], parent_x[3:], _names("p", 3), _names("q", 1), source="other")
    with pytest.raises(DataError, match="every one of its 4 images has the pixels of an image the run trained or "
                                        "validated on, or that the weights it started from had learnt from"):
        seen.test_split_for(other, [child])
    mixed = _held_out(np.concatenate([parent_x[:2], _images(2, 34)]), _images(1, 35), _names("m", 4), _names("n", 1),
                      source="mixed")
    ds, note = seen.test_split_for(mixed, [child])
    assert len(ds.x_test) == 3 and note.endswith(": 3 of 5, leaving out 2 with the pixels of an image the run trained "
                                                 "or validated on, or that the weights it started from had learnt "
                                                 "from")


def test_every_image_as_test_keeps_each_image_with_its_label_and_path():
    x_tr, x_te = _images(5, 2), _images(3, 3)
    ds = _held_out(x_tr, x_te, ["dog/b.png", "cat/e.png", "cat/a.png", "dog/d.png", "cat/c2.png"],
                   ["cat/c.png", "dog/a.png", "dog/z.png"])
    every = every_image_as_test(ds)
    assert every.test_paths == sorted(ds.train_paths + ds.test_paths) and len(every.x_train) == 0
    by_path = dict(zip(ds.train_paths + ds.test_paths, np.concatenate([x_tr, x_te])))
    for p, img, label in zip(every.test_paths, every.x_test, every.y_test):
        assert (img == by_path[p]).all() and label == (0 if p.startswith("cat/") else 1)
    assert every.test_origin == "unseen" and every.image_shape == ds.image_shape


def test_own_data_keeps_its_held_out_split_other_data_is_tested_on_every_unseen_image(tmp_path):
    x_tr, x_te = _images(8, 4), _images(4, 5)
    tr_names, te_names = _names("t", 8), _names("h", 4)
    own = _held_out(x_tr, x_te, tr_names, te_names)
    run = tmp_path / "run"
    run.mkdir()
    # a subset: the run's own data all the same
    seen.record(run / seen.FILE, x_tr, [5, 0, 1, 2, 3, 4], tr_names[:6], [5, 0, 1, 2])
    ds, note = seen.test_split_for(own, [run])
    assert ds is own and note is None and seen.trained_on(own, [run]) is True

    new = _held_out(_images(6, 6), _images(2, 7), _names("n", 6), _names("m", 2), source="new")
    ds, note = seen.test_split_for(new, [run])
    assert len(ds.x_test) == 8 and len(ds.x_train) == 0
    assert note == ("new is not the data the run was trained on (its training images are not all in it), so every "
                    "image is a test image, not the held-out split alone: 8 of 8")
    assert seen.trained_on(new, [run]) is False

    # the run's data with images added: the held-out split moves, so the images it saw are left out by their
    # pixels, wherever they now lie (two of them among the new test images)
    grown = _held_out(np.concatenate([x_tr[2:], _images(3, 8)]), np.concatenate([x_tr[:2], x_te]),
                      tr_names[2:] + _names("g", 3), tr_names[:2] + te_names, source="grown")
    ds, note = seen.test_split_for(grown, [run])
    kept = set(seen.pixel_hashes(ds.x_test).tolist())
    assert not kept & set(seen.pixel_hashes(x_tr[:6]).tolist())
    assert len(ds.x_test) == 15 - 6 and note.endswith(": 9 of 15, leaving out 6 with the pixels of an image the "
                                                      "run trained or validated on")
    assert ds.test_paths == sorted(set(grown.train_paths + grown.test_paths) - set(tr_names[:6]))


def test_other_images_under_the_runs_own_names_are_other_data(tmp_path):
    """A folder whose images bear the names of the run's (cat/0000.png ...) but are other
    images is not the run's data: a sample of the images found by name must have the pixels the
    run saw. Its own data with one image of ten edited since is still its own."""
    x_tr, x_te = _images(10, 20), _images(4, 21)
    names = _names("t", 10)
    run = tmp_path / "run"
    run.mkdir()
    seen.record(run / seen.FILE, x_tr, range(10), names, range(8))
    lookalike = _held_out(_images(10, 22), _images(4, 23), names, _names("h", 4), source="lookalike")
    assert seen.trained_on(lookalike, [run]) is False
    ds, note = seen.test_split_for(lookalike, [run])
    assert len(ds.x_test) == 14 and note.endswith("every image is a test image, not the held-out split alone: 14 of 14")
    edited = x_tr.copy()
    edited[3] = 255 - edited[3]
    assert seen.trained_on(_held_out(edited, x_te, names, _names("h", 4)), [run]) is True
    edited[4] = 255 - edited[4]  # two of ten: below the share that counts as the run's own
    assert seen.trained_on(_held_out(edited, x_te, names, _names("h", 4)), [run]) is False


def test_several_runs_leave_out_what_any_of_them_saw(tmp_path):
    x = _images(10, 9)
    names = _names("i", 10)
    runs = []
    for k, part in enumerate((slice(0, 3), slice(3, 5))):
        runs.append(tmp_path / f"run-{k}")
        runs[-1].mkdir()
        seen.record(runs[-1] / seen.FILE, x, range(10)[part], names[part], range(10)[part])
    other = _held_out(x[:8], x[8:], ["x" + n for n in names[:8]], names[8:], source="other")
    ds, note = seen.test_split_for(other, runs)
    assert len(ds.x_test) == 5 and "one of the runs" in note
    seen.record(runs[1] / seen.FILE, x, range(10), names, range(10))  # saw everything
    with pytest.raises(DataError, match="every one of its 10 images has the pixels of an image one of the runs"):
        seen.test_split_for(other, runs)


def test_data_naming_its_test_images_keeps_them_and_a_run_without_a_record_keeps_the_split(tmp_path):
    x_tr, x_te = _images(6, 10), _images(4, 11)
    run = tmp_path / "run"
    run.mkdir()
    seen.record(run / seen.FILE, x_tr, range(6), _names("t", 6), range(6))
    split = Dataset(_images(3, 12), np.zeros(3, np.int64), np.concatenate([x_te, x_tr[:1]]), np.zeros(5, np.int64),
                    ["cat"], "split", "image-folder", test_paths=[f"test/cat/{i}.png" for i in range(5)])
    ds, note = seen.test_split_for(split, [run])
    assert ds is split and note == ("1 of the 5 test images of split have the pixels of an image the run trained or "
                                    "validated on; they stay in, as the data names its test images")
    old = tmp_path / "old"  # a run from before records were kept
    old.mkdir()
    other = _held_out(x_tr, x_te, _names("o", 6), _names("p", 4), source="other")
    ds, note = seen.test_split_for(other, [old])
    assert ds is other and note.startswith(f"{old} records no images it trained on ({seen.FILE}")
    assert seen.trained_on(other, [old]) is None


def test_every_image_as_test_drops_the_notes_of_a_held_out_split(tmp_path):
    from conftest import make_image_folder

    from cifarlab.data import load_dataset

    ds = load_dataset(make_image_folder(tmp_path / "m", n_train=5, n_test=0) / "train", skip_bad_images=True)
    assert any("held out 0.2 of each class's images for testing" in n for n in ds.notes)
    notes = every_image_as_test(ds).notes
    assert "no train/ and test/ folders: read 3 class folders" in notes and len(notes) == len(ds.notes)
    assert not any("held out" in n for n in notes)
    from cifarlab.data.folder import without_held_out

    assert without_held_out(["held out 0.25 of each class's images for testing (3 of 12), by their paths, the same "
                             "in every command", "decoded in 0.1 s"]) == ["decoded in 0.1 s"]
