"""Integrity of a data split: what the real data sets share, and the scan behind ``data check``.

``PairedSource`` is the base of the sources that read a benchmark in its publisher's layout
(Cityscapes, PASCAL-Context, COCO-Stuff, CamVid): a list of (image file, label file) pairs and a
lookup table from the raw ids stored in the label files to train ids (255 = ignore, -1 = an id
the data set does not have). Building a source only lists files; when pairs are incomplete it
raises ``DataError`` naming the first file (``strict=True``, what training uses) or records every
incomplete pair in ``source.missing`` (``strict=False``, what the check uses).

``check_source`` reads every pair and reports each problem with its kind, file and detail:

==============  ============================================================================
kind            meaning
==============  ============================================================================
missing image   a label file whose image is not there (or a listed name without image)
missing label   an image whose label file is not there
unreadable      not an image file PIL can open (empty, wrong format, corrupt header)
truncated       the header is fine but the pixel data ends early or is corrupt
channels        an image training cannot use (16-bit, 32-bit or float values, or a mode PIL
                does not convert to RGB), a label map with more than one channel
size mismatch   image and label map differ in width or height
label values    raw label ids outside the data set's classes and special ids
==============  ============================================================================

It also counts the pixels of every class (after mapping) for the class-frequency table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from contrastseg.data.folder import IMAGE_MODES, image_mode_problem, load_image, load_mask
from contrastseg.data.indexing import check_index
from contrastseg.errors import DataError

IGNORE_INDEX = 255
PROBLEM_KINDS = (
    "missing image",
    "missing label",
    "unreadable",
    "truncated",
    "channels",
    "size mismatch",
    "label values",
)
_IMAGE_MODES = IMAGE_MODES  # what load_image accepts (and turns into RGB)
_LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Problem:
    """One defect of a split: ``kind`` (one of ``PROBLEM_KINDS``), the file, what is wrong."""

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


def describe_ids(values: Iterable[int], limit: int = 10) -> str:
    """``"3, 40, 41 ..."``: the first ``limit`` values."""
    values = [int(v) for v in values]
    return ", ".join(str(v) for v in values[:limit]) + (" ..." if len(values) > limit else "")


def index_files(directory: Path, suffix: str) -> dict[str, Path]:
    """Key (file name without ``suffix``) -> path, for the files directly in ``directory`` whose
    names end with ``suffix`` (case-sensitive)."""
    found: dict[str, Path] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(suffix) and entry.is_file():
                found[entry.name[: -len(suffix)]] = Path(entry.path)
    return found


def pair_files(
    where: str,
    images: dict[str, Path],
    labels: dict[str, Path] | None,
    image_for: Callable[[str], Path],
    label_for: Callable[[str], Path],
    names: list[str] | None = None,
    strict: bool = True,
) -> tuple[list[str], list[Path], list[Path | None], list[Problem]]:
    """Match images and labels by key.

    ``names`` (a split list) fixes the samples and their order; without it the samples are the
    sorted union of both keys. ``labels=None`` means the split has no labels (images only).
    Returns (names, image paths, label paths, problems); with ``strict`` a problem raises
    ``DataError`` naming the first file instead.
    """
    keys = names if names is not None else sorted(set(images) | set(labels or {}))
    out_names: list[str] = []
    out_images: list[Path] = []
    out_labels: list[Path | None] = []
    problems: list[Problem] = []
    for key in keys:
        image = images.get(key)
        label = labels.get(key) if labels is not None else None
        if image is None:
            if label is not None:
                detail = f"label {label} has no image {image_for(key)}"
                problems.append(Problem("missing image", image_for(key), detail))
            else:
                detail = f"sample {key!r} is listed but has no image {image_for(key)}"
                problems.append(Problem("missing image", image_for(key), detail))
                if labels is not None:
                    detail = f"sample {key!r} is listed but has no label {label_for(key)}"
                    problems.append(Problem("missing label", label_for(key), detail))
            continue
        if labels is not None and label is None:
            detail = f"image {image} has no label {label_for(key)}"
            problems.append(Problem("missing label", label_for(key), detail))
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
    """Base of the real data sets: listed (image, label) file pairs plus a raw-id lookup table.

    Subclasses set ``dataset``, ``root``, ``split``, ``classes``, ``palette``, ``label_table``
    (see :func:`label_table`) and ``label_ids`` (a phrase naming the valid raw ids, for
    messages), then call ``_set_pairs``. ``self[i]`` is (image (H, W, 3) uint8 RGB, mask (H, W)
    uint8 train ids, 255 = ignore); a split without labels gives masks that are all 255.
    """

    dataset = "paired"
    label_ids = ""
    classes: list[str]
    palette: np.ndarray
    label_table: np.ndarray

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
        image_ext: str,
        label_dir: Path,
        label_ext: str,
        strict: bool,
        names: list[str] | None = None,
    ) -> None:
        """Keep the pairs ``image_dir/NAME{image_ext}``, ``label_dir/NAME{label_ext}``: every
        name found, or ``names`` in that order (see :func:`pair_files`)."""
        self._set_pairs(
            *pair_files(
                where,
                index_files(image_dir, image_ext),
                index_files(label_dir, label_ext),
                lambda n: image_dir / f"{n}{image_ext}",
                lambda n: label_dir / f"{n}{label_ext}",
                names=names,
                strict=bool(strict),
            )
        )

    def __len__(self) -> int:
        return len(self._names)

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self._names))

    def name(self, index: int) -> str:
        return self._names[self._check_index(index)]

    def image_path(self, index: int) -> Path:
        return self._images[self._check_index(index)]

    def label_path(self, index: int) -> Path | None:
        """The label file of sample ``index``; None for a split without labels."""
        return self._labels[self._check_index(index)]

    def read_label_ids(self, path: Path) -> np.ndarray:
        """The raw ids stored in a label file, (H, W) integers. PNG here; override for others."""
        return load_mask(path)

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
        image = load_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        mask = self.map_labels(self.read_label_ids(label_path), label_path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{label_path}: label size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from "
                f"image {image_path} size {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask


# ---------------------------------------------------------------------------------------------
# The scan


@dataclass
class CheckReport:
    """What ``check_source`` found in one split."""

    dataset: str
    split: str
    num_samples: int
    classes: list[str]
    pixel_counts: np.ndarray  # (C,) int64, labelled pixels of each class after mapping
    ignored_pixels: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def frequencies(self) -> np.ndarray:
        """Share of each class among the labelled pixels (zeros when none)."""
        total = int(self.pixel_counts.sum())
        return self.pixel_counts / total if total else np.zeros(len(self.classes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "problems": [
                {"kind": p.kind, "path": str(p.path), "detail": p.detail} for p in self.problems
            ],
            "pixel_counts": {
                c: int(n) for c, n in zip(self.classes, self.pixel_counts, strict=True)
            },
            "ignored_pixels": self.ignored_pixels,
        }


def format_report(report: CheckReport) -> str:
    """Problems table, then the class-frequency table, as plain text."""
    n = len(report.problems)
    lines = [
        f"{report.dataset} {report.split}: {report.num_samples} samples checked, "
        + (f"{n} problem(s)" if n else "no problems")
    ]
    if report.problems:
        width = max(len(p.kind) for p in report.problems)
        lines.append(f"  {'kind':<{width}}  file: detail")
        for p in report.problems:
            lines.append(f"  {p.kind:<{width}}  {p.path}: {p.detail}")
    total = int(report.pixel_counts.sum())
    lines.append(f"class frequencies ({total} labelled pixels, {report.ignored_pixels} ignored):")
    width = max([len(c) for c in report.classes] + [5])
    lines.append(f"  {'id':>3}  {'class':<{width}}  {'pixels':>12}  {'share':>7}")
    for i, (name, count, share) in enumerate(
        zip(report.classes, report.pixel_counts, report.frequencies, strict=True)
    ):
        lines.append(f"  {i:>3}  {name:<{width}}  {int(count):>12}  {100 * share:>6.2f}%")
    absent = [c for c, count in zip(report.classes, report.pixel_counts, strict=True) if count == 0]
    if absent and total:
        lines.append(f"  classes with no pixel: {', '.join(absent)}")
    return "\n".join(lines)


def _open_checked(
    path: Path, what: str, modes: tuple[str, ...]
) -> tuple[tuple[int, int] | None, np.ndarray | None, Problem | None]:
    """Decode a file fully: ((width, height), pixels of a label or None for an image, problem)."""
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as exc:
                kind = _decode_error_kind(exc)
                return None, None, Problem(kind, path, f"{what} {size[0]}x{size[1]}: {exc}")
            if mode not in modes:
                bands = len(img.getbands())
                if what == "image":
                    detail = image_mode_problem(mode, bands) or f"image mode {mode}"
                else:
                    detail = (
                        f"{what} has {bands} channel(s) (mode {mode}); expected one channel "
                        "(mode L or P)"
                    )
                return size, None, Problem("channels", path, detail)
            return size, (np.asarray(img) if what == "label" else None), None
    except UnidentifiedImageError as exc:
        return None, None, Problem("unreadable", path, f"not an image file ({exc})")
    except FileNotFoundError:
        return None, None, Problem(f"missing {what}", path, f"{what} file disappeared")
    except (OSError, SyntaxError, ValueError) as exc:
        return None, None, Problem(_decode_error_kind(exc), path, f"cannot read the {what} ({exc})")


def _decode_error_kind(exc: Exception) -> str:
    """'truncated' when PIL's message says the data ends early or is cut, else 'unreadable'."""
    text = str(exc).lower()
    return (
        "truncated"
        if any(k in text for k in ("truncat", "broken", "crc", "end of"))
        else ("unreadable")
    )


