"""The released recipes (configs/<data set>/released/) and their table in docs/method.md
("Released recipes"): every value a recipe file sets is in exactly one row of the table, and
every row's value is the resolved config's, so the doc and the configs cannot drift."""

import fnmatch
from pathlib import Path

import pytest
import yaml

from contrastseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD = ROOT / "docs" / "method.md"
RECIPES = {
    p.relative_to(CONFIGS).with_suffix("").as_posix(): p
    for p in sorted(CONFIGS.glob("*/released/*.yaml"))
    if not p.name.startswith("_")
}
# Where a run is written and where the data lies are the user's, not the authors' values.
NOT_IN_TABLE = ("output.", "data.root")


def _table_rows() -> list[tuple[list[str], str, str, str]]:
    """(patterns, key, value text, source) of each row of the "Released recipes" table."""
    text = METHOD.read_text()
    start = text.index("\n## Released recipes\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        patterns = [p.strip().strip("`") for p in cells[0].split(",")]
        key, value = cells[1].strip("`"), cells[2].strip("`")
        assert cells[3], f"row {key} names no source"
        rows.append((patterns, key, value, cells[3]))
    return rows


ROWS = _table_rows()


def _merged_file_tree(path: Path) -> dict:
    """The keys the recipe files set: the recipe merged over its base, nothing resolved."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    tree = yaml.safe_load(path.read_text())
    base = tree.pop("base", None)
    if base is not None:
        tree = merge(yaml.safe_load((path.parent / base).read_text()), tree)
    return tree


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _rows_for(name: str, key: str):
    return [r for r in ROWS if r[1] == key and any(fnmatch.fnmatchcase(name, p) for p in r[0])]


def test_the_released_recipes_are_there():
    assert set(RECIPES) >= {
        "cityscapes/released/hrnetv2_w48_ce",
        "cityscapes/released/hrnetv2_w48_contrast",
        "cityscapes/released/hrnetv2_w48_contrast_mem",
        "cityscapes/released/ocr_hrnetv2_w48_contrast",
        "pascal_context/released/hrnetv2_w48_ce",
        "pascal_context/released/hrnetv2_w48_contrast",
        "coco_stuff/released/hrnetv2_w48_ce",
        "coco_stuff/released/hrnetv2_w48_contrast",
        "camvid/released/hrnetv2_w48_ce",
        "camvid/released/hrnetv2_w48_contrast",
    }
    assert len(ROWS) > 50


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_value_of_the_recipe_is_in_the_table_once_with_its_value(name):
    resolved = load_config(RECIPES[name]).to_dict()
    keys = [k for k in _leaves(_merged_file_tree(RECIPES[name])) if not k.startswith(NOT_IN_TABLE)]
    assert len(keys) > 30
    for key in keys:
        rows = _rows_for(name, key)
        assert len(rows) == 1, f"{name}: {key} is in {len(rows)} rows of the table, not 1"
        value = yaml.safe_load(rows[0][2])
        assert value == _get(resolved, key), f"{name}: {key} is {_get(resolved, key)!r}"


def test_every_row_applies_to_a_recipe_and_sets_a_key_there():
    for patterns, key, _, _ in ROWS:
        names = [n for n in RECIPES if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        assert names, f"row {key}: {patterns} matches no released recipe"
        for name in names:
            assert key in set(_leaves(_merged_file_tree(RECIPES[name]))), (name, key)


def test_the_headline_values():
    c = load_config(CONFIGS / "cityscapes/released/hrnetv2_w48_contrast.yaml")
    assert c.train.iters == 40000 and c.train.batch_size == 8
    assert c.loss.contrast.enabled and not c.loss.contrast.memory.enabled
    assert c.loss.ce.class_weights is not None and len(c.loss.ce.class_weights) == 19
    assert c.loss.ce.class_weights[0] == 0.8373 and c.loss.ce.class_weights[-1] == 1.0507
    p = load_config(CONFIGS / "pascal_context/released/hrnetv2_w48_contrast.yaml")
    assert p.data.short_side == 520 and p.optim.head_lr_mult == 10
    assert p.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0) and p.eval.flip
    assert p.eval.short_side == 520 and p.eval.pad_multiple == 8
    assert (p.eval.fusion, p.eval.resize_back, p.eval.align_corners) == (
        "sum_logits",
        "bicubic",
        True,
    )
    for name, path in RECIPES.items():
        cfg = load_config(path)
        assert cfg.train.eval_every > 0, name  # their trainers validate and keep the best
        assert cfg.loss.ce.align_corners and cfg.data.interpolation == "bicubic", name
        assert cfg.data.pad_position == "random" and cfg.data.brightness_shift == 10, name
        assert cfg.data.aspect_range == (0.9, 1.1), name
