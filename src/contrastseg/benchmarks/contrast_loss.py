"""Benchmark of the vectorised pixel-contrast loss against a loop implementation.

:func:`loop_reference_loss` follows the structure of the official ContrastiveSeg code (Python
loops over images and classes, a ``nonzero`` and host sync per class, one gather from the full
embedding tensor per (image, class)) with the same loss formula as
:func:`contrastseg.contrast.contrast_loss`. :func:`run_loss_benchmark` times
forward + backward of both on random data with a realistic block structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.benchmarks.timing import interleaved_median_ms
from contrastseg.contrast import PixelContrast

__all__ = [
    "format_loss_benchmark",
    "loop_reference_loss",
    "make_benchmark_batch",
    "run_loss_benchmark",
]


def loop_reference_loss(
    embed: Tensor,
    seg_logits: Tensor,
    target: Tensor,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    max_samples: int = 1024,
    max_views: int = 100,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pixel contrast with loop-based sampling, as structured in the official code.

    Same sampling rules and loss as :class:`PixelContrast` without memory (its own random
    choices), written with per-image and per-class Python loops.
    """
    B, D, h, w = embed.shape
    with torch.no_grad():
        labels = target
        if tuple(labels.shape[-2:]) != (h, w):
            labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        labels = labels.long().reshape(B, -1)
        logits = seg_logits.detach()
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits.float(), (h, w), mode="bilinear", align_corners=False)
        pred = logits.argmax(1).reshape(B, -1)
    X = embed.permute(0, 2, 3, 1).reshape(B, h * w, D)

    classes = []
    total = 0
    for ii in range(B):
        this_y = labels[ii]
        this_classes = [c for c in torch.unique(this_y).tolist() if c != ignore_index and c >= 0]
        this_classes = [c for c in this_classes if (this_y == c).nonzero().shape[0] > max_views]
        classes.append(this_classes)
        total += len(this_classes)
    if total == 0:
        return embed.sum() * 0
    n_view = min(max_samples // total, max_views)
    if n_view == 0:
        return embed.sum() * 0

    X_ = torch.zeros((total, n_view, D), dtype=embed.dtype, device=embed.device)
    y_ = torch.zeros(total, dtype=torch.long, device=embed.device)
    ptr = 0
    for ii in range(B):
        this_y, this_p = labels[ii], pred[ii]
        for c in classes[ii]:
            hard = ((this_y == c) & (this_p != c)).nonzero().squeeze(1)
            easy = ((this_y == c) & (this_p == c)).nonzero().squeeze(1)
            num_hard, num_easy = hard.shape[0], easy.shape[0]
            if num_hard >= n_view / 2 and num_easy >= n_view / 2:
                num_hard_keep = n_view // 2
                num_easy_keep = n_view - num_hard_keep
            elif num_hard >= n_view / 2:
                num_easy_keep = num_easy
                num_hard_keep = n_view - num_easy_keep
            else:
                num_hard_keep = num_hard
                num_easy_keep = n_view - num_hard_keep
            perm = torch.randperm(num_hard, generator=generator, device=hard.device)
            hard = hard[perm[:num_hard_keep]]
            perm = torch.randperm(num_easy, generator=generator, device=easy.device)
            easy = easy[perm[:num_easy_keep]]
            indices = torch.cat((hard, easy))
            X_[ptr] = X[ii, indices, :]
            y_[ptr] = c
            ptr += 1

    feats = X_.reshape(total * n_view, D).to(torch.promote_types(X_.dtype, torch.float32))
    y = y_.repeat_interleave(n_view)
    return _dense_loss(feats, y, temperature, base_temperature)


def _dense_loss(feats: Tensor, labels: Tensor, temperature: float, base_temperature: float):
    """The in-batch loss with full N x N matrices, as in the official code."""
    n = feats.shape[0]
    logits = feats @ feats.T / temperature
    logits = logits - logits.max(1, keepdim=True)[0].detach()
    same = (labels[:, None] == labels[None, :]).float()
    not_self = 1.0 - torch.eye(n, device=feats.device)
    pos = same * not_self
    neg = 1.0 - same
    neg_logits = (torch.exp(logits) * neg).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg_logits)
    n_pos = pos.sum(1)
    mean_log_prob_pos = (pos * log_prob).sum(1) / n_pos.clamp(min=1)
    has_pos = (n_pos > 0).float()
    loss = -(temperature / base_temperature) * mean_log_prob_pos * has_pos
    return loss.sum() / has_pos.sum().clamp(min=1)


