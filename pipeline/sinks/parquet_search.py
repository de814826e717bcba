"""Exact search of a published Parquet version: the files are scanned batch by batch and
the best ``k`` kept, so memory holds one batch of vectors, whatever the generation's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from pipeline.sinks.base import Hit, top_k


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
        width = batch.schema.field("vector").type.list_size
        matrix = batch.column("vector").flatten().to_numpy().reshape(-1, width)
        scores = vectors @ matrix.T
        ids, chunks = batch.column("doc_id").to_pylist(), batch.column("chunk_index").to_pylist()
        texts = batch.column("text").to_pylist() if "text" in fields else [None] * len(ids)
        for q, rows in enumerate(top_k(scores, k)):
            merged = best[q] + [Hit(ids[i], chunks[i], float(scores[q, i]), texts[i])
                                for i in rows.tolist()]
            best[q] = sorted(merged, key=lambda h: -h.score)[:k]
    return best
