"""One ``embed-job run``, top to bottom: the start phase (source, model, lock, identity,
destination, the run's decision), then the stages, planner thread -> embedder (this thread) ->
writer thread, then the publish. This module only wires them; each lives in its own.

A caller may bring its own parts (the seams tests and the bench use): an embedder to use
instead of loading the job's model, and sink settings to use instead of the job's.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

from pipeline.embedders.base import Embedder
from pipeline.embedders.faulty import wrap_embedder
from pipeline.embedders.resilient import ResilientEmbedding, SafeBudget
from pipeline.errors import ConfigError, Interrupted, JobError, with_retries
from pipeline.faults import fault_point
from pipeline.job.config import Job
from pipeline.job.sections import SinkSettings
from pipeline.plan.build import RejectedRows
from pipeline.plan.parallel import PoolFactory
from pipeline.readers import check_source, read_documents, source_files
from pipeline.records import Document
from pipeline.run.cluster.actors import ActorPool
from pipeline.run.cluster.stages import OnCluster
from pipeline.run.context import JobContext, RunOptions
from pipeline.run.devices import Slot, in_process, planner_processes, worker_slots
from pipeline.run.execute import Executor
from pipeline.run.feed import Planner, all_windows, count_window
from pipeline.run.ownership import check_destination, check_identity, check_target
from pipeline.run.progress import progress_bar
from pipeline.run.publish import publish_run
from pipeline.run.replan import forget_unfinished, resync_plan
from pipeline.run.report import RunReport
from pipeline.run.signals import StopRequest, graceful_stop
from pipeline.run.workers import WorkerPool
from pipeline.run.writer import Writer
from pipeline.sinks.base import Destination, GenerationMark
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile
from pipeline.state.lock import JobLock
from pipeline.state.sync_state import SyncState


class _Parts:
    """How this run gets its embedder (the job's, or the caller's; in this process or in
    worker processes) and its sinks."""

    def __init__(self, ctx: JobContext, slots: list[Slot], embedder: Embedder | None,
                 embedder_factory: Callable[[], Embedder] | None,
                 cluster: OnCluster | None = None) -> None:
        self.ctx, self.slots, self.lent, self.factory = ctx, slots, embedder, embedder_factory
        self.cluster = cluster
        if embedder is not None and not (in_process(slots) and cluster is None):
            raise ConfigError("a lent embedder runs in the run's own process: no --gpus, "
                              "--workers or runner ray with it")

    def joined(self, report: RunReport) -> AbstractContextManager[object]:
        """The Ray cluster, for the run's stages (nothing for a local run)."""
        return nullcontext() if self.cluster is None else self.cluster.joined(report)

    def documents(self, rejected: RejectedRows) -> Iterator[Document]:
        job = self.ctx.job
        if self.cluster is not None:
            return self.cluster.documents(rejected)
        return read_documents(job.source, job.resolve, rejected)

    def chunk_pool(self) -> PoolFactory | None:
        return None if self.cluster is None else self.cluster.chunk_pool()

    def _maker(self, share: int = 1) -> Callable[[], Embedder]:
        """A picklable factory: a worker process makes its own embedder with it."""
        ctx = self.ctx
        return self.factory or functools.partial(
            ctx.job.model.sharing_device(share).make, ctx.info, ctx.tokenizer.pad_id)

    def engine(self, budget: SafeBudget) -> ResilientEmbedding | WorkerPool | ActorPool:
        if self.cluster is not None:
            return self.cluster.engine(self._maker(), budget.limit, budget.ceiling)
        if self.lent is not None:  # used as it is: never closed nor restarted by the run
            lent = self.lent
            return ResilientEmbedding(lambda: wrap_embedder(lent), budget, max_restarts=0)
        if in_process(self.slots):
            make = self._maker()
            return ResilientEmbedding(lambda: wrap_embedder(make()), budget)
        job, cpus = self.ctx.job, os.cpu_count() or 1
        on_cpu = self.slots[0].gpu is None
        return WorkerPool(self.slots, lambda slot: self._maker(slot.share), budget.limit,
                          budget.ceiling, job.model.tokens_in_flight(job.batching.token_budget)
                          + job.batching.token_budget,
                          threads=max(1, cpus // len(self.slots)) if on_cpu else None)

    def close(self, engine: ResilientEmbedding | WorkerPool | ActorPool) -> None:
        if self.lent is None:
            engine.close()

    def sink(self, target: str, base: str | None, mark: GenerationMark | None = None) -> Destination:
        job = self.ctx.job
        return job.sink.make(job.resolve, job.collection_name, target, base,
                             {"fingerprint": self.ctx.fingerprint, "model": job.model.path}, mark)

    def describe(self, target: str) -> str:
        job = self.ctx.job
        return job.sink.describe(job.resolve, target, job.collection_name)


def run_job(job: Job, options: RunOptions, report: RunReport | None = None,
            stop: StopRequest | None = None, *, embedder: Embedder | None = None,
            embedder_factory: Callable[[], Embedder] | None = None,
            sink: SinkSettings | None = None) -> RunReport:
    """Plan (resuming the plan on disk), embed what the ledger lacks, write, publish.

    ``report`` is filled in as the run goes, so a caller holds it even when the run fails.
    ``stop``: the event SIGINT/SIGTERM set, when the caller installed the handlers itself
    (the CLI does, before anything else, so a signal during start-up is not lost).
    ``embedder``: one lent to the run (a warm engine): used, never closed nor restarted.
    ``embedder_factory``: makes the run's embedder (and a new one after an engine crash),
    which the run closes. ``sink``: settings that make the run's sinks instead of the job's.
    """
    t0 = time.monotonic()
    if sink is not None:  # the whole run sees it: target names, identity, messages
        job = job.model_copy(update={"sink": sink})
    report = report if report is not None else RunReport(job=job.name)
    report.dead_letter_file = str(job.dead_letter_file)
    try:
        if stop is not None:
            _run_locked(job, options, report, stop, (embedder, embedder_factory))
        else:
            with graceful_stop() as own:
                _run_locked(job, options, report, own, (embedder, embedder_factory))
    except Interrupted:
        report.status = "interrupted"
        raise
    except BaseException as e:
        report.status = "failed"
        report.error = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        report.wall_s = time.monotonic() - t0
    return report


def _run_locked(job: Job, options: RunOptions, report: RunReport, stop: StopRequest,
                given: tuple[Embedder | None, Callable[[], Embedder] | None]) -> None:
    check_source(job.source, job.resolve)  # before the model: a typo in a path fails at once
    flag = options.gpus is not None
    cluster = None
    if (options.runner or job.runner) == "ray":
        if flag or options.workers:
            raise ConfigError("--gpus and --workers pick this host's devices; with runner ray, "
                              "set ray.actors (one per GPU of the cluster by default)")
        cluster = OnCluster(job, options.ray_address)
        slots = [Slot(0, None, 1)]
    else:
        slots = worker_slots(options.gpus if flag else job.model.gpus,
                             options.workers or job.model.workers, job.model.device,
                             key="--gpus" if flag else "model.gpus")
    ctx = JobContext.load(job)
    parts = _Parts(ctx, slots, *given, cluster=cluster)
    report.fingerprint = ctx.fingerprint
    stop.check()
    retries = (job.sink.retries, job.sink.retry_base_delay_s)
    with JobLock(job.checkpoint_path):
        sync = SyncState(job.state.sync_db)
        try:
            check_identity(job, sync, options.restart)
            if options.restart:
                forget_unfinished(ctx.run_dir, sync)
                ctx.discard_run()
            checkpoint = Checkpoint.open(ctx.run_dir, ctx.fingerprint)
            report.sink = parts.describe(job.collection_name)
            probe = parts.sink(job.collection_name, None)
            try:
                if with_retries(lambda: check_destination(ctx, sync, probe, options.mode, report),
                                *retries):
                    ctx.discard_run()
                    checkpoint = Checkpoint.open(ctx.run_dir, ctx.fingerprint)
                fresh = checkpoint.is_new
                plan = checkpoint.run
                if fresh or plan is None:
                    plan = ctx.decide(sync, checkpoint, options.mode or job.sync.mode)
                elif options.mode and options.mode != plan.mode:
                    raise JobError(
                        f"{ctx.run_dir}: an unfinished {plan.mode} run exists; run "
                        f"without --mode to finish it, or with --mode {options.mode} --restart "
                        f"to start over")
                report.mode, report.target = plan.mode, plan.target
                report.sink = parts.describe(plan.target)
                target = plan.target
                with_retries(lambda: check_target(sync, probe, target, report.sink, report),
                             *retries)
            finally:
                probe.close()
            sync.record_generation(plan.target, ctx.fingerprint, plan.generation)
            if fresh:
                DeadLetterFile.rotate(job.dead_letter_file)
            # the cluster first: a connection to the destination left idle while a cluster
            # starts is dropped by the server's keep-alive policy (Milvus Lite: too_many_pings)
            with parts.joined(report):
                sink = parts.sink(plan.target, plan.base,
                                  GenerationMark(job.name, sync.state_id, ctx.fingerprint,
                                                 plan.generation))
                if fresh and not plan.in_place:
                    with_retries(sink.discard_target, *retries)
                _run_phases(ctx, parts, options, checkpoint, sync, sink, stop, report)
        finally:
            sync.close()


def _run_phases(ctx: JobContext, parts: _Parts, options: RunOptions, checkpoint: Checkpoint,
                sync: SyncState, sink: Destination, stop: StopRequest, report: RunReport) -> None:
    job = ctx.job
    assert checkpoint.run is not None  # decided by the start phase
    plan = checkpoint.run
    dead = DeadLetterFile(job.dead_letter_file)
    store = ctx.plan_store
    planner = None
    bar = progress_bar(options.progress, f"embed {job.name}", options.progress_interval_s,
                       emit=options.progress_emit)
    try:
        retries = (job.sink.retries, job.sink.retry_base_delay_s)
        with_retries(lambda: sink.on_write_start(ctx.dimension), *retries)
        rejected = RejectedRows(dead)
        docs = resync_plan(store, checkpoint, sink, sync,
                           lambda: parts.documents(rejected), rejected,
                           dead, plan.in_place, retries, report, ctx.settings_changed(plan))
        if plan.plan_settings != job.plan_settings():
            checkpoint.run = plan = plan.planned_with(job.plan_settings())  # the plan is now
            checkpoint.save()                                               # made with them
        known = store.all_stats()
        for s in known:
            count_window(report, s)
        bar.total = report.tokens
        if docs is not None:
            files = source_files(job.source, job.resolve)
            store.start(None if files is None else
                        [os.path.relpath(f, job.base_dir) for f in files])
            planner = Planner(ctx, docs, rejected, dead, options.limit,
                              sync.unchanged if plan.skip_unchanged else None,
                              planner_processes(job.batching.planner_processes, parts.slots,
                                                job.model.device),
                              parts.chunk_pool()).start()
        stop.check()
        t_model = time.monotonic()
        engine = parts.engine(SafeBudget(checkpoint.safe_token_budget,
                                         ceiling=job.batching.token_budget))
        report.model_load_s = time.monotonic() - t_model
        t_exec = time.monotonic()
        writer = Writer(sink, checkpoint, lambda rows: _count_ack(report, rows),
                        attempts=job.sink.retries, base_delay=job.sink.retry_base_delay_s).start()
        try:
            try:
                windows = all_windows(known, planner, report, bar)
                rates = engine.rates if isinstance(engine, (WorkerPool, ActorPool)) else None
                Executor(ctx, checkpoint, engine, writer, dead, report, bar, stop,
                         rates).run(windows)
            finally:
                parts.close(engine)
                report.extra["engine_restarts"] = engine.restarts
                if isinstance(engine, (WorkerPool, ActorPool)):
                    report.workers = [w.to_dict() for w in engine.stats]
        except BaseException:
            if planner is not None:
                planner.stop.set()
            _drain(writer)
            raise
        writer.finish()
        report.tokens_per_s = report.tokens_embedded / max(time.monotonic() - t_exec, 1e-9)
        report.waited_for_plan_s = planner.waited_s if planner is not None else 0.0
        report.waited_for_sink_s = writer.waited_s
        stop.check()
        report.plan_complete = store.complete
        if store.complete:
            fault_point("before_publish")
            publish_run(ctx, checkpoint, sync, sink, report, dead, options.accept_missing_files)
            report.status = "completed"
        else:
            report.status = "partial"
            report.warn(f"trial run (--limit {options.limit}): {report.docs:,} documents planned "
                        f"and embedded into {plan.target}, not published (readers "
                        f"still see what they saw before); run without --limit to finish")
    finally:
        bar.close()
        sink.close()
        report.vectors_total = checkpoint.vectors_written
        report.dead_letters, report.dead_letters_added = dead.count, dead.added
        if dead.added and report.status in ("completed", "partial"):  # a failure says it itself
            report.warn(f"{dead.added:,} new dead letters -> {dead.path}")


def _drain(writer: Writer) -> None:
    """After a failure elsewhere, still write and acknowledge what was already embedded."""
    try:
        writer.finish()
    except BaseException:  # noqa: BLE001 - the first failure is the one to report
        pass


def _count_ack(report: RunReport, rows: int) -> None:
    report.vectors_written += rows
