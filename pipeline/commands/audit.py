"""``embed-job audit JOB``: does the live index hold exactly what the source says it should?

Document by document: the source is read and chunked as a run with the current settings
would chunk it, the live generation is scanned, and both go into a SQLite file on local disk,
where each kind of difference is one query. Memory stays bounded whatever the corpus: only
SQLite's cache and one batch of rows are held. Chunks and documents in the dead-letter file
are expected to be absent and are not differences.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.chunking import Chunker
from pipeline.commands.live import live_index
from pipeline.job.config import Job
from pipeline.records import DeadLetter
from pipeline.run.context import JobContext, check_sink
from pipeline.sinks.base import norms

FIRST = 10  # offending ids shown per kind of difference
UNIT = 1e-3  # |norm - 1| beyond this is not unit length
_BATCH = 5000

# kind -> (what it means, the query of the offending "doc_id#chunk" or ids)
CHECKS: dict[str, tuple[str, str]] = {
    "missing_documents": (
        "documents of the source with chunks to embed and no row in the index",
        "SELECT doc_id FROM src WHERE chunks > 0 AND doc_id NOT IN (SELECT doc_id FROM idx) "
        "AND doc_id NOT IN (SELECT doc_id FROM dead WHERE chunk_index IS NULL)"),
    "orphan_rows": (
        "rows whose document is no longer in the source",
        "SELECT doc_id || '#' || chunk_index FROM idx WHERE doc_id NOT IN (SELECT doc_id FROM src)"),
    "stale_rows": (
        "rows whose content hash is not the source document's (the document changed)",
        "SELECT i.doc_id || '#' || i.chunk_index FROM idx i JOIN src s ON s.doc_id = i.doc_id "
        "WHERE i.hash != s.hash"),
    "duplicate_keys": (
        "primary keys stored more than once",
        "SELECT pk FROM idx GROUP BY pk HAVING COUNT(*) > 1"),
    "duplicate_chunks": (
        "chunks stored more than once under different primary keys",
        "SELECT doc_id || '#' || chunk_index FROM idx GROUP BY doc_id, chunk_index "
        "HAVING COUNT(DISTINCT pk) > 1"),
    "chunk_counts": (
        "documents whose chunks in the index are not those the current chunking gives",
        "SELECT s.doc_id FROM src s JOIN (SELECT doc_id, COUNT(DISTINCT chunk_index) n, "
        "MAX(chunk_index) top FROM idx GROUP BY doc_id) i ON i.doc_id = s.doc_id "
        "WHERE i.n + (SELECT COUNT(*) FROM dead d WHERE d.doc_id = s.doc_id "
        "AND d.chunk_index IS NOT NULL) != s.chunks OR i.top >= s.chunks"),
    "bad_vectors": (
        "vectors that are not finite, or not unit length when model.normalize is on",
        "SELECT doc_id || '#' || chunk_index FROM idx WHERE norm IS NULL "
        "OR (:normalize AND abs(norm - 1) > :unit) OR norm > 1e30"),
}
# kind -> the documents its findings concern: what ``--repair`` re-embeds or deletes
DOCUMENTS: dict[str, str] = {
    "missing_documents": CHECKS["missing_documents"][1],
    "orphan_rows": "SELECT doc_id FROM idx WHERE doc_id NOT IN (SELECT doc_id FROM src)",
    "stale_rows": "SELECT i.doc_id FROM idx i JOIN src s ON s.doc_id = i.doc_id "
                  "WHERE i.hash != s.hash",
    "duplicate_keys": "SELECT doc_id FROM idx WHERE pk IN (SELECT pk FROM idx GROUP BY pk "
                      "HAVING COUNT(*) > 1)",
    "duplicate_chunks": "SELECT doc_id FROM idx GROUP BY doc_id, chunk_index "
                        "HAVING COUNT(DISTINCT pk) > 1",
    "chunk_counts": CHECKS["chunk_counts"][1],
    "bad_vectors": "SELECT doc_id FROM idx WHERE norm IS NULL "
                   "OR (:normalize AND abs(norm - 1) > :unit) OR norm > 1e30",
}


@dataclass
class AuditResult:
    """What the audit found: totals, and per kind of difference a count and the first ids."""

    job: str
    documents: int = 0
    chunks_expected: int = 0
    rows: int = 0
    dead_letters: int = 0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f["count"] for f in self.findings.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        lines = [f"embed-job audit {self.job}: " + ("the index matches the source" if self.ok
                                                    else "the index differs from the source"),
                 f"  source        {self.documents:,} documents, {self.chunks_expected:,} chunks "
                 f"by the current chunking ({self.dead_letters:,} dead letters expected absent)",
                 f"  index         {self.rows:,} rows"]
        for kind, f in self.findings.items():
            first = (": " + ", ".join(f["first"]) + (" ..." if f["count"] > len(f["first"])
                                                      else "")) if f["count"] else ""
            lines.append(f"  {kind:<18} {f['count']:,}{first}")
        return "\n".join(lines)


def audit(job: Job) -> AuditResult:
    with reconciled(job) as (_, result):
        return result


@contextmanager
def reconciled(job: Job) -> Iterator[tuple[sqlite3.Connection, AuditResult]]:
    """The audit's result, and its SQLite file while it lasts (tables ``src``, ``idx``,
    ``dead``), where ``DOCUMENTS`` finds every document a finding concerns."""
    ctx = JobContext.load(job)
    check_sink(job)
    out = AuditResult(job.name)
    with tempfile.TemporaryDirectory(prefix="embed-job-audit-") as tmp:
        db = sqlite3.connect(Path(tmp) / "audit.db")
        try:
            db.executescript("CREATE TABLE src (doc_id TEXT PRIMARY KEY, hash TEXT, chunks INT);"
                             "CREATE TABLE idx (pk TEXT, doc_id TEXT, chunk_index INT, hash TEXT,"
                             " norm REAL); CREATE TABLE dead (doc_id TEXT, chunk_index INT);")
            out.dead_letters = _fill(db, "dead", _dead_letters(job.dead_letter_file))
            chunker = Chunker(ctx.tokenizer, job.chunking, ctx.max_context)
            out.documents = _fill(db, "src", _expected(job, chunker), "INSERT OR IGNORE")
            out.chunks_expected = db.execute("SELECT COALESCE(SUM(chunks), 0) FROM src"
                                             ).fetchone()[0]
            out.rows = _fill(db, "idx", _stored(job))
            db.executescript("CREATE INDEX idx_doc ON idx (doc_id, chunk_index); CREATE INDEX "
                             "idx_pk ON idx (pk); CREATE INDEX dead_doc ON dead (doc_id);")
            args = query_args(job)
            for kind, (_, query) in CHECKS.items():
                count = db.execute(f"SELECT COUNT(*) FROM ({query})", args).fetchone()[0]
                first = [r[0] for r in db.execute(f"{query} LIMIT {FIRST}", args)]
                out.findings[kind] = {"count": count, "first": first}
            yield db, out
        finally:
            db.close()


def query_args(job: Job) -> dict[str, Any]:
    """The parameters of the checks' queries."""
    return {"normalize": job.model.normalize, "unit": UNIT}


def _fill(db: sqlite3.Connection, table: str, rows: Iterable[tuple], verb: str = "INSERT"
          ) -> int:
    """Insert ``rows`` in batches; returns how many were offered."""
    n = 0
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            n += _insert(db, table, batch, verb)
    return n + _insert(db, table, batch, verb)


def _insert(db: sqlite3.Connection, table: str, batch: list[tuple], verb: str) -> int:
    if batch:
        db.executemany(f"{verb} INTO {table} VALUES ({', '.join('?' * len(batch[0]))})", batch)
    n = len(batch)
    batch.clear()
    return n


def _dead_letters(path: Path) -> Iterator[tuple[str, int | None]]:
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            letter = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if letter.get("doc_id") is not None:
            yield letter["doc_id"], letter.get("chunk_index")


def _expected(job: Job, chunker: Chunker) -> Iterator[tuple[str, str, int]]:
    """(doc id, content hash, chunks) of every source document; the first of an id wins, as
    in a run; a document that cannot be chunked has none."""
    from pipeline.readers import read_documents  # datasets: only when reading

    for doc in read_documents(job.source, job.resolve, lambda letter: None):
        chunks = chunker.chunk(doc)
        yield doc.doc_id, doc.content_hash, 0 if isinstance(chunks, DeadLetter) else len(chunks)


def _stored(job: Job) -> Iterator[tuple[str, str, int, str, float | None]]:
    with live_index(job) as index:
        for rows in index.scan():
            for pk, doc, index_, doc_hash, norm in zip(
                    rows.pks, rows.doc_ids, rows.chunk_indexes, rows.doc_hashes,
                    norms(rows.vectors).tolist()):
                yield pk, doc, index_, doc_hash, norm if norm == norm else None  # NaN: NULL
