"""Opening a data set: the source registered for a ``data.name``, and the torch datasets that a
config's data section describes.

The registry is :data:`contrastseg.datasets_table.DATA_SETS` (name -> source class, display
name); each source class says which keyword arguments a config gives it (its ``options``
classmethod), and its constructor's signature which ones it takes.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contrastseg.data.dataset import SegmentationDataset, Source
from contrastseg.data.transforms import EvalTransform, TrainTransform
from contrastseg.datasets_table import DATA_SET_NAMES, DATA_SETS
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

__all__ = [
    "build_eval_dataset",
    "build_source",
    "build_train_dataset",
    "open_source",
    "preflight",
    "source_class",
]


def source_class(name: str) -> type:
    """The source class registered for the data set ``name``."""
    entry = DATA_SETS.get(name)
    if entry is None:
        raise DataError(f"unknown data source {name!r}; choose one of {list(DATA_SET_NAMES)}")
    module, _, attr = entry.source.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_source(name: str, split: str, **kwargs: Any) -> Source:
    """The source of data set ``name`` for ``split``, built with ``kwargs``: e.g.
    ``build_source("synthetic", "val", num_samples=100)``, ``build_source("cityscapes", "val",
    root=..., coarse=False, strict=True)``. Keyword arguments the source does not take raise
    ``DataError``, as do required ones that are missing or None; other None values mean the
    default. ``strict=False`` (the file-backed sources) records incomplete pairs in
    ``source.missing`` instead of raising."""
    cls = source_class(name)
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if k != "split"}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise DataError(f"data source {name!r} does not take {unknown}; it takes {list(params)}")
    required = [k for k, p in params.items() if p.default is inspect.Parameter.empty]
    missing = [k for k in required if kwargs.get(k) is None]
    if missing:
        raise DataError(f"data source {name!r} needs {missing}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "root" in kwargs:
        kwargs["root"] = Path(kwargs["root"])
    return cls(split=split, **kwargs)


def open_source(data: DataConfig, split: str, strict: bool = True) -> Source:
    """The raw source of ``split`` of the data set a config's data section describes.
    ``strict=False`` lists incomplete pairs in ``source.missing`` instead of raising (what
    ``contrastseg data check`` uses; the generated data set has no files and ignores it). A
    source of files refuses those of more than ``data.max_image_pixels`` pixels."""
    cls = source_class(data.name)
    kwargs = cls.options(data, split)
    if "strict" in inspect.signature(cls).parameters:
        kwargs["strict"] = strict
    source = build_source(data.name, split, **kwargs)
    if hasattr(source, "max_pixels"):  # a PairedSource: every data set read from files
        source.max_pixels = data.max_image_pixels
    return source


def preflight(source: Source) -> None:
    """Cheap checks before training on files: building a real data set's source already listed
    every (image, label) pair and refused incomplete ones; here the first pair is decoded too,
    so that a wrong layout (e.g. colour PNGs where label ids are expected) stops the run at once
    with the file's name. A broken file met later raises ``DataError`` naming it as well.
    ``contrastseg data check CONFIG`` reads every file."""
    if len(source):
        source[0]


def build_train_dataset(cfg: DataConfig, seed: int) -> SegmentationDataset:
    """Training split with the random joint augmentation; ``(epoch, index)`` fixes the draw."""
    source = open_source(cfg, cfg.train_split)
    preflight(source)
    transform = TrainTransform(
        crop_size=tuple(cfg.crop_size),
        scale_range=tuple(cfg.scale_range),
        flip=cfg.flip,
        jitter=cfg.jitter,
        mean=cfg.mean,
        std=cfg.std,
        short_side=cfg.short_side,
        aspect_range=tuple(cfg.aspect_range),
        brightness_shift=cfg.brightness_shift,
        interpolation=cfg.interpolation,
        pad_position=cfg.pad_position,
    )
    return SegmentationDataset(source, transform, seed=seed)


def build_eval_dataset(cfg: DataConfig, split: str | None = None) -> SegmentationDataset:
    """A split with normalisation only (whole images, no resizing)."""
    split = split or cfg.val_split
    return SegmentationDataset(open_source(cfg, split), EvalTransform(mean=cfg.mean, std=cfg.std))
