"""Pyramid pooling (PSPNet's module, also UPerNet's on the last stage).

The map (B, C, h, w) is average-pooled to ``b x b`` cells for each bin ``b`` (1, 2, 3, 6), each
pooled map goes through a 1x1 conv-BN-ReLU and is upsampled back to ``h x w``; the input and the
upsampled branches are concatenated: (B, C + len(bins) * branch_channels, h, w).

The pooling is written as two small products with averaging matrices instead of
``F.adaptive_avg_pool2d``: the same cells (cell ``i`` of ``b`` covers rows
``floor(i h / b)`` to ``ceil((i + 1) h / b)``, PyTorch's rule) and the same values, but ONNX has
no adaptive pooling for a size only known at run time, and these products export with free
height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.models.heads import conv_bn_relu


def pooling_matrix(size: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size): row ``i`` averages positions ``floor(i size / bins)`` to
    ``ceil((i + 1) size / bins) - 1``, the cells of ``F.adaptive_avg_pool1d``."""
    cell = torch.arange(bins, device=like.device)
    start = torch.div(cell * size, bins, rounding_mode="floor")
    end = torch.div((cell + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` for (B, C, h, w) as two matrix products."""
    rows = pooling_matrix(x.shape[2], bins, x)  # (bins, h)
    cols = pooling_matrix(x.shape[3], bins, x)  # (bins, w)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class PoolingBranch(nn.Module):
    """One bin: (B, C, h, w) -> pooled to bins x bins -> 1x1 conv-BN-ReLU -> upsampled to h x w."""

    def __init__(self, cin: int, cout: int, bins: int, align_corners: bool) -> None:
        super().__init__()
        self.bins = bins
        self.align_corners = align_corners
        self.proj = conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.proj(adaptive_avg_pool(x, self.bins))
        return F.interpolate(
            pooled, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners
        )


class PyramidPooling(nn.Module):
    """``forward(x: (B, C, h, w)) -> (B, C + len(bins) * branch_channels, h, w)``: ``x`` and its
    pooled branches, concatenated."""

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            PoolingBranch(in_channels, branch_channels, b, align_corners) for b in bins
        )
        self.out_channels = in_channels + len(bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [branch(x) for branch in self.branches], dim=1)
