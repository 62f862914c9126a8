"""Online hard example mining for cross-entropy (OHEM-CE), docs/method.md, "Comparison losses".

Among the labelled pixels, keep those whose softmax probability of the true class is below
``threshold``, and at least the ``min_kept`` pixels with the lowest such probability (all of them
when fewer are labelled); the loss is the CE averaged over the kept pixels. The selection is made
without gradient; the probabilities are computed in at least float32 with autocast disabled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import cross_entropy, global_pixel_normalizer, upsample_to
from contrastseg.precision import autocast_off

__all__ = ["ohem_cross_entropy", "ohem_mask"]


def _check(threshold: float, min_kept: int) -> None:
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold={threshold!r} is invalid; allowed values: (0, 1]")
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 1:
        raise ConfigError(f"min_kept={min_kept!r} is invalid; allowed values: integers >= 1")


@torch.no_grad()
def ohem_mask(
    logits: Tensor,
    target: Tensor,
    threshold: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
) -> Tensor:
    """``(B, H, W)`` bool: the kept pixels. ``logits (B, C, h, w)`` are bilinearly upsampled
    to the label size of ``target (B, H, W)``.

    A labelled pixel is kept when ``p_true < threshold`` or ``p_true <= p_(k)``, the k-th
    smallest ``p_true`` of the batch with ``k = min(min_kept, labelled pixels)`` (ties at
    ``p_(k)`` are all kept). One host sync.
    """
    _check(threshold, min_kept)
    with autocast_off(logits.device.type):
        x = upsample_to(logits.detach(), tuple(target.shape[-2:]))
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        t = target.to(x.device, torch.long)
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)
        p_true = x.softmax(1).gather(1, safe[:, None])[:, 0]
        scores = p_true[valid]
        if scores.numel() == 0:
            return valid
        k = min(min_kept, scores.numel())
        kth = torch.kthvalue(scores, k).values
        return valid & ((p_true < threshold) | (p_true <= kth))


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    threshold: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    normalizer: Tensor | float | None = None,
    over_processes: bool = False,
    align_corners: bool = False,
) -> Tensor:
    """CE over the pixels :func:`ohem_mask` keeps, divided by ``normalizer`` (default: their
    number; with ``over_processes`` under DDP, the kept pixels of every process / world size,
    so that DDP's gradient averaging gives the global mean). Exactly 0, with a graph, when no
    pixel is labelled."""
    x = upsample_to(logits, tuple(target.shape[-2:]), align_corners)
    keep = ohem_mask(x, target, threshold, min_kept, ignore_index)
    kept_target = torch.where(keep, target.to(x.device, torch.long), ignore_index)
    if normalizer is None and over_processes:
        normalizer = global_pixel_normalizer(kept_target, ignore_index)
    return cross_entropy(x, kept_target, ignore_index, normalizer)
