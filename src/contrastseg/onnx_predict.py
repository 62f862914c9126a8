"""Predict masks with an exported ONNX model and its sidecar, through onnxruntime on the CPU.

Writes the same files as :func:`contrastseg.engine.inference.predict`, from the same preprocessing;
needs no checkpoint and no config, only ``MODEL.onnx`` and ``MODEL.onnx.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contrastseg.data import normalize
from contrastseg.engine.checkpoint_parts import check_channels, check_class_names, check_palette
from contrastseg.engine.inference import PredictResult, predict_files
from contrastseg.errors import CheckpointError, one_line
from contrastseg.export import import_optional, sidecar_path
from contrastseg.files import parse_json

SIDECAR_FIELDS = ("format", "input", "output", "class_names", "palette")
SIDECAR_MAX_BYTES = 1 << 20  # 255 class names and colours take a few KiB


def _field(path: Path, info: dict, key: str, kind: type, what: str):
    value = info.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path}: sidecar field {key!r} is {str(value)[:60]}, not {what}")
    return value


def load_sidecar(model_path: Path) -> dict:
    """Read and check ``<model_path>.json`` (at most :data:`SIDECAR_MAX_BYTES`): the format,
    the input's name, mean and std, the output's name, the class names and one palette colour
    per class. A missing file or a missing or malformed field raises ``CheckpointError`` naming
    the file and the field."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: sidecar not found; it is written by `contrastseg export` next to the model "
            "and holds the classes, palette and mean/std. Export the checkpoint again"
        )
    if path.stat().st_size > SIDECAR_MAX_BYTES:
        raise CheckpointError(
            f"{path}: {path.stat().st_size} bytes, more than a sidecar's {SIDECAR_MAX_BYTES}; "
            "export again"
        )
    try:
        info = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot read the sidecar JSON ({one_line(err)}); export again"
        ) from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: the sidecar is a JSON {type(info).__name__}, not an object")
    missing = [k for k in SIDECAR_FIELDS if k not in info]
    if missing:
        raise CheckpointError(f"{path}: sidecar lacks the fields {missing}; export again")
    if info["format"] != "onnx":
        raise CheckpointError(
            f"{path}: describes a {str(info['format'])[:40]!r} model, not ONNX; give the .onnx file"
        )
    inp = _field(path, info, "input", dict, "an object")
    out = _field(path, info, "output", dict, "an object")
    for part, key in (("input", inp), ("output", out)):
        if not isinstance(key.get("name"), str):
            raise CheckpointError(f"{path}: sidecar field {part}.name is not a string")
    inp["mean"] = check_channels(path, inp.get("mean"), "input.mean")
    inp["std"] = check_channels(path, inp.get("std"), "input.std")
    names = check_class_names(path, info["class_names"])
    info["palette"] = check_palette(path, info["palette"], len(names))
    return info


def predict_onnx(
    model: Path,
    images: list[Path],
    out_dir: Path,
    alpha: float = 0.5,
    strict: bool = False,
    skip_existing: bool = False,
) -> PredictResult:
    """Per image, ``<stem>_mask.png``, ``<stem>_overlay.png`` and ``<stem>_labels.png`` in
    ``out_dir``, as ``predict`` writes them (each atomically; an unreadable input is skipped
    unless ``strict``, finished outputs kept with ``skip_existing``: see
    :func:`contrastseg.engine.inference.predict_files`). Returns the mask paths written, with the
    inputs skipped and kept."""
    model = Path(model)
    if not model.is_file():
        raise CheckpointError(f"{model}: ONNX model not found")
    info = load_sidecar(model)
    ort = import_optional("onnxruntime")
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"{model}: onnxruntime cannot load it ({err}); export again") from err
    in_name, out_name = info["input"]["name"], info["output"]["name"]
    names = [i.name for i in session.get_inputs()]
    if names != [in_name]:
        raise CheckpointError(f"{model}: inputs {names}, but its sidecar says [{in_name!r}]")
    palette = np.asarray(info["palette"], dtype=np.uint8)
    mean, std = info["input"]["mean"], info["input"]["std"]

    def infer(rgb: np.ndarray) -> np.ndarray:
        x = normalize(rgb, mean, std)[None].numpy()
        try:
            logits = session.run([out_name], {in_name: x})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise RuntimeError(f"onnxruntime: {err}") from err
        expected = (1, len(info["class_names"]), *rgb.shape[:2])
        if getattr(logits, "shape", None) != expected:
            raise CheckpointError(
                f"{model}: gave logits of shape {tuple(getattr(logits, 'shape', ()))} for an "
                f"image of {rgb.shape[1]} x {rgb.shape[0]}, not {expected} (batch, the sidecar's "
                f"{expected[1]} classes, the image's height and width); export the model again"
            )
        if not np.isfinite(logits).all():
            raise CheckpointError(
                f"{model}: gave non-finite (NaN or infinite) logits; its weights are broken: "
                "export the model again"
            )
        return logits.argmax(1)[0].astype(np.uint8)

    return predict_files(images, out_dir, infer, palette, alpha, strict, skip_existing)
