"""Pixel-wise contrastive loss with segment-aware hard anchor sampling (METHOD.md section 3).

Pieces, usable on their own:

* :func:`sample_anchors` -- segment-aware hard anchor sampling, fully vectorised (no Python loop
  over images, classes or pairs; three host syncs).
* :func:`contrast_loss` -- the InfoNCE loss over the sampled anchors, optionally with a memory
  bank (all entries, or per-anchor subsets given by ``bank_index``), with bounded peak memory.
* :func:`select_from_bank` -- memory sampling: ``all``, ``random``, ``hardest``, ``semi_hard``.
* :class:`PixelContrastLoss` -- the module a training loop calls: resizes labels to the
  embedding grid, takes the hard-anchor predictions from the segmentation logits, samples,
  reads the memory, computes the loss and then pushes the batch into the memory.

Every computation of similarities and log-sum-exps runs in at least float32 with autocast
disabled, whatever the input dtype; randomness comes only from ``torch.Generator`` objects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import autocast_off
from contrastseg.losses.memory import (
    ClassMemory,
    LazyGenerator,
    SeededModule,
    _check_int,
    random_group_ranks,
)

__all__ = [
    "MEMORY_SAMPLING_MODES",
    "PixelContrastLoss",
    "contrast_loss",
    "sample_anchors",
    "select_from_bank",
]

MEMORY_SAMPLING_MODES = ("all", "random", "hardest", "semi_hard")

# (anchor x bank column) elements per chunk of the whole-bank loss: 2 Mi on CPU, 8 Mi on GPUs
# (float32: 8 / 32 MiB per matrix; a chunk holds about 9 such matrices at its peak).
LOSS_CHUNK_ELEMENTS = 1 << 21
LOSS_CHUNK_ELEMENTS_GPU = 1 << 23
# The whole-bank block keeps its N x M similarities between its two forward passes and backward
# (two matrix products instead of four) while they take at most this many bytes.
LOSS_CACHE_BYTES = 1 << 30
SELECT_CHUNK_ELEMENTS = 1 << 24  # 16 Mi elements: 64 MiB per float32 chunk x M matrix
GATHER_CHUNK_ELEMENTS = 1 << 24  # gathered (chunk, K, D) bank rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ================================================================================ sampling
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
    _check_int("max_samples", max_samples, 1)
    _check_int("max_views", max_views, 1)
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


# ==================================================================================== loss
# Shifted logits a = s - m (m: the row's largest negative logit) are clamped above at this value
# before exp. Negatives have a <= 0; only a positive far more similar than every negative can
# exceed it, and then its term is below |N| exp(-80) and so is its gradient.
_EXP_CLAMP = 80.0


def _masked_max(sim: Tensor, mask: Tensor) -> Tensor:
    if sim.shape[1] == 0:
        return sim.new_full((sim.shape[0],), -math.inf)
    return torch.where(mask, sim, -math.inf).amax(1)


class _InBatchBlock:
    """Anchors against each other: ``s = z z^T / tau``; self-pairs are neither kind."""

    num_chunks = 1
    cache = True

    def __init__(self, labels: Tensor, inv_tau: float) -> None:
        self.labels, self.inv_tau = labels, inv_tau

    def sim(self, z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        same = self.labels[:, None] == self.labels[None, :]
        pos = same.clone()
        pos.fill_diagonal_(False)
        return (z * self.inv_tau) @ z.T, pos, ~same

    def backprop(self, z: Tensor, k: int, grad_sim: Tensor) -> Tensor:
        return (grad_sim + grad_sim.T) @ (z * self.inv_tau)


class _GatheredBankBlock:
    """Anchor ``i`` against bank rows ``index[i]`` (``-1`` = padding), gathered in row chunks.

    At most ``rows x K x D`` gathered bank elements exist at a time, in forward and backward.
    """

    num_chunks = 1
    cache = True

    def __init__(self, labels, bank, bank_labels, index, inv_tau, rows) -> None:
        self.bank, self.index, self.inv_tau, self.rows = bank, index, inv_tau, rows
        self.valid = index >= 0
        self.safe = index.clamp(min=0)
        same = bank_labels[self.safe] == labels[:, None]
        self.pos, self.neg = self.valid & same, self.valid & ~same

    def sim(self, z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        zs = z * self.inv_tau
        out = z.new_empty(self.index.shape)
        for s in range(0, z.shape[0], self.rows):
            g = self.bank[self.safe[s : s + self.rows]].to(z.dtype)  # (r, K, D)
            out[s : s + self.rows] = torch.bmm(g, zs[s : s + self.rows, :, None]).squeeze(2)
        return out, self.pos, self.neg

    def backprop(self, z: Tensor, k: int, grad_sim: Tensor) -> Tensor:
        grad_sim = torch.where(self.valid, grad_sim, 0.0) * self.inv_tau
        out = z.new_empty(z.shape)
        for s in range(0, z.shape[0], self.rows):
            g = self.bank[self.safe[s : s + self.rows]].to(z.dtype)
            out[s : s + self.rows] = torch.bmm(grad_sim[s : s + self.rows, None, :], g).squeeze(1)
        return out


class _ChunkedBankBlock:
    """Every bank entry against every anchor, in column chunks of ``cols`` entries.

    The block is streamed: each of its three passes (two in forward, one in backward) visits
    the chunks in turn. With ``keep_sims`` each chunk's similarity matrix is computed once and
    kept for the later passes (``N x M`` values in all); without it, it is recomputed in every
    pass, so that only ``N x cols`` matrices ever exist.
    """

    cache = False

    def __init__(self, labels, bank, bank_labels, inv_tau, chunk_elements, keep_sims) -> None:
        self.labels, self.bank, self.bank_labels, self.inv_tau = labels, bank, bank_labels, inv_tau
        M = bank.shape[0]
        self.cols = max(1, min(M, chunk_elements // max(1, labels.shape[0])))
        self.spans = [(s, min(M, s + self.cols)) for s in range(0, M, self.cols)]
        self.num_chunks = len(self.spans)
        self.kept: dict[int, Tensor] | None = {} if keep_sims else None

    def sim(self, z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        s, e = self.spans[k]
        same = self.labels[:, None] == self.bank_labels[None, s:e]
        sim = None if self.kept is None else self.kept.get(k)
        if sim is None:
            sim = (z * self.inv_tau) @ self.bank[s:e].to(z.dtype).T
            if self.kept is not None:
                self.kept[k] = sim
        return sim, same, ~same  # callers never modify ``sim`` in place: it may be kept

    def release(self, k: int) -> None:
        """Drop chunk ``k``'s kept similarities (after its last use, in backward)."""
        if self.kept is not None:
            self.kept.pop(k, None)

    def backprop(self, z: Tensor, k: int, grad_sim: Tensor) -> Tensor:
        s, e = self.spans[k]
        return (grad_sim * self.inv_tau) @ self.bank[s:e].to(z.dtype)


