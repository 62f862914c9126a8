"""Numeric precision helpers: autocast control."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device_type: str):
    """A context in which autocast is disabled (a no-op for device types autocast lacks)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
