"""What the last published generation holds, per document: the state nightly syncs diff against.

A SQLite file beside the checkpoint: one row per document (id, content hash, chunk count),
so lookups are indexed and memory stays flat at tens of millions of documents. It changes
only when a run publishes, in one transaction, after the sink holds every vector.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY, hash TEXT NOT NULL, n_chunks INTEGER NOT NULL) WITHOUT ROWID;
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


class SyncState:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def published(self) -> Published | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='published'").fetchone()
        return Published(**json.loads(row[0])) if row else None

    def lookup(self, doc_id: str) -> tuple[str, int] | None:
        return self._db.execute("SELECT hash, n_chunks FROM docs WHERE doc_id=?",
                                (doc_id,)).fetchone()

    def doc_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM docs").fetchone()[0]

    def load_seen(self, seen: Iterable[tuple[str, str, int]]) -> None:
        """This run's documents as (id, hash, new chunk count): -1 for a document skipped as
        unchanged, 0 for one that could not be embedded. Kept in a temp table for the diff."""
        db = self._db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (doc_id TEXT PRIMARY KEY, hash TEXT, "
                   "n_chunks INTEGER) WITHOUT ROWID")
        db.execute("BEGIN")
        db.execute("DELETE FROM seen")
        db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)", seen)
        db.execute("COMMIT")

    def changes(self, delete_missing: bool) -> Iterator[tuple[str, int, int]]:
        """Published documents whose stored chunks change: (doc id, old count, new count).

        A published document absent from this run is removed (new count 0) only with
        ``delete_missing``.
        """
        yield from self._db.execute(
            "SELECT s.doc_id, d.n_chunks, s.n_chunks FROM seen s JOIN docs d USING (doc_id) "
            "WHERE s.n_chunks >= 0")
        if delete_missing:
            yield from self._db.execute(
                "SELECT d.doc_id, d.n_chunks, 0 FROM docs d LEFT JOIN seen s USING (doc_id) "
                "WHERE s.doc_id IS NULL")

    def counts(self, delete_missing: bool) -> SyncCounts:
        """What this run does to the published documents, for the report."""
        one = lambda sql: self._db.execute(sql).fetchone()[0]  # noqa: E731
        return SyncCounts(
            added=one("SELECT count(*) FROM seen s WHERE n_chunks > 0 AND NOT EXISTS "
                      "(SELECT 1 FROM docs d WHERE d.doc_id = s.doc_id)"),
            updated=one("SELECT count(*) FROM seen s JOIN docs d USING (doc_id) "
                        "WHERE s.n_chunks > 0"),
            unchanged=one("SELECT count(*) FROM seen WHERE n_chunks < 0"),
            deleted=one("SELECT count(*) FROM docs d WHERE NOT EXISTS (SELECT 1 FROM seen s "
                        "WHERE s.doc_id = d.doc_id)") if delete_missing else 0,
            failed=one("SELECT count(*) FROM seen WHERE n_chunks = 0"),
        )

    def expected_chunks(self, replace_all: bool, delete_missing: bool) -> int:
        """How many vectors the target must hold once this run is published."""
        new = self._db.execute("SELECT coalesce(sum(n_chunks), 0) FROM seen WHERE n_chunks > 0"
                               ).fetchone()[0]
        if replace_all:
            return new
        kept_filter = "IN (SELECT doc_id FROM seen WHERE n_chunks < 0)" if delete_missing else \
            "NOT IN (SELECT doc_id FROM seen WHERE n_chunks >= 0)"
        kept = self._db.execute(f"SELECT coalesce(sum(n_chunks), 0) FROM docs WHERE doc_id "
                                f"{kept_filter}").fetchone()[0]
        return new + kept

    def commit(self, published: Published, replace_all: bool, delete_missing: bool) -> None:
        """Make this run's documents (``load_seen``) the published state, atomically."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if replace_all:
                db.execute("DELETE FROM docs")
            elif delete_missing:
                db.execute("DELETE FROM docs WHERE doc_id NOT IN (SELECT doc_id FROM seen)")
            # a document that could not be embedded is forgotten, so the next run retries it
            db.execute("DELETE FROM docs WHERE doc_id IN (SELECT doc_id FROM seen WHERE n_chunks = 0)")
            db.execute("INSERT OR REPLACE INTO docs SELECT doc_id, hash, n_chunks FROM seen "
                       "WHERE n_chunks > 0")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('published', ?)",
                       (json.dumps(published.__dict__),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
