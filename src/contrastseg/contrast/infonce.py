"""The supervised InfoNCE loss of pixel contrast, one autograd function with a closed-form
gradient formed in the call (docs/method.md, "The loss").

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
# The whole-bank block keeps its N x M similarities between its two loss passes and the gradient
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

# The in-batch and class-slot blocks keep exp(s) per pair (no reference subtracted) while, for
# every anchor, the log-sum-exp of the block's negatives and the overall reference m lie within
# +-bound (then nothing kept overflows, and the sums keep full precision); otherwise the block
# computes again with the exact maximum subtracted. exp(s) is computed as exp2(s log2(e)):
# twice as fast as exp on CPUs.
_SLOT_REF_BOUND = {torch.float32: 60.0, torch.float64: 600.0}
# Anchor x memory-slot elements per chunk of the class-slot block's forward: each chunk of
# similarities is exponentiated and summed while it sits in cache (CPU), or in a few large
# pieces (GPU).
SLOT_CHUNK_ELEMENTS = 1 << 21
SLOT_CHUNK_ELEMENTS_GPU = 1 << 25
# Anchor x slot elements per chunk of the positive terms (N x K elementwise work).
_POS_CHUNK_ELEMENTS = 1 << 20
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _masked_max(sim: Tensor, mask: Tensor) -> Tensor:
    if sim.shape[1] == 0:
        return sim.new_full((sim.shape[0],), -math.inf)
    return torch.where(mask, sim, -math.inf).amax(1)


class _InBatchBlock:
    """Anchors against each other: ``s = z z^T / tau``; self-pairs are neither kind.

    The anchors are grouped by label inside the block, so that same-label pairs form diagonal
    blocks listed once as flat indices (``O(sum n_c^2)`` work for the positive terms). Forward:
    one product, the own-label entries copied out and set to ``-inf``, ``exp`` in place and the
    row sums; the reference is the log-sum-exp of the negatives, as in the class-slot block.
    Backward: ``exp(s)`` is symmetric, so ``G + G^T`` is one elementwise pass
    (``exp(s_ij) (c_i + c_j)``) with the positive pairs written in, and one product.
    """

    num_chunks = 0  # not one of the cached/streamed (sim, pos, neg) blocks

    def __init__(self, labels: Tensor, inv_tau: float) -> None:
        n = labels.shape[0]
        device = labels.device
        self.inv_tau = inv_tau
        self.order = torch.argsort(labels, stable=True)
        _, counts = torch.unique_consecutive(labels[self.order], return_counts=True)
        n_row = torch.repeat_interleave(counts, counts)  # anchors of each row's label
        row_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        total = int((counts * counts).sum())  # one host sync: the number of same-label pairs
        rows = torch.repeat_interleave(torch.arange(n, device=device), n_row, output_size=total)
        row_off = torch.cumsum(n_row, 0) - n_row  # each row's first pair
        cols = row_start[rows] + torch.arange(total, device=device) - row_off[rows]
        self.rows, self.n_row = rows, n_row
        self.flat = rows * n + cols
        self.diag = rows == cols
        self.transposed = row_off[cols] + rows - row_start[cols]  # pair (j, i) of pair (i, j)

    def _sims(self) -> Tensor:
        """``s log2(e)`` with the own-label entries at ``-inf``; copies them to ``pos`` first."""
        s2 = (self.zp * (self.inv_tau * _LOG2E)) @ self.zp.T
        flat = s2.view(-1)
        self.pos = flat[self.flat]
        flat.index_fill_(0, self.flat, -math.inf)
        return s2

    def _unsort(self, x: Tensor) -> Tensor:
        out = torch.empty_like(x)
        out[self.order] = x
        return out

    def negative_max(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: a reference at least as large as every negative logit (their
        log-sum-exp, or their maximum when that is far from 0; ``-inf`` without any), and the
        number of positives."""
        n = z.shape[0]
        self.zp = z[self.order]
        self.ex = self._sims().exp2_()  # exp(s), own labels 0
        self.e_ref = self.ex.sum(1)
        self.shifted = False
        n_neg = n - self.n_row
        lse = torch.log(self.e_ref)
        if bool(((n_neg > 0) & ~(lse.abs() <= _SLOT_REF_BOUND[z.dtype])).any()):
            self.shifted = True
            self.ex = self._sims()  # raw, exponentiated in negative_sum
            ref = self.ex.amax(1) * _LN2
        else:
            ref = torch.where(n_neg > 0, lse, -math.inf)
        return self._unsort(ref), self._unsort(self.n_row - 1)

    def negative_sum(self, m: Tensor) -> Tensor:
        """Per anchor: ``sum over negatives of exp(s - m)``."""
        mp = m[self.order]
        if not self.shifted and bool((mp.abs() > _SLOT_REF_BOUND[m.dtype]).any()):
            self.shifted = True
            self.ex = self._sims()
        if self.shifted:
            self.ex = self.ex.sub_((mp * _LOG2E)[:, None]).exp2_()  # exp(s - m), not symmetric
            self.e_ref = self.ex.sum(1)
        self.shift = torch.zeros_like(mp) if self.shifted else -mp  # ref - m
        e = torch.where(self.e_ref > 0, self.e_ref * torch.exp(self.shift), 0.0)
        return self._unsort(e)

    def positive_terms(self, m: Tensor, e_safe: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: ``sum_p log(exp(a_p) + E) - a_p`` and ``sum_p 1 / (exp(a_p) + E)``."""
        mp, ep = m[self.order], e_safe[self.order]
        a2 = (self.pos - (mp * _LOG2E)[self.rows]).clamp_(max=_EXP_CLAMP * _LOG2E)
        d = torch.exp2(a2).add_(ep[self.rows])
        t = torch.where(self.diag, 0.0, torch.log(d) - a2 * _LN2)
        self.r = torch.where(self.diag, 0.0, d.reciprocal_())
        del self.pos
        sums = _row_sums(self.rows, torch.stack([t, self.r], 1), self.n_row)
        return self._unsort(sums[:, 0]), self._unsort(sums[:, 1])

    def grad(self, w: Tensor, e_safe: Tensor, r_sum: Tensor) -> Tensor:
        """Gradient with respect to the anchors (``w``: the row weights): ``(G + G^T) z / tau``."""
        o = self.order
        c = w[o] * r_sum[o] * torch.exp(self.shift)  # per row: negatives' coefficient
        if self.shifted:
            g = self.ex * c[:, None]
            g = g + g.T
        else:
            g = torch.addcmul(self.ex * c[:, None], self.ex, c[None, :])
        pair = (-w[o] * e_safe[o])[self.rows] * self.r  # positive pairs (i, j)
        g.view(-1)[self.flat] = pair + pair[self.transposed]
        return self._unsort((g @ self.zp).mul_(self.inv_tau))


class _GatheredBankBlock:
    """Anchor ``i`` against bank rows ``index[i]`` (``-1`` = padding), gathered in row chunks.

    At most ``rows x K x D`` gathered bank elements exist at a time, for the loss and for its
    gradient.
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

    The block is streamed: each of its three passes (two for the loss, one for the gradient) visits
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
        """Drop chunk ``k``'s kept similarities (after its last use, in the gradient pass)."""
        if self.kept is not None:
            self.kept.pop(k, None)

    def backprop(self, z: Tensor, k: int, grad_sim: Tensor) -> Tensor:
        s, e = self.spans[k]
        return (grad_sim * self.inv_tau) @ self.bank[s:e].to(z.dtype)


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` in ``a``'s dtype (float32 or float64); ``b`` may be stored narrower (a bf16 or
    fp16 memory). On CUDA a float32 ``a`` meets such a ``b`` as ``b``'s dtype with float32
    accumulation and output (tensor cores); elsewhere ``b`` is widened (exactly)."""
    if b.dtype != a.dtype:
        if a.is_cuda and a.dtype == torch.float32:
            try:
                r = torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
            except (TypeError, RuntimeError):  # a torch without mm(out_dtype=)
                r = torch.mm(a, b.to(a.dtype))
            return r if out is None else out.copy_(r)
        b = b.to(a.dtype)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


class _ClassSlotBankBlock:
    """Every filled memory slot against every anchor, the memory laid out by class.

    ``slots (C, K, D)`` and ``valid (C, K)``: slot ``k`` of class ``c``, filled or not. An
    anchor's memory positives are the filled slots of its own class; its negatives all other
    classes' filled slots.

    Forward is one product with the memory, in column chunks (one class or a range of its
    slots; several whole classes when the memory is small); each chunk is reduced while it is
    in cache: the anchors of each of its classes copy their similarities out
    (their positives), then ``exp`` in place (as ``exp2`` of similarities scaled by
    ``log2(e)``, twice as fast on CPUs) and the per-anchor sum. The anchor's reference ``m``
    for the loss is the log-sum-exp of its memory negatives (not their maximum: no max pass;
    the loss is the same). The ``N x C x K`` matrix ``exp(s)`` stays for the gradient (formed
    in forward, while ``slots`` is still the memory as read), which is one product with the
    memory too: the own-class entries are overwritten with the positive
    coefficients (relative to the row's negative coefficient), and the whole matrix times the
    memory, rows scaled after, is the gradient. When ``exp(s)`` would leave the safe range
    (logits beyond about +-60 in float32), forward computes the exact maximum first and keeps
    ``exp(s - m)`` instead (two products more).
    """

    num_chunks = 0  # not one of the cached/streamed (sim, pos, neg) blocks

    def __init__(self, labels, slots, valid, inv_tau, all_valid, chunk_elements) -> None:
        C, K, _ = slots.shape
        n = labels.shape[0]
        self.labels, self.slots, self.valid, self.inv_tau = labels, slots, valid, inv_tau
        self.all_valid = all_valid  # the usual case once the memory is full: no masking
        self.cols = max(1, min(K, chunk_elements // max(1, n)))
        # Anchors grouped by class (one host sync for the group sizes).
        self.order = torch.argsort(labels, stable=True)
        self.sorted_labels = labels[self.order]
        bounds = [0]
        for count in torch.bincount(labels, minlength=C)[:C].tolist():
            bounds.append(bounds[-1] + count)
        self.bounds = bounds
        self.own = labels[:, None] == torch.arange(C, device=labels.device)[None, :]  # (N, C)

    def _chunks(self):
        """Column chunks ``(c0, c1, k0, k1)``: classes ``c0:c1``, slots ``k0:k1``. Several whole
        classes per chunk when one class's slots fit (a small memory: fewer, larger steps),
        else one class in ranges of ``cols`` slots."""
        C, K, _ = self.slots.shape
        if self.cols >= K:
            step = self.cols // K
            for c0 in range(0, C, step):
                yield c0, min(C, c0 + step), 0, K
        else:
            for c in range(C):
                for k0 in range(0, K, self.cols):
                    yield c, c + 1, k0, min(K, k0 + self.cols)

    def _product(self, zs2: Tensor, c0: int, c1: int, k0: int, k1: int, copy_pos: bool) -> Tensor:
        """Chunk ``(c0:c1, k0:k1)`` of ``s log2(e)`` into the kept matrix, returned as its
        ``(N, c1 - c0, k1 - k0)`` view; the anchors of each class copy theirs to ``pos``
        first."""
        view = self.store[:, c0:c1, k0:k1]
        rows = self.slots[c0:c1, k0:k1].reshape(-1, self.slots.shape[2])
        _mm(zs2, rows.t(), out=view.flatten(1))  # a view: whole classes, or one class
        if not self.all_valid:
            view.masked_fill_(~self.valid[c0:c1, k0:k1], -math.inf)
        if copy_pos:
            for c in range(c0, c1):
                s0, s1 = self.bounds[c], self.bounds[c + 1]
                if s1 > s0:
                    self.pos[s0:s1, k0:k1] = view[self.order[s0:s1], c - c0]
        return view

    def _negative_exp_sums(self, m: Tensor | None) -> Tensor:
        """One pass of products over the chunks, each exponentiated in place into the kept
        matrix: per anchor, the sum of ``exp(s)`` (``m`` None; the anchors copy their
        positives' similarities out first) or of ``exp(s - m)`` over its memory negatives."""
        sums = self.zs2.new_zeros(self.own.shape)  # per anchor and class
        m2 = None if m is None else (m * _LOG2E)[:, None, None]
        for c0, c1, k0, k1 in self._chunks():
            chunk = self._product(self.zs2, c0, c1, k0, k1, copy_pos=m is None)
            if m2 is not None:
                chunk.sub_(m2)
            sums[:, c0:c1] += chunk.exp2_().sum(2)
        return sums.masked_fill_(self.own, 0.0).sum(1)

    def negative_max(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: a detached reference at least as large as every memory negative's
        logit (their log-sum-exp; ``-inf`` without any), and the number of memory positives.
        Computes the similarities and keeps ``exp(s)``."""
        n, (C, K) = z.shape[0], self.valid.shape
        self.zs2 = z * (self.inv_tau * _LOG2E)
        self.store = z.new_empty((n, C, K))
        self.pos = z.new_empty((n, K))  # own-class similarities x log2(e), class order
        self.e_ref = self._negative_exp_sums(None)
        self.shifted = False  # exp(s) kept, not exp(s - m)
        n_valid = self.valid.sum(1)
        n_neg = n_valid.sum() - n_valid[self.labels]
        lse = torch.log(self.e_ref)
        bound = _SLOT_REF_BOUND[z.dtype]
        if bool(((n_neg > 0) & ~(lse.abs() <= bound)).any()):  # out of range: exact maxima
            maxes = z.new_full((n, C), -math.inf)
            for c0, c1, k0, k1 in self._chunks():
                chunk = self._product(self.zs2, c0, c1, k0, k1, False).amax(2)
                maxes[:, c0:c1] = torch.maximum(maxes[:, c0:c1], chunk)
            block_max = maxes.masked_fill_(self.own, -math.inf).amax(1) * _LN2
            self.shifted = True
        else:
            block_max = torch.where(n_neg > 0, lse, -math.inf)
        return block_max, n_valid[self.labels]

    def negative_sum(self, m: Tensor) -> Tensor:
        """Per anchor: ``sum over memory negatives of exp(s - m)`` (``m`` the overall detached
        reference, 0 for anchors without negatives)."""
        if not self.shifted and bool((m.abs() > _SLOT_REF_BOUND[m.dtype]).any()):
            self.shifted = True  # the in-batch reference is far from 0: keep exp(s - m)
        if self.shifted:
            self.e_ref = self._negative_exp_sums(m)
        del self.zs2
        self.shift = torch.zeros_like(m) if self.shifted else -m  # ref - m, ref = 0 or m
        e_ref, self.e_ref = self.e_ref, None
        return torch.where(e_ref > 0, e_ref * torch.exp(self.shift), 0.0)

    def positive_terms(self, m: Tensor, e_safe: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor: ``sum_p log(exp(a_p) + E) - a_p`` and ``sum_p 1 / (exp(a_p) + E)``;
        keeps the ``1 / (exp(a_p) + E)`` (``pos`` turns into them in place)."""
        n, K = self.pos.shape
        m2, es = (m * _LOG2E)[self.order, None], e_safe[self.order, None]
        terms, r_sum = m.new_zeros(n), m.new_zeros(n)
        rows = max(1, _POS_CHUNK_ELEMENTS // max(1, K))
        for s in range(0, n, rows):
            e = min(n, s + rows)
            a2 = self.pos[s:e].sub_(m2[s:e]).clamp_(max=_EXP_CLAMP * _LOG2E)  # a log2(e)
            d = torch.exp2(a2).add_(es[s:e])
            if self.all_valid:
                terms[s:e] = torch.log(d).sum(1) - a2.sum(1) * _LN2
                r = torch.reciprocal(d, out=a2)
            else:
                pv = self.pos_valid(s, e)
                terms[s:e] = torch.where(pv, torch.log(d) - a2 * _LN2, 0.0).sum(1)
                r = a2.copy_(torch.where(pv, d.reciprocal_(), 0.0))
            r_sum[s:e] = r.sum(1)
        self.r = self.pos  # (N, K): 1 / d, 0 on empty slots; class order
        del self.pos
        out_terms, out_r = torch.empty_like(terms), torch.empty_like(r_sum)
        out_terms[self.order] = terms
        out_r[self.order] = r_sum
        return out_terms, out_r

    def pos_valid(self, s: int, e: int) -> Tensor:
        return self.valid[self.sorted_labels[s:e]]

    def grad(self, w: Tensor, e_safe: Tensor, r_sum: Tensor) -> Tensor:
        """Gradient with respect to the anchors (``w``: the row weights). Negatives:
        ``w r_sum exp(s - m)``; positives: ``-w E / d``. The own-class
        entries of the kept matrix take ``-(E / r_sum) exp(-shift) / d`` so that one row scale
        ``w r_sum exp(shift)`` after the product gives both."""
        n, C, K = self.store.shape
        scale = torch.exp(self.shift)
        ratio = torch.where(r_sum > 0, -e_safe / torch.where(r_sum > 0, r_sum, 1.0), 0.0)
        self.store[self.order, self.sorted_labels] = (ratio / scale)[self.order, None] * self.r
        flat = self.slots.reshape(C * K, -1)
        if flat.dtype == self.store.dtype:
            g = torch.mm(self.store.view(n, C * K), flat)
        else:  # a narrower memory: widened chunk by chunk
            g = self.store.new_zeros((n, flat.shape[1]))
            for s in range(0, C * K, self.cols):
                g += _mm(self.store.view(n, C * K)[:, s : s + self.cols], flat[s : s + self.cols])
        return g.mul_((w * r_sum * scale * self.inv_tau)[:, None])


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

    ``m_i`` is any detached reference at least as large as every negative logit of row ``i``
    (the loss does not depend on it): the largest over the blocks of each block's own
    reference (a maximum, or the log-sum-exp of its negatives).

    The in-batch and class-slot blocks group pairs by label and keep ``exp(s)`` (see their
    docstrings). Cached blocks (gathered bank) keep their similarities; their positive pairs
    are compacted with ``nonzero`` (one host sync per block) so the positive terms cost only
    ``O(#positives)``, and ``exp(s - m)`` and ``1 / d`` are kept for the gradient. The
    streamed bank block recomputes its similarities in each of its two forward passes (maximum
    and negative sum with an online log-sum-exp, then the positive terms) and in the gradient
    pass.

    **The gradient is formed in forward.** The loss is a scalar, so its gradient is
    ``grad * dloss/dz``; with ``need_grad`` forward computes ``dloss/dz (N, D)`` right after
    the loss, from the bank exactly as it was read, and keeps only that (saved with
    ``save_for_backward``, under autograd's version check). Backward reads nothing else: a
    memory written after the call (its own push, another micro-batch's forward, a second
    backward with ``retain_graph``) cannot change the gradient of a loss computed before, and
    the blocks' ``N x M`` matrices are freed when forward returns instead of living until
    backward. The arithmetic is the same two products per bank (one for the loss, one for the
    gradient), only earlier.
    """

    @staticmethod
    def forward(ctx, z: Tensor, blocks: list, scale: float, need_grad: bool) -> Tensor:
        n = z.shape[0]
        keys = [(bi, k) for bi, b in enumerate(blocks) for k in range(b.num_chunks)]
        cached = {key: blocks[key[0]].sim(z, key[1]) for key in keys if blocks[key[0]].cache}
        streamed = [key for key in keys if key not in cached]
        slotted = [b for b in blocks if hasattr(b, "negative_max")]

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
        loss = (w * terms).sum()
        grad_z = _loss_gradient(z, blocks, state, m, e_safe, r_sum, w) if need_grad else None
        ctx.save_for_backward(grad_z)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (grad_z,) = ctx.saved_tensors
        return grad * grad_z, None, None, None


def _loss_gradient(
    z: Tensor, blocks: list, state: dict, m: Tensor, e_safe: Tensor, r_sum: Tensor, w: Tensor
) -> Tensor:
    """``dloss/dz (N, D)`` (see :class:`_ContrastFunction`), from the blocks' kept matrices
    and the banks as forward read them; each block's matrices are released as it is done."""
    coef_pos = -w * e_safe
    coef_neg = (w * r_sum)[:, None]
    grad_z = torch.zeros_like(z)
    for bi, b in enumerate(blocks):
        for k in range(b.num_chunks):
            if (bi, k) in state:
                ea, negf, rows, cols, r = state.pop((bi, k))
                g = (coef_neg * ea).mul_(negf)
                g[rows, cols] = coef_pos[rows] * r
            else:
                sim, pos, neg = b.sim(z, k)
                ea = torch.exp((sim - m[:, None]).clamp_(max=_EXP_CLAMP))
                r = (ea + e_safe[:, None]).reciprocal_()
                g = torch.where(pos, coef_pos[:, None] * r, torch.where(neg, coef_neg * ea, 0.0))
                del sim
                b.release(k)
            grad_z += b.backprop(z, k, g)
        if hasattr(b, "negative_max"):
            grad_z += b.grad(w, e_safe, r_sum)
    return grad_z


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

    Numerics: computed in at least float32 with autocast disabled. With ``m_i`` a detached
    reference (the largest of the blocks' own: the maximum of a block's negative logits or
    their log-sum-exp, so at least every ``s_in``), ``a_ij = s_ij - m_i`` and
    ``E_i = sum_n exp(a_in) >= 1``, each term is ``log(exp(a_ip) + E_i) - a_ip``, which equals
    the formula above.
    ``a`` is clamped above at 80 before ``exp``: negatives never reach it, and a positive
    beyond it has a term below ``|N| exp(-80)``. The in-batch and class-slot blocks first keep
    ``exp(s)`` itself and recompute with the maximum subtracted when logits leave about +-60
    (float32; +-600 in float64).

    Gradient: the loss is one autograd function with a closed-form gradient, computed in
    forward when autograd needs it (grad mode on and ``feats`` requiring a gradient) from the
    bank exactly as it was read; backward only scales the kept ``(N, D)`` gradient, so writing
    to the memory after the call (its push, a second micro-batch) cannot change it.

    Memory: between the loss and its gradient the function keeps the in-batch ``N x N``
    matrix, with ``bank_slots`` the ``N x C x K`` matrix ``exp(s)`` (used while it takes at
    most ``cache_bytes``; one product with the memory for the loss and one for the gradient)
    and with ``bank_index`` the gathered ``N x K`` matrices; all are freed when the call
    returns. With ``bank_index`` the bank rows are gathered in anchor chunks of at most
    ``GATHER_CHUNK_ELEMENTS`` elements (64 MiB in float32) in both passes, so the
    ``N x K x D`` gather never exists in one piece. Without it (a flat ``bank_feats``) the bank is
    processed in column chunks of ``chunk_elements // N`` entries (default
    ``LOSS_CHUNK_ELEMENTS`` on CPU, ``LOSS_CHUNK_ELEMENTS_GPU`` elsewhere), recomputing the
    similarities in the two loss passes (maximum and negative sum with an online
    log-sum-exp, then the positive terms) and in the gradient pass: peak memory is about nine
    ``N x cols`` matrices, never ``N x M``. When the ``N x M`` similarities take at most
    ``cache_bytes`` (default ``LOSS_CACHE_BYTES``, 1 GiB) they are computed once and kept for
    the gradient instead: two matrix products with the bank instead of four.
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
        cpu = z.device.type == "cpu"
        slot_chunk = chunk_elements
        if slot_chunk is None:
            slot_chunk = SLOT_CHUNK_ELEMENTS if cpu else SLOT_CHUNK_ELEMENTS_GPU
        if chunk_elements is None:
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
                blocks.append(_ClassSlotBankBlock(labels, slots, filled, inv_tau, full, slot_chunk))
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
        need_grad = torch.is_grad_enabled() and z.requires_grad
        return _ContrastFunction.apply(z, blocks, temperature / base_temperature, need_grad)