class _ClassSlotBankBlock:
    """Every filled memory slot against every anchor, the memory laid out by class.

    ``slots (C, K, D)`` and ``valid (C, K)``: slot ``k`` of class ``c``, filled or not. An
    anchor's memory positives are the filled slots of its own class, so its positive terms read
    one ``N x K`` slice; its negatives are all other classes' filled slots, summed from one
    ``N x C x K`` matrix that is turned in place from similarities into ``exp(s - m)`` and kept
    for backward. Two products with the memory and a few elementwise passes in all, no masks of
    size ``N x M``.
    """

    num_chunks = 0  # not one of the cached/streamed (sim, pos, neg) blocks

    def __init__(self, labels, slots, valid, inv_tau: float, all_valid: bool) -> None:
        C, K, D = slots.shape
        self.labels, self.valid, self.inv_tau = labels, valid, inv_tau
        self.flat = slots.reshape(C * K, D)
        self.all_valid = all_valid  # the usual case once the memory is full: no masking
        self.own = labels[:, None, None].expand(labels.shape[0], 1, K)  # gather/scatter index

    def negative_max(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: the maximum similarity over its memory negatives, and the number of its
        memory positives. Computes and keeps the similarities."""
        n, (C, K) = z.shape[0], self.valid.shape
        sim = ((z * self.inv_tau) @ self.flat.to(z.dtype).T).view(n, C, K)
        self.pos_sim = sim.gather(1, self.own).squeeze(1)  # (N, K)
        self.pos_valid = self.valid[self.labels]  # (N, K)
        masked = sim if self.all_valid else torch.where(self.valid, sim, -math.inf)
        per_class = masked.amax(2)  # (N, C)
        per_class.scatter_(1, self.labels[:, None], -math.inf)  # its own class is no negative
        self.sim = sim
        return per_class.amax(1), self.pos_valid.sum(1)

    def negative_sum(self, m: Tensor) -> Tensor:
        """Per anchor: ``sum over memory negatives of exp(s - m)``; keeps those terms."""
        ea = self.sim.sub_(m[:, None, None]).clamp_(max=_EXP_CLAMP).exp_()
        del self.sim
        if not self.all_valid:
            ea.mul_(self.valid)
        ea.scatter_(1, self.own, 0.0)  # own class: positives, handled by positive_terms
        self.ea = ea
        return ea.sum((1, 2))

    def positive_terms(self, m: Tensor, e_safe: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: ``sum_p log(exp(a_p) + E) - a_p`` and ``sum_p 1 / (exp(a_p) + E)``."""
        a = (self.pos_sim - m[:, None]).clamp_(max=_EXP_CLAMP)
        d = torch.exp(a) + e_safe[:, None]
        terms = torch.where(self.pos_valid, torch.log(d) - a, 0.0).sum(1)
        self.r = torch.where(self.pos_valid, d.reciprocal(), 0.0)
        return terms, self.r.sum(1)

    def grad(self, coef_pos: Tensor, coef_neg: Tensor) -> Tensor:
        """Gradient with respect to the anchors, from the kept terms (not modified)."""
        n = coef_pos.shape[0]
        g = self.ea * coef_neg.view(n, 1, 1)
        g.scatter_(1, self.own, (coef_pos[:, None] * self.r)[:, None, :])
        return (g.view(n, -1) @ self.flat.to(g.dtype)) * self.inv_tau


def _row_sums(rows: Tensor, values: Tensor, counts: Tensor) -> Tensor:
    """Per-row sums of ``values (L, k)`` whose ``rows`` are ascending (``nonzero`` order).

    Deterministic on every device (a padded ``(n, max count, k)`` layout summed over its
    middle dimension, no atomics); one host sync for the width.
    """
    n = counts.shape[0]
    width = int(counts.max()) if n else 0
    out = values.new_zeros((n, max(width, 1), values.shape[1]))
    if rows.numel():
        start = torch.cumsum(counts, 0) - counts
        col = torch.arange(rows.shape[0], device=rows.device) - start[rows]
        out[rows, col] = values
    return out.sum(1)


class _ContrastFunction(torch.autograd.Function):
    """The loss over all blocks, with a closed-form backward.

    With ``a = min(s - m, 80)``, ``E_i = sum_n exp(a_in)``, ``d = exp(a) + E`` and the row
    weight ``w_i = scale / (|P(i)| * n_anchors)`` (0 without positives or without negatives,
    where ``L_i = 0``)::

        loss = sum_i w_i sum_p [log d_ip - a_ip]
        dloss/ds_ip = -w_i E_i / d_ip          dloss/ds_in = w_i (sum_p 1 / d_ip) exp(a_in)

    Cached blocks (in-batch, gathered bank) keep their similarities; their positive pairs are
    compacted with ``nonzero`` (one host sync per block) so the positive terms cost only
    ``O(#positives)``, and ``exp(s - m)`` and ``1 / d`` are kept for backward. The streamed
    bank block recomputes its similarities in each of its two forward passes (maximum and
    negative sum with an online log-sum-exp, then the positive terms) and in backward.
    """

    @staticmethod
    def forward(ctx, z: Tensor, blocks: list, scale: float) -> Tensor:
        n = z.shape[0]
        keys = [(bi, k) for bi, b in enumerate(blocks) for k in range(b.num_chunks)]
        cached = {key: blocks[key[0]].sim(z, key[1]) for key in keys if blocks[key[0]].cache}
        streamed = [key for key in keys if key not in cached]
        slotted = [b for b in blocks if isinstance(b, _ClassSlotBankBlock)]

        # Cached blocks: the detached maximum over their negatives; positive pairs compacted.
        m = z.new_full((n,), -math.inf)
        n_pos = torch.zeros(n, dtype=torch.long, device=z.device)
        compact: dict = {}
        for key, (sim, pos, neg) in cached.items():
            m = torch.maximum(m, _masked_max(sim, neg))
            rows, cols = pos.nonzero(as_tuple=True)
            counts = torch.bincount(rows, minlength=n)
            compact[key] = (rows, cols, counts)
            n_pos += counts
        for b in slotted:
            block_max, block_pos = b.negative_max(z)
            m = torch.maximum(m, block_max)
            n_pos += block_pos

        # Streamed chunks: maximum and negative sum in one pass, rescaling the running sum
        # whenever the maximum grows (online log-sum-exp); e_sum stays relative to m.
        e_sum = z.new_zeros(n)
        for bi, k in streamed:
            sim, pos, neg = blocks[bi].sim(z, k)
            m_new = torch.maximum(m, _masked_max(sim, neg))
            ref = torch.where(torch.isfinite(m_new), m_new, 0.0)
            ea = torch.exp((sim - ref[:, None]).clamp_(max=_EXP_CLAMP))
            e_sum = e_sum * torch.exp(m - ref) + torch.where(neg, ea, 0.0).sum(1)
            m = m_new
            n_pos += pos.sum(1)
        has_neg = torch.isfinite(m)
        m = torch.where(has_neg, m, 0.0)

        # Cached blocks: E_i += sum over their negatives of exp(s - m) (<= 1 each; the clamp
        # keeps the other entries finite so that a float mask can select). E_i >= 1 with
        # negatives.
        state: dict = {}
        for key, (sim, _, neg) in cached.items():
            ea = (sim - m[:, None]).clamp_(max=_EXP_CLAMP).exp_()
            negf = neg.to(ea.dtype)
            e_sum += (ea * negf).sum(1)
            state[key] = (ea, negf)
        for b in slotted:
            e_sum += b.negative_sum(m)
        e_safe = torch.where(has_neg, e_sum, 1.0)

        # Positive terms log(exp(a) + E) - a and the sums of 1 / (exp(a) + E).
        terms = z.new_zeros(n)
        r_sum = z.new_zeros(n)
        for key, (sim, _, _) in cached.items():
            rows, cols, counts = compact[key]
            a = (sim[rows, cols] - m[rows]).clamp_(max=_EXP_CLAMP)
            d = torch.exp(a) + e_safe[rows]
            r = d.reciprocal()
            sums = _row_sums(rows, torch.stack([torch.log(d) - a, r], 1), counts)
            terms += sums[:, 0]
            r_sum += sums[:, 1]
            state[key] = (*state[key], rows, cols, r)
        for b in slotted:
            block_terms, block_r = b.positive_terms(m, e_safe)
            terms += block_terms
            r_sum += block_r
        for bi, k in streamed:
            sim, pos, _ = blocks[bi].sim(z, k)
            a = (sim - m[:, None]).clamp_(max=_EXP_CLAMP)
            d = torch.exp(a) + e_safe[:, None]
            terms += torch.where(pos, torch.log(d).sub_(a), 0.0).sum(1)
            r_sum += torch.where(pos, d.reciprocal_(), 0.0).sum(1)

        n_anchor = (n_pos > 0).sum().clamp(min=1)
        weight = scale / (n_pos.clamp(min=1) * n_anchor).to(z.dtype)
        w = torch.where((n_pos > 0) & has_neg, weight, 0.0)
        ctx.save_for_backward(z, m, e_safe, r_sum, w)
        ctx.blocks, ctx.state = blocks, state
        return (w * terms).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z, m, e_safe, r_sum, w = ctx.saved_tensors
        wg = w * grad
        coef_pos = -wg * e_safe
        coef_neg = (wg * r_sum)[:, None]
        grad_z = torch.zeros_like(z)
        for bi, b in enumerate(ctx.blocks):
            for k in range(b.num_chunks):
                if (bi, k) in ctx.state:
                    ea, negf, rows, cols, r = ctx.state[bi, k]
                    g = (coef_neg * ea).mul_(negf)
                    g[rows, cols] = coef_pos[rows] * r
                else:
                    sim, pos, neg = b.sim(z, k)
                    ea = torch.exp((sim - m[:, None]).clamp_(max=_EXP_CLAMP))
                    r = (ea + e_safe[:, None]).reciprocal_()
                    g = torch.where(
                        pos, coef_pos[:, None] * r, torch.where(neg, coef_neg * ea, 0.0)
                    )
                    del sim
                    b.release(k)
                grad_z += b.backprop(z, k, g)
            if isinstance(b, _ClassSlotBankBlock):
                grad_z += b.grad(coef_pos, coef_neg)
        return grad_z, None, None


def contrast_loss(
    feats: Tensor,
    labels: Tensor,
    temperature: float,
    base_temperature: float,
    bank_feats: Tensor | None = None,
    bank_labels: Tensor | None = None,
    bank_index: Tensor | None = None,
    *,
    bank_slots: tuple[Tensor, Tensor] | None = None,
    chunk_elements: int | None = None,
    cache_bytes: int = LOSS_CACHE_BYTES,
) -> Tensor:
    """Supervised InfoNCE over anchors and (optionally) a memory bank, METHOD.md section 3.

    For anchor ``i`` with similarity ``s_ij = z_i . z_j / tau``, positives ``P(i)`` (same label,
    in-batch without ``i`` itself, plus same-label bank entries) and negatives ``N(i)`` (other
    labels, in-batch and bank)::

        L_i = -(tau / tau_b) * mean_{p in P(i)} [s_ip - log(exp(s_ip) + sum_{n in N(i)} exp(s_in))]

    averaged over anchors with ``|P(i)| > 0``. Returns exactly 0 (attached to the graph of
    ``feats``) when there is no anchor or no anchor has a positive; an anchor with positives
    and no negative contributes 0 (the formula gives 0 there).

    Bank entries are constants (no gradient). With ``bank_index (N, K)`` (indices into the
    bank, ``-1`` = padding) anchor ``i`` sees only the entries ``bank_index[i]``; without it,
    the whole bank. Instead of ``bank_feats``/``bank_labels`` the whole bank may come as
    ``bank_slots = (slots (C, K, D), filled (C, K))``, a class memory's own layout (entry
    ``slots[c, k]`` of label ``c`` where ``filled``); the loss is the same, computed faster.

    Numerics: computed in at least float32 with autocast disabled. With ``m_i`` the detached
    maximum of ``s_in`` over the negatives, ``a_ij = s_ij - m_i`` and
    ``E_i = sum_n exp(a_in) >= 1``, each term is ``log(exp(a_ip) + E_i) - a_ip``, which equals
    the formula above. ``a`` is clamped above at 80 before ``exp``: negatives never reach it, and
    a positive beyond it has a term below ``|N| exp(-80)``.

    Memory: the loss is one autograd function with a closed-form backward. For backward it
    keeps the in-batch ``N x N`` and (with ``bank_index``) the gathered ``N x K`` matrices,
    nothing of size ``N x M``. With ``bank_index`` the bank rows are gathered in anchor chunks of
    at most ``GATHER_CHUNK_ELEMENTS`` elements (64 MiB in float32) in forward and backward, so
    the ``N x K x D`` gather never exists in one piece. Without it (``all`` mode) the bank is
    processed in column chunks of ``chunk_elements // N`` entries (default
    ``LOSS_CHUNK_ELEMENTS`` on CPU, ``LOSS_CHUNK_ELEMENTS_GPU`` elsewhere), recomputing the
    similarities in the two forward passes (maximum and negative sum with an online
    log-sum-exp, then the positive terms) and in backward: peak memory is about nine
    ``N x cols`` matrices, never ``N x M``. When the ``N x M`` similarities take at most
    ``cache_bytes`` (default ``LOSS_CACHE_BYTES``, 1 GiB) they are computed once and kept until
    backward instead: two matrix products with the bank instead of four.
    """
    if not temperature > 0 or not base_temperature > 0:
        raise ConfigError(
            f"temperature={temperature!r} and base_temperature={base_temperature!r} must both "
            "be > 0"
        )
    if feats.dim() != 2:
        raise ConfigError(f"feats must have shape (N, D); got {tuple(feats.shape)}")
    with autocast_off(feats.device.type):
        dtype = _compute_dtype(feats.dtype)
        z = feats.to(dtype)
        n = z.shape[0]
        if n == 0:
            return z.sum() * 0
        labels = labels.reshape(-1).to(z.device, torch.long)
        inv_tau = 1.0 / temperature
        if chunk_elements is None:
            cpu = z.device.type == "cpu"
            chunk_elements = LOSS_CHUNK_ELEMENTS if cpu else LOSS_CHUNK_ELEMENTS_GPU
        blocks: list = [_InBatchBlock(labels, inv_tau)]
        if bank_slots is not None:
            if bank_feats is not None or bank_index is not None:
                raise ConfigError("bank_slots replaces bank_feats and bank_index: give one")
            slots, filled = (t.detach().to(z.device) for t in bank_slots)
            if slots.dim() != 3 or tuple(filled.shape) != tuple(slots.shape[:2]):
                raise ConfigError(
                    f"bank_slots must be (C, K, D) slots and a (C, K) mask; got "
                    f"{tuple(slots.shape)} and {tuple(filled.shape)}"
                )
            filled = filled.bool()
            count = int(filled.sum())  # one host sync: empty, full or in between
            if count == 0:  # an empty memory adds nothing
                pass
            elif n * slots.shape[0] * slots.shape[1] * z.element_size() <= cache_bytes:
                full = count == filled.numel()
                blocks.append(_ClassSlotBankBlock(labels, slots, filled, inv_tau, full))
            else:  # too big to keep: the streamed whole-bank block on the filled entries
                classes = torch.arange(slots.shape[0], device=z.device)[:, None]
                bank_feats = slots[filled]
                bank_labels = classes.expand_as(filled)[filled]
        if bank_feats is not None and bank_feats.shape[0] > 0:
            if bank_labels is None:
                raise ConfigError("bank_labels is required when bank_feats is given")
            bank = bank_feats.detach().to(z.device)
            bank_labels = bank_labels.reshape(-1).to(z.device, torch.long)
            if bank_index is None:
                keep = n * bank.shape[0] * z.element_size() <= cache_bytes
                blocks.append(
                    _ChunkedBankBlock(labels, bank, bank_labels, inv_tau, chunk_elements, keep)
                )
            else:
                index = bank_index.to(z.device, torch.long)
                if index.dim() != 2 or index.shape[0] != n:
                    raise ConfigError(
                        f"bank_index must have shape (N={n}, K); got {tuple(index.shape)}"
                    )
                rows = max(1, GATHER_CHUNK_ELEMENTS // max(1, index.shape[1] * bank.shape[1]))
                blocks.append(_GatheredBankBlock(labels, bank, bank_labels, index, inv_tau, rows))
        return _ContrastFunction.apply(z, blocks, temperature / base_temperature)


# ========================================================================= memory sampling
def _pad_columns(idx: Tensor, k: int) -> Tensor:
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], k - idx.shape[1]), -1)], 1)
    return idx


