"""Read back what a run wrote, with the stores' own clients (the product only says where)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.job.load import load_job
from pipeline.sinks.parquet import CURRENT


def milvus_rows(uri: Path | str, collection: str) -> dict[str, dict]:
    """Every row of a collection keyed by primary key; a duplicate key fails loudly."""
    from pymilvus import MilvusClient

    client = MilvusClient(str(uri))
    try:
        client.load_collection(collection)
        it = client.query_iterator(collection, batch_size=1000, filter='pk != ""',
                                   output_fields=["pk", "doc_id", "chunk_index", "vector"])
        rows: dict[str, dict] = {}
        while batch := it.next():
            for r in batch:
                assert r["pk"] not in rows, f"duplicate primary key {r['pk']}"
                rows[r["pk"]] = {"doc_id": r["doc_id"], "chunk_index": r["chunk_index"],
                                 "vector": np.asarray(r["vector"], dtype=np.float32)}
        it.close()
        count = client.query(collection, filter="", output_fields=["count(*)"],
                             consistency_level="Strong")[0]["count(*)"]
        assert count == len(rows), f"count(*) {count} != rows read {len(rows)}"
        return rows
    finally:
        client.close()


def milvus_collections(uri: Path | str) -> list[str]:
    """The names of every collection in the Milvus at ``uri``, sorted."""
    from pymilvus import MilvusClient

    client = MilvusClient(str(uri))
    try:
        return sorted(client.list_collections())
    finally:
        client.close()


def published_version(root: Path) -> Path | None:
    """The Parquet version directory that ``root``'s CURRENT pointer names; None without one."""
    pointer = root / CURRENT
    return root / json.loads(pointer.read_text())["version"] if pointer.exists() else None


def parquet_rows(root: Path) -> dict[str, dict]:
    """The published version's rows, keyed by primary key; a duplicate key fails loudly."""
    directory = published_version(root)
    assert directory is not None, f"{root}: nothing published"
    rows: dict[str, dict] = {}
    for f in sorted(directory.glob("*.parquet")):
        t = pq.read_table(f)
        for pk, doc, idx, vec in zip(t["pk"].to_pylist(), t["doc_id"].to_pylist(),
                                     t["chunk_index"].to_pylist(), t["vector"].to_pylist()):
            assert pk not in rows, f"duplicate primary key {pk} in {f.name}"
            rows[pk] = {"doc_id": doc, "chunk_index": idx,
                        "vector": np.asarray(vec, dtype=np.float32)}
    return rows


def stored_rows(job: Path) -> dict[str, dict]:
    """What the job's sink serves now: the rows under its Milvus alias, or in its published
    Parquet version."""
    loaded = load_job(job)
    where = loaded.sink.local_path(loaded.resolve)  # None: a server
    if loaded.sink.kind == "parquet":
        return parquet_rows(where)
    return milvus_rows(where or loaded.sink.uri, loaded.collection_name)


def assert_same_store(a: dict[str, dict], b: dict[str, dict], min_cos: float = 0.9999) -> None:
    """The same primary keys, and each key's vectors within ``min_cos`` of each other."""
    assert a.keys() == b.keys()
    for pk in a:
        cos = float(np.dot(a[pk]["vector"], b[pk]["vector"]))
        assert cos >= min_cos, f"{pk}: cosine {cos}"


def milvus_state_in_subprocess(uri: Path, alias: str) -> tuple[dict[str, dict], str, list[str]]:
    """(rows through the alias, the alias's collection, all collections), read by another
    process: Milvus Lite keeps a db open in a process until it exits, so a test that lets a
    child process write must not open the db itself."""
    import pickle
    import subprocess
    import sys

    code = (  # noqa: UP031 - %r quotes the paths for the child's source
        "import pickle, sys\n"
        "sys.path.insert(0, %r)\n"
        "from helpers.rows import milvus_rows\n"
        "from pymilvus import MilvusClient\n"
        "rows = milvus_rows(%r, %r)\n"
        "c = MilvusClient(%r)\n"
        "out = (rows, c.describe_alias(%r)['collection_name'], sorted(c.list_collections()))\n"
        "c.close()\n"
        "sys.stdout.buffer.write(pickle.dumps(out))\n"
    ) % (str(Path(__file__).parents[1]), str(uri), alias, str(uri), alias)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120)
    return pickle.loads(done.stdout)
