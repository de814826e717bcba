"""``embed-job audit JOB --repair``: make the live index agree with the source again.

Nothing here embeds a vector. The documents the audit's findings concern are
marked changed in the sync state (``SyncState.forget_docs``, the mark a rolled-back run
leaves), and the product's own incremental run re-embeds them and retires every row they had:
on Parquet, ``retire`` carries the live version into a new version directory without any row
of a marked document (a stale row, a duplicate, an orphan planted behind the product's back),
and ``CURRENT`` switches to it, no file modified in place; on a generation updated in place
(Milvus), the marked documents' rows are deleted first, so rows under keys the job never
makes go too. Skipped documents are not embedded again.

Data safety: only the live generation this job published is touched (it must be the one
readers see, made with the job's settings, no unfinished run beside it), the job's lock is
held from the first audit to the second, and the repair drops no generation (it keeps one
more previous generation than ``sync.keep_previous`` says: the one it replaced). A document
of the source that is fine is never marked. Of documents absent from the source, only those
this job never published (rows planted behind its back) are deleted; those it published go
only as a run would delete them: with ``sync.delete_missing``, from a source read completely.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.commands.audit import DOCUMENTS, FIRST, AuditResult, audit, query_args, reconciled
from pipeline.errors import JobError, with_retries
from pipeline.job.config import Job
from pipeline.run.context import JobContext, RunOptions
from pipeline.run.ownership import check_identity
from pipeline.run.report import RunReport
from pipeline.run.runner import run_job
from pipeline.secrets import quiet_client_logs, redact, redacted_logging
from pipeline.state.lock import JobLock
from pipeline.state.sync_state import Published, SyncState

_EVERY_CHUNK = 2**31 - 1  # an old chunk count that retires every chunk of a document


@dataclass
class RepairPlan:
    """What the repair does, decided from the audit's findings before anything changes."""

    target: str  # the live generation, this job's
    where: str
    reembed: int = 0  # source documents marked changed: embedded again, old rows retired
    delete: int = 0  # documents absent from the source this job never published: rows deleted
    absent: int = 0  # documents absent from the source this job published
    delete_missing: bool = False  # whether the run deletes those (sync.delete_missing)
    first: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.reembed or self.delete or (self.absent and self.delete_missing))

    def lines(self) -> list[str]:
        out = [f"repair: {self.where} (the live generation, this job's)",
               f"  re-embed      {_docs(self.reembed)}{_ids(self.first['reembed'], self.reembed)}",
               f"  delete        {_docs(self.delete)} absent from the source, never published by "
               f"this job{_ids(self.first['delete'], self.delete)}"]
        if self.absent:
            out.append(f"  {'delete' if self.delete_missing else 'keep':<13} "
                       f"{_docs(self.absent)} published by this job, gone from the source"
                       f"{_ids(self.first['absent'], self.absent)} ("
                       + ("sync.delete_missing: if the source is read completely)"
                          if self.delete_missing else "sync.delete_missing is off: turn it on "
                          "to delete them)"))
        return out


@dataclass
class RepairResult:
    before: AuditResult
    plan: RepairPlan | None = None  # None: nothing to repair
    run: RunReport | None = None  # None: no run was needed
    after: AuditResult | None = None  # None: not audited again (the first audit stands)

    @property
    def ok(self) -> bool:
        return (self.after or self.before).ok

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.to_dict(),
                "repair": None if self.plan is None else {
                    **asdict(self.plan), "run": None if self.run is None else self.run.to_dict()},
                "after": (self.after or self.before).to_dict(), "ok": self.ok}

    def run_line(self) -> str:
        r, plan = self.run, self.plan
        assert r is not None and plan is not None
        return (f"repaired: {_docs(r.docs_added + r.docs_updated)} embedded again "
                f"({r.chunks_embedded:,} chunks, {r.tokens_embedded:,} tokens in "
                f"{r.batches_embedded:,} batches), the rows of {_docs(plan.delete + r.docs_deleted)} "
                f"deleted; readers now see {r.target}")


def repair(job: Job, say: Callable[[str], None]) -> RepairResult:
    """Audit; re-embed and delete what the findings concern through an incremental run;
    audit again. ``say`` gets the first audit and the plan before anything changes, then
    the run's warnings."""
    if not job.state.sync_db.exists():  # before the lock, which would make the directory
        raise JobError(f"{job.state.sync_db}: no sync state: nothing published by this job yet "
                       f"(run it first)")
    with JobLock(job.checkpoint_path):
        published = _live_generation(job)  # the sink's client library is loaded from here on
        with redacted_logging(job.sink.secrets()), quiet_client_logs():
            return _repaired(job, published, say)


