"""Export the inference graph of a checkpoint to ONNX or TorchScript, with a JSON sidecar.

The exported model is :class:`~contrastseg.models.segmentor.InferenceModel`: backbone and decode
head only (the auxiliary and projection heads serve training alone). It maps a normalised
float32 batch ``(N, 3, H, W)`` to logits ``(N, K, H, W)`` at the input resolution; batch, height
and width are free. ``<model file>.json`` next to it holds what a deployer needs besides the
graph: class names, palette, mean/std and the input and output conventions (docs/deployment.md).
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from contrastseg.errors import ConfigError, ContrastSegError
from contrastseg.files import atomic_write, real_path

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_OPSET = 18  # the lowest opset the torch.onnx (dynamo) exporter writes natively
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# The graph is traced on TRACE_SHAPE and the written file checked on VERIFY_SHAPES: other batch
# sizes and image sizes (one with sides that are not multiples of 32), so that a shape fixed by
# tracing fails the check.
TRACE_SHAPE = (2, 3, 64, 96)
VERIFY_SHAPES = ((1, 3, 96, 128), (3, 3, 64, 64), (1, 3, 97, 131))
SIDECAR_VERSION = 1


@dataclass
class ExportResult:
    """The written model file, its sidecar, and the largest |exported - PyTorch| logit found
    on the verification inputs (None when not verified)."""

    model: Path
    sidecar: Path
    max_abs_diff: float | None


def import_optional(name: str) -> ModuleType:
    """Import ``onnx``/``onnxruntime``/``onnxscript``; say how to install them when missing."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ContrastSegError(
            f"{name} is not installed; ONNX export and inference need it: "
            "pip install 'contrastseg[export]'"
        ) from err


def sidecar_path(model_path: Path) -> Path:
    """``MODEL.onnx`` -> ``MODEL.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def default_output(checkpoint: Path, format: str) -> Path:
    """Next to the checkpoint: ``iter_0000800.pt`` -> ``iter_0000800.onnx`` (or
    ``iter_0000800.torchscript.pt``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + FORMATS[format])


