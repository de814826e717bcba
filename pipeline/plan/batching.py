"""Sort chunks by exact token count and pack them into token-budget batches.

A batch's cost on the accelerator is its padded size, rows x longest row: with the rows of a
window sorted by length, greedy cuts keep that close to the tokens it really holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import UNREADABLE, make_batch_id, padded_size

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
        if rows > 1 and (padded_size(rows, n) > token_budget or rows > max_batch_size):
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
        return padded_size(self.table.num_rows, int(pc.max(self.table.column("n_tokens")).as_py()))


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
            padded += padded_size(e - s, int(sorted_lengths[e - 1]))
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
