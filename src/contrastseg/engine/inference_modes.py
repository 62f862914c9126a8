"""Test-time inference modes: whole image, sliding window, multi-scale and horizontal flip."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from contrastseg.config import EvalConfig


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits upsampled to the input size: (B, 3, H, W) -> (B, C, H, W)."""
    seg = model(x)["seg"]
    return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering ``[0, size)``; the last window is aligned to the end."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


def slide_logits(
    model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Sliding-window logits, averaged where windows overlap: (B, 3, H, W) -> (B, C, H, W).

    Windows of ``crop`` (clipped to the image) start every ``stride`` pixels; the last window in
    each direction ends at the image border, so every pixel is covered at least once.
    """
    B, _, H, W = x.shape
    ch, cw = min(crop[0], H), min(crop[1], W)
    total = None
    count = x.new_zeros(1, 1, H, W)
    for top in _starts(H, ch, stride[0]):
        for left in _starts(W, cw, stride[1]):
            out = _logits(model, x[:, :, top : top + ch, left : left + cw])
            if total is None:
                total = x.new_zeros(B, out.shape[1], H, W)
            total[:, :, top : top + ch, left : left + cw] += out
            count[:, :, top : top + ch, left : left + cw] += 1
    return total / count


@torch.no_grad()
def infer_probs(model, x: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Class probabilities at the input size, (B, 3, H, W) -> (B, C, H, W).

    For each scale in ``cfg.scales`` the image is resized (bilinear), inferred whole or by
    sliding window, optionally also flipped horizontally (and the output flipped back); the
    softmax probabilities of every pass are averaged at the original size.
    """
    H, W = x.shape[-2:]
    acc = None
    passes = 0
    for scale in cfg.scales:
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        xs = x if size == (H, W) else F.interpolate(x, size, mode="bilinear", align_corners=False)
        views = [(xs, False), (xs.flip(-1), True)] if cfg.flip else [(xs, False)]
        for view, flipped in views:
            if cfg.mode == "slide":
                logits = slide_logits(model, view, tuple(cfg.crop_size), tuple(cfg.stride))
            else:
                logits = _logits(model, view)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (H, W):
                logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
            probs = logits.float().softmax(1)
            acc = probs if acc is None else acc + probs
            passes += 1
    return acc / passes