def check_options(format: str, opset: int | None) -> None:
    """Reject an unknown format, or an opset that is not ONNX's or is below DEFAULT_OPSET."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r}: allowed values are {sorted(FORMATS)}")
    if opset is None:
        return
    if format != "onnx":
        raise ConfigError(f"opset {opset}: an opset applies to --format onnx only, not {format!r}")
    if opset < DEFAULT_OPSET:
        raise ConfigError(
            f"opset {opset}: the exporter writes opset {DEFAULT_OPSET} or newer; "
            f"use --opset {DEFAULT_OPSET} or higher"
        )


def export_checkpoint(
    checkpoint: Path,
    out: Path | None = None,
    format: str = "onnx",
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
) -> ExportResult:
    """Export the inference model of ``checkpoint`` to ``out`` (default: next to the checkpoint)
    and write the sidecar ``<out>.json``.

    ``format``: ``onnx`` (opset ``opset``, default 18; dynamic batch, height and width) or
    ``torchscript`` (scripted; traced when scripting fails, e.g. timm's HRNet). With ``verify``
    the written file is loaded back (onnxruntime on the CPU, or ``torch.jit.load``) and run on
    random inputs of VERIFY_SHAPES; a max abs logit difference to PyTorch above ``tolerance``
    raises ``ContrastSegError`` and nothing is written. Both files are written atomically.
    The checkpoint is read safely and checked (digest, parts, finite weights; see
    :func:`contrastseg.engine.inference.load_trained_model`).
    """
    from contrastseg.engine.inference import load_trained_model
    from contrastseg.models.segmentor import InferenceModel

    check_options(format, opset)
    opset = (opset or DEFAULT_OPSET) if format == "onnx" else None
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else default_output(checkpoint, format)
    if real_path(out) == real_path(checkpoint):
        raise ConfigError(f"--out {out}: that is the checkpoint itself; choose another path")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    segmentor, cfg, state = load_trained_model(checkpoint, "cpu")
    net = InferenceModel(segmentor).eval()

    def write_and_verify(tmp: Path) -> float | None:
        if format == "onnx":
            _write_onnx(net, tmp, opset)
        else:
            _write_torchscript(net, tmp)
        if not verify:
            return None
        run = _onnx_runner(tmp) if format == "onnx" else _torchscript_runner(tmp)
        diff = _max_abs_diff(net, run)
        if not diff <= tolerance:
            raise ContrastSegError(
                f"{checkpoint}: the exported {format} model differs from PyTorch by {diff:.3g} "
                f"(tolerance {tolerance:g}) on inputs {list(VERIFY_SHAPES)}; {out} was not "
                "written. Try the other --format"
            )
        return diff

    diff = atomic_write(out, write_and_verify)
    info = sidecar(cfg, state, segmentor, checkpoint, out, format, opset, diff, tolerance)
    side = sidecar_path(out)
    atomic_write(side, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    return ExportResult(out, side, diff)


def sidecar(
    cfg,
    state: dict,
    segmentor,
    checkpoint: Path,
    out: Path,
    format: str,
    opset: int | None,
    diff: float | None,
    tolerance: float,
) -> dict:
    """The sidecar's content (docs/deployment.md lists the fields)."""
    from contrastseg import __version__

    classes = list(state["class_names"])
    return {
        "sidecar_version": SIDECAR_VERSION,
        "format": format,
        "file": out.name,
        "opset": opset,
        "input": {
            "name": INPUT_NAME if format == "onnx" else "x",
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "channels": "RGB",
            "normalisation": "x = (rgb / 255 - mean) / std, per channel",
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "output": {
            "name": OUTPUT_NAME if format == "onnx" else None,
            "dtype": "float32",
            "shape": ["batch", len(classes), "height", "width"],
            "meaning": "class logits at the input resolution; argmax over axis 1 = class id",
        },
        "dynamic_axes": {"batch": 0, "height": 2, "width": 3},
        "num_classes": len(classes),
        "class_names": classes,
        "palette": [list(map(int, c)) for c in state["palette"]],
        "model": {
            "head": cfg.model.head,
            "backbone": cfg.model.backbone.name,
            "output_stride": segmentor.output_stride,
        },
        "source": {
            "checkpoint": str(checkpoint),
            "iteration": state.get("iteration"),
            "contrastseg": __version__,
            "torch": torch.__version__,
        },
        "verification": {
            "input_shapes": [list(s) for s in VERIFY_SHAPES] if diff is not None else [],
            "max_abs_diff": diff,
            "tolerance": tolerance if diff is not None else None,
        },
    }


def _write_onnx(net: torch.nn.Module, path: Path, opset: int) -> None:
    """torch.onnx's dynamo exporter with symbolic batch/height/width; one self-contained file."""
    import_optional("onnxscript")
    import_optional("onnx")
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=8)
    width = torch.export.Dim("width", min=8)
    try:
        program = torch.onnx.export(
            net,
            (torch.randn(TRACE_SHAPE),),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch, 2: height, 3: width},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - the exporter fails in many ways
        raise ContrastSegError(
            f"ONNX export failed ({type(err).__name__}: {err}); try --format torchscript"
        ) from err
    got = {o.domain: o.version for o in program.model_proto.opset_import}.get("")
    if got != opset:
        raise ConfigError(
            f"opset {opset}: the exporter wrote opset {got} instead; use --opset {got}"
        )
    program.save(path, external_data=False)


def _write_torchscript(net: torch.nn.Module, path: Path) -> None:
    """Scripted, so that no shape is fixed; traced where scripting fails (timm's HRNet), the
    upsampling then reads the input size at run time (the check at export confirms it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        try:
            module = torch.jit.script(net)
        except Exception:  # noqa: BLE001 - scripting fails in many ways
            module = torch.jit.trace(net, torch.randn(TRACE_SHAPE), check_trace=False)
        torch.jit.save(module, str(path))


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    ort = import_optional("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the check inputs are small; spare the CPUs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


@torch.no_grad()
def _max_abs_diff(net: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray]) -> float:
    """Largest |run(x) - net(x)| over random inputs of VERIFY_SHAPES; a wrong output shape
    raises ContrastSegError."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in VERIFY_SHAPES:
        x = torch.randn(shape, generator=gen)
        ref = net(x).numpy()
        got = run(x.numpy())
        if got.shape != ref.shape:
            raise ContrastSegError(
                f"the exported model returned shape {got.shape} for input {shape}, PyTorch "
                f"{ref.shape}: its shapes do not generalise; try the other --format"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst
