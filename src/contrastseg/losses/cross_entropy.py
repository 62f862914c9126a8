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


def upsample_to(
    logits: torch.Tensor, size: tuple[int, int], align_corners: bool = False
) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) logits to (B, C, *size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def labelled_weight(
    target: torch.Tensor, ignore_index: int, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The labelled pixels of ``target`` (B, H, W): their number, or with ``class_weights``
    (C,) the sum of their classes' weights (float64)."""
    labelled = target != ignore_index
    if class_weights is None:
        return labelled.sum().to(torch.float64)
    safe = torch.where(labelled, target, 0)
    w = class_weights.to(target.device, torch.float64)[safe]
    return torch.where(labelled, w, 0.0).sum()


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    normalizer: torch.Tensor | float | None = None,
    class_weights: torch.Tensor | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Summed CE over labelled pixels divided by ``normalizer`` (default: their count here).

    logits: (B, C, h, w), upsampled bilinearly (``align_corners``) to target's size; target:
    (B, H, W) int64. With ``class_weights`` (C,) a pixel of class c counts ``class_weights[c]``
    times, and the default normalizer is the sum of the labelled pixels' weights (torch's
    weighted mean). Exactly 0 (with a graph) when every pixel is ignored. Under DDP the loss
    set passes the labelled-pixel count (or weight) of the whole global batch divided by the
    world size, so that DDP's gradient averaging gives exactly the gradient of the global-batch
    mean.
    """
    logits = upsample_to(logits, tuple(target.shape[-2:]), align_corners)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    total = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="sum"
    )
    if normalizer is None:
        normalizer = labelled_weight(target, ignore_index, class_weights).to(total.dtype)
    if isinstance(normalizer, torch.Tensor):
        if class_weights is None:
            return total / normalizer.clamp(min=1)
        # a weighted sum may be below 1; 0 only when no pixel carries weight (then total is 0)
        return total / torch.where(normalizer > 0, normalizer, torch.ones_like(normalizer))
    return total / max(normalizer, 1e-12)


def labelled_pixels_per_process(
    target: torch.Tensor, ignore_index: int, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Labelled pixels of ``target`` (with ``class_weights``: the sum of their weights) summed
    over every process, / world size (float64; one all-reduce under DDP, the local count in one
    process)."""
    count = labelled_weight(target, ignore_index, class_weights)
    if not is_distributed():
        return count
    all_reduce_sum(count)
    return count / torch.distributed.get_world_size()


def global_pixel_normalizer(
    target: torch.Tensor, ignore_index: int, class_weights: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Under DDP: labelled pixels (or their weight) of the global batch / world size (one
    all-reduce); else None."""
    if not is_distributed():
        return None
    return labelled_pixels_per_process(target, ignore_index, class_weights)
