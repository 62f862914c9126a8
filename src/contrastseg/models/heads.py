"""Decode heads: DeepLabV3 (ASPP), HRNetV2, and the auxiliary FCN head.

A decode head maps the backbone's list of feature maps to a dict: ``seg`` (logits at the head's
stride), ``features`` (the map the decode head reads, which the projection head of pixel contrast
reads too) and, for heads whose auxiliary output is part of the decoding (OCR), ``aux``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global average pooling branch of ASPP: (B, C, h, w) -> (B, out, h, w)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.proj(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous branches and image pooling."""

    def __init__(self, cin: int, cout: int = 256, rates: tuple[int, ...] = (12, 24, 36)) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        branches.append(ImagePooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(cout * len(branches), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3 decode head: ASPP -> 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier.

    ``forward(feats) -> {"seg": (B, num_classes, h, w), "features": feats[in_index]}``; it reads
    the map ``feats[in_index]`` (B, C_in, h, w), the last stage of a dilated backbone.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: tuple[int, ...] = (12, 24, 36),
        dropout: float = 0.1,
        in_index: int = -1,
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.aspp = ASPP(in_channels, channels, rates)
        self.bottleneck = conv_bn_relu(channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = feats[self.in_index]
        return {"seg": self.classifier(self.dropout(self.bottleneck(self.aspp(x)))), "features": x}


def concat_branches(feats: list[torch.Tensor]) -> torch.Tensor:
    """HRNetV2 representation: every branch bilinearly upsampled to the first (stride 4) and
    concatenated, ``[(B, C_i, h_i, w_i)] -> (B, sum C_i, h_0, w_0)`` (720 channels for W48)."""
    size = feats[0].shape[-2:]
    ups = [feats[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
    ]
    return torch.cat(ups, dim=1)


class HRNetV2Head(nn.Module):
    """HRNetV2 decode head: branches concatenated at stride 4 -> 1x1 conv-BN-ReLU (same width)
    -> 1x1 classifier.

    ``forward(feats: four HRNet branches) -> {"seg": (B, num_classes, H/4, W/4),
    "features": the concatenation (B, sum C_i, H/4, W/4)}``.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = conv_bn_relu(in_channels, in_channels, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = concat_branches(feats)
        return {"seg": self.classifier(self.dropout(self.block(x))), "features": x}


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier, (B, C_in, h, w) -> logits."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.block = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))
