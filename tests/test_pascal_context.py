"""PASCAL-Context 59: layout, background ignored, every value mapped, the 459 -> 59 conversion
and the preparation script on a fake official release."""

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastseg.data import PascalContextSource
from contrastseg.data.pascal_context import CONTEXT59_CLASSES, CONTEXT59_IDS_459, context59_from_459
from contrastseg.errors import DataError

SIZE = (64, 80)  # 80 blocks of 8x8: every value appears in every image
VALUES = list(range(60)) + [255]


def write_mat(path, arrays, compress=True):
    """A MATLAB 5 MAT-file holding numeric arrays (what the official releases ship)."""
    codes = {np.uint8: (9, 2), np.uint16: (11, 4), np.float64: (6, 9)}

    def element(mtype, data):
        return struct.pack("<II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)

    out = [b"MATLAB 5.0 MAT-file, test fixture".ljust(116) + b"\0" * 8 + b"\x00\x01IM"]
    for name, array in arrays.items():
        array = np.asarray(array)
        mx, mi = codes[array.dtype.type]
        body = (
            element(6, struct.pack("<II", mx, 0))
            + element(5, struct.pack(f"<{array.ndim}i", *array.shape))
            + element(1, name.encode())
            + element(mi, array.astype(array.dtype.newbyteorder("<")).tobytes(order="F"))
        )
        matrix = struct.pack("<II", 14, len(body)) + body
        if compress:
            packed = zlib.compress(matrix)
            out.append(struct.pack("<II", 15, len(packed)) + packed)
        else:
            out.append(matrix)
    Path(path).write_bytes(b"".join(out))


def block_colours(values):
    """Colours far apart, so a JPEG of flat 8x8 blocks decodes back to its block's value."""
    values = np.asarray(values, dtype=np.int64)
    return np.stack([(values % 4) * 80, (values // 4 % 4) * 80, (values // 16 % 4) * 80], -1)


def raw_grid(k, size=SIZE, values=VALUES):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    return np.asarray(values, dtype=np.uint8)[
        ((yy // 8) * (w // 8) + xx // 8 + 7 * k) % len(values)
    ]


def make_context(root, splits=None):
    splits = splits or {
        "train": ["2008_000002", "2008_000003", "2009_000001"],
        "val": ["2010_000005", "2010_000006"],
    }
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    k = 0
    for split, names in splits.items():
        (root / "ImageSets/SegmentationContext" / f"{split}.txt").write_text(
            "\n".join(names) + "\n"
        )
        for name in names:
            raw = raw_grid(k)
            Image.fromarray(block_colours(raw).astype(np.uint8)).save(
                root / "JPEGImages" / f"{name}.jpg", quality=100, subsampling=0
            )
            Image.fromarray(raw).save(root / "SegmentationClassContext" / f"{name}.png")
            k += 1
    return root


def test_samples_per_split_and_classes(tmp_path):
    root = make_context(tmp_path / "VOC2010")
    assert len(PascalContextSource(root, "train")) == 3
    assert len(PascalContextSource(root, "val")) == 2
    ds = PascalContextSource(root, "val")
    assert ds.name(0) == "2010_000005"
    assert len(ds.classes) == 59 and ds.classes[0] == "aeroplane" and ds.classes[-1] == "wood"
    assert ds.palette.shape == (59, 3) and not (ds.palette == 0).all(1).any()
    with pytest.raises(DataError, match="SegmentationContext/test.txt is missing"):
        PascalContextSource(root, "test")


def test_background_ignored_every_value_mapped(tmp_path):
    root = make_context(tmp_path / "VOC2010")
    ds = PascalContextSource(root, "train")
    for i in range(len(ds)):
        raw = np.asarray(Image.open(ds.label_path(i)))
        assert set(np.unique(raw).tolist()) == set(VALUES)
        _, mask = ds[i]
        assert (mask[raw == 0] == 255).all() and (mask[raw == 255] == 255).all()
        for value in range(1, 60):
            assert (mask[raw == value] == value - 1).all()
    assert (ds.label_table[60:255] == -1).all()


def test_image_and_label_aligned(tmp_path):
    root = make_context(tmp_path / "VOC2010")
    ds = PascalContextSource(root, "val")
    colours = block_colours(VALUES)
    for i in range(len(ds)):
        image, mask = ds[i]
        nearest = np.abs(image[:, :, None, :].astype(np.int64) - colours).sum(-1).argmin(-1)
        raw = np.asarray(VALUES)[nearest]
        want = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        assert np.array_equal(mask, want)


def test_unknown_value_names_the_file(tmp_path):
    root = make_context(tmp_path / "VOC2010")
    path = root / "SegmentationClassContext" / "2008_000003.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[0, :3] = 60
    Image.fromarray(raw).save(path)
    with pytest.raises(DataError, match="2008_000003.png.*60"):
        PascalContextSource(root, "train")[1]


def test_459_to_59_conversion_every_id():
    assert len(CONTEXT59_IDS_459) == len(CONTEXT59_CLASSES) == 59
    assert list(CONTEXT59_IDS_459) == sorted(CONTEXT59_IDS_459)
    ids = np.arange(460, dtype=np.uint16).reshape(20, 23)
    out = context59_from_459(ids)
    for full_id in range(460):
        want = CONTEXT59_IDS_459.index(full_id) + 1 if full_id in CONTEXT59_IDS_459 else 0
        assert out.flat[full_id] == want, full_id
    assert out.dtype == np.uint8


def _load_script():
    path = Path(__file__).parents[1] / "scripts" / "prepare_pascal_context.py"
    spec = importlib.util.spec_from_file_location("prepare_pascal_context", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_script_on_fake_release(tmp_path, capsys):
    voc, release = tmp_path / "VOCdevkit" / "VOC2010", tmp_path / "context"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (release / "trainval").mkdir(parents=True)
    names = ["2008_000002", "2008_000003", "2008_000007", "2009_000001"]
    (voc / "ImageSets/Main/train.txt").write_text("2008_000002\n2008_000003\n2008_000009\n")
    (voc / "ImageSets/Main/val.txt").write_text("2008_000007\n2009_000001\n")
    labels = {i: f"label{i}" for i in range(1, 460)}
    labels.update(dict(zip(CONTEXT59_IDS_459, CONTEXT59_CLASSES, strict=True)))
    (release / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in labels.items()))
    rng = np.random.default_rng(0)
    maps = {}
    for k, name in enumerate(names):
        label_map = rng.integers(0, 460, size=(20, 64)).astype(np.uint16)
        label_map[0, : len(CONTEXT59_IDS_459)] = CONTEXT59_IDS_459
        maps[name] = label_map
        write_mat(
            release / "trainval" / f"{name}.mat", {"LabelMap": label_map}, compress=k % 2 == 0
        )
        Image.fromarray(np.zeros((20, 64, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")

    script = _load_script()
    assert script.main(["--voc", str(voc), "--context", str(release), "--workers", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
    lists = voc / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text().split() == ["2008_000002", "2008_000003"]
    assert (lists / "val.txt").read_text().split() == ["2008_000007", "2009_000001"]
    for name, label_map in maps.items():
        png = np.asarray(Image.open(voc / "SegmentationClassContext" / f"{name}.png"))
        assert np.array_equal(png, context59_from_459(label_map))
        assert png[0, :59].tolist() == list(range(1, 60))
    ds = PascalContextSource(voc, "val")
    assert len(ds) == 2 and ds[0][1].shape == (20, 64)

    labels[2] = "airplane"
    (release / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in labels.items()))
    script.main(["--voc", str(voc), "--context", str(release)])
    assert "id 2: labels.txt says 'airplane'" in capsys.readouterr().err
