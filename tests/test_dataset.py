import numpy as np
import pytest
import torch

from contrastseg.config import DataConfig, load_config
from contrastseg.data import (
    EvalTransform,
    FolderSource,
    PairedSource,
    SegmentationDataset,
    SyntheticShapes,
    TrainTransform,
    build_source,
    open_source,
    source_class,
)
from contrastseg.datasets_table import DATA_SET_NAMES, DATA_SETS
from contrastseg.errors import ConfigError, DataError
from contrastseg.report import dataset_label


def _train_set(seed=0, n=6):
    source = SyntheticShapes("train", n, image_size=(48, 48))
    return SegmentationDataset(source, TrainTransform((32, 32), jitter=0.2), seed=seed)


def test_item_layout_and_forwarded_attributes():
    ds = _train_set()
    item = ds[2]
    assert set(item) == {"image", "mask", "index"} and item["index"] == 2
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert ds.num_classes == len(ds.classes) == 7
    assert ds.palette.shape == (7, 3)
    assert ds.name(2) == "train_000002" and len(ds) == 6
    with pytest.raises(IndexError):
        ds[6]


def test_same_epoch_and_index_same_tensors_in_any_order():
    a, b = _train_set(), _train_set()
    a.set_epoch(3)
    b.set_epoch(3)
    first = [a[i] for i in range(6)]
    b[5], b[0]  # different access order, other indices loaded in between
    for i in reversed(range(6)):
        item = b[i]
        assert torch.equal(item["image"], first[i]["image"])
        assert torch.equal(item["mask"], first[i]["mask"])


def test_different_epoch_or_seed_changes_augmentation():
    ds = _train_set()
    ds.set_epoch(0)
    e0 = [ds[i] for i in range(4)]
    ds.set_epoch(1)
    e1 = [ds[i] for i in range(4)]
    assert all(not torch.equal(x["image"], y["image"]) for x, y in zip(e0, e1, strict=True))
    ds.set_epoch(0)
    assert torch.equal(ds[0]["image"], e0[0]["image"])
    other = _train_set(seed=1)
    assert not torch.equal(other[0]["image"], e0[0]["image"])


def test_eval_dataset_is_whole_image():
    source = SyntheticShapes("val", 2, image_size=(40, 56))
    ds = SegmentationDataset(source, EvalTransform())
    item = ds[1]
    assert item["image"].shape == (3, 40, 56)
    assert np.array_equal(item["mask"].numpy(), source[1][1])


def test_load_errors_name_the_sample(tmp_path):
    SyntheticShapes("train", 2, image_size=(16, 16)).write_to_folder(tmp_path)
    (tmp_path / "images" / "train_000001.png").write_bytes(b"broken")
    ds = SegmentationDataset(FolderSource(tmp_path, "train"), EvalTransform())
    ds[0]
    with pytest.raises(DataError, match="train_000001") as info:
        ds[1]
    assert str(tmp_path / "images" / "train_000001.png") in str(info.value)


def test_build_source(tmp_path):
    src = build_source(
        "synthetic", "val", num_samples=3, image_size=(32, 32), seed=2, difficulty=0.5
    )
    assert isinstance(src, SyntheticShapes) and len(src) == 3 and src.seed == 2
    SyntheticShapes("val", 2, image_size=(16, 16)).write_to_folder(tmp_path)
    folder = build_source("folder", "val", root=tmp_path)
    assert isinstance(folder, FolderSource) and len(folder) == 2
    with pytest.raises(DataError, match="'synthetic'.*'folder'"):
        build_source("coco", "train")
    with pytest.raises(DataError, match="root"):
        build_source("folder", "train", root=None)
    with pytest.raises(DataError, match="colour"):
        build_source("synthetic", "train", num_samples=1, colour=True)


def test_open_source_reads_the_config(tmp_path):
    data = DataConfig(train_size=4, val_size=3, image_size=(32, 40), seed=2, difficulty=0.5)
    train, val = open_source(data, "train"), open_source(data, "val")
    assert isinstance(val, SyntheticShapes) and (len(train), len(val)) == (4, 3)
    assert (val.seed, val.image_size, val.difficulty) == (2, (32, 40), 0.5)
    SyntheticShapes("val", 2, image_size=(16, 16)).write_to_folder(tmp_path)
    folder = open_source(DataConfig(name="folder", root=tmp_path), "val")
    assert isinstance(folder, FolderSource) and isinstance(folder, PairedSource)
    assert len(folder) == 2


def test_one_row_registers_a_data_set():
    """config's allowed names, the source classes and the report's display names all come
    from the one table."""
    from typing import get_args

    assert get_args(DataConfig.model_fields["name"].annotation) == DATA_SET_NAMES
    for name, row in DATA_SETS.items():
        cls = source_class(name)
        assert row.name == name and cls.dataset == name
        assert issubclass(cls, PairedSource) == row.reads_root
    with pytest.raises(ConfigError, match="'synthetic', 'folder'"):
        load_config(None, ["data.name=coco"])
    cfg = load_config(None, ["data.name=camvid", "data.root=/x"])
    assert dataset_label(cfg, "test") == "CamVid test"


def test_augmentation_does_not_depend_on_thread_count():
    # DataLoader workers run with one thread; the main process with several.
    ds = SegmentationDataset(
        SyntheticShapes("train", 4, image_size=(64, 64)), TrainTransform((56, 56), jitter=0.3)
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [ds[i]["image"] for i in range(4)]
        torch.set_num_threads(2)
        multi = [ds[i]["image"] for i in range(4)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(single, multi, strict=True))
