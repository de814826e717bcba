"""Retrieval quality of a generation (``embed-job eval`` and the publish gate): how well it
retrieves, and what each Matryoshka dimension costs.

Queries come from a file (JSONL of ``{query, relevant: [doc ids]}``, or a BEIR directory:
``queries.jsonl`` + ``qrels/test.tsv`` or ``qrels.tsv``), or, without one, from the source
itself: a span of a sampled document's text is the query and that document the answer
(self-retrieval, said so in the output). Relevance is per document: a document's best chunk
stands for it. Each dimension is measured by exact search on the stored vectors cut to it
and re-normalized (the index's own, so nothing is embedded again but the queries); the
approximate index is measured against exact search at the stored dimension.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.chunking import ModelTokenizer
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.errors import ConfigError
from pipeline.job.config import Job
from pipeline.run.context import load_model_info
from pipeline.sinks.base import Searchable, top_k

QUERY_WORDS = 24  # words of a sampled document taken as its self-retrieval query
DEPTH = 100  # chunks retrieved per query, so enough distinct documents are ranked


@dataclass(frozen=True)
class Query:
    text: str
    relevant: frozenset[str]


@dataclass
class EvalResult:
    job: str
    queries: int
    kind: str  # "labelled" or "self-retrieval"
    k: int
    by_dimension: dict[str, dict[str, float]] = field(default_factory=dict)
    index_recall_vs_exact: float | None = None  # chunk overlap of the index's top k with exact

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        k = self.k
        lines = [f"embed-job eval {self.job}: {self.queries} {self.kind} queries"
                 + (" (a span of a document's own text; the document is the answer)"
                    if self.kind == "self-retrieval" else ""),
                 f"  {'dimension':>9}  {f'recall@{k}':>9}  {'MRR@10':>7}  {'nDCG@10':>7}"]
        for dim, m in self.by_dimension.items():
            lines.append(f"  {dim:>9}  {m['recall']:>9.3f}  {m['mrr']:>7.3f}  {m['ndcg']:>7.3f}")
        if self.index_recall_vs_exact is not None:
            lines.append(f"  the index's top {k} vs exact search: recall {self.index_recall_vs_exact:.3f}")
        return "\n".join(lines)


def embed_queries(job: Job, texts: list[str]) -> np.ndarray:
    """The queries' vectors as the index's: same model, pooling, dimension, normalization."""
    info = load_model_info(job)
    tokenizer = ModelTokenizer.from_model_dir(info.path, job.model.pooling_for(info))
    limit = job.model.max_context(info)
    ids = [tokenizer.query_ids(t, job.model.query_instruction) for t in texts]
    for text, seq in zip(texts, ids):
        if len(seq) > limit:
            raise ConfigError(f"query {text[:40]!r}...: {len(seq)} tokens, the model takes at "
                              f"most {limit}")
    with job.model.make(info, tokenizer.pad_id) as embedder:
        raw = embedder.embed_batch(ids)
    return truncate_and_normalize(raw, job.model.dimension, job.model.normalize)


def load_queries(path: Path) -> list[Query]:
    """JSONL of {query, relevant} objects, or a BEIR directory."""
    if path.is_dir():
        qrels = next((p for p in (path / "qrels" / "test.tsv", path / "qrels.tsv")
                      if p.exists()), None)
        if qrels is None or not (path / "queries.jsonl").exists():
            raise ConfigError(f"--queries {path}: a BEIR directory holds queries.jsonl and "
                              f"qrels/test.tsv (or qrels.tsv)")
        relevant: dict[str, set[str]] = {}
        with qrels.open(encoding="utf-8") as f:
            for line in csv.reader(f, delimiter="\t"):
                if len(line) >= 3 and line[0] != "query-id" and float(line[2]) > 0:
                    relevant.setdefault(line[0], set()).add(line[1])
        texts = {q["_id"]: q["text"] for q in _jsonl(path / "queries.jsonl")}
        return [Query(texts[q], frozenset(r)) for q, r in relevant.items() if q in texts]
    out: list[Query] = []
    for i, row in enumerate(_jsonl(path), 1):
        if not isinstance(row.get("query"), str) or not isinstance(row.get("relevant"), list):
            raise ConfigError(f"{path}: line {i}: expected {{\"query\": text, \"relevant\": "
                              f"[doc ids]}}")
        out.append(Query(row["query"], frozenset(map(str, row["relevant"]))))
    return out


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--queries {path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}: line {i}: not JSON") from None


def sample_queries(job: Job, n: int, seed: int = 0) -> list[Query]:
    """``n`` documents drawn evenly (reservoir sampling, seeded), a span of each as its query."""
    rng = random.Random(seed)
    picked: list[tuple[str, str]] = []
    from pipeline.readers import read_documents  # datasets: only when reading

    for i, doc in enumerate(read_documents(job.source, job.resolve, lambda letter: None)):
        words = doc.text.split()
        if len(words) < 8:
            continue
        if len(picked) < n:
            picked.append((doc.doc_id, doc.text))
        elif (j := rng.randrange(i + 1)) < n:
            picked[j] = (doc.doc_id, doc.text)
    out = []
    for doc_id, text in picked:
        words = text.split()
        start = rng.randrange(max(1, len(words) - QUERY_WORDS))
        out.append(Query(" ".join(words[start:start + QUERY_WORDS]), frozenset([doc_id])))
    return out


def evaluate(job: Job, index: Searchable, queries: list[Query], dims: list[int | None],
             k: int = 10, kind: str = "labelled", generation: str | None = None) -> EvalResult:
    """recall@k, MRR@10 and nDCG@10 per dimension (None: the stored one), and the index's
    top ``k`` against exact search, on ``generation`` (None: the live one)."""
    if not queries:
        raise ConfigError(f"{job.source_file}: no queries to evaluate with")
    vectors = embed_queries(job, [q.text for q in queries])
    stored = vectors.shape[1]
    for d in dims:
        if d is not None and d > stored:
            raise ConfigError(f"--dims {d}: the index stores {stored} dimensions; a larger one "
                              f"needs the documents embedded again (set model.dimension)")
    exact = exact_top(index.scan(generation), vectors, list(dict.fromkeys([*dims, None])),
                       DEPTH)
    approx = index.search(vectors, k, generation)
    result = EvalResult(job.name, len(queries), kind, k)
    for d in dims:
        ranked = [_documents(hits) for hits in exact[d]]
        result.by_dimension[str(d or stored)] = _metrics(ranked, queries, k)
    overlap = [len({(h[0], h[1]) for h in b[:k]} & {(h.doc_id, h.chunk_index) for h in a})
               / max(1, min(k, len(b))) for a, b in zip(approx, exact[None])]
    result.index_recall_vs_exact = float(np.mean(overlap))
    return result


def exact_top(batches: Iterator[Any], queries: np.ndarray, dims: list[int | None], depth: int
               ) -> dict[int | None, list[list[tuple[str, int, float]]]]:
    """Per dimension, each query's ``depth`` best (doc id, chunk, score) by brute force, the
    stored vectors read batch by batch."""
    cut = {d: truncate_and_normalize(queries, d) for d in dims}
    best: dict[int | None, list[list[tuple[str, int, float]]]] = {
        d: [[] for _ in queries] for d in dims}
    for rows in batches:
        for d in dims:
            scores = cut[d] @ truncate_and_normalize(rows.vectors, d).T
            for q, top in enumerate(top_k(scores, depth)):
                merged = best[d][q] + [(rows.doc_ids[i], rows.chunk_indexes[i],
                                        float(scores[q, i])) for i in top.tolist()]
                best[d][q] = sorted(merged, key=lambda h: -h[2])[:depth]
    return best


def _documents(hits: list[tuple[str, int, float]]) -> list[str]:
    """Documents in the order of their best chunk."""
    seen: dict[str, None] = {}
    for doc, _, _ in hits:
        seen.setdefault(doc, None)
    return list(seen)


def _metrics(ranked: list[list[str]], queries: list[Query], k: int) -> dict[str, float]:
    recall, mrr, ndcg = [], [], []
    for docs, q in zip(ranked, queries):
        recall.append(len(q.relevant & set(docs[:k])) / len(q.relevant))
        first = next((i for i, d in enumerate(docs[:10]) if d in q.relevant), None)
        mrr.append(0.0 if first is None else 1 / (first + 1))
        gain = sum(1 / math.log2(i + 2) for i, d in enumerate(docs[:10]) if d in q.relevant)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(10, len(q.relevant))))
        ndcg.append(gain / ideal)
    return {"recall": round(float(np.mean(recall)), 4), "mrr": round(float(np.mean(mrr)), 4),
            "ndcg": round(float(np.mean(ndcg)), 4)}


def gate_failure(job: Job, index: Searchable, generation: str, live: str) -> tuple[str | None,
                                                                                 EvalResult]:
    """Why ``generation`` may not replace ``live`` under ``sync.publish_gate`` (None: it may),
    and the figures it was judged by."""
    gate = job.sync.publish_gate
    assert gate is not None
    queries = (load_queries(job.resolve(gate.queries)) if gate.queries
               else sample_queries(job, gate.sample))
    kind = "labelled" if gate.queries else "self-retrieval"
    result = evaluate(job, index, queries, [None], 10, kind, generation)
    recall = next(iter(result.by_dimension.values()))["recall"]
    if recall >= gate.min_recall_at_10:
        return None, result
    return (f"sync.publish_gate: the new generation {generation} reaches recall@10 "
            f"{recall:.3f} < min_recall_at_10 {gate.min_recall_at_10} on {len(queries)} {kind} "
            f"queries; not published, readers stay on {live} (the new generation is kept: "
            f"change the settings, or the gate, and run again)"), result
