"""Class colours for drawing masks.

``default_palette(C)`` is the bit-interleaved colour map of PASCAL VOC: class 0 is black and
every index below 256 gets a distinct colour, none of them pure white, which stays free for
the ignore label (255) in ``colorize``.
"""

from __future__ import annotations

import numpy as np

from contrastseg.data.fileio import IGNORE_INDEX
from contrastseg.errors import DataError

IGNORE_COLOR = (255, 255, 255)


def default_palette(num_classes: int) -> np.ndarray:
    """Return ``(num_classes, 3)`` uint8 colours; index 0 (background) is black."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DataError(f"num_classes must be an integer, got {num_classes!r}")
    if not 1 <= num_classes <= 255:
        raise DataError(
            f"num_classes must be between 1 and 255 (255 is the ignore label), got {num_classes}"
        )
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        bits, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette[index] = rgb
    return palette


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Map a ``(H, W)`` mask of class ids to ``(H, W, 3)`` uint8 colours; ignore is white."""
    mask = np.asarray(mask)
    palette = np.asarray(palette, dtype=np.uint8)
    if mask.ndim != 2:
        raise DataError(f"colorize expects a (H, W) mask, got shape {mask.shape}")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise DataError(f"colorize expects a (C, 3) palette, got shape {palette.shape}")
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    valid = mask != ignore_index
    labels = mask[valid].astype(np.int64)
    bad = (labels < 0) | (labels >= len(palette))
    if bad.any():
        values = np.unique(labels[bad])[:10].tolist()
        raise DataError(
            f"mask values {values} have no colour in a palette of {len(palette)} classes; "
            f"pass a palette with one row per class"
        )
    out[valid] = palette[labels]
    return out
