"""Read a finished run directory: its config, its val mIoU and its training speed.

A run directory is what ``contrastseg train`` writes (``config.yaml``, ``metrics.jsonl``,
``eval.json``); ``contrastseg eval`` (re)writes ``eval.json``. A run trained with
``train.eval_every`` also names its best checkpoint there (``best``: iteration and mIoU of
``checkpoints/best.pt``), which ``checkpoint="best"`` reads instead of the final evaluation.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from contrastseg.config import ExperimentConfig, load_config
from contrastseg.errors import ContrastSegError
from contrastseg.files import json_lines, read_json, real_path

__all__ = ["CHECKPOINTS", "RunRecord", "load_run", "load_runs", "median_s_per_iter", "read_eval"]

#: Which evaluation of a run counts: the final one (``last``) or that of ``checkpoints/best.pt``.
CHECKPOINTS = ("last", "best")


@dataclass(frozen=True)
class RunRecord:
    """What the results tables need from one run directory."""

    path: Path
    cfg: ExperimentConfig
    miou: float  # a fraction, as in eval.json
    split: str  # the split eval.json was computed on
    s_per_iter: float | None  # None: fewer than two timed records in metrics.jsonl


def read_eval(path: Path, checkpoint: str = "last") -> tuple[float, str | None]:
    """``(mIoU, split)`` of an ``eval.json``; split is None where the file does not name one.
    ``checkpoint="best"``: the mIoU of its ``best`` entry (the best periodic evaluation)."""
    if checkpoint not in CHECKPOINTS:
        raise ContrastSegError(f"checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
    run = path.parent
    if not path.is_file():
        raise ContrastSegError(
            f"{path}: not found, so {run} has no evaluation; run `contrastseg eval "
            f"{run / 'config.yaml'} --checkpoint {run / 'checkpoints'}/iter_NNNNNNN.pt` to write it"
        )
    data = read_json(path, fix="rerun `contrastseg eval` to rewrite it")
    best = data.get("best") if isinstance(data, dict) else None
    if best is not None and not _is_fraction(best.get("mIoU") if isinstance(best, dict) else None):
        raise ContrastSegError(
            f'{path}: field \'best\' must be null or {{"iteration": N, "mIoU": a number in '
            f"[0, 1]}}, got {str(best)[:60]}; rerun `contrastseg eval` to rewrite it"
        )
    if checkpoint == "best":
        best = data.get("best") if isinstance(data, dict) else None
        if not isinstance(best, dict):
            raise ContrastSegError(
                f"{path}: no 'best' entry, so {run} kept no best checkpoint; train with "
                "train.eval_every > 0 to keep one, or use the last checkpoint"
            )
        data = {**data, "mIoU": best.get("mIoU")}
    miou = data.get("mIoU") if isinstance(data, dict) else None
    if not _is_fraction(miou):
        raise ContrastSegError(
            f"{path}: field 'mIoU' must be a number in [0, 1], got {miou!r}; rerun "
            "`contrastseg eval` to rewrite it"
        )
    split = data.get("split")
    return float(miou), split if isinstance(split, str) else None


def _is_fraction(value: object) -> bool:
    """A number (not a bool) in [0, 1]: an mIoU as eval.json stores it."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= 1


def median_s_per_iter(path: Path) -> float | None:
    """Median ``s_per_iter`` of ``metrics.jsonl``, the first timed record left out.

    The first record's interval holds the start-up (data loader, allocator, cuDNN tuning), so it
    is a warm-up and not counted. Records without ``s_per_iter`` are ignored. None when the file
    is missing or has fewer than two timed records.
    """
    if not path.is_file():
        return None
    times: list[float] = []
    for number, record in json_lines(path):
        if not isinstance(record, dict):
            raise ContrastSegError(
                f"{path}, line {number}: a JSON {type(record).__name__}, not a record (an "
                "object); delete or repair that line"
            )
        value = record.get("s_per_iter")
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ContrastSegError(
                f"{path}, line {number}: field 's_per_iter' must be a finite number, "
                f"got {value!r}; delete or repair that line"
            )
        times.append(float(value))
    return statistics.median(times[1:]) if len(times) > 1 else None


def load_run(path: str | Path, checkpoint: str = "last") -> RunRecord:
    """Read ``config.yaml`` (validated), ``eval.json`` and ``metrics.jsonl`` of a run; the
    mIoU of the final evaluation, or with ``checkpoint="best"`` that of the best checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ContrastSegError(f"{path}: not a directory; pass run directories such as runs/NAME")
    config = path / "config.yaml"
    if not config.is_file():
        raise ContrastSegError(
            f"{config}: not found, so {path} is not a run directory; `contrastseg train` "
            "writes config.yaml there"
        )
    if not config.read_bytes().strip():
        raise ContrastSegError(
            f"{config}: empty, so the config of {path} is lost; restore it (the checkpoints "
            "hold it too) or leave this run out"
        )
    cfg = load_config(config)
    miou, split = read_eval(path / "eval.json", checkpoint)
    return RunRecord(
        path=path,
        cfg=cfg,
        miou=miou,
        split=split or cfg.data.val_split,
        s_per_iter=median_s_per_iter(path / "metrics.jsonl"),
    )


def load_runs(
    paths: list[str | Path] | tuple[str | Path, ...], checkpoint: str = "last"
) -> list[RunRecord]:
    """:func:`load_run` for each path; a directory given twice is read once."""
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for p in paths:
        key = real_path(p)
        if key not in seen:
            seen.add(key)
            runs.append(load_run(p, checkpoint))
    return runs
