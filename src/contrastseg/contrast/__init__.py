"""Pixel contrast (Wang et al., ICCV 2021), the method's single home.

* :class:`PixelContrast` -- the module to attach to any segmentation model: projection head,
  segment-aware hard-anchor sampling, the InfoNCE loss and the class memory in one place.
* The parts, usable on their own: :class:`ProjectionHead`, :func:`sample_anchors`,
  :func:`contrast_loss`, :func:`select_from_bank`, :class:`ClassMemory`.
"""

from contrastseg.contrast.bank_selection import MEMORY_SAMPLING_MODES, select_from_bank
from contrastseg.contrast.infonce import contrast_loss
from contrastseg.contrast.memory import REGION_MODES, ClassMemory
from contrastseg.contrast.module import ContrastDiagnostics, PixelContrast, PixelContrastWarning
from contrastseg.contrast.projection import ProjectionHead
from contrastseg.contrast.sampling import sample_anchors

__all__ = [
    "MEMORY_SAMPLING_MODES",
    "REGION_MODES",
    "ClassMemory",
    "ContrastDiagnostics",
    "PixelContrast",
    "PixelContrastWarning",
    "ProjectionHead",
    "contrast_loss",
    "sample_anchors",
    "select_from_bank",
]
