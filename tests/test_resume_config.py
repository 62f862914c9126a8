"""--resume compares the new config with the run's record: trajectory keys refused, safe keys
accepted and recorded with the iteration from which they apply; config.yaml never rewritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastseg.config import load_config, save_config
from contrastseg.engine.resume import is_safe
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import ConfigError
from tiny import TINY

CLI = str(Path(sys.executable).with_name("contrastseg"))


RUN = ["train.iters=6", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-iteration run of conftest's tiny config (checkpoints at 3 and 6), once."""
    root = tmp_path_factory.mktemp("trained")
    settings = [
        *TINY,
        *("data.train_size=16", "data.val_size=6", "train.batch_size=4", "train.log_every=1"),
        *("train.keep_checkpoints=5", "train.deterministic=true", "eval.batch_size=3"),
        *("eval.figure_images=2", f"output.root={root}", "output.name=run", *RUN),
    ]
    cfg = load_config(None, settings)
    Trainer(cfg, progress=False).fit()
    return cfg.run_dir


@pytest.fixture
def run(tiny_cfg, tmp_path, trained):
    """A copy of that run in tmp_path (its config.yaml as a run there would have written it);
    returns (cfg maker, run dir)."""

    def make(*extra: str):
        return tiny_cfg(*RUN, *extra)

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    save_config(make(), run_dir / "config.yaml")
    return make, run_dir


def test_a_changed_trajectory_key_is_refused_and_the_record_kept(run):
    make, run_dir = run
    before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as err:
        Trainer(make("train.batch_size=2", "optim.lr=0.02", "train.iters=9"), resume=True)
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # one per refused key; train.iters is not among them
    assert "optim.lr = 0.02" in lines[0] and "used 0.01" in lines[0]
    assert "train.batch_size = 2" in lines[1] and "used 4" in lines[1]
    assert all(str(run_dir / "config.yaml") in line for line in lines)
    assert (run_dir / "config.yaml").read_bytes() == before
    assert not (run_dir / "config_changes.jsonl").exists()


def test_changed_iterations_are_accepted_and_recorded(run):
    make, run_dir = run
    before = (run_dir / "config.yaml").read_bytes()
    result = Trainer(make("train.iters=8", "eval.flip=true"), resume=True, progress=False).fit()
    assert result.iteration == 8
    assert (run_dir / "config.yaml").read_bytes() == before  # iterations 1-6 ran with this
    records = [json.loads(x) for x in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert records == [
        {
            "iteration": 6,
            "changes": {
                "eval.flip": {"from": False, "to": True},
                "train.iters": {"from": 6, "to": 8},
            },
            "reason": "--resume",
        }
    ]
    # the record is part of the reference: resuming with the same values changes nothing, and
    # going back to the first value of a trajectory key is still refused
    Trainer(make("train.iters=8", "eval.flip=true"), resume=True, progress=False).fit()
    assert len((run_dir / "config_changes.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ConfigError, match="below the iteration"):
        Trainer(make("train.iters=7", "eval.flip=true"), resume=True, progress=False)


def test_without_config_yaml_the_checkpoint_config_is_the_record(run):
    make, run_dir = run
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"iter_0000006.pt \(its config\).*model.head_channels"):
        Trainer(make("model.head_channels=8"), resume=True, progress=False)


def test_a_new_run_writes_config_yaml_and_drops_a_stale_change_log(tiny_cfg):
    cfg = tiny_cfg("train.iters=2", "train.checkpoint_every=2")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config_changes.jsonl").write_text('{"iteration": 5, "changes": {}}\n')
    Trainer(cfg, progress=False).fit()
    assert not (cfg.run_dir / "config_changes.jsonl").exists()
    assert (cfg.run_dir / "config.yaml").is_file()


def test_allow_list():
    for key in ("train.iters", "train.checkpoint_every", "eval.scales", "output.name"):
        assert is_safe(key)
    for key in (
        "train.batch_size",
        "train.seed",
        "train.eval_every",
        "train.threads",
        "optim.lr",
        "model.head",
        "loss.contrast.max_views",
        "data.crop_size",
        "train.amp",
    ):
        assert not is_safe(key)


@pytest.mark.serial
def test_cli_resume_with_another_batch_is_refused_fast(run, tmp_path):
    make, run_dir = run
    config = tmp_path / "cfg.yaml"
    save_config(make(), config)
    before = (run_dir / "config.yaml").read_bytes()
    start = time.perf_counter()
    done = subprocess.run(
        [CLI, "train", str(config), "--set", "train.batch_size=2", "--resume"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.perf_counter() - start < 2
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "train.batch_size = 2" in err[0] and "used 4" in err[0]
    assert (run_dir / "config.yaml").read_bytes() == before
