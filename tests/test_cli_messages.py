"""What the commands say: `summary` from the config, `eval` names the file it writes and refuses
model overrides it would ignore, a folder given as a config, the expected form of a list-valued
key, and other libraries' INFO logging kept quiet."""

import json
import subprocess
import sys

import pytest

from contrastseg.config import load_config, save_config
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import ConfigError


def test_summary_uses_the_configs_classes_and_crop(run_cli, capsys):
    assert run_cli("summary", "configs/demo.yaml") == 0
    out = capsys.readouterr().out
    assert "(7 classes," in out and "FLOPs at 128x128" in out, out
    assert run_cli("summary", "configs/demo.yaml", "--classes", "3", "--height", "64") == 0
    out = capsys.readouterr().out
    assert "(3 classes," in out and "FLOPs at 64x128" in out, out


def test_summary_without_the_data_set_asks_for_classes(run_cli, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  name: camvid\n  root: {tmp_path / 'absent'}\n")
    assert run_cli("summary", str(config)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--classes N" in err and "absent" in err, err
    assert run_cli("summary", str(config), "--classes", "11") == 0
    assert "(11 classes," in capsys.readouterr().out


@pytest.fixture
def saved_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.threads=1", "data.val_size=2")
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    return cfg, config, Trainer(cfg, progress=False).save_checkpoint()


def test_eval_says_where_it_writes_eval_json(saved_run, run_cli, capsys):
    cfg, config, checkpoint = saved_run
    written = (cfg.run_dir / "eval.json").resolve()
    assert run_cli("eval", str(config), "--checkpoint", str(checkpoint)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mIoU: ") and f"wrote {written};" in last, last
    assert json.loads(written.read_text())["checkpoint"] == str(checkpoint)
    assert run_cli("eval", str(config), "--checkpoint", str(checkpoint)) == 0
    assert f"replaced {written};" in capsys.readouterr().out


def test_eval_refuses_model_overrides_it_would_ignore(saved_run, run_cli, capsys):
    cfg, config, checkpoint = saved_run
    argv = ["eval", str(config), "--checkpoint", str(checkpoint), "--set", "eval.batch_size=1"]
    assert run_cli(*argv, "--set", "model.head_channels=8", "-s", "model.head=ocr") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.head_channels, model.head" in err and "checkpoint" in err
    assert not (cfg.run_dir / "eval.json").exists()


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path, run_cli, capsys):
    (tmp_path / "_base.yaml").write_text("{}\n")
    (tmp_path / "mine.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="is a folder, not a config file") as info:
        load_config(tmp_path)
    assert "not found" not in str(info.value) and "mine.yaml" in str(info.value)
    assert run_cli("train", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.crop_size=96", "expected a list of 2 ints like [96, 96]"),
        ("data.crop_size=[96, 96, 96]", "expected a list of 2 ints like [128, 128]"),
        ("data.mean=0.5", "expected a list of 3 floats like [0.5, 0.5, 0.5]"),
        ("eval.scales=1.5", "expected a list of floats like [1.0]"),
    ],
)
def test_a_list_valued_key_shows_the_expected_form(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_only_contrastseg_logs_at_info():
    code = (
        "import logging\n"
        "from contrastseg import cli\n"
        "cli._setup_logging()\n"
        "logging.getLogger('onnxscript.optimizer').info('third-party pass')\n"
        "logging.getLogger('onnx_ir.passes').warning('third-party warning')\n"
        "logging.getLogger('contrastseg.engine').info('our notice')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "third-party pass" not in done.stderr
    assert "third-party warning" in done.stderr and "our notice" in done.stderr


def test_one_s_per_iter_on_the_console_in_metrics_and_in_report(
    tiny_cfg, tmp_path, run_cli, capsys
):
    from contrastseg.rundir import median_s_per_iter

    cfg = tiny_cfg("train.threads=1", "train.log_every=2", "data.val_size=2")
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    assert run_cli("train", str(config)) == 0  # progress lines: stdout is not a terminal
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 6]
    progress = {int(x.split()[1].split("/")[0]): x for x in lines if x.startswith("iter ")}
    assert sorted(progress) == [1, 2, 3, 4, 5, 6]
    assert "s/iter" not in progress[1]  # no window logged yet
    for r in records:  # each line shows the window of the record logged at its iteration
        assert f"  {r['s_per_iter']:.2f} s/iter" in progress[r["iter"]], progress[r["iter"]]
    assert f"  {records[1]['s_per_iter']:.2f} s/iter" in progress[5]  # iteration 4's
    median = median_s_per_iter(cfg.run_dir / "metrics.jsonl")
    assert median is not None and lines[-1].startswith("run: ")
    assert lines[-1].endswith(f"s/iter: {median:.3f} (median of the logged windows)"), lines[-1]
