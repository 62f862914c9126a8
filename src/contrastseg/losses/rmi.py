"""Region mutual information loss (Zhao, Ding, Huang, Cai, NeurIPS 2019).

``rmi_loss = bce_weight * BCE + rmi_weight * RMI`` with

* BCE: sigmoid binary cross-entropy of every class against the one-hot labels, summed over the
  classes and the labelled pixels, divided by (labelled pixels + 1);
* RMI: sigmoid probabilities ``P`` (zeroed at ignored pixels, plus ``1e-6``) and one-hot labels
  ``Y`` (zeroed at ignored pixels) downsampled by pooling (kernel = stride = ``pool_size``,
  padding ``pool_size // 2``); for each (image, class) the ``R x R`` shifted views of the pooled
  maps are stacked into ``d = R^2``-dimensional vectors over the ``(h' - R + 1) x (w' - R + 1)``
  positions where the whole window fits, centred over the positions, and with ``S_Y = Y Y^T``,
  ``S_P = P P^T``, ``S_YP = Y P^T``::

      M = S_Y - S_YP (S_P + a I)^-1 S_YP^T,
      rmi = 0.5 * logdet(M + a I) = sum log(diag(chol(M + a I)) + 1e-8)

  divided by ``d``, averaged over the images and summed over the classes.

This is ``variant="released"``, the computation of the authors' released code (pooling padding,
BCE normalisation and the two small constants). ``variant="unpadded"`` is the earlier
contrastseg reading: pooling without padding (rows and columns beyond a multiple of
``pool_size`` dropped), BCE divided by the number of labelled pixels, no constants.

The matrix part runs in float64 with autocast disabled; the rest in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import check_logits_target, upsample_to
from contrastseg.precision import autocast_off

__all__ = [
    "RMI_POOLS",
    "RMI_VARIANTS",
    "region_vectors",
    "rmi_bce",
    "rmi_loss",
    "rmi_lower_bound",
    "rmi_pool",
]

RMI_POOLS = ("avg", "max")
RMI_VARIANTS = ("released", "unpadded")
PROB_EPS = 1e-6  # released: added to the (masked) probabilities
LOGDET_EPS = 1e-8  # released: added to the Cholesky diagonal before its log


def _check(radius: int, pool: str, pool_size: int, alpha: float, variant: str) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ConfigError(f"radius={radius!r} is invalid; allowed values: integers >= 1")
    if not isinstance(pool, str) or pool not in RMI_POOLS:
        raise ConfigError(
            f"pool={pool!r} is not supported; allowed values: "
            + ", ".join(repr(p) for p in RMI_POOLS)
        )
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ConfigError(f"pool_size={pool_size!r} is invalid; allowed values: integers >= 1")
    if not alpha > 0:
        raise ConfigError(f"alpha={alpha!r} is invalid; allowed values: numbers > 0")
    if not isinstance(variant, str) or variant not in RMI_VARIANTS:
        raise ConfigError(
            f"variant={variant!r} is not supported; allowed values: "
            + ", ".join(repr(v) for v in RMI_VARIANTS)
        )


def region_vectors(x: Tensor, radius: int) -> Tensor:
    """``x (B, C, h, w)`` -> ``(B, C, radius^2, n)``: the ``radius x radius`` shifted views,
    ``n = (h - radius + 1) * (w - radius + 1)`` positions, view ``(dy, dx)`` at row
    ``dy * radius + dx``."""
    B, C, h, w = x.shape
    nh, nw = h - radius + 1, w - radius + 1
    views = [
        x[:, :, dy : dy + nh, dx : dx + nw].reshape(B, C, -1)
        for dy in range(radius)
        for dx in range(radius)
    ]
    return torch.stack(views, 2)


def rmi_pool(x: Tensor, pool: str, pool_size: int, padding: int) -> Tensor:
    """Pooling with kernel = stride = ``pool_size`` and zero ``padding`` on each side (average
    pooling counts the padded zeros; max pooling ignores them). ``pool_size`` 1: ``x``."""
    if pool_size == 1:
        return x
    if pool == "avg":
        return F.avg_pool2d(x, pool_size, pool_size, padding=padding, count_include_pad=True)
    return F.max_pool2d(x, pool_size, pool_size, padding=padding)


def rmi_lower_bound(
    labels: Tensor, probs: Tensor, radius: int = 3, alpha: float = 5e-4, logdet_eps: float = 0.0
) -> Tensor:
    """The RMI term of pooled ``labels`` and ``probs`` (both ``(B, C, h, w)``, ignored pixels
    already zeroed): ``sum_c mean_b 0.5 logdet(M + a I) / d``, in float64, the log-determinant
    taken as ``2 sum log(diag(chol) + logdet_eps)``. Maps smaller than ``radius`` give 0
    (attached to ``probs``)."""
    B, C, h, w = probs.shape
    if h < radius or w < radius:
        return probs.sum().to(torch.float64) * 0.0
    d = radius * radius
    y = region_vectors(labels.to(torch.float64), radius)
    p = region_vectors(probs.to(torch.float64), radius)
    y = y - y.mean(3, keepdim=True)
    p = p - p.mean(3, keepdim=True)
    eye = torch.eye(d, dtype=torch.float64, device=probs.device)
    s_y = y @ y.transpose(2, 3)
    s_p = p @ p.transpose(2, 3)
    s_yp = y @ p.transpose(2, 3)
    # S_YP (S_P + aI)^-1 S_YP^T = S_YP X with (S_P + aI) X = S_YP^T (S_P + aI is symmetric).
    m = s_y - s_yp @ torch.linalg.solve(s_p + alpha * eye, s_yp.transpose(2, 3))
    m = 0.5 * (m + m.transpose(2, 3))  # symmetric up to rounding; Cholesky reads one triangle
    # M + aI is positive definite in exact arithmetic (a Schur complement plus aI); should
    # rounding break that, the factor has NaNs and the step is skipped rather than the run.
    chol = torch.linalg.cholesky_ex(m + alpha * eye).L
    diag = torch.diagonal(chol, dim1=-2, dim2=-1)
    logdet = 2.0 * torch.log(diag + logdet_eps).sum(-1)  # (B, C)
    return (0.5 * logdet / d).mean(0).sum()


def rmi_bce(logits: Tensor, onehot: Tensor, valid: Tensor, plus_one: bool = False) -> Tensor:
    """Sigmoid BCE summed over the classes and the valid pixels, divided by their number
    (``+ 1`` with ``plus_one``; at least 1 otherwise, so 0 when none is valid)."""
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    total = (bce.sum(1) * valid).sum()
    n = valid.sum()
    return total / (n + 1.0) if plus_one else total / n.clamp(min=1)


def rmi_loss(
    logits: Tensor,
    target: Tensor,
    radius: int = 3,
    pool: str = "avg",
    pool_size: int = 4,
    alpha: float = 5e-4,
    bce_weight: float = 0.5,
    rmi_weight: float = 0.5,
    ignore_index: int = 255,
    variant: str = "released",
) -> Tensor:
    """``bce_weight * BCE + rmi_weight * RMI`` of ``logits (B, C, h, w)`` (bilinearly upsampled
    to the label size) against ``target (B, H, W)`` int64 (``ignore_index`` = unlabelled).

    ``variant``: ``"released"`` (the authors' code) or ``"unpadded"`` (see the module
    docstring). Exactly 0, with a graph, when no pixel is labelled. Returned in float32
    (float64 for float64 logits).
    """
    _check(radius, pool, pool_size, alpha, variant)
    check_logits_target(logits, target)
    released = variant == "released"
    with autocast_off(logits.device.type):
        x = upsample_to(logits, tuple(target.shape[-2:]))
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        C = x.shape[1]
        t = target.to(x.device, torch.long)
        valid = t != ignore_index
        onehot = F.one_hot(torch.where(valid, t, 0), C).permute(0, 3, 1, 2).to(dtype)
        validf = valid[:, None].to(dtype)
        onehot = onehot * validf
        total = x.sum() * 0.0
        if bce_weight:
            total = total + bce_weight * rmi_bce(x, onehot, valid.to(dtype), plus_one=released)
        if rmi_weight:
            probs = torch.sigmoid(x) * validf
            if released:
                probs = probs + PROB_EPS
            padding = pool_size // 2 if released else 0
            onehot = rmi_pool(onehot, pool, pool_size, padding)
            probs = rmi_pool(probs, pool, pool_size, padding)
            eps = LOGDET_EPS if released else 0.0
            rmi = rmi_lower_bound(onehot, probs, radius, alpha, eps).to(dtype)
            # No labelled pixel anywhere: the term is a constant; return exactly 0.
            any_valid = valid.any()
            total = total + rmi_weight * torch.where(any_valid, rmi, rmi * 0.0)
        return total
