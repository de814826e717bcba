"""Milvus sink: upsert rows by deterministic primary key into a Milvus Lite db or a server.

Measured behaviour this relies on (shared/notes/milvus-facts.md): only ``upsert`` is
idempotent on a server (``insert`` duplicates keys), so a redone batch is harmless only
through upsert; flush once at the end, since per-batch flushes are slow and fragment
segments; Lite accepts index types it never builds, so they are checked here; a server reads
with Bounded consistency, so every verification read asks for Strong; a Lite db belongs to
one process.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from pipeline.errors import SinkError, TransientError
from pipeline.records import HASH_BUCKETS
from pipeline.secrets import mask_uri
from pipeline.sinks.base import GenerationMark, Sink, VectorBatch
from pipeline.sinks.fields import (
    MAX_DOC_ID_BYTES,
    MAX_VARCHAR_BYTES,
    checked_vectors,
    metadata_json,
    truncate_utf8,
)
from pipeline.sinks.milvus import IndexConfig, TLSConfig, is_server_uri

T = TypeVar("T")

# What Milvus Lite 3.2 really builds; others are accepted, reported "Finished", never built.
LITE_INDEX_TYPES = ("AUTOINDEX", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "FLAT", "BRUTE_FORCE")
# A server refuses HNSW/IVF without these; Lite ignores them. User params override.
_DEFAULT_INDEX_PARAMS: dict[str, dict[str, int]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}
# chunk_index may be INT64 in a collection made by an earlier version or by hand.
_COMPATIBLE_TYPES = {"chunk_index": {DataType.INT32, DataType.INT64}}
_DELETE_CHUNK = 500
MARK_PROPERTY = "embed_job.mark"  # collection property: who made the collection

_TRANSIENT_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED}
# pymilvus CONNECT_FAILED / server ServiceUnavailable, and RATE_LIMIT.
_TRANSIENT_CODES = {2, 8}
_TRANSIENT_WORDS = ("unavailable", "rate limit", "deadline exceeded", "timed out", "timeout",
                    "connection refused", "retry run out", "not ready")
# What pymilvus reports as a failed connect (code 2) but no retry fixes.
_REFUSED_GRPC = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_CERT_FAILURES = ("certificate_verify_failed", "verification check failed")


class MilvusSink(Sink):
    """Vectors into one Milvus collection, created with an explicit schema when missing."""

    def __init__(self, uri: str | Path, collection: str, *, token: str | None = None,
                 index: IndexConfig | None = None, store_text: bool = True,
                 timeout: float = 60.0, alias: str | None = None,
                 mark: GenerationMark | None = None, secure: bool = False,
                 tls: TLSConfig | None = None) -> None:
        """``uri``: a resolved Lite path ending in .db, or a server URI. ``timeout`` bounds
        each data call, pymilvus's own retries included, so a dead server surfaces as a
        TransientError for the runner to retry instead of hanging. ``alias``: the name
        applications query; ``publish`` points it at ``collection``. ``mark``: stored as a
        collection property at create, so the destination says who made it. ``secure``: TLS
        (implied by https://), with ``tls``'s certificates (paths already resolved)."""
        self.uri = str(uri)
        self.mark = mark
        self.collection = collection
        self.alias = alias
        self.is_lite = not is_server_uri(self.uri)
        self.token = token or ""
        self.secure = secure or self.uri.lower().startswith("https://")
        self.tls = tls or TLSConfig()
        self.index = index or IndexConfig()
        self.store_text = store_text
        self.timeout = timeout
        self.dimension: int | None = None
        self._where = f"milvus {mask_uri(self.uri)} collection {collection!r}"
        self._client: MilvusClient | None = None
        self._loaded = False
        if self.is_lite:
            self._check_lite_target()

    # -- lifecycle ---------------------------------------------------------------------

    def on_write_start(self, dimension: int) -> None:
        self.dimension = dimension
        client = self.connect()
        if self._call("has_collection", client.has_collection, self.collection):
            self._check_existing(client)
        else:
            self._create(client)
        self._ready()

    def write(self, batch: VectorBatch) -> list[str]:
        """Upsert the batch; its id is acknowledged once the call has returned."""
        if len(batch):
            rows = self._rows(batch)
            client = self._ready()
            self._call(f"upsert of batch {batch.batch_id}", client.upsert, self.collection, rows,
                       timeout=self.timeout)
        return [batch.batch_id]

    def on_write_complete(self) -> list[str]:
        """One flush for the whole run: seals segments so search is fast and data is persisted."""
        client = self._ready()
        self._call("flush", client.flush, self.collection)
        return []

    def on_write_failed(self, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection. A Lite db stays open in this process until it exits
        (milvus-lite keeps one server per path), so reopening it here is cheap."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self._loaded = False

    # -- helpers for the pipeline and verification ------------------------------------

    def connect(self) -> MilvusClient:
        """Open the client once; TransientError when a server cannot be reached."""
        if self._client is None:
            self._client = self._open_server() if is_server_uri(self.uri) else self._open_lite()
        return self._client

    def delete_docs(self, doc_ids: Iterable[str]) -> None:
        """Delete every chunk of these documents (a changed document may now have fewer)."""
        client = self._ready()
        ids = list(doc_ids)
        for start in range(0, len(ids), _DELETE_CHUNK):
            literal = json.dumps(ids[start:start + _DELETE_CHUNK], ensure_ascii=False)
            self._call("delete", client.delete, self.collection, filter=f"doc_id in {literal}",
                       consistency_level="Strong", timeout=self.timeout)

    def discard_target(self) -> None:
        """Drop the collection an abandoned build left, unless an alias points at it."""
        client = self.connect()
        if not self._call("has collection", client.has_collection, self.collection):
            return
        if self._call("list aliases", client.list_aliases, self.collection).get("aliases"):
            raise SinkError(f"{self._where}: is published (has an alias) and cannot be rebuilt "
                            f"in place")
        self._call("drop collection", client.drop_collection, self.collection)
        self._loaded = False

    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Delete the chunks a changed document no longer has (index >= its new count)."""
        client = self._ready()
        by_count: dict[int, list[str]] = {}
        for doc_id, old_n, new_n in changes:
            if old_n > new_n:
                by_count.setdefault(new_n, []).append(doc_id)
        for new_n, ids in sorted(by_count.items()):
            for start in range(0, len(ids), _DELETE_CHUNK):
                literal = json.dumps(ids[start:start + _DELETE_CHUNK], ensure_ascii=False)
                self._call("delete", client.delete, self.collection,
                           filter=f"doc_id in {literal} and chunk_index >= {new_n}",
                           consistency_level="Strong", timeout=self.timeout)

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
        return GenerationMark.from_json((desc.get("properties") or {}).get(MARK_PROPERTY))

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
        other = MilvusSink(self.uri, name, token=self.token, index=self.index,
                           timeout=self.timeout)
        other._client = self.connect()
        for row in other.query(fields=("doc_id", "chunk_index", "doc_hash"), batch_size=5000):
            yield row["doc_id"], int(row["chunk_index"]), row["doc_hash"]

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

    def forget(self, from_window: int, doc_ids: list[str]) -> list[str]:
        self.delete_docs(doc_ids)
        return []

    def count_by_bucket(self) -> dict[str, int]:
        client = self._ready()
        out = {}
        for bucket in HASH_BUCKETS:
            res = self._call("count", client.query, self.collection,
                             filter=f'doc_hash like "{bucket}%"', output_fields=["count(*)"],
                             consistency_level="Strong", timeout=self.timeout)
            out[bucket] = int(res[0]["count(*)"])
        return out

    def count(self) -> int:
        """Rows visible now, every acknowledged write included (Strong consistency)."""
        client = self._ready()
        res = self._call("count", client.query, self.collection, filter="",
                         output_fields=["count(*)"], consistency_level="Strong",
                         timeout=self.timeout)
        return int(res[0]["count(*)"])

    def query(self, filter: str = "", fields: Sequence[str] = ("pk",),
              batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Stream matching rows (Strong consistency), fields read by name."""
        client = self._ready()
        it = self._call("query", client.query_iterator, self.collection, batch_size=batch_size,
                        filter=filter, output_fields=list(fields), consistency_level="Strong",
                        timeout=self.timeout)
        try:
            while rows := self._call("query", it.next):
                yield from rows
        finally:
            it.close()

    def existing_pks(self) -> set[str]:
        """Every primary key stored (memory grows with the collection: tests, verification)."""
        return {row["pk"] for row in self.query(fields=("pk",))}

    def search(self, vector: Sequence[float] | np.ndarray,
               limit: int = 10) -> list[tuple[str, str, float]]:
        """Nearest rows as (pk, doc_id, distance), best first."""
        client = self._ready()
        data = [np.asarray(vector, dtype=np.float32).tolist()]
        res = self._call("search", client.search, self.collection, data=data, limit=limit,
                         output_fields=["pk", "doc_id"], search_params=self._search_params(limit),
                         consistency_level="Strong", timeout=self.timeout)
        return [(_hit_value(h, "pk"), _hit_value(h, "doc_id"), float(h["distance"]))
                for h in res[0]]

    # -- connection --------------------------------------------------------------------

    def _check_lite_target(self) -> None:
        if not self.uri.endswith(".db"):
            raise SinkError(f"milvus {self.uri}: a Milvus Lite path must end in .db "
                            "(or use an http:// URI for a server)")
        self._check_lite_index()

    def _check_lite_index(self) -> None:
        if self.index.type.upper() not in LITE_INDEX_TYPES:
            raise SinkError(f"milvus {mask_uri(self.uri)}: index type {self.index.type!r} is not "
                            f"built by Milvus Lite (it would silently search brute force); use "
                            f"one of {', '.join(LITE_INDEX_TYPES)}")

    def _open_lite(self) -> MilvusClient:
        """Open the Lite db; the real cause of a failure is only logged by milvus-lite."""
        path = Path(self.uri)
        if path.exists() and not path.is_dir():
            raise SinkError(f"milvus {self.uri}: exists and is not a Milvus Lite db (a Lite db "
                            "is a directory)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            file = next((p for p in (path.parent, *path.parent.parents)
                         if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file" if file else e.strerror or _one_line(e)
            raise SinkError(f"milvus {self.uri}: cannot create the Lite db's directory "
                            f"{path.parent}: {why}") from None
        with _logged_exceptions("milvus_lite.server_manager") as causes:
            try:
                return MilvusClient(str(path))
            except MilvusException as e:
                causes.append(e)
        cause = causes[0]
        if type(cause).__name__ == "DataDirLockedError":
            raise SinkError(
                f"milvus {self.uri}: the Lite db is in use by another process; stop it, or serve "
                f"the db with `milvus-lite server --data-dir {path} --host 127.0.0.1 --port 19530`"
                " and set sink.uri to http://127.0.0.1:19530") from cause
        raise SinkError(
            f"milvus {self.uri}: cannot open the Lite db: {_one_line(cause)}") from cause

    def client_kwargs(self) -> dict[str, Any]:
        """What ``MilvusClient`` gets besides the server URI. pymilvus verifies the server
        against ``server_pem_path`` alone, and sends a client certificate only together with
        ``ca_pem_path`` (then the CA for the server's certificate too)."""
        kwargs: dict[str, Any] = {"token": self.token, "timeout": self.timeout,
                                  "secure": self.secure}
        if self.tls.server_name:
            kwargs["server_name"] = self.tls.server_name
        if self.tls.client_cert:
            kwargs.update(ca_pem_path=self.tls.ca_cert, client_pem_path=self.tls.client_cert,
                          client_key_path=self.tls.client_key)
        elif self.tls.ca_cert:
            kwargs["server_pem_path"] = self.tls.ca_cert
        return kwargs

    def _open_server(self) -> MilvusClient:
        """Connect; a ``milvus-lite server`` behind the URI gets Lite's index check too."""
        client = self._call("connect", MilvusClient, self.uri, **self.client_kwargs())
        if str(self._call("server version", client.get_server_version)).startswith("milvus_lite"):
            self.is_lite = True
            self._check_lite_index()
        return client

    def _ready(self) -> MilvusClient:
        """The client, with the collection loaded (a reopened Lite db starts released)."""
        client = self.connect()
        if not self._loaded:
            self._call("load", client.load_collection, self.collection, timeout=self.timeout)
            self._loaded = True
        return client

    # -- schema ------------------------------------------------------------------------

    def _field_specs(self) -> list[tuple[str, DataType, dict[str, Any]]]:
        specs: list[tuple[str, DataType, dict[str, Any]]] = [
            ("pk", DataType.VARCHAR, {"max_length": 64, "is_primary": True}),
            ("doc_id", DataType.VARCHAR, {"max_length": MAX_DOC_ID_BYTES}),
            ("chunk_index", DataType.INT32, {}),
            ("doc_hash", DataType.VARCHAR, {"max_length": 64}),
            ("text", DataType.VARCHAR, {"max_length": MAX_VARCHAR_BYTES}),
            ("metadata", DataType.JSON, {}),
            ("vector", DataType.FLOAT_VECTOR, {"dim": self.dimension}),
        ]
        return [s for s in specs if self.store_text or s[0] != "text"]

    def _create(self, client: MilvusClient) -> None:
        self._remove_torn_lite_create()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        for name, dtype, kwargs in self._field_specs():
            schema.add_field(name, dtype, **kwargs)
        properties = {MARK_PROPERTY: self.mark.to_json()} if self.mark is not None else None
        self._call("create collection", client.create_collection, self.collection,
                   schema=schema, index_params=self._index_params(client), timeout=self.timeout,
                   properties=properties)
        self._loaded = True

    def _remove_torn_lite_create(self) -> None:
        """A process killed inside Lite's create_collection leaves a directory holding only
        ``schema.json.tmp``; every later create of that name then fails with 'File exists'.
        The collection never existed (has_collection said so), so the leftover is removed."""
        if not self.is_lite or is_server_uri(self.uri):
            return
        leftover = Path(self.uri) / "collections" / self.collection
        if leftover.is_dir() and not (leftover / "schema.json").exists():
            shutil.rmtree(leftover)

    def _index_params(self, client: MilvusClient) -> Any:
        kind = self.index.type.upper()
        params = {**_DEFAULT_INDEX_PARAMS.get(kind, {}), **self.index.params}
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=kind,
                               metric_type=self.index.metric, params=params)
        return index_params

    def _check_existing(self, client: MilvusClient) -> None:
        desc = self._call("describe collection", client.describe_collection, self.collection)
        fields = {f["name"]: f for f in desc["fields"]}
        if "vector" in fields:
            dim = int(fields["vector"].get("params", {}).get("dim", 0))
            if dim != self.dimension:
                raise SinkError(f"{self._where}: vector dimension {dim} != job dimension "
                                f"{self.dimension}")
        problems = self._schema_problems(fields)
        if problems:
            raise SinkError(f"{self._where}: fields differ from the job's ({'; '.join(problems)});"
                            " use another collection")
        self._check_index(client)

    def _schema_problems(self, fields: dict[str, dict[str, Any]]) -> list[str]:
        specs = {name: (dtype, kwargs) for name, dtype, kwargs in self._field_specs()}
        problems = [f"missing {n}" for n in specs if n not in fields]
        problems += [f"unexpected {n}" for n in fields if n not in specs]
        for name, (dtype, kwargs) in specs.items():
            field = fields.get(name)
            if field is None:
                continue
            if field["type"] not in _COMPATIBLE_TYPES.get(name, {dtype}):
                problems.append(f"{name} is {field['type'].name}, not {dtype.name}")
            if kwargs.get("is_primary") and not field.get("is_primary"):
                problems.append(f"{name} is not the primary key")
        return problems

    def _check_index(self, client: MilvusClient) -> None:
        """Index the vector field if nobody did; refuse a metric other than the job's."""
        names = self._call("list indexes", client.list_indexes, self.collection,
                           field_name="vector")
        if not names:
            self._call("create index", client.create_index, self.collection,
                       self._index_params(client), timeout=self.timeout)
            return
        desc = self._call("describe index", client.describe_index, self.collection, names[0])
        metric = str(desc.get("metric_type", self.index.metric)).upper()
        if metric != self.index.metric:
            raise SinkError(f"{self._where}: index metric {metric} != job metric "
                            f"{self.index.metric}")

    # -- rows and calls ----------------------------------------------------------------

    def _rows(self, batch: VectorBatch) -> list[dict[str, Any]]:
        where = f"{self._where}: batch {batch.batch_id}"
        vectors = checked_vectors(batch.vectors, len(batch), self.dimension or 0, where)
        if self.store_text and batch.texts is None:
            raise SinkError(f"{where}: the batch has no texts but sink.store_text is on")
        metadata = batch.metadata or [{}] * len(batch)
        rows = []
        for i, pk in enumerate(batch.pks):
            row = {"pk": pk, "doc_id": batch.doc_ids[i], "chunk_index": int(batch.chunk_indexes[i]),
                   "doc_hash": batch.doc_hashes[i],
                   "metadata": json.loads(metadata_json(metadata[i], where)),
                   "vector": vectors[i]}
            if self.store_text:
                row["text"] = truncate_utf8(batch.texts[i])  # type: ignore[index]
            rows.append(row)
        return rows

    def _search_params(self, limit: int) -> dict[str, Any]:
        kind = self.index.type.upper()
        if kind.startswith("HNSW"):
            return {"params": {"ef": max(limit, 64)}}
        if kind.startswith("IVF"):
            return {"params": {"nprobe": 16}}
        return {}

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one pymilvus call; its failure becomes a TransientError or a one-line SinkError."""
        try:
            return fn(*args, **kwargs)
        except (MilvusException, grpc.RpcError) as e:
            refused = _refusal(e)
            message = f"{self._where}: {what}: {_described(e)}"
            if refused:
                message += f"; {refused}"
            raise (TransientError(message) if _is_transient(e) else SinkError(message)) from e


def _refusal(e: BaseException) -> str | None:
    """What to fix when the server refused us (credentials, certificate): pymilvus says only
    "illegal connection params or server unavailable", with the gRPC status as the cause."""
    rpc = e if isinstance(e, grpc.RpcError) else e.__cause__
    if not isinstance(rpc, grpc.RpcError):
        return None
    if rpc.code() in _REFUSED_GRPC:
        return ("the server refused the credentials: check sink.token_env, sink.token or the "
                "URI's user:password")
    if any(word in (rpc.details() or "").lower() for word in _CERT_FAILURES):
        return ("the server's TLS certificate did not verify: check sink.tls.ca_cert and "
                "sink.tls.server_name")
    return None


def _is_transient(e: BaseException) -> bool:
    """Worth retrying: unreachable, overloaded, timed out (pymilvus has already retried);
    never refused credentials or an untrusted certificate."""
    if _refusal(e):
        return False
    code = e.code() if isinstance(e, grpc.RpcError) else getattr(e, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code in _TRANSIENT_GRPC
    if code in _TRANSIENT_CODES or getattr(e, "retriable", False):
        return True
    return any(word in _one_line(e).lower() for word in _TRANSIENT_WORDS)


def _one_line(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        text = f"{e.code()}: {e.details()}"
    else:
        text = getattr(e, "message", "") or str(e) or type(e).__name__
    return " ".join(str(text).split())[:500]


def _described(e: BaseException) -> str:
    """``_one_line``, followed by the gRPC failure a pymilvus error wraps (the real reason a
    connect failed: refused, unreachable, TLS handshake)."""
    if isinstance(e.__cause__, grpc.RpcError) and not isinstance(e, grpc.RpcError):
        return f"{_one_line(e)} ({_one_line(e.__cause__)})"
    return _one_line(e)


def _hit_value(hit: dict[str, Any], name: str) -> Any:
    """A search hit's field: in ``entity`` when requested as an output field; the pk's own
    key differs (Lite ``pk``, server ``id``), so fall back to either."""
    entity = hit.get("entity") or {}
    if name in entity:
        return entity[name]
    return hit.get(name, hit.get("id") if name == "pk" else None)


class _Capture(logging.Filter):
    """Keeps the exceptions a logger reports, and drops those records (no stray traceback)."""

    def __init__(self, sink: list[BaseException]) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.sink.append(record.exc_info[1])
            return False
        return True


@contextmanager
def _logged_exceptions(logger_name: str) -> Iterator[list[BaseException]]:
    logger = logging.getLogger(logger_name)
    causes: list[BaseException] = []
    capture = _Capture(causes)
    logger.addFilter(capture)
    try:
        yield causes
    finally:
        logger.removeFilter(capture)
