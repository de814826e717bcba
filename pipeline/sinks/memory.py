"""A sink that keeps its vectors in this process: for tests, and as the reference
implementation of ``Sink`` and ``Generations`` (what a sink kind must do, and no more).

A generation is a dict of rows by primary key, named like a Milvus collection
(``<alias>__<fingerprint>``) and updated in place by runs with the same settings; ``publish``
points the alias at it. Every sink of the process shares one ``MemoryStore``, so a resumed
run in the same process finds what it wrote; everything is gone when the process exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import SinkError
from pipeline.job.sections import SinkSettings
from pipeline.records import HASH_BUCKETS
from pipeline.sinks.base import (
    Destination,
    GenerationMark,
    Hit,
    ScannedRows,
    Searchable,
    VectorBatch,
    top_k,
)
from pipeline.sinks.fields import columns


@dataclass(frozen=True)
class StoredRow:
    """One vector and what is stored with it (the Milvus and Parquet sinks' columns)."""

    doc_id: str
    chunk_index: int
    doc_hash: str
    vector: np.ndarray
    text: str | None
    metadata: str  # canonical JSON


@dataclass
class Generation:
    """One generation: its rows, their dimension, and who made it."""

    dimension: int
    mark: GenerationMark | None
    rows: dict[str, StoredRow] = field(default_factory=dict)  # by primary key


@dataclass
class MemoryStore:
    """One destination: generations by name, and the aliases readers look them up by."""

    generations: dict[str, Generation] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


STORE = MemoryStore()  # the process's one destination, where every MemorySink writes


class MemorySinkConfig(SinkSettings):
    """Vectors into this process's memory (``STORE``), published by an alias."""

    kind: Literal["memory"] = "memory"

    def target_name(self, alias: str, fingerprint: str, generation: int) -> str:
        return f"{alias}__{fingerprint}"

    def describe(self, resolve: Callable[[str], Path], target: str, alias: str) -> str:
        return f"memory generation {target} (alias {alias})"

    def identity_where(self) -> str:
        return "memory"

    def location(self, resolve: Callable[[str], Path]) -> str:
        return "this process's memory"

    def published_as(self, alias: str) -> str:
        return f"the alias {alias!r}"

    def warnings(self, job_file: str, from_env: AbstractSet[str], alias: str) -> list[str]:
        return ["sink.kind: memory keeps the vectors in this process only; they are gone when "
                "it exits (for tests and in-process runs; use milvus or parquet)"]

    def make(self, resolve: Callable[[str], Path], alias: str, target: str,
             base: str | None = None, file_metadata: Mapping[str, str] | None = None,
             mark: GenerationMark | None = None) -> MemorySink:
        return MemorySink(target, alias=alias, store_text=self.store_text, mark=mark)


class MemorySink(Destination, Searchable):
    """Generation ``target`` of ``STORE``: every write is durable (acknowledged) at once."""

    def __init__(self, target: str, *, alias: str | None = None, store_text: bool = True,
                 mark: GenerationMark | None = None) -> None:
        self.target = target
        self.alias = alias
        self.store_text = store_text
        self.mark = mark
        self.store = STORE
        self.dimension: int | None = None

    # -- the write protocol ------------------------------------------------------------

    def on_write_start(self, dimension: int) -> None:
        """Create the generation, or check the one there has this dimension."""
        existing = self.store.generations.setdefault(self.target, Generation(dimension, self.mark))
        if existing.dimension != dimension:
            raise SinkError(f"{self._where}: vector dimension {existing.dimension} != job "
                            f"dimension {dimension}")
        self.dimension = dimension

    def write(self, batch: VectorBatch) -> list[str]:
        """Upsert the rows by primary key, so a batch written again replaces itself."""
        assert self.dimension is not None, "on_write_start first"
        values = columns(batch, self.dimension, self.store_text,
                         f"{self._where}: batch {batch.batch_id}")
        rows = self.store.generations[self.target].rows
        for i, pk in enumerate(batch.pks):
            rows[pk] = StoredRow(batch.doc_ids[i], int(batch.chunk_indexes[i]),
                                 batch.doc_hashes[i], values.vectors[i].copy(),
                                 values.texts[i] if values.texts is not None else None,
                                 values.metadata[i])
        return [batch.batch_id]

    # -- generations -------------------------------------------------------------------

    def discard_target(self) -> None:
        if self.target in self.store.aliases.values():
            raise SinkError(f"{self._where}: is published (has an alias) and cannot be rebuilt "
                            f"in place")
        self.store.generations.pop(self.target, None)

    def forget(self, from_window: int, doc_ids: list[str]) -> list[str]:
        """Delete every row of these documents; no other batch goes with them."""
        self._delete(set(doc_ids), 0)
        return []

    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Delete the chunks a changed document no longer has (index >= its new count)."""
        for doc_id, old_n, new_n in changes:
            if old_n > new_n:
                self._delete({doc_id}, new_n)

    def count_by_bucket(self) -> dict[str, int]:
        out = dict.fromkeys(HASH_BUCKETS, 0)
        for row in self._rows().values():
            out[row.doc_hash[:1]] = out.get(row.doc_hash[:1], 0) + 1
        return out

    def count(self) -> int:
        return len(self._rows())

    def publish(self) -> None:
        if self.alias is not None:
            self.store.aliases[self.alias] = self.target

    def live(self) -> str | None:
        return self.store.aliases.get(self.alias) if self.alias is not None else None

    def exists(self, name: str) -> bool:
        return name in self.store.generations

    def mark_of(self, name: str) -> GenerationMark | None:
        generation = self.store.generations.get(name)
        return generation.mark if generation is not None else None

    def rows_of(self, name: str) -> Iterator[tuple[str, int, str]]:
        generation = self.store.generations.get(name)
        for row in list(generation.rows.values()) if generation is not None else []:
            yield row.doc_id, row.chunk_index, row.doc_hash

    def drop(self, name: str) -> None:
        """Remove a generation, never one an alias points at."""
        if name in self.store.aliases.values():
            raise SinkError(f"memory: generation {name!r} has an alias; not dropped")
        self.store.generations.pop(name, None)

    def _live_rows(self, generation: str | None) -> dict[str, StoredRow]:
        name = generation or self.live()
        if name is None or name not in self.store.generations:
            raise SinkError(f"memory alias {self.alias!r}: nothing published yet")
        return self.store.generations[name].rows

    def scan(self, generation: str | None = None) -> Iterator[ScannedRows]:
        rows = self._live_rows(generation)
        if rows:
            yield ScannedRows(list(rows), [r.doc_id for r in rows.values()],
                              [r.chunk_index for r in rows.values()],
                              [r.doc_hash for r in rows.values()],
                              np.stack([r.vector for r in rows.values()]))

    def search(self, vectors: np.ndarray, k: int, generation: str | None = None
               ) -> list[list[Hit]]:
        rows = list(self._live_rows(generation).values())
        if not rows:
            return [[] for _ in vectors]
        scores = vectors @ np.stack([r.vector for r in rows]).T
        return [[Hit(rows[i].doc_id, rows[i].chunk_index, float(scores[q, i]), rows[i].text)
                 for i in best.tolist()] for q, best in enumerate(top_k(scores, k))]

    @property
    def _where(self) -> str:
        return f"memory generation {self.target!r}"

    def _rows(self) -> dict[str, StoredRow]:
        generation = self.store.generations.get(self.target)
        return generation.rows if generation is not None else {}

    def _delete(self, doc_ids: set[str], from_chunk: int) -> None:
        rows = self._rows()
        for pk in [pk for pk, r in rows.items()
                   if r.doc_id in doc_ids and r.chunk_index >= from_chunk]:
            del rows[pk]
