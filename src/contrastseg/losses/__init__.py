"""Losses: cross-entropy, pixel contrast and the loss set that combines them."""

from contrastseg.losses.cross_entropy import cross_entropy
from contrastseg.losses.loss_set import LossSet

__all__ = ["LossSet", "cross_entropy"]
