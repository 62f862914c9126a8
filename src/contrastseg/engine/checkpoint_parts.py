"""The parts of a loaded checkpoint, checked once with one line per problem: what ``eval``,
``predict`` and ``export`` use (:func:`check_model_parts`), what ``--resume`` restores
besides (:func:`check_resume_parts`), and whether the weights are finite
(:func:`first_non_finite`).

Every check raises ``CheckpointError`` naming the file and the part (``class_names``,
``model['head.weight']``, ``optimizer['param_groups']``, ...), so that a file whose part is
missing or of the wrong type never reaches a ``KeyError`` or ``TypeError`` deep in a command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrastseg.config import ExperimentConfig, validate_config
from contrastseg.errors import CheckpointError, ConfigError, one_line

#: Class ids are stored in 8-bit masks where 255 means "ignore": at most 255 classes.
MAX_CLASSES = 255


@dataclass(frozen=True)
class ModelParts:
    """What a trained model is rebuilt from: its config, class names, palette ((K, 3) RGB
    values 0..255, K >= number of classes) and weights (name -> tensor)."""

    config: ExperimentConfig
    class_names: list[str]
    palette: list[list[int]]
    weights: dict[str, torch.Tensor]


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _need(path: Path, state: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in state:
        raise CheckpointError(f"{path}: the checkpoint has no {key!r} part ({what})")
    value = state[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        raise CheckpointError(
            f"{path}: its {key!r} part is a {_kind(value)}, not {what}; the file is not a "
            "checkpoint contrastseg wrote, or it was edited"
        )
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _stored_config(path: Path, tree: dict) -> ExperimentConfig:
    try:
        return validate_config(tree, f"{path} (its stored config)")
    except ConfigError as err:
        raise CheckpointError("; ".join(one_line(line) for line in str(err).splitlines())) from None


def check_class_names(path: Path, names: Any) -> list[str]:
    """``names`` when it is a list of 1 to :data:`MAX_CLASSES` strings; ``CheckpointError``
    naming ``path`` otherwise."""
    if not isinstance(names, list):
        raise CheckpointError(f"{path}: 'class_names' is a {_kind(names)}, not a list of names")
    if not names or len(names) > MAX_CLASSES:
        raise CheckpointError(
            f"{path}: 'class_names' lists {len(names)} classes; a model has 1 to {MAX_CLASSES}"
        )
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise CheckpointError(
                f"{path}: class_names[{i}] is a {_kind(name)}, not a class name (a string)"
            )
    return list(names)


def check_palette(path: Path, palette: Any, num_classes: int) -> list[list[int]]:
    """``palette`` when it is a list of at least ``num_classes`` ``[R, G, B]`` of integers
    0..255; ``CheckpointError`` naming ``path`` otherwise."""
    if not isinstance(palette, list):
        raise CheckpointError(f"{path}: 'palette' is a {_kind(palette)}, not a list of colours")
    if len(palette) < num_classes:
        raise CheckpointError(
            f"{path}: its 'palette' has {len(palette)} colours for {num_classes} classes"
        )
    for i, colour in enumerate(palette):
        ok = isinstance(colour, (list, tuple)) and len(colour) == 3
        ok = ok and all(type(c) is int and 0 <= c <= 255 for c in colour)
        if not ok:
            raise CheckpointError(
                f"{path}: palette[{i}] = {str(colour)[:60]} is not an [R, G, B] of integers 0..255"
            )
    return [list(c) for c in palette]


def check_channels(path: Path, values: Any, field: str) -> list[float]:
    """``values`` as 3 floats when they are 3 finite numbers (3 positive ones for a field
    ending in ``std``): a per-channel mean or std; ``CheckpointError`` naming ``path`` and
    ``field`` otherwise."""
    std = field.endswith("std")
    ok = isinstance(values, list) and len(values) == 3
    ok = ok and all(type(v) in (int, float) and math.isfinite(v) for v in values)
    if not ok or std and min(values) <= 0:
        rule = "3 positive numbers" if std else "3 finite numbers"
        raise CheckpointError(f"{path}: field {field} = {str(values)[:60]} is not {rule}")
    return [float(v) for v in values]


def _weights(path: Path, weights: dict) -> dict[str, torch.Tensor]:
    for name, value in weights.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: model[{str(name)[:80]!r}] is a {_kind(value)}; the 'model' part maps "
                "parameter names to tensors"
            )
    return weights


def check_model_parts(path: Path, state: dict) -> ModelParts:
    """The config (validated as a YAML file's would be), class names, palette and weights of a
    loaded checkpoint ``state``; ``CheckpointError`` naming ``path`` and the part otherwise."""
    path = Path(path)
    tree = _need(path, state, "config", dict, "the run's config (a mapping)")
    names = _need(path, state, "class_names", list, "a list of class names")
    palette = _need(path, state, "palette", list, "a list of [R, G, B] colours")
    weights = _need(path, state, "model", dict, "the model's weights (name -> tensor)")
    iteration = _need(path, state, "iteration", int, "the iteration (an integer)")
    if iteration < 0:
        raise CheckpointError(f"{path}: its iteration {iteration} is negative")
    config = _stored_config(path, tree)
    names = check_class_names(path, names)
    palette = check_palette(path, palette, len(names))
    return ModelParts(config, names, palette, _weights(path, weights))


def _rng(path: Path, rng: Any, where: str) -> None:
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(
            f"{path}: {where} is not a random state (a mapping with a 'torch' byte tensor)"
        )
    if rng["torch"].dtype != torch.uint8 or rng["torch"].dim() != 1:
        raise CheckpointError(f"{path}: {where}['torch'] is not torch's 1-D uint8 random state")
    cuda = rng.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)
    ):
        raise CheckpointError(f"{path}: {where}['cuda'] is not a list of CUDA random states")


def check_resume_parts(path: Path, state: dict) -> None:
    """What ``--resume`` restores beyond :func:`check_model_parts` (call that first): the
    optimizer's, loss set's and gradient scaler's states, the random states of every process
    and the best evaluation so far; ``CheckpointError`` naming ``path`` and the part."""
    path = Path(path)
    optimizer = _need(path, state, "optimizer", dict, "the optimizer's state (a mapping)")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(
        optimizer.get("param_groups"), list
    ):
        raise CheckpointError(
            f"{path}: its 'optimizer' part lacks the 'state' mapping or 'param_groups' list of "
            "an optimizer's state_dict"
        )
    loss = _need(path, state, "loss", dict, "the loss set's state (a mapping)")
    if not all(isinstance(k, str) for k in loss):
        raise CheckpointError(f"{path}: its 'loss' part has keys that are not names")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise CheckpointError(f"{path}: its 'scaler' part is a {_kind(scaler)}, not a mapping")
    _rng(path, state.get("rng"), "its 'rng' part")
    processes = state.get("processes") or []
    if not isinstance(processes, list):
        raise CheckpointError(f"{path}: its 'processes' part is a {_kind(processes)}, not a list")
    for i, process in enumerate(processes):
        if not isinstance(process, dict) or not isinstance(process.get("loss"), dict):
            raise CheckpointError(
                f"{path}: processes[{i}] is not a process state (a mapping with 'rng' and 'loss')"
            )
        _rng(path, process.get("rng"), f"processes[{i}]['rng']")
    best = state.get("best")
    if best is not None and not (
        isinstance(best, dict)
        and type(best.get("iteration")) is int
        and isinstance(best.get("mIoU"), float)
    ):
        raise CheckpointError(
            f"{path}: its 'best' part is not None or {{'iteration': int, 'mIoU': float}}"
        )


def check_weights_fit(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """``CheckpointError`` naming ``path`` and the tensor when a weight's kind (floating point
    or integer) differs from the model's, which ``load_state_dict`` would convert silently (a
    float32 weight saved as float16 is converted, as a cast of precision)."""
    own = model.state_dict()
    for name, value in weights.items():
        mine = own.get(name)
        if mine is not None and mine.is_floating_point() != value.is_floating_point():
            raise CheckpointError(
                f"{path}: weight {name!r} is {value.dtype}, but the model's is {mine.dtype}; "
                "the file was edited or belongs to another model"
            )


def first_non_finite(weights: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """``(name, count, size)`` of the first floating-point tensor of ``weights`` holding NaN or
    infinite values (``count`` of its ``size`` values), or None when every one is finite."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return name, bad, tensor.numel()
    return None


def check_finite(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """``CheckpointError`` naming ``path`` and the first tensor with non-finite values."""
    found = first_non_finite(weights)
    if found is not None:
        name, bad, size = found
        raise CheckpointError(
            f"{path}: weight {name!r} holds {bad} non-finite (NaN or infinite) values of {size}; "
            "a model with such weights predicts nothing meaningful: use an earlier checkpoint"
        )
