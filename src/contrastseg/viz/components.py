"""Connected components of a boolean mask, in numpy (no scipy).

The mask is split into horizontal runs of ``True`` pixels; runs of neighbouring rows that touch
are joined with a union-find over runs, so the Python work grows with the number of runs, not
of pixels.
"""

from __future__ import annotations

import numpy as np

from contrastseg.errors import ContrastSegError


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of ``True`` in each row, in raster order: (row, start, stop), stop exclusive."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, stops = np.nonzero(step == -1)
    return rows, starts, stops


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a ``(H, W)`` boolean mask.

    ``connectivity`` is 8 (pixels touching by an edge or a corner are connected) or 4 (by an
    edge only). Returns ``(labels, count)``: ``labels`` is ``(H, W)`` int32 with 0 outside the
    mask and ``1..count`` inside, numbered in raster order of each component's first pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ContrastSegError(f"label_components expects a (H, W) mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ContrastSegError(f"connectivity must be 4 or 8, got {connectivity!r}")
    mask = mask.astype(bool, copy=False)
    labels = np.zeros(mask.shape, dtype=np.int32)
    rows, starts, stops = _runs(mask)
    n = len(rows)
    if n == 0:
        return labels, 0
    # Runs a (row r-1) and b (row r) touch when [start_a, stop_a) and [start_b, stop_b),
    # widened by one pixel on each side for 8-connectivity, overlap.
    reach = 1 if connectivity == 8 else 0
    parent = list(range(n))
    row_begin = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        a0, a1 = row_begin[r - 1], row_begin[r]
        b0, b1 = row_begin[r], row_begin[r + 1]
        if a0 == a1 or b0 == b1:
            continue
        prev_starts, prev_stops = starts[a0:a1], stops[a0:a1]
        # For each run b: the runs a with stop_a + reach > start_b and start_a < stop_b + reach.
        lo = np.searchsorted(prev_stops + reach, starts[b0:b1], side="right")
        hi = np.searchsorted(prev_starts, stops[b0:b1] + reach, side="left")
        for b, first, last in zip(range(b0, b1), lo.tolist(), hi.tolist(), strict=True):
            for a in range(a0 + first, a0 + last):
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(n)])
    # Roots are each component's first run in raster order, so renumbering them in increasing
    # order numbers the components in raster order.
    unique_roots, component = np.unique(roots, return_inverse=True)
    run_of_pixel = np.cumsum(np.diff(np.pad(mask, ((0, 0), (1, 0))).astype(np.int8), axis=1) == 1)
    labels[mask] = component[run_of_pixel.reshape(mask.shape)[mask] - 1] + 1
    return labels, len(unique_roots)


def component_boxes(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Area (pixels) and box of each component of ``label_components``' output.

    Returns ``areas`` ``(count,)`` int64 and ``boxes`` ``(count, 4)`` int64 rows
    ``(x0, y0, x1, y1)``, half-open: the component lies in ``labels[y0:y1, x0:x1]``.
    """
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs].astype(np.int64) - 1
    areas = np.bincount(ids, minlength=count).astype(np.int64)
    boxes = np.empty((count, 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = np.iinfo(np.int64).min
    np.minimum.at(boxes[:, 0], ids, xs)
    np.minimum.at(boxes[:, 1], ids, ys)
    np.maximum.at(boxes[:, 2], ids, xs + 1)
    np.maximum.at(boxes[:, 3], ids, ys + 1)
    return areas, boxes
