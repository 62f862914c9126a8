"""ADE20K in the ADEChallengeData2016 layout: splits, 0 ignored and k -> k - 1 for every value,
values above 150 refused, missing folders and unpaired files named; data check, train, eval and
report through the command line; the recipes' numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastseg.config import load_config
from contrastseg.data import ADE20K_CLASSES, ADE20KSource, check_split, open_source
from contrastseg.errors import ConfigError, DataError
from tiny import TINY

SIZE = (12, 16)  # (height, width): 192 pixels, room for all 151 values in every annotation
COUNTS = {"training": 3, "validation": 2}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def raw_values(k, size=SIZE):
    """Annotation k: the values 0..150 in a shifted order, each at least once."""
    h, w = size
    return ((np.arange(h * w) + 37 * k) % 151).reshape(h, w).astype(np.uint8)


def make_ade20k(root, counts=None, size=SIZE):
    """A tiny ADEChallengeData2016 tree: JPEG images, 8-bit PNG annotations."""
    counts = counts or COUNTS
    rng = np.random.default_rng(0)
    k = 0
    for folder, n in counts.items():
        prefix = "train" if folder == "training" else "val"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            name = f"ADE_{prefix}_{i:08d}"
            rgb = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "images" / folder / f"{name}.jpg", quality=90)
            Image.fromarray(raw_values(k, size)).save(root / "annotations" / folder / f"{name}.png")
            k += 1
    (root / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n")
    return root


def reference_train_ids(raw):
    """Written out directly: 0 is ignored (255), every other value k becomes k - 1."""
    out = np.empty_like(raw)
    for (y, x), value in np.ndenumerate(raw):
        out[y, x] = 255 if value == 0 else value - 1
    return out


def write_config(path, root):
    """A config of the tiny tree with the release's split names, as the recipes have them."""
    path.write_text(
        f"data:\n  name: ade20k\n  root: {root}\n  train_split: training\n  val_split: validation\n"
    )
    return path


@pytest.fixture
def ade(tmp_path):
    return make_ade20k(tmp_path / "ADEChallengeData2016")


def test_classes_palette_and_splits(ade):
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[20] == "car"
    assert ADE20K_CLASSES[-3:] == ("glass", "clock", "flag")
    train = ADE20KSource(ade, "training")
    assert len(train) == 3 and train.name(0) == "ADE_train_00000001"
    assert train.classes == list(ADE20K_CLASSES)
    assert train.palette.shape == (150, 3) and train.palette.dtype == np.uint8
    assert len({tuple(c) for c in train.palette}) == 150 and not (train.palette == 0).all(1).any()
    assert len(ADE20KSource(ade, "validation")) == 2
    # train/val name the same folders, as COCO-Stuff's train/val name train2017/val2017
    assert [ADE20KSource(ade, "train").name(i) for i in range(3)] == [
        train.name(i) for i in range(3)
    ]
    assert ADE20KSource(ade, "val").image_path(1).parent == ade / "images" / "validation"
    with pytest.raises(DataError, match=r"no split 'testing'.*'training', 'validation'"):
        ADE20KSource(ade, "testing")


def test_zero_ignored_and_every_value_k_becomes_k_minus_1(ade):
    for split in ("training", "validation"):
        ds = ADE20KSource(ade, split)
        for i in range(len(ds)):
            raw = np.asarray(Image.open(ds.label_path(i)))
            assert set(np.unique(raw).tolist()) == set(range(151))
            image, mask = ds[i]
            assert image.shape == (*SIZE, 3) and mask.shape == SIZE and mask.dtype == np.uint8
            assert np.array_equal(mask, reference_train_ids(raw))
    table = ADE20KSource(ade, "training").label_table
    assert table[0] == 255 and table[1] == 0 and table[150] == 149
    assert (table[151:] == -1).all()  # 151..255, 255 included, are not ADE20K values


def test_open_source_from_a_config(ade):
    cfg = load_config(None, ["data.name=ade20k", f"data.root={ade}"])
    assert (cfg.data.train_split, cfg.data.val_split) == ("train", "val")
    assert isinstance(open_source(cfg.data, "val"), ADE20KSource)
    with pytest.raises(ConfigError, match="data.root is required when data.name is 'ade20k'"):
        load_config(None, ["data.name=ade20k"])


