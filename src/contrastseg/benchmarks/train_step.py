"""Seconds per train step with and without pixel contrast (and, with ``--compile``, with the
model's forward compiled), measured side by side."""

from __future__ import annotations

import time

import torch

from contrastseg.benchmarks.timing import aligned_table, interleaved_median_ms
from contrastseg.config import ExperimentConfig
from contrastseg.contrast import PixelContrast
from contrastseg.engine.compiling import compile_training
from contrastseg.engine.step import sgd_step
from contrastseg.losses import LossSet
from contrastseg.models import build_model
from contrastseg.precision import AMP_DTYPES


def build_step(
    cfg: ExperimentConfig,
    num_classes: int,
    contrast: bool,
    device: torch.device,
    amp: str = "off",
    compile_backend: str | None = None,
):
    """The pieces of a train step and the step itself: ``(step, parts)`` where ``step(image,
    target)`` runs forward, losses, backward and SGD, and ``parts`` holds the ``model``, the
    ``losses`` (a :class:`LossSet`), the ``contrast`` module (or ``None``) and the ``optim``.
    With contrast, the memory starts full (``ClassMemory.fill_random_``). With
    ``compile_backend``, the model's forward is compiled as the trainer compiles it
    (``train.compile``): the first step compiles."""
    loss_cfg = cfg.loss.model_copy(deep=True)
    loss_cfg.contrast.enabled = contrast
    loss_cfg.contrast.warmup_iters = 0
    model = build_model(cfg.model, num_classes, backbone_weights=False)
    module = None
    if contrast:
        module = PixelContrast.from_config(
            loss_cfg.contrast, cfg.model, num_classes, model.feature_channels
        )
    model = model.to(device).train()
    losses = LossSet(loss_cfg, num_classes, contrast=module).to(device)
    if module is not None and module.memory is not None:
        module.memory.fill_random_()  # time the steady state: a full memory
    params = list(model.parameters()) + losses.model_parameters()
    optim = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    forward = model if compile_backend is None else compile_training(model, compile_backend)

    def step(image: torch.Tensor, target: torch.Tensor) -> None:
        # The trainer's own step, past any warm-up.
        index = torch.arange(image.shape[0], device=image.device)
        sgd_step(
            forward, losses, optim, scaler, image, target, index, 10**9, amp_dtype=AMP_DTYPES[amp]
        )

    parts = {"model": model, "losses": losses, "contrast": module, "optim": optim}
    return step, parts


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
    amp: str = "off",
    compile_backend: str | None = None,
) -> dict:
    """Median s/iter of a full train step (forward, losses, backward, SGD) for the baseline and
    for the same model with the projection head, sampling, contrast loss and memory update;
    the memory starts full, as after the first few thousand iterations of a real run.
    The two are interleaved (A, B, A, B, ...) so that machine noise hits both alike. On CUDA
    the peak memory of each variant is reported too (GiB).

    With ``compile_backend`` (``bench step --compile``) both are also built with the model's
    forward compiled (``train.compile``) and the four steps are interleaved in the same
    rounds: ``s_iter_baseline_compiled`` and ``s_iter_contrast_compiled``. Each compiled
    step's first call, which compiles (the contrast variant's reuses the baseline's graph: same
    model code and sizes), is timed apart as ``first_step_s_*`` and left out of the medians."""
    dev = torch.device(device)
    torch.manual_seed(0)
    image = torch.randn(batch, 3, *size, device=dev)
    target = block_labels(batch, *size, num_classes).to(dev)
    names = ["baseline", "contrast"]
    if compile_backend is not None:
        torch._dynamo.reset()  # the first compiled step compiles, whatever ran before
        names += ["baseline_compiled", "contrast_compiled"]
    peak: dict[str, float | None] = dict.fromkeys(names)
    first: dict[str, float] = {}
    steps = {}
    for name in names:
        backend = compile_backend if name.endswith("_compiled") else None
        steps[name] = build_step(
            cfg, num_classes, name.startswith("contrast"), dev, amp, compile_backend=backend
        )[0]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        steps[name](image, target)  # a step for the peak memory; the timing warms up again
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak[name] = torch.cuda.max_memory_allocated(dev) / 2**30
        first[name] = time.perf_counter() - t0
    seconds = dict(
        zip(
            names,
            (
                ms / 1000.0
                for ms in interleaved_median_ms(
                    [lambda s=step: s(image, target) for step in steps.values()], dev, repeats
                )
            ),
            strict=True,
        )
    )
    base, ours = seconds["baseline"], seconds["contrast"]
    compiled = {}
    if compile_backend is not None:
        compiled = {
            "compile_backend": compile_backend,
            "s_iter_baseline_compiled": seconds["baseline_compiled"],
            "s_iter_contrast_compiled": seconds["contrast_compiled"],
            "first_step_s_baseline_compiled": first["baseline_compiled"],
            "first_step_s_contrast_compiled": first["contrast_compiled"],
            "peak_gib_baseline_compiled": peak["baseline_compiled"],
            "peak_gib_contrast_compiled": peak["contrast_compiled"],
        }
    return {
        "backbone": cfg.model.backbone.name,
        "head": cfg.model.head,
        "batch": batch,
        "size": f"{size[0]}x{size[1]}",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "amp": amp,
        "s_iter_baseline": base,
        "s_iter_contrast": ours,
        "overhead_pct": 100.0 * (ours - base) / base,
        "memory": cfg.loss.contrast.memory.enabled,
        "peak_gib_baseline": peak["baseline"],
        "peak_gib_contrast": peak["contrast"],
        **compiled,
    }


