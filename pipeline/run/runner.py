"""Wires the stages of a run: planner thread -> embedder (this thread) -> writer thread,
then publishes the generation.

Layout of ``checkpoint_dir``: ``lock``; ``sync.sqlite`` (what the published generation holds,
per document); ``run/`` (the unfinished run: ``checkpoint.json`` and ``plan/``), removed once
the run is published; ``dead_letters.jsonl``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.commands.validate import check_sink, load_model_info
from pipeline.embedders import make_embedder
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.embedders.resilient import ResilientEmbedding, SafeBudget
from pipeline.errors import Interrupted, JobError
from pipeline.faults import fault_point, wrap_embedder
from pipeline.job.config import Job
from pipeline.job.model_info import ModelInfo
from pipeline.plan.batching import PlannedBatch, WindowStats
from pipeline.plan.build import RejectedRows, build_plan
from pipeline.plan.store import PlanStore
from pipeline.readers import check_source, read_documents, source_files
from pipeline.records import DeadLetter, window_of
from pipeline.run.ownership import check_destination, check_identity, check_target
from pipeline.run.progress import Progress, progress_bar
from pipeline.run.publish import publish_run
from pipeline.run.replan import forget_unfinished, resync_plan
from pipeline.run.report import RunReport
from pipeline.run.signals import graceful_stop
from pipeline.run.writer import WindowEnd, Writer, with_retries
from pipeline.sinks.base import GenerationMark, Sink, VectorBatch
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile
from pipeline.state.lock import JobLock
from pipeline.state.sync_state import SyncState


@dataclass
class RunOptions:
    restart: bool = False
    limit: int | None = None
    progress: bool = True
    mode: str | None = None  # overrides job.sync.mode
    accept_missing_files: bool = False  # source files read before and gone now: delete theirs
    progress_interval_s: float = 30.0  # off a terminal: one progress line this often
    progress_emit: Callable[[str], None] | None = None  # where such a line goes (stderr)


@dataclass
class JobContext:
    """Everything derived from the job file and the model before any work starts."""

    job: Job
    info: ModelInfo
    tokenizer: ModelTokenizer
    fingerprint: str

    @classmethod
    def load(cls, job: Job) -> JobContext:
        info = load_model_info(job)
        check_sink(job)
        tokenizer = ModelTokenizer.from_model_dir(info.path, job.model.pooling_for(info))
        return cls(job, info, tokenizer, job.fingerprint(tokenizer.identity()))

    @property
    def dimension(self) -> int:
        return self.job.model.dimension or self.info.hidden_size

    @property
    def max_context(self) -> int:
        """The longest sequence the backend takes (SGLang refuses one of exactly its context)."""
        return self.job.model.max_context(self.info)

    @property
    def run_dir(self) -> Path:
        return self.job.state.run_dir

    def discard_run(self) -> None:
        """Remove the unfinished run (ledger and plan)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.__dict__.pop("plan_store", None)

    @cached_property
    def plan_store(self) -> PlanStore:
        """One instance for the run: it caches the plan's manifest, which it alone writes."""
        return PlanStore(self.job.state.plan_dir)


class _Planner:
    """Runs build_plan on a thread and hands finished windows over a queue."""

    _DONE = object()

    def __init__(self, ctx: JobContext, docs: Iterator, rejected: RejectedRows,
                 dead: DeadLetterFile, limit: int | None, sync: SyncState | None) -> None:
        self.ctx, self.docs, self.rejected = ctx, docs, rejected
        self.dead, self.limit, self.sync = dead, limit, sync
        self.windows: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.waited_s = 0.0  # consumer time spent waiting for a window to be planned
        self._thread = threading.Thread(target=self._run, name="embed-job-planner", daemon=True)

    def start(self) -> _Planner:
        self._thread.start()
        return self

    def _run(self) -> None:
        job = self.ctx.job
        try:
            chunker = Chunker(self.ctx.tokenizer, job.chunking, self.ctx.max_context)
            build_plan(self.docs, chunker, self.ctx.plan_store, job.batching,
                       self.ctx.fingerprint, job.sink.store_text, self.dead, self.windows.put,
                       self.limit, self.stop,
                       unchanged=self.sync.unchanged if self.sync is not None else None,
                       on_bad_row=job.source.on_bad_row, rejected=self.rejected,
                       max_id_bytes=job.sink.doc_id_limit())
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            self.error = e
        finally:
            self.windows.put(self._DONE)

    def __iter__(self) -> Iterator[WindowStats]:
        while True:
            t = time.monotonic()
            item = self.windows.get()
            self.waited_s += time.monotonic() - t
            if item is self._DONE:
                break
            yield item
        self._thread.join()
        if self.error is not None:
            raise self.error


