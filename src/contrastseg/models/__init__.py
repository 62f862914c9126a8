"""Segmentation models."""

from contrastseg.models.segmentor import InferenceModel, Segmentor, build_model, count_parameters

__all__ = ["InferenceModel", "Segmentor", "build_model", "count_parameters"]
