"""The authors' recipes on PASCAL-Context, COCO-Stuff, CamVid and the Cityscapes memory recipe:
every config loads, holds the numbers of tfzhou/ContrastiveSeg's scripts and configs, and builds
the right model for its data set's classes (on the meta device: no weights, no forward pass)."""

from pathlib import Path

import pytest
import torch

from contrastseg.config import load_config
from contrastseg.data import CAMVID_CLASSES, CONTEXT59_CLASSES
from contrastseg.data.cityscapes import cityscapes_classes
from contrastseg.data.coco_stuff import COCO_STUFF_IDS
from contrastseg.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

NUM_CLASSES = {
    "pascal_context": len(CONTEXT59_CLASSES),
    "coco_stuff": len(COCO_STUFF_IDS),
    "camvid": len(CAMVID_CLASSES),
    "cityscapes": len(cityscapes_classes()),
}

# Per data set, as the authors' files give them: iterations (their scripts' MAX_ITERS, or the
# config's solver.max_iters where no script exists), batch, crop (height, width), lr, weight
# decay; and the contrast section (temperature, base temperature, weight, warm-up, max_samples,
# max_views) of their H_48_D_4.json.
DATA_SET_RECIPES = {
    "pascal_context": dict(iters=60000, batch=16, crop=(520, 520), lr=1e-3, wd=1e-4),
    "coco_stuff": dict(iters=60000, batch=16, crop=(520, 520), lr=1e-3, wd=1e-4),
    "camvid": dict(iters=30000, batch=16, crop=(360, 480), lr=1e-3, wd=1e-4),
}
CONTRAST = dict(temperature=0.07, base_temperature=0.07, weight=0.1, warmup_iters=5000)

PAIRS = [
    (data_set, f"{model}_{kind}{suffix}.yaml")
    for data_set, suffixes in (
        ("pascal_context", [""]),
        ("coco_stuff", ["", "_164k"]),
        ("camvid", [""]),
    )
    for model in ("hrnetv2_w48", "ocr_hrnetv2_w48")
    for kind in ("ce", "contrast")
    for suffix in suffixes
]
MEMORY_RECIPES = [
    "camvid/hrnetv2_w48_contrast_mem.yaml",
    "cityscapes/hrnetv2_w48_contrast_mem.yaml",
]


def test_the_recipe_files_are_all_there():
    assert len(PAIRS) == 16
    shipped = {
        p.relative_to(CONFIGS).as_posix()
        for d in DATA_SET_RECIPES
        for p in (CONFIGS / d).glob("*hrnetv2_w48_*.yaml")
    }
    assert shipped == {f"{d}/{name}" for d, name in PAIRS} | {MEMORY_RECIPES[0]}
    assert (CONFIGS / MEMORY_RECIPES[1]).is_file()


@pytest.mark.parametrize(("data_set", "name"), PAIRS, ids=[f"{d}/{n}" for d, n in PAIRS])
def test_recipe_numbers_are_the_authors(data_set, name):
    cfg = load_config(CONFIGS / data_set / name)
    recipe = DATA_SET_RECIPES[data_set]
    assert cfg.data.name == data_set
    assert cfg.data.coco_split == ("164k" if name.endswith("_164k.yaml") else "10k")
    assert cfg.train.iters == recipe["iters"]
    assert cfg.train.batch_size == recipe["batch"]
    assert cfg.data.crop_size == recipe["crop"]
    assert cfg.data.scale_range == (0.5, 2.0) and cfg.data.flip
    assert cfg.optim.lr == recipe["lr"]
    assert cfg.optim.weight_decay == recipe["wd"]
    assert (cfg.optim.momentum, cfg.optim.poly_power, cfg.optim.warmup_iters) == (0.9, 0.9, 0)
    assert cfg.model.backbone.name == "hrnetv2_w48"
    assert cfg.model.head == ("ocr" if name.startswith("ocr_") else "hrnetv2")
    assert cfg.model.projection_dim == 256
    contrast = cfg.loss.contrast
    assert contrast.enabled == ("_contrast" in name)
    assert contrast.temperature == CONTRAST["temperature"]
    assert contrast.base_temperature == CONTRAST["base_temperature"]
    assert contrast.weight == CONTRAST["weight"]
    assert contrast.warmup_iters == CONTRAST["warmup_iters"]
    assert (contrast.max_samples, contrast.max_views) == (1024, 100)
    assert not contrast.memory.enabled  # their files for these data sets have no memory
    assert cfg.loss.ce.aux_weight == 0.4  # fs_auxce_loss / contrast_auxce_loss (OCR)
    assert not cfg.loss.ce.ohem
    stem = name.removesuffix(".yaml")
    if stem.endswith("_164k"):
        assert cfg.output.name == f"{data_set}_164k_{stem.removesuffix('_164k')}"
    else:
        assert cfg.output.name == f"{data_set}_{stem}"


