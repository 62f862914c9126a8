"""Checkpoint integrity: the content digest written at save and checked at load, the zip CRC-32
check, refusal of non-finite weights, and one line naming the part for a missing or malformed
part, in every command that reads a checkpoint (`eval`, `predict`, `export`, `train --resume`)."""

import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from contrastseg.config import load_config, save_config
from contrastseg.digest import DIGEST_KEY, content_digest, digest_problem, sealed
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.inference import load_trained_model
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import CheckpointError
from tiny import SMALL_CONTRAST, TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A contrast run with a memory, its config file, its checkpoint at iteration 2, an image."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = load_config(
        None,
        [
            *TINY,
            *SMALL_CONTRAST,
            "data.train_size=8",
            "data.val_size=2",
            "train.iters=2",
            "train.batch_size=2",
            "train.checkpoint_every=2",
            "train.threads=1",
            "eval.batch_size=2",
            f"output.root={root}",
            "output.name=run",
        ],
    )
    Trainer(cfg, progress=False).fit()
    config = root / "tiny.yaml"
    save_config(cfg, config)
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 32), (200, 30, 60)).save(images / "a.png")
    return {
        "root": root,
        "config": config,
        "checkpoint": root / "run" / "checkpoints" / "iter_0000002.pt",
        "images": images,
    }


def _records(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every record of a torch zip file."""
    out = []
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            start = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
            out.append((info.filename, start + 30 + name_len + extra_len, info.file_size))
    return out


def _flip(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _resaved(src: Path, dst: Path, change) -> Path:
    """``src``'s state, changed by ``change(state)``, saved as ``dst`` by torch.save (so its zip
    checksums are right)."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, dst)
    return dst


def _commands(run: dict, path: Path, out: Path) -> dict[str, tuple[str, ...]]:
    """Each command that reads a checkpoint, given ``path``; ``train --resume`` reads it as the
    only checkpoint of a copy of the run."""
    resumed = out.parent / f"resume_{path.stem}"
    (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, resumed / "checkpoints" / "iter_0000002.pt")
    config = str(run["config"])
    return {
        "eval": ("eval", config, "--checkpoint", str(path), "--out", str(out / "e.json")),
        "predict": ("predict", str(run["images"]), "--checkpoint", str(path), "--out", str(out)),
        "export": ("export", str(path), "--format", "torchscript", "--out", str(out / "m.pt")),
        "resume": ("train", str(run["config"]), "--resume", "--set", "train.iters=4",
                   "--set", f"output.root={out.parent}", "--set", f"output.name={resumed.name}"),
    }  # fmt: skip


def _refused(run_cli, capsys, argv, *needles: str) -> str:
    """Run ``argv``: status 2, exactly one ``error:`` line, no traceback; the error and warning
    lines together contain every needle. Returns the error line."""
    assert run_cli(*argv) == 2, argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, (argv, err)
    for needle in needles:
        assert needle in err, (argv, needle, err)
    return errors[0]


def _bump(tensor: torch.Tensor, delta) -> None:
    """Add ``delta`` to the first element of ``tensor``, in place (any strides)."""
    tensor[(0,) * tensor.dim()] += delta


def _memory(loss_state: dict) -> torch.Tensor:
    return next(
        v
        for k, v in loss_state.items()
        if "memory" in k and isinstance(v, torch.Tensor) and v.is_floating_point()
    )


# --- the digest ----------------------------------------------------------------------------
def test_the_digest_survives_a_round_trip_and_covers_every_value(run):
    state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    assert state[DIGEST_KEY].startswith("sha256:") and len(state[DIGEST_KEY]) == 71
    assert digest_problem(state) is None
    assert content_digest(state) == state[DIGEST_KEY]
    # every part resume restores is covered: a change anywhere changes the digest
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    changes = {
        "a weight": lambda s: _bump(s["model"][name], 1e-7),
        "a momentum": lambda s: _bump(
            next(iter(s["optimizer"]["state"].values()))["momentum_buffer"], 1.0
        ),
        "the memory": lambda s: _bump(_memory(s["loss"]), 1.0),
        "the random state": lambda s: _bump(s["rng"]["torch"], 1),
        "a config value": lambda s: s["config"]["train"].__setitem__("lr", 0.02),
        "the iteration": lambda s: s.__setitem__("iteration", 3),
        "a class name": lambda s: s["class_names"].__setitem__(0, s["class_names"][0] + " "),
        "a dtype": lambda s: s["model"].__setitem__(name, s["model"][name].double()),
        "a shape": lambda s: s["model"].__setitem__(name, s["model"][name].reshape(-1)),
        "a new key": lambda s: s.__setitem__("note", None),
    }
    for what, change in changes.items():
        copy = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
        change(copy)
        assert "do not match" in (digest_problem(copy) or ""), what


