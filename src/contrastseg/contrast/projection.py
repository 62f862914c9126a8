"""Projection head of pixel contrast (training only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """1x1 conv (d->m) -> BN -> ReLU -> 1x1 conv (m->dim) -> L2 normalisation over channels.

    ``forward(x: (B, d, h, w)) -> (B, dim, h, w)`` with unit-norm pixel embeddings. The hidden
    width m is d (the paper's head) unless ``hidden_channels`` says otherwise: on wide features
    (MobileNetV3's 960 channels) a narrower m cuts the head's cost by about d/m.
    """

    def __init__(self, in_channels: int, dim: int = 256, hidden_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2, dim=1)
