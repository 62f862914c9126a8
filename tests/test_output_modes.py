"""Outputs: files written through a temporary file get the permissions of any new file
(``0o666 & ~umask``) and a replaced file keeps its own; every command that writes refuses an
output path that is a folder where a file goes, a file where a folder goes, or lies under a
file, with one line naming it, exit status 2, before any work and without creating anything."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from contrastseg.config import load_config
from contrastseg.engine.checkpoint import atomic_save
from contrastseg.engine.inference import predict_files
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import OutputError
from contrastseg.export import export_checkpoint
from contrastseg.files import atomic_write, check_output_dir, check_output_file, current_umask
from tiny import TINY

UMASKS = {0o022: 0o644, 0o077: 0o600, 0o027: 0o640}


@pytest.fixture(params=list(UMASKS), ids=lambda m: f"umask {m:03o}")
def umask(request):
    """Run the test under this umask (restored after); yields the mode a new file gets."""
    old = os.umask(request.param)
    try:
        yield UMASKS[request.param]
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint (synthetic classes) in ``run/checkpoints``."""
    root = tmp_path_factory.mktemp("outputs")
    cfg = load_config(None, [*TINY, "data.train_size=4", "data.val_size=2", f"output.root={root}"])
    return Trainer(cfg, progress=False).save_checkpoint()


def test_current_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


def test_atomic_write_gives_a_new_file_the_umask_mode(tmp_path, umask):
    path = tmp_path / "sub" / "new.txt"
    atomic_write(path, lambda tmp: tmp.write_text("x"))
    assert mode(path) == umask
    assert [p.name for p in path.parent.iterdir()] == ["new.txt"]  # no temporary file left


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "kept.txt"
    path.write_text("old")
    os.chmod(path, 0o604)  # as its owner set it, whatever the umask
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and mode(path) == 0o604


def test_checkpoints_and_predict_outputs_get_the_umask_mode(tmp_path, umask):
    path = tmp_path / "ckpt.pt"
    atomic_save({"weights": [1.0, 2.0]}, path)
    assert mode(path) == umask
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    out = tmp_path / "predictions"
    result = predict_files([image], out, lambda rgb: np.ones(rgb.shape[:2], np.uint8), palette)
    assert [p.name for p in result] == ["photo_mask.png"]
    assert {p.name: mode(p) for p in out.iterdir()} == {
        name: umask for name in ("photo_labels.png", "photo_overlay.png", "photo_mask.png")
    }


def test_an_onnx_export_gets_the_umask_mode(tmp_path, checkpoint):
    old = os.umask(0o022)
    try:
        result = export_checkpoint(checkpoint, tmp_path / "model.onnx")
    finally:
        os.umask(old)
    assert mode(result.model) == 0o644 and mode(result.sidecar) == 0o644


def test_the_checks_name_the_path_and_create_nothing(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("keep me")
    with pytest.raises(OutputError, match=r"folder: is a folder; the output needs a file path"):
        check_output_file(folder)
    with pytest.raises(OutputError, match=r"file/x/y.pt: .*file is a file, not a folder, so"):
        check_output_file(file / "x" / "y.pt")
    with pytest.raises(OutputError, match=r"file: is a file, not a folder; the output needs a"):
        check_output_dir(file)
    with pytest.raises(OutputError, match=r"file/sub: .*file is a file, not a folder, so"):
        check_output_dir(file / "sub")
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write(folder, lambda tmp: tmp.write_text("x"))
    assert check_output_file(tmp_path / "new" / "a.pt") == tmp_path / "new" / "a.pt"
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert file.read_text() == "keep me" and list(folder.iterdir()) == []


# Each writer command with a bad output path: (argv, the path its error line names). FILE is a
# file, DIR a folder, CKPT the tiny checkpoint, CONFIG a config, RUN its run folder.
WRITERS = {
    "predict --out FILE": (["predict", "IMG", "--checkpoint", "CKPT", "--out", "FILE"], "FILE"),
    "predict --out FILE/sub": (
        ["predict", "IMG", "--checkpoint", "CKPT", "--out", "FILE/sub"],
        "FILE/sub",
    ),
    "export --out DIR": (["export", "CKPT", "--out", "DIR"], "DIR"),
    "export --out FILE/m.onnx": (["export", "CKPT", "--out", "FILE/m.onnx"], "FILE/m.onnx"),
    "eval --out DIR": (["eval", "CONFIG", "--checkpoint", "CKPT", "--out", "DIR"], "DIR"),
    "eval --out FILE/e.json": (
        ["eval", "CONFIG", "--checkpoint", "CKPT", "--out", "FILE/e.json"],
        "FILE/e.json",
    ),
    "checkpoint upgrade CKPT DIR": (["checkpoint", "upgrade", "CKPT", "DIR"], "DIR"),
    "checkpoint upgrade CKPT FILE/x.pt": (
        ["checkpoint", "upgrade", "CKPT", "FILE/x.pt"],
        "FILE/x.pt",
    ),
    "convert CKPT DIR": (["convert", "CKPT", "DIR"], "DIR"),
    "convert CKPT FILE/x.pt": (["convert", "CKPT", "FILE/x.pt"], "FILE/x.pt"),
    "figures compare --out FILE": (
        ["figures", "compare", "--baseline", "CKPT", "--ours", "CKPT", "--out", "FILE"],
        "FILE",
    ),
    "figures embeddings --out DIR": (["figures", "embeddings", "CKPT", "--out", "DIR"], "DIR"),
    "report --out DIR": (["report", "RUN", "--out", "DIR"], "DIR"),
    "report --csv FILE/t.csv": (["report", "RUN", "--csv", "FILE/t.csv"], "FILE/t.csv"),
}


@pytest.mark.parametrize("case", list(WRITERS))
def test_every_writer_refuses_an_impossible_output_path(
    tmp_path, checkpoint, run_cli, capsys, case
):
    work = tmp_path / "work"
    (work / "DIR").mkdir(parents=True)
    (work / "FILE").write_text("keep me")
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"name": "synthetic", "val_size": 2}}))
    names = {
        "IMG": tmp_path / "img.png",
        "CKPT": checkpoint,
        "CONFIG": config,
        "RUN": checkpoint.parent.parent,
    }
    argv, named = WRITERS[case]
    argv = [
        str(names[a]) if a in names else str(work / a) if a.split("/")[0] in ("FILE", "DIR") else a
        for a in argv
    ]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {work / named}: ")
    assert "is a folder;" in lines[0] or "is a file, not a folder" in lines[0]
    assert sorted(p.name for p in work.iterdir()) == ["DIR", "FILE"]  # nothing created
    assert list((work / "DIR").iterdir()) == [] and (work / "FILE").read_text() == "keep me"
