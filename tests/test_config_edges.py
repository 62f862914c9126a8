"""Config validation at the edge: every float finite, sizes in range and within memory, the run
folder a folder, YAML read as bounded UTF-8; each refusal one line naming the file and key,
within 2 s, exit status 2 from `config show`, `train` and `eval`."""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from contrastseg.config import ExperimentConfig, load_config
from contrastseg.config_checks import crop_warning, format_bytes, memory_limit
from contrastseg.errors import ConfigError
from contrastseg.yaml_io import MAX_BYTES

CLI = str(Path(sys.executable).with_name("contrastseg"))
DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, int | None]]:
    """Every float field of the config tree: (dotted key, None for a scalar or the length of
    the list to write for a tuple of floats)."""
    found: list[tuple[str, int | None]] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        ann = field.annotation
        args = typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None
            ann = next(a for a in args if a is not type(None))
            args = typing.get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found += _float_fields(ann, key + ".")
        elif ann is float:
            found.append((key, None))
        elif typing.get_origin(ann) is tuple and float in args:
            default = field.default
            length = len(default) if default else 3
            found.append((key, length if args[-1] is not Ellipsis else max(length, 1)))
    return found


FLOAT_FIELDS = _float_fields(ExperimentConfig)


def test_the_walk_finds_the_float_fields():
    keys = {k for k, _ in FLOAT_FIELDS}
    expected = {
        "optim.lr",
        "data.std",
        "data.mean",
        "data.scale_range",
        "eval.scales",
        "loss.ce.class_weights",
        "loss.aaf.init_weights",
        "loss.contrast.temperature",
    }
    assert expected <= keys
    assert len(keys) > 30


@pytest.mark.parametrize("key,length", FLOAT_FIELDS, ids=[k for k, _ in FLOAT_FIELDS])
def test_every_float_field_refuses_nan_and_inf(key, length):
    for bad in (".nan", ".inf", "-.inf"):
        value = bad if length is None else "[" + ", ".join([bad] + ["1.0"] * (length - 1)) + "]"
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value}"])
        msg = str(err.value)
        assert f"key '{key}" in msg and "finite" in msg, msg
        assert len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.aspp_rates=[0, 12, 24]", "model.aspp_rates"),
        ("data.std=[0.2, 0.0, 0.2]", "data.std"),
        ("eval.scales=[1.0, 0.0]", "eval.scales"),
        ("optim.lr=0", "optim.lr"),
        ("eval.pad_multiple=0", "eval.pad_multiple"),
        ("data.crop_size=[4, 64]", "data.crop_size"),
        ("train.seed=-1", "train.seed"),
        ("data.seed=-5", "data.seed"),
        ("output.name=", "output.name"),
        ("output.name=../elsewhere", "output.name"),
    ],
)
def test_out_of_range_values_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and len(msg.splitlines()) == 1, msg


def test_batch_of_one_with_a_global_pooling_batch_norm_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size = 1 .*global-pooling.*>= 2"):
        load_config(None, ["train.batch_size=1"])
    # with accumulation the micro-batch counts: 4 images in 4 micro-batches is one each
    with pytest.raises(ConfigError, match=r"train.batch_size = 4 with train.grad_accum = 4"):
        load_config(None, ["train.batch_size=4", "train.grad_accum=4"])
    # no 1x1 pooled map: accepted
    load_config(None, ["train.batch_size=1", "model.head=pspnet", "model.ppm_bins=[2, 3, 6]"])
    load_config(
        None, ["train.batch_size=1", "model.head=hrnetv2", "model.backbone.name=hrnetv2_w18_small"]
    )