def test_a_value_above_150_is_refused_with_the_file_named(ade, tmp_path, run_cli, capsys):
    bad = ade / "annotations" / "training" / "ADE_train_00000002.png"
    raw = np.asarray(Image.open(bad)).copy()
    raw[0, :3] = 151
    raw[1, 0] = 255
    Image.fromarray(raw).save(bad)
    with pytest.raises(DataError, match=r"ADE_train_00000002.png.*\[151, 255\].*1\.\.150"):
        ADE20KSource(ade, "training")[1]

    report = check_split(load_config(None, ["data.name=ade20k", f"data.root={ade}"]), "training")
    assert [(p.kind, p.path) for p in report.problems] == [("label values", bad)]
    assert "4 pixel(s)" in report.problems[0].detail and "[151, 255]" in report.problems[0].detail

    config = write_config(tmp_path / "ade.yaml", ade)
    assert run_cli("data", "check", str(config), "--workers", "1") == 2
    captured = capsys.readouterr()
    assert "ade20k training: 3 samples checked, 1 problem(s)" in captured.out
    assert "ade20k validation: 2 samples checked, no problems" in captured.out
    assert f"label values  {bad}:" in captured.out and "wall" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "training" in err[0] and "validation" not in err[0], err


@pytest.mark.parametrize(
    "missing",
    ["images/training", "annotations/training", "images/validation", "annotations/validation"],
)
def test_a_missing_folder_is_one_line_naming_it_and_the_layout(
    ade, tmp_path, run_cli, capsys, missing
):
    import shutil

    shutil.rmtree(ade / missing)
    split = missing.split("/")[1]
    with pytest.raises(DataError) as info:
        ADE20KSource(ade, split)
    message = str(info.value)
    assert f"{ade / missing} is missing" in message and "\n" not in message
    assert "images/{training,validation}" in message and "ADEChallengeData2016.zip" in message

    config = write_config(tmp_path / "ade.yaml", ade)
    assert run_cli("data", "check", str(config), "--split", split) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ade / missing) in err[0] and "annotations/{" in err[0], err


def test_root_missing_or_one_level_too_high(tmp_path, ade):
    with pytest.raises(DataError, match=r"ADE20K root .*absent does not exist.*layout"):
        ADE20KSource(tmp_path / "absent", "training")
    with pytest.raises(DataError, match=r"data.root should be .*ADEChallengeData2016\?"):
        ADE20KSource(tmp_path, "training")


def test_image_and_annotation_counts_that_differ_are_named(ade, tmp_path, run_cli, capsys):
    gone = ade / "annotations" / "training" / "ADE_train_00000002.png"
    gone.unlink()
    with pytest.raises(DataError) as info:
        ADE20KSource(ade, "training")
    message = str(info.value)
    assert "3 images in" in message and "but 2 annotations in" in message, message
    assert f"has no annotation {gone}" in message and "ADE_train_00000002.jpg" in message

    stray = ade / "annotations" / "validation" / "ADE_val_00000009.png"
    Image.fromarray(np.ones(SIZE, np.uint8)).save(stray)
    with pytest.raises(DataError, match=r"2 images in .* but 3 annotations in .*ADE_val_00000009"):
        ADE20KSource(ade, "val")

    config = write_config(tmp_path / "ade.yaml", ade)
    assert run_cli("data", "check", str(config)) == 2
    captured = capsys.readouterr()
    assert "ade20k training: 2 samples checked, 1 problem(s)" in captured.out
    assert f"missing label  {gone}:" in captured.out
    assert "(3 images in" in captured.out and "but 2 annotations in" in captured.out
    assert "ade20k validation: 2 samples checked, 1 problem(s)" in captured.out
    assert f"missing image  {ade / 'images' / 'validation' / 'ADE_val_00000009.jpg'}" in (
        captured.out
    )
    assert len(captured.err.strip().splitlines()) == 1


