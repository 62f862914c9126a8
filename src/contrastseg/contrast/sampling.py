"""Segment-aware hard anchor sampling (docs/method.md, "Anchor sampling").

Vectorised over images, classes and pairs: sorts and bincounts instead of a Python loop, a
constant number of host syncs. Randomness comes only from ``torch.Generator`` objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from contrastseg.checks import check_int
from contrastseg.errors import ConfigError

__all__ = ["random_group_ranks", "sample_anchors"]


def random_group_ranks(
    group: Tensor, num_groups: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uniformly random ranks of elements within their group, without a loop over groups.

    ``group`` is a 1-D int64 tensor with values in ``[0, num_groups]``; the value ``num_groups``
    marks elements that belong to no group. Returns ``(order, group_sorted, rank_sorted,
    counts)``: ``order`` sorts the elements by (group, random key), ``group_sorted`` is
    ``group[order]``, ``rank_sorted[j]`` is the rank of element ``order[j]`` inside its group (a
    uniformly random permutation of ``0..n_g-1`` per group) and ``counts`` holds the group
    sizes (``num_groups + 1`` entries, the last for "no group").
    """
    length = group.numel()
    device = group.device
    perm = torch.randperm(length, generator=generator, device=device)
    key = group * length + perm
    _, order = torch.sort(key)
    counts = torch.bincount(group, minlength=num_groups + 1)
    starts = torch.cumsum(counts, 0) - counts
    group_sorted = group[order]
    rank_sorted = torch.arange(length, device=device) - starts[group_sorted]
    return order, group_sorted, rank_sorted, counts


class _GatherPixels(torch.autograd.Function):
    """``embed (B, D, h, w)`` at flat pixels ``(b, p)`` -> ``(N, D)``; the pixels are distinct,
    so backward writes the gradient without accumulation."""

    @staticmethod
    def forward(ctx, embed: Tensor, b_idx: Tensor, p_idx: Tensor) -> Tensor:
        B, D, h, w = embed.shape
        ctx.save_for_backward(b_idx, p_idx)
        ctx.shape, ctx.dtype = embed.shape, embed.dtype
        return embed.reshape(B, D, h * w)[b_idx, :, p_idx]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        b_idx, p_idx = ctx.saved_tensors
        B, D, h, w = ctx.shape
        out = grad.new_zeros((B, D, h * w), dtype=ctx.dtype)
        out[b_idx, :, p_idx] = grad.to(ctx.dtype)
        return out.view(B, D, h, w), None, None


def sample_anchors(
    embed: Tensor,
    pred: Tensor,
    target: Tensor,
    max_samples: int = 1024,
    max_views: int = 100,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Segment-aware hard anchor sampling, vectorised over images, classes and pairs.

    Args:
        embed: ``(B, D, h, w)`` embeddings.
        pred: ``(B, h, w)`` predicted labels on the embedding grid.
        target: ``(B, h, w)`` labels on the embedding grid; ``ignore_index`` and negative
            labels are never sampled.
        max_samples, max_views: an (image, class) pair is used when the class has more than
            ``max_views`` labelled pixels in the image; each pair gives
            ``n_view = min(max_samples // n_pairs, max_views)`` anchors.
        generator: source of the random choices.

    Within a pair, half the views are *hard* (prediction != label) and half *easy*: if both
    kinds have at least ``n_view / 2`` pixels, ``n_view // 2`` hard and the rest easy; if the
    easy pixels are short, all of them and the rest hard; if the hard ones are short, all of
    them and the rest easy. Pixels are drawn uniformly without replacement within each kind.

    Returns ``feats (N, D)`` (a differentiable gather of ``embed``), ``labels (N,)`` int64 and
    ``pair_index (N,)`` int64 in ``[0, n_pairs)``. Anchors are grouped by pair (pairs ordered by
    image, then class), hard views first. ``N = n_pairs * n_view``; ``N = 0`` when no pair
    qualifies or when ``n_pairs > max_samples`` (``n_view = 0``); the empty ``feats`` is still
    attached to the graph of ``embed``. Host syncs: three (plus one inside ``torch.bincount``
    on CUDA), whatever the batch and the number of classes.
    """
    if embed.dim() != 4:
        raise ConfigError(f"embed must have shape (B, D, h, w); got {tuple(embed.shape)}")
    B, D, h, w = embed.shape
    for name, t in (("pred", pred), ("target", target)):
        if tuple(t.shape) != (B, h, w):
            raise ConfigError(
                f"{name} must have shape (B, h, w) = {(B, h, w)} (the embedding grid); "
                f"got {tuple(t.shape)}"
            )
    check_int("max_samples", max_samples, 1)
    check_int("max_views", max_views, 1)
    device = embed.device
    P = h * w
    t = target.reshape(-1).to(device=device, dtype=torch.long)
    p = pred.reshape(-1).to(device=device, dtype=torch.long)
    valid = (t >= 0) & (t != ignore_index)
    empty = (
        embed[:0, :, :1, :1].reshape(0, D),  # empty, but attached to the graph of embed
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
    )
    num_labels = int(torch.where(valid, t, -1).max()) + 1 if t.numel() else 0  # sync 1
    if num_labels <= 0:
        return empty

    # Group (image, class, kind) with kind 0 = hard, 1 = easy; invalid pixels go to group G.
    image = torch.arange(B, device=device)[:, None] * num_labels
    pair = (image + torch.where(valid, t, 0).view(B, P)).view(-1)
    G = B * num_labels * 2
    group = torch.where(valid, pair * 2 + (p == t).long(), G)
    order, group_sorted, rank_sorted, counts = random_group_ranks(group, G, generator)
    counts = counts[:G].view(-1, 2)
    hard, easy = counts[:, 0], counts[:, 1]
    eligible = (hard + easy) > max_views
    n_pairs = int(eligible.sum())  # sync 2
    n_view = min(max_samples // n_pairs, max_views) if n_pairs else 0
    if n_view == 0:
        return empty

    half = n_view / 2
    both = (hard >= half) & (easy >= half)
    hard_keep = torch.where(
        both,
        torch.full_like(hard, n_view // 2),
        torch.where(hard >= half, n_view - easy, hard),
    )
    quota = torch.stack([hard_keep, n_view - hard_keep], 1) * eligible[:, None]
    quota = torch.cat([quota.reshape(-1), quota.new_zeros(1)])  # the "no group" slot
    keep = rank_sorted < quota[group_sorted]
    chosen = order[keep]  # sync 3; sorted by (image, class, kind)
    b_idx = torch.div(chosen, P, rounding_mode="floor")
    p_idx = chosen - b_idx * P
    feats = _GatherPixels.apply(embed, b_idx, p_idx)
    labels = t[chosen]
    pair_rank = torch.cumsum(eligible.long(), 0) - 1
    pair_index = pair_rank[pair[chosen]]
    return feats, labels, pair_index
