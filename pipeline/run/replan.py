"""Resuming an unfinished plan safely: find the first window that can no longer be trusted (a
plan file missing or damaged, or a source that changed under it), take back what was written
for it and every later window, and plan again from there.

Taking back is ordered so that a kill at any step is repaired by the next run doing the same
again: the destination first (idempotent deletes), then the sync state (documents an in-place
run touched are never skipped as unchanged), then the ledger, and the plan files last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import JobError, with_retries
from pipeline.plan.build import RejectedRows, verify_prefix
from pipeline.plan.store import PlanStore
from pipeline.records import Document
from pipeline.run.report import RunReport
from pipeline.sinks.base import Generations
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile
from pipeline.state.layout import plan_dir
from pipeline.state.sync_state import SyncState


def resync_plan(store: PlanStore, checkpoint: Checkpoint, sink: Generations, sync: SyncState,
                read: Callable[[], Iterator[Document]], rejected: RejectedRows,
                dead: DeadLetterFile, in_place: bool, retries: tuple[int, float],
                report: RunReport, settings_changed: str | None = None
                ) -> Iterator[Document] | None:
    """Make the plan on disk trustworthy; returns the source positioned where planning goes
    on (None when the plan is complete and sound: the source is not read at all).

    ``settings_changed``: why the plan's source settings (fields read, text stored) are not
    the job's any more; then the whole plan is made again.
    """
    damage = (0, settings_changed) if settings_changed else store.damaged(checkpoint.window_done)
    if store.complete and damage is None:
        return None
    from_window, why = damage if damage is not None else (None, "")
    change, docs = verify_prefix(read(), store, rejected, end=from_window)
    if change is not None and (from_window is None or change.window < from_window):
        from_window, why = change.window, change.why
    if from_window is None:
        return docs
    report.warn(f"plan window {from_window} onward is planned again: {why}")
    _take_back(store, checkpoint, sink, sync, from_window, in_place, retries)
    if from_window == 0:  # every letter will be found again: the file starts over
        dead.start_over()
        rejected.replay()
    return docs


def _take_back(store: PlanStore, checkpoint: Checkpoint, sink: Generations, sync: SyncState,
               from_window: int, in_place: bool, retries: tuple[int, float]) -> None:
    ids = sorted({d for w in store.windows() if w >= from_window for d in _written(store, w)})
    lost = with_retries(lambda: sink.forget(from_window, ids), *retries)
    if in_place:
        sync.forget_docs(ids)
    checkpoint.forget_from(from_window, lost, store.batch_ids)
    store.truncate(from_window)


def _written(store: PlanStore, window: int) -> list[str]:
    """The documents a window may have written: from its records, or, when those are
    damaged, from its chunk rows."""
    for path, column, wanted in ((store.docs_path(window), "doc_id", "n_chunks"),
                                 (store.window_path(window), "doc_id", None)):
        try:
            t = pq.read_table(path, columns=[column] + ([wanted] if wanted else []))
        except (OSError, ValueError):
            continue
        if wanted is None:
            return t[column].to_pylist()
        return [d for d, n in zip(t[column].to_pylist(), t[wanted].to_pylist()) if n > 0]
    raise JobError(f"{store.dir}: plan window {window} is damaged beyond reading and its "
                   f"documents may already be in the destination; run with --restart")


def forget_unfinished(run_dir: Path, sync: SyncState) -> None:
    """Before an unfinished in-place run is discarded (``--restart``), remember the documents
    its plan may have written into the live generation, so the next publish takes them back."""
    try:
        ledger = Checkpoint.peek(run_dir)
        plan = ledger.run if ledger is not None else None
    except JobError:
        plan = None  # a corrupt ledger: assume the worst, as if it was in place
    if plan is not None and not plan.in_place:
        return  # it wrote into a generation of its own, which the next build discards
    sync.forget_docs(d for f in sorted(plan_dir(run_dir).glob("docs-*.parquet"))
                     for d, n in _doc_counts(f) if n > 0)


def _doc_counts(path: Path) -> list[tuple[str, int]]:
    try:
        t = pq.read_table(path, columns=["doc_id", "n_chunks"])
    except (OSError, ValueError):
        return []
    return list(zip(t["doc_id"].to_pylist(), t["n_chunks"].to_pylist()))
