"""SIGINT/SIGTERM: finish what is in flight, checkpoint, exit; a second signal exits at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM; the second raises KeyboardInterrupt at once.

    Outside the main thread (e.g. an embedding library's worker) signals are left alone.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum  # type: ignore[attr-defined]
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
