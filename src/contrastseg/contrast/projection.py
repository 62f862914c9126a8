"""Projection head of pixel contrast (training only)."""

from __future__ import annotations

import torch
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
        conv1, bn, relu, conv2 = self.net
        return _Normalize.apply(_conv1x1(relu(bn(_conv1x1(x, conv1))), conv2))


def _conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution, as one batched matrix product: on CPUs PyTorch runs
    1x1 convolutions through its generic im2col path (``slow_conv2d``), which with two threads
    took the head from 1.3x to 1.7x the time of its plain products (``bench step --breakdown``)."""
    B, _, h, w = x.shape
    weight = conv.weight.flatten(1)
    y = torch.bmm(weight.expand(B, *weight.shape), x.flatten(2))
    if conv.bias is not None:
        y = y + conv.bias[:, None]
    return y.view(B, -1, h, w)


class _Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=1)`` (eps 1e-12) with a three-pass backward:
    ``(g - y <y, g>) / max(|x|, eps)`` (``<y, g>`` only where ``|x| > eps``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        denom = norm.clamp_min(1e-12)
        y = x / denom
        ctx.save_for_backward(y, denom, norm > 1e-12)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        y, denom, inside = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad, y, dim=1).unsqueeze(1) * inside
        return torch.addcmul(grad, y, dot, value=-1).div_(denom).to(ctx.dtype)
