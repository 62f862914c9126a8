"""Checkpoint files: atomic writes, versioned contents, loading with clear errors, rotation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from contrastseg.errors import CheckpointError
from contrastseg.files import atomic_write

FORMAT_VERSION = 1
_NAME = re.compile(r"^iter_(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """Save ``obj`` with torch.save so that ``path`` is either the old file or the new one whole."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, save)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint on the CPU; a missing, truncated or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a broken file can fail in many ways
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt?): {err}"
        ) from err
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a contrastseg checkpoint (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} is newer than this "
            f"contrastseg understands ({FORMAT_VERSION}); upgrade contrastseg"
        )
    return state


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
    """The newest checkpoint that loads; broken newer ones are skipped (and reported)."""
    import logging

    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            logging.getLogger(__name__).warning("skipping unreadable checkpoint: %s", err)
    return None


def rotate(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and the temporary files of saves that a
    killed process never finished (``atomic_save`` leaves them only when it dies mid-write).
    Only the one process that writes checkpoints may call this."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
    for path in Path(directory).glob(".iter_*.pt.*.tmp"):
        path.unlink(missing_ok=True)