def _start_run(ctx: JobContext, sync: SyncState, checkpoint: Checkpoint, mode: str) -> None:
    """Decide, once per run, where it writes and what it builds on; saved in the checkpoint
    so a resumed run keeps the same decision."""
    published = sync.published()
    same = published is not None and published.fingerprint == ctx.fingerprint
    generation = published.generation + 1 if published else 1
    checkpoint.run = {
        "generation": generation,
        "target": ctx.job.sink.target_name(ctx.job.collection_name, ctx.fingerprint, generation),
        "base": published.target if published is not None and same else None,
        "skip_unchanged": same and mode == "incremental",
        "mode": mode,
        "plan_settings": ctx.job.plan_settings(),
    }
    checkpoint.save()


def run_job(job: Job, options: RunOptions, report: RunReport | None = None,
            stop: threading.Event | None = None) -> RunReport:
    """Plan (resuming the plan on disk), embed what the ledger lacks, write, publish.

    ``report`` is filled in as the run goes, so a caller holds it even when the run fails.
    ``stop``: the event SIGINT/SIGTERM set, when the caller installed the handlers itself
    (the CLI does, before anything else, so a signal during start-up is not lost).
    """
    t0 = time.monotonic()
    report = report if report is not None else RunReport(job=job.name)
    report.dead_letter_file = str(job.dead_letter_file)
    try:
        if stop is not None:
            _run_locked(job, options, report, stop)
        else:
            with graceful_stop() as own:
                _run_locked(job, options, report, own)
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


def _run_locked(job: Job, options: RunOptions, report: RunReport,
                stop: threading.Event) -> None:
    check_source(job.source, job.resolve)  # before the model: a typo in a path fails at once
    ctx = JobContext.load(job)
    report.fingerprint = ctx.fingerprint
    _stop_point(stop)
    with JobLock(job.checkpoint_path):
        sync = SyncState(job.state.sync_db)
        try:
            check_identity(job, sync, options.restart)
            if options.restart:
                forget_unfinished(ctx.run_dir, sync)
                ctx.discard_run()
            checkpoint = Checkpoint.open(ctx.run_dir, ctx.fingerprint)
            report.sink = _describe_sink(job, job.collection_name)
            probe = _make_sink(ctx, job.collection_name, None)
            try:
                if with_retries(lambda: check_destination(ctx, sync, probe, options.mode, report),
                                job.sink.retries, job.sink.retry_base_delay_s):
                    ctx.discard_run()
                    checkpoint = Checkpoint.open(ctx.run_dir, ctx.fingerprint)
                fresh = checkpoint.is_new
                if fresh:
                    _start_run(ctx, sync, checkpoint, options.mode or job.sync.mode)
                elif options.mode and options.mode != checkpoint.run["mode"]:
                    raise JobError(
                        f"{ctx.run_dir}: an unfinished {checkpoint.run['mode']} run exists; run "
                        f"without --mode to finish it, or with --mode {options.mode} --restart "
                        f"to start over")
                run = checkpoint.run
                report.mode, report.target = run["mode"], run["target"]
                report.sink = _describe_sink(job, run["target"])
                with_retries(lambda: check_target(sync, probe, run["target"], report.sink, report),
                             job.sink.retries, job.sink.retry_base_delay_s)
            finally:
                probe.close()
            sync.record_generation(run["target"], ctx.fingerprint, run["generation"])
            if fresh:
                DeadLetterFile.rotate(job.dead_letter_file)
            sink = _make_sink(ctx, run["target"], run["base"],
                              GenerationMark(job.name, sync.state_id, ctx.fingerprint,
                                             run["generation"]))
            if fresh and run["base"] != run["target"]:
                with_retries(sink.discard_target, job.sink.retries, job.sink.retry_base_delay_s)
            _run_phases(ctx, options, checkpoint, sync, sink, stop, report)
        finally:
            sync.close()


def _stop_point(stop: threading.Event) -> None:
    """A signal during start-up stops the run here, before the next slow step."""
    if stop.is_set():
        raise Interrupted(getattr(stop, "signum", 2))


def _make_sink(ctx: JobContext, target: str, base: str | None,
               mark: GenerationMark | None = None) -> Sink:
    job = ctx.job
    return job.sink.make(job.resolve, job.collection_name, target, base,
                         {"fingerprint": ctx.fingerprint, "model": job.model.path}, mark)


