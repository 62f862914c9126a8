"""Image files from outside: a header that claims billions of pixels (a decompression bomb) is
refused before any pixel is decoded, and samples of 16 bits that PIL opens in an 8-bit mode are
refused, each with one line naming the file, in `data check`, `train`, `eval` and `predict`;
16-bit masks (label maps) keep working. The bombs are a few hundred bytes: a small valid PNG or
JPEG whose header fields were rewritten."""

import io
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from PIL import Image

from contrastseg.config import load_config
from contrastseg.data import (
    MAX_IMAGE_PIXELS,
    SYNTHETIC_CLASSES,
    ImageTooLarge,
    load_image,
    load_mask,
    pixel_limit,
)
from contrastseg.data.fileio import IMAGE_MODES
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import ConfigError, DataError
from tiny import TINY

CLI = str(Path(sys.executable).with_name("contrastseg"))
SIZE = (32, 32)  # (H, W) of the valid images and masks
LIMIT_TEXT = f"over the limit of {MAX_IMAGE_PIXELS:,} pixels"


# ------------------------------------------------------------------------------ bad files
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, mode: str = "RGB") -> bytes:
    """A valid 1x1 PNG whose IHDR says ``width`` x ``height`` (its CRC recomputed)."""
    buf = io.BytesIO()
    Image.new(mode, (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data: after signature, length, type
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 baseline JPEG whose SOF0 says ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = 2
    while data[i + 1] != 0xC0:  # walk the marker segments to the frame header
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def png16(channels: int, size: tuple[int, int] = SIZE) -> bytes:
    """A PNG of 16 bits per sample: 3 channels (48-bit RGB), 4 (RGBA) or 2 (grey + alpha)."""
    height, width = size
    color_type = {3: 2, 4: 6, 2: 4}[channels]
    rng = np.random.default_rng(channels)
    rows = [rng.integers(0, 2**16, width * channels).astype(">u2").tobytes() for _ in range(height)]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in rows)))
        + _chunk(b"IEND", b"")
    )


def tiff16_rgb(size: tuple[int, int] = SIZE) -> bytes:
    """An uncompressed little-endian TIFF, RGB with 16 bits per sample, one strip."""
    height, width = size
    pixels = np.random.default_rng(0).integers(0, 2**16, (height, width, 3)).astype("<u2")
    data = pixels.tobytes()
    tags = [  # (tag, type: 3 SHORT / 4 LONG, count, value or offset)
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 3, None),  # BitsPerSample 16, 16, 16: stored after the directory
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 8),
        (277, 3, 1, 3),
        (278, 3, 1, height),
        (279, 4, 1, len(data)),
        (284, 3, 1, 1),
    ]
    ifd = 8 + len(data)
    bits_at = ifd + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, count, bits_at)
        if value is None
        else struct.pack("<HHIHH", tag, kind, count, value, 0)
        if kind == 3
        else struct.pack("<HHII", tag, kind, count, value)
        for tag, kind, count, value in tags
    )
    return (
        b"II*\x00"
        + struct.pack("<I", ifd)
        + data
        + struct.pack("<H", len(tags))
        + entries
        + b"\x00\x00\x00\x00"
        + struct.pack("<3H", 16, 16, 16)
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------- data, config, model
def make_folder(root: Path, n: int = 4) -> Path:
    """A valid folder data set with the synthetic data set's classes (so that the tiny
    checkpoint evaluates on it): ``n`` RGB images s0..s{n-1} in train and val."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTHETIC_CLASSES))
    names = [f"s{i}" for i in range(n)]
    for name in names:
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        mask = rng.integers(0, len(SYNTHETIC_CLASSES), SIZE, dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def folder_args(root: Path, out: Path, model: bool = True) -> list[str]:
    """``--set`` arguments of a tiny run on the folder ``root``, writing under ``out`` (without
    the model's for ``eval``, which takes the checkpoint's)."""
    settings = [
        *[s for s in TINY if not s.startswith("data.") and (model or not s.startswith("model."))],
        "data.name=folder",
        f"data.root={root}",
        "data.crop_size=[32, 32]",
        "train.iters=1",
        "train.batch_size=4",
        "train.threads=1",
        "eval.batch_size=4",
        "eval.figure_images=0",
        f"output.root={out}",
        "output.name=run",
    ]
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint (the synthetic data set's classes)."""
    root = tmp_path_factory.mktemp("limits")
    cfg = load_config(None, [*TINY, "data.train_size=4", "data.val_size=2", f"output.root={root}"])
    return Trainer(cfg, progress=False).save_checkpoint()


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "folder"}}))
    return path


