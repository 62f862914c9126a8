"""Model folders: a trained model as ``model.safetensors`` + ``config.json`` (+ ``README.md``),
the layout the Hugging Face Hub, timm and transformers share models in.

This module reads such a folder, or a Hub repository holding one, back into the model
``predict``, ``eval`` and ``export`` use; :mod:`contrastseg.hub` writes them. Nothing in a
folder is unpickled or run: the weights are safetensors (a JSON header and raw tensor bytes),
the rest JSON. ``config.json`` carries a SHA-256 of ``model.safetensors`` and a content digest
of itself (:mod:`contrastseg.digest`), so that a flipped byte in either file is refused, with
one line naming the file, like a missing file or field.

``config.json`` (format 1; docs/deployment.md lists every field):

- ``model``: the ``model`` section of the run's config (architecture; rebuilds the network);
- ``input``: channel order, value range, ``mean`` and ``std`` of the normalisation;
- ``num_classes``, ``class_names``, ``palette``;
- ``evaluation``: ``procedure`` (the ``eval`` section the model is scored with) and ``results``
  (the run's evaluation of this checkpoint, or null);
- ``training``: the data set's name, the iterations and the recipe (the rest of the run's
  config, without paths of the machine it ran on);
- ``weights``: ``{"file": "model.safetensors", "sha256": ...}``; ``digest``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
from pathlib import Path
from typing import Any

import torch

from contrastseg.config import ExperimentConfig, validate_config
from contrastseg.digest import DIGEST_KEY, digest_problem
from contrastseg.engine.checkpoint_parts import (
    check_channels,
    check_class_names,
    check_finite,
    check_palette,
    check_weights_fit,
)
from contrastseg.errors import CheckpointError, ConfigError, one_line
from contrastseg.files import parse_json
from contrastseg.models import Segmentor, build_model

log = logging.getLogger("contrastseg")

FOLDER_FORMAT = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
#: The files a Hub download fetches (nothing else of a repository is read).
FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
CONFIG_MAX_BYTES = 1 << 20  # 255 class names, colours and a recipe take a few KiB
FORMAT_KEY = "contrastseg_model_format"
HUB_PREFIX = "hf-hub:"
#: ``owner/name`` as the Hub spells a repository (letters, digits, ``-``, ``_``, ``.``).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".onnx", ".json", ".yaml")
_REQUIRED = ("model", "input", "num_classes", "class_names", "palette", "evaluation")

_NOTIFIED: set[str] = set()


def hub_id(source: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` names a Hub repository: ``hf-hub:owner/name``
    (``@revision`` optional), or a bare ``owner/name`` where no such local path exists; else
    None (a local file or folder)."""
    text = str(source)
    explicit = text.startswith(HUB_PREFIX)
    if not explicit and (Path(text).exists() or Path(text).is_symlink()):
        return None
    name, _, revision = text.removeprefix(HUB_PREFIX).partition("@")
    if not explicit and name.lower().endswith(_FILE_SUFFIXES):
        return None  # a missing checkpoint file, reported as such by its reader
    if _REPO_ID.fullmatch(name) and ".." not in name:
        return name, revision or None
    if explicit:
        raise CheckpointError(
            f"{text}: not a Hub model id; write {HUB_PREFIX}OWNER/NAME or "
            f"{HUB_PREFIX}OWNER/NAME@REV"
        )
    return None


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of the Hub repository ``repo_id`` at ``revision`` (default: its main
    branch), downloaded into the Hugging Face cache when it is not there already (offline, with
    ``HF_HUB_OFFLINE=1``, the cached copy); only :data:`FOLDER_FILES` are fetched.
    ``CheckpointError`` naming the id when the Hub cannot give it."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(FOLDER_FILES),
            library_name="contrastseg",
        )
    except Exception as err:  # noqa: BLE001 - network, authentication, cache: all one line
        reason = one_line(err).split(". ")[0][:160] or type(err).__name__
        raise CheckpointError(
            f"{repo_id}: no such local file or folder, and the Hugging Face Hub did not give it "
            f"as a model ({type(err).__name__}: {reason})"
        ) from None
    return Path(folder)


def resolve_folder(source: str | Path) -> Path | None:
    """The model folder ``source`` names (a local folder, or a Hub repository downloaded by
    :func:`download`), or None when ``source`` is a file path (a checkpoint)."""
    found = hub_id(source)
    if found is not None:
        return download(*found)
    return Path(source) if Path(source).is_dir() else None


