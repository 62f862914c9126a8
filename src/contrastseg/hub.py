"""Share a trained model as a folder the ecosystem knows: ``model.safetensors`` (the inference
model's weights), ``config.json`` (all it takes to rebuild and use it) and a ``README.md`` model
card, loadable in one line from disk or from the Hugging Face Hub::

    from contrastseg import save_pretrained, from_pretrained
    save_pretrained("runs/demo/checkpoints/iter_0000800.pt", "models/demo")
    model = from_pretrained("models/demo")          # or "owner/name" on the Hub
    ids = model.predict(rgb)                         # (H, W, 3) uint8 RGB -> (H, W) class ids

The folder's format and checks are :mod:`contrastseg.engine.pretrained`'s; this module writes
folders, their model card, and gives the loaded model its methods.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ExperimentConfig
from contrastseg.digest import sealed
from contrastseg.engine.inference import eval_json_path, load_trained_model, predict_ids
from contrastseg.engine.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    FOLDER_FORMAT,
    FORMAT_KEY,
    WEIGHTS_FILE,
    file_sha256,
    inference_weights,
)
from contrastseg.errors import CheckpointError, OutputError
from contrastseg.files import atomic_write_folder, read_json
from contrastseg.models import Segmentor

#: Sections of a run's config that describe the machine it ran on, not the recipe.
_MACHINE_KEYS = {"output": None, "data": ("root", "num_workers")}
_METRICS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")


class PretrainedModel(nn.Module):
    """A model loaded from a model folder (or a checkpoint): backbone and decode head.

    ``forward(x: (B, 3, H, W) normalised float32) -> (B, K, H, W)`` logits at the input size
    (bilinear, with the corner alignment the model was evaluated with). :meth:`predict` takes a
    uint8 RGB image and returns class ids. Attributes: ``class_names`` (K names), ``palette``
    ((K, 3) uint8), ``mean`` and ``std`` (RGB, of images scaled to [0, 1]), ``config`` (the
    typed config: ``model``, ``data.mean``/``std``, ``eval``) and ``info`` (the content of
    ``config.json``).
    """

    def __init__(self, segmentor: Segmentor, config: ExperimentConfig, info: dict) -> None:
        super().__init__()
        self.backbone = segmentor.backbone
        self.head = segmentor.head
        self._segmentor = [segmentor]  # a list: not registered twice as a submodule
        self.config = config
        self.info = info
        self.class_names: list[str] = list(info["class_names"])
        self.palette = np.asarray(info["palette"], dtype=np.uint8)
        self.mean = list(config.data.mean)
        self.std = list(config.data.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.head(self.backbone(x))["seg"]
        return F.interpolate(
            seg, size=x.shape[-2:], mode="bilinear", align_corners=self.config.eval.align_corners
        )

    @torch.no_grad()
    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 class ids: single-scale whole-image inference,
        as ``contrastseg predict`` does."""
        return predict_ids(self._segmentor[0], self.config, rgb)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this model as a model folder (see :func:`save_pretrained`)."""
        weights = inference_weights(self._segmentor[0])
        return write_folder(folder, weights, self.info)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload this model's folder to the Hub repository ``repo_id`` (created when
        missing); returns the commit's address. Needs the network and a write token."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, private=private, token=token)


def from_pretrained(source: str | Path, device: str | torch.device = "cpu") -> PretrainedModel:
    """Load a model folder (``model.safetensors`` + ``config.json``), a Hub model id
    (``owner/name`` or ``hf-hub:owner/name@revision``; downloaded into the Hugging Face cache,
    or read from it offline) or a training checkpoint, as a :class:`PretrainedModel` in eval
    mode on ``device``. Nothing is unpickled from a folder; a missing, damaged or malformed
    file raises ``CheckpointError`` with one line naming it."""
    segmentor, cfg, state = load_trained_model(source, device)
    info = state.get("folder_config") or folder_info(cfg, state, results=None)
    return PretrainedModel(segmentor, cfg, info).eval()


def save_pretrained(
    checkpoint: str | Path, folder: str | Path, results: Path | None = None
) -> Path:
    """Write the inference model of ``checkpoint`` (a training checkpoint, a model folder or a
    Hub id) as the model folder ``folder``: ``model.safetensors`` (backbone and decode head; no
    auxiliary or projection head, memory or optimiser), ``config.json`` and a ``README.md``
    model card. The evaluation in ``config.json`` and the card is ``results`` (an
    ``eval.json``), by default the run's ``eval.json`` when it scored this checkpoint's
    iteration. ``folder`` must be new or empty; it appears whole or not at all."""
    folder = check_new_folder(Path(folder))
    segmentor, cfg, state = load_trained_model(checkpoint, "cpu")
    info = state.get("folder_config")
    if info is None:
        info = folder_info(cfg, state, run_results(checkpoint, state, results))
    elif results is not None:
        info = {**info, "evaluation": {**info["evaluation"], "results": _results(results)}}
    return write_folder(folder, inference_weights(segmentor), info)


def default_folder(checkpoint: str | Path) -> Path:
    """Where ``export --format hub`` writes without ``--out``: beside the checkpoint,
    ``iter_0000800.pt`` -> ``iter_0000800_model/`` (a folder or Hub id: ``NAME_model/`` in the
    current folder)."""
    path = Path(checkpoint)
    if path.is_file():
        return path.with_name(path.stem + "_model")
    return Path(Path(str(checkpoint).split("@")[0]).name + "_model")


def check_new_folder(folder: Path) -> Path:
    """``folder`` when it does not exist or is an empty folder; ``OutputError`` otherwise."""
    if folder.is_symlink() and not folder.exists():
        raise OutputError(f"{folder}: a dangling symbolic link; give a new folder")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; a model folder goes there: give a new folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(
            f"{folder}: already holds files; give a new or empty folder (nothing is overwritten)"
        )
    return folder


def run_results(checkpoint: str | Path, state: dict, results: Path | None) -> dict | None:
    """The evaluation to record: ``results`` (an eval.json) when given, else the checkpoint's
    run's ``eval.json`` when it scored this checkpoint's iteration, else None."""
    if results is not None:
        return _results(results)
    if not Path(checkpoint).is_file():
        return None
    path = eval_json_path(Path(checkpoint))
    if not path.is_file():
        return None
    found = _results(path)
    return found if found.get("iteration") == state.get("iteration") else None


def _results(path: Path) -> dict:
    data = read_json(Path(path), CheckpointError)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), float) for k in _METRICS):
        raise CheckpointError(f"{path}: not an eval.json (the metrics {list(_METRICS)} missing)")
    keep = (*_METRICS, "per_class_iou", "per_class_acc", "split", "iteration")
    return {k: data[k] for k in keep if k in data}


def recipe(config_tree: dict) -> dict:
    """A run's config without the model and eval sections (stored on their own) and without
    what describes the machine it ran on (``output``, ``data.root``, ``data.num_workers``,
    the backbone weights' path)."""
    tree = json.loads(json.dumps(config_tree))  # a deep copy of plain data
    for section in ("model", "eval"):
        tree.pop(section, None)
    for section, keys in _MACHINE_KEYS.items():
        if keys is None:
            tree.pop(section, None)
        elif isinstance(tree.get(section), dict):
            for key in keys:
                tree[section].pop(key, None)
    return tree


def folder_info(cfg: ExperimentConfig, state: dict, results: dict | None) -> dict:
    """The content of ``config.json`` for a model of config ``cfg`` with checkpoint parts
    ``state`` and the evaluation ``results`` (or None); the ``weights`` checksum and the
    digest are added by :func:`write_folder`."""
    from contrastseg import __version__

    names = list(state["class_names"])
    model = cfg.model.model_dump(mode="json")
    model["backbone"]["weights"] = None  # a path of the training machine; the folder has them
    model["backbone"]["pretrained"] = False
    stored = state.get("config") if isinstance(state.get("config"), dict) else {}
    run = recipe(stored)
    data = run.get("data", {}) if isinstance(run.get("data"), dict) else {}
    return {
        FORMAT_KEY: FOLDER_FORMAT,
        "library": "contrastseg",
        "model": model,
        "input": {
            "channels": "RGB",
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "normalisation": "x = (rgb / 255 - mean) / std, per channel",
            "mean": [float(v) for v in cfg.data.mean],
            "std": [float(v) for v in cfg.data.std],
        },
        "output": {
            "shape": ["batch", len(names), "height", "width"],
            "meaning": "class logits at the input resolution; argmax over axis 1 = class id",
        },
        "num_classes": len(names),
        "class_names": names,
        "palette": [[int(c) for c in colour] for colour in state["palette"]][: len(names)],
        "evaluation": {"procedure": cfg.eval.model_dump(mode="json"), "results": results},
        "training": {
            "data": data.get("name"),
            "iterations": state.get("iteration"),
            "recipe": run,
        },
        "source": {"contrastseg": __version__, "torch": str(torch.__version__)},
    }


def write_folder(folder: str | Path, weights: dict[str, torch.Tensor], info: dict) -> Path:
    """Write ``weights`` (safetensors), ``info`` (with the weights' SHA-256, sealed with a
    content digest) and the model card into ``folder`` (new or empty): all three are written
    into a hidden folder beside it, flushed, and renamed into place, so ``folder`` appears whole
    or not at all."""
    from safetensors.torch import save_file

    folder = check_new_folder(Path(folder))

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        # as JSON reads it back (tuples become lists), so that the digest is that of the file
        sealed_info = json.loads(json.dumps({k: v for k, v in info.items() if k != "digest"}))
        sealed_info["weights"] = {"file": WEIGHTS_FILE, "sha256": file_sha256(tmp / WEIGHTS_FILE)}
        sealed_info = sealed(sealed_info)
        text = json.dumps(sealed_info, indent=2) + "\n"
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(sealed_info, folder.name), encoding="utf-8")

    atomic_write_folder(folder, write)
    return folder


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Upload a model folder's three files to the Hub repository ``repo_id`` (a model repo,
    created when missing); returns the commit's address."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE],
        commit_message="contrastseg model folder",
    )
    return str(getattr(info, "commit_url", info))


