"""Safe loading: every file is read with weights_only=True. A `.pt` whose pickle would run code
is refused before anything of it runs, by every command that reads one (there is no option that
allows more: the old `--trust-checkpoint` is a usage error); a user's file holding plain data
classes (argparse.Namespace, NumPy arrays) is refused with the way on, `checkpoint upgrade`,
which rewrites it with plain types; our own checkpoints, exported models and backbone weight
files still load."""

import argparse
import ast
import builtins
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
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


class Payload:
    """Unpickling it calls ``function(*args)``, which creates the marker file."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def payloads(marker: Path) -> dict[str, Payload]:
    """The classic ways a pickle runs code, each creating ``marker``; name -> payload."""
    touch = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": Payload(os.system, touch),
        "builtins.exec": Payload(exec, python),
        "builtins.eval": Payload(eval, python),
        "subprocess.getoutput": Payload(subprocess.getoutput, touch),
        "builtins.__import__": Payload(builtins.__import__, "antigravity"),
    }


# what each of the first payloads names in the refusal
RunsShell = "posix.system"
RunsPython = "builtins.exec"


def evil_checkpoint(path: Path, payload) -> Path:
    """A file that looks like one of ours (format, config, classes) with a payload inside."""
    torch.save({"format_version": ckpt.FORMAT_VERSION, "config": {}, "model": payload}, path)
    return path


@pytest.fixture
def own_checkpoint(tiny_cfg):
    cfg = tiny_cfg("train.threads=1", "loss.contrast.enabled=true")
    return cfg, Trainer(cfg, progress=False).save_checkpoint()


@pytest.mark.parametrize("name", [RunsShell, RunsPython, "subprocess.getoutput", "builtins.eval"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "evil.pt", payloads(marker)[name])
    for load in (
        ckpt.load_checkpoint,
        load_trained_model,
        lambda p: ckpt.upgrade_file(p, tmp_path / "new.pt"),
    ):
        with pytest.raises(ckpt.UnsafeCheckpointError) as info:
            load(path)
        msg = str(info.value)
        # protocol 2 spells some names the Python 2 way (subprocess -> commands)
        called = name.split(".")[-1]
        assert str(path) in msg and "arbitrary unpickling" in msg and called in msg, msg
        assert "no contrastseg command does that" in msg and "--trust" not in msg
        assert not marker.exists()
    assert not (tmp_path / "new.pt").exists()


def _evil_everywhere(tmp_path: Path, cfg, payload) -> list[tuple[str, ...]]:
    """Every command that reads a pickled file, each given ``payload`` where it reads one:
    a checkpoint, both checkpoints of a figure, a released file, the newest checkpoint of a
    run to resume, a backbone weight file."""
    path = evil_checkpoint(tmp_path / "evil.pt", payload)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 30, 60)).save(images / "a.png")
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, run / "checkpoints" / "iter_0000003.pt")
    backbone = tmp_path / "backbone.pth"
    torch.save({"conv_stem.weight": payload}, backbone)
    out = tmp_path / "out"
    return [
        ("eval", str(config), "--checkpoint", str(path), "--out", str(out / "e.json")),
        ("predict", str(images), "--checkpoint", str(path), "--out", str(out)),
        ("export", str(path), "--format", "torchscript", "--out", str(out / "m.pt")),
        ("checkpoint", "upgrade", str(path), str(out / "new.pt")),
        ("convert", str(path), str(out / "c.pt")),
        ("figures", "compare", "--baseline", str(path), "--ours", str(path), "--out", str(out)),
        ("figures", "embeddings", str(path), "--out", str(out / "t.png")),
        ("train", str(config), "--resume", "--set", f"output.root={tmp_path}",
         "--set", "output.name=resumed"),
        ("train", str(config), "--set", f"model.backbone.weights={backbone}",
         "--set", f"output.root={tmp_path}", "--set", "output.name=fresh"),
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(payloads(Path("m"))))
def test_every_command_refuses_code_in_a_file(tmp_path, tiny_cfg, run_cli, capsys, name):
    marker = tmp_path / "marker"
    commands = _evil_everywhere(tmp_path, tiny_cfg("train.iters=3"), payloads(marker)[name])
    for argv in commands:
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert ".pt" in errors[0] or ".pth" in errors[0], (argv, errors)
        assert not marker.exists(), argv
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "c.yaml", "--checkpoint", "evil.pt", "--trust-checkpoint"),
        ("predict", "imgs", "--checkpoint", "evil.pt", "--trust-checkpoint"),
        ("export", "evil.pt", "--trust-checkpoint"),
        ("checkpoint", "upgrade", "evil.pt", "new.pt", "--trust-checkpoint"),
    ],
)
def test_the_trust_option_is_gone(tmp_path, monkeypatch, run_cli, capsys, argv):
    """No flag loads what a file names: the old option is a usage error, and the payload
    behind it never runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    evil_checkpoint(tmp_path / "evil.pt", payloads(marker)[RunsShell])
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "--trust-checkpoint" in err and "No such option" in err, err
    assert not marker.exists()


