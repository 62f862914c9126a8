"""The weighted sum of the named losses a config asks for."""

from __future__ import annotations

import torch
from torch import nn

from contrastseg.config import LossConfig
from contrastseg.engine.distributed import all_reduce_sum, is_distributed
from contrastseg.losses.cross_entropy import cross_entropy


def global_pixel_normalizer(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Under DDP: labelled pixels of the global batch / world size (one all-reduce); else None."""
    if not is_distributed():
        return None
    count = (target != ignore_index).sum().to(torch.float64)
    all_reduce_sum(count)
    return count / torch.distributed.get_world_size()


class LossSet(nn.Module):
    """``forward(outputs, target, step) -> dict`` of every term and ``total``.

    outputs: the model's training dict (``seg``, optional ``aux`` and ``embed``);
    target: (B, H, W) int64, ignore = ``ignore_index``; step: the 0-based iteration.
    Terms are logged unweighted; ``total`` is the weighted sum. State (contrast memory and its
    random generator) is part of ``state_dict`` and so of checkpoints.
    """

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        embed_dim: int = 256,
        ignore_index: int = 255,
        seed: int = 0,
        num_images: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.contrast: nn.Module | None = None
        c = cfg.contrast
        if c.enabled:
            from contrastseg.losses.memory import ClassMemory
            from contrastseg.losses.pixel_contrast import PixelContrastLoss

            memory = None
            if c.memory.enabled:
                memory = ClassMemory(
                    num_classes,
                    dim=embed_dim,
                    pixel_size=c.memory.pixel_size,
                    pixels_per_image=c.memory.pixels_per_image,
                    region_mode=c.memory.region_mode,
                    region_size=c.memory.region_size,
                    num_images=num_images,
                    dtype=getattr(torch, c.memory.dtype),
                )
            self.contrast = PixelContrastLoss(
                num_classes,
                temperature=c.temperature,
                base_temperature=c.base_temperature,
                max_samples=c.max_samples,
                max_views=c.max_views,
                ignore_index=ignore_index,
                memory=memory,
                memory_sampling=c.memory.sampling,
                k_pos=c.memory.k_pos,
                k_neg=c.memory.k_neg,
                semi_hard_fraction=c.memory.semi_hard_fraction,
                seed=seed,
            )

    def contrast_active(self, step: int) -> bool:
        return self.contrast is not None and step >= self.cfg.contrast.warmup_iters

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        target: torch.Tensor,
        step: int,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        norm = global_pixel_normalizer(target, self.ignore_index)
        terms: dict[str, torch.Tensor] = {
            "ce": cross_entropy(outputs["seg"], target, self.ignore_index, norm)
        }
        total = cfg.ce.weight * terms["ce"]
        if "aux" in outputs:
            terms["aux_ce"] = cross_entropy(outputs["aux"], target, self.ignore_index, norm)
            total = total + cfg.ce.aux_weight * terms["aux_ce"]
        if "embed" in outputs:
            if self.contrast_active(step):
                terms["contrast"] = self.contrast(
                    outputs["embed"], outputs["seg"].detach(), target, image_ids
                )
                total = total + cfg.contrast.weight * terms["contrast"]
            else:
                # Warm-up: no sampling at all, but keep the projection head in the graph so that
                # DDP needs no find_unused_parameters.
                total = total + 0.0 * outputs["embed"].sum()
        terms["total"] = total
        return terms
