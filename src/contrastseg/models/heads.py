"""Decode heads: DeepLabV3 (ASPP), HRNetV2, and the auxiliary FCN head.

A decode head maps the backbone's list of feature maps to a dict: ``seg`` (logits at the head's
stride), ``features`` (the map the decode head reads, which the projection head of pixel contrast
reads too) and, for heads whose auxiliary output is part of the decoding (OCR), ``aux``.

Each head has two layouts (``model.head_variant``):

- ``released``: the layer layout of the authors' released code (ContrastiveSeg, built on
  openseg): the widths, kernel sizes, biases and dropouts of its ``DeepLabHead``,
  ``HRNet_W48[_CONTRAST]``, ``HRNet_W48_OCR`` and ``SpatialOCRNet``, so that its checkpoints
  load (``contrastseg convert``) and give its logits;
- ``compact``: this project's earlier, lighter layout (1x1 ASPP projection, 1x1 HRNetV2 head,
  convolutions without bias before batch norm).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadVariant = Literal["released", "compact"]
HEAD_VARIANTS: tuple[str, ...] = ("released", "compact")


def check_head_variant(variant: str) -> None:
    if variant not in HEAD_VARIANTS:
        raise ValueError(f"head variant {variant!r}: allowed values are {list(HEAD_VARIANTS)}")


def conv_bn_relu(
    cin: int, cout: int, kernel: int = 1, dilation: int = 1, bias: bool = False
) -> nn.Sequential:
    """``Conv2d`` (``kernel`` x ``kernel``, same padding) -> ``BatchNorm2d`` -> ``ReLU``; keys
    ``0.weight`` (``0.bias`` with ``bias``) and ``1.*`` (batch norm)."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=bias),
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
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous branches and image pooling, then a
    ``project_kernel`` x ``project_kernel`` conv-BN-ReLU of the five concatenated branches
    (3x3 in the released code, 1x1 in the compact layout)."""

    def __init__(
        self,
        cin: int,
        cout: int = 256,
        rates: tuple[int, ...] = (12, 24, 36),
        project_kernel: int = 1,
    ) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        branches.append(ImagePooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(cout * len(branches), cout, project_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3 decode head on the last stage ``feats[in_index]`` (B, C_in, h, w) of a dilated
    backbone.

    released (openseg's ``DeepLabHead``): ASPP (``channels`` wide, 512 there; 3x3 projection)
    -> 3x3 conv -> BN (no ReLU) -> 1x1 classifier with bias; no dropout.
    compact: ASPP (1x1 projection) -> 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier.

    ``forward(feats) -> {"seg": (B, num_classes, h, w), "features": feats[in_index]}``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: tuple[int, ...] = (12, 24, 36),
        dropout: float = 0.1,
        in_index: int = -1,
        variant: HeadVariant = "released",
    ) -> None:
        super().__init__()
        check_head_variant(variant)
        self.variant = variant
        self.in_index = in_index
        released = variant == "released"
        self.aspp = ASPP(in_channels, channels, rates, project_kernel=3 if released else 1)
        if released:
            self.bottleneck: nn.Module = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
            )
            self.dropout: nn.Module = nn.Identity()
        else:
            self.bottleneck = conv_bn_relu(channels, channels, 3)
            self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = feats[self.in_index]
        return {"seg": self.classifier(self.dropout(self.bottleneck(self.aspp(x)))), "features": x}


def concat_branches(feats: list[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
    """HRNetV2 representation: every branch bilinearly upsampled to the first (stride 4) and
    concatenated, ``[(B, C_i, h_i, w_i)] -> (B, sum C_i, h_0, w_0)`` (720 channels for W48).
    The released code upsamples with ``align_corners=True``."""
    size = feats[0].shape[-2:]
    ups = [feats[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=align_corners) for f in feats[1:]
    ]
    return torch.cat(ups, dim=1)


class HRNetV2Head(nn.Module):
    """HRNetV2 decode head on the branches concatenated at stride 4.

    released (``HRNet_W48_CONTRAST.cls_head``): 3x3 conv with bias (same width) -> BN-ReLU ->
    dropout (0.1 there) -> 1x1 classifier without bias; branches upsampled with
    ``align_corners=True``.
    compact: 1x1 conv-BN-ReLU (same width) -> dropout (none by default) -> 1x1 classifier with
    bias.

    ``forward(feats: four HRNet branches) -> {"seg": (B, num_classes, H/4, W/4),
    "features": the concatenation (B, sum C_i, H/4, W/4)}``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
        variant: HeadVariant = "released",
    ) -> None:
        super().__init__()
        check_head_variant(variant)
        self.variant = variant
        released = variant == "released"
        self.align_corners = released
        self.block = conv_bn_relu(in_channels, in_channels, 3 if released else 1, bias=released)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=not released)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = concat_branches(feats, self.align_corners)
        return {"seg": self.classifier(self.dropout(self.block(x))), "features": x}


class FCNHead(nn.Module):
    """Auxiliary head, (B, C_in, h, w) -> logits.

    released (openseg's ``DeepLabHead.layer_dsn``): 3x3 conv with bias -> BN-ReLU -> 1x1
    classifier; no dropout. compact: 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        variant: HeadVariant = "released",
    ) -> None:
        super().__init__()
        check_head_variant(variant)
        self.variant = variant
        released = variant == "released"
        self.block = conv_bn_relu(in_channels, channels, 3, bias=released)
        self.dropout = nn.Identity() if released else nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))
