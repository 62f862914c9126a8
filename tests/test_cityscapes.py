"""Cityscapes: layout, label mapping (every id), alignment, export scored by the official
evaluator of cityscapesscripts."""

import importlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from contrastseg.data import CityscapesSource, SegmentationDataset, export_cityscapes_predictions
from contrastseg.data.cityscapes import cityscapes_label_table, evaluate_with_cityscapesscripts
from contrastseg.data.transforms import TrainTransform
from contrastseg.engine.metrics import ConfusionMatrix
from contrastseg.errors import DataError

# Written out here, independently of the code under test: label id -> train id of the 19
# evaluated classes; every other id (and -1, license plate) is ignored.
EVALUATED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10}
EVALUATED.update({24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})
ALL_IDS = list(range(34)) + [255]  # 255 = -1 (license plate) written to an 8-bit PNG
SIZE = (32, 64)  # (H, W)


def colour_of(raw: np.ndarray) -> np.ndarray:
    """A distinct RGB colour per raw id, so the image tells which label each pixel has."""
    raw = raw.astype(np.int64)
    return np.stack([(raw * 7) % 256, (raw * 13 + 50) % 256, 255 - raw], -1).astype(np.uint8)


def label_grid(ids, shift, size=SIZE):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    cell = (yy // 4) * (w // 4) + xx // 4 + shift
    return np.asarray(ids, dtype=np.uint8)[cell % len(ids)]


def make_cityscapes(root, splits, ids=ALL_IDS, size=SIZE, coarse=False):
    """Official layout; ``splits`` maps split -> list of (city, seq, frame)."""
    for split, frames in splits.items():
        for k, (city, seq, frame) in enumerate(frames):
            name = f"{city}_{seq:06d}_{frame:06d}"
            raw = label_grid(ids, 3 * k, size)
            img_dir = root / "leftImg8bit" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour_of(raw)).save(img_dir / f"{name}_leftImg8bit.png")
            if split == "test":
                continue
            gts = ("gtFine", "gtCoarse") if coarse else ("gtFine",)
            for gt in gts:
                gt_dir = root / gt / split / city
                gt_dir.mkdir(parents=True, exist_ok=True)
                labels = raw if gt == "gtFine" else np.where(raw == 7, 0, raw).astype(np.uint8)
                Image.fromarray(labels).save(gt_dir / f"{name}_{gt}_labelIds.png")
                if gt == "gtFine":  # the official archives ship colour and instance maps too
                    Image.fromarray(labels).save(gt_dir / f"{name}_gtFine_instanceIds.png")
    return root


SPLITS = {
    "train": [("aachen", 0, 19), ("aachen", 1, 19), ("bochum", 0, 313)],
    "val": [("frankfurt", 0, 294), ("lindau", 0, 19)],
    "test": [("berlin", 0, 19), ("bonn", 0, 19)],
}


def expected_train_ids(raw):
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in EVALUATED.items():
        table[label_id] = train_id
    return table[raw]


