"""Progress of a run: a live bar on a terminal, a plain line every few seconds in a log.

tqdm redraws with ``\\r``, which fills a log file with frames (about 100K in a 10-hour
run), so off a terminal the same counters are printed as whole lines at an interval.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    """What the run needs of a progress display (tqdm has it too)."""

    total: Any

    def update(self, n: int) -> Any: ...

    def refresh(self) -> Any: ...

    def set_postfix_str(self, s: str) -> Any: ...

    def close(self) -> Any: ...


def progress_bar(enabled: bool, desc: str, interval_s: float = 30.0,
                 stream: TextIO | None = None,
                 emit: Callable[[str], None] | None = None) -> Progress:
    """A tqdm bar on a terminal, ``PlainProgress`` elsewhere; both take ``update(n)``,
    ``total``, ``refresh()`` and ``close()``."""
    stream = stream or sys.stderr
    if enabled and stream.isatty():
        return tqdm(total=0, unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc,
                    smoothing=0.1, file=stream)
    return PlainProgress(desc, interval_s, emit or (lambda line: print(line, file=stream,
                                                                        flush=True)),
                         enabled=enabled)


class PlainProgress:
    """Tokens done of the total, the rate since the start, and an ETA, one line at a time."""

    def __init__(self, desc: str, interval_s: float, emit: Callable[[str], None],
                 enabled: bool = True) -> None:
        self.desc, self.interval_s, self.emit, self.enabled = desc, interval_s, emit, enabled
        self.total = 0
        self.n = 0
        self.postfix = ""  # e.g. each worker's rate
        self._t0 = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval_s:
            self._last = now
            self.emit(self.line(now))

    def refresh(self) -> None:
        """A new total is known; the next interval's line shows it."""

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._t0, 1e-9)
        rate = self.n / elapsed
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        left = max(self.total - self.n, 0)
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and self.total else ""
        return (f"{self.desc}: {self.n:,}/{self.total:,} tokens{share}, {rate:,.0f} tokens/s"
                f"{eta}" + (f" [{self.postfix}]" if self.postfix else ""))

    def close(self) -> None:
        if self.enabled and self.n and time.monotonic() - self._t0 >= self.interval_s:
            self.emit(self.line())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"