def test_a_view_digests_like_its_copy_and_bool_differs_from_int():
    base = torch.arange(12.0).reshape(3, 4)
    assert content_digest({"t": base.t()}) == content_digest({"t": base.t().contiguous()})
    assert content_digest({"a": True}) != content_digest({"a": 1})
    assert content_digest({"a": 1}) != content_digest({"a": 1.0})
    assert content_digest({"a": [1]}) != content_digest({"a": (1,)})
    assert content_digest({"a": 1, "b": 2}) != content_digest({"b": 2, "a": 1})
    assert digest_problem(sealed({"a": torch.zeros(0)})) is None
    assert "not 'sha256:'" in digest_problem({"a": 1, DIGEST_KEY: "md5:00"})


# --- damage --------------------------------------------------------------------------------
def test_a_flipped_byte_in_any_record_is_refused(run, tmp_path):
    """One byte inverted in the middle of each record in turn (every tensor, the pickle, the
    version records): every such file is refused, naming it."""
    records = _records(run["checkpoint"])
    assert sum(name.split("/")[-2] == "data" for name, _, _ in records) > 20
    for name, start, size in records:
        if size == 0:
            continue
        bad = _flip(run["checkpoint"], tmp_path / "bad.pt", start + size // 2)
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(bad)
        assert str(bad) in str(info.value) and "damaged" in str(info.value), name


@pytest.mark.parametrize("command", ["eval", "predict", "export", "resume"])
def test_damage_is_refused_by_every_command(run, tmp_path, run_cli, capsys, command):
    """A flipped byte in a tensor (caught by the zip checksums) and a changed weight in a
    file saved again (checksums right, caught by the digest)."""
    record = next(r for r in _records(run["checkpoint"]) if r[0].endswith("/data/5"))
    flipped = _flip(run["checkpoint"], tmp_path / "flipped.pt", record[1] + record[2] // 2)

    def change(state):
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        _bump(state["model"][name], 0.5)

    changed = _resaved(run["checkpoint"], tmp_path / "changed.pt", change)
    for path, why in ((flipped, "fails its CRC-32"), (changed, "do not match the digest")):
        out = tmp_path / f"out_{path.stem}"
        named = "iter_0000002.pt" if command == "resume" else path.name  # the run's copy
        _refused(run_cli, capsys, _commands(run, path, out)[command], named, why)
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*.png")), command
        assert not (out / "e.json").exists() and not (out / "m.pt").exists()


def test_resume_skips_a_damaged_newest_checkpoint_for_the_previous_one(run, tmp_path, run_cli):
    run_dir = tmp_path / "r"
    shutil.copytree(run["checkpoint"].parent.parent, run_dir)
    first = run_dir / "checkpoints" / "iter_0000002.pt"
    newest = run_dir / "checkpoints" / "iter_0000003.pt"
    record = next(r for r in _records(first) if r[0].endswith("/data/3"))
    _flip(first, newest, record[1] + 1)
    argv = ("train", str(run["config"]), "--resume", "--set", "train.iters=3",
            "--set", f"output.root={tmp_path}", "--set", "output.name=r")  # fmt: skip
    assert run_cli(*argv) == 0
    # the damaged file was replaced by the one the resumed run wrote at iteration 3
    assert ckpt.load_checkpoint(newest)["iteration"] == 3


# --- files written before digests ------------------------------------------------------------
def test_a_file_without_a_digest_loads_with_one_notice_and_upgrade_seals_it(
    run, tmp_path, run_cli, capsys, caplog
):
    old = _resaved(run["checkpoint"], tmp_path / "old.pt", lambda s: s.pop(DIGEST_KEY))
    ckpt._NOTIFIED.discard(str(old))
    with caplog.at_level("WARNING"):
        ckpt.load_checkpoint(old)
        ckpt.load_checkpoint(old)
    notices = [r for r in caplog.records if "without a content digest" in r.getMessage()]
    assert len(notices) == 1 and str(old) in notices[0].getMessage()
    out = tmp_path / "e.json"
    assert run_cli("eval", str(run["config"]), "--checkpoint", str(old), "--out", str(out)) == 0
    new = tmp_path / "new.pt"
    assert run_cli("checkpoint", "upgrade", str(old), str(new)) == 0
    state = torch.load(new, map_location="cpu", weights_only=True)
    assert digest_problem(state) is None and DIGEST_KEY in state
    original = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    assert state[DIGEST_KEY] == original[DIGEST_KEY]  # same contents, same digest
    capsys.readouterr()
    _refused(run_cli, capsys, ("checkpoint", "upgrade", str(new), str(tmp_path / "again.pt")),
             "nothing to convert")  # fmt: skip


# --- non-finite weights --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["one NaN", "all inf"])
@pytest.mark.parametrize("command", ["eval", "predict", "export", "resume"])
def test_non_finite_weights_are_refused_naming_the_tensor(run, tmp_path, run_cli, capsys, how,
                                                          command):  # fmt: skip
    state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    names = [k for k, v in state["model"].items() if v.is_floating_point()]
    target = names[len(names) // 2]

    def poison(s):
        if how == "one NaN":
            s["model"][target][(0,) * s["model"][target].dim()] = float("nan")
        else:
            for name in names:
                s["model"][name].fill_(float("inf"))
        s[DIGEST_KEY] = content_digest(s)  # a sound file of a diverged model

    path = _resaved(run["checkpoint"], tmp_path / "nan.pt", poison)
    first = target if how == "one NaN" else names[0]
    out = tmp_path / "out"
    line = _refused(run_cli, capsys, _commands(run, path, out)[command], f"'{first}'")
    assert "non-finite" in line
    assert ("iter_0000002.pt" if command == "resume" else "nan.pt") in line
    assert not (out / "e.json").exists() and not (out / "m.pt").exists()


# --- missing and malformed parts -----------------------------------------------------------
def _drop(key):
    return lambda s: s.pop(key)


def _put(key, value):
    return lambda s: s.__setitem__(key, value)


def _set_config(section, key, value):
    return lambda s: s["config"][section].__setitem__(key, value)


PARTS = {
    "no model": (_drop("model"), "'model'"),
    "no config": (_drop("config"), "'config'"),
    "no class_names": (_drop("class_names"), "'class_names'"),
    "no palette": (_drop("palette"), "'palette'"),
    "class_names an int": (_put("class_names", 7), "'class_names' part is a int"),
    "class_names of ints": (_put("class_names", [1, 2]), "class_names[0] is a int"),
    "model a list": (_put("model", [1, 2]), "'model' part is a list"),
    "a weight a string": (
        lambda s: s["model"].__setitem__(next(iter(s["model"])), "w"),
        "the 'model' part maps",
    ),
    "config a string": (_put("config", "x"), "'config' part is a str"),
    "train.iters -5": (_set_config("train", "iters", -5), "train.iters"),
    "unknown config key": (_set_config("train", "itters", 5), "train.itters"),
    "short palette": (_put("palette", [[0, 0, 0]]), "'palette' has 1 colours"),
    "palette values": (
        lambda s: s["palette"].__setitem__(0, [0, 0, 999]),
        "palette[0]",
    ),
    "format_version a string": (_put("format_version", "2"), "format_version '2'"),
    "iteration None": (_put("iteration", None), "'iteration' part is a None"),
    "iteration nested": (_put("iteration", [[1]]), "'iteration' part is a list"),
    "iteration negative": (_put("iteration", -1), "iteration -1"),
    "a float weight cast to integers": (
        lambda s: s["model"].__setitem__(
            next(k for k in s["model"] if k.endswith("running_var")),
            s["model"][next(k for k in s["model"] if k.endswith("running_var"))].long(),
        ),
        "is torch.int64, but the model's is torch.float32",
    ),
    "weights of another shape": (
        lambda s: s["model"].__setitem__(
            next(k for k, v in s["model"].items() if v.dim() == 4),
            torch.zeros(1, 1, 1, 1),
        ),
        "do not fit",
    ),
}
RESUME_PARTS = {
    "no optimizer": (_drop("optimizer"), "'optimizer'"),
    "optimizer a list": (_put("optimizer", []), "'optimizer' part is a list"),
    "iteration a string": (_put("iteration", "2"), "'iteration' part is a str"),
    "no rng": (_drop("rng"), "'rng'"),
    "rng of floats": (_put("rng", {"torch": torch.zeros(3)}), "'rng'"),
    "processes a dict": (_put("processes", {"a": 1}), "'processes' part is a dict"),
    "best a string": (_put("best", "x"), "'best'"),
    "loss a list": (_put("loss", [1]), "'loss' part is a list"),
    "an optimizer of another model": (
        lambda s: s["optimizer"]["param_groups"][0].__setitem__("params", [0]),
        "'optimizer' part does not fit",
    ),
}


@pytest.mark.parametrize("case", sorted(PARTS))
def test_a_missing_or_malformed_part_is_one_line_naming_it(run, tmp_path, run_cli, capsys, case):
    change, needle = PARTS[case]

    def unsealed(state):
        state.pop(DIGEST_KEY)
        change(state)

    path = _resaved(run["checkpoint"], tmp_path / "part.pt", unsealed)
    ckpt._NOTIFIED.add(str(path))
    with pytest.raises(CheckpointError, match="part.pt"):
        load_trained_model(path)
    commands = _commands(run, path, tmp_path / "out")
    for command in ("eval", "predict", "export"):
        line = _refused(run_cli, capsys, commands[command], needle)
        assert "part.pt" in line, line
    # a sealed file so changed is refused by its digest before any part is read
    sealed_path = _resaved(run["checkpoint"], tmp_path / "sealed.pt", change)
    _refused(run_cli, capsys, _commands(run, sealed_path, tmp_path / "o2")["eval"], "corrupt")


@pytest.mark.parametrize("case", sorted(RESUME_PARTS) + ["no model", "train.iters -5"])
def test_resume_names_a_missing_or_malformed_part(run, tmp_path, run_cli, capsys, case):
    change, needle = {**PARTS, **RESUME_PARTS}[case]

    def unsealed(state):
        state.pop(DIGEST_KEY)
        change(state)

    path = _resaved(run["checkpoint"], tmp_path / "part.pt", unsealed)
    line = _refused(run_cli, capsys, _commands(run, path, tmp_path / "out")["resume"], needle)
    assert "iter_0000002.pt" in line, line


# --- structures no walk survives -----------------------------------------------------------
def _doubling(levels: int) -> list:
    """``levels`` lists, each holding the previous one twice: 2^levels values as a tree."""
    value: list = [0]
    for _ in range(levels):
        value = [value, value]
    return value


def _self_holding() -> list:
    value: list = [1]
    value.append(value)
    return value


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "where, bomb, needle",
    [
        ("config", _doubling(60), "expand to more than 1,000,000"),
        ("model", _self_holding(), "contains itself"),
        ("extra", _deep(200), "nest more than 64 deep"),
        ("digest", _doubling(40), "expand to more than"),
    ],
)
def test_a_pickle_that_expands_or_cycles_is_refused_at_once(
    run, tmp_path, run_cli, capsys, where, bomb, needle
):
    """Shared references make a small file hold 2^60 values, or a list hold itself: the
    digest, the config check and every error message would walk it for ever. Refused before any
    walk, in eval and checkpoint upgrade, naming the file."""
    path = _resaved(run["checkpoint"], tmp_path / "bomb.pt", lambda s: s.__setitem__(where, bomb))
    assert path.stat().st_size < 10 * run["checkpoint"].stat().st_size
    out = tmp_path / "out"
    for argv in (
        ("eval", str(run["config"]), "--checkpoint", str(path), "--out", str(out / "e.json")),
        ("checkpoint", "upgrade", str(path), str(out / "new.pt")),
    ):
        line = _refused(run_cli, capsys, argv, needle)
        assert "bomb.pt: not a checkpoint" in line, line
    assert not out.exists()
