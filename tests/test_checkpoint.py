import pytest
import torch

from contrastseg.engine import checkpoint as ckpt
from contrastseg.errors import CheckpointError
from tiny import SMALL_CONTRAST


def test_atomic_save_round_trip(tmp_path):
    state = {"format_version": ckpt.FORMAT_VERSION, "w": torch.arange(5.0)}
    path = ckpt.checkpoint_path(tmp_path, 3)
    ckpt.atomic_save(state, path)
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["iter_0000003.pt"]  # no temp file left


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 1)
    ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION, "v": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION, "v": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_checkpoint_is_reported_and_skipped_on_resume(tmp_path):
    good = ckpt.checkpoint_path(tmp_path, 10)
    ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION, "v": "good"}, good)
    bad = ckpt.checkpoint_path(tmp_path, 20)
    ckpt.atomic_save(
        {"format_version": ckpt.FORMAT_VERSION, "v": "bad", "x": torch.zeros(1000)}, bad
    )
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"iter_0000020.pt.*truncated or corrupt"):
        ckpt.load_checkpoint(bad)
    path, state = ckpt.latest_loadable(tmp_path)
    assert path == good and state["v"] == "good"


def test_rotation_keeps_newest(tmp_path):
    for i in (5, 10, 15, 20):
        ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION}, ckpt.checkpoint_path(tmp_path, i))
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
    ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION}, ckpt.checkpoint_path(tmp_path, 3))
    torn = tmp_path / ".iter_0000006.pt.k2j4x9.tmp"  # what SIGKILL during a save leaves
    torn.write_bytes(b"partial")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("mine")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000003.pt"]
    ckpt.atomic_save({"format_version": ckpt.FORMAT_VERSION}, ckpt.checkpoint_path(tmp_path, 9))
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


def old_format_state(state: dict) -> dict:
    """``state`` (format 2) as the format-1 trainer wrote it: the projection head's weights in
    the model as ``projection.*`` (with their ``_metadata``), torch's version as a TorchVersion
    object, no per-process states."""
    from collections import OrderedDict

    prefix = "contrast.projection."
    model = OrderedDict(state["model"])
    model._metadata = OrderedDict(state["model"]._metadata)
    loss = OrderedDict((k, v) for k, v in state["loss"].items() if not k.startswith(prefix))
    loss._metadata = OrderedDict(
        (k, v)
        for k, v in state["loss"]._metadata.items()
        if not k.startswith("contrast.projection")
    )
    for key, value in state["loss"].items():
        if key.startswith(prefix):
            model["projection." + key[len(prefix) :]] = value
    for key, value in state["loss"]._metadata.items():
        if key.startswith("contrast.projection"):
            model._metadata[key[len("contrast.") :]] = value
    old = {k: v for k, v in state.items() if k != "processes"}
    old.update(format_version=1, model=model, loss=loss)
    old["environment"] = {**state["environment"], "torch": torch.__version__}
    assert type(old["environment"]["torch"]) is not str  # torch's TorchVersion
    return old


def test_upgrade_moves_the_projection_head_into_the_loss_state(tiny_cfg, tmp_path, run_cli):
    """A format-1 checkpoint (written here with torch.save the old way) is refused with the
    command that converts it; `contrastseg checkpoint upgrade OLD NEW` writes a file that loads
    with weights_only=True alone and holds exactly the state the current trainer writes, and a
    run resumes from it."""
    from contrastseg.engine.trainer import Trainer

    overrides = [
        "train.threads=1",
        "train.iters=3",
        *SMALL_CONTRAST,
        "loss.aaf.enabled=true",
    ]
    cfg = tiny_cfg(*overrides)
    trainer = Trainer(cfg, progress=False)
    for batch in trainer._loader():
        trainer.train_step(batch)
    current = trainer.state_dict()
    assert int(current["loss"]["contrast.memory.pixel_count"].sum()) > 0
    old_path = tmp_path / "old.pt"
    torch.save(old_format_state(current), old_path)
    old_bytes = old_path.read_bytes()

    with pytest.raises(ckpt.OldFormatError) as info:
        ckpt.load_checkpoint(old_path)
    msg = str(info.value)
    assert f"{old_path}: checkpoint format 1 is older" in msg
    assert f"contrastseg checkpoint upgrade {old_path} NEW.pt" in msg

    new_path = tmp_path / "new.pt"
    assert run_cli("checkpoint", "upgrade", str(old_path), str(new_path)) == 0
    assert old_path.read_bytes() == old_bytes
    new = torch.load(new_path, map_location="cpu", weights_only=True)
    assert new["format_version"] == ckpt.FORMAT_VERSION == 2
    assert type(new["environment"]["torch"]) is str
    assert not [k for k in new["model"] if k.startswith("projection")]
    for section in ("model", "loss"):
        assert sorted(new[section]) == sorted(current[section]), section
        for key, value in current[section].items():
            assert torch.equal(new[section][key], value), f"{section}.{key}"
    projection = [k for k in new["loss"] if k.startswith("contrast.projection.")]
    assert "contrast.projection.net.0.weight" in projection
    for key in ("contrast._extra_state", "contrast.memory.pixel_queue", "aaf.edge_logits"):
        assert torch.equal(new["loss"][key], current["loss"][key])
    assert "contrast.projection.net.1" in new["loss"]._metadata
    assert not [k for k in new["model"]._metadata if k.startswith("projection")]
    assert torch.equal(new["processes"][0]["rng"]["torch"], current["rng"]["torch"])
    assert new["optimizer"]["param_groups"] == current["optimizer"]["param_groups"]

    # Neither the original nor the converted file is ever overwritten.
    assert run_cli("checkpoint", "upgrade", str(old_path), str(new_path)) == 2
    assert run_cli("checkpoint", "upgrade", str(new_path), str(tmp_path / "again.pt")) == 2
    assert not (tmp_path / "again.pt").exists()

    # A run folder holding only the old file: resuming names the command instead of skipping it.
    run = tiny_cfg(*overrides, "output.name=resumed")
    folder = run.run_dir / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "iter_0000003.pt").write_bytes(old_bytes)
    with pytest.raises(ckpt.OldFormatError, match="contrastseg checkpoint upgrade"):
        ckpt.latest_loadable(folder)
    (folder / "iter_0000003.pt").write_bytes(new_path.read_bytes())
    resumed = Trainer(run, resume=True, progress=False)
    assert resumed.iteration == 3
    for key, value in resumed.loss_set.state_dict().items():
        assert torch.equal(value, current["loss"][key]), key
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, current["model"][key]), key
