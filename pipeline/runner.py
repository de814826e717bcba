"""Wires the stages of a run: planner thread -> embedder (this thread) -> writer thread."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.config import Job
from pipeline.dead_letters import DeadLetterFile
from pipeline.embedders import make_embedder
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.faults import fault_point
from pipeline.lock import JobLock
from pipeline.models import ModelInfo, read_model_info, resolve_model_dir
from pipeline.planner import build_plan
from pipeline.planning import PlannedBatch, PlanStore, WindowStats
from pipeline.readers import read_documents
from pipeline.records import DeadLetter
from pipeline.report import RunReport
from pipeline.sinks import make_sink
from pipeline.sinks.base import VectorBatch
from pipeline.writer import WindowEnd, Writer


@dataclass
class RunOptions:
    restart: bool = False
    limit: int | None = None
    progress: bool = True


@dataclass
class JobContext:
    """Everything derived from the job file and the model before any work starts."""

    job: Job
    info: ModelInfo
    tokenizer: ModelTokenizer
    fingerprint: str

    @classmethod
    def load(cls, job: Job) -> "JobContext":
        info = read_model_info(resolve_model_dir(job.model.path, job.model.revision, job.base_dir))
        info.check_dimension(job.model.dimension)
        pooling = info.pooling if job.model.pooling == "auto" else job.model.pooling
        tokenizer = ModelTokenizer.from_model_dir(info.path, pooling)
        return cls(job, info, tokenizer, job.fingerprint(tokenizer.identity()))

    @property
    def dimension(self) -> int:
        return self.job.model.dimension or self.info.hidden_size

    @property
    def plan_store(self) -> PlanStore:
        return PlanStore(self.job.checkpoint_path / "plan")


class _Planner:
    """Runs build_plan on a thread and hands finished windows over a queue."""

    _DONE = object()

    def __init__(self, ctx: JobContext, dead: DeadLetterFile, limit: int | None) -> None:
        self.ctx, self.dead, self.limit = ctx, dead, limit
        self.windows: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.complete = False
        self._thread = threading.Thread(target=self._run, name="embed-job-planner", daemon=True)

    def start(self) -> "_Planner":
        self._thread.start()
        return self

    def _run(self) -> None:
        job = self.ctx.job
        try:
            docs = read_documents(job.source, lambda p: job.resolve(p), self.dead)
            chunker = Chunker(self.ctx.tokenizer, job.chunking, self.ctx.info.max_context)
            progress = build_plan(docs, chunker, self.ctx.plan_store, job.batching,
                                  self.ctx.fingerprint, job.sink.store_text, self.dead,
                                  self.windows.put, self.limit, self.stop)
            self.complete = progress.complete
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            self.error = e
        finally:
            self.windows.put(self._DONE)

    def __iter__(self) -> Iterator[WindowStats]:
        while (item := self.windows.get()) is not self._DONE:
            yield item
        self._thread.join()
        if self.error is not None:
            raise self.error


def _reset(ctx: JobContext) -> None:
    """--restart: forget the plan and the ledger (the dead letters of the old run too)."""
    ckpt = ctx.job.checkpoint_path
    shutil.rmtree(ckpt / "plan", ignore_errors=True)
    for name in ("checkpoint.json",):
        (ckpt / name).unlink(missing_ok=True)
    ctx.job.dead_letter_file.unlink(missing_ok=True)


def run_job(job: Job, options: RunOptions) -> RunReport:
    """Plan (resuming the plan on disk), embed what the ledger lacks, write, report."""
    t0 = time.monotonic()
    ctx = JobContext.load(job)
    report = RunReport(job=job.name, fingerprint=ctx.fingerprint,
                       sink=job.sink.uri or job.sink.path or "", dead_letter_file=str(job.dead_letter_file))
    with JobLock(job.checkpoint_path):
        if options.restart:
            _reset(ctx)
        checkpoint = Checkpoint.open(job.checkpoint_path, ctx.fingerprint, job.name)
        dead = DeadLetterFile(job.dead_letter_file)
        store = ctx.plan_store
        known = store.all_stats()
        for s in known:
            _add_window(report, s)
        planner = None
        if not store.complete:
            planner = _Planner(ctx, dead, options.limit).start()
        report.plan_complete = store.complete
        bar = tqdm(total=report.tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                   disable=not options.progress, desc=f"embed {job.name}", smoothing=0.1)
        sink = make_sink(job.sink, job.resolve, job.collection_name)
        try:
            sink.on_write_start(ctx.dimension)
            t_model = time.monotonic()
            embedder = make_embedder(job.model, ctx.info, ctx.tokenizer.pad_id)
            report.model_load_s = time.monotonic() - t_model
            t_exec = time.monotonic()

            def on_ack(batch: VectorBatch) -> None:
                report.vectors_written += len(batch)

            writer = Writer(sink, checkpoint, on_ack).start()
            try:
                with embedder:
                    windows = _all_windows(known, planner, report, bar)
                    _execute(ctx, windows, checkpoint, embedder, writer, dead, report, bar)
                    writer.finish()
            except BaseException:
                if planner is not None:
                    planner.stop.set()
                raise
            report.tokens_per_s = report.tokens_embedded / max(time.monotonic() - t_exec, 1e-9)
            report.plan_complete = store.complete
            report.status = "completed" if store.complete else "partial"
        except KeyboardInterrupt:
            report.status = "interrupted"
            raise
        except BaseException as e:
            report.status = "failed"
            report.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise
        finally:
            bar.close()
            sink.close()
            report.vectors_total = checkpoint.vectors_written
            report.dead_letters, report.dead_letters_added = dead.count, dead.added
            report.wall_s = time.monotonic() - t0
    return report


def _add_window(report: RunReport, s: WindowStats) -> None:
    report.docs += s.docs
    report.chunks += s.chunks
    report.tokens += s.tokens
    report.padded_tokens += s.padded_tokens
    report.batches += s.batches


def _all_windows(known: list[WindowStats], planner: _Planner | None, report: RunReport,
                 bar: tqdm) -> Iterator[int]:
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


def _execute(ctx: JobContext, windows: Iterator[int], checkpoint: Checkpoint, embedder,
             writer: Writer, dead: DeadLetterFile, report: RunReport, bar: tqdm) -> None:
    store = ctx.plan_store

    def todo(window: int) -> Iterator[tuple[PlannedBatch, list[list[int]]]]:
        for b in store.batches(window):
            if checkpoint.is_done(b.batch_id):
                report.batches_skipped += 1
                bar.update(b.n_tokens)
                continue
            yield b, b.token_ids

    for window in windows:
        if checkpoint.window_done(window):
            stats = store.stats(window)
            report.batches_skipped += stats.batches
            bar.update(stats.tokens)
            continue
        for batch, vectors in embedder.embed_stream(todo(window)):
            fault_point("after_embed")
            writer.put(_to_vector_batch(ctx, batch, vectors, dead))
            report.batches_embedded += 1
            report.chunks_embedded += batch.table.num_rows
            report.tokens_embedded += batch.n_tokens
            bar.update(batch.n_tokens)
        writer.put(WindowEnd(window))


def _to_vector_batch(ctx: JobContext, batch: PlannedBatch, raw: np.ndarray,
                     dead: DeadLetterFile) -> VectorBatch:
    """Matryoshka cut + re-normalize; rows with non-finite values become dead letters."""
    vectors = truncate_and_normalize(raw, ctx.job.model.dimension, ctx.job.model.normalize)
    t = batch.table
    ok = np.isfinite(vectors).all(axis=1)
    if not ok.all():
        for i in np.flatnonzero(~ok).tolist():
            dead(DeadLetter(t["doc_id"][i].as_py(), t["source"][i].as_py(),
                            "embedding has non-finite values", t["chunk_index"][i].as_py()))
        t = t.filter(ok)
        vectors = vectors[ok]
    return VectorBatch(
        batch_id=batch.batch_id,
        pks=t["pk"].to_pylist(),
        doc_ids=t["doc_id"].to_pylist(),
        chunk_indexes=t["chunk_index"].to_pylist(),
        doc_hashes=t["doc_hash"].to_pylist(),
        vectors=vectors,
        texts=t["text"].to_pylist() if ctx.job.sink.store_text else None,
        metadata=[_json(m) for m in t["metadata"].to_pylist()],
    )


def _json(text: str) -> dict:
    return json.loads(text) if text else {}
