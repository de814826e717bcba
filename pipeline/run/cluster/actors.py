"""Embedding on an actor pool: one actor per GPU (``num_gpus=1``) or CPU actors, each
holding the product's embedder (with its OOM back-off and engine restarts) for its life.

The driver hands each actor the next planned batch while it has room (least loaded first)
and takes results back in the order they finish; the executor writes them and the ledger,
as it does for a local worker pool. An actor whose process dies is restarted by Ray, which
runs its batches again (``max_task_retries`` -1); each call has one result, so a batch is
written once however often it was embedded. As with a local worker, more than ``MAX_DEATHS``
deaths of one actor stop the run (resumable): a batch that kills its process every time
must not loop for ever.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import JobError, one_line
from pipeline.plan.batching import PlannedBatch
from pipeline.run.cluster.session import cause, import_ray
from pipeline.run.devices import NO_MULTICAST
from pipeline.run.worker import Inbox, Work, WorkerSpec, embed_inbox
from pipeline.run.workers import MAX_DEATHS, WorkerStats, to_work

CALLS_PER_ACTOR = 16  # batches an actor may hold at once (threads of a threaded actor)


class EmbedActor:
    """One embedder fed by concurrent ``embed`` calls: they queue their batch and wait, while
    one thread keeps the engine streaming (``run/worker.py``'s loop)."""

    def __init__(self, spec_blob: bytes) -> None:
        ray = import_ray()
        faults = os.environ.get("EMBED_JOB_FAULT")
        if faults and ray.get_runtime_context().was_current_actor_reconstructed:
            # a worker fault fires in the actor's first process only: one death
            os.environ["EMBED_JOB_FAULT"] = ",".join(
                f for f in faults.split(",") if not f.strip().startswith("worker_"))
        t0 = time.monotonic()
        spec: WorkerSpec = pickle.loads(spec_blob)
        self.engine = spec.engine()
        self.load_s = time.monotonic() - t0
        self.inbox = Inbox()
        self.waiting: dict[str, Future[np.ndarray]] = {}
        self.unfit: dict[str, list[tuple[int, str]]] = {}
        self.engine.on_unfit = lambda b, row, err: self.unfit.setdefault(b.batch_id, []).append(
            (row, one_line(err)))
        self.lock = threading.Lock()
        self.failed: BaseException | None = None  # the engine's error: every later call's too
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            embed_inbox(self.engine, self.inbox, lambda w, v: self.waiting[w.batch_id].set_result(v))
        except BaseException as e:  # noqa: BLE001 - every caller waiting hears of it
            with self.lock:
                self.failed = e
                for f in self.waiting.values():
                    if not f.done():
                        f.set_exception(e)

    def ready(self) -> tuple[float, int, str]:
        """Load time, process id and node: the driver learns of a restart by the pid."""
        return self.load_s, os.getpid(), import_ray().util.get_node_ip_address()

    def embed(self, work: Work) -> tuple[np.ndarray, list[tuple[int, str]], int | None, int,
                                         float, int]:
        done: Future[np.ndarray] = Future()
        with self.lock:
            if self.failed is not None:
                raise self.failed
            self.waiting[work.batch_id] = done
        self.inbox.put(work)
        try:
            vectors = done.result()
        finally:
            del self.waiting[work.batch_id]
        return (vectors, self.unfit.pop(work.batch_id, []), self.engine.budget.limit,
                self.engine.restarts, self.inbox.waited_s, os.getpid())

    def close(self) -> None:
        self.inbox.put(None)
        self.engine.close()


@dataclass
class _Held:
    actor: int
    batch: PlannedBatch


class ActorPool:
    """The ``Embedding`` interface (``run``, ``on_unfit``, ``on_budget_change``,
    ``restarts``, ``close``, ``stats``, ``rates``) over Ray actors."""

    def __init__(self, actors: int, make: Callable[[], object], budget: int | None,
                 ceiling: int, room_tokens: int, cpus: float, gpus: float) -> None:
        ray = self._ray = import_ray()
        self.on_unfit: Callable[[PlannedBatch, int, BaseException], None] = lambda *a: None
        self.on_budget_change: Callable[[int | None], None] = lambda limit: None
        self._room = room_tokens
        self._limits: dict[int, int | None] = {}
        kind = "gpu" if gpus else "cpu"
        self.stats = [WorkerStats(f"ray-{kind}{i}", kind) for i in range(actors)]
        env = dict(NO_MULTICAST)
        if not gpus:
            env["OMP_NUM_THREADS"] = str(max(1, round(cpus)))
        faults = os.environ.get("EMBED_JOB_FAULT")
        spec = pickle.dumps(WorkerSpec(make, budget, ceiling, "ray"))
        cls = ray.remote(EmbedActor)
        self._actors = []
        for i in range(actors):
            own = dict(env)
            if faults is not None:  # worker_* points fire in the first actor only
                own["EMBED_JOB_FAULT"] = faults if i == 0 else ",".join(
                    f for f in faults.split(",") if not f.strip().startswith("worker_"))
            self._actors.append(cls.options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_DEATHS, max_task_retries=-1,
                max_concurrency=CALLS_PER_ACTOR + 2, runtime_env={"env_vars": own},
                name=None).remote(spec))
        self._pids: list[int | None] = [None] * actors
        self._held_tokens = [0] * actors
        self._busy_since: list[float | None] = [None] * actors
        self._held_calls = [0] * actors
        try:
            for i, (load_s, pid, node) in enumerate(self._get([a.ready.remote()
                                                               for a in self._actors])):
                self.stats[i].load_s, self._pids[i] = load_s, pid
                self.stats[i].device = f"{kind}@{node}"
        except BaseException:
            self.close()
            raise

    def _get(self, refs: Any) -> Any:
        try:
            return self._ray.get(refs)
        except Exception as e:
            found = cause(e)
            if found is e:
                raise JobError(f"embedding actor failed (after at most {MAX_DEATHS} restarts; "
                               f"the run resumes where it stopped): {one_line(e)}") from None
            raise found from None

    def rates(self) -> str:
        return " ".join(f"{s.worker} {s.tokens_per_s / 1000:,.1f}K/s" for s in self.stats)

    @property
    def restarts(self) -> int:
        return sum(s.deaths + s.engine_restarts for s in self.stats)

    def run(self, batches: Iterable[PlannedBatch]) -> Iterator[tuple[PlannedBatch, np.ndarray]]:
        source = iter(batches)
        pending: dict[Any, _Held] = {}
        exhausted = False
        while True:
            while not exhausted:
                i = min(range(len(self._actors)), key=lambda k: self._held_tokens[k])
                if self._held_tokens[i] >= self._room or self._held_calls[i] >= CALLS_PER_ACTOR:
                    break
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    break
                if self._busy_since[i] is None:
                    self._busy_since[i] = time.monotonic()
                self._held_tokens[i] += batch.n_tokens
                self._held_calls[i] += 1
                pending[self._actors[i].embed.remote(to_work(batch))] = _Held(i, batch)
            if not pending:
                return
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                held = pending.pop(ref)
                yield held.batch, self._result(held, self._get(ref))

    def _result(self, held: _Held, result: tuple) -> np.ndarray:
        vectors, unfit, limit, restarts, waited, pid = result
        i, batch = held.actor, held.batch
        stats = self.stats[i]
        if pid != self._pids[i]:  # its process died and Ray started another
            stats.deaths += 1
            self._pids[i] = pid
        for row, reason in unfit:
            self.on_unfit(batch, row, RuntimeError(reason))
        if self._limits.get(i) != limit:
            self._limits[i] = limit
            known = [v for v in self._limits.values() if v is not None]
            self.on_budget_change(min(known) if known else None)
        self._held_tokens[i] -= batch.n_tokens
        self._held_calls[i] -= 1
        now = time.monotonic()
        since = self._busy_since[i]
        stats.embed_s += now - (since if since is not None else now)
        self._busy_since[i] = now if self._held_calls[i] else None
        stats.batches += 1
        stats.tokens += batch.n_tokens
        stats.engine_restarts, stats.waited_for_plan_s = restarts, waited
        return vectors

    def close(self) -> None:
        """Let each actor close its engine, then end it (on a cluster the run did not start,
        nothing of the run stays behind)."""
        try:
            self._ray.wait([a.close.remote() for a in self._actors], num_returns=len(self._actors),
                           timeout=60)
        finally:
            for a in self._actors:
                self._ray.kill(a, no_restart=True)
