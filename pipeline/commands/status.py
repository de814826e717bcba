"""A job's progress, read from its published state and unfinished run without the lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.job.config import Job
from pipeline.plan.store import PlanStore
from pipeline.state.checkpoint import Checkpoint
from pipeline.state.dead_letters import DeadLetterFile
from pipeline.state.layout import plan_dir
from pipeline.state.sync_state import SyncState


def job_status(job: Job) -> dict[str, Any]:
    ckpt = job.checkpoint_path
    out: dict[str, Any] = {"job": job.name, "checkpoint": str(ckpt)}
    out.update(_published(job.state.sync_db))
    run = _run(job.state.run_dir)
    out.update(run)
    if run:
        out["state"] = "in progress" if run["plan_complete"] else "in progress (plan incomplete)"
    elif out.get("published_target"):
        out["state"] = "published"
    else:
        out["state"] = "not started"
    dead = DeadLetterFile(job.dead_letter_file)
    out["dead_letters"] = dead.count
    out["dead_letter_file"] = str(job.dead_letter_file)
    out["dead_letter_reasons"] = dict(dead.reasons().most_common(3))
    return out


def _published(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    sync = SyncState(path)
    try:
        p = sync.published()
        if p is None:
            return {}
        return {"published_target": p.target, "published_generation": p.generation,
                "published_fingerprint": p.fingerprint, "published_documents": sync.doc_count(),
                "kept_generations": p.previous}
    finally:
        sync.close()


def _run(run_dir: Path) -> dict[str, Any]:
    ledger = Checkpoint.peek(run_dir)
    store = PlanStore(plan_dir(run_dir))
    stats = store.all_stats()
    if ledger is None and not stats:
        return {}
    batches = sum(s.batches for s in stats)
    done = 0
    if ledger is not None:
        done = sum(s.batches for s in stats if ledger.window_done(s.window)) + sum(
            len(v) for v in ledger.done_batches.values())
    percent = round(100 * done / batches, 1) if batches else 0.0
    plan = ledger.run if ledger is not None else None
    return {
        "run_target": plan.target if plan else None,
        "run_mode": plan.mode if plan else None,
        "fingerprint": ledger.fingerprint if ledger else None,
        "plan_complete": store.complete,
        "documents": sum(s.docs for s in stats),
        "chunks": sum(s.chunks for s in stats),
        "tokens": sum(s.tokens for s in stats),
        "batches_done": done,
        "batches": batches,
        # unknown while the plan is incomplete: its batches are only a part of the run
        "percent_done": percent if store.complete else None,
        "vectors_written": ledger.vectors_written if ledger else 0,
        "safe_token_budget": ledger.safe_token_budget if ledger else None,
    }
