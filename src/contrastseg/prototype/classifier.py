"""`PrototypeClassifier`: ProtoSeg's nonparametric classifier as one module for any model.

A pixel's class is that of its nearest prototype: every class keeps ``M`` unit vectors, a pixel
embedding is scored against all of them, and a class's logit is its best cosine. The prototypes
are not learnt by gradient descent but moved, after each training step, towards the mean
embedding of the correctly classified pixels assigned to them by a balanced (Sinkhorn-Knopp)
clustering within each class. Two extra losses pull the embeddings towards their assigned
prototype: PPC (cross-entropy over all prototypes) and PPD (squared cosine distance)::

    proto = PrototypeClassifier(num_classes=19, in_channels=720)
    out = proto(features, labels)              # training: logits, ppc, ppd; prototypes moved
    seg = F.interpolate(out.logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    loss = F.cross_entropy(seg, labels, ignore_index=255) + out.loss()   # 0.01 PPC + 0.001 PPD
    logits = proto.eval()(features)            # inference: logits only

See docs/prototypes.md for the method, what the released code does and what this module does
about each of its quirks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from contrastseg.checks import check_int
from contrastseg.errors import ConfigError
from contrastseg.prototype.sinkhorn import gumbel_noise_order, segment_sinkhorn
from contrastseg.randomness import LazyGenerator, SeededModule

__all__ = [
    "ASSIGNMENTS",
    "PPC_WEIGHT",
    "PPD_WEIGHT",
    "PROJECTION_NORMS",
    "TARGET_IGNORE",
    "PrototypeClassifier",
    "PrototypeOutput",
]

ASSIGNMENTS = ("gumbel", "argmax")
PROJECTION_NORMS = ("width", "channel")
PPC_WEIGHT = 0.01  # the released Cityscapes recipe's loss weights
PPD_WEIGHT = 0.001
TARGET_IGNORE = -1  # the prototype target of a pixel without a class


@dataclass(frozen=True)
class PrototypeOutput:
    """What a training call with labels returns.

    * ``logits (B, K, h, w)``: the segmentation logits on the feature grid (as at inference);
    * ``ppc``, ``ppd``: the two prototype losses (0-dim, unweighted; 0 with a graph when no
      pixel of the grid has a class);
    * ``proto_logits (B*h*w, K*M)``: cosines of every pixel to every prototype, before this
      step's update (PPC's logits), rows in (b, y, x) order, columns ``k*M + m``;
    * ``target (B*h*w,)`` int64: the prototype each pixel was assigned to (``k*M + m``), or
      :data:`TARGET_IGNORE` (-1) for pixels without a class;
    * ``labelled``, ``correct``, ``updated``: 0-dim int64 counts (no host sync): pixels with a
      class on the grid, those of them predicted right (the only ones that move prototypes),
      and prototypes this step moved (this process's counts under DDP).
    """

    logits: Tensor
    ppc: Tensor
    ppd: Tensor
    proto_logits: Tensor
    target: Tensor
    labelled: Tensor
    correct: Tensor
    updated: Tensor

    def loss(self, ppc_weight: float = PPC_WEIGHT, ppd_weight: float = PPD_WEIGHT) -> Tensor:
        """``ppc_weight * ppc + ppd_weight * ppd`` (the released weights by default); add it to
        the segmentation loss of :attr:`logits`."""
        return ppc_weight * self.ppc + ppd_weight * self.ppd


class PrototypeClassifier(SeededModule):
    """ProtoSeg's prototype classifier (Zhou et al., CVPR 2022) on a model's features.

    Args:
        num_classes: classes ``K``; labels outside ``[0, K)`` (255 among them) are ignored.
        in_channels: channels ``C`` of the features given to :meth:`forward`.
        num_prototypes: prototypes per class ``M`` (10 released).
        dim: embedding size ``D`` (``None``: ``in_channels``, as released).
        momentum: weight of a prototype's old value in its update (0.999 released).
        sinkhorn_iterations, sinkhorn_epsilon: the per-class Sinkhorn-Knopp clustering (3 and
            0.05 released).
        assignment: which prototype a correctly predicted pixel moves: ``"gumbel"`` (released:
            the argmax of the Sinkhorn plan plus Gumbel noise, a random draw that is not the
            PPC/PPD target) or ``"argmax"`` (the plan's argmax, the same prototype as the
            target).
        gumbel_tau: the released Gumbel-softmax temperature; with hard one-hot draws it changes
            no value (the argmax of ``(L + g) / tau`` is that of ``L + g``), kept for the record.
        projection_norm: the axis the projection head's L2 normalisation runs over:
            ``"width"`` (released: the last axis of ``(B, D, h, w)``) or ``"channel"``.
        update_prototypes: move the prototypes in training calls (released: true).
        seed: seed of the initial prototypes and of the module's generator (Gumbel noise); use a
            different seed per process under DDP.
        process_group: the group the prototypes are averaged over (default: the world).

    ``forward(features (B, C, h, w), labels (B, H, W) = None)``: the logits ``(B, K, h, w)``;
    in training mode with labels, a :class:`PrototypeOutput` instead, and the prototypes are
    moved (no gradient). Labels are resized to the feature grid by nearest neighbour. Under DDP
    every process must make the training calls at the same steps (the prototypes are
    all-reduced).

    Parameters: ``projection`` (Conv1x1 C->C, ReLU, Conv1x1 C->D, both with bias),
    ``feat_norm`` (LayerNorm(D)), ``mask_norm`` (LayerNorm(K)). Buffer: ``prototypes (K, M,
    D)``. ``state_dict()`` also holds the generator state (``_extra_state``), so a resumed run
    draws the same noise. At inference the module is the head, one matrix product, a max over
    each class's prototypes and two LayerNorms; it scripts, traces and exports to ONNX.
    """

    # TorchScript compiles the inference path only; it cannot type the generator.
    __jit_ignored_attributes__ = ["_rng", "process_group"]

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        num_prototypes: int = 10,
        *,
        dim: int | None = None,
        momentum: float = 0.999,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        assignment: str = "gumbel",
        gumbel_tau: float = 0.5,
        projection_norm: str = "width",
        update_prototypes: bool = True,
        seed: int = 0,
        process_group=None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        check_int("num_prototypes", num_prototypes, 1)
        if dim is not None:
            check_int("dim", dim, 1)
        check_int("sinkhorn_iterations", sinkhorn_iterations, 0)
        check_int("seed", seed, 0)
        _check_number("momentum", momentum, "numbers in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("sinkhorn_epsilon", sinkhorn_epsilon, "numbers > 0", lambda v: v > 0)
        _check_number("gumbel_tau", gumbel_tau, "numbers > 0", lambda v: v > 0)
        for name, value, allowed in (
            ("assignment", assignment, ASSIGNMENTS),
            ("projection_norm", projection_norm, PROJECTION_NORMS),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"{name}={value!r} is not supported; allowed values: "
                    + ", ".join(repr(a) for a in allowed)
                )
        if not isinstance(update_prototypes, bool):
            raise ConfigError(
                f"update_prototypes={update_prototypes!r} is invalid; allowed values: True, False"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.num_prototypes = num_prototypes
        self.dim = in_channels if dim is None else dim
        self.momentum = float(momentum)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.assignment = assignment
        self.gumbel_tau = float(gumbel_tau)
        self.projection_norm = projection_norm
        self.update_prototypes = update_prototypes
        self.process_group = process_group
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, self.dim, 1),
        )
        self.feat_norm = nn.LayerNorm(self.dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        init = torch.empty(num_classes, num_prototypes, self.dim)
        nn.init.trunc_normal_(init, std=0.02, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("prototypes", init)
        self._rng = LazyGenerator(seed)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
            f"dim={self.dim}, momentum={self.momentum}, assignment={self.assignment!r}, "
            f"projection_norm={self.projection_norm!r}, "
            f"sinkhorn=({self.sinkhorn_iterations}, {self.sinkhorn_epsilon})"
        )

    # ------------------------------------------------------------------------ inference
    def embed(self, features: Tensor) -> Tensor:
        """Unit pixel embeddings ``(B*h*w, D)``, rows in (b, y, x) order: the projection head
        (its L2 normalisation over ``projection_norm``), ``feat_norm``, L2 normalisation."""
        B, _, h, w = features.shape
        conv1 = self.projection[0]
        conv2 = self.projection[2]
        # The 1x1 convolutions as products on (B, h*w, C) rows (channels last).
        x = features.flatten(2).transpose(1, 2)
        x = F.linear(x, conv1.weight.flatten(1), conv1.bias)
        x = F.linear(torch.relu(x), conv2.weight.flatten(1), conv2.bias)
        if self.projection_norm == "width":
            x = F.normalize(x.reshape(B, h, w, self.dim), p=2.0, dim=2)
        else:
            x = F.normalize(x, p=2.0, dim=-1)
        x = self.feat_norm(x.reshape(B * h * w, self.dim))
        return F.normalize(x, p=2.0, dim=-1)

    def forward(self, features: Tensor, labels: Tensor | None = None):
        """Logits ``(B, K, h, w)``; in training mode with labels a :class:`PrototypeOutput`."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            self._check_features(features)
        B, _, h, w = features.shape
        K, M = self.num_classes, self.num_prototypes
        embed = self.embed(features)
        protos = F.normalize(self.prototypes, p=2.0, dim=-1).to(embed.dtype)
        cosines = embed @ protos.reshape(K * M, self.dim).t()  # (N, K*M)
        scores = self.mask_norm(cosines.reshape(B * h * w, K, M).amax(2))
        logits = scores.reshape(B, h, w, K).permute(0, 3, 1, 2)
        if not torch.jit.is_scripting() and self.training and labels is not None:
            return self._learn(embed, cosines, scores, logits, labels)
        return logits

    @torch.jit.unused
    def _check_features(self, features: Tensor) -> None:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ConfigError(
                f"features (B, in_channels={self.in_channels}, h, w) expected; got shape "
                f"{tuple(features.shape)}"
            )

    # ------------------------------------------------------------------------- training
    def grid_labels(self, labels: Tensor, size: tuple[int, int]) -> Tensor:
        """``labels (B, H, W)`` resized to ``size`` by nearest neighbour, flattened to
        ``(B*h*w,)`` int64; labels outside ``[0, K)`` -> ``K``."""
        t = labels
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]
        t = t.long().reshape(-1)
        return torch.where((t >= 0) & (t < self.num_classes), t, self.num_classes)

    # Under torch.compile the training call's clustering, its random draws (the module's own
    # generator, which a graph cannot hold) and the update run eagerly: a compiled caller's
    # graph breaks here and resumes after it.
    @torch.jit.unused
    @torch.compiler.disable
    def _learn(
        self,
        embed: Tensor,
        cosines: Tensor,
        scores: Tensor,
        logits: Tensor,
        labels: Tensor,
    ) -> PrototypeOutput:
        B, K, h, w = logits.shape
        M = self.num_prototypes
        if labels.dim() != 3 or labels.shape[0] != B:
            raise ConfigError(f"labels must have shape ({B}, H, W); got {tuple(labels.shape)}")
        device = embed.device
        work = torch.promote_types(cosines.dtype, torch.float32)
        with torch.no_grad():
            cls = self.grid_labels(labels.to(device), (h, w))  # (N,), K: no class
            valid = cls < K
            correct = valid & (scores.argmax(1) == cls)
            x, nearest, moved_to = self._assign(cosines, cls)
            target = torch.where(valid, cls * M + nearest, TARGET_IGNORE)
            updated = torch.zeros((), dtype=torch.long, device=device)
            if self.update_prototypes:
                # A non-finite embedding makes its cosines NaN: one sum tells them all.
                finite = torch.isfinite(x.sum())
                updated = self._update(embed.detach(), cls * M + moved_to, correct & finite)
        ppc, ppd = _prototype_losses(cosines.to(work), target, valid)
        return PrototypeOutput(
            logits=logits,
            ppc=ppc,
            ppd=ppd,
            proto_logits=cosines,
            target=target,
            labelled=valid.sum(),
            correct=correct.sum(),
            updated=updated,
        )

    @torch.jit.unused
    def _assign(self, cosines: Tensor, cls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Sinkhorn clustering and the assignment of a training call, without gradient:
        ``cosines (N, K*M)``, ``cls (N,)`` (``K``: no class) -> each pixel's cosines to its own
        class's prototypes ``x (N, M)`` (float32 or wider), the prototype of its plan's argmax
        ``nearest (N,)`` and the one it moves ``moved_to (N,)`` (both in ``[0, M)``)."""
        N = cosines.shape[0]
        K, M = self.num_classes, self.num_prototypes
        device = cosines.device
        work = torch.promote_types(cosines.dtype, torch.float32)
        with torch.no_grad():
            # Each pixel's cosines to its own class's prototypes (the last class's for pixels
            # without a class: they form a group of their own, solved and never used).
            own = cls.clamp(max=K - 1)
            x = cosines.detach().reshape(N, K, M)
            x = x.gather(1, own[:, None, None].expand(N, 1, M))[:, 0].to(work)
            plan = segment_sinkhorn(x, cls, K + 1, self.sinkhorn_iterations, self.sinkhorn_epsilon)
            nearest = plan.argmax(1)
            if self.assignment == "gumbel":
                # One draw for the batch: row r for the r-th pixel in (class, index) order.
                gen = self._rng.get(device)
                noise = torch.empty(N, M, dtype=work, device=device).exponential_(generator=gen)
                noise = -noise.log()[gumbel_noise_order(cls)]
                moved_to = (plan + noise).argmax(1)
            else:
                moved_to = nearest
        return x, nearest, moved_to

    def _update(self, embed: Tensor, slot: Tensor, moving: Tensor) -> Tensor:
        """Move each prototype that the ``moving`` pixels (the correctly predicted ones) were
        assigned to: ``p <- m p + (1 - m) normalize(sum of those pixels)``; then every prototype
        L2-normalised and, under DDP, averaged over processes. One scatter-add for all classes.
        The caller passes no moving pixel for a step whose embeddings are not all finite (one
        the trainer skips): a NaN would stay in the prototypes for good. Returns the number of
        prototypes moved (0-dim int64)."""
        K, M, D = self.prototypes.shape
        acc = torch.promote_types(self.prototypes.dtype, torch.float32)
        rows = torch.where(moving, slot, K * M)  # a spare row takes the others
        sums = torch.zeros(K * M + 1, D, dtype=acc, device=embed.device)
        sums.index_add_(0, rows, embed.to(acc))
        counts = torch.zeros(K * M + 1, dtype=torch.long, device=embed.device)
        counts.index_add_(0, rows, torch.ones_like(rows))
        moved = counts[: K * M] > 0
        old = F.normalize(self.prototypes.reshape(K * M, D).to(acc), p=2.0, dim=-1)
        mean = F.normalize(sums[: K * M], p=2.0, dim=-1)
        m = self.momentum
        new = torch.where(moved[:, None], m * old + (1 - m) * mean, old)
        new = F.normalize(new, p=2.0, dim=-1)
        world = _world_size(self.process_group)
        if world > 1:
            new = _all_reduce_mean(new / world, self.process_group)
        self.prototypes.copy_(new.reshape(K, M, D))
        return moved.sum()


def _prototype_losses(cosines: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """PPC (cross-entropy of the cosines, no temperature) and PPD (mean squared cosine distance
    to the target prototype), both means over the pixels with a class (0 when there is none,
    still attached to the graph)."""
    count = valid.sum().clamp_min(1).to(cosines.dtype)
    ppc = F.cross_entropy(cosines, target, ignore_index=TARGET_IGNORE, reduction="sum") / count
    own = cosines.gather(1, target.clamp_min(0)[:, None])[:, 0]
    ppd = ((1 - own).pow(2) * valid).sum() / count
    return ppc, ppd


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce_mean(shares: Tensor, group) -> Tensor:
    """The sum over processes of ``shares`` (each process's value divided by the world size);
    through a CPU copy when the group's backend (gloo) does not take the tensor's device."""
    comm = shares
    if dist.get_backend(group) == "gloo" and shares.device.type != "cpu":
        comm = shares.cpu()
    dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=group)
    return comm.to(shares.device)


def _check_number(name: str, value, allowed: str, ok) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise ConfigError(f"{name}={value!r} is invalid; allowed values: {allowed}")
