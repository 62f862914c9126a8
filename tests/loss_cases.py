"""Random inputs shared by the loss tests: float64 logits with gradients and labels with
ignored pixels (255)."""

import torch

IGN = 255


def logits_and_target(g: torch.Generator, shape, ignore_frac: float):
    """``(B, C, H, W)`` float64 logits (requires grad) and ``(B, H, W)`` labels, a fraction of
    them ``IGN``, drawn from ``g`` in that order."""
    B, C, H, W = shape
    logits = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = IGN
    return logits, target
