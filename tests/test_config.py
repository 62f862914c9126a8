from pathlib import Path

import pytest

from contrastseg.config import load_config, save_config
from contrastseg.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None, ["train.iters=200", "data.crop_size=[64, 96]", "loss.contrast.enabled=true"]
    )
    assert cfg.train.iters == 200
    assert cfg.data.crop_size == (64, 96)
    assert cfg.loss.contrast.enabled is True
    assert cfg.loss.contrast.weight == pytest.approx(0.1)


def test_one_base_level_merges_recursively(tmp_path):
    write(tmp_path / "base.yaml", "train: {iters: 10, batch_size: 4}\noptim: {lr: 0.5}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {iters: 20}\n")
    cfg = load_config(child)
    assert (cfg.train.iters, cfg.train.batch_size, cfg.optim.lr) == (20, 4, 0.5)


def test_two_base_levels_are_refused(tmp_path):
    write(tmp_path / "a.yaml", "train: {iters: 1}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    child = write(tmp_path / "c.yaml", "base: b.yaml\n")
    with pytest.raises(ConfigError, match="b.yaml.*one level"):
        load_config(child)


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  itres: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "typo.yaml" in msg and "train.itres" in msg and "iters" in msg and "batch_size" in msg
    assert "did you mean 'iters'?" in msg


def test_wrong_type_and_impossible_value_name_the_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "train: {batch_size: many}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.batch_size.*'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optim.lr"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"data.scale_range"):
        load_config(None, ["data.scale_range=[2.0, 0.5]"])


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.backbone.name=resnet9000"])
    msg = str(err.value)
    assert "model.backbone.name" in msg and "mobilenetv3_large" in msg and "resnet101" in msg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.iters"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path / "broken.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml.*YAML"):
        load_config(path)


def test_folder_data_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.name=folder"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.iters=7", "data.name=folder", "data.root=/x/y"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_shipped_config_loads():
    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert configs, "no configs found"
    for path in configs:
        load_config(path)
