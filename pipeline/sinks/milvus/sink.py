"""Milvus sink: upsert rows by deterministic primary key into one collection, a generation
that ``publish`` makes live by pointing the alias at it.

Measured behaviour this relies on (pymilvus 3.0, milvus-lite 3.2, Milvus 2.3): only
``upsert`` is idempotent on a server (``insert`` duplicates keys), so a redone batch is
harmless only through upsert; flush once at the end, since per-batch flushes are slow and
fragment segments; a server reads with Bounded consistency, so every verification read asks
for Strong; Lite drops the target when asked to drop an alias name, and silently takes an
alias with a dropped collection, so neither is ever asked of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from pipeline.errors import SinkError
from pipeline.records import HASH_BUCKETS
from pipeline.secrets import mask_uri
from pipeline.sinks.base import (
    Destination,
    GenerationMark,
    Hit,
    ScannedRows,
    Searchable,
    VectorBatch,
)
from pipeline.sinks.fields import columns
from pipeline.sinks.milvus import CALL_TIMEOUT_S, IndexConfig, TLSConfig, schema
from pipeline.sinks.milvus.client import MilvusConnection

_DELETE_CHUNK = 500  # doc ids per delete: keeps each filter expression small


class MilvusSink(MilvusConnection, Destination, Searchable):
    """Vectors into one Milvus collection, created with an explicit schema when missing."""

    def __init__(self, uri: str | Path, collection: str, *, token: str | None = None,
                 index: IndexConfig | None = None, store_text: bool = True,
                 timeout: float = CALL_TIMEOUT_S, alias: str | None = None,
                 mark: GenerationMark | None = None, secure: bool = False,
                 tls: TLSConfig | None = None) -> None:
        """The connection's arguments (``MilvusConnection``), and: ``alias``, the name
        applications query (``publish`` points it at ``collection``); ``mark``, stored as a
        collection property at create, so the destination says who made it."""
        super().__init__(uri, collection, token=token, index=index, timeout=timeout,
                         secure=secure, tls=tls)
        self.alias = alias
        self.mark = mark
        self.store_text = store_text
        self.dimension: int | None = None
        self._loaded = False

    # -- lifecycle ---------------------------------------------------------------------

    def on_write_start(self, dimension: int) -> None:
        self.dimension = dimension
        client = self.connect()
        if self._call("has_collection", client.has_collection, self.collection):
            schema.check_existing(self, dimension, self.store_text)
        else:
            schema.create(self, dimension, self.store_text, self.mark)
            self._loaded = True
        self._ready()

    def write(self, batch: VectorBatch) -> list[str]:
        """Upsert the batch; its id is acknowledged once the call has returned."""
        if len(batch):
            rows = self._rows(batch)
            client = self._ready()
            self._call(f"upsert of batch {batch.batch_id}", client.upsert, self.collection, rows)
        return [batch.batch_id]

    def on_write_complete(self) -> list[str]:
        """One flush for the whole run: seals segments so search is fast and data is persisted."""
        client = self._ready()
        self._call("flush", client.flush, self.collection)
        return []

    def on_write_failed(self, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        super().close()
        self._loaded = False

    # -- generations -------------------------------------------------------------------

    def discard_target(self) -> None:
        """Drop the collection an abandoned build left, unless an alias points at it."""
        client = self.connect()
        if not self._call("has collection", client.has_collection, self.collection):
            return
        if self._call("list aliases", client.list_aliases, self.collection).get("aliases"):
            raise SinkError(f"{self.where}: is published (has an alias) and cannot be rebuilt "
                            f"in place")
        self._call("drop collection", client.drop_collection, self.collection)
        self._loaded = False

    def forget(self, from_window: int, doc_ids: list[str]) -> list[str]:
        """Delete every chunk of these documents; no other batch goes with them."""
        self._delete(doc_ids)
        return []

    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Delete the chunks a changed document no longer has (index >= its new count)."""
        by_count: dict[int, list[str]] = {}
        for doc_id, old_n, new_n in changes:
            if old_n > new_n:
                by_count.setdefault(new_n, []).append(doc_id)
        for new_n, ids in sorted(by_count.items()):
            self._delete(ids, f" and chunk_index >= {new_n}")

    def publish(self) -> None:
        """Point the alias at this collection: one atomic switch for readers."""
        if self.alias is None:
            return
        client = self.connect()
        holder = self.live()
        if holder is None:
            self._call("create alias", client.create_alias, self.collection, self.alias)
        elif holder != self.collection:
            self._call("alter alias", client.alter_alias, self.collection, self.alias)

    def live(self) -> str | None:
        if self.alias is None:
            return None
        client = self.connect()
        if self.alias not in self._call("list aliases", client.list_aliases).get("aliases", []):
            return None
        desc = self._call("describe alias", client.describe_alias, self.alias)
        return str(desc["collection_name"])

    def exists(self, name: str) -> bool:
        client = self.connect()
        return bool(self._call("has collection", client.has_collection, name))

    def mark_of(self, name: str) -> GenerationMark | None:
        if not self.exists(name):
            return None
        desc = self._call("describe collection", self.connect().describe_collection, name)
        return GenerationMark.from_json((desc.get("properties") or {}).get(schema.MARK_PROPERTY))

    def clash(self) -> str | None:
        """Lite drops the *target* when asked to drop an alias name, and an alias cannot take
        a name a collection has: a real collection under the alias name is refused."""
        if self.alias is None:
            return None
        client = self.connect()
        if self.alias in self._call("list collections", client.list_collections):
            return (f"milvus {mask_uri(self.uri)}: a collection named {self.alias!r} exists; the job "
                    f"publishes under that name as an alias — rename that collection, or set "
                    f"sink.collection to another name")
        return None

    def rows_of(self, name: str) -> Iterator[tuple[str, int, str]]:
        client = self.connect()
        what = f"query of {name!r}"
        self.load(name)
        it = self._call(what, client.query_iterator, name, batch_size=5000, filter="",
                        output_fields=["doc_id", "chunk_index", "doc_hash"],
                        consistency_level="Strong")
        try:
            while rows := self._call(what, it.next):
                for row in rows:
                    yield row["doc_id"], int(row["chunk_index"]), row["doc_hash"]
        finally:
            it.close()

    def _published(self, generation: str | None) -> str:
        """``generation``, or the collection the alias points at now, loaded (a reopened Lite
        db starts released)."""
        name = generation or self.live()
        if name is None:
            raise SinkError(f"milvus {mask_uri(self.uri)}: alias {self.alias!r} does not exist: "
                            f"nothing published yet")
        self.load(name)
        return name

    def scan(self, generation: str | None = None) -> Iterator[ScannedRows]:
        name, client = self._published(generation), self.connect()
        what = f"query of {name!r}"
        it = self._call(what, client.query_iterator, name, batch_size=2000, filter="",
                        output_fields=["pk", "doc_id", "chunk_index", "doc_hash", "vector"],
                        consistency_level="Strong")
        try:
            while rows := self._call(what, it.next):
                yield ScannedRows([r["pk"] for r in rows], [r["doc_id"] for r in rows],
                                  [int(r["chunk_index"]) for r in rows],
                                  [r["doc_hash"] for r in rows],
                                  np.asarray([r["vector"] for r in rows], np.float32))
        finally:
            it.close()

    def search(self, vectors: np.ndarray, k: int, generation: str | None = None
               ) -> list[list[Hit]]:
        """Through the index, on the collection the alias points at now (or ``generation``)."""
        name, client = self._published(generation), self.connect()
        kind = self.index.type.upper()
        params = ({"params": {"ef": max(k, 64)}} if kind.startswith("HNSW")
                  else {"params": {"nprobe": 16}} if kind.startswith("IVF") else {})
        fields = ["doc_id", "chunk_index"] + (["text"] if self.store_text else [])
        res = self._call("search", client.search, name, data=vectors.tolist(), limit=k,
                         output_fields=fields, search_params=params,
                         consistency_level="Strong")
        sign = -1.0 if self.index.metric == "L2" else 1.0  # a distance: nearer is smaller
        return [[Hit(h["entity"]["doc_id"], int(h["entity"]["chunk_index"]),
                     sign * float(h["distance"]), h["entity"].get("text")) for h in hits]
                for hits in res]

    def drop(self, name: str) -> None:
        """Drop a collection this job recorded creating; never one an alias points at (Lite
        would silently take the alias with it)."""
        client = self.connect()
        if not self.exists(name):
            return
        if self._call("list aliases", client.list_aliases, name).get("aliases"):
            raise SinkError(f"milvus {mask_uri(self.uri)}: collection {name!r} has an alias; not "
                            f"dropped")
        self._call("drop collection", client.drop_collection, name)

    def count_by_bucket(self) -> dict[str, int]:
        return {bucket: self._count(f'doc_hash like "{bucket}%"') for bucket in HASH_BUCKETS}

    def count(self) -> int:
        """Rows visible now, every acknowledged write included (Strong consistency)."""
        return self._count("")

    # -- rows and calls ----------------------------------------------------------------

    def _ready(self) -> MilvusClient:
        """The client, with the collection loaded (a reopened Lite db starts released)."""
        client = self.connect()
        if not self._loaded:
            self.load(self.collection)
            self._loaded = True
        return client

    def _count(self, filter: str) -> int:
        client = self._ready()
        res = self._call("count", client.query, self.collection, filter=filter,
                         output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    def _delete(self, doc_ids: list[str], condition: str = "") -> None:
        """Delete the rows of these documents (and ``condition``), a chunk of ids at a time."""
        client = self._ready()
        for start in range(0, len(doc_ids), _DELETE_CHUNK):
            literal = json.dumps(doc_ids[start:start + _DELETE_CHUNK], ensure_ascii=False)
            self._call("delete", client.delete, self.collection,
                       filter=f"doc_id in {literal}{condition}", consistency_level="Strong")

    def _rows(self, batch: VectorBatch) -> list[dict[str, Any]]:
        values = columns(batch, self.dimension or 0, self.store_text,
                         f"{self.where}: batch {batch.batch_id}")
        rows = []
        for i, pk in enumerate(batch.pks):
            row = {"pk": pk, "doc_id": batch.doc_ids[i], "chunk_index": int(batch.chunk_indexes[i]),
                   "doc_hash": batch.doc_hashes[i], "metadata": json.loads(values.metadata[i]),
                   "vector": values.vectors[i]}
            if values.texts is not None:
                row["text"] = values.texts[i]
            rows.append(row)
        return rows
