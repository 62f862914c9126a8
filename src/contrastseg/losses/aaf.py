"""Adaptive affinity fields (Ke, Hwang, Liu, Yu, ECCV 2018).

On the softmax probabilities ``p`` and labels ``y`` of one grid, for each neighbour distance
``s`` and each of the 8 neighbours ``j`` of pixel ``i`` at offsets
``(dy, dx) in {-s, 0, s}^2 \\ {(0, 0)}``, and for each class ``c``:

* ``KL_c(i, j) = p_j log(p_j / p_i) + q_j log(q_j / q_i)``, the Bernoulli KL divergence of the
  neighbour from the centre, with ``p`` clipped to ``[1e-4, 1]`` and ``q = 1 - p`` clipped to
  ``[1e-4, 1]``;
* the pair is *ignored* when the centre, the neighbour or (``variant="released"``) the pixel at
  the opposite offset ``i - (dy, dx)`` is labelled ``ignore_index`` or lies outside the image;
  otherwise it is an *edge* of class ``c`` when the labels differ in class ``c``
  (``1[y_i = c] != 1[y_j = c]``: exactly the two classes of a pair with different labels) and a
  *non-edge* of class ``c`` otherwise;
* edge term ``max(0, m - KL_c)``, non-edge term ``KL_c``, each weighted by the adaptive weight
  of the centre's class at this distance.

``loss = 10^(-step / steps) * sum_s [mean over edge entries (w_edge[y_i, s] * edge term)
+ mean over non-edge entries (w_nonedge[y_i, s] * non-edge term)]``, a mean being 0 when it has
no entry. The weights are ``softmax`` over the distances of ``(C, S)`` parameters that
:class:`AAFLoss` trains by gradient *ascent*: their gradient is reversed inside the loss, so the
ordinary descent step on the loss module's parameters maximises the loss over them (min-max).

The grid (``variant``):

* ``"released"`` (default), as the authors' code: the labels are reduced to the logits' grid by
  nearest-neighbour sampling (:func:`shrink_labels`) and the loss is computed there, on the
  softmax of the logits themselves; a pair is dropped when either of the two pixels at
  ``i +- (dy, dx)`` is ignored or outside;
* ``"upsampled"``: the logits are bilinearly upsampled to the label size and the loss is
  computed there; a pair is dropped only when ``i`` or ``j`` is ignored or outside.

Cost: no ``(B, C, H, W)`` tensor per offset is kept. The sum of the KLs over the classes is
``sum_c' P_j L_j - <P_j, L_i>`` over the stacked ``P = [p, q]`` and ``L = log P``, and the edge
classes of a pair (its two labels) are gathered; a closed-form backward recomputes what it needs
per offset. Peak memory is a few ``(B, 2C, H, W)`` tensors whatever the number of offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastseg.errors import ConfigError
from contrastseg.losses.cross_entropy import check_logits_target, upsample_to
from contrastseg.precision import autocast_off

__all__ = [
    "AAF_VARIANTS",
    "AAFLoss",
    "aaf_loss",
    "aaf_masks",
    "aaf_terms",
    "neighbour_offsets",
    "reverse_grad",
    "shrink_labels",
]

PROB_MIN = 1e-4
PROB_MAX = 1.0
AAF_VARIANTS = ("released", "upsampled")


def _check_variant(variant: str) -> None:
    if not isinstance(variant, str) or variant not in AAF_VARIANTS:
        raise ConfigError(
            f"variant={variant!r} is not supported; allowed values: "
            + ", ".join(repr(v) for v in AAF_VARIANTS)
        )


def neighbour_offsets(distance: int) -> list[tuple[int, int]]:
    """The 8 offsets ``(dy, dx)`` at ``distance``, in row-major order."""
    s = distance
    return [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)]


def shrink_labels(target: Tensor, size: tuple[int, int]) -> Tensor:
    """``target (B, H, W)`` sampled at ``size = (h, w)`` by nearest neighbour without corner
    alignment: output row ``i`` takes input row ``min(floor(i * (H / h)), H - 1)`` with the
    scale and the product in float32 (likewise for the columns). This is TensorFlow 1's
    ``resize_nearest_neighbor`` and PyTorch's ``interpolate(mode="nearest")``: for a stride
    ``H / h = k``, the top-left pixel of each ``k x k`` cell."""
    H, W = target.shape[-2:]
    h, w = size
    if (h, w) == (H, W):
        return target

    def index(n_in: int, n_out: int) -> Tensor:
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
        i = torch.arange(n_out, dtype=torch.float32) * scale
        return i.floor().long().clamp(max=n_in - 1).to(target.device)

    return target[:, index(H, h)][:, :, index(W, w)]


def _slices(h: int, w: int, dy: int, dx: int):
    """Index of the centres whose neighbour at ``(dy, dx)`` is inside, and of those neighbours."""
    centre = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    neighbour = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
    return centre, neighbour


def _kept(valid: Tensor, dy: int, dx: int, both_sides: bool) -> Tensor:
    """``(B, H, W)``: whether the pair (centre, centre + ``(dy, dx)``) is kept: the centre and the
    neighbour labelled and inside, and with ``both_sides`` also the pixel at
    centre - ``(dy, dx)``."""
    B, H, W = valid.shape
    s = max(abs(dy), abs(dx))
    pad = valid.new_zeros(B, H + 2 * s, W + 2 * s)
    pad[:, s : s + H, s : s + W] = valid
    keep = valid & pad[:, s + dy : s + dy + H, s + dx : s + dx + W]
    if both_sides:
        keep = keep & pad[:, s - dy : s - dy + H, s - dx : s - dx + W]
    return keep


def aaf_masks(
    target: Tensor,
    num_classes: int,
    distance: int,
    ignore_index: int = 255,
    both_sides: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Masks of one distance on the grid of ``target``: ``edge``, ``nonedge`` ``(B, C, 8, H, W)``,
    ``ignored (B, 8, H, W)``.

    Entry ``[b, c, k, y, x]`` is about the pair (``(y, x)``, its neighbour at
    ``neighbour_offsets(distance)[k]``). A pair is ignored when the centre or the neighbour
    (with ``both_sides``, as in the released code, also the pixel at the opposite offset) is
    labelled ``ignore_index`` or outside the image; a kept pair is an edge of class ``c`` when
    exactly one of the two pixels has label ``c``, and a non-edge of class ``c`` otherwise.
    """
    B, H, W = target.shape
    t = target.long()
    valid = t != ignore_index
    onehot = F.one_hot(torch.where(valid, t, 0), num_classes).permute(0, 3, 1, 2).bool()
    onehot = onehot & valid[:, None]
    offsets = neighbour_offsets(distance)
    edge = torch.zeros(B, num_classes, len(offsets), H, W, dtype=torch.bool, device=t.device)
    ignored = torch.ones(B, len(offsets), H, W, dtype=torch.bool, device=t.device)
    for k, (dy, dx) in enumerate(offsets):
        (cy, cx), (ny, nx) = _slices(H, W, dy, dx)
        pair = _kept(valid, dy, dx, both_sides)[:, cy, cx]
        ignored[:, k, cy, cx] = ~pair
        edge[:, :, k, cy, cx] = (onehot[:, :, cy, cx] != onehot[:, :, ny, nx]) & pair[:, None]
    nonedge = ~edge & ~ignored[:, None]
    return edge, nonedge, ignored


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def reverse_grad(x: Tensor) -> Tensor:
    """Identity whose gradient is negated (gradient ascent under a descent optimiser)."""
    return _ReverseGrad.apply(x)


