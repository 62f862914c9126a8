import hashlib

import numpy as np
import pytest

from contrastseg.data import FolderSource, SyntheticShapes
from contrastseg.errors import DataError

# sha256 of image bytes + mask bytes of SyntheticShapes("train", ..., seed=0)[0] at the
# defaults (128x128, difficulty 1.0). Update only on purpose: it pins the generator.
GOLDEN_TRAIN_0 = "086756818c8f4abc8f3eca31e63e1cc80209b37072c5770ecf22924a6a86bb35"


def _digest(image, mask):
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


def test_golden_checksum_of_sample_0():
    image, mask = SyntheticShapes("train", 1, seed=0)[0]
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == np.uint8
    assert _digest(image, mask) == GOLDEN_TRAIN_0


def test_same_index_same_bytes_across_instances_and_order():
    a = SyntheticShapes("train", 8, image_size=(64, 80), seed=3)
    b = SyntheticShapes("train", 8, image_size=(64, 80), seed=3)
    forward = [a[i] for i in range(8)]
    backward = {i: b[i] for i in reversed(range(8))}
    for i in range(8):
        assert np.array_equal(forward[i][0], backward[i][0])
        assert np.array_equal(forward[i][1], backward[i][1])
    assert np.array_equal(a[-1][0], forward[7][0])
    assert forward[0][0].shape == (64, 80, 3) and forward[0][1].shape == (64, 80)


def test_splits_seeds_and_indices_differ():
    train = SyntheticShapes("train", 4, image_size=(64, 64), seed=0)
    val = SyntheticShapes("val", 4, image_size=(64, 64), seed=0)
    other = SyntheticShapes("train", 4, image_size=(64, 64), seed=1)
    for i in range(4):
        assert not np.array_equal(train[i][0], val[i][0])
        assert not np.array_equal(train[i][0], other[i][0])
    assert not np.array_equal(train[0][0], train[1][0])


def test_classes_palette_and_names():
    ds = SyntheticShapes("val", 50, image_size=(64, 64))
    assert ds.classes[0] == "background" and len(ds.classes) >= 7
    assert ds.palette.shape == (len(ds.classes), 3) and ds.palette.dtype == np.uint8
    assert ds.name(42) == "val_000042"
    assert len(ds) == 50
    with pytest.raises(IndexError):
        ds[50]


def test_every_class_appears_and_labels_are_valid():
    ds = SyntheticShapes("train", 50, image_size=(64, 64))
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds[i][1].ravel(), minlength=256)
    assert counts[len(ds.classes) :].sum() == 0
    share = counts[: len(ds.classes)] / counts.sum()
    assert (share > 0.02).all(), share


def test_difficulty_keeps_objects_but_changes_pixels():
    easy = SyntheticShapes("train", 3, image_size=(64, 64), difficulty=0.0)
    hard = SyntheticShapes("train", 3, image_size=(64, 64), difficulty=2.0)
    for i in range(3):
        assert not np.array_equal(easy[i][0], hard[i][0])
        # Same objects; only distractors (labelled background) may cover some of them.
        e, h = easy[i][1], hard[i][1]
        assert np.all((e == h) | (h == 0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "", "num_samples": 1},
        {"split": "train", "num_samples": -1},
        {"split": "train", "num_samples": 1, "image_size": (4, 4)},
        {"split": "train", "num_samples": 1, "difficulty": -0.5},
        {"split": "train", "num_samples": 1, "seed": -1},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(DataError):
        SyntheticShapes(**kwargs)


def test_write_to_folder_round_trip(tmp_path):
    train = SyntheticShapes("train", 3, image_size=(48, 40), seed=5)
    val = SyntheticShapes("val", 2, image_size=(48, 40), seed=5)
    train.write_to_folder(tmp_path)
    val.write_to_folder(tmp_path)
    for source in (train, val):
        folder = FolderSource(tmp_path, source.split)
        assert folder.classes == source.classes
        assert np.array_equal(folder.palette, source.palette)
        assert len(folder) == len(source)
        for i in range(len(source)):
            assert folder.name(i) == source.name(i)
            image, mask = folder[i]
            assert np.array_equal(image, source[i][0])
            assert np.array_equal(mask, source[i][1])
    other = SyntheticShapes("train", 1)
    other.classes = ["background", "thing"]
    with pytest.raises(DataError, match="classes.txt"):
        other.write_to_folder(tmp_path)
