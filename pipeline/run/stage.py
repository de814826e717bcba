"""A stage of the run on a thread of its own (the planner, the writer): one pattern, said once.

The stage's work runs on a daemon thread; a failure there is kept and raised on the main
thread by whoever waits for the stage, never lost and never raised twice. ``waited_s`` counts
how long the main thread waited for the stage, which the report uses to say which stage held
the run up.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TypeVar

_S = TypeVar("_S", bound="StageThread")


class StageThread(ABC):
    name: str = "embed-job-stage"

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._guarded, name=self.name, daemon=True)

    def start(self: _S) -> _S:
        self._thread.start()
        return self

    @abstractmethod
    def work(self) -> None:
        """The stage's loop, on its thread."""

    def after_failure(self, error: BaseException) -> None:
        """On the stage's thread, once ``work`` failed: unblock whoever feeds or reads it."""

    def join(self) -> None:
        """Wait for the stage to end; raise its failure here."""
        self._thread.join()
        self.raise_failure()

    def raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    def _guarded(self) -> None:
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - raised on the main thread by join()
            self.error = e
            self.after_failure(e)