def _check_one(source: Any, table: np.ndarray, index: int) -> tuple[list[Problem], np.ndarray]:
    """Problems of sample ``index`` and the histogram of its mapped label ids (256 bins)."""
    problems: list[Problem] = []
    counts = np.zeros(256, dtype=np.int64)
    image_path = Path(source.image_path(index))
    label_path = _label_path(source, index)
    image_size, _, problem = _open_checked(image_path, "image", _IMAGE_MODES)
    if problem:
        problems.append(problem)
    if label_path is None:
        return problems, counts
    label_path = Path(label_path)
    if label_path.suffix.lower() == ".png":
        _, raw, problem = _open_checked(label_path, "label", _LABEL_MODES)
    else:
        try:
            raw, problem = source.read_label_ids(label_path), None
        except DataError as exc:
            raw, problem = None, Problem("unreadable", label_path, str(exc))
    if problem:
        problems.append(problem)
    if raw is None:
        return problems, counts
    raw = np.asarray(raw).astype(np.int64)
    if image_size is not None and raw.shape != (image_size[1], image_size[0]):
        problems.append(
            Problem(
                "size mismatch",
                label_path,
                f"label {raw.shape[1]}x{raw.shape[0]} (WxH) but image {image_path.name} is "
                f"{image_size[0]}x{image_size[1]}",
            )
        )
    outside = (raw < 0) | (raw >= len(table))
    clipped = np.where(outside, 0, raw)
    mapped = np.where(outside, -1, table[clipped])
    unknown = mapped < 0
    if unknown.any():
        values = np.unique(raw[unknown])
        valid = getattr(source, "label_ids", "") or f"0..{len(source.classes) - 1} and 255"
        problems.append(
            Problem(
                "label values",
                label_path,
                f"{int(unknown.sum())} pixel(s) hold ids [{describe_ids(values)}] that are not "
                f"label ids of the data set (valid: {valid})",
            )
        )
    counts += np.bincount(mapped[~unknown].ravel(), minlength=256)[:256]
    return problems, counts


