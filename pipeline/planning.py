"""Sort chunks by exact token count, pack them into token-budget batches, spill to disk.

The plan is the contract between the two phases of a run. Each *window* of chunks is
sorted and cut into batches with deterministic ids (``w00003-b000012``) and written as one
Parquet file holding the token ids themselves, so executing (and resuming) never
re-tokenizes and always sees the same batches in the same order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, file_digest, seal, unseal
from pipeline.errors import JobError

PLAN_SCHEMA = pa.schema([
    ("batch_id", pa.string()),
    ("pk", pa.string()),
    ("doc_id", pa.string()),
    ("chunk_index", pa.int32()),
    ("start", pa.int64()),
    ("end", pa.int64()),
    ("n_tokens", pa.int32()),
    ("token_ids", pa.list_(pa.int32())),
    ("doc_hash", pa.string()),
    ("text", pa.string()),
    ("metadata", pa.string()),
    ("source", pa.string()),
])
# chunk counts in a window's document records that are not counts
SKIPPED_UNCHANGED = -1  # the published generation holds this exact content
DUPLICATE = -2  # a later row with an id already seen (dead-lettered)
UNREADABLE = -3  # a row that named this id but could not be read (kept as published)
_WINDOW_RE = re.compile(r"^window-(\d{5})\.parquet$")
_DOCS_RE = re.compile(r"^docs-(\d{5})\.parquet$")
COMPLETE_MARKER = "_COMPLETE"  # written by earlier versions; the manifest replaces it
MANIFEST = "manifest.json"


def make_batch_id(window: int, index: int) -> str:
    return f"w{window:05d}-b{index:06d}"


def window_of(batch_id: str) -> int:
    return int(batch_id[1:6])


def pack_batches(sorted_lengths: np.ndarray, token_budget: int, max_batch_size: int
                 ) -> list[tuple[int, int]]:
    """Greedy cut of ascending lengths into [start, end) runs whose padded size fits the budget.

    With lengths sorted, a batch's padded size is ``rows * last_length``; a chunk longer than
    the budget still gets a batch of its own (the executor's OOM back-off handles it).
    """
    bounds: list[tuple[int, int]] = []
    start = 0
    for i, n in enumerate(sorted_lengths.tolist()):
        rows = i - start + 1
        if rows > 1 and (rows * n > token_budget or rows > max_batch_size):
            bounds.append((start, i))
            start = i
    if start < len(sorted_lengths):
        bounds.append((start, len(sorted_lengths)))
    return bounds


@dataclass
class WindowStats:
    """What one plan window holds; summed over windows for the job's totals."""

    window: int
    doc_start: int
    doc_end: int
    docs: int
    chunks: int
    tokens: int
    padded_tokens: int
    batches: int
    unreadable_rows: int = 0  # rows of the window's range that could not be read nor named
    rejected_rows: int = 0  # rows of the window's range that did not become documents

    def to_meta(self) -> dict[bytes, bytes]:
        return {b"embed_job.window": json.dumps(self.__dict__).encode()}

    @classmethod
    def from_meta(cls, meta: dict[bytes, bytes]) -> WindowStats:
        return cls(**json.loads(meta[b"embed_job.window"]))


@dataclass
class PlannedBatch:
    batch_id: str
    table: pa.Table

    @property
    def token_ids(self) -> list[list[int]]:
        return self.table.column("token_ids").to_pylist()

    @property
    def n_tokens(self) -> int:
        return int(pc.sum(self.table.column("n_tokens")).as_py())

    @property
    def padded_tokens(self) -> int:
        return self.table.num_rows * int(pc.max(self.table.column("n_tokens")).as_py())


@dataclass
class PlanRow:
    pk: str
    doc_id: str
    chunk_index: int
    start: int
    end: int
    token_ids: np.ndarray
    doc_hash: str
    text: str | None
    metadata: str
    source: str


@dataclass
class WindowBuilder:
    """Collects the chunks of consecutive documents until a window is full."""

    window: int
    doc_start: int
    rows: list[PlanRow] = field(default_factory=list)
    doc_records: list[tuple[str, str, int]] = field(default_factory=list)
    tokens: int = 0
    rejected: list[str] = field(default_factory=list)  # ids of rows present but unreadable
    unreadable_rows: int = 0  # rows that could not be read nor named

    @property
    def docs(self) -> int:
        return len(self.doc_records)

    def add(self, rows: list[PlanRow], record: tuple[str, str, int]) -> None:
        """A document's rows and its (id, hash, chunk count) record; -1 chunks = unchanged."""
        self.rows.extend(rows)
        self.doc_records.append(record)
        self.tokens += sum(len(r.token_ids) for r in rows)

    def records(self) -> list[tuple[str, str, int]]:
        """The document records to store: one per document in reading order (resume
        compares them position by position), then the rejected rows' ids."""
        return self.doc_records + [(d, "", UNREADABLE) for d in self.rejected]

    def build(self, token_budget: int, max_batch_size: int) -> tuple[pa.Table, WindowStats]:
        lengths = np.fromiter((len(r.token_ids) for r in self.rows), dtype=np.int64,
                              count=len(self.rows))
        order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order]
        bounds = pack_batches(sorted_lengths, token_budget, max_batch_size)
        batch_ids = np.empty(len(self.rows), dtype=object)
        padded = 0
        for b, (s, e) in enumerate(bounds):
            batch_ids[s:e] = make_batch_id(self.window, b)
            padded += (e - s) * int(sorted_lengths[e - 1])
        rows = [self.rows[i] for i in order.tolist()]
        offsets = np.concatenate([[0], np.cumsum(sorted_lengths)]).astype(np.int32)
        flat = np.concatenate([r.token_ids for r in rows]) if rows else np.empty(0, np.int32)
        token_col = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                             pa.array(flat.astype(np.int32), pa.int32()))
        table = pa.Table.from_arrays([
            pa.array(batch_ids.tolist(), pa.string()),
            pa.array([r.pk for r in rows], pa.string()),
            pa.array([r.doc_id for r in rows], pa.string()),
            pa.array([r.chunk_index for r in rows], pa.int32()),
            pa.array([r.start for r in rows], pa.int64()),
            pa.array([r.end for r in rows], pa.int64()),
            pa.array(sorted_lengths.astype(np.int32), pa.int32()),
            token_col,
            pa.array([r.doc_hash for r in rows], pa.string()),
            pa.array([r.text for r in rows], pa.string()),
            pa.array([r.metadata for r in rows], pa.string()),
            pa.array([r.source for r in rows], pa.string()),
        ], schema=PLAN_SCHEMA)
        stats = WindowStats(window=self.window, doc_start=self.doc_start,
                            doc_end=self.doc_start + self.docs, docs=self.docs,
                            chunks=len(rows), tokens=int(sorted_lengths.sum()),
                            padded_tokens=padded, batches=len(bounds),
                            unreadable_rows=self.unreadable_rows,
                            rejected_rows=len(self.rejected) + self.unreadable_rows)
        return table, stats


