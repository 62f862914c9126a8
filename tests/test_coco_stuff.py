"""COCO-Stuff 10k (.mat annotations, image lists) and 164k (PNG maps): splits, the mapping of
every one of the 182 ids to 171 classes, unlabeled, alignment."""

import numpy as np
import pytest
from PIL import Image

from contrastseg.data import CocoStuffSource, load_mat_array
from contrastseg.errors import DataError
from test_pascal_context import write_mat

UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
SIZE = (112, 128)  # 224 blocks of 8x8: every id appears in every image


def train_id(coco_id):
    """Written out independently: the rank of a used id among the used ids, else 255."""
    if coco_id == 0 or coco_id in UNUSED:
        return 255
    return coco_id - 1 - sum(1 for u in UNUSED if u < coco_id)


def colours(values):
    values = np.asarray(values, dtype=np.int64)
    return np.stack([(values % 6) * 51, (values // 6 % 6) * 51, (values // 36 % 6) * 51], -1)


def grid(values, k, size=SIZE):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    return np.asarray(values)[((yy // 8) * (w // 8) + xx // 8 + 5 * k) % len(values)]


def save_jpeg(path, values):
    Image.fromarray(colours(values).astype(np.uint8)).save(path, quality=100, subsampling=0)


PNG_VALUES = list(range(182)) + [255]  # 164k: id - 1, 255 unlabeled
MAT_VALUES = list(range(183))  # 10k: id, 0 unlabeled


def make_164k(root, counts=None):
    counts = counts or {"train2017": 3, "val2017": 2}
    k = 0
    for folder, n in counts.items():
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for _ in range(n):
            raw = grid(PNG_VALUES, k).astype(np.uint8)
            name = f"{1000 * k + 9:012d}"
            save_jpeg(root / "images" / folder / f"{name}.jpg", raw)
            Image.fromarray(raw).save(root / "annotations" / folder / f"{name}.png")
            k += 1
    return root


def make_10k(root, train=3, test=2):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "imageLists").mkdir()
    names = [f"COCO_train2014_{77 + 100 * k:012d}" for k in range(train + test)]
    for k, name in enumerate(names):
        raw = grid(MAT_VALUES, k).astype(np.uint16)
        save_jpeg(root / "images" / f"{name}.jpg", raw)
        write_mat(
            root / "annotations" / f"{name}.mat",
            {"names": np.zeros((1, 3)), "S": raw},
            compress=k % 2 == 1,
        )
    (root / "imageLists" / "train.txt").write_text("\n".join(names[:train]) + "\n")
    (root / "imageLists" / "test.txt").write_text("\n".join(names[train:]) + "\n")
    (root / "imageLists" / "all.txt").write_text("\n".join(names) + "\n")
    return root, names


def test_class_names_and_counts():
    from contrastseg.data.coco_stuff import COCO_STUFF_IDS, COCO_STUFF_NAMES

    assert len(COCO_STUFF_NAMES) == 182 and len(COCO_STUFF_IDS) == 171
    names = [COCO_STUFF_NAMES[i] for i in COCO_STUFF_IDS]
    assert names[0] == "person" and names[9] == "traffic light" and names[11] == "stop sign"
    assert names[79] == "toothbrush" and names[80] == "banner" and names[170] == "wood"
    assert {COCO_STUFF_NAMES[i] for i in UNUSED} == {
        "street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk",
        "door", "hair brush", "blender",
    }  # fmt: skip


def test_164k_splits_and_every_id(tmp_path):
    root = make_164k(tmp_path / "coco")
    train = CocoStuffSource(root, "train", variant="164k")
    assert len(train) == 3 and len(CocoStuffSource(root, "val2017", variant="164k")) == 2
    assert train.name(0) == "000000000009" and len(train.classes) == 171
    assert train.palette.shape == (171, 3)
    for i in range(len(train)):
        raw = np.asarray(Image.open(train.label_path(i)))
        assert set(np.unique(raw).tolist()) == set(PNG_VALUES)
        _, mask = train[i]
        for value in PNG_VALUES:
            want = 255 if value == 255 else train_id(value + 1)
            assert (mask[raw == value] == want).all(), value
    assert (train.label_table[182:255] == -1).all()
    with pytest.raises(DataError, match="no split"):
        CocoStuffSource(root, "test", variant="164k")


def test_10k_splits_mat_labels_and_every_id(tmp_path):
    root, names = make_10k(tmp_path / "coco10k")
    assert len(CocoStuffSource(root, "train", variant="10k")) == 3
    test = CocoStuffSource(root, "test", variant="10k")
    assert len(test) == 2 and test.name(0) == names[3]
    assert [CocoStuffSource(root, "val").name(i) for i in range(2)] == names[3:]
    assert len(CocoStuffSource(root, "all")) == 5
    for i in range(len(test)):
        raw = load_mat_array(test.label_path(i), "S")
        assert raw.dtype == np.uint16 and set(np.unique(raw).tolist()) == set(MAT_VALUES)
        _, mask = test[i]
        for value in MAT_VALUES:
            assert (mask[raw == value] == train_id(value)).all(), value


def test_image_and_label_aligned(tmp_path):
    root, _ = make_10k(tmp_path / "coco10k", train=1, test=1)
    palette = colours(MAT_VALUES)
    ds = CocoStuffSource(root, "train")
    image, mask = ds[0]
    nearest = np.abs(image[:, :, None, :].astype(np.int64) - palette).sum(-1).argmin(-1)
    want = np.vectorize(train_id)(np.asarray(MAT_VALUES)[nearest])
    assert np.array_equal(mask, want)


def test_broken_annotations_name_the_file(tmp_path):
    root, names = make_10k(tmp_path / "coco10k")
    path = root / "annotations" / f"{names[1]}.mat"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=f"{names[1]}.mat.*truncated"):
        CocoStuffSource(root, "train")[1]
    write_mat(path, {"S": np.full((4, 4), 183, np.uint16)})
    with pytest.raises(DataError, match=f"{names[1]}.mat.*183"):
        CocoStuffSource(root, "train").map_labels(load_mat_array(path, "S"), path)
    (root / "images" / f"{names[0]}.jpg").unlink()
    with pytest.raises(DataError, match=f"no image .*{names[0]}.jpg"):
        CocoStuffSource(root, "train")
