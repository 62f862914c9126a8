"""Seconds per train step with and without pixel contrast, measured side by side."""

from __future__ import annotations

import statistics
import time

import torch

from contrastseg.config import ExperimentConfig
from contrastseg.losses import LossSet
from contrastseg.models import build_model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(cfg: ExperimentConfig, num_classes: int, contrast: bool, device: torch.device):
    loss_cfg = cfg.loss.model_copy(deep=True)
    loss_cfg.contrast.enabled = contrast
    loss_cfg.contrast.warmup_iters = 0
    model = build_model(cfg.model, num_classes, with_projection=contrast).to(device).train()
    losses = LossSet(loss_cfg, num_classes, embed_dim=cfg.model.projection_dim).to(device)
    optim = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(image: torch.Tensor, target: torch.Tensor) -> None:
        terms = losses(model(image), target, step=10**9)
        optim.zero_grad(set_to_none=True)
        terms["total"].backward()
        optim.step()

    return step


def block_labels(
    batch: int, height: int, width: int, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Label maps made of rectangles of classes (so each class covers many pixels), 5% ignore."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, 4, 8), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest")[:, 0]
    labels = labels.long()
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    return labels


def run_step_benchmark(
    cfg: ExperimentConfig,
    num_classes: int = 19,
    batch: int = 2,
    size: tuple[int, int] = (256, 512),
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Median s/iter of a full train step (forward, losses, backward, SGD) for the baseline and
    for the same model with the projection head, sampling, contrast loss and memory update.
    The two are interleaved (A, B, A, B, ...) so that machine noise hits both alike."""
    dev = torch.device(device)
    torch.manual_seed(0)
    image = torch.randn(batch, 3, *size, device=dev)
    target = block_labels(batch, *size, num_classes).to(dev)
    steps = {
        "baseline": _make_step(cfg, num_classes, False, dev),
        "contrast": _make_step(cfg, num_classes, True, dev),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step(image, target)
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(dev)
            t0 = time.perf_counter()
            step(image, target)
            _synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["baseline"])
    ours = statistics.median(times["contrast"])
    return {
        "backbone": cfg.model.backbone.name,
        "head": cfg.model.head,
        "batch": batch,
        "size": f"{size[0]}x{size[1]}",
        "device": str(dev),
        "s_iter_baseline": base,
        "s_iter_contrast": ours,
        "overhead_pct": 100.0 * (ours - base) / base,
        "memory": cfg.loss.contrast.memory.enabled,
    }


def format_step_benchmark(row: dict) -> str:
    return (
        f"model {row['head']}-{row['backbone']}  batch {row['batch']}  input {row['size']}  "
        f"device {row['device']}  memory {'on' if row['memory'] else 'off'}\n"
        f"s/iter baseline {row['s_iter_baseline']:.4f}  + contrast {row['s_iter_contrast']:.4f}  "
        f"overhead {row['overhead_pct']:+.1f}%"
    )
