"""The last phase of a run: retire what changed, verify the target, switch readers to it,
record the new published state, forget the run.

Every step is idempotent, so a run killed anywhere in here finishes the same way when it
is run again (the run directory is removed only at the very end).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from pipeline.checkpoint import Checkpoint
from pipeline.errors import SinkError
from pipeline.planning import DUPLICATE
from pipeline.report import RunReport
from pipeline.sinks.base import Sink
from pipeline.sync_state import Published, SyncState

if TYPE_CHECKING:
    from pipeline.runner import JobContext


def publish_run(ctx: "JobContext", checkpoint: Checkpoint, sync: SyncState, sink: Sink,
                report: RunReport, embed_failures: int) -> None:
    """``embed_failures``: chunks dead-lettered at embedding time (planned, never stored)."""
    job, run = ctx.job, checkpoint.run
    replace_all = run["base"] is None
    delete_missing = job.sync.delete_missing
    sync.load_seen(r for r in ctx.plan_store.all_doc_records() if r[2] != DUPLICATE)
    counts = sync.counts(delete_missing)
    if not replace_all:
        sink.retire(sync.changes(delete_missing))
    expected = sync.expected_chunks(replace_all, delete_missing) - embed_failures
    actual = sink.count()
    if actual != expected:
        raise SinkError(f"{report.sink}: verification failed: {actual} vectors stored, "
                        f"{expected} expected; not published (readers still see the previous "
                        f"generation)")
    published = sync.published()
    history = [] if published is None else (
        published.previous if published.target == run["target"]
        else [published.target, *published.previous])
    keep = history[:job.sync.keep_previous]
    sink.publish(keep)
    sync.commit(Published(ctx.fingerprint, run["target"], run["generation"], keep),
                replace_all, delete_missing)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    report.docs_added, report.docs_updated = counts.added, counts.updated
    report.docs_unchanged, report.docs_deleted = counts.unchanged, counts.deleted
    report.vectors_in_target = actual
    report.outcome = "synced" if (counts.added or counts.updated or counts.deleted
                                  or counts.failed or replace_all) else "nothing_to_do"
