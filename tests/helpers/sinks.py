"""What the sink tests share: batches to write, and reading a sink's target back with the
store's own means (a Milvus query through the sink's client, the Parquet files, the memory
store), so no test relies on a product method that exists only for tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.sinks.base import Destination, VectorBatch
from pipeline.sinks.memory import MemorySink
from pipeline.sinks.parquet import ParquetSink

if TYPE_CHECKING:  # pymilvus only where a Milvus test runs
    from pipeline.sinks.milvus.sink import MilvusSink

DIM = 8
ODD_DOC = 'odd "doc" \\ é 😀\nline'  # quotes, backslash, non-BMP, newline: filter escaping


def make_batch(batch_id: str, start: int, n: int, dim: int = DIM) -> VectorBatch:
    """Rows ``start..start+n``: pk ``pk<i>``, three chunks per doc, doc 1 has an odd id."""
    rng = np.random.default_rng(start)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = range(start, start + n)
    return VectorBatch(
        batch_id=batch_id,
        pks=[f"pk{i}" for i in rows],
        doc_ids=[ODD_DOC if i // 3 == 1 else f"doc{i // 3}" for i in rows],
        chunk_indexes=[i % 3 for i in rows],
        doc_hashes=[f"hash{i // 3}" for i in rows],
        vectors=vectors,
        texts=[f"text {i}" for i in rows],
        metadata=[{"i": i, "tags": ["a", "é"], "nested": {"ok": True, "none": None}}
                  for i in rows],
    )


def milvus_query(sink: MilvusSink, filter: str = "", fields: Sequence[str] = ("pk",),
                 batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Stream the matching rows of the sink's collection (Strong consistency)."""
    client = sink.connect()
    client.load_collection(sink.collection)
    it = client.query_iterator(sink.collection, batch_size=batch_size, filter=filter,
                               output_fields=list(fields), consistency_level="Strong")
    try:
        while rows := it.next():
            yield from rows
    finally:
        it.close()


def milvus_pks(sink: MilvusSink) -> set[str]:
    return {row["pk"] for row in milvus_query(sink)}


def milvus_search(sink: MilvusSink, vector: Sequence[float] | np.ndarray,
                  limit: int = 10) -> list[tuple[str, str, float]]:
    """Nearest rows as (pk, doc_id, distance), best first."""
    kind = sink.index.type.upper()
    params = ({"params": {"ef": max(limit, 64)}} if kind.startswith("HNSW")
              else {"params": {"nprobe": 16}} if kind.startswith("IVF") else {})
    res = sink.connect().search(sink.collection, data=[np.asarray(vector, np.float32).tolist()],
                                limit=limit, output_fields=["pk", "doc_id"], search_params=params,
                                consistency_level="Strong")
    return [(_hit_value(h, "pk"), _hit_value(h, "doc_id"), float(h["distance"])) for h in res[0]]


def _hit_value(hit: dict[str, Any], name: str) -> Any:
    """A search hit's field: in ``entity`` when requested as an output field; the pk's own
    key differs (Lite ``pk``, server ``id``), so fall back to either."""
    entity = hit.get("entity") or {}
    if name in entity:
        return entity[name]
    return hit.get(name, hit.get("id") if name == "pk" else None)


def stored(sink: Destination) -> dict[str, tuple[str, int, str]]:
    """(doc id, chunk index, doc hash) of every vector the sink's target holds, by primary
    key; a key stored twice fails."""
    if isinstance(sink, MemorySink):
        generation = sink.store.generations.get(sink.target)
        rows = [] if generation is None else [
            (pk, r.doc_id, r.chunk_index, r.doc_hash) for pk, r in generation.rows.items()]
    elif isinstance(sink, ParquetSink):
        rows = []
        for f in sorted(sink.directory.glob("*.parquet")):
            t = pq.read_table(f, columns=["pk", "doc_id", "chunk_index", "doc_hash"])
            rows += zip(*(t[c].to_pylist() for c in t.column_names))
    else:
        rows = [(r["pk"], r["doc_id"], r["chunk_index"], r["doc_hash"]) for r in milvus_query(
            sink, fields=("pk", "doc_id", "chunk_index", "doc_hash"))]  # type: ignore[arg-type]
    out: dict[str, tuple[str, int, str]] = {}
    for pk, doc_id, chunk_index, doc_hash in rows:
        assert pk not in out, f"primary key {pk} stored twice"
        out[pk] = (doc_id, int(chunk_index), doc_hash)
    return out