# --- the model card ------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) and value == value else "n/a"


def _loss_terms(loss: dict) -> list[str]:
    """The loss terms a recipe trains with, with their weights."""
    terms = []
    ce = loss.get("ce", {})
    if isinstance(ce, dict) and ce.get("weight", 0):
        kind = "OHEM cross-entropy" if ce.get("ohem") else "cross-entropy"
        terms.append(f"{kind} (weight {ce['weight']}, auxiliary {ce.get('aux_weight')})")
    for name, label in (
        ("contrast", "pixel contrast"),
        ("lovasz", "Lovász-softmax"),
        ("rmi", "RMI"),
        ("aaf", "AAF"),
    ):
        term = loss.get(name, {})
        if isinstance(term, dict) and term.get("enabled"):
            extra = ""
            if name == "contrast":
                memory = term.get("memory", {})
                extra = (
                    ", with memory" if isinstance(memory, dict) and memory.get("enabled") else ""
                )
            terms.append(f"{label} (weight {term.get('weight')}{extra})")
    return terms


def model_card(info: dict, title: str) -> str:
    """The ``README.md`` of a model folder, from its ``config.json`` content ``info``: Hub
    metadata, what the model is, how to load it, its input, classes, training recipe and
    evaluation."""
    model = info["model"]
    backbone = model.get("backbone", {}).get("name")
    head = model.get("head")
    classifier = model.get("classifier", "conv")
    training = info.get("training") or {}
    run = training.get("recipe") or {}
    data = run.get("data") or {}
    train = run.get("train") or {}
    optim = run.get("optim") or {}
    names = info["class_names"]
    evaluation = info["evaluation"]
    results = evaluation.get("results")
    procedure = evaluation.get("procedure") or {}
    lines = [
        "---",
        "library_name: contrastseg",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- semantic-segmentation",
        "- contrastseg",
        "- pytorch",
        "- safetensors",
        f"- {head}",
        "---",
        "",
        f"# {title}",
        "",
        f"A semantic segmenter: {head} decode head"
        + (" with a prototype classifier" if classifier == "prototype" else "")
        + f" on a {backbone} backbone, {len(names)} classes, trained with contrastseg"
        + (f" on `{training['data']}`" if training.get("data") else "")
        + (
            f" for {training['iterations']} iterations."
            if isinstance(training.get("iterations"), int)
            else "."
        ),
        "",
        "## Use",
        "",
        "```python",
        "from contrastseg import from_pretrained",
        "",
        f'model = from_pretrained("{title}")  # this folder, or its Hub id',
        "ids = model.predict(rgb)  # (H, W, 3) uint8 RGB -> (H, W) uint8 class ids",
        "logits = model(x)  # x: (B, 3, H, W) normalised as below -> (B, K, H, W)",
        "```",
        "",
        "```bash",
        f"contrastseg predict --checkpoint {title} IMAGES... --out predictions/",
        f"contrastseg eval CONFIG.yaml --checkpoint {title}",
        "```",
        "",
        "## Input",
        "",
        "RGB images scaled to [0, 1], then normalised per channel: `x = (rgb / 255 - mean) / std`.",
        "",
        "| | R | G | B |",
        "|---|---|---|---|",
        "| mean | " + " | ".join(f"{v:.4g}" for v in info["input"]["mean"]) + " |",
        "| std | " + " | ".join(f"{v:.4g}" for v in info["input"]["std"]) + " |",
        "",
        "## Classes",
        "",
        "| id | name | colour |",
        "|---|---|---|",
    ]
    for i, (name, colour) in enumerate(zip(names, info["palette"], strict=False)):
        lines.append(f"| {i} | {name} | {tuple(colour)} |")
    lines += ["", "## Training recipe", ""]
    if run:
        rows = [
            ("data set", data.get("name")),
            ("crop size", data.get("crop_size")),
            ("iterations", train.get("iters")),
            ("batch size", train.get("batch_size")),
            ("learning rate", optim.get("lr")),
            ("weight decay", optim.get("weight_decay")),
            ("loss", "; ".join(_loss_terms(run.get("loss") or {})) or None),
            ("mixed precision", train.get("amp")),
        ]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
        lines += ["", "The whole recipe is `training.recipe` in `config.json`."]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Evaluation", ""]
    steps = [f"mode {procedure.get('mode', 'whole')}"]
    steps.append(f"scales {procedure.get('scales', [1.0])}")
    steps.append("flip" if procedure.get("flip") else "no flip")
    lines.append("Procedure: " + ", ".join(steps) + " (`evaluation.procedure` in `config.json`).")
    lines.append("")
    if results:
        where = f" on the `{results['split']}` split" if results.get("split") else ""
        lines += [f"Results{where} (%):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_pct(results.get(k))} |" for k in _METRICS]
        per_class = results.get("per_class_iou")
        if isinstance(per_class, list) and len(per_class) == len(names):
            lines += ["", "| class | IoU (%) |", "|---|---|"]
            lines += [f"| {n} | {_pct(v)} |" for n, v in zip(names, per_class, strict=True)]
    else:
        lines.append("No evaluation of this checkpoint was recorded.")
    lines += [
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: backbone and decode head (no training-only heads).",
        f"- `{CONFIG_FILE}`: architecture, classes, input convention, evaluation, recipe; it "
        "records the SHA-256 of the weights and a digest of itself, checked on every load.",
        "",
    ]
    return "\n".join(lines)
