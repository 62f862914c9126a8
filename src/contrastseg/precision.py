"""Numeric precision: the dtype names configs use, and autocast control."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "MEMORY_DTYPES", "autocast_off"]

# ``train.amp`` -> the autocast dtype (None: full precision).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# ``loss.contrast.memory.dtype`` -> the storage dtype of the contrast memory.
MEMORY_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def autocast_off(device_type: str):
    """A context in which autocast is disabled (a no-op for device types autocast lacks)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
