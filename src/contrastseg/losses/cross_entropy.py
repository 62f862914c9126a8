"""Cross-entropy on logits upsampled to the label size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastseg.distributed import all_reduce_sum, is_distributed
from contrastseg.errors import ConfigError


def check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ConfigError unless logits is (B, C, h, w) and target (B, H, W) with the same B."""
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ConfigError(
            f"logits must be (B, C, h, w) and target (B, H, W); got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) logits to (B, C, *size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Summed CE over labelled pixels divided by ``normalizer`` (default: their count here).

    logits: (B, C, h, w), upsampled to target's size; target: (B, H, W) int64. Exactly 0 (with
    a graph) when every pixel is ignored. Under DDP the loss set passes the labelled-pixel count
    of the whole global batch divided by the world size, so that DDP's gradient averaging gives
    exactly the gradient of the global-batch mean.
    """
    logits = upsample_to(logits, tuple(target.shape[-2:]))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (target != ignore_index).sum()
    if isinstance(normalizer, torch.Tensor):
        return total / normalizer.clamp(min=1)
    return total / max(normalizer, 1e-12)


def labelled_pixels_per_process(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labelled pixels of ``target`` summed over every process, / world size (float64; one
    all-reduce under DDP, the local count in one process)."""
    count = (target != ignore_index).sum().to(torch.float64)
    if not is_distributed():
        return count
    all_reduce_sum(count)
    return count / torch.distributed.get_world_size()


def global_pixel_normalizer(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Under DDP: labelled pixels of the global batch / world size (one all-reduce); else None."""
    return labelled_pixels_per_process(target, ignore_index) if is_distributed() else None