def test_the_ce_and_contrast_configs_of_a_pair_differ_only_in_the_contrast_term():
    for data_set, name in PAIRS:
        if "_contrast" not in name:
            continue
        ce = load_config(CONFIGS / data_set / name.replace("_contrast", "_ce")).to_dict()
        ours = load_config(CONFIGS / data_set / name).to_dict()
        assert ce["loss"]["contrast"]["enabled"] is False
        for tree in (ce, ours):
            del tree["loss"]["contrast"], tree["output"]["name"]
        assert ce == ours, name


def test_the_cityscapes_memory_recipe():
    """H_48_D_4_MEM.json with run_h_48_d_4_contrast_mem.sh: temperature 0.07, max_views 1,
    loss weight 1, memory of 5000 per class, 10 pixels per update, 40k iterations at batch 8."""
    cfg = load_config(CONFIGS / "cityscapes" / "hrnetv2_w48_contrast_mem.yaml")
    c = cfg.loss.contrast
    assert (cfg.data.name, cfg.model.backbone.name, cfg.model.head) == (
        "cityscapes",
        "hrnetv2_w48",
        "hrnetv2",
    )
    assert (cfg.train.iters, cfg.train.batch_size, cfg.data.crop_size) == (40000, 8, (512, 1024))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.01, 0.0005)
    assert c.enabled and (c.temperature, c.base_temperature) == (0.07, 0.07)
    assert (c.max_samples, c.max_views, c.weight, c.warmup_iters) == (1024, 1, 1.0, 5000)
    m = c.memory
    assert m.enabled and (m.pixel_size, m.pixels_per_image) == (5000, 10)
    assert (m.region_mode, m.region_size, m.sampling) == ("fifo", 5000, "all")


def test_the_camvid_memory_recipe():
    """H_48_D_4_MEM.json of CamVid: lr 0.01, weight decay 5e-4, 40k iterations, contrast warm-up
    3000, memory 5000 per class and 10 pixels per update, multi-scale validation."""
    cfg = load_config(CONFIGS / "camvid" / "hrnetv2_w48_contrast_mem.yaml")
    c = cfg.loss.contrast
    assert (cfg.train.iters, cfg.train.batch_size, cfg.data.crop_size) == (40000, 16, (360, 480))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.01, 0.0005)
    assert (c.temperature, c.weight, c.warmup_iters, c.max_views) == (0.07, 0.1, 3000, 100)
    assert c.memory.enabled and (c.memory.pixel_size, c.memory.pixels_per_image) == (5000, 10)
    assert cfg.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


_BUILT: dict[tuple[str, int], torch.nn.Module] = {}


def _model(cfg):
    """Each (head, classes) once, on the meta device: parameters have shapes but no storage."""
    key = (cfg.model.head, NUM_CLASSES[cfg.data.name])
    if key not in _BUILT:
        with torch.device("meta"):
            _BUILT[key] = build_model(cfg.model, key[1], backbone_weights=False)
    return _BUILT[key]


@pytest.mark.parametrize(
    "path",
    [f"{d}/{n}" for d, n in PAIRS] + MEMORY_RECIPES,
)
def test_every_recipe_builds_its_model_for_the_data_sets_classes(path):
    cfg = load_config(CONFIGS / path)
    classes = NUM_CLASSES[cfg.data.name]
    assert (
        classes
        == {"pascal_context": 59, "coco_stuff": 171, "camvid": 11, "cityscapes": 19}[cfg.data.name]
    )
    model = _model(cfg)
    assert model.output_stride == 4  # HRNet: the branches concatenated at stride 4
    assert model.head.classifier.out_channels == classes
    assert model.head.classifier.in_channels == (512 if cfg.model.head == "ocr" else 720)
    if cfg.model.head == "ocr":  # the soft object regions: the auxiliary output, one per class
        assert model.head.aux_head[-1].out_channels == classes
