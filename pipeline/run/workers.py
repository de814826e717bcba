"""Embedding on several worker processes, one per GPU (or N on the CPU), fed from one plan.

The run's process keeps everything that must have one owner: the plan, the ledger, the sink,
the dead letters. Workers only embed. Each is handed the next planned batch whenever it has
room (a dynamic queue, not a split of the plan, so a slow device never holds the others back),
and each batch is with exactly one worker until its vectors come back. A worker that dies
(killed, out of memory beyond the back-off, an engine crash) is started again and its
batches go back to the queue: every batch is embedded and written once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.errors import JobError
from pipeline.plan.batching import PlannedBatch
from pipeline.run.devices import Slot
from pipeline.run.worker import END, Work, WorkerSpec, serve

MAX_DEATHS = 3  # a worker slot that dies more often than this stops the run (resumable)
_CTX = mp.get_context("spawn")  # never fork a process that holds threads and CUDA


def to_work(batch: PlannedBatch) -> Work:
    """The batch's sequences as two flat arrays: cheap to pickle, whatever its size."""
    col = batch.table.column("token_ids").combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return Work(batch.batch_id, flat, offsets - offsets[0])


@dataclass
class WorkerStats:
    """What one worker did, for the report: the figures that say who set the pace."""

    worker: str
    device: str
    batches: int = 0
    tokens: int = 0
    load_s: float = 0.0
    embed_s: float = 0.0  # from ready to its last result
    waited_for_plan_s: float = 0.0  # idle, no batch handed to it
    waited_for_sink_s: float = 0.0  # its results held up by the run (writer behind)
    deaths: int = 0
    engine_restarts: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.embed_s if self.embed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        return {**rounded, "tokens_per_s": round(self.tokens_per_s, 1)}


@dataclass
class _Worker:
    slot: Slot
    process: Any
    tasks: Connection
    results: Connection
    ready_at: float | None = None
    held: dict[str, PlannedBatch] = field(default_factory=dict)  # sent, no result yet
    held_tokens: int = 0
    restarts_before: int = 0  # engine restarts of its earlier processes
    sink_before: float = 0.0
    plan_before: float = 0.0


