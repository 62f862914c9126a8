"""Losses: cross-entropy and OHEM-CE, the Table 2 comparison losses (Lovasz-softmax, RMI, AAF)
and the loss set that combines them with pixel contrast (:mod:`contrastseg.contrast`)."""

from contrastseg.losses.aaf import AAFLoss, aaf_loss
from contrastseg.losses.cross_entropy import (
    cross_entropy,
    global_pixel_normalizer,
    labelled_pixels_per_process,
)
from contrastseg.losses.loss_set import LossSet
from contrastseg.losses.lovasz import lovasz_softmax
from contrastseg.losses.ohem import ohem_cross_entropy, ohem_mask
from contrastseg.losses.rmi import rmi_loss

__all__ = [
    "AAFLoss",
    "LossSet",
    "aaf_loss",
    "cross_entropy",
    "global_pixel_normalizer",
    "labelled_pixels_per_process",
    "lovasz_softmax",
    "ohem_cross_entropy",
    "ohem_mask",
    "rmi_loss",
]
