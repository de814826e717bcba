"""The collection's schema and index: created explicitly when missing, checked when found, so
a collection made by another job, an earlier version or by hand is refused in one line
before any write instead of failing (or mis-storing) at the first upsert."""

from __future__ import annotations

from typing import Any

from pymilvus import DataType, MilvusClient

from pipeline.errors import SinkError
from pipeline.sinks.base import GenerationMark
from pipeline.sinks.fields import MAX_DOC_ID_BYTES, MAX_VARCHAR_BYTES
from pipeline.sinks.milvus.client import MilvusConnection

MARK_PROPERTY = "embed_job.mark"  # collection property: who made the collection
# A server refuses HNSW/IVF without these; Lite ignores them. User params override.
_DEFAULT_INDEX_PARAMS: dict[str, dict[str, int]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}
# chunk_index may be INT64 in a collection made by an earlier version or by hand.
_COMPATIBLE_TYPES = {"chunk_index": {DataType.INT32, DataType.INT64}}


def field_specs(dimension: int, store_text: bool) -> list[tuple[str, DataType, dict[str, Any]]]:
    """(name, type, options) of each field, in the order of the Parquet sink's columns."""
    specs: list[tuple[str, DataType, dict[str, Any]]] = [
        ("pk", DataType.VARCHAR, {"max_length": 64, "is_primary": True}),
        ("doc_id", DataType.VARCHAR, {"max_length": MAX_DOC_ID_BYTES}),
        ("chunk_index", DataType.INT32, {}),
        ("doc_hash", DataType.VARCHAR, {"max_length": 64}),
        ("text", DataType.VARCHAR, {"max_length": MAX_VARCHAR_BYTES}),
        ("metadata", DataType.JSON, {}),
        ("vector", DataType.FLOAT_VECTOR, {"dim": dimension}),
    ]
    return [s for s in specs if store_text or s[0] != "text"]


def create(conn: MilvusConnection, dimension: int, store_text: bool,
           mark: GenerationMark | None) -> None:
    """Create the collection, indexed and loaded, with ``mark`` as a property."""
    client = conn.connect()
    conn.remove_torn_lite_create()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for name, dtype, kwargs in field_specs(dimension, store_text):
        schema.add_field(name, dtype, **kwargs)
    properties = {MARK_PROPERTY: mark.to_json()} if mark is not None else None
    conn._call("create collection", client.create_collection, conn.collection,
               schema=schema, index_params=_index_params(conn, client), properties=properties)


def check_existing(conn: MilvusConnection, dimension: int, store_text: bool) -> None:
    """Refuse a collection whose dimension, fields or index metric differ from the job's;
    index its vector field if nobody did."""
    client = conn.connect()
    desc = conn._call("describe collection", client.describe_collection, conn.collection)
    fields = {f["name"]: f for f in desc["fields"]}
    if "vector" in fields:
        dim = int(fields["vector"].get("params", {}).get("dim", 0))
        if dim != dimension:
            raise SinkError(f"{conn.where}: vector dimension {dim} != job dimension "
                            f"{dimension}")
    problems = _schema_problems(fields, dimension, store_text)
    if problems:
        raise SinkError(f"{conn.where}: fields differ from the job's ({'; '.join(problems)});"
                        " use another collection")
    _check_index(conn, client)


def _schema_problems(fields: dict[str, dict[str, Any]], dimension: int,
                     store_text: bool) -> list[str]:
    specs = {name: (dtype, kwargs) for name, dtype, kwargs in field_specs(dimension, store_text)}
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


def _check_index(conn: MilvusConnection, client: MilvusClient) -> None:
    """Index the vector field if nobody did; refuse a metric other than the job's."""
    names = conn._call("list indexes", client.list_indexes, conn.collection,
                       field_name="vector")
    if not names:
        conn._call("create index", client.create_index, conn.collection,
                   _index_params(conn, client))
        return
    desc = conn._call("describe index", client.describe_index, conn.collection, names[0])
    metric = str(desc.get("metric_type", conn.index.metric)).upper()
    if metric != conn.index.metric:
        raise SinkError(f"{conn.where}: index metric {metric} != job metric "
                        f"{conn.index.metric}")


def _index_params(conn: MilvusConnection, client: MilvusClient) -> Any:
    kind = conn.index.type.upper()
    params = {**_DEFAULT_INDEX_PARAMS.get(kind, {}), **conn.index.params}
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=kind,
                           metric_type=conn.index.metric, params=params)
    return index_params
