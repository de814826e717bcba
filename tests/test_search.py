"""``embed-job search``: real MiniLM over the demo corpus, into Milvus Lite and Parquet; the
query path of an instruction-tuned model (tiny random Qwen3) against the document path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import invoke, run
from helpers.jobs import DEMO_CORPUS, make_job

from pipeline.job.load import load_job

DOCS = [json.loads(line) for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines()]


def _hits(job: Path, query: str, k: int = 5) -> list[dict]:
    done = invoke("search", str(job), query, "-k", str(k), "--json")
    assert done.exit_code == 0, done.output
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_chunk_is_found_by_its_own_text(demo_index):
    chunk = next(d for d in DOCS if d["id"] == "py-heapq")["text"][:600]
    hits = _hits(demo_index, chunk)
    assert hits[0]["doc_id"] == "py-heapq" and hits[0]["chunk_index"] == 0
    assert hits[0]["score"] > 0.9
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize("query, doc", [
    ("how do I turn a JSON string into Python dictionaries and lists", "py-json"),
    ("a priority queue kept as a binary tree in a list", "py-heapq"),
    ("send an e-mail message through a mail server", "py-smtplib"),
])
def test_a_paraphrase_finds_its_document(demo_index, query, doc):
    assert doc in [h["doc_id"] for h in _hits(demo_index, query, k=3)]


def test_plain_output_is_one_line_a_hit(demo_index):
    done = invoke("search", str(demo_index), "heap queue algorithm", "-k", "2")
    lines = done.stdout.splitlines()
    assert done.exit_code == 0 and len(lines) == 2
    rank, score, where = lines[0].split()[:3]
    assert rank == "1" and 0 < float(score) <= 1 and where.startswith("py-heapq#")


def test_before_any_run_it_is_one_line(tmp_path):
    for sink in ({}, {"kind": "parquet", "path": "vectors"}):
        job = make_job(tmp_path / (sink.get("kind") or "milvus"), DOCS[:2], sink=sink)
        done = invoke("search", str(job), "anything")
        assert done.exit_code == 2, done.output
        line, = done.output.strip().splitlines()
        assert "nothing published yet" in line


def test_queries_get_the_instruction_and_eos_documents_do_not(tmp_path, tiny_qwen3_dir):
    from pipeline.chunking import ModelTokenizer
    from pipeline.run.context import load_model_info
    from pipeline.run.retrieval import embed_queries

    task = "Given a question, retrieve passages that answer it"
    text = "Sentences end with periods. Or questions?"
    job_file = make_job(tmp_path, [{"id": "d", "text": text}],
                        model={"path": str(tiny_qwen3_dir), "query_instruction": task},
                        sink={"kind": "parquet", "path": "vectors"})
    run(job_file, process=True, expect={0})
    job = load_job(job_file)
    info = load_model_info(job)
    tok = ModelTokenizer.from_model_dir(info.path, job.model.pooling_for(info))
    doc_ids = tok.with_special(tok.encode_with_offsets(text)[0])
    query_ids = tok.query_ids(text, task)
    assert query_ids[-1] == tok.eos_id and doc_ids[-1] == tok.eos_id
    assert query_ids[:-1] == tok.encode_with_offsets(f"Instruct: {task}\nQuery:{text}")[0]
    assert doc_ids != query_ids
    with job.model.make(info, tok.pad_id) as embedder:
        raw = embedder.embed_batch([doc_ids, query_ids])
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    query = embed_queries(job, [text])[0]
    np.testing.assert_allclose(query, raw[1], atol=1e-5)  # the query path: instruction + EOS
    from helpers.rows import stored_rows

    stored = next(iter(stored_rows(job_file).values()))["vector"]
    np.testing.assert_allclose(stored, raw[0], atol=1e-5)  # the document path: neither
    assert float(np.dot(raw[0], raw[1])) < 0.9999
