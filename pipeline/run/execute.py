"""The embedding loop of a run: planned batches not yet acknowledged go to the engine, vectors
come back cut to the Matryoshka dimension and re-normalized, and go to the writer; rows
without a usable vector become dead letters, and too many of them stop the run."""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.errors import JobError
from pipeline.faults import fault_point
from pipeline.plan.batching import PlannedBatch
from pipeline.records import DeadLetter, window_of
from pipeline.run.context import JobContext
from pipeline.run.progress import Progress
from pipeline.run.report import RunReport
from pipeline.run.signals import StopRequest
from pipeline.run.writer import WindowEnd, Writer
from pipeline.sinks.base import VectorBatch
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile


class Embedding(Protocol):
    """What the loop embeds with: ``ResilientEmbedding`` in this process, or the worker pool.
    Results may come in any order; ``on_unfit`` hears of a chunk that fits nowhere."""

    on_unfit: Callable[[PlannedBatch, int, BaseException], None]
    on_budget_change: Callable[[int | None], None]

    def run(self, batches: Iterable[PlannedBatch]
            ) -> Iterator[tuple[PlannedBatch, np.ndarray]]: ...


@dataclass
class _Feed:
    """Windows handed to the engine and not yet closed, with their batches out."""

    opened: deque[int] = field(default_factory=deque)
    out: Counter[int] = field(default_factory=Counter)
    finished: bool = False  # every batch has been handed out

    def closable(self) -> bool:
        """The oldest open window has all its batches back, and the feed moved past it."""
        head = self.opened[0] if self.opened else None
        return (head is not None and self.out[head] == 0
                and (self.finished or head != self.opened[-1]))


@dataclass
class Executor:
    ctx: JobContext
    checkpoint: Checkpoint
    engine: Embedding
    writer: Writer
    dead: DeadLetterFile
    report: RunReport
    bar: Progress
    stop: StopRequest
    rates: Callable[[], str] | None = None  # each worker's pace, shown beside the bar
    _unfit: dict[tuple[str, int], str] = field(default_factory=dict)

    def run(self, windows: Iterator[int]) -> None:
        """One embedding stream across all windows, so the engine never drains at a window
        boundary; a window is closed once all its results are back and a later window has
        started (results may come out of plan order from several workers)."""
        engine = self.engine
        engine.on_unfit, engine.on_budget_change = self._unfit_chunk, self._save_budget
        feed = _Feed()
        for batch, vectors in engine.run(self._batches(windows, feed)):
            fault_point("after_embed")
            self.writer.put(self._to_vector_batch(batch, vectors))
            feed.out[window_of(batch.batch_id)] -= 1
            self._close_windows(feed)
            self.report.batches_embedded += 1
            self.report.chunks_embedded += batch.table.num_rows
            self.report.tokens_embedded += batch.n_tokens
            self.bar.update(batch.n_tokens)
            if self.rates is not None:
                self.bar.set_postfix_str(self.rates())
        if self.stop.is_set():
            return
        feed.finished = True
        self._close_windows(feed)
        self._check_dead_letters(final=True)

    def _batches(self, windows: Iterator[int], feed: _Feed) -> Iterator[PlannedBatch]:
        store = self.ctx.plan_store
        for window in windows:
            if self.stop.is_set():
                return
            if self.checkpoint.window_done(window):
                stats = store.stats(window)
                self.report.batches_skipped += stats.batches
                self.bar.update(stats.tokens)
                continue
            feed.opened.append(window)
            for batch in self._todo(window):
                feed.out[window] += 1
                yield batch

    def _close_windows(self, feed: _Feed) -> None:
        while feed.closable():
            window = feed.opened.popleft()
            del feed.out[window]
            self.writer.put(WindowEnd(window))
            self._check_dead_letters()

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

    def _check_dead_letters(self, final: bool = False) -> None:
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