def make_benchmark_batch(
    batch: int,
    grid: tuple[int, int],
    num_classes: int = 19,
    dim: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(embed, seg_logits, target)`` on the grid with a block label structure.

    Each image gets 12 classes placed on a coarse 4 x 8 map (so ~10-12 present, in blocks),
    a few ignore blocks, and predictions that disagree with the labels on ~20% of pixels.
    """
    h, w = grid
    gen = torch.Generator().manual_seed(seed)
    cls = torch.stack([torch.randperm(num_classes, generator=gen)[:12] for _ in range(batch)])
    coarse = torch.gather(cls, 1, torch.randint(0, 12, (batch, 32), generator=gen))
    coarse = coarse.view(batch, 4, 8)
    coarse[torch.rand(batch, 4, 8, generator=gen) < 0.05] = 255
    target = F.interpolate(coarse[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    wrong = torch.rand(batch, h, w, generator=gen) < 0.2
    pred = torch.where(wrong, torch.randint(0, num_classes, (batch, h, w), generator=gen), target)
    pred = pred.clamp(max=num_classes - 1)
    seg_logits = F.one_hot(pred, num_classes).permute(0, 3, 1, 2).to(dtype)
    embed = F.normalize(torch.randn(batch, dim, h, w, generator=gen), dim=1).to(dtype)
    return embed.to(device), seg_logits.to(device), target.to(device)


def run_loss_benchmark(
    batch_sizes=(2, 8),
    grids=((128, 256), (64, 128)),
    num_classes: int = 19,
    dim: int = 256,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Forward + backward time of :class:`PixelContrast` on embeddings (no memory) vs the loop
    version.

    Returns one row per (batch, grid): ``batch``, ``grid`` (``"hxw"``), ``ms_vectorised``,
    ``ms_loop`` (medians of ``repeats`` after one warm-up, the two alternating) and
    ``speedup``.
    """
    device = torch.device(device)
    rows = []
    for grid in grids:
        for batch in batch_sizes:
            embed, seg_logits, target = make_benchmark_batch(
                batch, tuple(grid), num_classes, dim, device, dtype
            )
            embed.requires_grad_(True)
            module = PixelContrast(num_classes, None, dim=dim).to(device)
            gen = torch.Generator(device=device).manual_seed(0)

            def vectorised(module=module, embed=embed, seg_logits=seg_logits, target=target):
                module(embed, seg_logits, target).backward()
                embed.grad = None

            def loop(embed=embed, seg_logits=seg_logits, target=target, gen=gen):
                loop_reference_loss(embed, seg_logits, target, generator=gen).backward()
                embed.grad = None

            ms_vec, ms_loop = interleaved_median_ms([vectorised, loop], device, repeats)
            rows.append(
                {
                    "batch": batch,
                    "grid": f"{grid[0]}x{grid[1]}",
                    "ms_vectorised": ms_vec,
                    "ms_loop": ms_loop,
                    "speedup": ms_loop / ms_vec if ms_vec > 0 else float("inf"),
                }
            )
    return rows


def format_loss_benchmark(rows: list[dict]) -> str:
    """A plain aligned text table of :func:`run_loss_benchmark` rows."""
    header = ("batch", "grid", "vectorised ms", "loop ms", "speedup")
    body = [
        (
            str(r["batch"]),
            str(r["grid"]),
            f"{r['ms_vectorised']:.1f}",
            f"{r['ms_loop']:.1f}",
            f"{r['speedup']:.1f}x",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(x.rjust(wd) for x, wd in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)
