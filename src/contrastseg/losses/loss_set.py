"""The weighted sum of the named losses a config asks for."""

from __future__ import annotations

import torch
from torch import nn

from contrastseg.config import LossConfig
from contrastseg.contrast import PixelContrast
from contrastseg.distributed import average_gradients
from contrastseg.errors import ConfigError
from contrastseg.losses.aaf import AAFLoss
from contrastseg.losses.cross_entropy import cross_entropy, global_pixel_normalizer
from contrastseg.losses.lovasz import lovasz_softmax
from contrastseg.losses.ohem import ohem_cross_entropy
from contrastseg.losses.rmi import rmi_loss


class LossSet(nn.Module):
    """``forward(outputs, target, step) -> dict`` of every term and ``total``.

    outputs: the model's training dict (``seg``, optional ``aux``, and ``features`` when
    ``contrast`` is given); target: (B, H, W) int64, ignore = ``ignore_index``; step: the
    0-based iteration. Terms: ``ce`` (OHEM-CE with ``loss.ce.ohem``), ``aux_ce``, and each
    enabled loss past its warm-up (``lovasz``, ``rmi``, ``aaf``, ``contrast``), all on ``seg``;
    a term in its warm-up is not computed at all; ``ppc`` and ``ppd`` when the model has a
    prototype classifier (its outputs of the same names, weighted by ``loss.prototype``).
    Terms are logged unweighted; ``total`` is the
    weighted sum. ``contrast`` is the :class:`~contrastseg.PixelContrast` module the config's
    ``loss.contrast`` describes (required when it is enabled); it is a submodule, so its
    projection head, memory and random generator are part of ``state_dict`` and so of
    checkpoints, as are AAF's adaptive weights. ``total_iters`` is AAF's decay length when
    ``loss.aaf.decay_steps`` is null (the trainer passes ``train.iters``).
    """

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        contrast: PixelContrast | None = None,
        ignore_index: int = 255,
        total_iters: int | None = None,
    ) -> None:
        super().__init__()
        if cfg.contrast.enabled != (contrast is not None):
            raise ConfigError(
                "loss.contrast.enabled is "
                f"{cfg.contrast.enabled} but a PixelContrast module was "
                f"{'not ' if contrast is None else ''}given; build it with "
                "PixelContrast.from_config when the config enables contrast, and only then"
            )
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.contrast = contrast
        weights = cfg.ce.class_weights
        if weights is not None and len(weights) != num_classes:
            raise ConfigError(
                f"loss.ce.class_weights has {len(weights)} values but the data set has "
                f"{num_classes} classes: give one weight per class, in train-id order (or null)"
            )
        # Not in state_dict: the config holds the weights, and old checkpoints stay loadable.
        self.class_weights: torch.Tensor | None
        self.register_buffer(
            "class_weights",
            None if weights is None else torch.tensor(weights, dtype=torch.float32),
            persistent=False,
        )
        self.aaf: AAFLoss | None = None
        if cfg.aaf.enabled:
            a = cfg.aaf
            self.aaf = AAFLoss(
                num_classes,
                distances=a.distances,
                margin=a.margin,
                init_weights=a.init_weights,
                decay_steps=a.decay_steps or total_iters,
                ignore_index=ignore_index,
                variant=a.variant,
            )

    def active(self, name: str, step: int) -> bool:
        """Whether term ``name`` (``lovasz``, ``rmi``, ``aaf``, ``contrast``) is computed at
        ``step``: enabled and past its ``warmup_iters``."""
        section = getattr(self.cfg, name)
        return section.enabled and step >= section.warmup_iters

    def model_parameters(self) -> list[nn.Parameter]:
        """Parameters trained like the model's, in its optimiser group: the contrast
        projection head's (empty without contrast)."""
        return [] if self.contrast is None else list(self.contrast.parameters())

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups of the loss's own trainable parameters (AAF's adaptive weights:
        no weight decay, learning rate x ``loss.aaf.lr_mult``); empty when there are none."""
        if self.aaf is None:
            return []
        return [
            {
                "params": list(self.aaf.parameters()),
                "weight_decay": 0.0,
                "lr_mult": self.cfg.aaf.lr_mult,
            }
        ]

    def sync_gradients(self) -> None:
        """Under DDP: average the gradients of the loss's parameters (AAF's weights, the
        contrast projection head) over the processes (they are outside the DDP model); a
        no-op in one process."""
        average_gradients(self.parameters())

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        target: torch.Tensor,
        step: int,
        image_ids: torch.Tensor | None = None,
        pixel_normalizer: torch.Tensor | None = None,
        fraction: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Gradient accumulation passes one micro-batch at a time: ``pixel_normalizer`` (the
        labelled pixels of the whole step, over every micro-batch and process, / world size)
        divides the pixel-mean CE terms, and every other term is scaled by ``fraction`` (1 /
        micro-batches), so that the terms summed over the step's micro-batches are the
        full-batch values."""
        cfg = self.cfg
        norm = pixel_normalizer
        weights, corners = self.class_weights, cfg.ce.align_corners
        if norm is None:
            norm = global_pixel_normalizer(target, self.ignore_index, weights)
        seg = outputs["seg"]
        if cfg.ce.ohem:
            ce = fraction * ohem_cross_entropy(
                seg,
                target,
                cfg.ce.ohem_threshold,
                cfg.ce.ohem_min_kept,
                self.ignore_index,
                over_processes=True,
                align_corners=corners,
            )
        else:
            ce = cross_entropy(seg, target, self.ignore_index, norm, weights, corners)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        total = cfg.ce.weight * terms["ce"]
        if "aux" in outputs:
            terms["aux_ce"] = cross_entropy(
                outputs["aux"], target, self.ignore_index, norm, weights, corners
            )
            total = total + cfg.ce.aux_weight * terms["aux_ce"]
        if self.active("lovasz", step):
            c = cfg.lovasz
            terms["lovasz"] = fraction * lovasz_softmax(
                seg, target, c.classes, c.per_image, self.ignore_index
            )
            total = total + c.weight * terms["lovasz"]
        if self.active("rmi", step):
            c = cfg.rmi
            terms["rmi"] = fraction * rmi_loss(
                seg,
                target,
                radius=c.radius,
                pool=c.pool,
                pool_size=c.pool_size,
                alpha=c.alpha,
                bce_weight=c.bce_weight,
                rmi_weight=c.rmi_weight,
                ignore_index=self.ignore_index,
                variant=c.variant,
            )
            total = total + c.weight * terms["rmi"]
        if self.aaf is not None and self.active("aaf", step):
            terms["aaf"] = fraction * self.aaf(seg, target, step)
            total = total + cfg.aaf.weight * terms["aaf"]
        if self.contrast is not None:
            # In its warm-up the module returns a zero attached to its projection head, which
            # joins the total (every parameter gets a gradient) but not the logged terms.
            value = self.contrast(outputs["features"], seg.detach(), target, step, image_ids)
            if self.contrast.active(step):
                terms["contrast"] = fraction * value
                total = total + cfg.contrast.weight * terms["contrast"]
            else:
                total = total + value
        if "ppc" in outputs:
            # The prototype classifier's losses, computed by the model (it needs the labels at
            # its classifier); means over this micro-batch's labelled pixels.
            p = cfg.prototype
            terms["ppc"] = fraction * outputs["ppc"]
            terms["ppd"] = fraction * outputs["ppd"]
            total = total + p.ppc_weight * terms["ppc"] + p.ppd_weight * terms["ppd"]
        terms["total"] = total
        return terms
