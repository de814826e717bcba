"""The last phase of a run: retire what changed, verify the target, switch readers to it,
record the new published state, drop this job's generations beyond ``keep_previous``, forget
the run.

Every step is idempotent, so a run killed anywhere in here finishes the same way when it
is run again (the run directory is removed only at the very end).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import asdict

from pipeline.errors import JobError, SinkError
from pipeline.faults import fault_point
from pipeline.plan.store import PlanStore
from pipeline.records import DUPLICATE
from pipeline.run.agreement import agreement_at_10, agreement_failure
from pipeline.run.context import JobContext
from pipeline.run.report import RunReport
from pipeline.run.retrieval import gate_failure
from pipeline.sinks.base import Generations, Searchable
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile
from pipeline.state.sync_state import Published, SyncCounts, SyncState


def publish_run(ctx: JobContext, checkpoint: Checkpoint, sync: SyncState, sink: Generations,
                report: RunReport, dead: DeadLetterFile, accept_missing_files: bool = False
                ) -> None:
    job, run = ctx.job, checkpoint.run
    assert run is not None  # decided when the run started
    store = ctx.plan_store
    done = sync.committed(run.generation)
    if done is not None:  # killed after the commit, before the run was forgotten
        _finish(ctx, report, done, sink.count())
        return
    replace_all = run.base is None
    deleting = job.sync.delete_missing and _deletes_allowed(
        store, sync, report, accept_missing_files)
    sync.load_seen(_seen(store, dead))
    counts = sync.counts(deleting, replace_all)
    if not replace_all:
        sink.retire(sync.changes(deleting))
    expected = sync.expected_by_bucket(replace_all, deleting)
    actual = sink.count_by_bucket()
    if actual != expected:
        diff = [f"{b}: {actual.get(b, 0)} stored, {n} expected" for b, n in expected.items()
                if actual.get(b, 0) != n]
        raise SinkError(f"{report.sink}: verification failed: {sum(actual.values())} vectors "
                        f"stored, {sum(expected.values())} expected (by doc_hash bucket "
                        f"{'; '.join(diff[:4])}); not published (readers still see what they "
                        f"saw before)")
    published = sync.published()
    history = [] if published is None else (
        published.previous if published.target == run.target
        else [published.target, *published.previous])
    keep = history[:job.sync.keep_previous]
    if job.sync.publish_gate is not None and published is not None \
            and published.target != run.target:
        _gate(ctx, sink, run.target, published, report)
    sink.publish()
    files = store.source_files or []
    if job.sync.delete_missing and not deleting:
        files = sorted({*files, *sync.source_files()})  # still owed: keep them expected
    owned = sync.generations()
    for name in history[job.sync.keep_previous:]:
        if owned.get(name) == "built":  # adopted generations are never dropped
            sink.drop(name)
    sync.commit(Published(ctx.fingerprint, run.target, run.generation, keep),
                replace_all, deleting, files, counts)
    fault_point("after_commit")
    if counts.unreadable:
        report.warn(f"{counts.unreadable:,} documents had unreadable rows and were kept as "
                    f"published; see {dead.path}")
    _finish(ctx, report, counts, sum(actual.values()))


def _gate(ctx: JobContext, sink: Generations, target: str, published: Published,
          report: RunReport) -> None:
    """The new generation's retrieval figures against the gate, before readers switch; on a
    model or settings change, its agreement with the generation it replaces too."""
    job = ctx.job
    gate = job.sync.publish_gate
    assert gate is not None
    if not isinstance(sink, Searchable):
        raise JobError(f"{job.source_file}: sync.publish_gate: sink.kind {job.sink.kind} cannot "
                       f"be searched")
    failure, result = gate_failure(job, sink, target, published.target)
    figures = report.extra["publish_gate"] = result.to_dict()
    if published.fingerprint != ctx.fingerprint:
        agreement = agreement_at_10(sink, target, published.target, gate.sample)
        figures["agreement_at_10"] = asdict(agreement)
        failure = failure or agreement_failure(gate, target, agreement)
    if failure is not None:
        raise JobError(failure)


def _finish(ctx: JobContext, report: RunReport, counts: SyncCounts, vectors: int) -> None:
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    report.docs_added, report.docs_updated = counts.added, counts.updated
    report.docs_unchanged, report.docs_deleted = counts.unchanged, counts.deleted
    report.vectors_in_target = vectors
    if counts.deleted:
        report.warn(f"{counts.deleted:,} documents deleted from the index (absent from the "
                    f"source, sync.delete_missing)")
    report.outcome = "synced" if (counts.added or counts.updated or counts.deleted
                                  or counts.failed or counts.replace_all) else "nothing_to_do"


def _seen(store: PlanStore, dead: DeadLetterFile) -> Iterator[tuple[str, str, int, int]]:
    """The plan's document records with the chunks that were really stored."""
    failed = dead.chunk_failures()
    for doc_id, doc_hash, n in store.all_doc_records():
        if n != DUPLICATE:
            yield doc_id, doc_hash, n, n - failed.get(doc_id, 0) if n > 0 else n


def _deletes_allowed(store: PlanStore, sync: SyncState, report: RunReport,
                     accept_missing_files: bool) -> bool:
    """Deleting documents absent from the source needs a source read completely: no row that
    could not be read nor named, and every file read by the published run still there."""
    unreadable = sum(s.unreadable_rows for s in store.all_stats())
    if unreadable:
        report.warn(f"{unreadable:,} source rows could not be read (see the dead-letter file): "
                    f"no documents deleted this run (sync.delete_missing)")
        return False
    now = set(store.source_files or [])
    gone = [f for f in sync.source_files() if f not in now] if store.source_files is not None \
        else []
    if gone and not accept_missing_files:
        report.warn(f"{len(gone)} source file(s) read before are missing now ({gone[0]}"
                    f"{', ...' if len(gone) > 1 else ''}): no documents deleted this run; if "
                    f"they were removed on purpose, run once with --accept-missing-files")
        return False
    return True
