"""Export the inference graph of a checkpoint to ONNX, TorchScript or a torch.export program
(``.pt2``), with a JSON sidecar.

The exported model is :class:`~contrastseg.models.segmentor.InferenceModel`: backbone and decode
head only (the auxiliary and projection heads serve training alone). It maps a normalised
float32 batch ``(N, 3, H, W)`` to logits ``(N, K, H, W)`` at the input resolution; batch, height
and width are free (a ``.pt2`` program takes height and width of MIN_SIDE and up).
``<model file>.json`` next to it holds what a deployer needs besides the graph: class names,
palette, mean/std and the input and output conventions (docs/deployment.md).
"""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from contrastseg.errors import ConfigError, ContrastSegError
from contrastseg.files import atomic_write, real_path

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "torch-export": ".pt2"}
DEFAULT_OPSET = 18  # the lowest opset the torch.onnx (dynamo) exporter writes natively
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# The graph is traced on TRACE_SHAPE and the written file checked on VERIFY_SHAPES: other batch
# sizes and image sizes (one with sides that are not multiples of 32), so that a shape fixed by
# tracing fails the check.
TRACE_SHAPE = (2, 3, 64, 96)
VERIFY_SHAPES = ((1, 3, 96, 128), (3, 3, 64, 64), (1, 3, 97, 131))
SIDECAR_VERSION = 1
# The smallest height and width of a torch.export program. At 32 the stride-32 feature map of
# the backbones is one pixel, a case the exporter specialises away (it would otherwise treat
# a side of 1 as broadcastable); from 33 up every stage has a side of 2 or more.
MIN_SIDE = 33


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
    ``iter_0000800.torchscript.pt``, ``iter_0000800.pt2``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + FORMATS[format])


