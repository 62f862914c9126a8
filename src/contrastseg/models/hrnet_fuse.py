"""HRNet branch fusion at any input size.

timm's ``HighResolutionModule`` upsamples a lower-resolution branch by an exact power of two
(``nn.Upsample(scale_factor=2 ** (j - i))``) before adding it to branch ``i``. A branch is made
from the one above it by a stride-2 convolution, so its size is ``ceil(size / 2)``: for an
input whose sides are not multiples of 32 the doubled map is one pixel too large and the sum
fails (375x500 -> 94x125 at stride 4, 24x32 at stride 16 doubled to 48x64 against 47x63).

:func:`fuse_to_target_size` makes every such module resize the lower branch to the exact size
of the branch it is added to, as the authors' HRNet does (``F.interpolate(..., size=(h_i,
w_i))``), keeping the ``nn.Upsample``'s mode and ``align_corners`` (timm: nearest; the released
variant: bilinear with ``align_corners=True``). Where the sizes are exact powers of two apart
the result is the same as before, bit for bit; weights and state-dict keys do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from torch import nn


class SizedFuseModule(HighResolutionModule):
    """A ``HighResolutionModule`` whose fusion resizes to the target branch's size."""

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x, strict=True)]
        fused = []
        for i, layers in enumerate(self.fuse_layers):
            y = layers[0](x[0])  # branch 0 is never below branch i
            for j in range(1, len(layers)):
                y = y + (_up_to(layers[j], x[j], x[i]) if j > i else layers[j](x[j]))
            fused.append(self.fuse_act(y))
        return fused


def _up_to(layer: nn.Sequential, low: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``layer`` = conv, BN, ``nn.Upsample``: the conv and BN on ``low``, then the upsampling
    to ``target``'s height and width (the ``nn.Upsample``'s mode and corner alignment)."""
    out = low
    for module in layer:
        if isinstance(module, nn.Upsample):
            corners = module.align_corners if module.mode in ("bilinear", "bicubic") else None
            return F.interpolate(
                out, size=target.shape[-2:], mode=module.mode, align_corners=corners
            )
        out = module(out)
    return out


def fuse_to_target_size(body: nn.Module) -> None:
    """Switch every ``HighResolutionModule`` of ``body`` to :class:`SizedFuseModule`, in
    place."""
    for module in body.modules():
        if type(module) is HighResolutionModule:
            module.__class__ = SizedFuseModule
