"""Sample-index checking shared by the sources."""

from __future__ import annotations

import numpy as np


def check_index(index: int, length: int) -> int:
    """A valid non-negative sample index (negative ones count from the end), else an error."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise TypeError(f"sample index must be an integer, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} out of range for {length} samples")
    return index
