"""The supervised InfoNCE loss of pixel contrast, one autograd function with a hand-written
backward (docs/method.md, "The loss").

:func:`contrast_loss` takes sampled anchors and, optionally, a memory bank: all entries (in a
flat ``(M, D)`` bank or in a class memory's own ``(C, K, D)`` layout) or per-anchor subsets
given by ``bank_index``. Every similarity and log-sum-exp runs in at least float32 with autocast
disabled, whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.precision import autocast_off

__all__ = ["contrast_loss", "compute_dtype"]

# (anchor x bank column) elements per chunk of the whole-bank loss: 2 Mi on CPU, 8 Mi on GPUs
# (float32: 8 / 32 MiB per matrix; a chunk holds about 9 such matrices at its peak).
LOSS_CHUNK_ELEMENTS = 1 << 21
LOSS_CHUNK_ELEMENTS_GPU = 1 << 23
# The whole-bank block keeps its N x M similarities between its two forward passes and backward
# (two matrix products instead of four) while they take at most this many bytes.
LOSS_CACHE_BYTES = 1 << 30
GATHER_CHUNK_ELEMENTS = 1 << 24  # gathered (chunk, K, D) bank rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss computes in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


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
    """Supervised InfoNCE over anchors and (optionally) a memory bank, docs/method.md, "The loss".

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
        dtype = compute_dtype(feats.dtype)
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