def _regular_file(folder: Path, name: str, max_bytes: int | None = None) -> Path:
    path = folder / name
    if not path.exists() and not any((folder / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        listed = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(
            f"{folder}: is a folder, not a checkpoint file or a model folder (no {CONFIG_FILE}, "
            f"no {WEIGHTS_FILE}; it holds {listed}); give a checkpoint file or a model folder"
        )
    if not path.exists():
        listed = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        raise CheckpointError(
            f"{path}: missing; a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(`contrastseg export CKPT --format hub` writes them; the folder holds {listed})"
        )
    if not stat.S_ISREG(path.stat().st_mode):
        raise CheckpointError(f"{path}: not a regular file (a folder, pipe or device)")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{path}: {size:,} bytes, more than a model folder's {name} holds")
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    return path


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _field(path: Path, info: dict, key: str, kind: type, what: str) -> Any:
    value = info.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: field {key!r} = {str(value)[:60]} is not {what}")
    return value


def read_folder_config(folder: Path) -> dict:
    """``folder/config.json``, checked: JSON object of format :data:`FOLDER_FORMAT` with every
    field of the module docstring; its digest when it has one (a notice when not).
    ``CheckpointError`` naming the file and the field otherwise."""
    path = _regular_file(folder, CONFIG_FILE, CONFIG_MAX_BYTES)
    try:
        info = parse_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: a JSON {type(info).__name__}, not an object")
    version = info.get(FORMAT_KEY)
    if type(version) is not int:
        raise CheckpointError(
            f"{path}: no {FORMAT_KEY!r} field; not the config.json of a contrastseg model folder"
        )
    if version != FOLDER_FORMAT:
        raise CheckpointError(
            f"{path}: model folder format {version}; this contrastseg reads format "
            f"{FOLDER_FORMAT} (a newer contrastseg wrote it? upgrade contrastseg)"
        )
    problem = digest_problem(info)
    if problem is not None:
        raise CheckpointError(
            f"{path}: {problem} (to accept an intended edit, delete its {DIGEST_KEY!r} field)"
        )
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise CheckpointError(f"{path}: lacks the fields {missing}")
    _field(path, info, "model", dict, "an object (the model section of a config)")
    inp = _field(path, info, "input", dict, "an object")
    check_channels(path, inp.get("mean"), "input.mean")
    check_channels(path, inp.get("std"), "input.std")
    if inp.get("channels", "RGB") != "RGB":
        raise CheckpointError(
            f"{path}: field input.channels = {str(inp['channels'])[:20]!r}; contrastseg models "
            "read RGB"
        )
    names = check_class_names(path, info["class_names"])
    count = _field(path, info, "num_classes", int, "an integer")
    if count != len(names):
        raise CheckpointError(
            f"{path}: num_classes = {count}, but class_names lists {len(names)} classes"
        )
    check_palette(path, info["palette"], len(names))
    evaluation = _field(path, info, "evaluation", dict, "an object")
    if not isinstance(evaluation.get("procedure", {}), dict):
        raise CheckpointError(f"{path}: field evaluation.procedure is not an object")
    _check_results(path, evaluation.get("results"), len(names))
    _check_training(path, info.get("training"))
    weights = info.get("weights", {})
    if not isinstance(weights, dict) or weights.get("file", WEIGHTS_FILE) != WEIGHTS_FILE:
        raise CheckpointError(
            f"{path}: field 'weights' = {str(weights)[:60]} is not "
            f'{{"file": "{WEIGHTS_FILE}", "sha256": HEX}}'
        )
    sha = weights.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{path}: field weights.sha256 = {str(sha)[:70]!r} is not 64 hex")
    unchecked = [
        what
        for what, ok in (
            (f"no {DIGEST_KEY!r} field: its own content", DIGEST_KEY in info),
            (f"no weights.sha256: {WEIGHTS_FILE}", sha),
        )
        if not ok
    ]
    if unchecked and str(path) not in _NOTIFIED:
        _NOTIFIED.add(str(path))
        log.warning(
            "%s: %s could not be checked for damage (`contrastseg export FOLDER --format hub "
            "--out NEW` writes a copy with both checks)",
            path,
            "; ".join(unchecked),
        )
    return info


def _number_or_null(value: Any) -> bool:
    return value is None or type(value) in (int, float)


def _check_results(path: Path, results: Any, num_classes: int) -> None:
    """``evaluation.results``: null, or an object of metrics (numbers or null), per-class
    lists of one number (or null) per class, and the ``split`` and ``iteration`` scored."""
    if results is None:
        return
    if not isinstance(results, dict):
        raise CheckpointError(f"{path}: field evaluation.results is not an object or null")
    for key, value in results.items():
        if key in ("per_class_iou", "per_class_acc"):
            ok = isinstance(value, list) and len(value) == num_classes
            ok = ok and all(_number_or_null(v) for v in value)
            rule = f"{num_classes} numbers (one per class)"
        elif key == "split":
            ok, rule = isinstance(value, str), "a split name"
        elif key == "iteration":
            ok, rule = value is None or type(value) is int, "an integer"
        else:
            ok, rule = _number_or_null(value), "a number"
        if not ok:
            raise CheckpointError(
                f"{path}: field evaluation.results.{key} = {str(value)[:60]} is not {rule}"
            )


def _check_training(path: Path, training: Any) -> None:
    """``training`` (informational): absent, or an object whose ``data`` is a name or null,
    ``iterations`` an integer or null and ``recipe`` an object of config sections."""
    if training is None:
        return
    if not isinstance(training, dict):
        raise CheckpointError(f"{path}: field 'training' is not an object")
    data, iterations = training.get("data"), training.get("iterations")
    recipe = training.get("recipe", {})
    if not (data is None or isinstance(data, str)):
        raise CheckpointError(f"{path}: field training.data = {str(data)[:60]} is not a name")
    if not (iterations is None or type(iterations) is int):
        raise CheckpointError(
            f"{path}: field training.iterations = {str(iterations)[:60]} is not an integer"
        )
    if not isinstance(recipe, dict) or not all(isinstance(v, dict) for v in recipe.values()):
        raise CheckpointError(
            f"{path}: field training.recipe is not an object of config sections (objects)"
        )


def folder_config(path: Path, info: dict) -> ExperimentConfig:
    """The typed config a folder's model is rebuilt and evaluated with: its ``model`` section,
    ``input`` mean and std, and ``evaluation.procedure``; ``CheckpointError`` naming the file
    and the key otherwise."""
    tree = {
        "model": info["model"],
        "data": {"mean": info["input"]["mean"], "std": info["input"]["std"]},
        "eval": info["evaluation"].get("procedure", {}),
    }
    try:
        return validate_config(tree, str(path))
    except ConfigError as err:
        text = "; ".join(one_line(line) for line in str(err).splitlines())
        text = text.replace("key 'eval.", "key 'evaluation.procedure.")
        raise CheckpointError(text.replace("key 'data.", "key 'input.")) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``CheckpointError`` naming it when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({one_line(err)[:200]})"
        ) from None


def read_folder(folder: Path) -> tuple[Segmentor, ExperimentConfig, dict]:
    """Rebuild the model of a model folder, in eval mode on the CPU, with its config (model,
    input normalisation, evaluation procedure) and a state of the parts a checkpoint would give
    (``class_names``, ``palette``, ``iteration``, ``config`` = the training recipe). Every
    problem (a missing or damaged file, a missing or malformed field, weights that do not fit
    or are not finite) raises ``CheckpointError`` with one line naming the file."""
    folder = Path(folder)
    info = read_folder_config(folder)
    config_path = folder / CONFIG_FILE
    cfg = folder_config(config_path, info)
    weights_path = _regular_file(folder, WEIGHTS_FILE)
    sha = info.get("weights", {}).get("sha256")
    if sha is not None and file_sha256(weights_path) != sha:
        raise CheckpointError(
            f"{weights_path}: its SHA-256 differs from the one {CONFIG_FILE} records: the file "
            "is corrupt, truncated or was replaced"
        )
    weights = read_weights(weights_path)
    check_finite(weights_path, weights)
    names = list(info["class_names"])
    try:
        model = build_model(cfg.model, len(names), backbone_weights=False)
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: field 'model': {one_line(err)[:300]}") from None
    model.aux = None  # training only; a folder holds the inference model
    check_weights_fit(weights_path, weights, model)
    _fill_extra_state(model, weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{weights_path}: does not fit the model of {CONFIG_FILE}: {one_line(err)[:300]}"
        ) from None
    training = info.get("training") or {}
    state = {
        "class_names": names,
        "palette": [list(c) for c in info["palette"]],
        "iteration": training.get("iterations"),
        "config": training.get("recipe", {}),
        "folder_config": info,
    }
    return model.eval(), cfg, state


def _fill_extra_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """A module's ``_extra_state`` (the prototype classifier's generator, which only training
    draws from) is not in a folder; the fresh model's own stands in for it."""
    for name, value in model.state_dict().items():
        if name.endswith("._extra_state") or name == "_extra_state":
            weights.setdefault(name, value)


def inference_weights(model: Segmentor) -> dict[str, torch.Tensor]:
    """What a folder stores of ``model``: the backbone's and decode head's tensors (no
    auxiliary head, no ``_extra_state``), each contiguous and owning its memory (safetensors
    stores no shared or strided tensors)."""
    return {
        name: value.detach().to("cpu").contiguous().clone()
        for name, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
        and not name.startswith("aux.")
        and not name.endswith("_extra_state")
    }
