"""Segmentor = backbone -> decode head (+ auxiliary head, + projection head in training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.models.backbones import TimmBackbone, load_backbone_weights
from contrastseg.models.heads import DeepLabV3Head, FCNHead
from contrastseg.models.projection import ProjectionHead


class Segmentor(nn.Module):
    """A semantic segmenter.

    ``forward(x: (B, 3, H, W)) -> dict``. In training mode: ``seg`` (B, C, h, w) logits at the
    head's stride, ``aux`` (B, C, h, w) when an auxiliary head exists, and ``embed`` (B, D, h, w)
    unit-norm pixel embeddings when a projection head exists. In eval mode only ``seg``: the
    auxiliary and projection heads are not called, so inference costs what the baseline costs.
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        head: nn.Module,
        aux: nn.Module | None = None,
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux = aux
        self.projection = projection

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        top = feats[self.backbone.out_index]
        out = {"seg": self.head(top)}
        if self.training:
            if self.aux is not None:
                out["aux"] = self.aux(feats[self.backbone.aux_index])
            if self.projection is not None:
                out["embed"] = self.projection(top)
        return out

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits upsampled to the input size: (B, 3, H, W) -> (B, C, H, W)."""
        seg = self(x)["seg"]
        return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


class InferenceModel(nn.Module):
    """The deployable graph: backbone + decode head only, ``(B, 3, H, W) -> (B, C, H, W)``."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.backbone = segmentor.backbone
        self.head = segmentor.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.head(self.backbone(x)[self.backbone.out_index])
        return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(cfg: ModelConfig, num_classes: int, with_projection: bool = False) -> Segmentor:
    """Build the segmenter a config describes; the projection head only when asked."""
    backbone = TimmBackbone(cfg.backbone.name, cfg.backbone.output_stride)
    if cfg.backbone.weights is not None:
        load_backbone_weights(backbone, cfg.backbone.weights, strict=cfg.backbone.strict)
    top = backbone.channels[backbone.out_index]
    head = DeepLabV3Head(top, num_classes, cfg.head_channels, cfg.aspp_rates, cfg.dropout)
    aux = None
    if cfg.aux:
        aux_in = backbone.channels[backbone.aux_index]
        aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout)
    projection = ProjectionHead(top, cfg.projection_dim) if with_projection else None
    return Segmentor(backbone, head, aux, projection)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
