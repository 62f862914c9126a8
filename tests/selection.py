"""Checks of choices made over floating-point scores (top-k, argmax, hardest and semi-hard
memory picks) that accept any choice correct within a stated tolerance.

Two code paths that reach the same scores through different operations (another kernel,
another order of summation, another precision) agree only to rounding, and where candidates
tie or nearly tie, ``topk``/``argmax`` may keep either of them. A selection is therefore
checked by what it selects: every picked candidate scores within ``eps`` of the k-th best,
and no unpicked one beats it by more than ``eps``. Where the boundary is clear (the k-th and
the (k+1)-th best differ by more than ``eps``), the set is unique and is compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _row_candidates(mask_row: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask_row, as_tuple=False).reshape(-1)


def _check_pool(
    picked: torch.Tensor,
    scores: torch.Tensor,
    cand: torch.Tensor,
    want: int,
    pool: int,
    eps: float,
    what: str,
    expected: torch.Tensor | None,
) -> tuple[list[int], float] | None:
    """``want`` distinct candidates first, ``-1`` padding after, each within ``eps`` of the
    ``pool``-th best score; equal to ``expected`` as a set where the pool's edge is clear.
    Returns the picks and the edge's score (None when nothing is to be picked)."""
    valid = picked[picked >= 0]
    assert valid.numel() == want, f"{what}: {valid.numel()} picked, {want} expected"
    assert bool((picked[want:] == -1).all()), f"{what}: padding is not at the end"
    chosen = valid.tolist()
    assert len(set(chosen)) == want, f"{what}: a candidate is picked twice"
    assert set(chosen) <= set(cand.tolist()), f"{what}: a pick is not a candidate"
    if want == 0:
        return None
    ordered = scores[cand].double().sort(descending=True).values
    edge = float(ordered[pool - 1])
    worst_picked = float(scores[valid].double().min())
    assert worst_picked >= edge - eps, (
        f"{what}: a pick scores {worst_picked:.3e}, outside the best {pool} ({edge:.3e}, "
        f"eps {eps:.0e})"
    )
    clear = pool == cand.numel() or float(ordered[pool - 1] - ordered[pool]) > eps
    if expected is not None and clear:
        other = set(expected[expected >= 0].tolist())
        assert other == set(chosen), f"{what}: the set of picks differs at a clear boundary"
    return chosen, edge


def check_top_k(
    picked: torch.Tensor,
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    eps: float,
    what: str = "",
    expected: torch.Tensor | None = None,
) -> None:
    """One row: ``picked (k,)`` indices (``-1`` pads at the end) is a top-``k`` of ``scores
    (M,)`` over the entries where ``candidates (M,)`` is true, within ``eps``: no unpicked
    candidate beats the k-th best by more than ``eps``. ``expected``: a top-``k`` drawn another
    way; it must hold the same set where the boundary is clear."""
    cand = _row_candidates(candidates)
    want = min(k, int(cand.numel()))
    found = _check_pool(picked, scores, cand, want, want, eps, what, expected)
    if found is None:
        return
    chosen, kth = found
    unpicked = sorted(set(cand.tolist()) - set(chosen))
    if unpicked:
        best_unpicked = float(scores[unpicked].double().max())
        assert best_unpicked <= kth + eps, (
            f"{what}: an unpicked candidate scores {best_unpicked:.3e} above the {want}-th best "
            f"{kth:.3e} (eps {eps:.0e})"
        )


def semi_hard_pool(n: int, fraction: float) -> int:
    """How many of ``n`` candidates the semi-hard picks are drawn from (at least one)."""
    return max(1, math.ceil(n * fraction - 1e-9)) if n else 0


def check_semi_hard(
    picked: torch.Tensor,
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    fraction: float,
    eps: float,
    what: str = "",
    expected: torch.Tensor | None = None,
) -> None:
    """One row: ``picked (k,)`` holds ``min(k, q)`` distinct candidates among the ``q =
    ceil(fraction * n)`` best by ``scores``, within ``eps``. ``expected``: the picks drawn
    with the same random keys another way; where the pool's boundary is clear, the pool is
    unique, and so are the picks."""
    cand = _row_candidates(candidates)
    q = semi_hard_pool(int(cand.numel()), fraction)
    _check_pool(picked, scores, cand, min(k, q), q, eps, what, expected)


def check_bank_selection(
    index: torch.Tensor,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    mode: str,
    k_pos: int,
    k_neg: int,
    fraction: float,
    eps: float,
    what: str = "",
    expected: torch.Tensor | None = None,
) -> None:
    """``index (N, k_pos + k_neg)`` from ``select_from_bank`` in ``mode`` (``hardest`` or
    ``semi_hard``) against the similarities of ``anchors (N, D)`` and ``bank (M, D)`` computed
    here in float64: positives are the least similar entries of the anchor's class, negatives
    the most similar of the others."""
    sim = anchors.double() @ bank.double().T
    for i in range(index.shape[0]):
        same = bank_labels.reshape(-1) == labels.reshape(-1)[i]
        parts = (
            (index[i, :k_pos], -sim[i], same, k_pos, "positives"),
            (index[i, k_pos:], sim[i], ~same, k_neg, "negatives"),
        )
        for j, (picked, score, cand, k, name) in enumerate(parts):
            want = None
            if expected is not None:
                want = expected[i, :k_pos] if j == 0 else expected[i, k_pos:]
            label = f"{what} anchor {i} {name}"
            if mode == "hardest":
                check_top_k(picked, score, cand, k, eps, label, want)
            elif mode == "semi_hard":
                check_semi_hard(picked, score, cand, k, fraction, eps, label, want)
            else:
                raise ValueError(f"no score-based check for mode {mode!r}")


def check_argmax(choice, scores, eps: float, what: str = "", axis: int = 0) -> None:
    """``choice`` (an index per position) is an argmax of ``scores`` along ``axis`` within
    ``eps``: the chosen score is at most ``eps`` below the best one at every position."""
    scores = np.asarray(scores, dtype=np.float64)
    choice = np.asarray(choice)
    picked = np.take_along_axis(scores, np.expand_dims(choice, axis), axis).squeeze(axis)
    gap = scores.max(axis) - picked
    worst = float(gap.max()) if gap.size else 0.0
    assert worst <= eps, (
        f"{what}: at {int((gap > eps).sum())} positions the chosen class scores up to "
        f"{worst:.3e} below the best (eps {eps:.0e})"
    )
