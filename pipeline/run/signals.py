"""SIGINT/SIGTERM: finish what is in flight, checkpoint, exit; a second signal exits at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import Interrupted


class StopRequest(threading.Event):
    """Set when a stop was asked for, with the signal that asked."""

    signum: int = signal.SIGINT

    def check(self) -> None:
        """Stop here (raise Interrupted) when a stop was asked for."""
        if self.is_set():
            raise Interrupted(self.signum)


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """An event set by the first SIGINT/SIGTERM; the second raises KeyboardInterrupt at once.

    Outside the main thread (e.g. an embedding library's worker) signals are left alone.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
