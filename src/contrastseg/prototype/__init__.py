"""ProtoSeg's prototype classifier (Zhou et al., CVPR 2022), the method's single home.

* :class:`PrototypeClassifier` -- the module to put on any segmentation model's features:
  projection head, nearest-prototype logits, the PPC and PPD losses and the momentum update of
  the prototypes by per-class Sinkhorn-Knopp clustering, all classes at once.
* The parts: :class:`PrototypeOutput` (what a training call returns), :func:`segment_sinkhorn`
  (the batched clustering) and :func:`gumbel_noise_order`.
"""

from contrastseg.prototype.classifier import (
    ASSIGNMENTS,
    PPC_WEIGHT,
    PPD_WEIGHT,
    PROJECTION_NORMS,
    TARGET_IGNORE,
    PrototypeClassifier,
    PrototypeOutput,
)
from contrastseg.prototype.sinkhorn import gumbel_noise_order, segment_sinkhorn

__all__ = [
    "ASSIGNMENTS",
    "PPC_WEIGHT",
    "PPD_WEIGHT",
    "PROJECTION_NORMS",
    "TARGET_IGNORE",
    "PrototypeClassifier",
    "PrototypeOutput",
    "gumbel_noise_order",
    "segment_sinkhorn",
]