def _pair_labels(labels: Tensor, valid: Tensor, dy: int, dx: int, both_sides: bool):
    """Of the pairs of one offset: centre and neighbour labels, ``pair`` (kept) and ``diff``
    (kept, labels differ: the two labels' classes are edges, the other classes non-edges),
    over the centres whose neighbour is inside, and the centre and neighbour slices."""
    H, W = labels.shape[-2:]
    centre, neighbour = _slices(H, W, dy, dx)
    (cy, cx), (ny, nx) = centre, neighbour
    yi, yj = labels[:, cy, cx], labels[:, ny, nx]
    pair = _kept(valid, dy, dx, both_sides)[:, cy, cx]
    return yi, yj, pair, pair & (yi != yj), centre, neighbour


def _label_kl(P, L, idx, centre, neighbour):
    """KL at one class per pair: ``idx (B, 2, h, w)`` holds ``[a, a + C]`` (the p and q
    channels of class ``a``). Returns the KL ``(B, h, w)`` and the gathered ``P_j``, ``L_j``,
    ``L_i`` ``(B, 2, h, w)``."""
    (cy, cx), (ny, nx) = centre, neighbour
    pn = P[:, :, ny, nx].gather(1, idx)
    ln = L[:, :, ny, nx].gather(1, idx)
    lc = L[:, :, cy, cx].gather(1, idx)
    return (pn * (ln - lc)).sum(1), pn, ln, lc


