"""Run the product path, ``embed-job run``, on the bench corpus and measure it.

Parquet in -> reader -> token-exact chunker -> sorted token-budget plan (planner thread) ->
embedder (main thread) -> Matryoshka cut + re-normalize -> writer thread -> Parquet out.
``run_job`` is called in-process (what ``embed-job run`` calls) with an already started
embedder lent to it (``run_job(embedder=...)``, which the run neither closes nor restarts):
engine start-up is then measured once, separately, and not paid again for every configuration
measured.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from common import log, rss_now_mib, rss_peak_mib


def job_dict(name: str, corpus: Path, model_dir: Path, backend: str, work: Path,
             token_budget: int | None = 32768, sort_window: int | None = 500,
             dimension: int | None = 1024, model_extra: dict[str, Any] | None = None,
             max_tokens: int = 8192) -> dict[str, Any]:
    """The bench's job; a batching setting given as None is left at the product's default."""
    batching = {"token_budget": token_budget, "sort_window": sort_window}
    return {
        "name": name,
        "source": {"kind": "parquet", "path": str(corpus), "id_field": "id", "text_field": "text"},
        "chunking": {"max_tokens": max_tokens},
        "model": {"backend": backend, "path": str(model_dir), "dimension": dimension,
                  **(model_extra or {})},
        "batching": {k: v for k, v in batching.items() if v is not None},
        "sink": {"kind": "parquet", "path": str(work / "vectors")},
        "checkpoint_dir": str(work / "checkpoint"),
    }


def run_pipeline(job: dict[str, Any], work: Path, embedder: Any | None = None) -> dict[str, Any]:
    """Write the job file, run it from scratch, return the measurements."""
    # what a fresh `embed-job run` process imports before it starts working: not run time
    import pipeline.plan.build  # noqa: F401
    import pipeline.readers.parquet  # noqa: F401
    import pipeline.sinks.parquet  # noqa: F401
    from pipeline.job.load import load_job
    from pipeline.run.context import RunOptions
    from pipeline.run.runner import run_job

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    rss0 = rss_now_mib()
    t0 = time.monotonic()
    report = run_job(load_job(path), RunOptions(restart=True, progress=False), embedder=embedder)
    wall = time.monotonic() - t0
    vectors = sum(1 for _ in (work / "vectors").rglob("*.parquet"))
    run_s = wall - report.model_load_s
    out = {
        "status": report.status, "docs": report.docs, "chunks": report.chunks,
        "tokens": report.tokens, "plan_padded_tokens": report.padded_tokens,
        "batches": report.batches, "vectors_written": report.vectors_written,
        "parquet_files": vectors, "wall_s": round(wall, 2),
        "model_load_s": round(report.model_load_s, 2), "run_s": round(run_s, 2),
        "tokens_per_s": round(report.tokens / run_s, 1) if run_s > 0 else 0.0,
        "runner_tokens_per_s": round(report.tokens_per_s, 1),
        # where the embedder waited: for the planner (plan-bound), for the sink (sink-bound)
        "waited_for_plan_s": round(report.waited_for_plan_s, 2),
        "waited_for_sink_s": round(report.waited_for_sink_s, 2),
        "rss_before_mib": round(rss0, 1), "rss_peak_mib": round(rss_peak_mib(), 1),
        "rss_after_mib": round(rss_now_mib(), 1),
    }
    log(f"pipeline {job['name']}: {out}")
    if report.status != "completed":
        raise RuntimeError(f"run ended {report.status}: {report.error}")
    return out
