"""Run the product path, ``embed-job run``, on the bench corpus and measure it.

Parquet in -> reader -> token-exact chunker -> sorted token-budget plan (planner thread) ->
embedder (main thread) -> Matryoshka cut + re-normalize -> writer thread -> Parquet out.
``run_job`` is called in-process (what ``embed-job run`` calls) so that an already started
embedder can be handed in: engine start-up is then measured once, separately, and not paid
again for every configuration measured.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from common import log, rss_now_mib, rss_peak_mib


class Borrowed:
    """An embedder lent to one run: the run's ``close()`` leaves it open for the next one.

    It also notes when each ``embed_stream`` (the runner opens one per plan window) got its
    first batch and gave its last result, to show where the run's time went."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.streams: list[list[float]] = []  # [first batch in, last result out]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed_batch(self, batch: Any) -> Any:
        return self._inner.embed_batch(batch)

    def embed_stream(self, batches: Any) -> Any:
        span: list[float] = []
        self.streams.append(span)

        def noted() -> Any:
            for item in batches:
                if not span:
                    span.append(time.monotonic())
                yield item

        for out in self._inner.embed_stream(noted()):
            yield out
            if len(span) == 1:
                span.append(time.monotonic())
            else:
                span[1] = time.monotonic()

    def close(self) -> None:
        pass

    def __enter__(self) -> Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


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
    import pipeline.run.runner as runner
    import pipeline.sinks.parquet  # noqa: F401
    from pipeline.job.load import load_job
    from pipeline.run.runner import RunOptions, run_job

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    original = runner.make_embedder
    lent: list[Borrowed] = []
    if embedder is not None:
        def lend(*args: Any, **kwargs: Any) -> Any:
            lent.append(Borrowed(embedder))
            return lent[-1]
        runner.make_embedder = lend
    rss0 = rss_now_mib()
    t0 = time.monotonic()
    try:
        report = run_job(load_job(path), RunOptions(restart=True, progress=False))
    finally:
        runner.make_embedder = original
    wall = time.monotonic() - t0
    if embedder is not None and not lent:
        raise RuntimeError("the runner did not ask make_embedder for its embedder")
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
        "rss_before_mib": round(rss0, 1), "rss_peak_mib": round(rss_peak_mib(), 1),
        "rss_after_mib": round(rss_now_mib(), 1),
    }
    spans = [sp for b in lent for sp in b.streams if len(sp) == 2]
    if spans:
        # first batch handed to the embedder; time between one window's last result and the
        # next window's first batch (the embedder is idle then); after the last result
        out["streams"] = len(spans)
        out["first_batch_at_s"] = round(spans[0][0] - t0, 2)
        out["between_windows_s"] = round(sum(b[0] - a[1] for a, b in zip(spans, spans[1:])), 2)
        out["after_last_result_s"] = round(t0 + wall - spans[-1][1], 2)
    log(f"pipeline {job['name']}: {out}")
    if report.status != "completed":
        raise RuntimeError(f"run ended {report.status}: {report.error}")
    return out
