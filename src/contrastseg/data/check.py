"""The scan behind ``contrastseg data check``: every file of a split, read and checked.

``check_source`` reads every pair of a :class:`~contrastseg.data.paired.PairedSource` (a
benchmark or a folder) and reports each problem with its kind, file and detail:

==============  ============================================================================
kind            meaning
==============  ============================================================================
missing image   a label file whose image is not there (or a listed name without image)
missing label   an image whose label file is not there
unreadable      not an image file PIL can open (empty, wrong format, corrupt header)
truncated       the header is fine but the pixel data ends early or is corrupt
channels        an image training cannot use (16-bit, 32-bit or float values, or a mode PIL
                does not convert to RGB), a label map with more than one channel or with
                16-bit values stored in an 8-bit mode
too large       the header claims more pixels than ``data.max_image_pixels`` (not decoded)
size mismatch   image and label map differ in width or height
label values    raw label ids outside the data set's classes and special ids
==============  ============================================================================

The missing files are those the source recorded when it was built with ``strict=False``. It
also counts the pixels of every class (after mapping) for the class-frequency table.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from contrastseg.data.build import open_source
from contrastseg.data.fileio import (
    IGNORE_INDEX,
    IMAGE_MODES,
    MASK_MODES,
    ImageTooLarge,
    image_mode_problem,
    open_image,
    sixteen_bit_image_problem,
    sixteen_bit_mask_problem,
    wide_samples,
)
from contrastseg.data.paired import PairedSource, Problem, describe_ids
from contrastseg.datasets_table import DATA_SETS
from contrastseg.errors import DataError

__all__ = ["PROBLEM_KINDS", "CheckReport", "check_source", "check_split", "format_report"]

PROBLEM_KINDS = (
    "missing image",
    "missing label",
    "unreadable",
    "truncated",
    "channels",
    "too large",
    "size mismatch",
    "label values",
)


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
    path: Path, what: str, modes: tuple[str, ...], max_pixels: int | None = None
) -> tuple[tuple[int, int] | None, np.ndarray | None, Problem | None]:
    """Decode a file fully: ((width, height), pixels of a label or None for an image, problem).
    A file of more than ``max_pixels`` pixels is not decoded (see ``fileio.open_image``)."""
    try:
        with open_image(path, what, max_pixels) as img:
            mode, size = img.mode, img.size
            rawmode = wide_samples(img)  # before load(), which drops the tiles
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as exc:
                kind = _decode_error_kind(exc)
                return None, None, Problem(kind, path, f"{what} {size[0]}x{size[1]}: {exc}")
            if rawmode:
                if what == "image":
                    detail = sixteen_bit_image_problem(rawmode, mode)
                else:
                    detail = sixteen_bit_mask_problem(rawmode, mode, what)
                return size, None, Problem("channels", path, detail)
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
    except ImageTooLarge as exc:
        return None, None, Problem("too large", path, str(exc).removeprefix(f"{path}: "))
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


def _check_one(
    source: PairedSource, table: np.ndarray, index: int
) -> tuple[list[Problem], np.ndarray]:
    """Problems of sample ``index`` and the histogram of its mapped label ids (256 bins)."""
    problems: list[Problem] = []
    counts = np.zeros(256, dtype=np.int64)
    image_path = Path(source.image_path(index))
    label_path = source.label_path(index)
    limit = source.max_pixels
    image_size, _, problem = _open_checked(image_path, "image", IMAGE_MODES, limit)
    if problem:
        problems.append(problem)
    if label_path is None:
        return problems, counts
    label_path = Path(label_path)
    if label_path.suffix.lower() == ".png":
        _, raw, problem = _open_checked(label_path, "label", MASK_MODES, limit)
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
        valid = source.label_ids or f"0..{len(source.classes) - 1} and 255"
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


def check_source(
    source: PairedSource, split: str = "", limit: int | None = None, workers: int = 1
) -> CheckReport:
    """Read every pair of ``source`` (the first ``limit``) and report the problems found, plus
    the incomplete pairs the source recorded when it was built (``source.missing``).
    ``workers`` threads decode in parallel."""
    if not isinstance(source, PairedSource):
        raise DataError(f"cannot check a {type(source).__name__}: it does not list image files")
    table = np.asarray(source.label_table, dtype=np.int64)
    count = len(source) if limit is None else min(limit, len(source))
    problems: list[Problem] = list(source.missing)
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
        dataset=source.dataset,
        split=split or source.split,
        num_samples=count,
        classes=list(source.classes),
        pixel_counts=hist[:num_classes].copy(),
        ignored_pixels=int(hist[IGNORE_INDEX]),
        problems=problems,
    )


def check_split(cfg: Any, split: str, limit: int | None = None, workers: int = 1) -> CheckReport:
    """Open the source of ``split`` from a config's data section (``ExperimentConfig`` or
    ``DataConfig``) without stopping at incomplete pairs, then :func:`check_source` it."""
    data = getattr(cfg, "data", cfg)
    entry = DATA_SETS.get(data.name)
    if entry is not None and not entry.reads_root:
        raise DataError(f"data.name is {data.name!r}: it is generated, there are no files to check")
    source = open_source(data, split, strict=False)
    report = check_source(source, split=split, limit=limit, workers=workers)
    report.dataset = data.name
    return report
