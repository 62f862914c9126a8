"""PSPNet (Zhao et al., CVPR 2017): pyramid pooling on the last stage of a dilated backbone.

The layout is that of the authors' PyTorch code (``PSPNet`` with ``PPM`` of hszhao/semseg):

- pyramid pooling on the last stage (C channels, stride 8): bins 1, 2, 3 and 6, each a 1x1 conv
  (no bias) -> BN -> ReLU of width ``C / len(bins)`` (512 for ResNet-101), upsampled bilinearly
  with ``align_corners=True`` and concatenated with the stage (2C channels);
- 3x3 conv (no bias) -> BN -> ReLU to ``channels`` (512) -> dropout 0.1 -> 1x1 classifier (bias);
- auxiliary FCN head (training only) on the stage before the last: 3x3 conv (no bias, 256) ->
  BN -> ReLU -> dropout 0.1 -> classifier, loss weight 0.4.

Pixel contrast reads the map the classifier reads: the output of the 3x3 conv-BN-ReLU
(``channels`` wide, before the dropout), on the grid of ``seg``.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.errors import ConfigError
from contrastseg.models.backbones import TimmBackbone
from contrastseg.models.heads import FCNHead, conv_bn_relu
from contrastseg.models.pyramid_pooling import PyramidPooling


class PSPHead(nn.Module):
    """``forward(feats) -> {"seg": (B, num_classes, h, w), "features": (B, channels, h, w)}``
    from ``feats[in_index]`` (B, in_channels, h, w)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        in_index: int = -1,
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.ppm = PyramidPooling(in_channels, in_channels // len(bins), bins, align_corners=True)
        self.bottleneck = conv_bn_relu(self.ppm.out_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.bottleneck(self.ppm(feats[self.in_index]))
        return {"seg": self.classifier(self.dropout(x)), "features": x}


def build_pspnet(
    backbone: TimmBackbone, cfg: ModelConfig, num_classes: int
) -> tuple[PSPHead, FCNHead | None, int, int]:
    """``(head, auxiliary head or None, feature channels, stride of seg)`` on ``backbone``."""
    if backbone.multi_level:
        raise ConfigError(
            f"model.head = 'pspnet' needs a dilated backbone; {cfg.backbone.name!r} gives "
            "several levels at their own strides (it cannot be dilated): use model.head: upernet"
        )
    channels = cfg.head_channels or 512
    top = backbone.channels[backbone.out_index]
    head = PSPHead(top, num_classes, channels, cfg.ppm_bins, cfg.dropout, backbone.out_index)
    aux = None
    if cfg.aux:  # the reference's auxiliary head: conv without bias, dropout (the compact FCN)
        aux_in = backbone.channels[backbone.aux_index]
        aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout, "compact")
    return head, aux, channels, backbone.strides[backbone.out_index]
