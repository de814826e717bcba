"""One worker process: an embedder fed batches over a pipe, vectors sent back over another.

The worker embeds and nothing else (no plan, ledger or sink), with the same OOM back-off,
safe budget and engine restarts as a run in one process. It keeps its engine busy with the
batches it was given and ends a stream only when none is waiting, so the engine drains
instead of waiting for work that may not come. Signals are left to the run's process, which
drains the workers itself; a run that dies closes the pipe, and the worker exits.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import one_line

if TYPE_CHECKING:  # imported where the worker runs: torch loads only after its env is set
    from pipeline.embedders.resilient import ResilientEmbedding

END = "end"  # no more batches: drain, close the engine, exit
_IDLE_S = 0.05  # no batch waiting this long: let the engine drain what it holds


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, pickled in the run's process and read after its env is set."""

    make: Callable[[], object]  # () -> Embedder
    budget: int | None
    ceiling: int
    label: str

    def engine(self) -> ResilientEmbedding[Work]:
        """The worker's embedder, with the same back-off and restarts as in the run's process."""
        from pipeline.embedders.faulty import wrap_embedder
        from pipeline.embedders.resilient import ResilientEmbedding, SafeBudget

        return ResilientEmbedding(lambda: wrap_embedder(self.make()),  # type: ignore[arg-type]
                                  SafeBudget(self.budget, ceiling=self.ceiling))


@dataclass
class Work:
    """A planned batch as it travels: its id and its sequences (flat ids + offsets)."""

    batch_id: str
    flat: np.ndarray
    offsets: np.ndarray

    @property
    def token_ids(self) -> list[list[int]]:
        flat = self.flat.tolist()
        ends = self.offsets.tolist()
        return [flat[a:b] for a, b in zip(ends, ends[1:])]


def serve(env: dict[str, str], spec_blob: bytes, tasks: Connection, results: Connection) -> None:
    """The worker's main: set the device env, then build the embedder and serve batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(env)
    try:
        _serve(pickle.loads(spec_blob), tasks, results)  # imports torch only now
    except BaseException as e:  # noqa: BLE001 - reported to the run, which raises it
        try:
            results.send(("error", portable(e)))
        except (OSError, EOFError):
            pass
        os._exit(1)


def _serve(spec: WorkerSpec, tasks: Connection, results: Connection) -> None:
    t0 = time.monotonic()
    engine = spec.engine()
    unfit: dict[str, list[tuple[int, str]]] = {}
    engine.on_unfit = lambda b, row, err: unfit.setdefault(b.batch_id, []).append(
        (row, one_line(err)))
    results.send(("ready", time.monotonic() - t0))
    inbox = Inbox()
    threading.Thread(target=_read, args=(tasks, inbox), daemon=True).start()
    sent_s = 0.0

    def send(work: Work, vectors: np.ndarray) -> None:
        nonlocal sent_s
        t = time.monotonic()
        results.send(("result", work.batch_id, vectors, unfit.pop(work.batch_id, []),
                      engine.budget.limit, engine.restarts, inbox.waited_s, sent_s))
        sent_s += time.monotonic() - t

    try:
        embed_inbox(engine, inbox, send)
    finally:
        engine.close()


def embed_inbox(engine: ResilientEmbedding[Work], inbox: Inbox,
                send: Callable[[Work, np.ndarray], None]) -> None:
    """Embed what arrives until the inbox ends: one engine stream while batches keep coming
    (so the engine never drains between them), a new one after a pause."""
    from pipeline.faults import fault_point

    while (first := inbox.get(None)) is not None:
        for work, vectors in engine.run(inbox.stream(first)):
            fault_point("worker_after_embed")
            send(work, vectors)


def _read(tasks: Connection, inbox: Inbox) -> None:
    """The task pipe read on a thread, so a batch sent while the engine computes is waiting
    when the engine asks for one."""
    try:
        while (msg := tasks.recv()) != END:
            inbox.put(msg)
    except (EOFError, OSError):  # the run's process is gone
        pass
    inbox.put(None)


class Inbox:
    """Batches waiting for the engine (None: no more). ``waited_s``: time the engine stood
    idle for want of one."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Work | None] = queue.Queue()
        self._ended = self._started = False
        self.waited_s = 0.0

    def put(self, item: Work | None) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None) -> Work | None:
        """The next batch; None at the end. Raises queue.Empty after ``timeout``."""
        if self._ended:
            return None
        t = time.monotonic()
        try:
            item = self._queue.get(timeout=timeout)
        finally:
            if timeout is None and self._started:  # not the start-up wait for the first
                self.waited_s += time.monotonic() - t
        self._ended, self._started = item is None, True
        return item

    def stream(self, first: Work) -> Iterator[Work]:
        """``first``, then each batch that is waiting, until none comes for a moment."""
        yield first
        while True:
            try:
                item = self.get(_IDLE_S)
            except queue.Empty:
                return
            if item is None:
                return
            yield item


def portable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (a JobError stays a JobError), else a
    RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error
        return RuntimeError(f"{type(error).__name__}: {one_line(error)}")
