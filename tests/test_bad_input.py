"""Bad input through the whole pipeline: each case raises contrastseg's own error, naming the file
or field and saying how to fix it, before any training step where the input allows it.

Cases already covered elsewhere are not repeated here (docs/reliability.md maps each case to
its test): unknown or mistyped config keys (test_config.py), RGB masks, duplicate names and an
empty folder split (test_folder.py), a broken benchmark pair (test_data_check.py), resuming
with another class count (test_training.py).
"""

import numpy as np
import pytest
from PIL import Image

from contrastseg import evaluate_checkpoint, load_config
from contrastseg.data import FolderSource, check_split
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.sampling import epoch_permutation
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import CheckpointError, DataError
from test_cityscapes import make_cityscapes

CLASSES = ("background", "cat", "dog")
SIZE = (32, 32)  # (H, W)


def make_folder(root, n=4):
    """A valid folder data set of ``n`` RGB images s0..s{n-1}, listed in train and val."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    names = [f"s{i}" for i in range(n)]
    for name in names:
        image = rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
        mask = rng.integers(0, len(CLASSES), size=SIZE, dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def folder_cfg(tmp_path, root, *extra):
    return load_config(
        None,
        [
            "data.name=folder",
            f"data.root={root}",
            "data.crop_size=[32, 32]",
            "model.head_channels=16",
            "model.aux_channels=8",
            "train.iters=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.deterministic=true",
            "train.device=cpu",
            "train.threads=1",
            "eval.batch_size=4",
            "eval.figure_images=0",
            f"output.root={tmp_path / 'runs'}",
            "output.name=run",
            *extra,
        ],
    )


def fails_before_the_first_step(cfg) -> str:
    """Train and expect a DataError before any optimiser step (when the trainer is built, or
    with the first batch); returns its message."""
    with pytest.raises(DataError) as info:
        Trainer(cfg, progress=False).fit()
    metrics = cfg.run_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    assert ckpt.list_checkpoints(cfg.run_dir / "checkpoints") == []
    return str(info.value)


def test_corrupt_image_stops_training_before_the_first_step(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = root / "images" / "s2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then not an image at all")
    msg = fails_before_the_first_step(folder_cfg(tmp_path, root))
    assert str(bad) in msg and "sample 's2'" in msg
    assert "replace the file with a complete PNG or JPEG" in msg
    assert "contrastseg data check CONFIG" in msg


def test_truncated_png_is_found_by_data_check_and_stops_training(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = root / "images" / "s1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    cfg = folder_cfg(tmp_path, root)

    report = check_split(cfg, "train")
    assert [(p.kind, p.path) for p in report.problems] == [("truncated", bad)]

    msg = fails_before_the_first_step(cfg)
    assert str(bad) in msg and "truncated" in msg
    assert "replace the file with a complete PNG or JPEG" in msg


def test_missing_mask_is_refused_when_the_data_set_is_built(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "masks" / "s3.png").unlink()
    with pytest.raises(DataError) as info:
        Trainer(folder_cfg(tmp_path, root), progress=False)
    msg = str(info.value)
    assert str(root / "splits" / "train.txt") in msg and str(root / "masks" / "s3") in msg
    assert "add the mask or remove 's3' from the split file" in msg


def test_mask_of_another_size_stops_training_before_the_first_step(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((SIZE[0], SIZE[1] - 2), np.uint8)).save(root / "masks" / "s0.png")
    msg = fails_before_the_first_step(folder_cfg(tmp_path, root))
    assert str(root / "masks" / "s0.png") in msg and str(root / "images" / "s0.png") in msg
    assert "30x32" in msg and "32x32" in msg
    assert "save the mask at the image's size" in msg and "nearest-neighbour" in msg


def test_label_values_outside_the_classes_stop_training_before_the_first_step(tmp_path):
    root = make_folder(tmp_path / "d")
    mask = np.zeros(SIZE, np.uint8)
    mask[0, :3] = (5, 255, 9)  # 255 is ignore and fine; 5 and 9 are not class ids
    Image.fromarray(mask).save(root / "masks" / "s1.png")
    msg = fails_before_the_first_step(folder_cfg(tmp_path, root))
    assert str(root / "masks" / "s1.png") in msg and "[5, 9]" in msg
    assert "ids 0..2" in msg and "255 means ignore" in msg
    assert "set those pixels to a class id or to 255" in msg and "classes.txt" in msg


def test_images_with_alpha_are_accepted_and_the_alpha_is_dropped(tmp_path):
    """Decision: RGBA (4 channels) and LA (2 channels, grey + alpha) images are used as RGB and
    greyscale; the alpha channel is dropped, not blended. `data check` agrees."""
    root = make_folder(tmp_path / "d")
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(*SIZE, 4), dtype=np.uint8)
    la = rng.integers(0, 256, size=(*SIZE, 2), dtype=np.uint8)
    Image.fromarray(rgba).save(root / "images" / "s0.png")
    Image.fromarray(la).save(root / "images" / "s1.png")
    assert Image.open(root / "images" / "s1.png").mode == "LA"
    ds = FolderSource(root, "train")
    assert np.array_equal(ds[0][0], rgba[..., :3])
    assert np.array_equal(ds[1][0], np.repeat(la[..., :1], 3, axis=2))
    assert check_split(folder_cfg(tmp_path, root), "train").ok


def test_16_bit_image_is_refused_with_how_to_save_it(tmp_path):
    """A 16-bit greyscale PNG would be clipped to 0..255 by the conversion to RGB: refused."""
    root = make_folder(tmp_path / "d")
    bad = root / "images" / "s3.png"
    Image.fromarray((np.arange(32 * 32).reshape(SIZE) * 60).astype(np.uint16)).save(bad)
    cfg = folder_cfg(tmp_path, root)
    msg = fails_before_the_first_step(cfg)
    assert str(bad) in msg and "mode 'I;16'" in msg and "clip" in msg
    assert "save it as an 8-bit RGB or greyscale PNG/JPEG" in msg
    report = check_split(cfg, "train")
    assert [(p.kind, p.path) for p in report.problems] == [("channels", bad)]
    assert "save it as an 8-bit RGB" in report.problems[0].detail


def test_two_channel_mask_is_refused_with_how_to_save_it(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = root / "masks" / "s2.png"
    Image.fromarray(np.zeros((*SIZE, 2), np.uint8)).save(bad)
    msg = fails_before_the_first_step(folder_cfg(tmp_path, root))
    assert str(bad) in msg and "mode 'LA' (2 channels)" in msg
    assert "drop the alpha channel and save it as mode L or P" in msg


def test_empty_benchmark_split_names_the_split_and_where_to_look(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": [("aachen", 0, 19)]})
    (root / "leftImg8bit" / "val").mkdir()
    (root / "gtFine" / "val").mkdir()
    cfg = load_config(None, ["data.name=cityscapes", f"data.root={root}"])
    with pytest.raises(DataError) as info:
        check_split(cfg, "val")
    msg = str(info.value)
    assert "Cityscapes val (gtFine): no samples found" in msg
    assert "check data.root and the split name" in msg and "docs/datasets.md" in msg


def test_empty_val_split_is_reported_before_training(tmp_path):
    """The val split is listed when the trainer is built: the error names the split file
    before any step, and nothing is written."""
    root = make_folder(tmp_path / "d")
    val = root / "splits" / "val.txt"
    val.write_text("# to do\n")
    cfg = folder_cfg(tmp_path, root)
    with pytest.raises(DataError) as info:
        Trainer(cfg, progress=False)
    msg = str(info.value)
    assert str(val) in msg and "lists no samples; write one sample name per line" in msg
    assert not (cfg.run_dir / "checkpoints").exists()
    val.write_text("s0\ns1\n")
    result = Trainer(cfg, progress=False).fit()
    assert result.iteration == 2 and 0.0 <= result.metrics["mIoU"] <= 1.0


def test_evaluating_a_checkpoint_with_another_class_count(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("train.threads=1"), progress=False)  # synthetic: 7 classes
    path = trainer.save_checkpoint()
    root = make_folder(tmp_path / "d")
    with pytest.raises(CheckpointError) as info:
        evaluate_checkpoint(folder_cfg(tmp_path, root), path, print_table=False)
    msg = str(info.value)
    assert str(path) in msg and "trained on 7 classes" in msg and "has 3" in msg
    assert "evaluate it on data with the classes it was trained on" in msg
    assert "data.name = 'synthetic'" in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_broken_mid_run_is_reported_with_its_path(tmp_path, workers):
    """An image that passes the start but breaks later (here: overwritten after iteration 1)
    stops the run with its path, in the main process or from a loader worker; the periodic
    checkpoint before it survives, and --resume after the fix finishes the run."""
    root = make_folder(tmp_path / "d", n=8)
    cfg = folder_cfg(tmp_path, root, "train.iters=4", f"data.num_workers={workers}")
    # 2 batches per epoch: pick a sample of iteration 1's batch that comes back in iteration
    # 4's, so it is read fine once and broken the second time.
    seed = cfg.train.seed
    first, last = epoch_permutation(8, seed, 0)[:4], epoch_permutation(8, seed, 1)[4:]
    index = next(int(i) for i in last if i in first)
    bad = root / "images" / f"s{index}.png"
    good_bytes = bad.read_bytes()

    trainer = Trainer(cfg, progress=False)
    step = trainer.train_step

    def step_then_break(batch):
        out = step(batch)
        if trainer.iteration == 1:
            bad.write_bytes(b"overwritten by a crashed copy")
        return out

    trainer.train_step = step_then_break
    with pytest.raises(DataError) as info:
        trainer.fit()
    msg = str(info.value)
    assert trainer.iteration == 3  # steps 1-3 ran; iteration 4's batch could not be read
    assert str(bad) in msg and f"sample 's{index}'" in msg
    assert "replace the file with a complete PNG or JPEG" in msg
    assert [p.name for p in ckpt.list_checkpoints(cfg.run_dir / "checkpoints")] == [
        "iter_0000002.pt"
    ]

    bad.write_bytes(good_bytes)
    result = Trainer(cfg, resume=True, progress=False).fit()
    assert result.iteration == 4