class _AAFMaps(torch.autograd.Function):
    """Per-centre-pixel sums of the AAF edge and non-edge terms, with a closed-form backward.

    Input ``P (B, 2C, H, W)``: the clipped ``[p, q]``, ``L = log P``. For the pair (i, j) of an
    offset, ``KL_c = P_jc (L_jc - L_ic) + P_j,c+C (L_j,c+C - L_i,c+C)``; summed over the classes
    this is ``negent_j - <P_j, L_i>`` with ``negent = sum_c' P L`` (no per-class tensor is
    formed). The edge classes of a pair with different labels are its two labels, whose KLs are
    gathered. Forward returns ``acc (S, 2, B, H, W)``: at each centre pixel, summed over the 8
    neighbours of distance ``s``, ``[sum of edge terms, sum of non-edge terms]``, and
    ``counts (S, 2)`` (edge and non-edge entries; not differentiable). Backward, with
    ``alpha_ijc`` the gradient reaching ``KL_c(i, j)``: ``dP_jc += alpha (L_jc - L_ic + 1)`` and
    ``dP_ic -= alpha P_jc / P_ic``, where ``alpha = g_nonedge(i)`` for every class of a kept
    pair, corrected at the two edge classes to ``-g_edge(i) 1[KL < m]``. Per offset, forward
    and backward each make a handful of passes over ``(B, 2C, h, w)`` and keep nothing but
    ``P`` and ``L``.
    """

    @staticmethod
    def forward(ctx, P, labels, valid, distances, margin, both_sides):
        B, C2, H, W = P.shape
        C = C2 // 2
        L = P.log()
        negent = (P * L).sum(1)
        acc = P.new_zeros(len(distances), 2, B, H, W)
        counts = torch.zeros(len(distances), 2, dtype=torch.long, device=P.device)
        for si, s in enumerate(distances):
            for dy, dx in neighbour_offsets(s):
                yi, yj, pair, diff, centre, neighbour = _pair_labels(
                    labels, valid, dy, dx, both_sides
                )
                if pair.numel() == 0:
                    continue
                (cy, cx), (ny, nx) = centre, neighbour
                pairf, difff = pair.to(P.dtype), diff.to(P.dtype)
                klsum = negent[:, ny, nx] - (P[:, :, ny, nx] * L[:, :, cy, cx]).sum(1)
                edge = torch.zeros_like(klsum)
                edge_kl = torch.zeros_like(klsum)
                for y in (yi, yj):
                    kl = _label_kl(P, L, torch.stack([y, y + C], 1), centre, neighbour)[0]
                    edge = edge + F.relu(margin - kl)
                    edge_kl = edge_kl + kl
                acc[si, 0, :, cy, cx] += difff * edge
                acc[si, 1, :, cy, cx] += pairf * klsum - difff * edge_kl
                n_diff = diff.sum()
                counts[si, 0] += 2 * n_diff
                counts[si, 1] += C * pair.sum() - 2 * n_diff
        ctx.save_for_backward(P, L, labels, valid)
        ctx.distances, ctx.margin, ctx.both_sides = distances, margin, both_sides
        ctx.mark_non_differentiable(counts)
        return acc, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_acc, _grad_counts):
        if grad_acc is None:
            return None, None, None, None, None, None
        P, L, labels, valid = ctx.saved_tensors
        B, C2, H, W = P.shape
        C = C2 // 2
        grad = torch.zeros_like(P)
        for si, s in enumerate(ctx.distances):
            for dy, dx in neighbour_offsets(s):
                yi, yj, pair, diff, centre, neighbour = _pair_labels(
                    labels, valid, dy, dx, ctx.both_sides
                )
                if pair.numel() == 0:
                    continue
                (cy, cx), (ny, nx) = centre, neighbour
                g_edge = grad_acc[si, 0][:, cy, cx]
                g_nonedge = grad_acc[si, 1][:, cy, cx]
                base = (pair.to(P.dtype) * g_nonedge)[:, None]
                Pn, Pc = P[:, :, ny, nx], P[:, :, cy, cx]
                gn, gc = grad[:, :, ny, nx], grad[:, :, cy, cx]
                gn.addcmul_(L[:, :, ny, nx] - L[:, :, cy, cx], base).add_(base)
                gc.addcmul_(Pn / Pc, base, value=-1.0)
                difff = diff.to(P.dtype)
                for y in (yi, yj):
                    idx = torch.stack([y, y + C], 1)
                    kl, pn, ln, lc = _label_kl(P, L, idx, centre, neighbour)
                    active = (kl < ctx.margin).to(P.dtype)
                    corr = (-difff * (g_nonedge + g_edge * active))[:, None]
                    gn.scatter_add_(1, idx, corr * (ln - lc + 1.0))
                    gc.scatter_add_(1, idx, -corr * pn / Pc.gather(1, idx))
        return grad, None, None, None, None, None


