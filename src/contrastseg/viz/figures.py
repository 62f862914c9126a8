"""Figures of predictions: input, ground truth and prediction side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contrastseg.data import colorize, denormalize


def save_prediction_figure(samples: list[dict], palette, path: Path, mean, std) -> Path:
    """One row per sample (``image``, ``mask``, ``pred``): input | ground truth | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = np.asarray(palette, dtype=np.uint8)
    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r, s in enumerate(samples):
        panels = [
            denormalize(s["image"], mean, std),
            colorize(s["mask"].numpy(), palette),
            colorize(s["pred"].numpy(), palette),
        ]
        titles = ("input", "ground truth", "prediction")
        for ax, img, title in zip(axes[r], panels, titles, strict=True):
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
