"""The job's durable state beside the destination: what the published generation holds, per
document, which generations this job created, and whose state this is.

A SQLite file beside the checkpoint: one row per document (id, content hash, chunk count,
chunks stored), so lookups are indexed and memory stays flat at tens of millions of documents.
The document rows change only when a run publishes, in one transaction, after the sink was
verified to hold every vector.

Ownership lives here too: a generation (collection, version directory) is recorded *before*
it is created, and only recorded generations are ever dropped, so the job never removes
what it did not make.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import JobError
from pipeline.records import HASH_BUCKETS, SKIPPED_UNCHANGED, UNREADABLE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY, hash TEXT NOT NULL, n_chunks INTEGER NOT NULL,
    n_stored INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (
    target TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, generation INTEGER NOT NULL,
    origin TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forgotten (doc_id TEXT PRIMARY KEY) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Published:
    """The generation readers see now, and the older ones kept (newest first)."""

    fingerprint: str
    target: str
    generation: int
    previous: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SyncCounts:
    added: int
    updated: int
    unchanged: int
    deleted: int
    failed: int
    unreadable: int
    replace_all: bool = False  # a fresh build: every vector written anew


class SyncState:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise JobError(f"{path}: cannot use the sync state ({e}); move it away to rebuild it "
                           f"from the destination") from None
        except OSError as e:
            raise JobError(f"{path}: cannot open the sync state: {e.strerror or e}") from None

    def _migrate(self) -> None:
        """State written by an earlier version: chunks stored = chunks planned, and the
        published generations are the ones this job created."""
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(docs)")]
        if "n_stored" not in cols:
            self._db.execute("ALTER TABLE docs ADD COLUMN n_stored INTEGER")
        self._db.execute("UPDATE docs SET n_stored = n_chunks WHERE n_stored IS NULL")
        published = self.published()
        if published is not None:
            for name in (published.target, *published.previous):
                self._db.execute("INSERT OR IGNORE INTO generations VALUES (?, ?, ?, 'built')",
                                 (name, published.fingerprint if name == published.target
                                  else "", published.generation))

    def close(self) -> None:
        self._db.close()

    # -- meta ---------------------------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def published(self) -> Published | None:
        value = self._meta("published")
        return Published(**value) if value else None

    @property
    def state_id(self) -> str:
        """A random id of this state, written into every generation it creates."""
        sid = self._meta("state_id")
        if sid is None:
            sid = uuid.uuid4().hex
            self._set_meta("state_id", sid)
        return str(sid)

    def identity(self) -> dict[str, Any] | None:
        return self._meta("identity")

    def set_identity(self, identity: dict[str, Any]) -> None:
        self._set_meta("identity", identity)

    def source_files(self) -> list[str]:
        """The files the published generation was read from."""
        return list(self._meta("source_files") or [])

    # -- generations this job created -----------------------------------------------------

    def generations(self) -> dict[str, str]:
        """target -> origin ('built' or 'adopted') of every generation this job owns."""
        return dict(self._db.execute("SELECT target, origin FROM generations"))

    def record_generation(self, target: str, fingerprint: str, generation: int,
                          origin: str = "built") -> None:
        """Claim a target before it is created, so a crash right after cannot orphan it."""
        self._db.execute("INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?)",
                         (target, fingerprint, generation, origin))

    def forget_generation(self, target: str) -> None:
        self._db.execute("DELETE FROM generations WHERE target=?", (target,))

    # -- documents --------------------------------------------------------------------------

    def unchanged(self, doc_id: str, doc_hash: str) -> bool:
        """The one test of "skip this document": the published generation holds every chunk
        of this exact content, and no interrupted run has touched it since."""
        row = self._db.execute(
            "SELECT hash, n_chunks, n_stored, EXISTS (SELECT 1 FROM forgotten f WHERE "
            "f.doc_id = d.doc_id) FROM docs d WHERE doc_id=?", (doc_id,)).fetchone()
        return (row is not None and row[0] == doc_hash and row[1] > 0 and row[2] == row[1]
                and not row[3])

    def doc_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM docs").fetchone()[0])

    def doc_ids(self) -> Iterator[str]:
        """Every published document's id, streamed."""
        for (doc_id,) in self._db.execute("SELECT doc_id FROM docs"):
            yield doc_id

    def forget_docs(self, doc_ids: Iterable[str]) -> None:
        """Documents whose vectors an interrupted run's discarded plan may have written (and
        the rollback deleted): never skipped as unchanged, and, if the source no longer has
        them, no longer published."""
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?)", ((d,) for d in doc_ids))
        self._db.execute("COMMIT")

    def load_seen(self, seen: Iterable[tuple[str, str, int, int]]) -> None:
        """This run's documents as (id, hash, chunk count, chunks stored): chunk count -1 for
        a document skipped as unchanged, -3 for a row that is present but could not be read
        (both keep what is published), 0 for one that could not be embedded. Kept in a temp
        table for the diff."""
        db = self._db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (doc_id TEXT PRIMARY KEY, hash TEXT, "
                   "n_chunks INTEGER, n_stored INTEGER) WITHOUT ROWID")
        db.execute("BEGIN")
        db.execute("DELETE FROM seen")
        # an unreadable row never overrides a readable one with the same id
        db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                       "hash=excluded.hash, n_chunks=excluded.n_chunks, "
                       f"n_stored=excluded.n_stored WHERE excluded.n_chunks != {UNREADABLE}",
                       seen)
        db.execute("COMMIT")

    def _gone_sql(self, delete_missing: bool) -> str:
        """Published documents this run removes: absent from a fully read source (with
        delete_missing), or forgotten by a rollback and absent."""
        absent = "NOT EXISTS (SELECT 1 FROM seen s WHERE s.doc_id = d.doc_id)"
        forgotten = "d.doc_id IN (SELECT doc_id FROM forgotten)"
        return f"{absent} AND ({'1' if delete_missing else forgotten})"

    def changes(self, delete_missing: bool) -> Iterator[tuple[str, int, int]]:
        """Published documents whose stored chunks change: (doc id, old count, new count).

        A document an interrupted run may have written (``forget_docs``) may hold more chunks
        than either count says, so its old count is "any": every chunk from the new count
        on goes.
        """
        anything = 2**31 - 1
        yield from self._db.execute(
            f"SELECT s.doc_id, CASE WHEN s.doc_id IN (SELECT doc_id FROM forgotten) THEN "
            f"{anything} ELSE d.n_chunks END, s.n_chunks FROM seen s JOIN docs d "
            f"USING (doc_id) WHERE s.n_chunks >= 0")
        yield from self._db.execute(
            f"SELECT d.doc_id, d.n_chunks, 0 FROM docs d WHERE {self._gone_sql(delete_missing)}")
        yield from self._db.execute(
            f"SELECT f.doc_id, {anything}, max(coalesce(s.n_chunks, 0), 0) FROM forgotten f "
            f"LEFT JOIN seen s USING (doc_id) WHERE NOT EXISTS (SELECT 1 FROM docs d "
            f"WHERE d.doc_id = f.doc_id)")

    def counts(self, delete_missing: bool, replace_all: bool = False) -> SyncCounts:
        """What this run does to the published documents, for the report."""
        def one(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0])
        return SyncCounts(
            added=one("SELECT count(*) FROM seen s WHERE n_chunks > 0 AND NOT EXISTS "
                      "(SELECT 1 FROM docs d WHERE d.doc_id = s.doc_id)"),
            updated=one("SELECT count(*) FROM seen s JOIN docs d USING (doc_id) "
                        "WHERE s.n_chunks > 0"),
            unchanged=one(f"SELECT count(*) FROM seen WHERE n_chunks = {SKIPPED_UNCHANGED}"),
            deleted=one(f"SELECT count(*) FROM docs d WHERE {self._gone_sql(delete_missing)}"),
            failed=one("SELECT count(*) FROM seen WHERE n_chunks = 0"),
            unreadable=one(f"SELECT count(*) FROM seen WHERE n_chunks = {UNREADABLE}"),
            replace_all=replace_all,
        )

    def expected_by_bucket(self, replace_all: bool, delete_missing: bool) -> dict[str, int]:
        """Vectors the target must hold once this run is published, per first hex digit of
        the document's content hash (the sinks count the same buckets)."""
        sql = "SELECT substr(hash, 1, 1) AS b, n_stored AS n FROM seen WHERE n_chunks > 0"
        if not replace_all:
            sql += (" UNION ALL SELECT substr(d.hash, 1, 1), d.n_stored FROM docs d WHERE NOT "
                    "EXISTS (SELECT 1 FROM seen s WHERE s.doc_id = d.doc_id AND s.n_chunks >= 0)"
                    f" AND NOT ({self._gone_sql(delete_missing)})")
        out = dict.fromkeys(HASH_BUCKETS, 0)
        for bucket, n in self._db.execute(f"SELECT b, sum(n) FROM ({sql}) GROUP BY b"):
            out[bucket] = out.get(bucket, 0) + int(n)
        return out

    def committed(self, generation: int) -> SyncCounts | None:
        """What the commit of ``generation`` did, if it is the one published now (a run
        killed between its commit and its cleanup finishes without counting again)."""
        last = self._meta("last_commit")
        published = self.published()
        if last is None or published is None or published.generation != generation \
                or last["generation"] != generation:
            return None
        return SyncCounts(**last["counts"])

    def commit(self, published: Published, replace_all: bool, delete_missing: bool,
               source_files: list[str], counts: SyncCounts) -> None:
        """Make this run's documents (``load_seen``) the published state, atomically."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if replace_all:
                db.execute("DELETE FROM docs")
            else:
                db.execute(f"DELETE FROM docs AS d WHERE {self._gone_sql(delete_missing)}")
            # a document that could not be embedded is forgotten, so the next run retries it
            db.execute("DELETE FROM docs WHERE doc_id IN (SELECT doc_id FROM seen WHERE n_chunks = 0)")
            db.execute("INSERT OR REPLACE INTO docs SELECT doc_id, hash, n_chunks, n_stored "
                       "FROM seen WHERE n_chunks > 0")
            db.execute("DELETE FROM forgotten")
            self._set_meta("published", published.__dict__)
            self._set_meta("source_files", source_files)
            self._set_meta("last_commit", {"generation": published.generation,
                                           "counts": counts.__dict__})
            live = {published.target, *published.previous}
            for target in self.generations():
                if target not in live:
                    db.execute("DELETE FROM generations WHERE target=?", (target,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- recovery -------------------------------------------------------------------------

    def adopt(self, published: Published, rows: Iterable[tuple[str, int, str]]) -> int:
        """Rebuild the document rows from what the destination holds, as (doc id, chunk index,
        doc hash) per stored vector; returns the documents found."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM docs")
            db.executemany(
                "INSERT INTO docs VALUES (?, ?, ?, 1) ON CONFLICT(doc_id) DO UPDATE SET "
                "n_chunks = max(n_chunks, excluded.n_chunks), n_stored = n_stored + 1",
                ((doc_id, doc_hash, index + 1) for doc_id, index, doc_hash in rows))
            self._set_meta("published", published.__dict__)
            db.execute("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, 'adopted')",
                       (published.target, published.fingerprint, published.generation))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self.doc_count()

    def reset_published(self) -> None:
        """The destination lost the published generation: forget it and what it held."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM docs")
        db.execute("DELETE FROM forgotten")
        db.execute("DELETE FROM meta WHERE key IN ('published', 'source_files')")
        db.execute("COMMIT")
