"""Evaluation over a data set (whole image, sliding window, scales and flip, as
``eval`` configures): confusion matrix on the device, metrics, the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from contrastseg.config import EvalConfig
from contrastseg.distributed import all_reduce_sum
from contrastseg.engine.inference_modes import infer_scores
from contrastseg.engine.metrics import ConfusionMatrix
from contrastseg.files import atomic_write_text
from contrastseg.models import Segmentor


def collate_eval(items: list[dict]) -> dict:
    """Stack when every image has the same size, otherwise keep lists (evaluated one by one)."""
    same = len({tuple(it["image"].shape) for it in items}) == 1
    if same:
        return {
            "image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }
    return {"list": items}


@torch.no_grad()
def evaluate(
    model: Segmentor,
    dataset,
    device: torch.device,
    batch_size: int = 8,
    num_workers: int = 0,
    keep: int = 0,
    eval_cfg: EvalConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict, list[dict]]:
    """Evaluation over a dataset; ``eval_cfg`` (default: single-scale whole image) chooses
    sliding window, scales and flip.

    Returns the metrics (see :func:`metrics_from_confusion`) and, for the first ``keep`` images,
    ``{"index", "image" (3,H,W), "mask" (H,W), "pred" (H,W)}`` on the CPU for figures.
    With ``world_size > 1`` process ``rank`` evaluates images ``rank, rank + world_size, ...``
    (no padding, so every image counts exactly once) and the confusion matrices are summed.
    """
    eval_cfg = eval_cfg or EvalConfig()
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, device)
    kept: list[dict] = []
    share = dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(
        share, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_eval
    )
    for batch in loader:
        if "list" in batch:
            groups = [
                (it["image"][None], it["mask"][None], torch.tensor([it["index"]]))
                for it in batch["list"]
            ]
        else:
            groups = [(batch["image"], batch["mask"], batch["index"])]
        for image, mask, index in groups:
            image, mask = image.to(device, dtype=dtype), mask.to(device)
            pred = infer_scores(model, image, eval_cfg).argmax(1)
            cm.update(pred, mask)
            for j in range(image.shape[0]):
                if len(kept) < keep:
                    kept.append(
                        {
                            "index": int(index[j]),
                            "image": image[j].cpu(),
                            "mask": mask[j].cpu(),
                            "pred": pred[j].cpu(),
                        }
                    )
    model.train(was_training)
    all_reduce_sum(cm.mat)
    metrics = cm.compute()
    metrics["confusion"] = cm.mat.cpu().tolist()
    return metrics, kept


def format_table(metrics: dict, class_names: list[str]) -> str:
    """A plain-text table of per-class IoU and the summary metrics (percentages)."""

    def pct(v: float | None) -> str:
        return (
            "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"
        )

    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 15)]
    for name, iou, acc in zip(
        class_names, metrics["per_class_iou"], metrics["per_class_acc"], strict=True
    ):
        lines.append(f"{name:<{width}} {pct(iou)} {pct(acc)}")
    lines.append("-" * (width + 15))
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        lines.append(f"{key:<{width}} {pct(metrics[key])}")
    return "\n".join(lines)


def write_eval_json(metrics: dict, class_names: list[str], path: Path, **extra) -> None:
    out = {k: v for k, v in metrics.items()}
    out["class_names"] = list(class_names)
    out.update(extra)
    atomic_write_text(path, json.dumps(out, indent=2))