def test_output_root_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"key 'output.root' = .*notes.txt.*not a folder"):
        load_config(None, [f"output.root={afile}"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("x")
    with pytest.raises(ConfigError, match=r"output.name.*not a folder"):
        load_config(None, [f"output.root={tmp_path / 'runs'}", "output.name=r/seed0"])
    load_config(None, [f"output.root={tmp_path / 'new'}", "output.name=r"])  # created later


@pytest.mark.parametrize(
    "override,key,size",
    [
        # 8 images x 3 x 1e6 x 1e6 float32
        ("data.crop_size=[1000000, 1000000]", "data.crop_size", 8 * 3 * 10**12 * 4),
        # one image padded to a multiple of 1e6: at least 3 x 1e6 x 1e6 float32
        ("eval.pad_multiple=1000000", "eval.pad_multiple", 3 * 10**12 * 4),
        # 8 x 1e7 channels x 16 x 16 (128x128 crop at stride 8) float32
        ("model.head_channels=10000000", "model.head_channels", 8 * 10**7 * 256 * 4),
    ],
)
def test_sizes_that_cannot_fit_are_refused_with_estimate_and_limit(override, key, size):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    assert f"key '{key}'" in msg and "demo.yaml" in msg
    assert format_bytes(size) in msg and format_bytes(memory_limit()) in msg


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(12 * 10**12) == "10.9 TiB"


def test_crop_larger_than_the_images_warns():
    cfg = load_config(None, ["data.image_size=[64, 64]", "data.crop_size=[256, 256]"])
    # largest scale 2.0: 128x128 at most, so a 256 crop is mostly padding
    msg = crop_warning(cfg.data, (64, 64))
    assert msg is not None and "[256, 256]" in msg and "128x128" in msg
    assert crop_warning(cfg.data, (128, 128)) is None  # 256x256 at scale 2
    cfg = load_config(None, ["data.crop_size=[96, 96]", "data.short_side=200"])
    assert crop_warning(cfg.data, (64, 32)) is None  # short side brought to 200 first


def test_crop_warning_is_logged_once_by_the_trainer(tiny_cfg, caplog):
    from contrastseg.engine.trainer import Trainer

    Trainer(tiny_cfg(), progress=False)  # 48x48 crops of 64x64 images: no warning
    assert "larger than the training images" not in caplog.text
    Trainer(tiny_cfg("data.crop_size=[160, 160]", "output.name=big"), progress=False)
    assert caplog.text.count("larger than the training images") == 1


# --- YAML files ---------------------------------------------------------------------------
def _bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\noutput: {name: *i}\n"


BAD_FILES = {
    "utf16": ("train: {iters: 5}\n".encode("utf-16"), "UTF-16"),
    # "output: {name: caf" is 18 bytes, so the first non-UTF-8 byte is at offset 18
    "latin1": ("output: {name: caf\xe9}\n".encode("latin-1"), "0xe9 at byte offset 18"),
    "binary": (bytes(range(256)) * 4, "byte offset 0"),
    "deep": (("train: {iters: " + "[" * 20000 + "]" * 20000 + "}\n").encode(), "nested"),
    "bomb": (_bomb().encode(), "aliases are expanded"),
    "huge": (b"# " + b"x" * MAX_BYTES + b"\n", "larger than"),
    "duplicate": (b"train: {iters: 5}\ntrain: {iters: 6}\n", "given twice"),
    "syntax": (b"train: [1, 2\n", "line 2"),
}


@pytest.mark.serial
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_yaml_files_are_one_line_errors(tmp_path, name):
    data, expected = BAD_FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 2
    msg = str(err.value)
    assert msg.startswith(str(path)) and expected in msg and len(msg.splitlines()) == 1, msg


def test_aliases_and_a_utf8_byte_order_mark_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    text = "data: {crop_size: &c [64, 64]}\neval: {crop_size: *c, stride: *c}\n"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    cfg = load_config(path)
    assert cfg.data.crop_size == cfg.eval.crop_size == cfg.eval.stride == (64, 64)


def _open_and_close(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("kind", ["fifo", "loop", "long name", "device", "dangling"])
def test_config_paths_that_are_no_regular_file_are_refused_at_once(tmp_path, kind):
    """A FIFO would block the read forever, /dev/zero never end; a symlink loop or an over-long
    name is an OSError of its own: each is one line naming the path, and so is a base: of that
    kind."""
    path = tmp_path / ("x" * 300 if kind == "long name" else "cfg.yaml")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(path, path)
    elif kind == "device":
        os.symlink("/dev/zero", path)
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere.yaml", path)
    based = tmp_path / "based.yaml"
    based.write_text(f"base: {path.name}\n")
    for config in (path, based):
        # were the FIFO opened for reading, this writer would end the wait (an empty read)
        unblock = threading.Timer(10, _open_and_close, [path])
        unblock.start()
        try:
            with pytest.raises(ConfigError) as err:
                load_config(config)
        finally:
            unblock.cancel()
        msg = str(err.value)
        assert msg.startswith(str(path.parent)) and path.name in msg, msg
        assert len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize("base", ["[a.yaml]", "5", "''", "{x: 1}"])
def test_a_base_that_is_no_file_name_is_refused_with_the_key(tmp_path, base):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=r"key 'base' = .*expected the name of a YAML file"):
        load_config(path)


def test_override_values_are_bounded_too():
    with pytest.raises(ConfigError, match=r"override 'train.iters=\[\[\[.*nested"):
        load_config(None, ["train.iters=" + "[" * 5000 + "]" * 5000])


# --- through the installed command ---------------------------------------------------------
CASES = {
    "nan": (["--set", "data.std=[.nan, .nan, .nan]"], "data.std"),
    "inf": (["--set", "optim.lr=.inf"], "optim.lr"),
    "scale": (["--set", "data.scale_range=[1.0, .inf]"], "data.scale_range"),
    "crop": (["--set", "data.crop_size=[1000000, 1000000]"], "data.crop_size"),
    "pad": (["--set", "eval.pad_multiple=1000000"], "eval.pad_multiple"),
    "head": (["--set", "model.head_channels=10000000"], "model.head_channels"),
    "batch": (["--set", "train.batch_size=1"], "train.batch_size"),
    "root": (["--set", "output.root=CONFIG"], "output.root"),
    "bomb": ("bomb", "bomb.yaml"),
    "deep": ("deep", "deep.yaml"),
    "utf16": ("utf16", "utf16.yaml"),
}


@pytest.mark.serial
@pytest.mark.parametrize("command", ["config show", "train", "eval"])
def test_cli_config_errors_are_one_line_status_2_within_2_s(tmp_path, command):
    demo = tmp_path / "demo.yaml"
    shutil.copy(DEMO, demo)
    for name, (how, culprit) in CASES.items():
        if isinstance(how, str):
            path = tmp_path / f"{how}.yaml"
            path.write_bytes(BAD_FILES[how][0])
            args = [str(path)]
        else:
            args = [str(demo), *(a.replace("CONFIG", str(demo)) for a in how)]
        argv = [CLI, *command.split(), *args]
        if command == "eval":
            argv += ["--checkpoint", str(tmp_path / "none.pt")]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        elapsed = time.perf_counter() - start
        err = done.stderr.strip()
        assert done.returncode == 2, (name, done.stdout, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err)
        assert culprit in err, (name, err)
        assert elapsed < 2, (name, elapsed)