def aaf_terms(
    logits: Tensor,
    target: Tensor,
    distances: tuple[int, ...] = (1, 2, 3),
    margin: float = 3.0,
    ignore_index: int = 255,
    variant: str = "released",
) -> tuple[Tensor, Tensor, Tensor]:
    """The unweighted AAF sums on the grid of ``variant`` (``"released"``: the logits' grid,
    labels shrunk to it; ``"upsampled"``: the labels' grid, logits upsampled to it):
    ``acc (S, 2, B, h, w)`` (per centre pixel and distance, the sum of its edge and of its
    non-edge terms over its 8 neighbours), ``counts (S, 2)`` (edge and non-edge entries) and
    the labels on that grid with ignored pixels set to 0 ``(B, h, w)``."""
    _check_variant(variant)
    check_logits_target(logits, target)
    released = variant == "released"
    with autocast_off(logits.device.type):
        if released:
            x = logits
            t = shrink_labels(target, tuple(logits.shape[-2:]))
        else:
            x = upsample_to(logits, tuple(target.shape[-2:]))
            t = target
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        probs = x.softmax(1)
        P = torch.cat([probs.clamp(PROB_MIN, PROB_MAX), (1.0 - probs).clamp(PROB_MIN, PROB_MAX)], 1)
        t = t.to(x.device, torch.long)
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)
        acc, counts = _AAFMaps.apply(P, safe, valid, tuple(distances), float(margin), released)
        return acc, counts, safe


