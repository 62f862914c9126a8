"""Prediction that keeps going: every output is written atomically, an unreadable input is
skipped with a one-line warning and counted in the summary (then one error line, exit status
2), `--strict` stops at the first one, and `--skip-existing` does not redo finished outputs.
PyTorch and ONNX paths."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from contrastseg import predict, predict_onnx
from contrastseg.config import load_config
from contrastseg.engine.inference import prediction_paths
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import DataError
from contrastseg.export import sidecar_path
from tiny import TINY

GOOD = ("a.png", "c.jpg")
OUTPUTS = ("_labels.png", "_overlay.png", "_mask.png")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained checkpoint of the tiny model, and a hand-built ONNX model (a 1x1
    convolution to 3 classes) with its sidecar, as `contrastseg export` writes them."""
    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(None, [*TINY, "data.train_size=4", "data.val_size=2", f"output.root={root}"])
    path = Trainer(cfg, progress=False).save_checkpoint()
    weight = np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx_path = root / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), onnx_path)
    sidecar = {
        "format": "onnx",
        "input": {"name": "image", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "output": {"name": "logits"},
        "class_names": ["a", "b", "c"],
        "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
    }
    sidecar_path(onnx_path).write_text(json.dumps(sidecar))
    return {"checkpoint": path, "onnx": onnx_path}


def run_api(models, kind, images, out, **kw):
    if kind == "checkpoint":
        return predict(models["checkpoint"], images, out, **kw)
    return predict_onnx(models["onnx"], images, out, **kw)


def cli_args(models, kind, images, out, *flags):
    return ["predict", *map(str, images), f"--{kind}", str(models[kind]), "--out", str(out), *flags]


@pytest.fixture
def folder(tmp_path):
    """a.png and c.jpg are fine; b.png is not an image at all."""
    d = tmp_path / "imgs"
    d.mkdir()
    gen = np.random.default_rng(0)
    Image.fromarray(gen.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / "a.png")
    (d / "b.png").write_bytes(b"this is no PNG")
    Image.fromarray(gen.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(d / "c.jpg")
    return d


def output_names(out):
    return sorted(p.name for p in out.iterdir())


def expected(*stems):
    return sorted(stem + suffix for stem in stems for suffix in OUTPUTS)


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_unreadable_input_is_skipped_with_a_warning_and_a_summary(
    models, folder, tmp_path, kind, caplog
):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="contrastseg"):
        result = run_api(models, kind, [folder], out)
    assert [p.name for p in result] == ["a_mask.png", "c_mask.png"]
    assert [s.path.name for s in result.skipped] == ["b.png"] and not result.ok
    assert "cannot read the image" in result.skipped[0].reason
    assert output_names(out) == expected("a", "c")  # no temporary or partial file
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"skipped {folder / 'b.png'}: cannot read the image")
    # The warning names the file once; the summary counts it without naming it again.
    assert result.summary() == (
        f"done: 2 of 3 images (2 written to {out}, 0 already there); skipped 1 (each named in a "
        "warning above)"
    )


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_cli_summary_exit_status_strict_and_skip_existing(
    models, folder, tmp_path, kind, run_cli, capsys, caplog
):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="contrastseg"):
        assert run_cli(*cli_args(models, kind, [folder], out)) == 2
    captured = capsys.readouterr()
    printed = captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: predict: 1 input(s) could not be predicted (each is named in a warning "
        f"above); the other 2 are in {out}"
    ]
    assert f"done: 2 of 3 images (2 written to {out}, 0 already there); skipped 1 (" in printed
    assert "b.png" not in printed  # named once, in the warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"skipped {folder / 'b.png'}: cannot read the image")
    assert output_names(out) == expected("a", "c")

    # --skip-existing: the finished outputs are kept as they are, the broken file is met again.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "c_mask.png").unlink()  # as if the first run had died before c's mask
    assert run_cli(*cli_args(models, kind, [folder], out, "--skip-existing")) == 2
    printed = capsys.readouterr().out
    assert f"done: 2 of 3 images (1 written to {out}, 1 already there); skipped 1 (" in printed
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert output_names(out) == expected("a", "c")
    assert all(after[f"a{s}"] == before[f"a{s}"] for s in OUTPUTS)  # not rewritten
    assert after["c_labels.png"] != before["c_labels.png"]  # c was not finished: redone

    # --strict: the first unreadable input stops the run (status 2) with its path.
    strict_out = tmp_path / "strict"
    assert run_cli(*cli_args(models, kind, [folder], strict_out, "--strict")) == 2
    err = capsys.readouterr().err
    assert f"error: {folder / 'b.png'}: cannot read the image" in err
    assert output_names(strict_out) == expected("a")  # a came before b; c never reached

    # All readable: status 0.
    (folder / "b.png").unlink()
    assert run_cli(*cli_args(models, kind, [folder], tmp_path / "ok")) == 0
    assert "done: 2 of 2 images" in capsys.readouterr().out


