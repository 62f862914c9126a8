"""Baseline vs. ours: where the second model is right and the first wrong, boxed on a figure.

A figure per image has four panels, input | ground truth | baseline | ours, masks in the data
set's palette (ignore white). Dashed boxes mark the *improved regions*: connected groups of
pixels that ours labels correctly and the baseline does not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contrastseg.data import colorize
from contrastseg.errors import CheckpointError, DataError
from contrastseg.viz.components import component_boxes, label_components
from contrastseg.viz.samples import file_samples, split_samples
from contrastseg.viz.save import legend_columns, save_figure

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


def improved_mask(
    target: np.ndarray, pred_baseline: np.ndarray, pred_ours: np.ndarray, ignore_index: int = 255
) -> np.ndarray:
    """``(H, W)`` bool: not ignored, ours equals the target, the baseline does not."""
    target, a, b = (np.asarray(m) for m in (target, pred_baseline, pred_ours))
    if target.ndim != 2 or a.shape != target.shape or b.shape != target.shape:
        raise DataError(
            f"target, baseline and ours must be (H, W) masks of one size, got shapes "
            f"{target.shape}, {a.shape}, {b.shape}"
        )
    return (target != ignore_index) & (b == target) & (a != target)


def _overlap(p: Box, q: Box) -> bool:
    """Half-open boxes share at least one pixel."""
    return p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]


def merge_overlapping(boxes: Sequence[Box]) -> list[Box]:
    """Replace any two boxes that share a pixel by their union, until no two do.

    Boxes are half-open ``(x0, y0, x1, y1)``; boxes that only touch along an edge are kept
    apart. The result is sorted by ``(y0, x0, y1, x1)``.
    """
    merged = [tuple(int(v) for v in b) for b in boxes]
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                if _overlap(merged[i], merged[j]):
                    p, q = merged[i], merged.pop(j)
                    merged[i] = (min(p[0], q[0]), min(p[1], q[1]), max(p[2], q[2]), max(p[3], q[3]))
                    changed = True
                    break
            if changed:
                break
    return sorted(merged, key=lambda b: (b[1], b[0], b[3], b[2]))


def improved_regions(
    target: np.ndarray,
    pred_baseline: np.ndarray,
    pred_ours: np.ndarray,
    min_area: int = 64,
    ignore_index: int = 255,
) -> list[Box]:
    """Boxes around the regions where ours is right and the baseline wrong.

    Args:
        target, pred_baseline, pred_ours: ``(H, W)`` integer class ids; ``target`` pixels equal
            to ``ignore_index`` never count.
        min_area: components (8-connected: pixels touching by an edge or a corner) of fewer
            pixels are dropped before boxing.
    Returns:
        Half-open boxes ``(x0, y0, x1, y1)`` in pixels (``mask[y0:y1, x0:x1]`` is the box),
        merged while any two share a pixel, sorted top to bottom, then left to right.
    """
    if min_area < 1:
        raise DataError(f"min_area must be >= 1 pixel, got {min_area}")
    labels, count = label_components(
        improved_mask(target, pred_baseline, pred_ours, ignore_index), connectivity=8
    )
    areas, boxes = component_boxes(labels, count)
    return merge_overlapping([tuple(b) for b in boxes[areas >= min_area].tolist()])


def _pixel_accuracy(target: np.ndarray, pred: np.ndarray, ignore_index: int) -> float:
    valid = target != ignore_index
    return float((pred[valid] == target[valid]).mean()) if valid.any() else float("nan")


def make_compare_figure(
    image: np.ndarray,
    target: np.ndarray,
    pred_baseline: np.ndarray,
    pred_ours: np.ndarray,
    palette: np.ndarray,
    boxes: Sequence[Box] = (),
    class_names: Sequence[str] | None = None,
    names: tuple[str, str] = ("baseline", "ours"),
    title: str | None = None,
    ignore_index: int = 255,
):
    """A matplotlib ``Figure`` with four panels (input, ground truth, baseline, ours) in a row.

    ``image`` is (H, W, 3) uint8, the masks (H, W) class ids, ``palette`` (C, 3) uint8,
    ``boxes`` half-open ``(x0, y0, x1, y1)`` drawn dashed on every panel. The prediction
    panels give the pixel accuracy; with ``class_names`` a legend lists the classes shown.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    target, a, b = (np.asarray(m) for m in (target, pred_baseline, pred_ours))
    palette = np.asarray(palette, dtype=np.uint8)
    h, w = target.shape
    if np.asarray(image).shape[:2] != (h, w):
        raise DataError(f"image shape {np.asarray(image).shape} does not match mask {(h, w)}")
    panels = [
        (np.asarray(image), "input"),
        (colorize(target, palette, ignore_index), "ground truth"),
    ]
    for pred, name in ((a, names[0]), (b, names[1])):
        acc = _pixel_accuracy(target, pred, ignore_index)
        panels.append((colorize(pred, palette, ignore_index), f"{name}\npixel acc. {acc:.1%}"))
    panel_w = 3.0 * min(max(w / h, 0.5), 3.0)
    fig = Figure(figsize=(4 * panel_w, 3.4 + (0.6 if class_names else 0.0)), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (img, label) in zip(axes, panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_axis_off()
        for x0, y0, x1, y1 in boxes:
            # Pixel centres sit on integer coordinates: a box's outer edge is half a pixel out.
            # Yellow dashes over a black line stay visible on any class colour.
            xy, bw, bh = (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0
            ax.add_patch(Rectangle(xy, bw, bh, fill=False, edgecolor="black", linewidth=2.2))
            ax.add_patch(
                Rectangle(xy, bw, bh, fill=False, edgecolor="#ffd400", linewidth=1.6, ls="--")
            )
    if title:
        fig.suptitle(title, fontsize=11)
    if class_names:
        present = sorted(set(np.unique(np.concatenate([target.ravel(), a.ravel(), b.ravel()]))))
        present = [int(c) for c in present if c != ignore_index and 0 <= c < len(class_names)]
        handles = [Patch(color=palette[c] / 255.0, label=class_names[c]) for c in present]
        ncol = legend_columns([p.get_label() for p in handles], 4 * panel_w)
        fig.legend(
            handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize=9
        )
    return fig


def save_compare_figure(path: Path, *args, **kwargs) -> list[Path]:
    """``make_compare_figure(*args, **kwargs)`` saved as ``<path>.png`` and ``<path>.pdf``."""
    return save_figure(make_compare_figure(*args, **kwargs), Path(path), (".png", ".pdf"))


def _load_pair(baseline: Path, ours: Path, device: str):
    from contrastseg.engine.inference import load_trained_model

    model_a, cfg_a, state_a = load_trained_model(baseline, device)
    model_b, cfg_b, state_b = load_trained_model(ours, device)
    if list(state_a["class_names"]) != list(state_b["class_names"]):
        raise CheckpointError(
            f"--baseline {baseline} has classes {list(state_a['class_names'])} but --ours "
            f"{ours} has {list(state_b['class_names'])}; compare checkpoints of one data set"
        )
    return (model_a, cfg_a), (model_b, cfg_b), state_b


def compare_checkpoints(
    baseline: Path,
    ours: Path,
    out_dir: Path,
    images: Sequence[Path] = (),
    indices: Sequence[int] = (0, 1, 2, 3),
    masks: Path | None = None,
    split: str | None = None,
    min_area: int = 64,
    device: str = "auto",
    data_root: Path | None = None,
) -> list[Path]:
    """Write ``<name>_compare.png`` and ``.pdf`` into ``out_dir`` per image; returns the PNGs.

    Without ``images``: samples ``indices`` of ``split`` (default: the val split) of the data
    set in the baseline checkpoint's config. With ``images`` (files or folders): their masks
    are ``masks/<stem>.png``, or, without ``masks``, the masks the data set pairs with those
    files in ``split``. ``data_root`` replaces ``data.root`` of the stored config.
    """
    from contrastseg.engine.inference import expand_images, predict_ids

    (model_a, cfg_a), (model_b, cfg_b), state = _load_pair(Path(baseline), Path(ours), device)
    data = cfg_a.data if data_root is None else cfg_a.data.model_copy(update={"root": data_root})
    if cfg_b.data.name != data.name:
        log.warning("--ours was trained on %r, --baseline on %r", cfg_b.data.name, data.name)
    class_names = list(state["class_names"])
    palette = np.asarray(state["palette"], dtype=np.uint8)
    if images:
        samples = file_samples(expand_images(list(images)), data, len(class_names), masks, split)
    else:
        if masks is not None:
            raise DataError("--masks needs image files: pass IMAGES, or leave out --masks")
        samples = split_samples(data, list(indices), split)
    _check_unique([s.name for s in samples])
    out_dir = Path(out_dir)
    written = []
    for s in samples:
        pred_a = predict_ids(model_a, cfg_a, s.image)  # each with its checkpoint's input
        pred_b = predict_ids(model_b, cfg_b, s.image)
        boxes = improved_regions(s.mask, pred_a, pred_b, min_area=min_area)
        title = f"{s.name}: dashed boxes = ours right, baseline wrong ({len(boxes)} regions)"
        paths = save_compare_figure(
            out_dir / f"{s.name}_compare", s.image, s.mask, pred_a, pred_b, palette, boxes,
            class_names, (f"baseline ({cfg_a.output.name})", f"ours ({cfg_b.output.name})"),
            title,
        )  # fmt: skip
        log.info("%s: %d improved regions -> %s", s.name, len(boxes), paths[0])
        written.append(paths[0])
    return written


def _check_unique(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"two images are named {name!r}; their figures would overwrite each other, so "
                f"rename one or run them separately"
            )
        seen.add(name)