def aaf_loss(
    logits: Tensor,
    target: Tensor,
    edge_weights: Tensor,
    nonedge_weights: Tensor,
    distances: tuple[int, ...] = (1, 2, 3),
    margin: float = 3.0,
    ignore_index: int = 255,
    variant: str = "released",
) -> Tensor:
    """The AAF loss (without decay) of ``logits (B, C, h, w)`` against ``target (B, H, W)``.

    ``edge_weights`` and ``nonedge_weights``: ``(C, S)``, ``S = len(distances)``, the weights
    after the softmax (differentiable). ``variant``: ``"released"`` or ``"upsampled"`` (module
    docstring). Exactly 0, with a graph, when no pair is kept.
    """
    C = logits.shape[1] if logits.dim() == 4 else -1
    S = len(distances)
    for name, wt in (("edge_weights", edge_weights), ("nonedge_weights", nonedge_weights)):
        if tuple(wt.shape) != (C, S):
            raise ConfigError(f"{name} must have shape (C, S) = {(C, S)}; got {tuple(wt.shape)}")
    acc, counts, safe = aaf_terms(logits, target, distances, margin, ignore_index, variant)
    with autocast_off(acc.device.type):
        norm = counts.clamp(min=1).to(acc.dtype)  # (S, 2)
        w_edge = edge_weights.to(acc.dtype).T[:, safe]  # (S, B, h, w): the centre's class
        w_nonedge = nonedge_weights.to(acc.dtype).T[:, safe]
        edge = (w_edge * acc[:, 0]).sum((1, 2, 3)) / norm[:, 0]
        nonedge = (w_nonedge * acc[:, 1]).sum((1, 2, 3)) / norm[:, 1]
        return (edge + nonedge).sum()


class AAFLoss(nn.Module):
    """AAF with adaptive weights: ``forward(logits, target, step) -> loss``.

    Parameters ``edge_logits`` and ``nonedge_logits`` ``(C, S)``: the weights are their softmax
    over the distances; they are initialised to ``log(init_weights)`` (uniform by default) and
    trained by gradient ascent (their gradient is reversed in forward). The loss is multiplied
    by ``10^(-step / decay_steps)`` (no decay when ``decay_steps`` is None). ``variant``:
    ``"released"`` (default) or ``"upsampled"`` (module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        distances: tuple[int, ...] = (1, 2, 3),
        margin: float = 3.0,
        init_weights: tuple[float, ...] | None = None,
        decay_steps: int | None = None,
        ignore_index: int = 255,
        variant: str = "released",
    ) -> None:
        super().__init__()
        distances = tuple(distances)
        if not distances or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in distances
        ):
            raise ConfigError(f"distances={distances!r} is invalid; allowed values: integers >= 1")
        if len(set(distances)) != len(distances):
            raise ConfigError(f"distances={distances!r} must be distinct")
        if not margin >= 0:
            raise ConfigError(f"margin={margin!r} is invalid; allowed values: numbers >= 0")
        if decay_steps is not None and (isinstance(decay_steps, bool) or decay_steps < 1):
            raise ConfigError(f"decay_steps={decay_steps!r} is invalid; allowed values: >= 1")
        _check_variant(variant)
        S = len(distances)
        init = torch.full((S,), 1.0 / S) if init_weights is None else torch.tensor(init_weights)
        if init.shape != (S,) or not bool((init > 0).all()):
            raise ConfigError(
                f"init_weights={init_weights!r} is invalid; allowed values: {S} positive numbers"
            )
        logits = (init / init.sum()).log().to(torch.float32).repeat(num_classes, 1)
        self.num_classes = num_classes
        self.distances = distances
        self.margin = float(margin)
        self.decay_steps = decay_steps
        self.ignore_index = ignore_index
        self.variant = variant
        self.edge_logits = nn.Parameter(logits.clone())
        self.nonedge_logits = nn.Parameter(logits.clone())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, distances={self.distances}, margin={self.margin}, "
            f"decay_steps={self.decay_steps}, variant={self.variant!r}"
        )

    def weights(self) -> tuple[Tensor, Tensor]:
        """The current ``(C, S)`` edge and non-edge weights (softmax over the distances)."""
        return self.edge_logits.softmax(1), self.nonedge_logits.softmax(1)

    def decay(self, step: int) -> float:
        return 10.0 ** (-step / self.decay_steps) if self.decay_steps else 1.0

    def forward(self, logits: Tensor, target: Tensor, step: int = 0) -> Tensor:
        w_edge = reverse_grad(self.edge_logits).softmax(1)
        w_nonedge = reverse_grad(self.nonedge_logits).softmax(1)
        loss = aaf_loss(
            logits,
            target,
            w_edge,
            w_nonedge,
            self.distances,
            self.margin,
            self.ignore_index,
            self.variant,
        )
        return loss * self.decay(step)
