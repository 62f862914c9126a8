"""`train()`: the whole job a config describes, as the command line runs it: train (or resume),
evaluate on the val split, and draw the prediction figure."""

from __future__ import annotations

from contrastseg.config import ExperimentConfig
from contrastseg.engine.trainer import Trainer, TrainResult
from contrastseg.viz import save_prediction_figure

__all__ = ["train"]


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes, evaluate it on the val split and (rank 0)
    write ``figures/val_predictions.png`` from the first ``eval.figure_images`` val images."""
    result = Trainer(cfg, resume=resume, progress=progress).fit()
    if result.samples:
        save_prediction_figure(
            result.samples,
            result.palette,
            result.run_dir / "figures" / "val_predictions.png",
            mean=cfg.data.mean,
            std=cfg.data.std,
        )
    return result
