"""ONNX and TorchScript export: parity with PyTorch at two sizes, no training-only heads in the
graph, the sidecar, `predict --onnx`, and the errors for bad options."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from contrastseg import cli, export_checkpoint, predict
from contrastseg import export as export_module
from contrastseg.engine.inference import load_trained_model
from contrastseg.errors import CheckpointError, ConfigError, ContrastSegError
from contrastseg.models.segmentor import InferenceModel
from tiny import train_tiny_checkpoint

SIZES = [(1, 3, 64, 64), (2, 3, 48, 80)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration checkpoint trained with pixel contrast (so it holds projection weights),
    exported to TorchScript."""
    root = tmp_path_factory.mktemp("export")
    _, path = train_tiny_checkpoint(root, "loss.contrast.enabled=true")
    ts = export_checkpoint(path, format="torchscript")
    segmentor, _, state = load_trained_model(path)
    return SimpleNamespace(
        root=root,
        checkpoint=path,
        state=state,
        net=InferenceModel(segmentor).eval(),
        segmentor=segmentor,
        torchscript=ts.model,
    )


@pytest.fixture(scope="module")
def exported(trained):
    """The same checkpoint exported to ONNX too, through the command line."""
    onnx_path = trained.root / "model.onnx"
    done = CliRunner().invoke(
        cli.app, ["export", str(trained.checkpoint), "--format", "onnx", "--out", str(onnx_path)]
    )
    assert done.exit_code == 0, done.output
    return SimpleNamespace(**vars(trained), onnx=onnx_path)


def max_diffs(exported, run):
    gen = torch.Generator().manual_seed(1)
    diffs = []
    for shape in SIZES:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref = exported.net(x)
            assert torch.equal(ref, exported.segmentor.predict_logits(x))
        got = run(x)
        assert got.shape == (shape[0], len(exported.state["class_names"]), *shape[2:])
        diffs.append(float(np.abs(got - ref.numpy()).max()))
    return diffs


def test_onnx_matches_pytorch_at_two_sizes(exported):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(exported.onnx), options, providers=["CPUExecutionProvider"])
    diffs = max_diffs(exported, lambda x: session.run(["logits"], {"image": x.numpy()})[0])
    print("onnx max abs diff per size:", diffs)
    assert max(diffs) < 1e-4
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1] == 3
    assert all(isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3]))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_at_two_sizes(trained):
    module = torch.jit.load(str(trained.torchscript))
    diffs = max_diffs(trained, lambda x: module(x).detach().numpy())
    print("torchscript max abs diff per size:", diffs)
    assert max(diffs) < 1e-4
    # exactly the inference model's tensors: no projection or auxiliary head
    assert set(module.state_dict()) == set(trained.net.state_dict())


def expected_onnx_elements(net: nn.Module) -> tuple[int, int]:
    """Elements of the inference model's tensors as an ONNX graph holds them: with every batch
    norm folded into the convolution before it (its C-element bias instead of its four
    C-element tensors), or unfolded (all but the unused num_batches_tracked)."""
    total = sum(t.numel() for k, t in net.state_dict().items() if "num_batches_tracked" not in k)
    bn = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    folded = total - sum(3 * m.num_features for m in bn)
    return folded, total


def test_onnx_graph_holds_only_the_inference_weights(exported):
    model_keys = exported.state["model"]
    assert any(k.startswith("contrast.projection.") for k in exported.state["loss"])  # contrast on
    assert any(k.startswith("aux.") for k in model_keys)  # DeepLabV3's FCN head
    graph = onnx.load(str(exported.onnx)).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    assert not [n for n in sizes if "projection" in n or n.startswith("aux")]
    state = exported.net.state_dict()
    weights = {n: s for n, s in sizes.items() if n in state or n.removesuffix("_bias") in state}
    # anything else is a shape constant, not a weight
    assert all(s <= 4 for n, s in sizes.items() if n not in weights), sizes
    assert sum(weights.values()) in expected_onnx_elements(exported.net)


