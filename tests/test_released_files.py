"""Outside files as they come: a released checkpoint saved by the authors' trainer (NumPy
scalars in its config, under the NumPy 2 and NumPy 1 names) converts and loads, still with
weights_only=True and nothing that runs code; an empty file, a truncated one and a folder given
as a checkpoint are one-line errors naming the file, in every command that reads one."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastseg.config import save_config
from contrastseg.errors import CheckpointError
from contrastseg.safe_load import load_weights_only
from test_convert import small_hrnet_state

NUMPY2 = b"numpy._core.multiarray\nscalar"
NUMPY1 = b"numpy.core.multiarray\nscalar"


def save_like_the_released_trainer(state: dict, path: Path, numpy1: bool = False) -> Path:
    """What their ``save_net`` writes after validation: the config (with the mIoU that
    ``np.nanmean`` gave, a ``numpy.float64``) and the DataParallel state dict. With ``numpy1``
    the pickle names the scalar constructor as NumPy 1.x did (``numpy.core.multiarray``)."""
    config_dict = {
        "network": {"model_name": "hrnet_w48_contrast", "backbone": "hrnet48"},
        "performance": np.float64(0.8),
        "max_performance": np.float64(0.8),
        "iters": 40000,
    }
    wrapped = {"module." + k: v for k, v in state.items()}
    torch.save({"config_dict": config_dict, "state_dict": wrapped}, path)
    if numpy1:
        _respell(path, NUMPY2, NUMPY1)
    return path


def _respell(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite the pickle inside a torch zip file with ``old`` replaced by ``new`` (every other
    record copied as it is)."""
    with zipfile.ZipFile(path) as src:
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(name, data)
    tmp.replace(path)


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-name", "numpy1-name"])
def test_a_file_saved_by_the_released_trainer_converts(tmp_path, run_cli, numpy1):
    from contrastseg.engine.inference import load_trained_model

    state = small_hrnet_state("hrnet_w48", contrast=True)
    src = save_like_the_released_trainer(
        state, tmp_path / "hrnet_w48_contrast_max_performance.pth", numpy1
    )
    named = torch.serialization.get_unsafe_globals_in_checkpoint(str(src))
    spelled = "numpy.core.multiarray.scalar" if numpy1 else "numpy._core.multiarray.scalar"
    assert spelled in named and "numpy.dtype" in named  # the file is what the test says
    raw = load_weights_only(src)
    assert raw["config_dict"]["max_performance"] == 0.8
    assert type(raw["config_dict"]["max_performance"]) is np.float64
    out = tmp_path / "converted.pt"
    assert run_cli("convert", str(src), str(out)) == 0
    model, cfg, saved = load_trained_model(out)
    own = model.state_dict()
    assert cfg.model.head == "hrnetv2" and saved["converted_from"]["layout"] == "hrnet_w48"
    assert torch.equal(own["head.classifier.weight"], state["cls_head.3.weight"])
    assert torch.equal(own["backbone.body.conv1.weight"], state["backbone.conv1.weight"].flip(1))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_allow_list_lets_numbers_through_and_nothing_that_runs_code(tmp_path, run_cli, capsys):
    state = small_hrnet_state("hrnet_w48", contrast=False)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"config_dict": {"hook": RunsShell(marker)}, "state_dict": state}, evil)
    assert run_cli("convert", str(evil), str(tmp_path / "out.pt")) == 2
    err = capsys.readouterr().err
    assert "evil.pth: refused" in err and "posix.system" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    # a NumPy array is not on the list (its reconstruction is a general constructor)
    arrays = tmp_path / "arrays.pth"
    torch.save({"config_dict": {"history": np.zeros(3)}, "state_dict": state}, arrays)
    with pytest.raises(CheckpointError, match=r"arrays.pth: refused.*_reconstruct"):
        from contrastseg.convert import read_released

        read_released(arrays)


@pytest.fixture
def broken_files(tmp_path):
    """An empty file, a truncated checkpoint and a folder, each named after what it is."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.pt"
    torch.save({"format_version": 2, "model": {"w": torch.zeros(64, 64)}}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    return {"empty": empty, "truncated": truncated, "folder": folder}


REASONS = {
    "empty": "the file is empty (0 bytes)",
    "truncated": "truncated or corrupt",
    "folder": "is a folder, not a",
}


@pytest.mark.parametrize("kind", ["empty", "truncated", "folder"])
def test_broken_checkpoint_is_a_one_line_error_in_every_command(
    kind, broken_files, tiny_cfg, tmp_path, run_cli, capsys
):
    path = str(broken_files[kind])
    config = tmp_path / "cfg.yaml"
    save_config(tiny_cfg(), config)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    commands = {
        "eval": ["eval", str(config), "--checkpoint", path],
        "predict": ["predict", "--checkpoint", path, str(image), "--out", str(tmp_path / "p")],
        "export": ["export", path, "--out", str(tmp_path / "m.onnx")],
        "upgrade": ["checkpoint", "upgrade", path, str(tmp_path / "new.pt")],
        "convert": ["convert", path, str(tmp_path / "c.pt")],
        "compare": ["figures", "compare", "--baseline", path, "--ours", path],
        "embeddings": ["figures", "embeddings", path, "--out", str(tmp_path / "e.png")],
    }
    for name, argv in commands.items():
        assert run_cli(*argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert err.startswith(f"error: {path}: ") and REASONS[kind] in err, (name, err)