def check_options(format: str, opset: int | None) -> None:
    """Reject an unknown format, or an opset that is not ONNX's or is below DEFAULT_OPSET."""
    if format not in FORMATS:
        raise ConfigError(
            f"export format {format!r}: allowed values are {sorted([*FORMATS, 'hub'])}"
        )
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

    ``format``: ``onnx`` (opset ``opset``, default 18; dynamic batch, height and width),
    ``torchscript`` (scripted; traced when scripting fails, e.g. timm's HRNet) or
    ``torch-export`` (a ``torch.export`` program saved with ``torch.export.save``; dynamic
    batch, height and width of MIN_SIDE and up). With ``verify`` the written file is loaded back
    (onnxruntime on the CPU, ``torch.jit.load`` or :func:`load_exported_program`) and run on
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
    model = f"model.head {cfg.model.head!r} on model.backbone.name {cfg.model.backbone.name!r}"
    written = write_model(
        net, out, format, opset, verify, tolerance, source=checkpoint, model=model
    )
    info = sidecar(
        cfg,
        state,
        segmentor,
        checkpoint,
        out,
        format,
        opset,
        written.max_abs_diff,
        tolerance,
        shapes=written.shapes,
    )
    if written.sizes is not None:
        info["accepted_sizes"] = written.sizes
    side = sidecar_path(out)
    atomic_write(side, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    return ExportResult(out, side, written.max_abs_diff)


@dataclass
class WrittenModel:
    """What :func:`write_model` wrote: the largest |exported - PyTorch| logit on the check's
    input ``shapes`` (None when not verified) and, for a torch.export program, the sizes it
    accepts (the sidecar's ``accepted_sizes``; None for the other formats)."""

    max_abs_diff: float | None
    sizes: dict | None = None
    shapes: tuple | None = None


def write_model(
    net: torch.nn.Module,
    out: Path,
    format: str,
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
    source: Path | str = "the model",
    model: str = "the model",
) -> WrittenModel:
    """Write ``net`` (an :class:`InferenceModel` in eval mode) to ``out`` in ``format``, load the
    file back and compare it with ``net`` on VERIFY_SHAPES, atomically: when the export or the
    check fails, ``ContrastSegError`` says why in one line and ``out`` is not written. A
    torch.export program is checked on VERIFY_SHAPES moved into the sizes it accepts (each side
    raised to its smallest accepted size or step; the same shapes for the zoo's programs).
    ``source`` (the checkpoint) and ``model`` (its head and backbone) name what is exported in
    the messages. This is what :func:`export_checkpoint` (and so ``contrastseg export``) runs."""
    check_options(format, opset)
    if format == "onnx":
        opset = opset or DEFAULT_OPSET
    sizes: dict | None = None
    shapes = tuple(VERIFY_SHAPES)

    def write_and_verify(tmp: Path) -> float | None:
        nonlocal sizes, shapes
        if format == "onnx":
            _write_onnx(net, tmp, opset)
        elif format == "torch-export":
            sizes = _write_torch_export(net, tmp, model)
            shapes = tuple(_fit_shape(s, sizes) for s in VERIFY_SHAPES)
        else:
            _write_torchscript(net, tmp)
        if not verify:
            return None
        if format == "torch-export":
            diff = _max_abs_diff(net, _torch_export_runner(tmp), shapes)
        else:
            diff = _max_abs_diff(
                net, (_onnx_runner if format == "onnx" else _torchscript_runner)(tmp)
            )
        if not diff <= tolerance:
            raise ContrastSegError(
                f"{source}: the exported {format} model differs from PyTorch by {diff:.3g} "
                f"(tolerance {tolerance:g}) on inputs {list(shapes)}; {out} was not "
                "written. Try another --format"
            )
        return diff

    diff = atomic_write(Path(out), write_and_verify)
    return WrittenModel(diff, sizes, shapes if diff is not None else None)


def load_exported_program(path: Path | str) -> torch.nn.Module:
    """The callable module of a ``.pt2`` file written by ``contrastseg export --format
    torch-export``: ``load_exported_program(path)(x)`` with ``x`` a normalised float32
    ``(N, 3, H, W)`` tensor (H, W >= MIN_SIDE) gives the logits ``(N, K, H, W)``; run it under
    ``torch.no_grad()`` (or ``torch.inference_mode()``).

    Not a safe loader: ``torch.export.load`` unpickles parts of the file (the sample inputs,
    with a fallback to ``weights_only=False``), so a crafted file can run code. Load only files
    you wrote or trust (docs/deployment.md)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # a handle: the loader wants a buffer or a name in .pt2
            return torch.export.load(f).module()
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken archive fails in many ways
        raise ContrastSegError(
            f"{path}: torch.export.load cannot read it ({type(err).__name__}: "
            f"{_first_line(err)}); export it again"
        ) from err


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
    shapes: tuple | None = None,
) -> dict:
    """The sidecar's content (docs/deployment.md lists the fields); ``shapes``: the check's
    input shapes (default VERIFY_SHAPES)."""
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
            "input_shapes": [list(s) for s in (shapes or VERIFY_SHAPES)]
            if diff is not None
            else [],
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


def _write_torch_export(net: torch.nn.Module, path: Path, model: str) -> dict:
    """``torch.export.export`` with dynamic batch (1 and up), height and width (MIN_SIDE and up),
    saved with ``torch.export.save``. Returns the sizes the program accepts (its range
    constraints, and the run-time checks it carries, in terms of batch, height and width).

    When the exporter finds that the model needs narrower ranges (ConvNeXt's unpadded stride-2
    downsampling makes the stride-32 map one pixel below 64, so it asks for height and width of
    64 and up), its suggested fixes are applied and the export is tried again, at most twice;
    the sidecar states the sizes the program ends up with. A program that fixes an axis to one
    size is refused.

    Where the exporter cannot prove a condition from the ranges alone (e.g. that a feature
    map's side is not 1, which it writes as ``Mod`` expressions for the pyramid pooling, UPerNet
    and the prototype classifier's reshapes), ``prefer_deferred_runtime_asserts_over_guards``
    keeps it as a check in the program instead of failing; at MIN_SIDE and up the ones the zoo
    gives hold, and the check on VERIFY_SHAPES runs them."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    spec: tuple = (
        {
            0: torch.export.Dim("batch", min=1),
            2: torch.export.Dim("height", min=MIN_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE),
        },
    )

    def refuse(err: BaseException) -> ContrastSegError:
        return ContrastSegError(
            f"torch.export cannot export {model} ({type(err).__name__}: {_first_line(err)}); "
            "try --format onnx or --format torchscript"
        )

    for attempt in range(3):
        try:
            with torch.no_grad():
                program = torch.export.export(
                    net,
                    (torch.randn(TRACE_SHAPE),),
                    dynamic_shapes=spec,
                    prefer_deferred_runtime_asserts_over_guards=True,
                )
            break
        except Exception as err:  # noqa: BLE001 - the exporter fails in many ways
            if attempt == 2 or "Suggested fixes:" not in str(err):
                raise refuse(err) from err
            # the fixes block alone: the helper reads every line after its heading
            fixes = str(err).split("Suggested fixes:", 1)[1].strip().split("\n\n")[0]
            try:
                spec = refine_dynamic_shapes_from_suggested_fixes(
                    f"Suggested fixes:\n{fixes}", spec
                )
            except Exception:  # noqa: BLE001 - a fix the helper cannot apply
                raise refuse(err) from err
    sizes = _accepted_sizes(program)
    fixed = [
        axis for axis in ("batch", "height", "width") if sizes[axis]["max"] == sizes[axis]["min"]
    ]
    if fixed:
        raise ContrastSegError(
            f"torch.export cannot export {model} with a free {' and '.join(fixed)} (the exporter "
            f"fixed them to {[sizes[a]['min'] for a in fixed]}); try --format onnx or "
            "--format torchscript"
        )
    with open(path, "wb") as f:  # a handle: the writer wants a buffer or a name in .pt2
        torch.export.save(program, f)
    return sizes


def _accepted_sizes(program) -> dict:
    """``{"batch": {"min", "max", "step"}, "height": ..., "width": ..., "runtime_checks": [...]}``
    of an ExportedProgram: the sizes each dynamic axis takes (``min``, ``min + step``, ... up to
    ``max``, None when unbounded) and the conditions of its run-time assertions, with the
    exporter's symbols renamed to the axes' names (``n_height`` where height = min + step *
    (n_height - its lowest value))."""
    import sympy

    (name,) = program.graph_signature.user_inputs
    (node,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == name]
    shape = node.meta["val"].shape
    sizes: dict = {}
    renames = {}
    for axis, label in ((0, "batch"), (2, "height"), (3, "width")):
        dim = shape[axis]
        if isinstance(dim, int):
            sizes[label] = {"min": dim, "max": dim, "step": 1}
            continue
        expr = dim.node.expr
        symbols = list(expr.free_symbols)
        bounds = program.range_constraints.get(symbols[0]) if len(symbols) == 1 else None
        offset, term = expr.as_coeff_Add()
        step, rest = term.as_coeff_Mul()
        if bounds is None or rest != symbols[0] or not (offset.is_Integer and step.is_Integer):
            raise ContrastSegError(f"the exported program's {label} is {expr}, not a range")
        renames[str(symbols[0])] = label if expr == symbols[0] else f"n_{label}"
        upper = bounds.upper
        sizes[label] = {
            "min": int(step * bounds.lower + offset),
            "max": int(step * upper + offset) if isinstance(upper, sympy.Integer) else None,
            "step": int(step),
        }
    checks = []
    for n in program.graph.nodes:
        if n.target is torch.ops.aten._assert_scalar.default and len(n.args) > 1:
            found = re.search(r"for expression (.*) on node", str(n.args[1]))
            text = found.group(1) if found else str(n.args[1])
            for symbol, label in renames.items():
                text = re.sub(rf"\b{symbol}\b", label, text)
            checks.append(text)
    sizes["runtime_checks"] = checks
    return sizes


def _fit_shape(shape: tuple, sizes: dict) -> tuple:
    """``shape`` with batch, height and width each raised to the nearest size the program
    accepts (``min + k * step``), or lowered to its ``max``."""
    fitted = list(shape)
    for axis, label in ((0, "batch"), (2, "height"), (3, "width")):
        rule = sizes[label]
        value = max(fitted[axis], rule["min"])
        value = rule["min"] + -(-(value - rule["min"]) // rule["step"]) * rule["step"]
        if rule["max"] is not None:
            value = min(value, rule["max"])
        fitted[axis] = value
    return tuple(fitted)


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message; for the exporter's "Constraints
    violated" error, with its first violated condition."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return "no message"
    first = lines[0]
    if first.startswith("Constraints violated"):
        detail = next((line for line in lines[1:] if line.startswith("- ")), None)
        if detail:
            first = f"{first} {detail[2:]}"
    return first


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


def _torch_export_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    module = load_exported_program(path)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()
        except Exception as err:  # noqa: BLE001 - the program's own checks, or a kernel
            raise ContrastSegError(
                f"the exported program refused an input of shape {list(x.shape)} "
                f"({type(err).__name__}: {_first_line(err)}); try another --format"
            ) from err

    return run


@torch.no_grad()
def _max_abs_diff(
    net: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray], shapes: tuple | None = None
) -> float:
    """Largest |run(x) - net(x)| over random inputs of ``shapes`` (default VERIFY_SHAPES); a
    wrong output shape raises ContrastSegError."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes or VERIFY_SHAPES:
        x = torch.randn(shape, generator=gen)
        ref = net(x).numpy()
        got = run(x.numpy())
        if got.shape != ref.shape:
            raise ContrastSegError(
                f"the exported model returned shape {got.shape} for input {shape}, PyTorch "
                f"{ref.shape}: its shapes do not generalise; try another --format"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst
