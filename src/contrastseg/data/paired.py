"""The paired-file source every file-backed data set builds on.

A :class:`PairedSource` is a list of (image file, label file) pairs and a lookup table from the
raw ids stored in the label files to train ids (255 = ignore, -1 = an id the data set does not
have). The benchmarks in their publishers' layouts (Cityscapes, PASCAL-Context, COCO-Stuff,
CamVid) and a user's folder (whose masks store train ids: an identity table) are all one.
Building a source only lists files; when pairs are incomplete it raises ``DataError`` naming the
first file (``strict=True``, what training uses) or records every incomplete pair in
``source.missing`` (``strict=False``, what ``contrastseg data check`` uses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contrastseg.data.fileio import (
    IGNORE_INDEX,
    MAX_IMAGE_PIXELS,
    index_files,
    load_image,
    load_mask,
)
from contrastseg.data.indexing import check_index
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

__all__ = [
    "PairedSource",
    "Problem",
    "describe_ids",
    "identity_label_table",
    "label_table",
    "pair_files",
]


@dataclass(frozen=True)
class Problem:
    """One defect of a split: ``kind`` (one of ``contrastseg.data.check.PROBLEM_KINDS``), the
    file, what is wrong."""

    kind: str
    path: Path
    detail: str


def label_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A lookup table raw id -> train id (int16, ``size`` entries); ids not in ``mapping`` get -1
    (unknown). Map an id to 255 to make it known but ignored."""
    table = np.full(size, -1, dtype=np.int16)
    for raw, train in mapping.items():
        if not 0 <= raw < size:
            raise DataError(f"raw label id {raw} does not fit a table of {size} entries")
        if not (0 <= train < 255 or train == IGNORE_INDEX):
            raise DataError(f"raw label id {raw} maps to {train}; train ids are 0..254 or 255")
        table[raw] = train
    return table


def identity_label_table(num_classes: int) -> np.ndarray:
    """The table of label files that store train ids: ``0..num_classes - 1`` and 255 map to
    themselves, every other value is unknown."""
    mapping = {k: k for k in range(num_classes)}
    mapping[IGNORE_INDEX] = IGNORE_INDEX
    return label_table(mapping)


def describe_ids(values: Iterable[int], limit: int = 10) -> str:
    """``"3, 40, 41 ..."``: the first ``limit`` values."""
    values = [int(v) for v in values]
    return ", ".join(str(v) for v in values[:limit]) + (" ..." if len(values) > limit else "")


def _expected(directory: Path, key: str, suffixes: str | tuple[str, ...]) -> Path:
    """The file ``key`` would be: ``directory/key.png``, or ``directory/key{.png,.jpg}`` when
    several suffixes are accepted."""
    if isinstance(suffixes, str):
        return directory / f"{key}{suffixes}"
    if len(suffixes) == 1:
        return directory / f"{key}{suffixes[0]}"
    return directory / f"{key}{{{','.join(suffixes)}}}"


def pair_files(
    where: str,
    images: dict[str, Path],
    labels: dict[str, Path] | None,
    image_for: Callable[[str], Path],
    label_for: Callable[[str], Path],
    names: list[str] | None = None,
    strict: bool = True,
    label_word: str = "label",
) -> tuple[list[str], list[Path], list[Path | None], list[Problem]]:
    """Match images and labels by key.

    ``names`` (a split file's list) fixes the samples and their order; without it the samples
    are the sorted union of both keys. ``labels=None`` means the split has no labels (images
    only). ``label_word`` is what messages call a label file (``"mask"`` for a folder). Returns
    (names, image paths, label paths, problems); with ``strict`` a problem raises ``DataError``
    naming the first file instead.
    """
    keys = names if names is not None else sorted(set(images) | set(labels or {}))
    out_names: list[str] = []
    out_images: list[Path] = []
    out_labels: list[Path | None] = []
    problems: list[Problem] = []
    for key in keys:
        image = images.get(key)
        label = labels.get(key) if labels is not None else None
        hint = " (list names without the extension)" if Path(key).suffix else ""
        found = len(problems)
        if image is None:
            if names is None:  # a label file alone
                detail = f"{label_word} {label} has no image {image_for(key)}"
            else:
                detail = (
                    f"sample {key!r} is listed but has no image {image_for(key)}{hint}; add the "
                    f"image or remove {key!r} from the split file"
                )
            problems.append(Problem("missing image", image_for(key), detail))
        if labels is not None and label is None:
            if names is None:  # an image file alone
                detail = f"image {image} has no {label_word} {label_for(key)}"
            else:
                detail = (
                    f"sample {key!r} is listed but has no {label_word} {label_for(key)}{hint}; "
                    f"add the {label_word} or remove {key!r} from the split file"
                )
            problems.append(Problem("missing label", label_for(key), detail))
        if len(problems) > found:
            continue
        out_names.append(key)
        out_images.append(image)
        out_labels.append(label)
    if strict and problems:
        more = len(problems) - 1
        suffix = (
            f" (and {more} more incomplete pair(s); `contrastseg data check CONFIG` lists them)"
            if more
            else ""
        )
        raise DataError(f"{where}: {problems[0].detail}{suffix}")
    if not out_names and not problems:
        raise DataError(
            f"{where}: no samples found; check data.root and the split name against the "
            "layout in docs/datasets.md"
        )
    return out_names, out_images, out_labels, problems