def test_a_users_data_classes_are_refused_and_upgrade_rewrites_them(
    own_checkpoint, tmp_path, run_cli, capsys
):
    """A checkpoint of ours to which a script added an argparse.Namespace, a NumPy array and a
    NumPy integer: every command refuses it, naming `checkpoint upgrade`, which writes a copy
    of plain types (a dict, a tensor, an int) that loads and evaluates."""
    cfg, path = own_checkpoint
    state = ckpt.load_checkpoint(path)
    del state["digest"]  # an edited file keeps no digest of the contents it no longer has
    state["args"] = argparse.Namespace(lr=0.1, steps=np.int64(7))
    state["history"] = np.array([0.5, 0.25])
    mine = tmp_path / "mine.pt"
    torch.save(state, mine)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"argparse\.Namespace") as info:
        ckpt.load_checkpoint(mine)
    assert f"contrastseg checkpoint upgrade {mine} NEW.pt" in str(info.value)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    out = tmp_path / "eval.json"
    assert run_cli("eval", str(config), "--checkpoint", str(mine), "--out", str(out)) == 2
    assert "checkpoint upgrade" in capsys.readouterr().err and not out.exists()
    new = tmp_path / "new.pt"
    assert run_cli("checkpoint", "upgrade", str(mine), str(new)) == 0
    plain = torch.load(new, map_location="cpu", weights_only=True)  # no allow-list at all
    assert plain["args"] == {"lr": 0.1, "steps": 7} and type(plain["args"]["steps"]) is int
    assert torch.equal(plain["history"], torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert plain["digest"].startswith("sha256:")
    for key, value in state["model"].items():
        assert torch.equal(plain["model"][key], value), key
    assert run_cli("eval", str(config), "--checkpoint", str(new), "--out", str(out)) == 0
    assert out.is_file()


def test_an_array_of_objects_is_refused_even_by_upgrade(own_checkpoint, tmp_path):
    """NumPy arrays are allowed to `checkpoint upgrade` for their numbers only: an array of
    objects needs its objects' classes, which stay refused (the payload never runs)."""
    _, path = own_checkpoint
    marker = tmp_path / "marker"
    state = ckpt.load_checkpoint(path)
    array = np.empty(1, dtype=object)
    array[0] = payloads(marker)[RunsShell]
    state["extra"] = array
    mine = tmp_path / "mine.pt"
    torch.save(state, mine)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="posix.system"):
        ckpt.upgrade_file(mine, tmp_path / "new.pt")
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


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
    torch.save({"conv1.weight": payloads(marker)[RunsPython]}, weights)
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


def test_a_symlink_loop_given_as_a_checkpoint_is_one_line(tmp_path, tiny_cfg, run_cli, capsys):
    loop = tmp_path / "X"
    loop.symlink_to(tmp_path / "X.loop")
    (tmp_path / "X.loop").symlink_to(loop)
    config = tmp_path / "tiny.yaml"
    save_config(tiny_cfg(), config)
    for argv in (
        ("export", str(loop), "--format", "torchscript", "--out", str(tmp_path / "m.pt")),
        ("eval", str(config), "--checkpoint", str(loop)),
        ("checkpoint", "upgrade", str(loop), str(tmp_path / "new.pt")),
    ):
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err and "internal" not in err, err
        assert str(loop) in err, err