def test_samples_per_split_and_names(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    for split, frames in SPLITS.items():
        ds = CityscapesSource(root, split)
        assert len(ds) == len(frames)
    ds = CityscapesSource(root, "train")
    assert [ds.name(i) for i in range(3)] == [
        "aachen_000000_000019",
        "aachen_000001_000019",
        "bochum_000000_000313",
    ]
    assert ds.label_path(2).name == "bochum_000000_000313_gtFine_labelIds.png"
    assert len(ds.classes) == 19 and ds.classes[0] == "road" and ds.classes[18] == "bicycle"
    assert ds.palette.shape == (19, 3) and tuple(ds.palette[0]) == (128, 64, 128)


def test_label_table_every_official_id():
    from cityscapesscripts.helpers.labels import labels

    table = cityscapes_label_table()
    assert len(labels) == 35  # 34 ids 0..33 and the license plate, -1
    for label in labels:
        want = EVALUATED.get(label.id, 255)
        assert table[label.id % 256] == want, label.name
        assert (want != 255) == (not label.ignoreInEval), label.name
    assert table[255] == 255  # -1, license plate
    assert (table[34:255] == -1).all()  # not Cityscapes ids


def test_every_id_mapped_when_loading(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    ds = CityscapesSource(root, "train")
    for i in range(len(ds)):
        raw = np.asarray(Image.open(ds.label_path(i)))
        assert set(np.unique(raw).tolist()) == set(ALL_IDS)
        image, mask = ds[i]
        assert image.shape == (*SIZE, 3) and mask.dtype == np.uint8
        assert np.array_equal(mask, expected_train_ids(raw))


def test_unknown_label_id_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": SPLITS["train"][:1]})
    path = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[0, 0] = 40
    Image.fromarray(raw).save(path)
    with pytest.raises(DataError, match="aachen_000000_000019_gtFine_labelIds.png.*40"):
        CityscapesSource(root, "train")[0]


def test_image_and_label_aligned_after_loading(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    source = CityscapesSource(root, "val")
    colours = colour_of(np.arange(256))
    lookup = {tuple(c): i for i, c in enumerate(colours)}
    transform = TrainTransform((24, 40), scale_range=(1.0, 1.0), flip=True, jitter=0.0)
    dataset = SegmentationDataset(source, transform, seed=3)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            image = (item["image"] * transform.std + transform.mean) * 255
            rgb = image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            raw = np.array([[lookup[tuple(p)] for p in row] for row in rgb], dtype=np.uint8)
            assert np.array_equal(item["mask"].numpy(), expected_train_ids(raw))


def test_test_split_has_images_only(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    ds = CityscapesSource(root, "test")
    image, mask = ds[0]
    assert ds.label_path(0) is None
    assert image.shape == (*SIZE, 3) and (mask == 255).all()


def test_coarse_labels_and_train_extra(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": SPLITS["train"]}, coarse=True)
    fine, coarse = CityscapesSource(root, "train"), CityscapesSource(root, "train", coarse=True)
    assert coarse.label_path(0).name.endswith("_gtCoarse_labelIds.png")
    _, m_fine = fine[0]
    _, m_coarse = coarse[0]
    assert (m_fine == 0).any() and not (
        m_coarse == 0
    ).any()  # road (7) became unlabeled in gtCoarse
    with pytest.raises(DataError, match="cityscapes_coarse"):
        CityscapesSource(root, "train_extra")
    with pytest.raises(DataError, match="leftImg8bit/train_extra is missing"):
        CityscapesSource(root, "train_extra", coarse=True)


def test_missing_label_and_missing_image_name_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    (root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="aachen_000001_000019_gtFine_labelIds.png"):
        CityscapesSource(root, "train")
    ds = CityscapesSource(root, "train", strict=False)
    assert len(ds) == 2 and [p.kind for p in ds.missing] == ["missing label"]
    (root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(DataError, match="lindau_000000_000019_leftImg8bit.png"):
        CityscapesSource(root, "val")
    with pytest.raises(DataError, match="does not exist"):
        CityscapesSource(tmp_path / "nowhere", "train")


def test_export_names_and_label_ids(tmp_path):
    pred = np.array([[0, 1, 18], [255, 13, 5]], dtype=np.uint8)
    (path,) = export_cityscapes_predictions(
        [torch.from_numpy(pred)], ["bonn_000000_000019"], tmp_path
    )
    assert path == tmp_path / "bonn" / "bonn_000000_000019_leftImg8bit.png"
    assert np.asarray(Image.open(path)).tolist() == [[7, 8, 33], [0, 26, 17]]
    with pytest.raises(DataError, match="train ids"):
        export_cityscapes_predictions([pred + 19], ["bonn_000000_000019"], tmp_path)
    with pytest.raises(DataError, match="not a Cityscapes image name"):
        export_cityscapes_predictions([pred], ["bonn.png"], tmp_path)


def _predictions(masks):
    """Deterministic predictions: the ground truth with ignored pixels filled, a band shifted
    to the next class, a block of 'bus' (absent from the ground truth) and no 'train' at all."""
    preds = []
    for k, mask in enumerate(masks):
        pred = mask.astype(np.int64).copy()
        h, w = pred.shape
        yy, xx = np.mgrid[0:h, 0:w]
        pred[pred == 255] = (yy + xx + k)[pred == 255] % 19
        band = (xx + 2 * yy + k) % 5 == 0
        pred[band] = (pred[band] + 1) % 19
        pred[h // 2 : h // 2 + 4, w // 3 : w // 3 + 6] = 15  # bus
        pred[pred == 16] = 17  # never predict train
        preds.append(pred.astype(np.uint8))
    return preds


def test_miou_equals_official_evaluator(tmp_path, monkeypatch):
    ids = [i for i in range(34) if i not in (28, 31)]  # no bus, no train in the ground truth
    root = make_cityscapes(tmp_path / "cs", {"val": SPLITS["val"] + [("munster", 7, 19)]}, ids=ids)
    ds = CityscapesSource(root, "val")
    masks = [ds[i][1] for i in range(len(ds))]
    preds = _predictions(masks)

    cm = ConfusionMatrix(19)
    for pred, mask in zip(preds, masks, strict=True):
        cm.update(torch.from_numpy(pred).long(), torch.from_numpy(mask).long())
    ours = cm.compute()

    results = tmp_path / "results"
    export_cityscapes_predictions(preds, [ds.name(i) for i in range(len(ds))], results)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path))
    module = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    official = importlib.reload(module)  # it reads the environment when imported
    args = official.args
    args.quiet, args.JSONOutput = True, False
    args.evalInstLevelScore = False  # instance-weighted nIoU only; not part of the class IoU
    gts = sorted(official.glob.glob(args.groundTruthSearch))
    assert len(gts) == 3
    found = [official.getPrediction(args, gt) for gt in gts]
    result = official.evaluateImgLists(found, gts, args)

    theirs = result["averageScoreClasses"]
    print(f"mIoU ours {ours['mIoU']!r} official {theirs!r}")
    assert abs(ours["mIoU"] - theirs) < 1e-6
    for name, iou in zip(ds.classes, ours["per_class_iou"], strict=True):
        official_iou = result["classScores"][name]
        if iou is None:
            assert math.isnan(official_iou), name
        else:
            assert abs(iou - official_iou) < 1e-12, name
    assert ours["per_class_iou"][ds.classes.index("train")] is None  # absent and never predicted
    assert ours["per_class_iou"][ds.classes.index("bus")] == 0.0  # absent but predicted
    assert 0.3 < ours["mIoU"] < 0.95
    helper = evaluate_with_cityscapesscripts(root, results, "val")
    assert helper["averageScoreClasses"] == theirs


def test_official_helper_reports_missing_predictions(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"val": SPLITS["val"]}, ids=list(range(34)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Found no prediction"):
        evaluate_with_cityscapesscripts(root, tmp_path / "empty")