def _run_phases(ctx: JobContext, options: RunOptions, checkpoint: Checkpoint, sync: SyncState,
                sink: Sink, stop: threading.Event, report: RunReport) -> None:
    job = ctx.job
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
                           lambda: read_documents(job.source, job.resolve, rejected), rejected,
                           dead, checkpoint.run["base"] == checkpoint.run["target"], retries,
                           report,
                           _settings_changed(checkpoint, job))
        if checkpoint.run.get("plan_settings") != job.plan_settings():
            checkpoint.run["plan_settings"] = job.plan_settings()  # the plan is now made with them
            checkpoint.save()
        known = store.all_stats()
        for s in known:
            _add_window(report, s)
        bar.total = report.tokens
        if docs is not None:
            files = source_files(job.source, job.resolve)
            store.start(None if files is None else
                        [os.path.relpath(f, job.base_dir) for f in files])
            planner = _Planner(ctx, docs, rejected, dead, options.limit,
                               sync if checkpoint.run["skip_unchanged"] else None).start()
        _stop_point(stop)
        t_model = time.monotonic()
        engine = ResilientEmbedding(
            lambda: wrap_embedder(make_embedder(job.model, ctx.info, ctx.tokenizer.pad_id)),
            SafeBudget(checkpoint.safe_token_budget, ceiling=job.batching.token_budget))
        report.model_load_s = time.monotonic() - t_model
        t_exec = time.monotonic()
        writer = Writer(sink, checkpoint, lambda rows: _count_ack(report, rows),
                        attempts=job.sink.retries, base_delay=job.sink.retry_base_delay_s).start()
        try:
            try:
                windows = _all_windows(known, planner, report, bar)
                _Executor(ctx, checkpoint, engine, writer, dead, report, bar, stop).run(windows)
            finally:
                engine.close()
                report.extra["engine_restarts"] = engine.restarts
        except BaseException:
            if planner is not None:
                planner.stop.set()
            _drain(writer)
            raise
        writer.finish()
        report.tokens_per_s = report.tokens_embedded / max(time.monotonic() - t_exec, 1e-9)
        report.waited_for_plan_s = planner.waited_s if planner is not None else 0.0
        report.waited_for_sink_s = writer.waited_s
        if stop.is_set():
            raise Interrupted(getattr(stop, "signum", 2))
        report.plan_complete = store.complete
        if store.complete:
            fault_point("before_publish")
            publish_run(ctx, checkpoint, sync, sink, report, dead, options.accept_missing_files)
            report.status = "completed"
        else:
            report.status = "partial"
            report.warn(f"trial run (--limit {options.limit}): {report.docs:,} documents planned "
                        f"and embedded into {checkpoint.run['target']}, not published (readers "
                        f"still see what they saw before); run without --limit to finish")
    finally:
        bar.close()
        sink.close()
        report.vectors_total = checkpoint.vectors_written
        report.dead_letters, report.dead_letters_added = dead.count, dead.added
        if dead.added and report.status in ("completed", "partial"):  # a failure says it itself
            report.warn(f"{dead.added:,} new dead letters -> {dead.path}")


def _settings_changed(checkpoint: Checkpoint, job: Job) -> str | None:
    """Why the unfinished plan was made with other source settings (None: the same, or a
    plan of an earlier version, which did not record them)."""
    before, now = checkpoint.run.get("plan_settings"), job.plan_settings()
    if before is None or before == now:
        return None
    keys = [f"source.{k}" for k in {**before["source"], **now["source"]}
            if before["source"].get(k) != now["source"].get(k)]
    keys += ["sink.store_text"] if before["store_text"] != now["store_text"] else []
    return f"source settings changed since it was planned ({', '.join(keys)})"


def _drain(writer: Writer) -> None:
    """After a failure elsewhere, still write and acknowledge what was already embedded."""
    try:
        writer.finish()
    except BaseException:  # noqa: BLE001 - the first failure is the one to report
        pass


def _describe_sink(job: Job, target: str) -> str:
    return job.sink.describe(job.resolve, target, job.collection_name)


def _count_ack(report: RunReport, rows: int) -> None:
    report.vectors_written += rows


def _add_window(report: RunReport, s: WindowStats) -> None:
    report.docs += s.docs
    report.rows_rejected += s.rejected_rows
    report.chunks += s.chunks
    report.tokens += s.tokens
    report.padded_tokens += s.padded_tokens
    report.batches += s.batches


def _all_windows(known: list[WindowStats], planner: _Planner | None, report: RunReport,
                 bar: Progress) -> Iterator[int]:
    """Windows already on disk, then each new one as the planner finishes it."""
    for s in known:
        yield s.window
    if planner is None:
        return
    for s in planner:
        _add_window(report, s)
        bar.total = report.tokens
        bar.refresh()
        yield s.window


