"""The plan side of a run: windows already on disk, then each new one as the planner, on a
thread of its own, finishes it, so the embedder starts on the first window while the rest of
the corpus is still being read and chunked."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

from pipeline.chunking import Chunker
from pipeline.plan.batching import WindowStats
from pipeline.plan.build import RejectedRows, build_plan
from pipeline.plan.parallel import PoolFactory
from pipeline.records import Document
from pipeline.run.context import JobContext
from pipeline.run.progress import Progress
from pipeline.run.report import RunReport
from pipeline.run.stage import StageThread
from pipeline.state.dead_letters import DeadLetterFile

_DONE = object()


class Planner(StageThread):
    """Runs build_plan on its thread and hands finished windows over a queue. ``waited_s``:
    the embedder's time spent waiting for a window to be planned."""

    name = "embed-job-planner"

    def __init__(self, ctx: JobContext, docs: Iterator[Document], rejected: RejectedRows,
                 dead: DeadLetterFile, limit: int | None,
                 unchanged: Callable[[str, str], bool] | None, processes: int = 1,
                 pool: PoolFactory | None = None) -> None:
        super().__init__()
        self.ctx, self.docs, self.rejected = ctx, docs, rejected
        self.dead, self.limit, self.unchanged = dead, limit, unchanged
        self.processes, self.pool = processes, pool
        self.windows: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    def work(self) -> None:
        job = self.ctx.job
        chunker = Chunker(self.ctx.tokenizer, job.chunking, self.ctx.max_context)
        build_plan(self.docs, chunker, self.ctx.plan_store, job.batching,
                   self.ctx.fingerprint, job.sink.store_text, self.dead, self.windows.put,
                   self.limit, self.stop, unchanged=self.unchanged,
                   on_bad_row=job.source.on_bad_row, rejected=self.rejected,
                   max_id_bytes=job.sink.doc_id_limit(), processes=self.processes,
                   pool=self.pool)
        self.windows.put(_DONE)

    def after_failure(self, error: BaseException) -> None:
        self.windows.put(_DONE)

    def __iter__(self) -> Iterator[WindowStats]:
        while True:
            t = time.monotonic()
            item = self.windows.get()
            self.waited_s += time.monotonic() - t
            if item is _DONE:
                break
            yield item
        self.join()


def count_window(report: RunReport, s: WindowStats) -> None:
    """Add a planned window to the run's totals."""
    report.docs += s.docs
    report.rows_rejected += s.rejected_rows
    report.chunks += s.chunks
    report.tokens += s.tokens
    report.padded_tokens += s.padded_tokens
    report.batches += s.batches


def all_windows(known: list[WindowStats], planner: Planner | None, report: RunReport,
                bar: Progress) -> Iterator[int]:
    """Windows already on disk, then each new one as the planner finishes it."""
    for s in known:
        yield s.window
    if planner is None:
        return
    for s in planner:
        count_window(report, s)
        bar.total = report.tokens
        bar.refresh()
        yield s.window
