"""CamVid-11 in the SegNet layout: splits, void ignored, every value mapped, alignment."""

import numpy as np
import pytest
from PIL import Image

from contrastseg.data import CamVidSource
from contrastseg.errors import DataError

SIZE = (36, 48)  # a tenth of 360x480
VALUES = list(range(12)) + [255]  # 0..10 classes, 11 void, 255 ignore


def colour_of(raw):
    raw = raw.astype(np.int64)
    return np.stack([(raw * 19) % 256, (raw * 5 + 9) % 256, 250 - raw % 250], -1).astype(np.uint8)


def make_camvid(root, counts=None, size=SIZE):
    counts = counts or {"train": 3, "val": 2, "test": 2}
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for split, n in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            raw = np.asarray(VALUES, dtype=np.uint8)[((yy // 3) * 16 + xx // 3 + k) % len(VALUES)]
            name = f"0001TP_{split}_{k:06d}.png"
            Image.fromarray(colour_of(raw)).save(root / split / name)
            Image.fromarray(raw).save(root / f"{split}annot" / name)
    return root


def test_samples_per_split(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    assert {s: len(CamVidSource(root, s)) for s in ("train", "val", "test")} == {
        "train": 3,
        "val": 2,
        "test": 2,
    }
    ds = CamVidSource(root, "val")
    assert ds.name(1) == "0001TP_val_000001"
    assert len(ds.classes) == 11 and ds.classes[0] == "sky" and ds.classes[10] == "bicyclist"
    assert ds.palette.shape == (11, 3)
    with pytest.raises(DataError, match="no split"):
        CamVidSource(root, "trainval")


def test_every_value_mapped_void_ignored(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    ds = CamVidSource(root, "train")
    expected = {v: v for v in range(11)} | {11: 255, 255: 255}
    for i in range(len(ds)):
        raw = np.asarray(Image.open(ds.label_path(i)))
        assert set(np.unique(raw).tolist()) == set(VALUES)
        _, mask = ds[i]
        for value, train_id in expected.items():
            assert (mask[raw == value] == train_id).all(), value
    assert (ds.label_table[12:255] == -1).all()


def test_image_and_label_aligned(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    ds = CamVidSource(root, "test")
    lookup = {tuple(c): v for v, c in zip(VALUES, colour_of(np.asarray(VALUES)), strict=True)}
    for i in range(len(ds)):
        image, mask = ds[i]
        raw = np.array([[lookup[tuple(p)] for p in row] for row in image])
        assert np.array_equal(mask, np.where(raw == 11, 255, raw))


def test_unknown_value_and_missing_pair(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    path = root / "trainannot" / "0001TP_train_000000.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[5, 5] = 12
    Image.fromarray(raw).save(path)
    with pytest.raises(DataError, match="0001TP_train_000000.png.*12"):
        CamVidSource(root, "train")[0]
    (root / "valannot" / "0001TP_val_000001.png").unlink()
    with pytest.raises(DataError, match="valannot/0001TP_val_000001.png"):
        CamVidSource(root, "val")


def test_void_as_a_twelfth_class(tmp_path):
    from contrastseg import load_config
    from contrastseg.data import open_source

    root = make_camvid(tmp_path / "camvid")
    cfg = load_config(
        None, ["data.name=camvid", f"data.root={root}", "data.camvid_void_class=true"]
    )
    ds = open_source(cfg.data, "train")
    assert len(ds.classes) == 12 and ds.classes[11] == "void" and ds.palette.shape == (12, 3)
    expected = {v: v for v in range(12)} | {255: 255}
    for i in range(len(ds)):
        raw = np.asarray(Image.open(ds.label_path(i)))
        _, mask = ds[i]
        for value, train_id in expected.items():
            assert (mask[raw == value] == train_id).all(), value
    default = open_source(load_config(None, ["data.name=camvid", f"data.root={root}"]).data, "val")
    assert len(default.classes) == 11
