"""``embed-job eval JOB``: how well the built index retrieves, and what each Matryoshka
dimension costs.

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
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.commands.live import live_index
from pipeline.commands.search import embed_queries
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.errors import ConfigError, JobError
from pipeline.job.config import Job
from pipeline.job.load import load_job
from pipeline.readers import read_documents

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


def evaluate(job: Job, queries: list[Query], dims: list[int | None], k: int = 10,
             kind: str = "labelled") -> EvalResult:
    """recall@k, MRR@10 and nDCG@10 per dimension (None: the stored one), and the index's
    top ``k`` against exact search."""
    if not queries:
        raise ConfigError(f"{job.source_file}: no queries to evaluate with")
    vectors = embed_queries(job, [q.text for q in queries])
    stored = vectors.shape[1]
    for d in dims:
        if d is not None and d > stored:
            raise ConfigError(f"--dims {d}: the index stores {stored} dimensions; a larger one "
                              f"needs the documents embedded again (set model.dimension)")
    with live_index(job) as index:
        exact = _exact_top(index.scan(), vectors, list(dict.fromkeys([*dims, None])), DEPTH)
        approx = index.search(vectors, k)
    result = EvalResult(job.name, len(queries), kind, k)
    for d in dims:
        ranked = [_documents(hits) for hits in exact[d]]
        result.by_dimension[str(d or stored)] = _metrics(ranked, queries, k)
    overlap = [len({(h[0], h[1]) for h in b[:k]} & {(h.doc_id, h.chunk_index) for h in a})
               / max(1, min(k, len(b))) for a, b in zip(approx, exact[None])]
    result.index_recall_vs_exact = float(np.mean(overlap))
    return result


def _exact_top(batches: Iterator[Any], queries: np.ndarray, dims: list[int | None], depth: int
               ) -> dict[int | None, list[list[tuple[str, int, float]]]]:
    """Per dimension, each query's ``depth`` best (doc id, chunk, score) by brute force, the
    stored vectors read batch by batch."""
    cut = {d: truncate_and_normalize(queries, d) for d in dims}
    best: dict[int | None, list[list[tuple[str, int, float]]]] = {
        d: [[] for _ in queries] for d in dims}
    for rows in batches:
        for d in dims:
            scores = cut[d] @ truncate_and_normalize(rows.vectors, d).T
            for q in range(len(queries)):
                top = np.argsort(-scores[q], kind="stable")[:depth]
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


@click.command(name="eval")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queries", "queries_path", type=click.Path(path_type=Path),
              help="JSONL of {query, relevant: [doc ids]}, or a BEIR directory; without it, a "
                   "self-retrieval sample of the source.")
@click.option("--sample", type=click.IntRange(min=1), default=200, show_default=True,
              help="Documents sampled for self-retrieval.")
@click.option("--dims", default="full", show_default=True,
              help="Dimensions to measure, comma-separated (64,128,full): the stored vectors cut "
                   "and re-normalized.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(job_file: Path, queries_path: Path | None, sample: int, dims: str, k: int,
                 as_json: bool) -> None:
    """Measure retrieval quality of the built index: recall@k, MRR@10, nDCG@10 per
    Matryoshka dimension, and the approximate index against exact search."""
    try:
        job = load_job(job_file)
        wanted = [None if d.strip() == "full" else _dimension(d) for d in dims.split(",")]
        queries = load_queries(queries_path) if queries_path else sample_queries(job, sample)
        result = evaluate(job, queries, wanted, k,
                          "labelled" if queries_path else "self-retrieval")
    except JobError as e:
        for line in str(e).splitlines():
            click.echo(f"error: {line}", err=True)
        sys.exit(e.exit_code)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


def _dimension(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--dims {text!r}: a number or 'full'") from None
    if value < 1:
        raise ConfigError(f"--dims {value}: at least 1")
    return value
