"""Safe loading: every file is read with weights_only=True. A `.pt` whose pickle would run code
is refused before anything of it runs (API and command line), `--trust-checkpoint` loads a
user's own file that names an importable class, and our own checkpoints, exported models and
backbone weight files still load."""

import argparse
import ast
import os
from pathlib import Path

import pytest
import torch

from contrastseg.config import save_config
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.inference import evaluate_checkpoint, load_trained_model, predict
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import CheckpointError
from contrastseg.export import export_checkpoint
from contrastseg.models import build_model
from contrastseg.models.backbones import load_backbone_weights

SRC = Path(__file__).resolve().parents[1] / "src"


class RunsShell:
    """Unpickling it calls os.system: the classic payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """Unpickling it calls exec on code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def evil_checkpoint(path: Path, payload) -> Path:
    """A file that looks like one of ours (format, config, classes) with a payload inside."""
    torch.save({"format_version": ckpt.FORMAT_VERSION, "config": {}, "model": payload}, path)
    return path


@pytest.fixture
def own_checkpoint(tiny_cfg):
    cfg = tiny_cfg("train.threads=1", "loss.contrast.enabled=true")
    return cfg, Trainer(cfg, progress=False).save_checkpoint()


@pytest.mark.parametrize("payload", [RunsShell, RunsPython])
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "evil.pt", payload(marker))
    for load in (
        ckpt.load_checkpoint,
        lambda p: ckpt.load_checkpoint(p, trust=False),
        load_trained_model,
        lambda p: ckpt.upgrade_file(p, tmp_path / "new.pt"),
    ):
        with pytest.raises(ckpt.UnsafeCheckpointError) as info:
            load(path)
        msg = str(info.value)
        assert str(path) in msg and "arbitrary unpickling" in msg and "--trust-checkpoint" in msg
        assert ("posix.system" if payload is RunsShell else "builtins.exec") in msg
        assert not marker.exists()
    assert not (tmp_path / "new.pt").exists()


def test_trust_does_not_let_os_system_through(tmp_path):
    """torch refuses the os module even when the user allows what the file names."""
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "evil.pt", RunsShell(marker))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused even with --trust-checkpoint"):
        ckpt.load_checkpoint(path, trust=True)
    assert not marker.exists()


def test_cli_refuses_the_file_and_names_the_option(tmp_path, tiny_cfg, run_cli, capsys):
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "evil.pt", RunsShell(marker))
    config = tmp_path / "tiny.yaml"
    save_config(tiny_cfg(), config)
    images = tmp_path / "imgs"
    images.mkdir()
    commands = [
        ("eval", str(config), "--checkpoint", str(path)),
        ("predict", str(images), "--checkpoint", str(path)),
        ("export", str(path), "--format", "torchscript"),
        ("checkpoint", "upgrade", str(path), str(tmp_path / "new.pt")),
    ]
    for argv in commands:
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {path}: refused" in err and "--trust-checkpoint" in err, argv
        assert not marker.exists(), argv


def test_a_users_file_loads_only_with_trust(own_checkpoint, tmp_path, run_cli, capsys):
    """A checkpoint of ours to which a user added an argparse.Namespace (as many training
    scripts do): refused by default, loaded with --trust-checkpoint."""
    cfg, path = own_checkpoint
    state = ckpt.load_checkpoint(path)
    state["args"] = argparse.Namespace(lr=0.1)
    mine = tmp_path / "mine.pt"
    torch.save(state, mine)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"argparse\.Namespace"):
        ckpt.load_checkpoint(mine)
    assert ckpt.load_checkpoint(mine, trust=True)["args"].lr == 0.1
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    out = tmp_path / "eval.json"
    assert run_cli("eval", str(config), "--checkpoint", str(mine), "--out", str(out)) == 2
    assert "argparse.Namespace" in capsys.readouterr().err and not out.exists()
    args = ("eval", str(config), "--checkpoint", str(mine), "--out", str(out))
    assert run_cli(*args, "--trust-checkpoint") == 0
    assert out.is_file()


def test_own_checkpoints_are_plain_and_still_load(own_checkpoint, tmp_path):
    cfg, path = own_checkpoint
    state = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list at all
    assert state["format_version"] == ckpt.FORMAT_VERSION == 2
    assert type(state["environment"]["torch"]) is str
    assert not [k for k in state["model"] if k.startswith("projection.")]
    assert [k for k in state["loss"] if k.startswith("contrast.projection.")]
    model, _, _ = load_trained_model(path)
    metrics = evaluate_checkpoint(cfg, path, out=tmp_path / "e.json", print_table=False)
    assert 0 <= metrics["mIoU"] <= 1
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 30, 60)).save(images / "a.png")
    assert [p.name for p in predict(path, [images], tmp_path / "out")] == ["a_mask.png"]


def test_exported_models_and_backbone_weights_still_load(own_checkpoint, tmp_path):
    _, path = own_checkpoint
    result = export_checkpoint(path, tmp_path / "m.torchscript.pt", format="torchscript")
    net = torch.jit.load(str(result.model))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 7, 32, 32)
    cfg, _ = own_checkpoint
    model = build_model(cfg.model, 7, backbone_weights=False)
    weights = tmp_path / "backbone.pth"
    state = model.backbone.body.state_dict()
    torch.save(
        {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in state.items()},
        weights,
    )
    load_backbone_weights(model.backbone, weights)
    assert all(
        torch.all(v == 0.25)
        for v in model.backbone.body.state_dict().values()
        if v.is_floating_point()
    )


def test_a_backbone_file_with_code_is_refused(tmp_path, own_checkpoint):
    cfg, _ = own_checkpoint
    marker = tmp_path / "marker"
    weights = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": RunsPython(marker)}, weights)
    model = build_model(cfg.model, 7, backbone_weights=False)
    with pytest.raises(CheckpointError, match="backbone.pth: cannot read backbone weights"):
        load_backbone_weights(model.backbone, weights)
    assert not marker.exists()


def test_every_torch_load_in_src_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                ok = isinstance(value, ast.Constant) and value.value is True
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), calls
    # one reader (with its allow-list) that checkpoints, released files and backbone weights use
    assert {c.split(":")[0] for c, _ in calls} == {"contrastseg/safe_load.py"}
