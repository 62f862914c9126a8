"""`contrastseg export --format torch-export`: a torch.export program (.pt2) with dynamic batch,
height and width, for every decode head of the zoo (and the prototype classifier on one),
written through the exporter's own writer, loaded back and compared with PyTorch at three sizes;
the command line on a trained checkpoint (in-process and through the installed console script);
and the one-line refusals (a model the exporter cannot take, --opset, a program that refuses a
check input, a broken file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import contrastseg
from contrastseg import cli
from contrastseg import export as export_module
from contrastseg.config import ModelConfig
from contrastseg.engine.inference import load_trained_model
from contrastseg.errors import ConfigError, ContrastSegError
from contrastseg.export import MIN_SIDE, VERIFY_SHAPES, load_exported_program, write_model
from contrastseg.models import InferenceModel, build_model
from test_model_zoo import _few_threads  # noqa: F401  (autouse fixture: one thread)
from tiny import train_tiny_checkpoint

NUM_CLASSES = 5
TOLERANCE = 1e-3  # the export check's default (export_checkpoint(tolerance=...))
PROTOTYPE = {"classifier": "prototype", "prototype": {"num_prototypes": 3}}

# (test id, backbone, head, extra ModelConfig fields, smallest side of the program): small
# stand-ins of each head of the zoo. ConvNeXt (UPerNet's backbone in the zoo) downsamples by
# unpadded stride-2 convolutions, so its stride-32 map is one pixel below 64: the exporter asks
# for 64 and up, and the writer takes its suggested fix.
HEADS = [
    ("deeplabv3", "timm:mobilenetv3_small_050", "deeplabv3", {}, MIN_SIDE),
    ("hrnetv2", "hrnetv2_w18_small", "hrnetv2", {}, MIN_SIDE),
    ("ocr", {"name": "hrnetv2_w18_small", "variant": "released"}, "ocr", {}, MIN_SIDE),
    ("pspnet", "timm:mobilenetv3_small_050", "pspnet", {}, MIN_SIDE),
    ("deeplabv3plus", "timm:mobilenetv3_small_050", "deeplabv3plus", {}, MIN_SIDE),
    ("upernet", "timm:convnext_atto", "upernet", {}, 64),
    ("deeplabv3-prototype", "timm:mobilenetv3_small_050", "deeplabv3", PROTOTYPE, MIN_SIDE),
]


def sizes_from(side: int) -> list[tuple[int, int, int, int]]:
    """Three sizes besides the export's example input (2x3x64x96), each with another batch: the
    smallest side the program takes with an odd width, a square, and odd sides."""
    return [(1, 3, side, side + 14), (3, 3, max(side, 64), max(side, 64)), (2, 3, 97, 131)]


def tiny_net(backbone, head: str, extra: dict) -> InferenceModel:
    backbone = backbone if isinstance(backbone, dict) else {"name": backbone}
    fields = {"head_channels": 16, "aux_channels": 8, "ocr_mid_channels": 16}
    cfg = ModelConfig.model_validate(
        {"backbone": backbone, "head": head, **fields, "ocr_key_channels": 8, **extra}
    )
    torch.manual_seed(0)
    segmentor = build_model(cfg, NUM_CLASSES, backbone_weights=False)
    # batch norm statistics away from (0, 1), so that folding or dropping them would show
    gen = torch.Generator().manual_seed(1)
    for m in segmentor.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(1 + 0.5 * torch.rand(m.num_features, generator=gen))
    return InferenceModel(segmentor).eval()


def diffs_at(run, net: nn.Module, sizes) -> list[float]:
    gen = torch.Generator().manual_seed(2)
    diffs = []
    for shape in sizes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref = net(x)
            got = run(x)
        assert got.shape == (shape[0], NUM_CLASSES, *shape[2:])
        assert ref.abs().max() > 0.01  # the comparison is not between two near-zero maps
        diffs.append(float((got - ref).abs().max()))
    return diffs


@pytest.mark.parametrize(
    ("backbone", "head", "extra", "side"), [h[1:] for h in HEADS], ids=[h[0] for h in HEADS]
)
def test_every_head_round_trips_through_a_pt2_program(
    tmp_path, monkeypatch, backbone, head, extra, side
):
    net = tiny_net(backbone, head, extra)
    out = tmp_path / "model.pt2"
    # the program the writer's check loads from the file it renames to `out` (loading a .pt2
    # takes seconds; the test compares that same loaded program at its own sizes)
    loaded = []

    def spy(path):
        loaded.append((Path(path), load_exported_program(path)))
        return loaded[-1][1]

    monkeypatch.setattr(export_module, "load_exported_program", spy)
    written = write_model(net, out, "torch-export", model=head)
    assert written.max_abs_diff is not None and written.max_abs_diff <= TOLERANCE
    sizes = written.sizes
    assert sizes["batch"] == {"min": 1, "max": None, "step": 1}
    assert sizes["height"] == sizes["width"] == {"min": side, "max": None, "step": 1}
    assert written.shapes == VERIFY_SHAPES  # every check shape lies in the accepted sizes
    assert all("batch" in c or "height" in c or "width" in c for c in sizes["runtime_checks"])
    assert out.stat().st_size > sum(t.numel() * 4 for t in net.state_dict().values()) // 2

    ((path, program),) = loaded
    assert path.parent == tmp_path and path.name.startswith(".model.pt2.")  # renamed to out
    diffs = diffs_at(program, net, sizes_from(side))
    print(f"{head} on {backbone} {extra}: max abs diff per size {diffs}")
    assert max(diffs) <= TOLERANCE
    # the range the sidecar states: a side one below the smallest is refused by the program
    with pytest.raises(Exception, match=f">= {side}"), torch.no_grad():
        program(torch.randn(1, 3, side - 1, 64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration DeepLabV3 checkpoint (tests/tiny.py), its PyTorch inference model."""
    root = tmp_path_factory.mktemp("torch_export")
    _, path = train_tiny_checkpoint(root)
    segmentor, _, state = load_trained_model(path)
    return SimpleNamespace(
        root=root, checkpoint=path, state=state, net=InferenceModel(segmentor).eval()
    )


