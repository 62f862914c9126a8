"""Turn the data section of a config into datasets."""

from __future__ import annotations

from contrastseg.config import DataConfig
from contrastseg.data import EvalTransform, SegmentationDataset, TrainTransform, build_source


def source_kwargs(cfg: DataConfig, split: str) -> dict:
    if cfg.name == "synthetic":
        size = cfg.train_size if split == cfg.train_split else cfg.val_size
        return {
            "num_samples": size,
            "image_size": tuple(cfg.image_size),
            "seed": cfg.seed,
            "difficulty": cfg.difficulty,
        }
    if cfg.name == "cityscapes":
        return {"root": cfg.root, "coarse": cfg.cityscapes_coarse}
    if cfg.name == "coco_stuff":
        return {"root": cfg.root, "variant": cfg.coco_split}
    return {"root": cfg.root}


def preflight(source) -> None:
    """Cheap checks before training on files: building a real data set's source already listed
    every (image, label) pair and refused incomplete ones; here the first pair is decoded too,
    so that a wrong layout (e.g. colour PNGs where label ids are expected) stops the run at once
    with the file's name. A broken file met later raises ``DataError`` naming it as well.
    ``contrastseg data check CONFIG`` reads every file."""
    if len(source):
        source[0]


def build_train_dataset(cfg: DataConfig, seed: int) -> SegmentationDataset:
    """Training split with the random joint augmentation; ``(epoch, index)`` fixes the draw."""
    source = build_source(cfg.name, cfg.train_split, **source_kwargs(cfg, cfg.train_split))
    preflight(source)
    transform = TrainTransform(
        crop_size=tuple(cfg.crop_size),
        scale_range=tuple(cfg.scale_range),
        flip=cfg.flip,
        jitter=cfg.jitter,
        mean=cfg.mean,
        std=cfg.std,
    )
    return SegmentationDataset(source, transform, seed=seed)


def build_eval_dataset(cfg: DataConfig, split: str | None = None) -> SegmentationDataset:
    """A split with normalisation only (whole images, no resizing)."""
    split = split or cfg.val_split
    source = build_source(cfg.name, split, **source_kwargs(cfg, split))
    return SegmentationDataset(source, EvalTransform(mean=cfg.mean, std=cfg.std))
