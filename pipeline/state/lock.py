"""One run per job at a time: an flock on a file in the checkpoint directory."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import ClassVar

from pipeline.errors import JobLocked
from pipeline.state.layout import StateDir


class JobLock:
    """Held for the life of a run; the kernel releases it if the process dies, so a lock
    left by a killed run never blocks the next one.

    Re-entrant in the thread that holds it, so ``audit --repair`` can hold it across its
    audit, its run (which takes it again) and its second audit; any other holder is refused.
    """

    _held: ClassVar[dict[Path, tuple[int, int]]] = {}  # lock file -> (pid, thread) holding it

    def __init__(self, directory: Path) -> None:
        self.path = StateDir(directory).lock
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if self._held.get(key) == _me():
            self._nested = True  # the outer holder releases it
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JobLocked(f"{self.path}: another run of this job holds the lock (pid {holder})"
                            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        self._held[key] = _me()
        return self

    def release(self) -> None:
        if self._nested:
            self._nested = False
        elif self._fd is not None:
            self._held.pop(self.path.resolve(), None)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _me() -> tuple[int, int]:
    """This process and thread (a forked child inherits the table, not the lock)."""
    return os.getpid(), threading.get_ident()
