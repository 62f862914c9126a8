"""Progress bar of the training loop: loss, learning rate, s/iter and ETA.

s/iter is that of the newest logged window (the mean step time since the previous
``metrics.jsonl`` record, as that record's ``s_per_iter``); the trainer sets it each time it logs.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """A rich progress bar on a terminal; a plain line every 10% of the run otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.done, self.start = total, start, start
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._bar: Progress | None = None
        self._task = None
        self._next_line = start + max(1, total // 10)
        #: s_per_iter of the newest metrics.jsonl record (None before the first one)
        self.window_s_per_iter: float | None = None

    def __enter__(self) -> TrainProgress:
        if self.enabled and self.interactive:
            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.done, info="")
        return self

    def advance(self, values: dict[str, float]) -> None:
        self.done += 1
        window = self.window_s_per_iter
        info = f"loss {values['total']:.4f}  lr {values['lr']:.2e}"
        if window is not None:
            info += f"  {window:.2f} s/iter"
        # the ETA from the newest window, before the first one from the mean since the start
        s_iter = (
            window
            if window is not None
            else (time.perf_counter() - self.t0) / max(1, self.done - self.start)
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=info)
        elif self.enabled and (self.done >= self._next_line or self.done == self.total):
            eta = s_iter * (self.total - self.done)
            print(f"iter {self.done}/{self.total}  {info}  eta {eta:.0f} s", flush=True)
            self._next_line = self.done + max(1, self.total // 10)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
