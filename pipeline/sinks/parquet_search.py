"""Reading a published Parquet version: exact search, and the audit's scan. The files are
read batch by batch (for search the best ``k`` kept), so memory holds one batch of vectors,
whatever the generation's size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from pipeline.sinks.base import Hit, ScannedRows, top_k


def _matrix(batch: object) -> np.ndarray:
    column = batch.column("vector")  # type: ignore[attr-defined]
    return column.flatten().to_numpy().reshape(-1, column.type.list_size)


def scan_version(version: Path) -> Iterator[ScannedRows]:
    """Every row's keys and vector, batch by batch."""
    dataset = ds.dataset(version, format="parquet")
    for batch in dataset.to_batches(columns=["pk", "doc_id", "chunk_index", "doc_hash",
                                             "vector"]):
        if batch.num_rows:
            yield ScannedRows(batch.column("pk").to_pylist(), batch.column("doc_id").to_pylist(),
                              batch.column("chunk_index").to_pylist(),
                              batch.column("doc_hash").to_pylist(), _matrix(batch))


def search_version(version: Path, vectors: np.ndarray, k: int, text: bool) -> list[list[Hit]]:
    """The ``k`` highest inner products (cosine: the vectors are unit length) per query."""
    fields = ["doc_id", "chunk_index", "vector"] + (["text"] if text else [])
    dataset = ds.dataset(version, format="parquet")
    if "text" not in dataset.schema.names:
        fields = fields[:3]
    best: list[list[Hit]] = [[] for _ in vectors]
    for batch in dataset.to_batches(columns=fields):
        if batch.num_rows == 0:
            continue
        scores = vectors @ _matrix(batch).T
        ids, chunks = batch.column("doc_id").to_pylist(), batch.column("chunk_index").to_pylist()
        texts = batch.column("text").to_pylist() if "text" in fields else [None] * len(ids)
        for q, rows in enumerate(top_k(scores, k)):
            merged = best[q] + [Hit(ids[i], chunks[i], float(scores[q, i]), texts[i])
                                for i in rows.tolist()]
            best[q] = sorted(merged, key=lambda h: -h.score)[:k]
    return best