def test_missing_inputs_and_clashing_names_are_skipped_or_stop_with_strict(
    models, folder, tmp_path
):
    (folder / "b.png").unlink()
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.new("RGB", (20, 20)).save(twin / "a.jpg")  # same stem as imgs/a.png
    missing = tmp_path / "nope.png"
    result = predict(models["checkpoint"], [folder, missing, twin], tmp_path / "out")
    assert [p.name for p in result] == ["a_mask.png", "c_mask.png"]
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons[missing] == "no such file or folder"
    assert reasons[twin / "a.jpg"].startswith(
        f"its outputs a_*.png would overwrite those of {folder / 'a.png'}"
    )
    with pytest.raises(DataError, match="nope.png: no such file or folder"):
        predict(models["checkpoint"], [folder, missing], tmp_path / "s", strict=True)
    with pytest.raises(DataError, match="a.jpg: its outputs a_"):
        predict(models["checkpoint"], [folder, twin], tmp_path / "s", strict=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        predict(models["checkpoint"], [empty], tmp_path / "s")


def test_a_failed_write_leaves_no_partial_file(models, folder, tmp_path, monkeypatch):
    """The disk fills up while c's overlay is written: the error stops the run (it is no
    input problem), c's overlay is absent rather than torn, and no temporary file is left;
    a rerun with --skip-existing finishes only what is missing."""
    (folder / "b.png").unlink()
    out = tmp_path / "out"
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if ".c_overlay.png." in str(fp):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="No space left"):
        predict(models["checkpoint"], [folder], out)
    monkeypatch.undo()
    assert output_names(out) == sorted([*expected("a"), "c_labels.png"])
    result = predict(models["checkpoint"], [folder], out, skip_existing=True)
    assert [p.name for p in result.existing] == ["a.png"] and [p.name for p in result] == [
        "c_mask.png"
    ]
    assert output_names(out) == expected("a", "c")
    assert prediction_paths("c", out)[-1].name == "c_mask.png"
    Image.open(out / "c_overlay.png").load()  # whole


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_nothing_predicted_exits_2_and_leaves_no_output_folder(
    models, tmp_path, kind, run_cli, capsys, caplog
):
    """Every input unreadable: one warning per file, one error line with the count, exit status
    2, and the --out folder, which did not exist, is not created (not even empty)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x.png", "y.jpg"):
        (bad / name).write_bytes(b"no image")
    out = tmp_path / "deep" / "out"
    with caplog.at_level(logging.WARNING, logger="contrastseg"):
        assert run_cli(*cli_args(models, kind, [bad, tmp_path / "gone.png"], out)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: predict: none of the 3 input(s) could be predicted (each is named in a warning "
        f"above); nothing was written to {out}"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == [
        f"skipped {tmp_path / 'gone.png'}",
        f"skipped {bad / 'x.png'}",
        f"skipped {bad / 'y.jpg'}",
    ]
    assert not (tmp_path / "deep").exists()
    assert run_cli(*cli_args(models, kind, [bad], out, "--strict")) == 2
    assert not (tmp_path / "deep").exists()
