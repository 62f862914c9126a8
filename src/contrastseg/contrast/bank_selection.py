"""Memory-bank sampling: which memory entries each anchor is contrasted with
(docs/method.md, "Memory sampling"): ``all``, ``random``, ``hardest``, ``semi_hard``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from contrastseg.checks import check_int
from contrastseg.contrast.infonce import compute_dtype
from contrastseg.errors import ConfigError
from contrastseg.precision import autocast_off

__all__ = ["MEMORY_SAMPLING_MODES", "select_from_bank"]

MEMORY_SAMPLING_MODES = ("all", "random", "hardest", "semi_hard")
SELECT_CHUNK_ELEMENTS = 1 << 24  # 16 Mi elements: 64 MiB per float32 chunk x M matrix


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
    check_int("k_pos", k_pos, 0)
    check_int("k_neg", k_neg, 0)
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
    check_int("chunk_size", rows, 1)
    with torch.no_grad(), autocast_off(device.type):
        z = feats.detach().to(compute_dtype(feats.dtype))
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
