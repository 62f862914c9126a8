import pytest
import torch

from contrastseg.engine import checkpoint as ckpt
from contrastseg.errors import CheckpointError


def test_atomic_save_round_trip(tmp_path):
    state = {"format_version": ckpt.FORMAT_VERSION, "w": torch.arange(5.0)}
    path = ckpt.checkpoint_path(tmp_path, 3)
    ckpt.atomic_save(state, path)
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["iter_0000003.pt"]  # no temp file left


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 1)
    ckpt.atomic_save({"format_version": 1, "v": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_save({"format_version": 1, "v": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_checkpoint_is_reported_and_skipped_on_resume(tmp_path):
    good = ckpt.checkpoint_path(tmp_path, 10)
    ckpt.atomic_save({"format_version": 1, "v": "good"}, good)
    bad = ckpt.checkpoint_path(tmp_path, 20)
    ckpt.atomic_save({"format_version": 1, "v": "bad", "x": torch.zeros(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"iter_0000020.pt.*truncated or corrupt"):
        ckpt.load_checkpoint(bad)
    path, state = ckpt.latest_loadable(tmp_path)
    assert path == good and state["v"] == "good"


def test_rotation_keeps_newest(tmp_path):
    for i in (5, 10, 15, 20):
        ckpt.atomic_save({"format_version": 1}, ckpt.checkpoint_path(tmp_path, i))
    ckpt.rotate(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "iter_0000015.pt",
        "iter_0000020.pt",
    ]


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match="not a contrastseg checkpoint"):
        ckpt.load_checkpoint(path)


def test_rotation_removes_temporary_files_of_a_killed_save(tmp_path):
    ckpt.atomic_save({"format_version": 1}, ckpt.checkpoint_path(tmp_path, 3))
    torn = tmp_path / ".iter_0000006.pt.k2j4x9.tmp"  # what SIGKILL during a save leaves
    torn.write_bytes(b"partial")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("mine")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000003.pt"]
    ckpt.atomic_save({"format_version": 1}, ckpt.checkpoint_path(tmp_path, 9))
    ckpt.rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003.pt",
        "iter_0000009.pt",
        "notes.tmp",
    ]


def test_newer_format_is_refused_with_the_fix(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 1)
    ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and f"format {ckpt.FORMAT_VERSION + 1} is newer" in msg
    assert "upgrade contrastseg" in msg


def test_checkpoint_records_format_config_classes_and_code_version(tiny_cfg):
    import contrastseg
    from contrastseg.config import ExperimentConfig
    from contrastseg.engine.trainer import Trainer

    cfg = tiny_cfg("train.threads=1")
    state = ckpt.load_checkpoint(Trainer(cfg, progress=False).save_checkpoint())
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["iteration"] == 0
    assert ExperimentConfig.model_validate(state["config"]) == cfg
    assert len(state["class_names"]) == 7 and len(state["palette"]) == 7
    assert state["environment"]["contrastseg"] == contrastseg.__version__
    assert "git_commit" in state["environment"] and state["environment"]["torch"]
    assert {"model", "optimizer", "loss", "scaler", "rng"} <= set(state)
