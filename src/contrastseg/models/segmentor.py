"""Segmentor = backbone -> decode head (+ auxiliary head, + projection head in training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.errors import ConfigError
from contrastseg.models.backbones import TimmBackbone, load_backbone_weights
from contrastseg.models.heads import DeepLabV3Head, FCNHead, HRNetV2Head
from contrastseg.models.ocr import OCRHead
from contrastseg.models.projection import ProjectionHead


class Segmentor(nn.Module):
    """A semantic segmenter.

    ``forward(x: (B, 3, H, W)) -> dict``. In training mode: ``seg`` (B, C, h, w) logits at the
    head's stride (``output_stride``: 8 for DeepLabV3, 4 for HRNetV2 and OCR-HRNet), ``aux``
    (B, C, h', w') when an auxiliary head exists (DeepLabV3's FCN head, OCR's soft object
    regions), and ``embed`` (B, D, h, w) unit-norm pixel embeddings when a projection head
    exists; the projection head reads the map the decode head reads, so ``embed`` is on the grid
    of ``seg``. In eval mode only ``seg``: the auxiliary FCN and projection heads are not
    called, so inference costs what the baseline costs.

    The decode head maps the backbone's list of feature maps to ``{"seg", "features", "aux"?}``
    (see :mod:`contrastseg.models.heads`).
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        head: nn.Module,
        aux: nn.Module | None = None,
        projection: nn.Module | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux = aux
        self.projection = projection
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        decoded = self.head(feats)
        out = {"seg": decoded["seg"]}
        if self.training:
            if "aux" in decoded:
                out["aux"] = decoded["aux"]
            elif self.aux is not None:
                out["aux"] = self.aux(feats[self.backbone.aux_index])
            if self.projection is not None:
                out["embed"] = self.projection(decoded["features"])
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
        seg = self.head(self.backbone(x))["seg"]
        return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    with_projection: bool = False,
    backbone_weights: bool = True,
) -> Segmentor:
    """Build the segmenter a config describes; the projection head only when asked.

    With ``backbone_weights=False`` neither timm's ImageNet weights (``pretrained``) nor the
    file ``model.backbone.weights`` are loaded: for callers that load a whole checkpoint over
    the model (inference, export), so that no network or weight file is needed.

    deeplabv3: ASPP on the last stage of a dilated backbone, FCN auxiliary head on the stage
    before (``cfg.aux``), projection on the last stage. hrnetv2: the HRNet branches concatenated
    at stride 4, no auxiliary head, projection on the concatenation. ocr: on HRNet the
    concatenation feeds the soft-object-region head, the pixel representation and the
    projection; on a dilated backbone the region head reads the stage before the last, the
    pixel representation and the projection the last stage.
    """
    bcfg = cfg.backbone
    pretrained = bcfg.pretrained and backbone_weights
    backbone = TimmBackbone(bcfg.name, bcfg.output_stride, pretrained=pretrained)
    if bcfg.weights is not None and backbone_weights:
        load_backbone_weights(backbone, bcfg.weights, strict=bcfg.strict)
    top = backbone.channels[backbone.out_index]
    aux = None
    if cfg.head in ("hrnetv2", "ocr") and backbone.is_hrnet:
        features_channels, stride = sum(backbone.channels), backbone.strides[0]
    else:
        features_channels, stride = top, backbone.strides[backbone.out_index]
    if cfg.head == "deeplabv3":
        if backbone.is_hrnet:
            raise ConfigError("model.head = 'deeplabv3' needs a dilated backbone, not HRNet")
        head: nn.Module = DeepLabV3Head(
            top, num_classes, cfg.head_channels, cfg.aspp_rates, cfg.dropout, backbone.out_index
        )
        if cfg.aux:
            aux_in = backbone.channels[backbone.aux_index]
            aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout)
    elif cfg.head == "hrnetv2":
        if not backbone.is_hrnet:
            raise ConfigError("model.head = 'hrnetv2' needs an HRNet backbone")
        head = HRNetV2Head(features_channels, num_classes)
    elif cfg.head == "ocr":
        hr = backbone.is_hrnet
        aux_in = features_channels if hr else backbone.channels[backbone.aux_index]
        aux_channels = cfg.ocr_aux_channels or (features_channels if hr else 512)
        head = OCRHead(
            features_channels,
            aux_in,
            num_classes,
            mid_channels=cfg.ocr_mid_channels,
            key_channels=cfg.ocr_key_channels,
            aux_channels=aux_channels,
            aux_kernel=1 if hr else 3,
            dropout=cfg.ocr_dropout,
            concat=backbone.is_hrnet,
            in_index=backbone.out_index,
            aux_index=backbone.aux_index,
        )
    else:  # pragma: no cover - the config's Literal rules it out
        raise ConfigError(f"model.head = {cfg.head!r}: unknown head")
    projection = None
    if with_projection:
        projection = ProjectionHead(features_channels, cfg.projection_dim, cfg.projection_hidden)
    return Segmentor(backbone, head, aux, projection, output_stride=stride)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