def test_sidecar_describes_the_model(exported):
    info = json.loads((exported.root / "model.onnx.json").read_text())
    state = exported.state
    assert info["format"] == "onnx" and info["file"] == "model.onnx" and info["opset"] == 18
    assert info["class_names"] == state["class_names"]
    assert info["palette"] == [list(c) for c in state["palette"]]
    assert info["num_classes"] == len(state["class_names"])
    assert info["input"]["name"] == "image" and info["output"]["name"] == "logits"
    assert info["input"]["shape"] == ["batch", 3, "height", "width"]
    assert info["input"]["mean"] == [0.485, 0.456, 0.406]
    assert info["input"]["std"] == [0.229, 0.224, 0.225]
    assert info["verification"]["max_abs_diff"] < 1e-4
    ts_info = json.loads(
        exported.torchscript.with_name(exported.torchscript.name + ".json").read_text()
    )
    assert ts_info["format"] == "torchscript" and ts_info["opset"] is None


def test_predict_onnx_writes_the_pytorch_masks(exported, tmp_path, run_cli):
    images = tmp_path / "imgs"
    images.mkdir()
    gen = np.random.default_rng(0)
    Image.fromarray(gen.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(gen.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(images / "b.jpg")
    predict(exported.checkpoint, [images], tmp_path / "torch")
    code = run_cli(
        "predict",
        str(images),
        "--onnx",
        str(exported.onnx),
        "--out",
        str(tmp_path / "ort"),
    )
    assert code == 0
    for name in ("a_labels.png", "a_mask.png", "a_overlay.png", "b_labels.png", "b_mask.png"):
        ref = np.asarray(Image.open(tmp_path / "torch" / name))
        got = np.asarray(Image.open(tmp_path / "ort" / name))
        # onnxruntime and PyTorch agree on the logits to rounding (the test above); a pixel whose
        # best two classes tie within it may take either class on another kernel
        assert got.shape == ref.shape, name
        differs = (got != ref).reshape(got.shape[0], got.shape[1], -1).any(2)
        assert differs.mean() <= 0.01, (name, differs.mean())


def test_bad_options_name_the_value(exported, tmp_path, run_cli, capsys):
    with pytest.raises(ConfigError, match="'tflite'"):
        export_checkpoint(exported.checkpoint, format="tflite")
    with pytest.raises(ConfigError, match="opset 17"):
        export_checkpoint(exported.checkpoint, format="onnx", opset=17)
    with pytest.raises(ConfigError, match="opset 20.*torchscript"):
        export_checkpoint(exported.checkpoint, format="torchscript", opset=20)
    with pytest.raises(CheckpointError, match="missing.pt"):
        export_checkpoint(tmp_path / "missing.pt")
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported.onnx.read_bytes())
    assert run_cli("predict", str(tmp_path), "--onnx", str(lone)) == 2
    assert "lone.onnx.json: sidecar not found" in capsys.readouterr().err
    assert run_cli("export", str(exported.checkpoint), "--format", "tflite") == 2
    assert "'tflite'" in capsys.readouterr().err
    args = ["predict", str(tmp_path), "--checkpoint", str(exported.checkpoint)]
    assert run_cli(*args, "--onnx", str(exported.onnx)) == 2
    assert "got both" in capsys.readouterr().err
    assert run_cli("predict", str(tmp_path)) == 2
    assert "got neither" in capsys.readouterr().err


def test_check_at_export_catches_fixed_shapes_and_drift():
    net = nn.Conv2d(3, 2, 1).eval()
    fixed = lambda x: np.zeros((1, 2, 64, 96), np.float32)  # noqa: E731 - a traced-in shape
    with pytest.raises(ContrastSegError, match="do not generalise"):
        export_module._max_abs_diff(net, fixed)
    drift = lambda x: net(torch.from_numpy(x)).detach().numpy() + 0.25  # noqa: E731
    assert export_module._max_abs_diff(net, drift) == pytest.approx(0.25)


def test_failed_check_writes_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_max_abs_diff", lambda net, run: 0.5)
    out = tmp_path / "model.torchscript.pt"
    with pytest.raises(ContrastSegError, match="differs from PyTorch by 0.5"):
        export_checkpoint(exported.checkpoint, out, format="torchscript")
    assert list(tmp_path.iterdir()) == []
