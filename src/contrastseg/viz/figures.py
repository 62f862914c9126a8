"""Figures of predictions: input, ground truth and prediction side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def denormalize_image(image: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised float -> (H, W, 3) uint8."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    rgb = (image.float().cpu() * s + m).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ignore pixels are white."""
    mask = np.asarray(mask)
    out = np.full((*mask.shape, 3), 255, dtype=np.uint8)
    valid = mask != ignore_index
    out[valid] = np.asarray(palette, dtype=np.uint8)[mask[valid]]
    return out


def save_prediction_figure(samples: list[dict], palette, path: Path, mean, std) -> Path:
    """One row per sample (``image``, ``mask``, ``pred`` tensors): input | ground truth | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = np.asarray(palette, dtype=np.uint8)
    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r, s in enumerate(samples):
        panels = [
            denormalize_image(s["image"], mean, std),
            colorize(s["mask"].numpy(), palette),
            colorize(s["pred"].numpy(), palette),
        ]
        for ax, img, title in zip(axes[r], panels, ("input", "ground truth", "prediction")):
            ax.imshow(img)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
