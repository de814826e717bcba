"""The run path driven in-process through its seams, as the bench drives it: a caller's
embedder (lent, or made by the caller's factory) and a caller's sink settings, no patching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.jobs import demo_docs, make_job

from pipeline.embedders.base import Embedder
from pipeline.job.load import load_job
from pipeline.run.context import JobContext, RunOptions
from pipeline.run.runner import run_job
from pipeline.sinks.memory import STORE, MemorySinkConfig
from pipeline.sinks.parquet import current_version


class Recording(Embedder):
    """The job's real embedder, noting how it is used."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.batches, self.closed = inner, 0, False

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def native_dim(self) -> int:
        return self.inner.native_dim

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches += 1
        return self.inner.embed_batch(batch)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def _real_embedder(job_file: Path) -> Embedder:
    ctx = JobContext.load(load_job(job_file))
    return ctx.job.model.make(ctx.info, ctx.tokenizer.pad_id)


def _memory_rows(alias: str) -> dict[str, tuple[str, np.ndarray]]:
    generation = STORE.generations[STORE.aliases[alias]]
    return {pk: (r.doc_id, r.vector) for pk, r in generation.rows.items()}


def _job(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return make_job(directory, demo_docs(6), sink={"kind": "parquet", "path": "v"})


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    return _job(tmp_path / "a")


def test_a_caller_s_sink_settings_and_embedder_factory_replace_the_job_s(job_file: Path) -> None:
    made: list[Recording] = []

    def factory() -> Embedder:
        made.append(Recording(_real_embedder(job_file)))
        return made[-1]

    sink = MemorySinkConfig(collection="seams")
    report = run_job(load_job(job_file), RunOptions(progress=False), embedder_factory=factory,
                     sink=sink)
    assert report.status == "completed" and report.vectors_written == report.chunks > 0
    assert len(made) == 1 and made[0].batches == report.batches_embedded and made[0].closed
    assert not (job_file.parent / "v").exists()  # the job's own sink was never made
    rows = _memory_rows("seams")
    assert {doc for doc, _ in rows.values()} == {d["id"] for d in demo_docs(6)}

    # the same job with its own sink (Parquet) and embedder stores the same vectors
    own = _job(job_file.parent.parent / "b")
    same = run_job(load_job(own), RunOptions(progress=False))
    assert same.vectors_written == report.vectors_written
    version = current_version(own.parent / "v")
    assert version is not None
    table = pq.read_table(sorted(version.glob("*.parquet")))
    for pk, vector in zip(table["pk"].to_pylist(), table["vector"].to_pylist()):
        np.testing.assert_allclose(rows[pk][1], vector, atol=1e-5)


def test_a_lent_embedder_is_used_and_left_open_for_the_next_run(job_file: Path) -> None:
    lent = Recording(_real_embedder(job_file))
    for alias in ("lent-a", "lent-b"):
        job = _job(job_file.parent.parent / alias)
        report = run_job(load_job(job), RunOptions(progress=False), embedder=lent,
                         sink=MemorySinkConfig(collection=alias))
        assert report.status == "completed" and report.model_load_s < 1.0
        assert not lent.closed
    assert lent.batches == 2 * report.batches_embedded
    assert _memory_rows("lent-a").keys() == _memory_rows("lent-b").keys()
