"""Checkpoint files: atomic writes, versioned contents, safe loading with clear errors, rotation,
and the conversion of older formats.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings,
lists, tuples and dicts are rebuilt (and NumPy scalars and dtypes, see
:mod:`contrastseg.safe_load`), and nothing else is imported or called, so a checkpoint from an
untrusted source cannot run code. What this module writes holds only those types.

Format history (``format_version`` in every checkpoint):

1. The pixel-contrast projection head under ``state["model"]["projection.<rest>"]``; the
   ``environment`` held ``torch.__version__`` as torch's ``TorchVersion`` object.
2. Only plain types (loads with ``weights_only=True`` and no allow-list). The projection head
   belongs to the contrast module: ``state["loss"]["contrast.projection.<rest>"]``. ``processes``
   holds each process's random state (torch RNG and the loss set's generators), so that a
   multi-process run resumes each process's own random draws.

``contrastseg checkpoint upgrade OLD NEW`` (:func:`upgrade_file`) converts format 1 to 2;
loading an older format without converting it is refused with that command in the message.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from contrastseg.errors import CheckpointError
from contrastseg.files import atomic_write
from contrastseg.safe_load import (
    allowed_names,
    check_readable,
    first_line,
    is_refusal,
    load_weights_only,
)

FORMAT_VERSION = 2
_NAME = re.compile(r"^iter_(\d+)\.pt$")
MODEL_PROJECTION = "projection."  # format 1: the projection head's keys in state["model"]
LOSS_PROJECTION = "contrast.projection."  # format 2: the same weights in state["loss"]
# Format-1 checkpoints name this class (a ``str`` subclass whose construction runs no code of
# the file); allowing it lets them be read safely for their conversion.
_FORMAT1_GLOBALS = [torch.torch_version.TorchVersion]
TRUST_OPTION = "--trust-checkpoint"

log = logging.getLogger(__name__)


class UnsafeCheckpointError(CheckpointError):
    """The file can only be loaded by unpickling arbitrary objects, which can run code."""


class OldFormatError(CheckpointError):
    """The checkpoint is of an older format; ``contrastseg checkpoint upgrade`` converts it."""


# --- writing -----------------------------------------------------------------------------------
_ATOMS = (
    torch.Tensor,
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
)


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` made of what ``torch.load(weights_only=True)`` rebuilds without an allow-list.

    ``str``/``int``/``float`` subclasses (e.g. ``torch.__version__``, enums) become the plain
    type; dicts, lists and tuples are walked (a ``state_dict``'s ``_metadata`` is kept). Any other
    object raises ``TypeError`` naming its place (``where``), since writing it would make the
    file need arbitrary unpickling. Returns ``obj`` itself when nothing needs converting.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _ATOMS:
        return obj
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
        out = type(obj)()
        changed = False
        for key, value in obj.items():
            new_key = plain(key, f"{where} (a key)")
            new = plain(value, f"{where}[{key!r}]")
            changed |= new is not value or new_key is not key
            out[new_key] = new
        if not changed:
            return obj
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, torch.Size):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return torch.Size(items) if type(obj) is torch.Size else type(obj)(items)
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a "
        "checkpoint, which holds only tensors, numbers, strings, lists and dicts (so that it "
        "loads with weights_only=True); store it as one of those"
    )


def atomic_save(obj: Any, path: Path) -> None:
    """Save ``obj`` (made :func:`plain`) with torch.save so that ``path`` is either the old file
    or the new one whole."""
    obj = plain(obj)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, save)


# --- reading -----------------------------------------------------------------------------------
def _resolve(name: str) -> Any:
    """``"package.module.Class"`` -> the object, importing the longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise LookupError(name)


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a file's pickle names beyond weights_only's own set and the
    NumPy allow-list (read without unpickling); empty when the file cannot be parsed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file too broken to list is reported as corrupt
        return []
    allowed = allowed_names()
    return [name for name in names if name not in allowed]


