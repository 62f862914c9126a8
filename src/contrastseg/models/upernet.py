"""UPerNet (Xiao et al., ECCV 2018): pyramid pooling on the last stage and an FPN over all
stages, fused at the finest one (stride 4).

The layout is that of mmsegmentation's ``UPerHead`` (the head of its UPerNet configs for ResNet,
Swin and ConvNeXt; every conv without bias, followed by BN and ReLU):

- pyramid pooling on the last stage: bins 1, 2, 3, 6, each 1x1 conv-BN-ReLU to ``channels``
  (512), upsampled (bilinear, ``align_corners=False``), concatenated with the stage -> 3x3
  conv-BN-ReLU (512): the top of the FPN;
- lateral 1x1 conv-BN-ReLU (512) on every other stage; top-down: each lateral plus the one above
  it upsampled; a 3x3 conv-BN-ReLU (512) on each of them;
- all FPN levels upsampled to the finest, concatenated (512 x stages) -> 3x3 conv-BN-ReLU (512)
  -> dropout 0.1 -> 1x1 classifier (bias);
- auxiliary FCN head (training only) on the stage before the last: 3x3 conv (256) -> BN -> ReLU
  -> dropout 0.1 -> classifier, loss weight 0.4.

Pixel contrast reads the map the classifier reads: the fused map (``channels`` wide, before the
dropout), at the finest stage's stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.models.backbones import TimmBackbone
from contrastseg.models.heads import FCNHead, conv_bn_relu
from contrastseg.models.pyramid_pooling import PyramidPooling


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """``forward(feats) -> {"seg": (B, num_classes, h0, w0), "features": (B, channels, h0,
    w0)}`` from ``feats[i] for i in in_indices`` (finest first; h0 x w0 is the first's grid)."""

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        in_indices: tuple[int, ...] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_indices):
            raise ValueError("UPerHead: one channel count per input stage")
        self.in_indices = tuple(in_indices)
        self.ppm = PyramidPooling(in_channels[-1], channels, bins, align_corners=False)
        self.ppm_bottleneck = conv_bn_relu(self.ppm.out_channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1]
        )
        self.fuse = conv_bn_relu(channels * len(in_channels), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = [feats[i] for i in self.in_indices]
        levels: list[torch.Tensor] = []
        for i, lateral in enumerate(self.laterals):
            levels.append(lateral(maps[i]))
        levels.append(self.ppm_bottleneck(self.ppm(maps[-1])))
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1])
        outs: list[torch.Tensor] = []
        for i, conv in enumerate(self.fpn_convs):
            outs.append(conv(levels[i]))
        outs.append(levels[-1])
        fused = [outs[0]]
        for out in outs[1:]:
            fused.append(_resize(out, outs[0]))
        x = self.fuse(torch.cat(fused, dim=1))
        return {"seg": self.classifier(self.dropout(x)), "features": x}


def build_upernet(
    backbone: TimmBackbone, cfg: ModelConfig, num_classes: int
) -> tuple[UPerHead, FCNHead | None, int, int]:
    """``(head, auxiliary head or None, feature channels, stride of seg)`` on ``backbone``: the
    FPN over every map at stride 4 or coarser (a stride-2 stem map, which some timm families
    give first, is left out)."""
    levels = [i for i, s in enumerate(backbone.strides) if s >= 4] or [backbone.out_index]
    channels = cfg.head_channels or 512
    head = UPerHead(
        [backbone.channels[i] for i in levels],
        num_classes,
        channels,
        cfg.ppm_bins,
        cfg.dropout,
        tuple(levels),
    )
    aux = None
    if cfg.aux:  # mmsegmentation's FCN auxiliary head on the stage before the last
        aux_in = backbone.channels[backbone.aux_index]
        aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout, "compact")
    return head, aux, channels, backbone.strides[levels[0]]
