"""Images with their ground truth, for figures: samples of a split by index, or image files
whose masks come from the data set's split or from a folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contrastseg.config import DataConfig
from contrastseg.data import PairedSource, load_image, load_mask, open_source
from contrastseg.errors import DataError
from contrastseg.files import real_path


@dataclass(frozen=True)
class LabelledImage:
    """``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) uint8 class ids (255 = ignore)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def parse_indices(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``: comma-separated indices and inclusive ranges."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise DataError(
                f"--indices {text!r}: {part!r} is not an index or a range; write e.g. 0-3,7"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DataError(f"--indices {text!r}: range {part!r} runs backwards; write {hi}-{lo}")
        out += [i for i in range(lo, hi + 1) if i not in out]
    return out


def open_split(data: DataConfig, split: str | None = None):
    """The raw source (image, mask pairs) of ``split`` (default ``data.val_split``)."""
    return open_source(data, split or data.val_split)


def split_samples(data: DataConfig, indices: list[int], split: str | None = None):
    """Samples ``indices`` of a split of the data set ``data`` describes."""
    source = open_split(data, split)
    bad = [i for i in indices if not 0 <= i < len(source)]
    if bad:
        raise DataError(
            f"--indices {bad}: split {split or data.val_split!r} of data set {data.name!r} has "
            f"{len(source)} samples (indices 0..{len(source) - 1})"
        )
    return [LabelledImage(source.name(i), *source[i]) for i in indices]


def _masks_from_folder(images: list[Path], masks: Path, num_classes: int):
    if not masks.is_dir():
        raise DataError(f"--masks {masks}: no such folder")
    out = []
    for path in images:
        mask_path = masks / f"{path.stem}.png"
        if not mask_path.is_file():
            raise DataError(
                f"{path}: no mask {mask_path}; --masks holds one single-channel PNG of class ids "
                f"per image, named like the image (<stem>.png)"
            )
        image, mask = load_image(path), load_mask(mask_path, num_classes)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from "
                f"image {path} size {image.shape[1]}x{image.shape[0]}"
            )
        out.append(LabelledImage(path.stem, image, mask))
    return out


def _masks_from_split(images: list[Path], data: DataConfig, split: str | None):
    split = split or data.val_split
    source = open_split(data, split)
    if not isinstance(source, PairedSource):
        raise DataError(
            f"data set {data.name!r} has no image files to match {images[0]} against; pass "
            f"--masks FOLDER, or leave out the images and pick samples with --indices"
        )
    index = {real_path(source.image_path(i)): i for i in range(len(source))}
    out = []
    for path in images:
        i = index.get(real_path(path))
        if i is None:
            raise DataError(
                f"{path}: not an image of split {split!r} of data set {data.name!r} "
                f"(root {data.root}); choose the split with --split, or pass --masks FOLDER"
            )
        image, mask = source[i]
        out.append(LabelledImage(path.stem, image, mask))
    return out


def file_samples(
    images: list[Path],
    data: DataConfig,
    num_classes: int,
    masks: Path | None = None,
    split: str | None = None,
) -> list[LabelledImage]:
    """Image files with their ground truth: ``masks/<stem>.png`` when ``masks`` is given, else
    the mask the data set ``data`` pairs with the file in ``split`` (default: the val split)."""
    if masks is not None:
        return _masks_from_folder(images, Path(masks), num_classes)
    return _masks_from_split(images, data, split)