def read_file(path: Path, trust: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with format 1's harmless version
    class allowed. With ``trust`` the classes and functions the file names are allowed too (the
    user vouches for the file; torch still refuses ``os``, ``sys`` and the like).

    Raises ``UnsafeCheckpointError`` when the file needs more than that, naming what it would
    import and the ``--trust-checkpoint`` option, and ``CheckpointError`` when it is missing,
    truncated or corrupt. Nothing of the file is executed before either error.
    """
    path = check_readable(Path(path))
    allowed: list = list(_FORMAT1_GLOBALS)
    if trust:
        for name in _unsafe_globals(path):
            try:
                allowed.append((_resolve(name), name))
            except LookupError:
                raise CheckpointError(
                    f"{path}: it names {name}, which cannot be imported here, so even "
                    f"{TRUST_OPTION} cannot load it; load it where it was written and save "
                    "its tensors, numbers, strings, lists and dicts with torch.save"
                ) from None
    try:
        return load_weights_only(path, allowed)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken file can fail in many ways
        text = str(err)
        names = _unsafe_globals(path)
        if names or is_refusal(err):
            reason = _weights_only_reason(text)
            what = f"it would import and call {names}" if names else reason
            if trust:
                raise UnsafeCheckpointError(
                    f"{path}: refused even with {TRUST_OPTION}: {reason}. Load it where it was "
                    "written and save its tensors, numbers, strings, lists and dicts"
                ) from None
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling ({what}), which can "
                "run any code the file holds. contrastseg's own checkpoints never need it. If "
                f"you made this file yourself and trust it, pass {TRUST_OPTION} (unsafe: it "
                "allows what the file names)"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt?): {first_line(err)}"
        ) from err


def _weights_only_reason(text: str) -> str:
    """The one line of torch's weights_only message that says what was refused."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Trying to load unsupported", "Unsupported", "WeightsUnpickler")):
            return line.removeprefix("WeightsUnpickler error: ").rstrip(".")
    return "weights_only refused it"


def _check_header(path: Path, state: Any) -> int:
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a contrastseg checkpoint (no format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this contrastseg understands "
            f"({FORMAT_VERSION}); upgrade contrastseg"
        )
    return version


def load_checkpoint(path: Path, trust: bool = False) -> dict:
    """Load a checkpoint on the CPU, safely (see :func:`read_file`). A missing, truncated,
    foreign or unsafe file raises ``CheckpointError``; an older format ``OldFormatError`` with
    the command that converts it."""
    path = Path(path)
    state = read_file(path, trust)
    version = _check_header(path, state)
    if version < FORMAT_VERSION:
        raise OldFormatError(
            f"{path}: checkpoint format {version} is older than this contrastseg reads "
            f"({FORMAT_VERSION}); convert it with `contrastseg checkpoint upgrade {path} "
            "NEW.pt` (the original is kept)"
        )
    return state


# --- older formats -----------------------------------------------------------------------------
def _with_metadata(items: dict, metadata: dict | None) -> OrderedDict:
    out = OrderedDict(items)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def move_projection_to_loss(model: dict, loss: dict) -> tuple[OrderedDict, OrderedDict]:
    """Format 1 -> 2 for the projection head: ``model["projection.<rest>"]`` becomes
    ``loss["contrast.projection.<rest>"]``; every other key of both stays as it was (in order,
    with the ``_metadata`` that ``load_state_dict`` reads, moved along with the keys)."""
    moved = {k: v for k, v in model.items() if k.startswith(MODEL_PROJECTION)}
    clash = [k for k in loss if k.startswith(LOSS_PROJECTION)]
    if moved and clash:
        raise CheckpointError(
            f"the checkpoint holds projection weights both in the model ({sorted(moved)[:3]}) "
            f"and in the loss state ({clash[:3]}); it is not a format-1 checkpoint"
        )
    model_meta = getattr(model, "_metadata", None)
    loss_meta = getattr(loss, "_metadata", None)
    if model_meta is not None:
        model_meta = OrderedDict(model_meta)
        loss_meta = OrderedDict(loss_meta) if loss_meta is not None else None
        head = MODEL_PROJECTION.rstrip(".")
        for key in [k for k in model_meta if k == head or k.startswith(MODEL_PROJECTION)]:
            value = model_meta.pop(key)
            if loss_meta is not None:
                loss_meta["contrast." + key] = value
    new_model = _with_metadata({k: v for k, v in model.items() if k not in moved}, model_meta)
    new_loss = dict(loss)
    for key, value in moved.items():
        new_loss[LOSS_PROJECTION + key[len(MODEL_PROJECTION) :]] = value
    return new_model, _with_metadata(new_loss, loss_meta)


def upgrade_state(state: dict) -> dict:
    """A checkpoint of an older format in the current one (a new dict; ``state`` is not
    changed). Format 1 -> 2: the projection head moves from ``model`` to ``loss``
    (:func:`move_projection_to_loss`), every value becomes a plain type (:func:`plain`), and
    ``processes`` is filled with the one process's random state the checkpoint has."""
    version = state.get("format_version")
    if version == FORMAT_VERSION:
        return plain(dict(state))
    if version != 1:
        raise CheckpointError(f"format_version {version!r}: no conversion to {FORMAT_VERSION}")
    new = dict(state)
    new["model"], new["loss"] = move_projection_to_loss(state["model"], state["loss"])
    rng = state.get("rng") or {}
    generators = {k: v for k, v in new["loss"].items() if k.endswith("_extra_state")}
    new["processes"] = [{"rng": dict(rng), "loss": generators}]
    new["format_version"] = FORMAT_VERSION
    return plain(new)


def upgrade_file(old: Path, new: Path, trust: bool = False) -> int:
    """Convert checkpoint ``old`` to the current format and write it to ``new`` (atomically;
    ``old`` is never changed, and an existing ``new`` is never overwritten). Returns the format
    ``old`` had. A file already in the current format raises ``CheckpointError``."""
    old, new = Path(old), Path(new)
    if new.exists():
        raise CheckpointError(f"{new}: already exists; give a new file name (nothing written)")
    state = read_file(old, trust)
    version = _check_header(old, state)
    if version == FORMAT_VERSION:
        raise CheckpointError(
            f"{old}: already format {FORMAT_VERSION}; nothing to convert (nothing written)"
        )
    try:
        converted = upgrade_state(state)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{old}: cannot convert format {version}: {err}") from err
    atomic_save(converted, new)
    load_checkpoint(new)  # the written file loads safely
    return version


# --- run folders -------------------------------------------------------------------------------
def checkpoint_path(directory: Path, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_loadable(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; broken newer ones are skipped (and reported). A
    checkpoint of an older format, or one that would need unsafe unpickling, stops the search
    with its error: it is no torn file, and skipping it would resume from an older state."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except (OldFormatError, UnsafeCheckpointError):
            raise
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    return None


def elastic_restart_count() -> int:
    """How often torchrun has restarted this worker group: ``TORCHELASTIC_RESTART_COUNT``, 0
    on the first attempt and outside torchrun."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip() or "0"
    try:
        count = int(text)
    except ValueError:
        raise CheckpointError(
            f"TORCHELASTIC_RESTART_COUNT={text!r}: not a whole number; torchrun sets it, so "
            "unset it when not running under torchrun"
        ) from None
    return max(count, 0)


def auto_resume_reason(auto_resume: bool, directory: Path) -> str | None:
    """Why a run resumes without ``--resume``, or None when it starts from iteration 0: torchrun
    restarted it (``TORCHELASTIC_RESTART_COUNT`` > 0) or ``train.auto_resume`` is on, and
    ``directory`` holds checkpoints. Without checkpoints (the first attempt died before its first
    one) the run starts from iteration 0."""
    restarts = elastic_restart_count()
    if not (auto_resume or restarts) or not list_checkpoints(directory):
        return None
    if restarts:
        return f"torchrun restart {restarts} (TORCHELASTIC_RESTART_COUNT)"
    return "train.auto_resume"


def rotate(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and the temporary files of saves that a
    killed process never finished (``atomic_save`` leaves them only when it dies mid-write).
    Only the one process that writes checkpoints may call this."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
    for path in Path(directory).glob(".iter_*.pt.*.tmp"):
        path.unlink(missing_ok=True)