def test_train_eval_and_report_through_the_command_line(ade, tmp_path, run_cli, capsys):
    overrides = [x for x in TINY if not x.startswith("data.name")]
    config = write_config(tmp_path / "ade.yaml", ade)
    args = [
        *(x for o in overrides for x in ("--set", o)),
        *("--set", "data.crop_size=[16, 16]"),
        *("--set", "train.iters=2", "--set", "train.batch_size=2"),
        *("--set", "train.checkpoint_every=2", "--set", "train.threads=1"),
        *("--set", "eval.batch_size=1", "--set", "eval.figure_images=0"),
        *("--set", f"output.root={tmp_path / 'runs'}", "--set", "output.name=ade"),
    ]
    assert run_cli("data", "check", str(config), *args) == 0
    out = capsys.readouterr().out
    assert "ade20k training: 3 samples checked, no problems" in out
    assert "ade20k validation: 2 samples checked, no problems" in out

    assert run_cli("train", str(config), *args) == 0
    run = tmp_path / "runs" / "ade"
    final = json.loads((run / "eval.json").read_text())
    assert final["iteration"] == 2
    assert final["class_names"] == list(ADE20K_CLASSES)
    confusion = np.asarray(final["confusion"])
    assert confusion.shape == (150, 150)
    # every labelled pixel of the 2 validation annotations is scored: all but the zeros
    labelled = sum(
        int((np.asarray(Image.open(p)) != 0).sum())
        for p in sorted((ade / "annotations" / "validation").glob("*.png"))
    )
    assert confusion.sum() == labelled

    checkpoint = sorted((run / "checkpoints").glob("iter_*.pt"))[-1]
    out_json = tmp_path / "eval_again.json"
    assert (
        run_cli("eval", str(config), "--checkpoint", str(checkpoint), "--out", str(out_json)) == 0
    )
    again = json.loads(out_json.read_text())
    assert again["mIoU"] == pytest.approx(final["mIoU"])
    assert again["confusion"] == final["confusion"]
    capsys.readouterr()

    assert run_cli("report", str(run), "--table", "1") == 0
    assert "ADE20K validation" in capsys.readouterr().out


RECIPES = ["_base.yaml", "hrnetv2_w48_ce.yaml", "hrnetv2_w48_contrast.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_numbers_are_mmsegmentations_ade20k_protocol(name):
    """configs/_base_/datasets/ade20k.py and schedules/schedule_160k.py of mmsegmentation:
    160k iterations at batch 16 (4 GPUs x 4), 512x512 crops of a (2048, 512) resize scaled by
    0.5-2.0, flip, SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly 0.9; test at (2048, 512)."""
    cfg = load_config(CONFIGS / "ade20k" / name)
    d = cfg.data
    assert (d.name, d.train_split, d.val_split) == ("ade20k", "training", "validation")
    assert (cfg.train.iters, cfg.train.batch_size, cfg.train.grad_accum) == (160000, 16, 1)
    assert (d.crop_size, d.short_side, d.scale_range, d.flip) == ((512, 512), 512, (0.5, 2.0), True)
    assert (d.jitter, d.aspect_range, d.brightness_shift) == (0.0, (1.0, 1.0), 0)
    o = cfg.optim
    assert (o.lr, o.momentum, o.weight_decay, o.poly_power, o.warmup_iters) == (
        0.01,
        0.9,
        0.0005,
        0.9,
        0,
    )
    assert o.head_lr_mult == 1.0
    assert (cfg.eval.mode, cfg.eval.short_side, cfg.eval.scales, cfg.eval.flip) == (
        "whole",
        512,
        (1.0,),
        False,
    )
    assert cfg.loss.ce.aux_weight == 0.4 and not cfg.loss.ce.ohem
    c = cfg.loss.contrast  # as the PASCAL-Context and COCO-Stuff recipes
    assert c.enabled == (name == "hrnetv2_w48_contrast.yaml")
    assert (c.temperature, c.base_temperature, c.weight, c.warmup_iters) == (0.07, 0.07, 0.1, 5000)
    assert (c.max_samples, c.max_views, c.memory.enabled) == (1024, 100, False)
    stem = name.removesuffix(".yaml")
    assert cfg.output.name == ("ade20k_deeplabv3_r101" if stem == "_base" else f"ade20k_{stem}")


def test_the_ce_and_contrast_recipes_differ_only_in_the_contrast_term():
    ce = load_config(CONFIGS / "ade20k" / "hrnetv2_w48_ce.yaml").to_dict()
    ours = load_config(CONFIGS / "ade20k" / "hrnetv2_w48_contrast.yaml").to_dict()
    for tree in (ce, ours):
        del tree["loss"]["contrast"], tree["output"]["name"]
    assert ce == ours


def test_the_hrnet_recipe_builds_its_model_for_150_classes():
    from contrastseg.models import build_model

    cfg = load_config(CONFIGS / "ade20k" / "hrnetv2_w48_contrast.yaml")
    assert (cfg.model.backbone.name, cfg.model.head) == ("hrnetv2_w48", "hrnetv2")
    with torch.device("meta"):
        model = build_model(cfg.model, len(ADE20K_CLASSES), backbone_weights=False)
    assert model.output_stride == 4
    assert model.head.classifier.out_channels == 150 and model.head.classifier.in_channels == 720