class PairedSource:
    """A data set of listed (image, label) file pairs plus a raw-id lookup table.

    Subclasses set ``dataset`` (their ``data.name``), ``root``, ``split``, ``classes``,
    ``palette``, ``label_table`` (see :func:`label_table`) and ``label_ids`` (a phrase naming
    the valid raw ids, for messages), then call ``_pair_folders`` or ``_set_pairs``. ``self[i]``
    is (image (H, W, 3) uint8 RGB, mask (H, W) uint8 train ids, 255 = ignore); a split without
    labels gives masks that are all 255. Image and label files of more than ``max_pixels``
    pixels are refused before they are decoded (``open_source`` sets it from
    ``data.max_image_pixels``).
    """

    dataset = "paired"
    label_ids = ""
    label_word = "label"  # what messages call a label file
    max_pixels: int = MAX_IMAGE_PIXELS
    classes: list[str]
    palette: np.ndarray
    label_table: np.ndarray
    missing: list[Problem]

    @classmethod
    def options(cls, data: DataConfig, split: str) -> dict[str, Any]:
        """The keyword arguments (besides ``split`` and ``strict``) that a config's data
        section gives this source."""
        return {"root": data.root}

    def _set_pairs(
        self,
        names: list[str],
        images: list[Path],
        labels: list[Path | None],
        missing: list[Problem],
    ) -> None:
        self._names = names
        self._images = images
        self._labels = labels
        self.missing = missing
        table = np.asarray(self.label_table, dtype=np.int16)
        self._lut = np.where(table < 0, IGNORE_INDEX, table).astype(np.uint8)
        self._unknown = table < 0

    def _pair_folders(
        self,
        where: str,
        image_dir: Path,
        image_suffixes: str | tuple[str, ...],
        label_dir: Path,
        label_suffixes: str | tuple[str, ...],
        strict: bool,
        names: list[str] | None = None,
    ) -> None:
        """Keep the pairs ``image_dir/NAME{image suffix}``, ``label_dir/NAME{label suffix}``:
        every name found, or ``names`` in that order (see :func:`pair_files`)."""
        self._set_pairs(
            *pair_files(
                where,
                index_files(image_dir, image_suffixes),
                index_files(label_dir, label_suffixes),
                lambda n: _expected(image_dir, n, image_suffixes),
                lambda n: _expected(label_dir, n, label_suffixes),
                names=names,
                strict=bool(strict),
                label_word=self.label_word,
            )
        )

    def __len__(self) -> int:
        return len(self._names)

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self._names))

    def name(self, index: int) -> str:
        """The sample's name (its file name without the suffix, or as listed)."""
        return self._names[self._check_index(index)]

    def image_path(self, index: int) -> Path:
        return self._images[self._check_index(index)]

    def label_path(self, index: int) -> Path | None:
        """The label file of sample ``index``; None for a split without labels."""
        return self._labels[self._check_index(index)]

    def read_label_ids(self, path: Path) -> np.ndarray:
        """The raw ids stored in a label file, (H, W) integers. PNG here; override for others."""
        return load_mask(path, max_pixels=self.max_pixels)

    def map_labels(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        """Raw ids -> (H, W) uint8 train ids; ``DataError`` naming ``path`` for unknown ids."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raw = raw.astype(np.int64)
            outside = (raw < 0) | (raw >= len(self._lut))
            if outside.any():
                raise self._unknown_ids(np.unique(raw[outside]), path)
        if self._unknown[raw].any():
            raise self._unknown_ids(np.unique(raw[self._unknown[raw]]), path)
        return self._lut[raw]

    def _unknown_ids(self, values: np.ndarray, path: Path | str) -> DataError:
        return DataError(
            f"{path}: label values [{describe_ids(values)}] are not {self.dataset} label ids "
            f"(valid: {self.label_ids})"
        )

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        image_path, label_path = self._images[index], self._labels[index]
        image = load_image(image_path, self.max_pixels)
        if label_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        mask = self.map_labels(self.read_label_ids(label_path), label_path)
        if mask.shape != image.shape[:2]:
            word = self.label_word
            raise DataError(
                f"{label_path}: {word} size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from "
                f"image {image_path} size {image.shape[1]}x{image.shape[0]}; {word}s must match "
                f"their images pixel for pixel: save the {word} at the image's size (when "
                f"resizing it, use nearest-neighbour so that ids stay ids) or fix the pairing"
            )
        return image, mask
