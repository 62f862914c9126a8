"""DeepLabV3+ (Chen et al., ECCV 2018): ASPP on the last stage and a decoder at stride 4.

The layout is that of the authors' code (tensorflow/models ``research/deeplab``, ``model.py``
with ``aspp_with_separable_conv`` and ``decoder_use_separable_conv``, as for Xception):

- ASPP on the last stage (stride 16 by default, ``model.backbone.output_stride``): image pooling
  (1x1 conv-BN-ReLU), a 1x1 conv-BN-ReLU and three separable 3x3 branches at rates 6/12/18
  (doubled at stride 8), each 256 wide; the five concatenated -> 1x1 conv-BN-ReLU (256) ->
  dropout 0.1;
- decoder: the stride-4 stage projected to 48 channels (1x1 conv-BN-ReLU), the ASPP output
  upsampled to it (bilinear, ``align_corners=True``), concatenated (304 channels) -> two
  separable 3x3 convs (256) -> 1x1 classifier (bias).

A separable conv is a depthwise 3x3 conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU (no
biases), TensorFlow's ``_split_separable_conv2d``. Pixel contrast reads the map the classifier
reads: the decoder's output (256 channels, stride 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.errors import ConfigError
from contrastseg.models.backbones import TimmBackbone
from contrastseg.models.heads import FCNHead, ImagePooling, conv_bn_relu

#: Channels of the projected stride-4 stage (the paper's 48).
LOW_LEVEL_CHANNELS = 48


def separable_conv(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, no biases."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        *conv_bn_relu(cin, cout),
    )


class SeparableASPP(nn.Module):
    """ASPP with separable atrous branches and a 1x1 projection:
    (B, C, h, w) -> (B, channels, h, w)."""

    def __init__(self, cin: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        branches = [ImagePooling(cin, channels), conv_bn_relu(cin, channels)]
        branches += [separable_conv(cin, channels, r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(channels * len(branches), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """``forward(feats) -> {"seg": (B, num_classes, h4, w4), "features": (B, channels, h4, w4)}``
    from ``feats[in_index]`` (the last stage) and ``feats[low_index]`` (the stride-4 stage,
    h4 x w4)."""

    def __init__(
        self,
        in_channels: int,
        low_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        dropout: float = 0.1,
        in_index: int = -1,
        low_index: int = 1,
    ) -> None:
        super().__init__()
        self.in_index, self.low_index = in_index, low_index
        self.aspp = SeparableASPP(in_channels, channels, rates)
        self.dropout = nn.Dropout(dropout)
        self.low_project = conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS)
        self.decoder = nn.Sequential(
            separable_conv(channels + LOW_LEVEL_CHANNELS, channels),
            separable_conv(channels, channels),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.low_project(feats[self.low_index])
        x = self.dropout(self.aspp(feats[self.in_index]))
        x = F.interpolate(x, size=low.shape[2:], mode="bilinear", align_corners=True)
        x = self.decoder(torch.cat([x, low], dim=1))
        return {"seg": self.classifier(x), "features": x}


def build_deeplabv3plus(
    backbone: TimmBackbone, cfg: ModelConfig, num_classes: int
) -> tuple[DeepLabV3PlusHead, FCNHead | None, int, int]:
    """``(head, auxiliary head or None, feature channels, stride of seg)`` on ``backbone``: ASPP
    on the last stage, the decoder on the last stage at stride 4."""
    name, strides = cfg.backbone.name, backbone.strides
    if backbone.is_hrnet:
        raise ConfigError(
            f"model.head = 'deeplabv3plus' needs a dilatable backbone, got {name!r}: use "
            "model.head: upernet, hrnetv2 or ocr with HRNet"
        )
    low = [i for i, s in enumerate(strides) if s == 4]
    if not low:
        raise ConfigError(
            f"model.head = 'deeplabv3plus' needs a backbone with a stride-4 stage; {name!r} "
            f"gives strides {strides}"
        )
    top = strides[backbone.out_index]
    if top != cfg.backbone.output_stride:
        raise ConfigError(
            f"model.backbone.output_stride = {cfg.backbone.output_stride}: {name!r} cannot be "
            f"dilated, its last stage is at stride {top}; set model.backbone.output_stride: {top}"
        )
    channels = cfg.head_channels or 256
    head = DeepLabV3PlusHead(
        backbone.channels[backbone.out_index],
        backbone.channels[low[-1]],
        num_classes,
        channels,
        cfg.aspp_rates,
        cfg.dropout,
        in_index=backbone.out_index,
        low_index=low[-1],
    )
    aux = None
    if cfg.aux:  # none in the reference; an FCN head on the stage before the last if asked
        aux_in = backbone.channels[backbone.aux_index]
        aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout, "compact")
    return head, aux, channels, 4