def check_written(trained, model: Path) -> dict:
    """The .pt2 file and its sidecar as `contrastseg export --format torch-export` writes them;
    the program's logits against the checkpoint's PyTorch model. Returns the sidecar."""
    info = json.loads(model.with_name(model.name + ".json").read_text())
    assert info["format"] == "torch-export" and info["file"] == model.name
    assert info["opset"] is None
    assert info["input"]["name"] == "x" and info["output"]["name"] is None
    assert info["class_names"] == trained.state["class_names"]
    assert info["num_classes"] == len(trained.state["class_names"])
    assert info["accepted_sizes"]["height"] == {"min": MIN_SIDE, "max": None, "step": 1}
    assert info["accepted_sizes"]["batch"] == {"min": 1, "max": None, "step": 1}
    assert info["verification"]["input_shapes"] == [list(s) for s in VERIFY_SHAPES]
    assert 0 <= info["verification"]["max_abs_diff"] <= info["verification"]["tolerance"]
    program = load_exported_program(model)
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 45, 61), (2, 3, 64, 64)]:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref, got = trained.net(x), program(x)
        assert got.shape == (shape[0], info["num_classes"], *shape[2:])
        assert float((got - ref).abs().max()) <= TOLERANCE
    return info


def test_cli_writes_a_pt2_program_equal_to_the_checkpoint(trained):
    out = trained.root / "cli" / "X.pt2"
    done = CliRunner().invoke(
        cli.app,
        ["export", str(trained.checkpoint), "--format", "torch-export", "--out", str(out)],
    )
    assert done.exit_code == 0, done.output
    assert f"wrote {out} and X.pt2.json" in done.output
    check_written(trained, out)
    assert export_module.default_output(trained.checkpoint, "torch-export").name == (
        trained.checkpoint.stem + ".pt2"
    )


def test_console_script_writes_a_pt2_program(trained):
    script = Path(sys.executable).with_name("contrastseg")
    out = trained.root / "script" / "Y.pt2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(script), "export", str(trained.checkpoint), "--format", "torch-export"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} and Y.pt2.json")
    check_written(trained, out)