def one_error_line(err: str) -> str:
    """The single ``error:`` line of a command's stderr (no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def no_warnings_while(call):
    """Run ``call()`` and assert that it warned nothing (PIL's DecompressionBombWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    assert [str(w.message) for w in caught] == []


# ------------------------------------------------------------------------------ the reader
BOMBS = {
    "png 100000 x 100000": (lambda: png_claiming(100_000, 100_000), "100000 x 100000", 10**10),
    "png 65535 x 65535": (lambda: png_claiming(65_535, 65_535), "65535 x 65535", 65_535**2),
    # between PIL's warning (89.5 M) and its error (179 M): PIL alone would only warn
    "png 10000 x 10000": (lambda: png_claiming(10_000, 10_000), "10000 x 10000", 10**8),
    "jpeg 65000 x 65000": (lambda: jpeg_claiming(65_000, 65_000), "65000 x 65000", 65_000**2),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, case):
    make, claimed, pixels = BOMBS[case]
    path = write(tmp_path / ("bomb.jpg" if "jpeg" in case else "bomb.png"), make())
    assert path.stat().st_size < 1000
    before = PIL.Image.MAX_IMAGE_PIXELS

    def refuse():
        with pytest.raises(ImageTooLarge) as info:
            load_image(path)
        assert str(info.value).startswith(
            f"{path}: image header claims {claimed} = {pixels:,} pixels, {LIMIT_TEXT}; "
        )
        assert "--set data.max_image_pixels=N" in str(info.value)
        assert "--max-pixels N for predict" in str(info.value)

    no_warnings_while(refuse)
    assert before == PIL.Image.MAX_IMAGE_PIXELS  # PIL's own limit is left alone


def test_a_mask_claiming_too_many_pixels_is_refused(tmp_path):
    path = write(tmp_path / "mask.png", png_claiming(100_000, 100_000, "L"))
    with pytest.raises(ImageTooLarge, match=r"mask header claims 100000 x 100000 = 10,000,000,000"):
        no_warnings_while(lambda: load_mask(path, num_classes=3))


def test_the_limit_is_configurable_and_pils_own_limit_is_named(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32)).save(path)
    assert load_image(path, max_pixels=1024).shape == (32, 32, 3)
    with pytest.raises(ImageTooLarge, match=r"32 x 32 = 1,024 pixels, over the limit of 1,023 "):
        load_image(path, max_pixels=1023)
    # pixel_limit: how predict --max-pixels reaches the reader
    with pixel_limit(100), pytest.raises(ImageTooLarge, match="over the limit of 100 pixels"):
        load_image(path)
    assert load_image(path).shape == (32, 32, 3)  # the default again after the block

    # A limit above PIL's own hard limit does not lift it: the message says which one applied.
    bomb = write(tmp_path / "bomb.png", png_claiming(100_000, 100_000))
    with pytest.raises(ImageTooLarge) as info:
        load_image(bomb, max_pixels=10**11)
    assert "over PIL's own limit of 178,956,970 pixels" in str(info.value)
    assert "100000 x 100000 = 10,000,000,000 pixels" in str(info.value)

    assert load_config(None, ["data.max_image_pixels=1000"]).data.max_image_pixels == 1000
    with pytest.raises(ConfigError, match="data.max_image_pixels' = 0: Input should be greater"):
        load_config(None, ["data.max_image_pixels=0"])


SIXTEEN_BIT = {  # name -> (bytes, raw mode PIL reports)
    "48-bit RGB PNG": (lambda: png16(3), "RGB;16B"),
    "64-bit RGBA PNG": (lambda: png16(4), "RGBA;16B"),
    "32-bit grey + alpha PNG": (lambda: png16(2), "LA;16B"),
    "48-bit RGB TIFF": (tiff16_rgb, "RGB;16L"),
}


