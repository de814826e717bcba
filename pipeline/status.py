"""A job's progress, read from its plan and checkpoint without taking the run lock."""

from __future__ import annotations

from typing import Any

from pipeline.checkpoint import read_state
from pipeline.config import Job
from pipeline.planning import PlanStore


def job_status(job: Job) -> dict[str, Any]:
    ckpt = job.checkpoint_path
    store = PlanStore(ckpt / "plan")
    stats = store.all_stats()
    state = read_state(ckpt)
    done_windows = set(state["done_windows"]) if state else set()
    partial = state["done_batches"] if state else {}
    batches = sum(s.batches for s in stats)
    done = sum(s.batches for s in stats if s.window in done_windows) + sum(
        len(v) for v in partial.values())
    tokens_done = sum(s.tokens for s in stats if s.window in done_windows)
    total_tokens = sum(s.tokens for s in stats)
    if not stats and state is None:
        phase = "not started"
    elif store.complete and batches and done == batches:
        phase = "complete"
    else:
        phase = "in progress" if store.complete else "planning/partial"
    return {
        "job": job.name,
        "state": phase,
        "checkpoint": str(ckpt),
        "fingerprint": state["fingerprint"] if state else None,
        "plan_complete": store.complete,
        "documents": sum(s.docs for s in stats),
        "chunks": sum(s.chunks for s in stats),
        "tokens": total_tokens,
        "batches_done": done,
        "batches": batches,
        "percent_done": round(100 * done / batches, 1) if batches else 0.0,
        "tokens_in_done_windows": tokens_done,
        "vectors_written": state["vectors_written"] if state else 0,
        "dead_letters": _count_lines(job.dead_letter_file),
    }


def _count_lines(path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8")) if path.exists() else 0
