"""``run --dry-run``: what a run would add, update and delete, without writing anything.

Reads the source and compares content hashes with the published state; nothing is
tokenized, embedded or written (the state file is only read).
"""

from __future__ import annotations

from pipeline.job.config import Job
from pipeline.readers import read_documents
from pipeline.records import SKIPPED_UNCHANGED, DeadLetter
from pipeline.run.context import JobContext
from pipeline.state.sync_state import SyncState


def preview(job: Job, mode: str | None) -> str:
    ctx = JobContext.load(job)
    mode = mode or job.sync.mode
    state_path = job.state.sync_db
    bad: list[DeadLetter] = []
    docs = read_documents(job.source, job.resolve, bad.append)
    if not state_path.exists():
        n = sum(1 for _ in docs)
        return _lines(job, mode, f"no published generation yet: would embed all {n:,} documents",
                      bad)
    sync = SyncState(state_path)
    try:
        published = sync.published()
        if published is None or published.fingerprint != ctx.fingerprint:
            n = sum(1 for _ in docs)
            return _lines(job, mode, f"model or settings changed (fingerprint "
                          f"{published.fingerprint if published else None} -> {ctx.fingerprint}): "
                          f"would build a new generation of all {n:,} documents and move the "
                          f"alias", bad)

        def records():
            for doc in docs:
                skip = mode == "incremental" and sync.unchanged(doc.doc_id, doc.content_hash)
                yield doc.doc_id, doc.content_hash, (SKIPPED_UNCHANGED if skip else 1), 1

        sync.load_seen(records())
        c = sync.counts(job.sync.delete_missing)
        deleted = (f"{c.deleted:,} deleted" if job.sync.delete_missing
                   else "deletions off (sync.delete_missing: false)")
        return _lines(job, mode, f"would add {c.added:,}, update {c.updated:,}, skip "
                      f"{c.unchanged:,} unchanged; {deleted}", bad)
    finally:
        sync.close()


def _lines(job: Job, mode: str, what: str, bad: list[DeadLetter]) -> str:
    out = [f"dry run of {job.name} ({mode}): {what}"]
    if bad:
        out.append(f"{len(bad):,} malformed rows would go to the dead-letter file, e.g. "
                   f"{bad[0].source}: {bad[0].reason}")
    return "\n".join(out)
