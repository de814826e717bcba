"""The writer stage: sink writes, retries, and the ledger, on a thread of its own.

Only this thread touches the sink and the checkpoint, in plan order, so a batch id is
recorded only after the sink acknowledged it (invariant 3) and sink I/O overlaps compute.
"""

from __future__ import annotations

import queue
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import with_retries
from pipeline.faults import fault_point
from pipeline.records import window_of
from pipeline.run.stage import StageThread
from pipeline.sinks.base import Sink, VectorBatch
from pipeline.state.checkpoint import Checkpoint


@dataclass(frozen=True)
class WindowEnd:
    """Every batch of this window has been handed to the writer."""

    window: int


_STOP = object()


class Writer(StageThread):
    """Consumes VectorBatches and WindowEnds from a bounded queue. ``waited_s``: producer
    time spent blocked on a full queue (the sink is behind)."""

    name = "embed-job-writer"

    def __init__(self, sink: Sink, checkpoint: Checkpoint, on_ack: Callable[[int], None],
                 depth: int = 4, attempts: int = 5, base_delay: float = 0.5) -> None:
        super().__init__()
        self.sink = sink
        self.attempts, self.base_delay = attempts, base_delay
        self.checkpoint = checkpoint
        self.on_ack = on_ack
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        # batch id -> rows, until the sink acknowledges it (the sink holds the data meanwhile)
        self._inflight: dict[str, int] = {}
        self._pending: dict[int, int] = defaultdict(int)
        self._ended: set[int] = set()

    def put(self, item: VectorBatch | WindowEnd) -> None:
        """Hand over an item; raises the writer's error instead of blocking on a dead writer."""
        t = time.monotonic()
        try:
            while True:
                self.raise_failure()
                try:
                    self.queue.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
        finally:
            self.waited_s += time.monotonic() - t

    def finish(self) -> None:
        """Drain the queue, make the sink durable, record the last acknowledgements."""
        self.put(_STOP)  # type: ignore[arg-type]
        self.join()

    def work(self) -> None:
        while (item := self.queue.get()) is not _STOP:
            if isinstance(item, WindowEnd):
                self._ended.add(item.window)
                self._close_finished()
            else:
                self._inflight[item.batch_id] = len(item)
                self._pending[window_of(item.batch_id)] += 1
                self._acked(self._retrying(lambda: self._write(item)))
        self._acked(self._retrying(self.sink.on_write_complete))

    def after_failure(self, error: BaseException) -> None:
        self.sink.on_write_failed(error)
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    def _retrying(self, fn: Callable[[], list[str]]) -> list[str]:
        return with_retries(fn, self.attempts, self.base_delay)

    def _write(self, batch: VectorBatch) -> list[str]:
        fault_point("before_sink_write")
        acked = self.sink.write(batch)
        fault_point("after_sink_write")
        return acked

    def _acked(self, batch_ids: list[str]) -> None:
        if not batch_ids:
            return
        rows = [self._inflight.pop(b) for b in batch_ids]
        self.checkpoint.record(batch_ids, sum(rows))
        fault_point("after_ack")
        for batch_id, n in zip(batch_ids, rows):
            self._pending[window_of(batch_id)] -= 1
            self.on_ack(n)
        self._close_finished()

    def _close_finished(self) -> None:
        for w in sorted(self._ended):
            if self._pending[w] == 0:
                self.checkpoint.close_window(w)
                self._ended.discard(w)
                self._pending.pop(w, None)
