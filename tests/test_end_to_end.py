"""A whole run on real parts: JSONL in, MiniLM, Milvus Lite or Parquet out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import run
from helpers.jobs import demo_docs, make_job
from helpers.rows import stored_rows

from pipeline.chunking import Chunker
from pipeline.job.load import load_job
from pipeline.keys import chunk_pk
from pipeline.records import Document
from pipeline.run.context import JobContext


def expected_pks(job_path: Path, docs: list[dict]) -> set[str]:
    """The key set a correct run must produce, from the chunker alone."""
    ctx = JobContext.load(load_job(job_path))
    chunker = Chunker(ctx.tokenizer, ctx.job.chunking, ctx.info.max_context)
    keys = set()
    for d in docs:
        chunks = chunker.chunk(Document(d["id"], d["text"], "test"))
        keys |= {chunk_pk(ctx.fingerprint, d["id"], c.chunk_index) for c in chunks}
    return keys


@pytest.fixture(scope="module")
def milvus_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e")
    docs = demo_docs(25)
    job = make_job(tmp, docs)
    result = run(job)
    assert result.exit_code == 0, result.output
    return tmp, docs, job, result.report


def test_milvus_holds_exactly_the_expected_keys(milvus_run) -> None:
    _, docs, job, report = milvus_run
    rows = stored_rows(job)
    assert set(rows) == expected_pks(job, docs)
    assert {r["doc_id"] for r in rows.values()} == {d["id"] for d in docs}
    assert report["vectors_written"] == len(rows) == report["chunks"]
    norms = np.linalg.norm(np.stack([r["vector"] for r in rows.values()]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_search_for_own_text_finds_the_document_first(milvus_run) -> None:
    from pymilvus import MilvusClient

    from pipeline.embedders.matryoshka import truncate_and_normalize

    tmp, docs, job, _ = milvus_run
    ctx = JobContext.load(load_job(job))
    embedder = ctx.job.model.make(ctx.info, ctx.tokenizer.pad_id)
    client = MilvusClient(str(tmp / "out.db"))
    try:
        for d in docs[:8]:
            first_sentence = d["text"].split("\n\n")[0][:300]
            q = truncate_and_normalize(embedder.embed_batch([ctx.tokenizer.query_ids(first_sentence, None)]), None)
            hits = client.search("t", data=q.tolist(), limit=3, output_fields=["doc_id"])[0]
            assert hits[0]["entity"]["doc_id"] == d["id"], (d["id"], hits)
    finally:
        client.close()


def test_report_counts_are_consistent(milvus_run) -> None:
    _, docs, _, report = milvus_run
    assert report["status"] == "completed"
    assert report["docs"] == len(docs)
    assert report["tokens_embedded"] == report["tokens"] > 0
    assert 0 <= report["padding_waste"] < 0.5
    assert report["padded_tokens"] >= report["tokens"]


def test_second_run_embeds_nothing_and_changes_nothing(milvus_run) -> None:
    _, docs, job, _ = milvus_run
    before = stored_rows(job)
    result = run(job)
    assert result.exit_code == 5, result.output  # nothing to do
    again = result.report
    assert again["tokens_embedded"] == 0 and again["outcome"] == "nothing_to_do"
    assert again["docs_unchanged"] == len(docs)
    assert stored_rows(job).keys() == before.keys()


def test_parquet_sink_with_matryoshka_dimension(tmp_path: Path) -> None:
    docs = demo_docs(12)
    job = make_job(tmp_path, docs, model={"dimension": 128},
                   sink={"kind": "parquet", "path": "vectors", "rows_per_file": 20})
    result = run(job, report=False)
    assert result.exit_code == 0, result.output
    rows = stored_rows(job)
    assert set(rows) == expected_pks(job, docs)
    files = sorted((tmp_path / "vectors").glob("v*/*.parquet"))
    assert len(files) >= 2
    schema = pq.read_schema(files[0])
    assert schema.field("vector").type == pa.list_(pa.float32(), 128)
    for r in rows.values():
        assert r["vector"].shape == (128,)
        assert abs(np.linalg.norm(r["vector"]) - 1) < 1e-5


def test_limit_runs_a_trial_then_the_rest(tmp_path: Path) -> None:
    docs = demo_docs(10)
    job = make_job(tmp_path, docs)
    r1 = run(job, "--limit", "3")
    assert r1.exit_code == 0, r1.output
    first = r1.report
    assert first["status"] == "partial" and first["docs"] == 3
    r2 = run(job)
    assert r2.exit_code == 0, r2.output
    second = r2.report
    assert second["status"] == "completed" and second["docs"] == 10
    assert set(stored_rows(job)) == expected_pks(job, docs)


def test_report_says_whether_the_sink_or_the_plan_held_the_embedder_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow sink shows as time waited for the sink, slow chunking as time waited for the
    plan: the report tells a user which stage to look at when the device is not the pace."""
    import time

    from pipeline.sinks.parquet import ParquetSink

    def slowed(cls: type, name: str, seconds: float) -> None:
        original = getattr(cls, name)

        def slow(self: object, *args: object) -> object:
            time.sleep(seconds)
            return original(self, *args)
        monkeypatch.setattr(cls, name, slow)

    def run_in(directory: Path) -> dict:
        job = make_job(directory, demo_docs(12), batching={"max_batch_size": 2, "sort_window": 4},
                       sink={"kind": "parquet", "path": "vectors"})
        result = run(job)
        assert result.exit_code == 0, result.output
        return result.report

    slowed(ParquetSink, "write", 0.4)  # well past an embedding call on a loaded machine
    sink_bound = run_in(tmp_path / "slow-sink")
    monkeypatch.undo()
    slowed(Chunker, "chunk", 1.0)  # planning (12 s) outlasts the model load on a loaded machine
    plan_bound = run_in(tmp_path / "slow-plan")

    assert sink_bound["batches"] >= 10
    assert sink_bound["waited_for_sink_s"] > 0.5 > sink_bound["waited_for_plan_s"]
    assert plan_bound["waited_for_plan_s"] > 1.0 > plan_bound["waited_for_sink_s"]