class WorkerPool:
    """The same interface as ``ResilientEmbedding`` (``run``, ``on_unfit``,
    ``on_budget_change``, ``restarts``, ``close``), over worker processes; results come in
    the order they finish, not the plan's."""

    def __init__(self, slots: list[Slot], make: Callable[[Slot], Callable[[], object]],
                 budget: int | None, ceiling: int, room_tokens: int,
                 threads: int | None = None) -> None:
        self.on_unfit: Callable[[PlannedBatch, int, BaseException], None] = lambda *a: None
        self.on_budget_change: Callable[[int | None], None] = lambda limit: None
        self.stats = [WorkerStats(s.label, "cpu" if s.gpu is None else f"cuda:{s.gpu}")
                      for s in slots]
        self._make, self._budget, self._ceiling = make, budget, ceiling
        self._room, self._threads = room_tokens, threads
        self._limits: dict[int, int | None] = {}
        self._drained = False  # run() handed back every result: workers may end gently
        self._workers = [self._start(s, first=True) for s in slots]
        try:
            for w in self._workers:
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    def rates(self) -> str:
        """Each worker's pace, for the progress line."""
        return " ".join(f"{s.worker} {s.tokens_per_s / 1000:,.1f}K/s" for s in self.stats)

    @property
    def restarts(self) -> int:
        return sum(s.deaths + s.engine_restarts for s in self.stats)

    def _start(self, slot: Slot, first: bool) -> _Worker:
        env = slot.env(self._threads)
        faults = os.environ.get("EMBED_JOB_FAULT")
        if faults is not None and not (first and slot.index == 0):
            # a worker fault fires in the first worker's first process only: one death
            env["EMBED_JOB_FAULT"] = ",".join(
                f for f in faults.split(",") if not f.strip().startswith("worker_"))
        spec = WorkerSpec(self._make(slot), self._budget, self._ceiling, slot.label)
        task_r, task_w = _CTX.Pipe(duplex=False)
        res_r, res_w = _CTX.Pipe(duplex=False)
        # not daemonic: an engine (SGLang) starts processes of its own; close() ends it
        process = _CTX.Process(target=serve, name=f"embed-job-{slot.label}",
                               args=(env, pickle.dumps(spec), task_r, res_w))
        process.start()
        task_r.close()
        res_w.close()
        return _Worker(slot, process, task_w, res_r)

    def _await_ready(self, w: _Worker) -> None:
        while w.ready_at is None:
            if not w.results.poll(1.0):
                if not w.process.is_alive() and not w.results.poll():
                    raise JobError(f"embedding worker {w.slot.label} exited during start-up "
                                   f"(exit code {w.process.exitcode})")
                continue
            self._handle(w, w.results.recv())

    def run(self, batches: Iterable[PlannedBatch]) -> Iterator[tuple[PlannedBatch, np.ndarray]]:
        source = iter(batches)
        again: deque[PlannedBatch] = deque()  # batches of a worker that died
        exhausted = False
        done: deque[tuple[PlannedBatch, np.ndarray]] = deque()
        while True:
            while again or not exhausted:  # one batch at a time to the least loaded worker
                w = min(self._workers, key=lambda x: x.held_tokens)
                if w.held_tokens >= self._room:
                    break
                batch = again.popleft() if again else next(source, None)
                if batch is None:
                    exhausted = True
                    break
                self._send(w, batch)
            if exhausted and not again and not any(w.held for w in self._workers):
                self._drained = True
                return
            for w in self._wait():
                self._collect(w, done, again)
            while done:
                yield done.popleft()

    def _send(self, w: _Worker, batch: PlannedBatch) -> None:
        if not w.held:  # its clock runs while it has work: idle time is not its pace
            w.ready_at = time.monotonic()
        w.held[batch.batch_id] = batch
        w.held_tokens += batch.n_tokens
        w.tasks.send(to_work(batch))

    def _wait(self) -> list[_Worker]:
        by_conn: dict[Any, _Worker] = {}
        for w in self._workers:
            by_conn[w.results] = by_conn[w.process.sentinel] = w
        ready = wait(list(by_conn), timeout=1.0)
        return list({id(by_conn[r]): by_conn[r] for r in ready}.values())

    def _collect(self, w: _Worker, done: deque, again: deque[PlannedBatch]) -> None:
        """Every result the worker has sent; if it died, its batches go back to the queue."""
        try:
            while w.results.poll():
                item = self._handle(w, w.results.recv())
                if item is not None:
                    done.append(item)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass  # died while sending: that batch is sent again
        if w.process.is_alive():
            return
        w.process.join()
        stats = self.stats[w.slot.index]
        stats.deaths += 1
        if stats.deaths > MAX_DEATHS:
            raise JobError(f"embedding worker {w.slot.label} died {stats.deaths} times (last "
                           f"exit code {w.process.exitcode}); progress is checkpointed — see the "
                           f"log above, then run again to resume")
        again.extend(sorted(w.held.values(), key=lambda b: b.batch_id))
        fresh = self._start(w.slot, first=False)
        fresh.restarts_before = stats.engine_restarts
        fresh.sink_before, fresh.plan_before = stats.waited_for_sink_s, stats.waited_for_plan_s
        self._workers[self._workers.index(w)] = fresh
        self._await_ready(fresh)

    def _handle(self, w: _Worker, msg: tuple) -> tuple[PlannedBatch, np.ndarray] | None:
        kind = msg[0]
        stats = self.stats[w.slot.index]
        if kind == "error":
            raise msg[1]
        if kind == "ready":
            w.ready_at = time.monotonic()
            stats.load_s = max(stats.load_s, msg[1])
            return None
        _, batch_id, vectors, unfit, limit, restarts, waited, sent = msg
        batch = w.held.pop(batch_id)
        w.held_tokens -= batch.n_tokens
        for row, reason in unfit:
            self.on_unfit(batch, row, RuntimeError(reason))
        if self._limits.get(w.slot.index, self._budget) != limit:
            self._limits[w.slot.index] = limit
            known = [v for v in self._limits.values() if v is not None]
            self.on_budget_change(min(known) if known else None)
        stats.batches += 1
        stats.tokens += batch.n_tokens
        assert w.ready_at is not None
        stats.embed_s += time.monotonic() - w.ready_at
        w.ready_at = time.monotonic()
        stats.engine_restarts = w.restarts_before + restarts
        stats.waited_for_plan_s = w.plan_before + waited
        stats.waited_for_sink_s = w.sink_before + sent
        return batch, vectors

    def close(self) -> None:
        """End every worker: after a complete run, let each close its engine; after a
        failure or a second Ctrl-C, at once."""
        for w in self._workers:
            try:
                w.tasks.send(END)
            except (OSError, EOFError):
                pass
        deadline = time.monotonic() + (60 if self._drained else 0)
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.tasks.close()
            w.results.close()