class PlanStore:
    """The plan directory: one Parquet file per window (and one of its documents), committed
    by a sealed manifest that names each window's files with their sizes and checksums.

    Only the manifest says what the plan holds: a window file it does not name is ignored, a
    named one that is missing or damaged is found by ``damaged`` before it is trusted.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._manifest: dict[str, Any] | None = None

    # -- the manifest -----------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def _read(self) -> dict[str, Any]:
        if self._manifest is None:
            if self.manifest_path.exists():
                body = unseal(self.manifest_path.read_bytes())
                if body is None:
                    raise JobError(f"{self.manifest_path}: plan manifest is corrupt (checksum "
                                   f"mismatch); run with --restart to plan again")
                self._manifest = body
            else:
                self._manifest = self._from_legacy_files()
        return self._manifest

    def _write(self, body: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_bytes(seal(body))
        self._manifest = body

    def _from_legacy_files(self) -> dict[str, Any]:
        """A plan written before manifests: its window files as they are now."""
        body: dict[str, Any] = {"windows": [], "complete": False, "source_files": None}
        if not self.dir.exists():
            return body
        listed = sorted(int(m.group(1)) for p in self.dir.iterdir()
                        if (m := _WINDOW_RE.match(p.name)))
        for w in listed:
            if not self.docs_path(w).exists():
                break
            stats = WindowStats.from_meta(pq.read_schema(self.window_path(w)).metadata)
            body["windows"].append(self._entry(stats))
        body["complete"] = (self.dir / COMPLETE_MARKER).exists() and \
            len(body["windows"]) == len(listed)
        return body

    def _entry(self, stats: WindowStats) -> dict[str, Any]:
        files = {kind: [path.stat().st_size, file_digest(path)]
                 for kind, path in (("window", self.window_path(stats.window)),
                                    ("docs", self.docs_path(stats.window)))}
        return {"stats": asdict(stats), "files": files}

    # -- reading ------------------------------------------------------------------------------

    def window_path(self, window: int) -> Path:
        return self.dir / f"window-{window:05d}.parquet"

    def docs_path(self, window: int) -> Path:
        return self.dir / f"docs-{window:05d}.parquet"

    def windows(self) -> list[int]:
        return [e["stats"]["window"] for e in self._read()["windows"]]

    def stats(self, window: int) -> WindowStats:
        entry = next(e for e in self._read()["windows"] if e["stats"]["window"] == window)
        return WindowStats(**entry["stats"])

    def all_stats(self) -> list[WindowStats]:
        return [WindowStats(**e["stats"]) for e in self._read()["windows"]]

    @property
    def complete(self) -> bool:
        return bool(self._read()["complete"])

    @property
    def source_files(self) -> list[str] | None:
        """The files the plan was read from (None: not recorded, or not a file source)."""
        return self._read().get("source_files")

    def damaged(self, done: Callable[[int], bool]) -> tuple[int, str] | None:
        """The first window whose files are missing or differ from what the manifest says,
        and why. A window not yet done is checked byte for byte (it is about to be read
        anyway); a done one by size, except its document records, which publishing reads."""
        for entry in self._read()["windows"]:
            w = entry["stats"]["window"]
            for kind, path in (("window", self.window_path(w)), ("docs", self.docs_path(w))):
                size, digest = entry["files"][kind]
                if not path.exists():
                    return w, f"{path.name} is missing"
                if path.stat().st_size != size:
                    return w, f"{path.name} changed size"
                if (kind == "docs" or not done(w)) and file_digest(path) != digest:
                    return w, f"{path.name} is damaged (checksum mismatch)"
        return None

    def doc_records(self, window: int) -> Iterator[tuple[str, str, int]]:
        """Every document the window's source range held: (id, hash, chunk count)."""
        t = pq.read_table(self.docs_path(window))
        yield from zip(t["doc_id"].to_pylist(), t["hash"].to_pylist(), t["n_chunks"].to_pylist())

    def all_doc_records(self) -> Iterator[tuple[str, str, int]]:
        for w in self.windows():
            yield from self.doc_records(w)

    def batch_ids(self, window: int) -> list[str]:
        column = pq.read_table(self.window_path(window), columns=["batch_id"])["batch_id"]
        return pc.unique(column).to_pylist()

    def batches(self, window: int) -> Iterator[PlannedBatch]:
        """The window's batches in plan order, one Arrow slice each."""
        table = pq.read_table(self.window_path(window))
        ids = table.column("batch_id").to_numpy(zero_copy_only=False)
        if len(ids) == 0:
            return
        cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(ids)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            yield PlannedBatch(batch_id=str(ids[s]), table=table.slice(s, e - s))

    # -- writing ------------------------------------------------------------------------------

    def start(self, source_files: list[str] | None) -> None:
        """Record what a new plan reads (before its first window)."""
        body = self._read()
        if not body["windows"]:
            self._write({**body, "source_files": source_files})

    def write_window(self, table: pa.Table, stats: WindowStats,
                     doc_records: list[tuple[str, str, int]]) -> None:
        """The document records and the window file, then the manifest entry that commits
        both."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ids, hashes, counts = zip(*doc_records) if doc_records else ((), (), ())
        docs = pa.table({"doc_id": pa.array(ids, pa.string()), "hash": pa.array(hashes, pa.string()),
                         "n_chunks": pa.array(counts, pa.int32())})
        with atomic_path(self.docs_path(stats.window)) as tmp:
            pq.write_table(docs, tmp)
        table = table.replace_schema_metadata(stats.to_meta())
        with atomic_path(self.window_path(stats.window)) as tmp:
            # one row group per ~batch run keeps reads of a single batch cheap
            pq.write_table(table, tmp, row_group_size=8192, compression="zstd")
        body = self._read()
        self._write({**body, "windows": [*body["windows"], self._entry(stats)]})

    def mark_complete(self) -> None:
        self._write({**self._read(), "complete": True})

    def truncate(self, window: int) -> None:
        """Forget windows ``window`` on: the manifest first, then their files."""
        body = self._read()
        self._write({**body, "complete": False,
                     "windows": [e for e in body["windows"] if e["stats"]["window"] < window]})
        (self.dir / COMPLETE_MARKER).unlink(missing_ok=True)
        for p in list(self.dir.iterdir()):
            m = _WINDOW_RE.match(p.name) or _DOCS_RE.match(p.name)
            if m and int(m.group(1)) >= window:
                p.unlink()
