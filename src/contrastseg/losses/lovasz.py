"""Lovasz-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018), docs/method.md,
"Comparison losses".

For each class c, on the softmax probabilities of the labelled pixels: errors
``e = |1[y = c] - p_c|`` sorted in decreasing order, the foreground indicator ``fg`` in the same
order, ``G = sum(fg)``, ``J_k = 1 - (G - cumsum(fg)_k) / (G + cumsum(1 - fg)_k)`` and
``g_k = J_k - J_{k-1}`` (``J_0 = 0``); ``loss_c = sum_k e_k g_k``. The loss is the mean of
``loss_c`` over the classes present in the labels (``classes="present"``) or over all classes
(``classes="all"``), computed on the whole batch at once or, with ``per_image``, on each image and
averaged over the images that have labelled pixels.

Everything runs in at least float32 with autocast disabled; sorting is vectorised over the
classes and the images (no Python loop).
"""

from __future__ import annotations

import torch
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import check_logits_target, upsample_to
from contrastseg.precision import autocast_off

__all__ = ["LOVASZ_CLASSES", "lovasz_grad", "lovasz_softmax", "lovasz_softmax_flat"]

LOVASZ_CLASSES = ("present", "all")


def check_classes(classes: str, key: str = "classes") -> str:
    """``classes`` compared by value (a string read from YAML is not the literal's object)."""
    if not isinstance(classes, str) or classes not in LOVASZ_CLASSES:
        raise ConfigError(
            f"{key}={classes!r} is not supported; allowed values: "
            + ", ".join(repr(c) for c in LOVASZ_CLASSES)
        )
    return classes


def lovasz_grad(fg_sorted: Tensor, dim: int = 0) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing
    order, given the foreground indicator ``fg_sorted`` in that order, along ``dim``."""
    gts = fg_sorted.sum(dim, keepdim=True)
    intersection = gts - fg_sorted.cumsum(dim)
    union = gts + (1.0 - fg_sorted).cumsum(dim)  # >= 1 at every position
    jaccard = 1.0 - intersection / union
    n = jaccard.shape[dim]
    if n > 1:
        head = jaccard.narrow(dim, 0, 1)
        tail = jaccard.narrow(dim, 1, n - 1) - jaccard.narrow(dim, 0, n - 1)
        jaccard = torch.cat([head, tail], dim)
    return jaccard


def lovasz_softmax_flat(
    probs: Tensor, labels: Tensor, valid: Tensor, classes: str = "present"
) -> Tensor:
    """The loss of each group: ``probs (G, N, C)``, ``labels (G, N)`` int64, ``valid (G, N)``.

    Returns ``(G,)`` per-group losses and ``(G,)`` a bool, whether the group counts (it has a
    class to average over). Invalid pixels are sorted last (key -1) and their errors zeroed, so
    each group's loss equals the loss on its valid pixels alone.
    """
    check_classes(classes)
    C = probs.shape[2]
    safe = torch.where(valid, labels, 0)
    fg = torch.nn.functional.one_hot(safe, C).to(probs.dtype) * valid[..., None]
    errors = (fg - probs).abs()
    key = torch.where(valid[..., None], errors.detach(), -1.0)
    key_sorted, order = torch.sort(key, dim=1, descending=True)
    e_sorted = torch.where(key_sorted >= 0, errors.gather(1, order), 0.0)
    fg_sorted = fg.gather(1, order)
    per_class = (e_sorted * lovasz_grad(fg_sorted, dim=1)).sum(1)  # (G, C)
    # compared by value (==): a string read from YAML works
    present = classes == "present"
    chosen = fg.sum(1) > 0 if present else valid.any(1)[:, None].expand(-1, C)
    count = chosen.sum(1)
    loss = (per_class * chosen).sum(1) / count.clamp(min=1)
    return loss, count > 0


def lovasz_softmax(
    logits: Tensor,
    target: Tensor,
    classes: str = "present",
    per_image: bool = False,
    ignore_index: int = 255,
) -> Tensor:
    """Lovasz-softmax of ``logits (B, C, h, w)`` (bilinearly upsampled to the label size) against
    ``target (B, H, W)`` int64; pixels labelled ``ignore_index`` are removed.

    ``classes``: ``"present"`` (mean over the classes with labelled pixels) or ``"all"`` (every
    class; an absent class contributes its largest probability). ``per_image``: the mean of the
    per-image losses over the images with at least one labelled pixel. Exactly 0, with a graph,
    when no pixel is labelled.
    """
    check_classes(classes)
    check_logits_target(logits, target)
    with autocast_off(logits.device.type):
        x = upsample_to(logits, tuple(target.shape[-2:]))
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        B, C = x.shape[:2]
        probs = x.softmax(1).permute(0, 2, 3, 1).reshape(B, -1, C)
        labels = target.to(x.device, torch.long).reshape(B, -1)
        if not per_image:
            probs, labels = probs.reshape(1, -1, C), labels.reshape(1, -1)
        valid = labels != ignore_index
        loss, counts = lovasz_softmax_flat(probs, labels, valid, classes)
        # No labelled pixel: every error is zeroed, so this is exactly 0 with a graph.
        return (loss * counts).sum() / counts.sum().clamp(min=1)