def _repaired(job: Job, published: Published, say: Callable[[str], None]) -> RepairResult:
    with reconciled(job) as (db, before):
        say(before.summary())
        if before.ok:
            return RepairResult(before)
        plan = _plan(db, job, published)
        for line in plan.lines():
            say(line)
        if plan.empty:
            return RepairResult(before, plan)
        _mark(db, job, published)
    report = RunReport(job=job.name)
    report.hide(job.sink.secrets())
    keep = job.sync.keep_previous + 1  # the generation it replaces stays, as a previous one
    run_job(job.model_copy(update={"sync": job.sync.model_copy(update={"keep_previous": keep})}),
            RunOptions(mode="incremental", progress=False), report)
    for warning in report.warnings:
        say(f"warning: {redact(warning, job.sink.secrets())}")
    return RepairResult(before, plan, report, audit(job))


def _live_generation(job: Job) -> Published:
    """The generation this job published, checked to be the one readers see, made with the
    job's settings, with no unfinished run beside it: the only one a repair may touch."""
    ctx = JobContext.load(job)
    sync = SyncState(job.state.sync_db)
    try:
        check_identity(job, sync, restart=False)
        published = sync.published()
    finally:
        sync.close()
    if published is None:
        raise JobError(f"{job.source_file}: nothing published by this job yet (run it first)")
    if published.fingerprint != ctx.fingerprint:
        raise JobError(f"{job.source_file}: the model or chunking settings changed since "
                       f"{published.target} was built (fingerprint {published.fingerprint} -> "
                       f"{ctx.fingerprint}); run the job to build the new generation, then audit")
    if ctx.run_dir.exists():
        raise JobError(f"{ctx.run_dir}: an unfinished run of this job exists; finish it (embed-job "
                       f"run) or discard it (embed-job run --restart), then repair")
    alias = job.collection_name
    probe = job.sink.make(job.resolve, alias, alias)
    try:
        with quiet_client_logs():
            live = with_retries(probe.live, job.sink.retries, job.sink.retry_base_delay_s)
    finally:
        probe.close()
    if live != published.target:
        raise JobError(f"{job.source_file}: readers see {live!r}, but this job published "
                       f"{published.target!r}; point {job.sink.published_as(alias)} back at it, "
                       f"then repair")
    return published


def _plan(db: sqlite3.Connection, job: Job, published: Published) -> RepairPlan:
    """Sort every document a finding concerns: in the source (embedded again), absent and
    never published by this job (deleted), absent and published (as sync.delete_missing says)."""
    db.execute("CREATE TABLE pub (doc_id TEXT PRIMARY KEY)")
    sync = SyncState(job.state.sync_db)
    try:
        db.executemany("INSERT INTO pub VALUES (?)", ((d,) for d in sync.doc_ids()))
    finally:
        sync.close()
    db.execute("CREATE TABLE fix (doc_id TEXT PRIMARY KEY)")
    for query in DOCUMENTS.values():
        db.execute(f"INSERT OR IGNORE INTO fix {query}", query_args(job))
    plan = RepairPlan(published.target, job.sink.describe(job.resolve, published.target,
                                                          job.collection_name),
                      delete_missing=job.sync.delete_missing)
    for kind, where in _KINDS.items():
        setattr(plan, kind, db.execute(f"SELECT COUNT(*) FROM fix WHERE {where}").fetchone()[0])
        plan.first[kind] = [r[0] for r in db.execute(
            f"SELECT doc_id FROM fix WHERE {where} ORDER BY doc_id LIMIT {FIRST}")]
    return plan


_IN_SOURCE = "doc_id IN (SELECT doc_id FROM src)"
_PUBLISHED = "doc_id IN (SELECT doc_id FROM pub)"
_KINDS = {"reembed": _IN_SOURCE,
          "delete": f"NOT {_IN_SOURCE} AND NOT {_PUBLISHED}",
          "absent": f"NOT {_IN_SOURCE} AND {_PUBLISHED}"}


def _mark(db: sqlite3.Connection, job: Job, published: Published) -> None:
    """Mark the documents to re-embed or delete as changed, then, on a generation updated in
    place, delete their rows (a kill in between: the next run still re-embeds them)."""
    marked = f"SELECT doc_id FROM fix WHERE {_IN_SOURCE} OR NOT {_PUBLISHED}"
    sync = SyncState(job.state.sync_db)
    try:
        sync.forget_docs(r[0] for r in db.execute(marked))
    finally:
        sync.close()
    alias = job.collection_name
    in_place = job.sink.target_name(alias, published.fingerprint,
                                    published.generation + 1) == published.target
    if not in_place:
        return  # the run writes a new generation and carries over only unmarked rows
    sink = job.sink.make(job.resolve, alias, published.target)
    try:
        with_retries(lambda: sink.retire((r[0], _EVERY_CHUNK, 0) for r in db.execute(marked)),
                     job.sink.retries, job.sink.retry_base_delay_s)
    finally:
        sink.close()


def _ids(first: list[str], count: int) -> str:
    return (": " + ", ".join(first) + (" ..." if count > len(first) else "")) if first else ""


def _docs(n: int) -> str:
    return f"{n:,} document" + ("" if n == 1 else "s")
