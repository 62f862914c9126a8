"""Side-by-side timing: functions alternate so that machine noise hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_median_ms(
    fns: list[Callable[[], None]], device: torch.device, repeats: int
) -> list[float]:
    """Median wall time (ms) of each function: one warm-up each, then ``repeats`` rounds in
    which the functions run in turn; CUDA is synchronised around every call."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1000.0

    for fn in fns:
        once(fn)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            acc.append(once(fn))
    return [statistics.median(acc) for acc in times]


def aligned_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """``header`` and ``body`` as text lines: the first column left-aligned, the others right,
    a rule of dashes under the header."""
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(
            x.ljust(wd) if i == 0 else x.rjust(wd)
            for i, (x, wd) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return lines
