"""``contrastseg config show``: the fully resolved config as YAML, every default filled in."""

import yaml
from typer.testing import CliRunner

from contrastseg import load_config, show_config
from contrastseg.cli import app
from contrastseg.config import ExperimentConfig


def _keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_show_config_is_the_resolved_config_with_every_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  iters: 77\ndata:\n  crop_size: [40, 48]\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim:\n  head_lr_mult: 10\n")
    text = show_config(child, ["loss.ce.class_weights=[1.5, 0.5]"])
    tree = yaml.safe_load(text)
    cfg = load_config(child, ["loss.ce.class_weights=[1.5, 0.5]"])
    assert ExperimentConfig.model_validate(tree) == cfg
    assert tree["train"]["iters"] == 77 and tree["optim"]["head_lr_mult"] == 10
    assert tree["loss"]["ce"]["class_weights"] == [1.5, 0.5]
    # every key of the typed config is printed, defaults included
    assert set(_keys(tree)) == set(_keys(ExperimentConfig().to_dict()))
    assert "    class_weights: [1.5, 0.5]" in text.splitlines()  # lists of numbers on one line


def test_cli_config_show_prints_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iters: 12\n")
    result = CliRunner().invoke(app, ["config", "show", str(path), "--set", "optim.lr=0.5"])
    assert result.exit_code == 0, result.output
    assert result.output == show_config(path, ["optim.lr=0.5"])
    tree = yaml.safe_load(result.output)
    assert tree["train"]["iters"] == 12 and tree["optim"]["lr"] == 0.5
