"""One run per job at a time: an flock on a file in the checkpoint directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import JobLocked
from pipeline.state.layout import StateDir


class JobLock:
    """Held for the life of a run; the kernel releases it if the process dies, so a lock
    left by a killed run never blocks the next one."""

    def __init__(self, directory: Path) -> None:
        self.path = StateDir(directory).lock
        self._fd: int | None = None

    def acquire(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
