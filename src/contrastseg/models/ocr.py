"""OCR: object-contextual representations (Yuan, Chen and Wang, ECCV 2020).

The decode head works in four steps on pixel features ``X`` (B, C, h, w):

1. soft object regions ``M`` (B, K, h, w): logits of an auxiliary head (one region per class),
   trained with the auxiliary cross-entropy (weight 0.4);
2. object region representations ``f_k = sum_i softmax_i(M_k) x_i`` (B, C, K): a weighted mean of
   the pixel features per region, the weights a softmax over spatial positions;
3. pixel-region relation ``w_ik = softmax_k(phi(x_i) . psi(f_k) / sqrt(d))`` and the object
   contextual representation ``y_i = rho(sum_k w_ik delta(f_k))`` (query, key, value and output
   transforms are 1x1 conv-BN-ReLU; ``d`` = key channels, 256);
4. augmented representation ``z_i = g([x_i, y_i])`` (1x1 conv-BN-ReLU to 512, dropout), then the
   classifier.

The ``released`` layout is the one of the authors' code (openseg's ``SpatialOCR_Module`` in
``HRNet_W48_OCR`` and ``SpatialOCRNet``): every convolution before a batch norm has a bias, the
soft-object-region head is a 3x3 conv-BN-ReLU (+ dropout 0.05 on a dilated backbone) and the
HRNet branches are upsampled with ``align_corners=True``. The ``compact`` layout has no such
biases, a 1x1 region head on HRNet and no region-head dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.models.heads import HeadVariant, check_head_variant, concat_branches, conv_bn_relu


def object_region_representations(feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``feats`` (B, C, h, w), region logits ``regions`` (B, K, h, w) -> (B, C, K).

    Each region's representation is the mean of the pixel features weighted by the softmax of
    its logits over all spatial positions.
    """
    weights = torch.softmax(regions.flatten(2), dim=2)  # (B, K, N)
    return torch.bmm(feats.flatten(2), weights.transpose(1, 2))  # (B, C, K)


class PixelRegionRelation(nn.Module):
    """Object contextual representation: attention of every pixel over the K object regions.

    ``forward(feats: (B, C, h, w), regions: (B, C, K)) -> (B, C, h, w)``. ``bias``: the 1x1
    convolutions have biases (the released code's ``_ObjectAttentionBlock``).
    """

    def __init__(self, channels: int, key_channels: int = 256, bias: bool = False) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.query = nn.Sequential(
            conv_bn_relu(channels, key_channels, bias=bias),
            conv_bn_relu(key_channels, key_channels, bias=bias),
        )
        self.key = nn.Sequential(
            conv_bn_relu(channels, key_channels, bias=bias),
            conv_bn_relu(key_channels, key_channels, bias=bias),
        )
        self.value = conv_bn_relu(channels, key_channels, bias=bias)
        self.out = conv_bn_relu(key_channels, channels, bias=bias)

    def forward(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feats.shape
        regions = regions.unsqueeze(-1)  # (B, C, K, 1): a 1-wide "image" of K positions
        query = self.query(feats).flatten(2).transpose(1, 2)  # (B, N, d)
        key = self.key(regions).flatten(2)  # (B, d, K)
        value = self.value(regions).flatten(2).transpose(1, 2)  # (B, K, d)
        relation = torch.softmax(torch.bmm(query, key) * self.key_channels**-0.5, dim=-1)
        context = torch.bmm(relation, value).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.out(context)


class OCRHead(nn.Module):
    """OCR decode head on a dilated backbone or on HRNetV2.

    On HRNet (``concat=True``) the four branches are concatenated at stride 4 and both the
    soft-object-region head and the pixel representation read the concatenation; on a dilated
    backbone the region head reads ``feats[aux_index]`` (the stage before the last) and the pixel
    representation ``feats[in_index]`` (the last stage). The region head is conv-BN-ReLU
    (``aux_kernel`` x ``aux_kernel``) -> 1x1 classifier; in the released layout a dropout
    (``aux_dropout``, 0.05 on a dilated backbone in the released code, none on HRNet) sits before
    that classifier (``aux_head``: conv-BN-ReLU, dropout, classifier; compact: conv-BN-ReLU,
    classifier).

    ``forward(feats) -> {"seg": (B, K, h, w), "aux": soft object regions (B, K, h, w),
    "features": the map the pixel representation reads}``. The region head is part of the
    decoding, so it also runs in eval mode; only its logits are not returned then.
    """

    def __init__(
        self,
        in_channels: int,
        aux_in_channels: int,
        num_classes: int,
        mid_channels: int = 512,
        key_channels: int = 256,
        aux_channels: int = 512,
        aux_kernel: int = 3,
        dropout: float = 0.05,
        concat: bool = False,
        in_index: int = -1,
        aux_index: int = -2,
        variant: HeadVariant = "released",
        aux_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_head_variant(variant)
        self.variant = variant
        self.concat = concat
        self.in_index = in_index
        self.aux_index = aux_index
        bias = variant == "released"
        self.align_corners = bias
        region = conv_bn_relu(aux_in_channels, aux_channels, aux_kernel, bias=bias)
        classify = nn.Conv2d(aux_channels, num_classes, 1)
        if bias:
            drop = nn.Dropout2d(aux_dropout) if aux_dropout > 0 else nn.Identity()
            self.aux_head = nn.Sequential(region, drop, classify)
        else:
            self.aux_head = nn.Sequential(region, classify)
        self.pixel = conv_bn_relu(in_channels, mid_channels, 3, bias=bias)
        self.relation = PixelRegionRelation(mid_channels, key_channels, bias=bias)
        self.augment = conv_bn_relu(2 * mid_channels, mid_channels, bias=bias)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.concat:
            x = concat_branches(feats, self.align_corners)
            aux_in = x
        else:
            x, aux_in = feats[self.in_index], feats[self.aux_index]
        regions = self.aux_head(aux_in)
        pixels = self.pixel(x)
        grid = regions
        if grid.shape[-2:] != pixels.shape[-2:]:  # dilated backbone at output stride 16 or 32
            grid = F.interpolate(grid, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        context = self.relation(pixels, object_region_representations(pixels, grid))
        augmented = self.dropout(self.augment(torch.cat([context, pixels], dim=1)))
        return {"seg": self.classifier(augmented), "aux": regions, "features": x}
