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

import argparse
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from contrastseg.digest import DIGEST_KEY, digest_problem, sealed
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
    if isinstance(obj, argparse.Namespace):  # what ``checkpoint upgrade`` rewrites
        return plain(dict(vars(obj)), where)
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype"):
        if getattr(obj, "ndim", None) == 0 or not hasattr(obj, "shape"):
            return plain(obj.item(), where)  # a NumPy scalar
        if obj.dtype.kind in "biufc":
            return torch.from_numpy(obj.copy())
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
    """Save ``obj`` (made :func:`plain`; a checkpoint, i.e. a dict with ``format_version``,
    gets its content digest, :func:`contrastseg.digest.sealed`) with torch.save so that
    ``path`` is either the old file or the new one whole."""
    obj = plain(obj)
    if isinstance(obj, dict) and "format_version" in obj:
        obj = sealed(obj)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, save)


# --- reading -----------------------------------------------------------------------------------
def _data_globals() -> list[Any]:
    """Plain data classes that ``checkpoint upgrade`` (and only it) lets the unpickler build, to
    rewrite them as plain types: ``argparse.Namespace`` (attributes set, nothing called) and
    NumPy arrays of numbers (their elements are plain values; an array of objects still needs
    each object's class, which stays refused)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    names = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    return [argparse.Namespace, np.ndarray, *((_reconstruct, n) for n in names)]


def _names(entries: list[Any]) -> set[str]:
    return {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in entries}


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a file's pickle names beyond weights_only's own set and the
    NumPy scalar allow-list (read without unpickling); empty when the file cannot be parsed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file too broken to list is reported as corrupt
        return []
    allowed = allowed_names() | _names(_FORMAT1_GLOBALS)
    return [name for name in names if name not in allowed]


def read_file(path: Path, data_classes: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU after checking the zip records'
    CRC-32s, with format 1's version class allowed; with ``data_classes`` (``checkpoint
    upgrade`` only) also the plain data classes of :func:`_data_globals`. Nothing a file names
    beyond these is ever imported or called: there is no option that allows more.

    Raises ``UnsafeCheckpointError`` when the file needs more, naming what it would import and
    the way on (``checkpoint upgrade`` for plain data classes), and ``CheckpointError`` when it
    is missing, truncated or damaged. Nothing of the file is executed before either error.
    """
    path = check_readable(Path(path))
    allowed: list = list(_FORMAT1_GLOBALS) + (_data_globals() if data_classes else [])
    try:
        return load_weights_only(path, allowed)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken file can fail in many ways
        names = _unsafe_globals(path)
        if not (names or is_refusal(err)):
            raise CheckpointError(
                f"{path}: cannot read checkpoint (truncated or corrupt?): {first_line(err)}"
            ) from err
        data = _names(_data_globals())
        code = [n for n in names if n not in data]
        if names and not code and not data_classes:
            raise UnsafeCheckpointError(
                f"{path}: refused: it holds {sorted(set(names))}, which only arbitrary "
                "unpickling rebuilds here; `contrastseg checkpoint upgrade "
                f"{path} NEW.pt` rewrites it with plain types (a Namespace becomes a dict, a "
                "NumPy array a tensor) without running anything of the file"
            ) from None
        what = f"it would import and call {code}" if code else _weights_only_reason(str(err))
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs arbitrary unpickling ({what}), which can run "
            "any code the file holds; no contrastseg command does that. If you trust the "
            "file, load it where it was written and save its tensors, numbers, strings, lists "
            "and dicts with torch.save"
        ) from None


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
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this contrastseg understands "
            f"({FORMAT_VERSION}); upgrade contrastseg"
        )
    return version