def test_exporter_failure_is_one_line_naming_the_model(
    trained, tmp_path, run_cli, capsys, monkeypatch
):
    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamic slicing with a data-dependent size\n  Explanation: ...")

    monkeypatch.setattr(torch.export, "export", refuse)
    out = tmp_path / "out" / "m.pt2"
    code = run_cli("export", str(trained.checkpoint), "--format", "torch-export", "--out", str(out))
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "torch.export cannot export model.head 'deeplabv3' on model.backbone.name " in err
    assert "'timm:mobilenetv3_small_050'" in err
    assert "(RuntimeError: Dynamic slicing with a data-dependent size)" in err
    assert "try --format onnx or --format torchscript" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    # the writer itself, with the exporter's multi-line "Constraints violated" error
    def violated(*args, **kwargs):
        raise torch._dynamo.exc.UserError(
            torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
            "Constraints violated (width)! For more information, run with TORCH_LOGS=...\n"
            "  - Not all values of width satisfy the generated guard Eq(Mod(width, 7), 0).",
        )

    monkeypatch.setattr(torch.export, "export", violated)
    with pytest.raises(ContrastSegError) as caught:
        write_model(nn.Conv2d(3, 2, 1).eval(), tmp_path / "c.pt2", "torch-export", model="conv")
    message = str(caught.value)
    assert "\n" not in message and "torch.export cannot export conv" in message
    assert "Not all values of width satisfy the generated guard Eq(Mod(width, 7), 0)" in message
    assert list(tmp_path.glob("*.pt2")) == list(tmp_path.glob(".c.pt2.*")) == []


def test_opset_and_unknown_formats_are_refused(trained, tmp_path, run_cli, capsys):
    out = tmp_path / "m.pt2"
    code = run_cli(
        "export", str(trained.checkpoint), "--format", "torch-export", "--opset", "18",
        "--out", str(out),
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "opset 18: an opset applies to --format onnx only, not 'torch-export'" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=r"\['hub', 'onnx', 'torch-export', 'torchscript'\]"):
        export_module.check_options("pt2", None)


def test_a_program_that_refuses_a_check_input_writes_nothing(tmp_path, monkeypatch):
    """A program's own run-time refusal (here a check shape below its smallest side, as if the
    shapes were not fitted into its accepted sizes) is one line, and nothing is written."""
    monkeypatch.setattr(export_module, "VERIFY_SHAPES", ((1, 3, 64, 64), (1, 3, 20, 24)))
    monkeypatch.setattr(export_module, "_fit_shape", lambda shape, sizes: shape)
    with pytest.raises(ContrastSegError, match=r"refused an input of shape \[1, 3, 20, 24\]"):
        write_model(nn.Conv2d(3, 2, 1).eval(), tmp_path / "c.pt2", "torch-export")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_pt2_file_is_one_line(tmp_path):
    assert contrastseg.load_exported_program is load_exported_program  # the public name
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(ContrastSegError) as caught:
        load_exported_program(bad)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{bad}: torch.export.load cannot read it (")


class FixedSize(nn.Module):
    """Takes one height and width only: the exporter's fix makes them constants."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] + torch.ones(64, 96)


def test_a_program_with_a_fixed_side_is_refused(tmp_path):
    with pytest.raises(ContrastSegError) as caught:
        write_model(FixedSize(), tmp_path / "f.pt2", "torch-export", model="fixed")
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot export fixed with a free height and width" in message
    assert "fixed them to [64, 96]" in message
    assert list(tmp_path.iterdir()) == []


def test_accepted_sizes_read_steps_and_fit_the_check_shapes():
    conv = nn.Conv2d(3, 2, 1).eval()
    n = torch.export.Dim("n", min=2, max=40)
    spec = ({0: torch.export.Dim("batch", min=1, max=8), 2: 32 * n, 3: 32 * n + 1},)
    program = torch.export.export(conv, (torch.randn(2, 3, 64, 65),), dynamic_shapes=spec)
    sizes = export_module._accepted_sizes(program)
    assert sizes["batch"] == {"min": 1, "max": 8, "step": 1}
    assert sizes["height"] == {"min": 64, "max": 1280, "step": 32}
    assert sizes["width"] == {"min": 65, "max": 1281, "step": 32}
    fit = export_module._fit_shape
    assert fit((1, 3, 97, 131), sizes) == (1, 3, 128, 161)
    assert fit((3, 3, 64, 64), sizes) == (3, 3, 64, 65)
    assert fit((9, 3, 5000, 20), sizes) == (8, 3, 1280, 65)