@dataclass
class _Executor:
    ctx: JobContext
    checkpoint: Checkpoint
    engine: ResilientEmbedding
    writer: Writer
    dead: DeadLetterFile
    report: RunReport
    bar: Progress
    stop: threading.Event
    _unfit: dict[tuple[str, int], str] = field(default_factory=dict)

    def run(self, windows: Iterator[int]) -> None:
        """One embedding stream across all windows, so the engine never drains at a window
        boundary; a window is closed once the first result of a later window comes back."""
        engine = self.engine
        engine.on_unfit, engine.on_budget_change = self._unfit_chunk, self._save_budget
        opened: deque[int] = deque()  # windows handed to the engine, not yet closed
        for batch, vectors in engine.run(self._batches(windows, opened)):
            fault_point("after_embed")
            self._close_windows(opened, before=window_of(batch.batch_id))
            self.writer.put(self._to_vector_batch(batch, vectors))
            self.report.batches_embedded += 1
            self.report.chunks_embedded += batch.table.num_rows
            self.report.tokens_embedded += batch.n_tokens
            self.bar.update(batch.n_tokens)
        if self.stop.is_set():
            return
        self._close_windows(opened, before=None)
        self.check_dead_letters(final=True)

    def _batches(self, windows: Iterator[int], opened: deque[int]) -> Iterator[PlannedBatch]:
        store = self.ctx.plan_store
        for window in windows:
            if self.stop.is_set():
                return
            if self.checkpoint.window_done(window):
                stats = store.stats(window)
                self.report.batches_skipped += stats.batches
                self.bar.update(stats.tokens)
                continue
            opened.append(window)
            yield from self._todo(window)

    def _close_windows(self, opened: deque[int], before: int | None) -> None:
        while opened and (before is None or opened[0] < before):
            self.writer.put(WindowEnd(opened.popleft()))
            self.check_dead_letters()

    def _todo(self, window: int) -> Iterator[PlannedBatch]:
        for b in self.ctx.plan_store.batches(window):
            if self.stop.is_set():
                return
            if self.checkpoint.is_done(b.batch_id):
                self.report.batches_skipped += 1
                self.bar.update(b.n_tokens)
                continue
            yield b

    def _save_budget(self, limit: int | None) -> None:
        # the writer thread also saves the checkpoint; its saves carry this value too
        self.checkpoint.safe_token_budget = limit
        self.report.extra["safe_token_budget"] = limit

    def _unfit_chunk(self, batch: PlannedBatch, row: int, error: BaseException) -> None:
        self._unfit[(batch.batch_id, row)] = f"out of memory even alone ({error})"

    def check_dead_letters(self, final: bool = False) -> None:
        """Stop when too much of the corpus is unusable: a broken source should fail loudly.

        The share is dead letters over rows seen (documents planned plus rows rejected);
        until the end it is judged only once 20 rows have been seen.
        """
        job, count = self.ctx.job, self.dead.count
        if job.max_dead_letters is not None and count > job.max_dead_letters:
            raise JobError(f"{count} dead letters > max_dead_letters {job.max_dead_letters}; "
                           f"{self._dominant()}see {self.dead.path}")
        bad, rows = self.dead.rows(), self.report.docs + self.report.rows_rejected
        ratio = job.max_dead_letter_ratio
        if ratio is not None and (rows >= 20 or final) and rows and bad / rows > ratio:
            raise JobError(f"{bad} of {rows} rows are dead letters ({bad / rows:.0%}) > "
                           f"max_dead_letter_ratio {ratio:.0%}; {self._dominant()}"
                           f"see {self.dead.path}")

    def _dominant(self) -> str:
        """The most common reason, and what probably fixes it."""
        reasons = self.dead.reasons()
        if not reasons:
            return ""
        reason, n = reasons.most_common(1)[0]
        source = self.ctx.job.source
        hint = ""
        for key in ("text_field", "id_field"):
            if reason.startswith(f"field {getattr(source, key)!r}: missing"):
                hint = f": check source.{key}"
        return f"most common: {reason!r} ({n}){hint}; "

    def _to_vector_batch(self, batch: PlannedBatch, raw: np.ndarray) -> VectorBatch:
        """Matryoshka cut + re-normalize; rows without a finite vector become dead letters."""
        model = self.ctx.job.model
        vectors = truncate_and_normalize(raw, model.dimension, model.normalize)
        t = batch.table
        ok = np.isfinite(vectors).all(axis=1)
        if not ok.all():
            for i in np.flatnonzero(~ok).tolist():
                reason = self._unfit.pop((batch.batch_id, i), "embedding has non-finite values")
                self.dead(DeadLetter(t["doc_id"][i].as_py(), t["source"][i].as_py(), reason,
                                     t["chunk_index"][i].as_py()))
            t = t.filter(ok)
            vectors = vectors[ok]
        return VectorBatch(
            batch_id=batch.batch_id,
            pks=t["pk"].to_pylist(),
            doc_ids=t["doc_id"].to_pylist(),
            chunk_indexes=t["chunk_index"].to_pylist(),
            doc_hashes=t["doc_hash"].to_pylist(),
            vectors=vectors,
            texts=t["text"].to_pylist() if self.ctx.job.sink.store_text else None,
            metadata=[json.loads(m) if m else {} for m in t["metadata"].to_pylist()],
        )