def _topk_masked(score: Tensor, mask: Tensor, k: int) -> Tensor:
    kk = min(k, score.shape[1])
    if kk == 0:
        return score.new_full((score.shape[0], k), -1, dtype=torch.long)
    _, idx = torch.where(mask, score, -math.inf).topk(kk, dim=1)
    idx = torch.where(mask.gather(1, idx), idx, -1)
    return _pad_columns(idx, k)


def _semi_hard(score: Tensor, mask: Tensor, k: int, fraction: float, keys: Tensor) -> Tensor:
    """``k`` random picks among the top ``ceil(fraction * n)`` candidates by ``score``."""
    rows = score.shape[0]
    if k == 0 or score.shape[1] == 0:
        return score.new_full((rows, k), -1, dtype=torch.long)
    n = mask.sum(1)
    # ceil with a tolerance so that e.g. 0.1 * 30 gives 3, not 4.
    q = torch.ceil(n.to(torch.float64) * fraction - 1e-9).long().clamp(min=1) * (n > 0)
    qmax = int(q.max())
    if qmax == 0:
        return score.new_full((rows, k), -1, dtype=torch.long)
    _, top = torch.where(mask, score, -math.inf).topk(qmax, dim=1)
    eligible = (torch.arange(qmax, device=score.device)[None, :] < q[:, None]) & mask.gather(1, top)
    pick = _topk_masked(keys.gather(1, top), eligible, min(k, qmax))
    idx = torch.where(pick >= 0, top.gather(1, pick.clamp(min=0)), -1)
    return _pad_columns(idx, k)