# The supplement's Table 1, in its order: (config stem under configs/cityscapes, model, backbone)
TABLE1 = (
    ("deeplabv3_mobilenetv1", "DeepLabV3", "MobileNet-V1"),
    ("deeplabv3_mobilenetv2", "DeepLabV3", "MobileNet-V2"),
    ("deeplabv3_mobilenetv3", "DeepLabV3", "MobileNet-V3"),
    ("deeplabv3_resnet101", "DeepLabV3", "D-ResNet-101"),
    ("hrnetv2_w48", "HRNetV2", "HRNetV2-W48"),
    ("ocr_resnet101", "OCR", "D-ResNet-101"),
    ("ocr_hrnetv2_w48", "OCR", "HRNetV2-W48"),
)
# The other segmenters' Cityscapes configs (model_table.OTHER_SEGMENTERS), after Table 1's rows
OTHER_ROWS = (
    ("pspnet_resnet101", "PSPNet", "D-ResNet-101"),
    ("deeplabv3plus_xception71", "DeepLabV3+", "D-Xception-71"),
    ("upernet_convnext_tiny", "UPerNet", "ConvNeXt-T"),
)


def run_table1_benchmark(
    config_dir,
    models: list[str] | None = None,
    batch: int = 2,
    size: tuple[int, int] = (512, 1024),
    repeats: int = 5,
    device: str = "cpu",
    amp: str = "off",
) -> list[dict]:
    """:func:`run_step_benchmark` for each Table 1 model and each other segmenter (its
    ``*_contrast.yaml`` config), or for the config stems in ``models``."""
    from pathlib import Path

    from contrastseg.config import load_config

    rows = []
    for stem, model, backbone in TABLE1 + OTHER_ROWS:
        if models and stem not in models:
            continue
        cfg = load_config(Path(config_dir) / f"{stem}_contrast.yaml")
        row = run_step_benchmark(cfg, 19, batch, size, repeats, device, amp)
        rows.append({"config": stem, "model": model, "backbone_name": backbone, **row})
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def format_table1(rows: list[dict]) -> str:
    """Rows in the supplement's Table 1 columns (plus overhead and peak memory)."""
    head = (
        f"{'model':<10} {'backbone':<14} {'s/iter':>8} {'+contrast':>10} {'overhead':>9} "
        f"{'peak GiB':>9} {'+contrast':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        pb = "-" if r["peak_gib_baseline"] is None else f"{r['peak_gib_baseline']:.2f}"
        pc = "-" if r["peak_gib_contrast"] is None else f"{r['peak_gib_contrast']:.2f}"
        lines.append(
            f"{r['model']:<10} {r['backbone_name']:<14} {r['s_iter_baseline']:>8.3f} "
            f"{r['s_iter_contrast']:>10.3f} {r['overhead_pct']:>+8.1f}% {pb:>9} {pc:>10}"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"device {r['device']}, batch {r['batch']}, input {r['size']}, amp {r['amp']}, "
            "median of interleaved repeats"
        )
    return "\n".join(lines)


def format_step_benchmark(row: dict) -> str:
    """Two lines (model and settings; s/iter with and without contrast, the overhead); with a
    compiled row (``compile_backend``), then a table of eager against compiled s/iter, their
    ratio and the first compiled step's seconds (the compilation, left out of the medians)."""
    lines = [
        f"model {row['head']}-{row['backbone']}  batch {row['batch']}  input {row['size']}  "
        f"device {row['device']}  amp {row['amp']}  memory {'on' if row['memory'] else 'off'}",
        f"s/iter baseline {row['s_iter_baseline']:.4f}  + contrast {row['s_iter_contrast']:.4f}  "
        f"overhead {row['overhead_pct']:+.1f}%",
    ]
    if row.get("compile_backend"):
        body = [
            (
                label,
                f"{row[f's_iter_{key}']:.4f}",
                f"{row[f's_iter_{key}_compiled']:.4f}",
                f"{row[f's_iter_{key}_compiled'] / row[f's_iter_{key}']:.2f}",
                f"{row[f'first_step_s_{key}_compiled']:.1f}",
            )
            for label, key in (("baseline", "baseline"), ("+ contrast", "contrast"))
        ]
        header = (
            f"compiled ({row['compile_backend']})",
            "eager s/iter",
            "compiled s/iter",
            "compiled/eager",
            "first compiled step s",
        )
        lines += ["", *aligned_table(header, body)]
    return "\n".join(lines)
