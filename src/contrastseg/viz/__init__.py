"""Figures: predictions, CE vs. contrast comparisons, t-SNE maps of pixel embeddings."""

from contrastseg.viz.figures import save_prediction_figure

__all__ = ["save_prediction_figure"]