def _label_path(source: Any, index: int) -> Path | None:
    if hasattr(source, "label_path"):
        return source.label_path(index)
    return source.mask_path(index)  # FolderDataset


def _table_of(source: Any) -> np.ndarray:
    table = getattr(source, "label_table", None)
    if table is not None:
        return np.asarray(table, dtype=np.int64)
    identity = np.full(256, -1, dtype=np.int64)  # a folder data set stores train ids
    identity[: len(source.classes)] = np.arange(len(source.classes))
    identity[IGNORE_INDEX] = IGNORE_INDEX
    return identity


def check_source(
    source: Any, split: str = "", limit: int | None = None, workers: int = 1
) -> CheckReport:
    """Read every pair of ``source`` (the first ``limit``) and report the problems found, plus
    the incomplete pairs the source recorded when it was built (``source.missing``).

    ``source`` is a ``PairedSource`` or a ``FolderDataset`` (anything with ``image_path(i)``,
    ``label_path(i)`` or ``mask_path(i)``, ``classes``). ``workers`` threads decode in parallel.
    """
    if not (hasattr(source, "image_path") and hasattr(source, "classes")):
        raise DataError(f"cannot check a {type(source).__name__}: it does not list image files")
    table = _table_of(source)
    count = len(source) if limit is None else min(limit, len(source))
    problems: list[Problem] = list(getattr(source, "missing", []))
    hist = np.zeros(256, dtype=np.int64)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda i: _check_one(source, table, i), range(count)))
    else:
        results = [_check_one(source, table, i) for i in range(count)]
    for found, counts in results:
        problems.extend(found)
        hist += counts
    num_classes = len(source.classes)
    return CheckReport(
        dataset=getattr(source, "dataset", type(source).__name__),
        split=split or getattr(source, "split", ""),
        num_samples=count,
        classes=list(source.classes),
        pixel_counts=hist[:num_classes].copy(),
        ignored_pixels=int(hist[IGNORE_INDEX]),
        problems=problems,
    )


def check_split(cfg: Any, split: str, limit: int | None = None, workers: int = 1) -> CheckReport:
    """Build the source of ``split`` from a config's data section (``ExperimentConfig`` or
    ``DataConfig``) without stopping at incomplete pairs, then :func:`check_source` it."""
    from contrastseg.data.dataset import build_source
    from contrastseg.engine.builders import source_kwargs

    data = getattr(cfg, "data", cfg)
    if data.name == "synthetic":
        raise DataError("data.name is 'synthetic': it is generated, there are no files to check")
    kwargs = source_kwargs(data, split)
    if data.name != "folder":
        kwargs["strict"] = False
    source = build_source(data.name, split, **kwargs)
    report = check_source(source, split=split, limit=limit, workers=workers)
    report.dataset = data.name
    return report
