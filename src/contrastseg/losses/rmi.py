"""Region mutual information loss (Zhao, Ding, Huang, Cai, NeurIPS 2019), METHOD.md section 5.

``rmi_loss = bce_weight * BCE + rmi_weight * RMI`` with

* BCE: sigmoid binary cross-entropy of every class against the one-hot labels, summed over the
  classes and averaged over the labelled pixels;
* RMI: sigmoid probabilities ``P`` and one-hot labels ``Y``, both zeroed at ignored pixels and
  downsampled by pooling (kernel = stride = ``pool_size``); for each (image, class) the
  ``R x R`` shifted views of the pooled maps are stacked into ``d = R^2``-dimensional vectors
  over the ``(h' - R + 1) x (w' - R + 1)`` positions where the whole window fits, centred over
  the positions, and with ``S_Y = Y Y^T``, ``S_P = P P^T``, ``S_YP = Y P^T``::

      M = S_Y - S_YP (S_P + a I)^-1 S_YP^T,      rmi = 0.5 * logdet(M + a I)  (Cholesky)

  divided by ``d``, averaged over the images and summed over the classes.

The matrix part runs in float64 with autocast disabled; the rest in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import autocast_off, check_logits_target, upsample_to

__all__ = ["RMI_POOLS", "region_vectors", "rmi_bce", "rmi_loss", "rmi_lower_bound"]

RMI_POOLS = ("avg", "max")


def _check(radius: int, pool: str, pool_size: int, alpha: float) -> None:
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


def rmi_lower_bound(labels: Tensor, probs: Tensor, radius: int = 3, alpha: float = 5e-4) -> Tensor:
    """The RMI term of pooled ``labels`` and ``probs`` (both ``(B, C, h, w)``, ignored pixels
    already zeroed): ``sum_c mean_b 0.5 logdet(M + a I) / d``, in float64. Maps smaller than
    ``radius`` give 0 (attached to ``probs``)."""
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
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, C)
    return (0.5 * logdet / d).mean(0).sum()


def rmi_bce(logits: Tensor, onehot: Tensor, valid: Tensor) -> Tensor:
    """Sigmoid BCE summed over the classes, mean over the valid pixels (0 when none)."""
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    return (bce.sum(1) * valid).sum() / valid.sum().clamp(min=1)


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
) -> Tensor:
    """``bce_weight * BCE + rmi_weight * RMI`` of ``logits (B, C, h, w)`` (bilinearly upsampled
    to the label size) against ``target (B, H, W)`` int64 (``ignore_index`` = unlabelled).

    Exactly 0, with a graph, when no pixel is labelled. Returned in float32 (float64 for
    float64 logits).
    """
    _check(radius, pool, pool_size, alpha)
    check_logits_target(logits, target)
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
            total = total + bce_weight * rmi_bce(x, onehot, valid.to(dtype))
        if rmi_weight:
            probs = torch.sigmoid(x) * validf
            if pool_size > 1:
                pool_fn = F.avg_pool2d if pool == "avg" else F.max_pool2d
                onehot = pool_fn(onehot, kernel_size=pool_size, stride=pool_size)
                probs = pool_fn(probs, kernel_size=pool_size, stride=pool_size)
            rmi = rmi_lower_bound(onehot, probs, radius, alpha).to(dtype)
            # No labelled pixel anywhere: the term is a constant; return exactly 0.
            any_valid = valid.any()
            total = total + rmi_weight * torch.where(any_valid, rmi, rmi * 0.0)
        return total
