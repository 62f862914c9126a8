"""Turn SIGTERM/SIGINT into a request to stop at the end of the current step."""

from __future__ import annotations

import signal
import threading


class StopSignal:
    """Context manager: while active, SIGTERM and SIGINT set ``received`` (the signal number)
    instead of killing the process, so the trainer can checkpoint before it exits. A second
    signal of the same kind falls back to the previous handler (e.g. a second Ctrl-C aborts)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signum:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
