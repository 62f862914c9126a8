"""What a resumed run may change in its config, and the record of what it changed.

A run folder keeps the config its first iterations ran with (``config.yaml``, written once when
the run starts from iteration 0 and never rewritten) and, one JSON line per resume that changed
something, ``config_changes.jsonl``::

    {"iteration": 800, "changes": {"train.iters": {"from": 800, "to": 1600}}, "reason": "--resume"}

The config in effect from iteration ``n`` on is ``config.yaml`` with every change recorded up
to ``n`` applied. ``--resume`` (and an automatic resume) compares the new resolved config with
it, key by key: a key of :data:`SAFE_TO_CHANGE` may differ and is recorded with the iteration
from which it applies; any other difference would change the trajectory of the remaining
iterations (model, data, augmentation, losses, optimiser, batch, seed, precision, device,
threads, ...) and is refused, one line per key (docs/training.md, "Resuming with another
config").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contrastseg.config import ExperimentConfig, flatten, load_config
from contrastseg.errors import ConfigError
from contrastseg.files import json_lines

__all__ = [
    "CHANGES_FILE",
    "SAFE_TO_CHANGE",
    "check_resume_config",
    "check_run_folder",
    "effective_config",
    "record_changes",
]

#: The run folder's log of accepted changes.
CHANGES_FILE = "config_changes.jsonl"

#: Keys a resumed run may change (a trailing dot: every key of that section). None of them
#: changes a weight or a random draw of the iterations still to run, except ``train.iters``,
#: which sets where the poly schedule ends (the purpose of changing it) and is recorded like
#: the others. Not here: ``train.eval_every``, since each evaluation draws once from torch's
#: global random stream (the data loader's seed), which dropout draws from too.
SAFE_TO_CHANGE: tuple[str, ...] = (
    "train.iters",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.auto_resume",
    "data.root",
    "data.val_split",
    "data.num_workers",
    "data.max_image_pixels",
    "eval.",
    "output.root",
    "output.name",
)


def is_safe(key: str) -> bool:
    """Whether ``key`` (dotted) may change when a run resumes."""
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def _read_changes(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, record in json_lines(path, ConfigError):
        if not isinstance(record, dict) or not isinstance(record.get("changes"), dict):
            raise ConfigError(
                f'{path}, line {number}: expected {{"iteration": N, "changes": {{...}}}}'
            )
        records.append(record)
    return records


def effective_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config in effect now (flattened): ``config.yaml`` with the recorded changes
    applied; None when the folder has no ``config.yaml``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    flat = flatten(load_config(path).to_dict())
    for record in _read_changes(run_dir / CHANGES_FILE):
        for key, change in record["changes"].items():
            flat[key] = change.get("to") if isinstance(change, dict) else change
    return flat


def check_resume_config(
    cfg: ExperimentConfig, recorded: dict[str, Any], source: str
) -> dict[str, dict[str, Any]]:
    """Compare ``cfg`` with the run's ``recorded`` config (flattened). Returns the accepted
    changes ``{key: {"from": old, "to": new}}``; raises ConfigError with one line per key whose
    change is refused, each naming ``source``."""
    new = flatten(cfg.to_dict())
    changes: dict[str, dict[str, Any]] = {}
    refused: list[str] = []
    for key in sorted(set(new) | set(recorded)):
        old_value, new_value = recorded.get(key), new.get(key)
        if old_value == new_value:
            continue
        if is_safe(key):
            changes[key] = {"from": old_value, "to": new_value}
        else:
            refused.append(
                f"{source}: --resume with {key} = {json.dumps(new_value)}, but the run so far "
                f"used {json.dumps(old_value)}; that would change the remaining iterations "
                "(resume with the recorded value, or start a new run with another output.name)"
            )
    if refused:
        raise ConfigError("\n".join(refused))
    return changes


def check_run_folder(cfg: ExperimentConfig) -> tuple[dict[str, Any] | None, dict]:
    """``(recorded, changes)`` for resuming ``cfg`` in its run folder: the effective recorded
    config (None without ``config.yaml``) and the accepted changes; ConfigError for refused
    ones. Cheap (no torch), so the command line calls it before building anything."""
    recorded = effective_config(cfg.run_dir)
    if recorded is None:
        return None, {}
    return recorded, check_resume_config(cfg, recorded, str(cfg.run_dir / "config.yaml"))


def record_changes(
    run_dir: Path, iteration: int, changes: dict[str, dict[str, Any]], reason: str
) -> Path:
    """Append one line to ``config_changes.jsonl``: the changes that apply from ``iteration``."""
    path = run_dir / CHANGES_FILE
    line = json.dumps({"iteration": iteration, "changes": changes, "reason": reason})
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    return path