def select_from_bank(
    feats: Tensor,
    labels: Tensor,
    bank_feats: Tensor,
    bank_labels: Tensor,
    mode: str,
    k_pos: int,
    k_neg: int,
    semi_hard_fraction: float = 0.1,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor | None:
    """Per-anchor subsets of the memory bank: ``bank_index (N, k_pos + k_neg)`` or ``None``.

    Columns ``[0, k_pos)`` hold positives (same label), ``[k_pos, k_pos + k_neg)`` negatives;
    ``-1`` pads when fewer candidates exist. Modes:

    * ``all``: returns ``None`` (every entry counts for every anchor);
    * ``random``: ``k_pos`` / ``k_neg`` entries uniformly without replacement;
    * ``hardest``: the ``k_neg`` most similar negatives and the ``k_pos`` least similar
      positives;
    * ``semi_hard``: ``k`` at random from the nearest ``ceil(semi_hard_fraction * n_neg)``
      negatives and from the farthest ``ceil(semi_hard_fraction * n_pos)`` positives.

    Similarities are computed under ``no_grad`` in float32 (or float64), in chunks of
    ``chunk_size`` anchors against the whole bank (default ``SELECT_CHUNK_ELEMENTS // M``
    anchors). Peak memory: the bank cast to the compute dtype when stored in another dtype
    (``M x D``) plus, per chunk, about ``chunk_size x M x 13`` bytes (similarities, random keys,
    a mask and top-k workspace) -- 64 MiB of similarities for a 19 x 30,000 bank at the default.
    The random keys are drawn per chunk in anchor order, so on CPU the result does not depend
    on ``chunk_size``.
    """
    if mode not in MEMORY_SAMPLING_MODES:
        raise ConfigError(
            f"memory_sampling={mode!r} is not supported; allowed values: "
            + ", ".join(repr(m) for m in MEMORY_SAMPLING_MODES)
        )
    if mode == "all":
        return None
    _check_int("k_pos", k_pos, 0)
    _check_int("k_neg", k_neg, 0)
    if not 0 < semi_hard_fraction <= 1:
        raise ConfigError(
            f"semi_hard_fraction={semi_hard_fraction!r} is invalid; allowed values: (0, 1]"
        )
    N, M = feats.shape[0], bank_feats.shape[0]
    device = feats.device
    out = torch.full((N, k_pos + k_neg), -1, dtype=torch.long, device=device)
    if N == 0 or M == 0 or k_pos + k_neg == 0:
        return out
    rows = chunk_size if chunk_size is not None else max(1, SELECT_CHUNK_ELEMENTS // M)
    _check_int("chunk_size", rows, 1)
    with torch.no_grad(), autocast_off(device.type):
        z = feats.detach().to(_compute_dtype(feats.dtype))
        bank = bank_feats.detach().to(device, z.dtype)
        blabels = bank_labels.reshape(-1).to(device, torch.long)
        labels = labels.reshape(-1).to(device, torch.long)
        for s in range(0, N, rows):
            zc, lc = z[s : s + rows], labels[s : s + rows]
            pos = lc[:, None] == blabels[None, :]
            if mode == "random":
                keys = torch.rand(zc.shape[0], M, generator=generator, device=device)
                pos_idx = _topk_masked(keys, pos, k_pos)
                neg_idx = _topk_masked(keys, ~pos, k_neg)
            else:
                sim = zc @ bank.T
                if mode == "hardest":
                    pos_idx = _topk_masked(-sim, pos, k_pos)
                    neg_idx = _topk_masked(sim, ~pos, k_neg)
                else:
                    keys = torch.rand(zc.shape[0], M, generator=generator, device=device)
                    pos_idx = _semi_hard(-sim, pos, k_pos, semi_hard_fraction, keys)
                    neg_idx = _semi_hard(sim, ~pos, k_neg, semi_hard_fraction, keys)
            out[s : s + rows, :k_pos] = pos_idx
            out[s : s + rows, k_pos:] = neg_idx
    return out


# ================================================================================== module
class PixelContrastLoss(SeededModule):
    """Pixel contrast with segment-aware hard anchors and an optional cross-image memory.

    ``forward(embed (B, D, h, w), seg_logits (B, C, h', w'), target (B, H, W), image_ids=None)``:
    labels are resized to the embedding grid by nearest neighbour (labels outside
    ``[0, num_classes)`` become ``ignore_index``), predictions are the argmax of ``seg_logits``
    (bilinearly resized to the grid when sizes differ), anchors are sampled, the memory is read
    (before this batch is added), the loss is computed and the batch is pushed into the memory
    (detached). The memory is a submodule, so it is part of ``state_dict()``. So is the state of
    the module's random generator (``get_extra_state``: a ``uint8`` tensor); it is also
    available through :meth:`generator_state` / :meth:`load_generator_state`.
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
        memory: ClassMemory | None = None,
        memory_sampling: str = "all",
        k_pos: int = 1024,
        k_neg: int = 2048,
        semi_hard_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        _check_int("max_samples", max_samples, 1)
        _check_int("max_views", max_views, 1)
        _check_int("k_pos", k_pos, 0)
        _check_int("k_neg", k_neg, 0)
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name}={value!r} is invalid; allowed values: numbers > 0")
        if memory_sampling not in MEMORY_SAMPLING_MODES:
            raise ConfigError(
                f"memory_sampling={memory_sampling!r} is not supported; allowed values: "
                + ", ".join(repr(m) for m in MEMORY_SAMPLING_MODES)
            )
        if not 0 < semi_hard_fraction <= 1:
            raise ConfigError(
                f"semi_hard_fraction={semi_hard_fraction!r} is invalid; allowed values: (0, 1]"
            )
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index={ignore_index} is a class id (num_classes={num_classes}); "
                "allowed values: outside [0, num_classes)"
            )
        if memory is not None and memory.num_classes != num_classes:
            raise ConfigError(
                f"memory has num_classes={memory.num_classes} but the loss has "
                f"num_classes={num_classes}; they must match"
            )
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.base_temperature = float(base_temperature)
        self.max_samples = max_samples
        self.max_views = max_views
        self.ignore_index = ignore_index
        self.memory = memory
        self.memory_sampling = memory_sampling
        self.k_pos = k_pos
        self.k_neg = k_neg
        self.semi_hard_fraction = float(semi_hard_fraction)
        self._rng = LazyGenerator(seed)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, temperature={self.temperature}, "
            f"base_temperature={self.base_temperature}, max_samples={self.max_samples}, "
            f"max_views={self.max_views}, memory_sampling={self.memory_sampling!r}"
        )

    def grid_labels(self, target: Tensor, size: tuple[int, int]) -> Tensor:
        """Labels resized to ``size`` by nearest neighbour; non-class labels -> ignore."""
        if target.dim() != 3:
            raise ConfigError(f"target must have shape (B, H, W); got {tuple(target.shape)}")
        t = target
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]
        t = t.long()
        return torch.where((t >= 0) & (t < self.num_classes), t, self.ignore_index)

    def forward(
        self,
        embed: Tensor,
        seg_logits: Tensor,
        target: Tensor,
        image_ids: Tensor | None = None,
    ) -> Tensor:
        if embed.dim() != 4:
            raise ConfigError(f"embed must have shape (B, D, h, w); got {tuple(embed.shape)}")
        B, _, h, w = embed.shape
        if seg_logits.dim() != 4 or seg_logits.shape[0] != B:
            raise ConfigError(
                f"seg_logits must have shape ({B}, C, h', w'); got {tuple(seg_logits.shape)}"
            )
        with torch.no_grad():
            labels = self.grid_labels(target.to(embed.device), (h, w))
            logits = seg_logits.detach()
            if tuple(logits.shape[-2:]) != (h, w):
                logits = F.interpolate(
                    logits.float(), size=(h, w), mode="bilinear", align_corners=False
                )
            pred = logits.argmax(1)
        gen = self._rng.get(embed.device)
        feats, anchor_labels, _ = sample_anchors(
            embed, pred, labels, self.max_samples, self.max_views, self.ignore_index, gen
        )
        bank_feats = bank_labels = bank_index = bank_slots = None
        if self.memory is not None and self.memory_sampling == "all":
            bank_slots = self.memory.slots(dtype=None)  # every entry, in the memory's layout
        elif self.memory is not None:
            bank_feats, bank_labels = self.memory.bank(dtype=None)
            if bank_feats.shape[0] == 0:
                bank_feats = bank_labels = None
            elif feats.shape[0] > 0:
                bank_index = select_from_bank(
                    feats,
                    anchor_labels,
                    bank_feats,
                    bank_labels,
                    self.memory_sampling,
                    self.k_pos,
                    self.k_neg,
                    self.semi_hard_fraction,
                    generator=gen,
                )
        loss = contrast_loss(
            feats,
            anchor_labels,
            self.temperature,
            self.base_temperature,
            bank_feats,
            bank_labels,
            bank_index,
            bank_slots=bank_slots,
        )
        if self.memory is not None:
            self.memory.push(embed.detach(), labels, image_ids, generator=gen)
        return loss