@pytest.mark.parametrize("case", list(SIXTEEN_BIT))
def test_16_bit_samples_that_pil_opens_as_8_bit_are_refused(tmp_path, case):
    make, rawmode = SIXTEEN_BIT[case]
    path = write(tmp_path / ("deep.tif" if "TIFF" in case else "deep.png"), make())
    with Image.open(path) as img:  # the trap: an 8-bit mode, whose decoding drops low bytes
        assert img.mode in IMAGE_MODES
    with pytest.raises(DataError) as info:
        load_image(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: image has 16 bits per channel (stored as {rawmode!r}")
    assert "save it as an 8-bit RGB or greyscale PNG/JPEG" in msg and "\n" not in msg
    with pytest.raises(DataError, match="mask has|has mode"):  # nor is it a mask
        load_mask(path)


def test_16_bit_masks_keep_working(tmp_path):
    path = tmp_path / "mask.png"
    ids = np.arange(32 * 32, dtype=np.uint16).reshape(SIZE) % 7
    Image.fromarray(ids).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    assert np.array_equal(load_mask(path, num_classes=7), ids)
    Image.fromarray(ids * 300).save(path)  # ids beyond the classes: refused as before
    with pytest.raises(DataError, match="label values \\[300, 600, 900"):
        load_mask(path, num_classes=7)


# ----------------------------------------------------------------------- through the CLI
def test_data_check_names_each_bad_file(tmp_path, config_file, run_cli, capsys):
    root = make_folder(tmp_path / "d")
    png_bomb = write(root / "images" / "s0.png", png_claiming(100_000, 100_000))
    (root / "images" / "s1.png").unlink()
    jpeg_bomb = write(root / "images" / "s1.jpg", jpeg_claiming(65_000, 65_000))
    deep = write(root / "images" / "s2.png", png16(3))
    mask_bomb = write(root / "masks" / "s3.png", png_claiming(100_000, 100_000, "L"))
    deep_mask = root / "masks" / "s2.png"
    Image.fromarray(np.full(SIZE, 2, np.uint16)).save(deep_mask)  # 16-bit ids: fine
    argv = ["data", "check", str(config_file), "--split", "train", *folder_args(root, tmp_path)]
    assert run_cli(*argv) == 2
    out = capsys.readouterr().out
    assert "4 samples checked, 4 problem(s)" in out
    assert f"  too large  {png_bomb}: image header claims 100000 x 100000 = " in out
    assert f"  too large  {jpeg_bomb}: image header claims 65000 x 65000 = " in out
    assert f"  too large  {mask_bomb}: label header claims 100000 x 100000 = " in out
    assert f"  channels   {deep}: image has 16 bits per channel (stored as 'RGB;16B'" in out
    assert str(deep_mask) not in out  # 16-bit ids are a valid label map

    # The limit of the config reaches data check: a lower one refuses the valid files too.
    make_folder(tmp_path / "ok")
    low = [*folder_args(tmp_path / "ok", tmp_path), "--set", "data.max_image_pixels=1000"]
    assert run_cli("data", "check", str(config_file), "--split", "train", *low) == 2
    assert "32 x 32 = 1,024 pixels, over the limit of 1,000 pixels" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["bomb", "16-bit"])
def test_train_stops_at_the_file_with_one_line(tmp_path, config_file, run_cli, capsys, bad):
    root = make_folder(tmp_path / "d")
    path = root / "images" / "s2.png"
    write(path, png_claiming(100_000, 100_000) if bad == "bomb" else png16(3))
    assert run_cli("train", str(config_file), *folder_args(root, tmp_path / "runs")) == 2
    line = one_error_line(capsys.readouterr().err)
    what = "header claims 100000 x 100000" if bad == "bomb" else "has 16 bits per channel"
    assert line.startswith(f"error: sample 's2' (index 2): {path}: image {what}")
    assert not list((tmp_path / "runs").rglob("*.pt"))  # no step, no checkpoint


def test_train_takes_the_limit_from_the_config(tmp_path, config_file, run_cli, capsys):
    root = make_folder(tmp_path / "d")
    argv = [*folder_args(root, tmp_path / "runs"), "--set", "data.max_image_pixels=1000"]
    assert run_cli("train", str(config_file), *argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "32 x 32 = 1,024 pixels, over the limit of 1,000 pixels" in line


@pytest.mark.parametrize("bad", ["bomb", "16-bit"])
def test_eval_stops_at_the_file_with_one_line(
    tmp_path, config_file, checkpoint, run_cli, capsys, bad
):
    root = make_folder(tmp_path / "d")
    path = root / "images" / "s1.png"
    write(path, png_claiming(100_000, 100_000) if bad == "bomb" else png16(4))
    out = tmp_path / "eval.json"
    argv = ["eval", str(config_file), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert run_cli(*argv, *folder_args(root, tmp_path, model=False)) == 2
    line = one_error_line(capsys.readouterr().err)
    what = "header claims 100000 x 100000" if bad == "bomb" else "has 16 bits per channel"
    assert line.startswith(f"error: sample 's1' (index 1): {path}: image {what}")
    assert not out.exists()


@pytest.fixture
def bad_images(tmp_path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    return [
        write(folder / "a_bomb.png", png_claiming(100_000, 100_000)),
        write(folder / "b_bomb.jpg", jpeg_claiming(65_000, 65_000)),
        write(folder / "c_deep.png", png16(3)),
    ]


def test_predict_refuses_each_bad_file_once_and_writes_nothing(
    tmp_path, checkpoint, bad_images, run_cli, capsys, caplog
):
    out = tmp_path / "out"
    argv = ["predict", str(bad_images[0].parent), "--checkpoint", str(checkpoint)]
    with caplog.at_level(logging.WARNING, logger="contrastseg"):
        assert run_cli(*argv, "--out", str(out)) == 2
    printed = capsys.readouterr()
    line = one_error_line(printed.err)
    assert line == (
        f"error: predict: none of the 3 input(s) could be predicted (each is named in a warning "
        f"above); nothing was written to {out}"
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3  # one per file
    assert warned[0].startswith(f"skipped {bad_images[0]}: image header claims 100000 x 100000")
    assert warned[1].startswith(f"skipped {bad_images[1]}: image header claims 65000 x 65000")
    assert warned[2].startswith(f"skipped {bad_images[2]}: image has 16 bits per channel")
    assert not out.exists()  # not even an empty folder

    # --strict: the first one stops the run, named with its claimed size.
    assert run_cli(*argv, "--out", str(out), "--strict") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(
        f"error: {bad_images[0]}: image header claims 100000 x 100000 = 10,000,000,000 pixels"
    )
    assert not out.exists()


def test_predict_max_pixels(tmp_path, checkpoint, run_cli, capsys, caplog):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    argv = ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    with caplog.at_level(logging.WARNING, logger="contrastseg"):
        assert run_cli(*argv, "--max-pixels", "1000") == 2
    assert "none of the 1 input(s)" in one_error_line(capsys.readouterr().err)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"skipped {image}: image header claims 40 x 30 = 1,200 pixels, over the limit of 1,000 "
        "pixels; if the file is genuine, raise the limit (--set data.max_image_pixels=N for "
        "train, eval and data check; --max-pixels N for predict)"
    ]
    assert run_cli(*argv, "--max-pixels", "1200") == 0
    assert (tmp_path / "o" / "photo_mask.png").is_file()
    assert run_cli(*argv, "--max-pixels", "0") == 2  # not a limit
    assert "--max-pixels" in one_error_line(capsys.readouterr().err)


def test_console_script_predict_on_a_bomb(tmp_path, checkpoint):
    """The installed command: one warning naming the file, one error line, exit status 2, no
    traceback, no output folder."""
    bomb = write(tmp_path / "bomb.png", png_claiming(100_000, 100_000))
    out = tmp_path / "out"
    env = {**os.environ, "CONTRASTSEG_TRACEBACK": "0"}
    run = subprocess.run(
        [CLI, "predict", str(bomb), "--checkpoint", str(checkpoint), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2, run.stderr
    assert one_error_line(run.stderr).startswith("error: predict: none of the 1 input(s)")
    warned = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert warned == [
        f"WARNING contrastseg: skipped {bomb}: image header claims 100000 x 100000 = "
        f"10,000,000,000 pixels, {LIMIT_TEXT}; if the file is genuine, raise the limit "
        "(--set data.max_image_pixels=N for train, eval and data check; --max-pixels N for "
        "predict)"
    ]
    assert "DecompressionBomb" not in run.stderr
    assert not out.exists()