def _check_digest(path: Path, state: dict) -> None:
    """Refuse ``state`` when its digest does not match its contents; a file without a digest
    (written before contrastseg stored one) gets one notice per file and process."""
    problem = digest_problem(state)
    if problem is not None:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: {problem}; use another copy or an earlier "
            "checkpoint (a file edited on purpose: delete its 'digest' entry, then `contrastseg "
            "checkpoint upgrade` writes a copy with a new one)"
        )
    if DIGEST_KEY not in state and str(path) not in _NOTIFIED:
        _NOTIFIED.add(str(path))
        log.warning(
            "%s: written without a content digest (by an older contrastseg); only its zip "
            "checksums were checked. `contrastseg checkpoint upgrade %s NEW.pt` writes a copy "
            "with one",
            path,
            path,
        )


_NOTIFIED: set[str] = set()


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint on the CPU, safely (see :func:`read_file`), and check its content
    digest (:mod:`contrastseg.digest`). A missing, truncated, damaged, foreign or unsafe
    file raises ``CheckpointError``; an older format ``OldFormatError`` with the command that
    converts it. The parts a command uses are checked by
    :mod:`contrastseg.engine.checkpoint_parts`."""
    path = Path(path)
    state = read_file(path)
    # the digest before the header: damage explains whatever else is wrong (and a file without
    # one gets its notice here)
    if isinstance(state, dict):
        _check_digest(path, state)
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
    """A checkpoint of an older format, or holding plain data classes, in the current format of
    plain types (a new dict; ``state`` is not changed). Format 1 -> 2: the projection head moves
    from ``model`` to ``loss`` (:func:`move_projection_to_loss`) and ``processes`` is filled
    with the one process's random state the checkpoint has. Every value becomes a plain type
    (:func:`plain`: a Namespace a dict, a NumPy array a tensor)."""
    version = state.get("format_version")
    if version == FORMAT_VERSION:
        return plain({k: v for k, v in state.items() if k != DIGEST_KEY})
    if version != 1:
        raise CheckpointError(f"format_version {version!r}: no conversion to {FORMAT_VERSION}")
    new = {k: v for k, v in state.items() if k != DIGEST_KEY}
    new["model"], new["loss"] = move_projection_to_loss(state["model"], state["loss"])
    rng = state.get("rng") or {}
    generators = {k: v for k, v in new["loss"].items() if k.endswith("_extra_state")}
    new["processes"] = [{"rng": dict(rng), "loss": generators}]
    new["format_version"] = FORMAT_VERSION
    return plain(new)


def upgrade_file(old: Path, new: Path) -> int:
    """Convert checkpoint ``old`` to the current format and write it to ``new`` with a content
    digest (atomically; ``old`` is never changed, and an existing ``new`` is never
    overwritten). Converts format 1, rewrites plain data classes as plain types
    (:func:`read_file` with ``data_classes``) and adds the digest a file written before
    digests lacks; the digest of a file that has one is checked first. Returns the format
    ``old`` had. A file that needs none of this raises ``CheckpointError``."""
    old, new = Path(old), Path(new)
    if new.exists():
        raise CheckpointError(f"{new}: already exists; give a new file name (nothing written)")
    state = read_file(old, data_classes=True)
    version = _check_header(old, state)
    problem = digest_problem(state)
    if problem is not None:
        raise CheckpointError(f"{old}: corrupt checkpoint: {problem} (nothing written)")
    try:
        converted = upgrade_state(state)
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{old}: cannot convert format {version}: {err}") from err
    if version == FORMAT_VERSION and DIGEST_KEY in state:  # sealed files hold plain types
        raise CheckpointError(
            f"{old}: already format {FORMAT_VERSION} with a content digest; nothing to convert "
            "(nothing written)"
        )
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


def latest_loadable(directory: Path, skipped: list[str] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; broken (torn, damaged) newer ones are skipped, each
    reported in a warning and appended to ``skipped``. A checkpoint of an older format, or one
    that would need unsafe unpickling, stops the search with its error: it is no torn file,
    and skipping it would resume from an older state."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except (OldFormatError, UnsafeCheckpointError):
            raise
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
            if skipped is not None:
                skipped.append(str(err))
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
