"""Forward + backward time of the Table 2 losses, side by side, relative to cross-entropy.

The logits are at stride 4 (the HRNetV2-W48 head of Table 2: ``(B, 19, H/4, W/4)`` for a
``H x W`` Cityscapes crop) and every loss upsamples them bilinearly to the label size, as in
training; the time covers that upsampling, the loss and its backward to the logits (and, for
AAF, to its adaptive weights). Labels have a block structure with a few ignored blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.benchmarks.timing import aligned_table, interleaved_median_ms
from contrastseg.losses import (
    AAFLoss,
    cross_entropy,
    lovasz_softmax,
    ohem_cross_entropy,
    rmi_loss,
)

__all__ = ["format_losses_benchmark", "make_losses_batch", "run_losses_benchmark"]


def make_losses_batch(
    batch: int,
    size: tuple[int, int],
    num_classes: int = 19,
    stride: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``logits (B, C, H/stride, W/stride)`` correlated with ``target (B, H, W)``: labels from a
    coarse 8 x 16 map of random classes (5% of its cells ignored), logits = 2 x one-hot of the
    label on the logit grid + unit noise."""
    H, W = size
    h, w = max(1, H // stride), max(1, W // stride)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, 8, 16), generator=gen).float()
    target = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long()
    holes = F.interpolate(
        (torch.rand(batch, 1, 8, 16, generator=gen) < 0.05).float(), size=(H, W), mode="nearest"
    )[:, 0].bool()
    target[holes] = 255
    grid_labels = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    logits = 2.0 * F.one_hot(grid_labels, num_classes).permute(0, 3, 1, 2).float()
    logits = logits + torch.randn(batch, num_classes, h, w, generator=gen)
    return logits.to(device), target.to(device)


def run_losses_benchmark(
    batch: int = 2,
    size: tuple[int, int] = (512, 1024),
    num_classes: int = 19,
    stride: int = 4,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> dict:
    """Time CE, OHEM-CE, Lovasz-softmax, RMI and AAF (forward + backward) on one batch.

    Default settings of each loss (docs/method.md, "Comparison losses"): OHEM threshold 0.7
    and min_kept 100000; Lovasz over present classes, per batch; RMI radius 3, avg pool 4,
    a = 5e-4; AAF distances (1, 2, 3), margin 3. Returns ``{"batch", "size", "logits", "stride",
    "repeats", "device", "rows"}`` with rows ``{"loss", "ms", "ratio"}`` (ratio = ms / ms of CE).
    """
    device = torch.device(device)
    logits, target = make_losses_batch(batch, size, num_classes, stride, device)
    logits.requires_grad_(True)
    aaf = AAFLoss(num_classes).to(device)
    losses: dict[str, Callable[[], Tensor]] = {
        "ce": lambda: cross_entropy(logits, target),
        "ohem_ce": lambda: ohem_cross_entropy(logits, target),
        "lovasz": lambda: lovasz_softmax(logits, target),
        "rmi": lambda: rmi_loss(logits, target),
        "aaf": lambda: aaf(logits, target),
    }

    def step(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn().backward()
            logits.grad = None
            aaf.zero_grad(set_to_none=True)

        return run

    ms = interleaved_median_ms([step(fn) for fn in losses.values()], device, repeats)
    base = ms[0]
    rows = [
        {"loss": name, "ms": t, "ratio": t / base if base > 0 else float("inf")}
        for name, t in zip(losses, ms, strict=True)
    ]
    return {
        "batch": batch,
        "size": tuple(size),
        "logits": tuple(logits.shape),
        "stride": stride,
        "repeats": repeats,
        "device": str(device),
        "rows": rows,
    }


def format_losses_benchmark(result: dict) -> str:
    """A plain aligned text table of :func:`run_losses_benchmark`."""
    H, W = result["size"]
    head = (
        f"labels {result['batch']}x{H}x{W}, logits {'x'.join(map(str, result['logits']))} "
        f"(stride {result['stride']}, upsampled inside each loss), {result['device']}, median of "
        f"{result['repeats']}, forward + backward"
    )
    header = ("loss", "ms", "x CE")
    body = [(r["loss"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}") for r in result["rows"]]
    lines = aligned_table(header, body)
    return "\n".join([head, *lines])
