"""Loader speed: images/s of decode + augment at Cityscapes size, per worker count.

:func:`run_data_benchmark` writes a few synthetic images (2048x1024 by default) with label maps
in the Cityscapes layout into a temporary folder, then reads them through the training pipeline
(``CityscapesSource`` -> ``SegmentationDataset`` with ``TrainTransform``: random scale 0.5-2.0,
crop 512x1024, flip, jitter, normalise) with a ``DataLoader`` for each number of workers. The
images are smooth colour fields with fine noise, so that their PNGs are about as large, and as
slow to decode, as real street scenes (2-3 MB each at full size).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrastseg.data.cityscapes import CityscapesSource
from contrastseg.data.dataset import SegmentationDataset
from contrastseg.data.transforms import TrainTransform

__all__ = ["format_data_benchmark", "run_data_benchmark", "write_cityscapes_like"]

# label ids of the 19 evaluated classes and a few ignored ones
_LABEL_IDS = np.array(
    [0, 4, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
)


def write_cityscapes_like(
    root: Path, num_images: int, size: tuple[int, int] = (1024, 2048), seed: int = 0
) -> None:
    """Write ``num_images`` image/label pairs of ``size`` (height, width) as Cityscapes ``train``
    (city ``bench``) under ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    image_dir = root / "leftImg8bit" / "train" / "bench"
    label_dir = root / "gtFine" / "train" / "bench"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        coarse = rng.integers(0, 256, size=(max(1, h // 64), max(1, w // 64), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16)
        noise = rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
        image = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        blocks = rng.choice(_LABEL_IDS, size=(max(1, h // 128), max(1, w // 128))).astype(np.uint8)
        label = np.asarray(Image.fromarray(blocks).resize((w, h), Image.NEAREST))
        name = f"bench_{i:06d}_000019"
        Image.fromarray(image).save(image_dir / f"{name}_leftImg8bit.png")
        Image.fromarray(label).save(label_dir / f"{name}_gtFine_labelIds.png")


def _time_loader(dataset: SegmentationDataset, workers: int, repeats: int) -> float:
    indices = [i for _ in range(repeats) for i in range(len(dataset))]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=1,
        num_workers=workers,
        shuffle=False,
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def run_data_benchmark(
    num_images: int = 8,
    workers: tuple[int, ...] = (0, 2),
    size: tuple[int, int] = (1024, 2048),
    crop: tuple[int, int] = (512, 1024),
    repeats: int = 1,
    seed: int = 0,
) -> dict:
    """Time decode + augment of ``num_images`` (x ``repeats``) Cityscapes-sized samples.

    Returns a dict with the settings, ``decode_s`` and ``augment_s`` (mean seconds per image in
    the main process) and ``rows``: per worker count, ``images``, ``seconds`` and ``images_s``
    (the wall time includes starting the worker processes).
    """
    if num_images < 1 or repeats < 1:
        raise ValueError("num_images and repeats must be at least 1")
    with tempfile.TemporaryDirectory(prefix="contrastseg-bench-data-") as tmp:
        root = Path(tmp)
        write_cityscapes_like(root, num_images, size, seed)
        source = CityscapesSource(root, "train")
        transform = TrainTransform(crop_size=crop, scale_range=(0.5, 2.0), flip=True, jitter=0.2)
        dataset = SegmentationDataset(source, transform, seed=seed)

        decode = augment = 0.0
        for i in range(len(source)):
            t0 = time.perf_counter()
            image, mask = source[i]
            t1 = time.perf_counter()
            transform(image, mask, torch.Generator().manual_seed(i))
            t2 = time.perf_counter()
            decode += t1 - t0
            augment += t2 - t1

        rows = []
        for w in workers:
            seconds = _time_loader(dataset, int(w), repeats)
            count = num_images * repeats
            rows.append(
                {
                    "workers": int(w),
                    "images": count,
                    "seconds": seconds,
                    "images_s": count / seconds,
                }
            )
    return {
        "size": tuple(size),
        "crop": tuple(crop),
        "num_images": num_images,
        "decode_s": decode / num_images,
        "augment_s": augment / num_images,
        "rows": rows,
    }


def format_data_benchmark(result: dict) -> str:
    h, w = result["size"]
    ch, cw = result["crop"]
    lines = [
        f"decode + augment: {result['num_images']} PNG images {w}x{h} (Cityscapes layout) -> "
        f"{cw}x{ch} crops, scale 0.5-2.0, flip, jitter",
        f"one process: decode {result['decode_s']:.3f} s/image, augment "
        f"{result['augment_s']:.3f} s/image, {1 / (result['decode_s'] + result['augment_s']):.2f} "
        f"images/s",
        f"{'workers':>7}  {'images':>6}  {'seconds':>8}  {'images/s':>8}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['workers']:>7}  {row['images']:>6}  {row['seconds']:>8.2f}  "
            f"{row['images_s']:>8.2f}"
        )
    lines.append("(DataLoader wall time, worker start-up included; 0 = in the main process)")
    return "\n".join(lines)
