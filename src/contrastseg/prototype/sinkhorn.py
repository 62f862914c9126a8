"""Sinkhorn-Knopp assignment of pixels to the prototypes of their class, all classes at once.

ProtoSeg balances, within every class ``k`` of a batch, the ``n_k`` labelled pixels over the
class's ``M`` prototypes: an entropic optimal transport plan between the pixels (uniform mass
``1 / n_k`` each) and the prototypes (``1 / M`` each), from the cosines ``x (n_k, M)``, found by
a few Sinkhorn-Knopp iterations on ``exp(x / epsilon)``. The released code runs one small
problem per class in a Python loop; :func:`segment_sinkhorn` solves all of them in one pass over
the ``(N, M)`` scores with segment sums (per class totals, per (class, prototype) row sums with
``index_add_``, per pixel column sums), without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_noise_order", "segment_sinkhorn"]


def segment_sinkhorn(
    scores: Tensor, group: Tensor, groups: int, iterations: int = 3, epsilon: float = 0.05
) -> Tensor:
    """The transport plans of every group, scaled so that each pixel's row sums to 1.

    ``scores (N, M)``: the cosines of each pixel to the ``M`` prototypes of its class;
    ``group (N,)`` int64 in ``[0, groups)``: the pixel's class (a spare group may collect pixels
    whose plan is not wanted: it is solved like the others and never mixes with them).

    For each group, with ``L = exp(x / epsilon)`` over its rows (``n`` pixels): ``L /= sum(L)``;
    then ``iterations`` times: each prototype column divided by its sum over the group's pixels
    and by ``M``, each pixel row divided by its sum and by ``n``; finally ``L *= n``. This is
    the released per-class Sinkhorn step for step (its matrix is the transpose of this one).

    Each group's scores are shifted by the group's largest score before ``exp``: the shift
    cancels in the first normalisation and keeps ``exp`` finite for any ``epsilon`` (the
    released ``exp(x / 0.05)`` reaches ``exp(20) ~ 4.9e8``, past float16's 65504). Sums that
    underflow to 0 are raised to the dtype's smallest normal number instead of dividing by 0.
    Computed in ``scores``' dtype; no gradient flows through it.
    """
    N, M = scores.shape
    x = scores.detach()
    dtype, device = x.dtype, x.device
    tiny = torch.finfo(dtype).tiny
    group = group.reshape(-1)
    peak = torch.full((groups,), float("-inf"), dtype=dtype, device=device)
    peak = peak.scatter_reduce(0, group, x.amax(1), reduce="amax", include_self=True)
    plan = torch.exp((x - peak[group, None]) / epsilon)
    count = torch.zeros(groups, dtype=dtype, device=device)
    count.index_add_(0, group, torch.ones(N, dtype=dtype, device=device))
    total = torch.zeros(groups, dtype=dtype, device=device).index_add_(0, group, plan.sum(1))
    plan = plan / total.clamp_min(tiny)[group, None]
    n = count[group, None]
    for _ in range(iterations):
        rows = torch.zeros(groups, M, dtype=dtype, device=device).index_add_(0, group, plan)
        plan = plan / rows.clamp_min(tiny)[group]
        plan = plan / M
        plan = plan / plan.sum(1, keepdim=True).clamp_min(tiny)
        plan = plan / n
    return plan * n


def gumbel_noise_order(group: Tensor) -> Tensor:
    """The row of the batch's Gumbel noise each pixel takes: pixels grouped by class in
    increasing class order, and within a class in increasing pixel index (the order of the
    released ``gt == k`` boolean indexing, class after class); ``group (N,)`` -> ``(N,)``."""
    order = torch.sort(group.reshape(-1), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank
