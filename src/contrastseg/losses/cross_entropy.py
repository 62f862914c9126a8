"""Cross-entropy on logits upsampled to the label size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) logits to (B, C, *size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """Mean CE over labelled pixels; exactly 0 (with a graph) when every pixel is ignored.

    logits: (B, C, h, w), upsampled to target's size; target: (B, H, W) int64.
    """
    logits = upsample_to(logits, tuple(target.shape[-2:])).float()
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count
