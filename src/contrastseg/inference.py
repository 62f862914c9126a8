"""Using a trained checkpoint: evaluate it on a split, or predict masks for image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contrastseg.config import ExperimentConfig
from contrastseg.data import colorize, load_image
from contrastseg.engine.builders import build_eval_dataset
from contrastseg.engine.checkpoint import load_checkpoint
from contrastseg.engine.evaluator import evaluate, format_table, write_eval_json
from contrastseg.engine.runtime import resolve_device
from contrastseg.errors import CheckpointError, DataError
from contrastseg.models import Segmentor, build_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_trained_model(
    path: Path, device: str | torch.device = "cpu", with_projection: bool = False
) -> tuple[Segmentor, ExperimentConfig, dict]:
    """Rebuild the model of a checkpoint in eval mode: without the projection head, or with it
    (``with_projection``) when the checkpoint has one (it was trained with pixel contrast)."""
    state = load_checkpoint(Path(path))
    cfg = ExperimentConfig.model_validate(state["config"])
    num_classes = len(state["class_names"])
    keep = with_projection and any(k.startswith("projection.") for k in state["model"])
    model = build_model(cfg.model, num_classes, with_projection=keep, backbone_weights=False)
    weights = {k: v for k, v in state["model"].items() if keep or not k.startswith("projection.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model of its config: {err}") from err
    device = resolve_device(str(device)) if isinstance(device, str) else device
    return model.to(device).eval(), cfg, state


def evaluate_checkpoint(
    cfg: ExperimentConfig,
    checkpoint: Path,
    split: str | None = None,
    out: Path | None = None,
    print_table: bool = True,
) -> dict:
    """Evaluate ``checkpoint`` on a split of the data ``cfg`` describes; writes ``eval.json``."""
    model, _, state = load_trained_model(checkpoint, cfg.train.device)
    device = next(model.parameters()).device
    dataset = build_eval_dataset(cfg.data, split)
    if list(dataset.classes) != list(state["class_names"]):
        trained = state["config"].get("data", {})
        raise CheckpointError(
            f"{checkpoint}: trained on {len(state['class_names'])} classes "
            f"{state['class_names']}, but the data set of this config (data.name = "
            f"{cfg.data.name!r}) has {len(dataset.classes)} {list(dataset.classes)}; evaluate "
            f"it on data with the classes it was trained on (its run used data.name = "
            f"{trained.get('name')!r}, data.root = {trained.get('root')!r}) or pass a "
            "checkpoint trained on these classes"
        )
    metrics, _ = evaluate(
        model, dataset, device, cfg.eval.batch_size, cfg.data.num_workers, mode=cfg.eval
    )
    out = out or Path(checkpoint).resolve().parent.parent / "eval.json"
    write_eval_json(
        metrics,
        dataset.classes,
        out,
        iteration=state["iteration"],
        checkpoint=str(checkpoint),
        split=split or cfg.data.val_split,
    )
    if print_table:
        print(format_table(metrics, list(dataset.classes)))
    return metrics


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given, and the image files inside given folders (sorted)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(f"no images found in {[str(p) for p in inputs]}")
    return files


def normalize_image(rgb: np.ndarray, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(rgb / 255 - mean) / std``."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std


def save_prediction(
    stem: str, rgb: np.ndarray, pred: np.ndarray, palette: np.ndarray, out_dir: Path, alpha: float
) -> Path:
    """Write ``<stem>_mask.png``, ``<stem>_overlay.png`` and ``<stem>_labels.png`` for an
    (H, W) uint8 class-id map; returns the mask path."""
    color = colorize(pred, palette)
    overlay = (alpha * color + (1 - alpha) * rgb).round().astype(np.uint8)
    Image.fromarray(color).save(out_dir / f"{stem}_mask.png")
    Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.png")
    Image.fromarray(pred).save(out_dir / f"{stem}_labels.png")
    return out_dir / f"{stem}_mask.png"


@torch.no_grad()
def predict(checkpoint: Path, images: list[Path], out_dir: Path, alpha: float = 0.5) -> list[Path]:
    """Write, per image, ``<stem>_mask.png`` (palette colours), ``<stem>_overlay.png`` and
    ``<stem>_labels.png`` (class ids) into ``out_dir``. Returns the mask paths."""
    model, cfg, state = load_trained_model(checkpoint, "auto")
    device = next(model.parameters()).device
    palette = np.asarray(state["palette"], dtype=np.uint8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in expand_images(images):
        rgb = load_image(path)
        x = normalize_image(rgb, cfg.data.mean, cfg.data.std)
        pred = model.predict_logits(x[None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
        written.append(save_prediction(path.stem, rgb, pred, palette, out_dir, alpha))
    return written
