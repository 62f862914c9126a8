"""`predict --onnx` reads a model and its JSON sidecar from outside: each missing or malformed
field of the sidecar, and a model onnxruntime cannot load, is one line naming the file and the
field, status 2, before any output is written."""

import json

import pytest
import torch
from PIL import Image


def _sidecar() -> dict:
    """A sidecar as `contrastseg export` writes it (the fields `predict --onnx` reads)."""
    return {
        "sidecar_version": 1,
        "format": "onnx",
        "input": {"name": "image", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "output": {"name": "logits"},
        "class_names": ["background", "cat", "dog"],
        "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]],
    }


def _drop(key):
    return lambda s: s.__delitem__(key)


def _set(path, value):
    def change(s):
        *parents, last = path
        for p in parents:
            s = s[p]
        s[last] = value

    return change


CASES = {
    "no palette": (_drop("palette"), "lacks the fields ['palette']"),
    "format a number": (_set(["format"], 7), "not ONNX"),
    "input a string": (_set(["input"], "image"), "'input'"),
    "input name missing": (lambda s: s["input"].__delitem__("name"), "input.name"),
    "output name a number": (_set(["output", "name"], 3), "output.name"),
    "mean of two": (_set(["input", "mean"], [0.5, 0.5]), "input.mean"),
    "mean NaN": (_set(["input", "mean"], [0.5, float("nan"), 0.5]), "input.mean"),
    "std zero": (_set(["input", "std"], [0.2, 0.0, 0.2]), "input.std"),
    "std strings": (_set(["input", "std"], ["a", "b", "c"]), "input.std"),
    "class_names a string": (_set(["class_names"], "cat"), "'class_names'"),
    "class_names empty": (_set(["class_names"], []), "'class_names' lists 0"),
    "class_names of numbers": (_set(["class_names"], [1, 2, 3]), "class_names[0]"),
    "palette short": (_set(["palette"], [[0, 0, 0]]), "1 colours for 3 classes"),
    "palette out of range": (_set(["palette", 1], [300, 0, 0]), "palette[1]"),
    "palette a dict": (_set(["palette"], {"a": 1}), "'palette' is a dict"),
}


@pytest.fixture
def model(tmp_path):
    """A model file (not valid ONNX: the sidecar is checked before it is loaded), one image."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07not a protobuf")
    Image.new("RGB", (16, 12), (10, 20, 30)).save(tmp_path / "a.png")
    return path


def _run(run_cli, capsys, model, out) -> str:
    argv = ("predict", str(model.parent / "a.png"), "--onnx", str(model), "--out", str(out))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_sidecar_is_one_line_naming_the_field(model, run_cli, capsys, case):
    change, needle = CASES[case]
    info = _sidecar()
    change(info)  # in place
    (model.parent / "model.onnx.json").write_text(json.dumps(info))
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "model.onnx.json" in line and needle in line, line


@pytest.mark.parametrize("text", ['[{"format": "onnx"}]', "3", '"onnx"'])
def test_a_sidecar_of_another_json_type_is_refused(model, run_cli, capsys, text):
    (model.parent / "model.onnx.json").write_text(text)
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "model.onnx.json: the sidecar is a JSON" in line and "not an object" in line, line


@pytest.mark.parametrize(
    "text", ["", "{", "\xff\xfe", "[1, 2", '{"format": "onnx"', "[" * 200_000 + "]" * 200_000]
)
def test_a_sidecar_that_is_not_json_is_refused(model, run_cli, capsys, text):
    (model.parent / "model.onnx.json").write_bytes(text.encode("latin-1"))
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "model.onnx.json: cannot read the sidecar JSON" in line, line


def test_a_huge_sidecar_is_refused_unread(model, run_cli, capsys):
    (model.parent / "model.onnx.json").write_text(" " * (1 << 20) + "{}")
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "more than a sidecar's" in line, line


def test_a_model_onnxruntime_cannot_load_is_refused(model, run_cli, capsys):
    (model.parent / "model.onnx.json").write_text(json.dumps(_sidecar()))
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "model.onnx: onnxruntime cannot load it" in line, line


class _Broken(torch.nn.Module):
    """A model whose logits are at half the image's size, of another class count, or NaN."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x):
        logits = x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
        if self.how == "half":
            return logits[:, :, ::2, ::2]
        if self.how == "one class":
            return logits[:, :1]
        return logits * float("nan")


@pytest.mark.parametrize(
    "how, needle",
    [
        ("half", "gave logits of shape (1, 3, 6, 8) for an image of 16 x 12"),
        ("one class", "gave logits of shape (1, 1, 12, 16)"),
        ("nan", "non-finite (NaN or infinite) logits"),
    ],
)
def test_a_model_whose_logits_do_not_fit_is_refused(model, run_cli, capsys, how, needle):
    """A model that loads but gives logits of the wrong size or class count, or NaN: one line,
    no masks (the broadcast error, or the argmax of NaN, never reaches the writer)."""
    torch.onnx.export(
        _Broken(how),
        (torch.zeros(1, 3, 12, 16),),
        str(model),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {2: "h", 3: "w"}, "logits": {2: "h", 3: "w"}},
        dynamo=False,
    )
    (model.parent / "model.onnx.json").write_text(json.dumps(_sidecar()))
    line = _run(run_cli, capsys, model, model.parent / "out")
    assert "model.onnx: " in line and needle in line, line
