"""Shared figure helpers: legend layout, writing a figure to files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from contrastseg.errors import ContrastSegError

FORMATS = (".png", ".pdf")


def legend_columns(labels: Sequence[str], width_in: float, fontsize: float = 9.0) -> int:
    """How many legend entries of ``labels`` fit side by side in ``width_in`` inches."""
    if not labels:
        return 1
    # Marker, gaps and text at about 0.6 em per character.
    entry_in = (3.0 + 0.6 * max(len(s) for s in labels)) * fontsize / 72.0
    return max(1, min(len(labels), int(width_in // entry_in)))


def save_figure(fig, stem: Path, suffixes: Sequence[str] = FORMATS, dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<stem><suffix>`` for each suffix (``.png``, ``.pdf``), creating the
    folder; returns the paths in the order of ``suffixes``. ``stem`` keeps any dots it has."""
    stem = Path(stem)
    bad = [s for s in suffixes if s not in FORMATS]
    if bad:
        raise ContrastSegError(f"figure formats {bad} are not supported; use {list(FORMATS)}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}{s}" for s in suffixes]
    for path in paths:
        try:
            fig.savefig(path, dpi=dpi)
        except OSError as err:
            raise ContrastSegError(f"{path}: cannot write the figure ({err})") from err
    return paths
