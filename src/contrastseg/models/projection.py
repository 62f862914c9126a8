"""Projection head of pixel contrast (training only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """1x1 conv (d->d) -> BN -> ReLU -> 1x1 conv (d->dim) -> L2 normalisation over channels.

    ``forward(x: (B, d, h, w)) -> (B, dim, h, w)`` with unit-norm pixel embeddings.
    """

    def __init__(self, in_channels: int, dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2, dim=1)
