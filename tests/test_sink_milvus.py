"""The Milvus sink against a real Milvus Lite db (and, marked ``server``, a real server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.sinks import DIM, make_batch, milvus_query, milvus_search
from milvus_server import (
    OK_LINE,
    lite_server_process,
    run_scenario,
    run_script_in_namespace,
    wait_healthy,
)
from pymilvus import MilvusException

from pipeline.errors import SinkError, TransientError
from pipeline.sinks.fields import truncate_utf8
from pipeline.sinks.milvus import IndexConfig, MilvusSinkConfig
from pipeline.sinks.milvus import client as milvus_client
from pipeline.sinks.milvus.sink import MilvusSink


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "vectors.db"  # the parent does not exist yet


def open_sink(db: Path, **kwargs: object) -> MilvusSink:
    sink = MilvusSink(db, "chunks", **kwargs)  # type: ignore[arg-type]
    sink.on_write_start(DIM)
    return sink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
def lite_server(tmp_path: Path) -> Iterator[str]:
    """``milvus-lite server`` on localhost: the way several processes share one Lite db."""
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "served.db"),
         "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, uri, timeout=30)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_lite_scenario(db: Path) -> None:
    """Upsert twice without duplicates, exact pk set, text/metadata, search, forget, reopen."""
    run_scenario(lambda: MilvusSink(db, "scenario"))


def test_lite_server_scenario(lite_server: str) -> None:
    run_scenario(lambda: MilvusSink(lite_server, "scenario"))


def test_lite_behind_a_uri_gets_the_lite_index_check(lite_server: str) -> None:
    sink = MilvusSink(lite_server, "chunks", index=IndexConfig(type="IVF_PQ"))
    with pytest.raises(SinkError, match="'IVF_PQ' is not built by Milvus Lite"):
        sink.on_write_start(DIM)
    assert sink.is_lite
    sink.close()
    sink = MilvusSink(lite_server, "chunks")
    sink.on_write_start(DIM)
    sink.close()  # a reconnect still goes through the URI
    assert sink.count() == 0 and sink.is_lite
    sink.close()


def test_factory_resolves_a_lite_path(tmp_path: Path) -> None:
    config = MilvusSinkConfig(uri="out/v.db", index=IndexConfig(type="HNSW"))
    sink = config.make(lambda p: tmp_path / p, "jobname", "jobname__abc")
    assert isinstance(sink, MilvusSink)
    assert (sink.uri, sink.collection, sink.alias, sink.is_lite) == (
        str(tmp_path / "out/v.db"), "jobname__abc", "jobname", True)
    uri = "http://example:19530"
    server = MilvusSinkConfig(uri=uri, token="t").make(lambda p: tmp_path / p, "c", "c__x")
    assert isinstance(server, MilvusSink) and not server.is_lite and server.uri == uri


def test_dimension_mismatch_on_reopen(db: Path) -> None:
    open_sink(db).close()
    sink = MilvusSink(db, "chunks")
    with pytest.raises(SinkError) as e:
        sink.on_write_start(DIM * 2)
    assert str(e.value) == (f"milvus {db} collection 'chunks': vector dimension {DIM} "
                            f"!= job dimension {DIM * 2}")
    sink.close()


def test_other_fields_on_reopen(db: Path) -> None:
    open_sink(db, store_text=True).close()
    sink = MilvusSink(db, "chunks", store_text=False)
    with pytest.raises(SinkError, match="unexpected text"):
        sink.on_write_start(DIM)
    sink.close()


def test_other_metric_on_reopen(db: Path) -> None:
    open_sink(db).close()
    sink = MilvusSink(db, "chunks", index=IndexConfig(metric="L2"))
    with pytest.raises(SinkError, match="index metric COSINE != job metric L2"):
        sink.on_write_start(DIM)
    sink.close()


@pytest.mark.parametrize("kind", ["IVF_PQ", "DISKANN", "SCANN"])
def test_index_lite_does_not_build(db: Path, kind: str) -> None:
    with pytest.raises(SinkError, match=f"index type '{kind}' is not built by Milvus Lite") as e:
        MilvusSink(db, "chunks", index=IndexConfig(type=kind))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["HNSW", "IVF_FLAT", "FLAT"])
def test_index_lite_builds(db: Path, kind: str) -> None:
    sink = open_sink(db, index=IndexConfig(type=kind, metric="IP"))
    sink.write(make_batch("b0", 0, 12))
    sink.on_write_complete()
    batch = make_batch("b0", 0, 12)
    assert milvus_search(sink, batch.vectors[7], limit=2)[0][0] == "pk7"
    sink.close()


def test_lite_path_must_end_in_db(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="must end in .db"):
        MilvusSink(tmp_path / "vectors", "chunks")


@pytest.mark.parametrize(("text", "stored_bytes"), [
    ("é" * 40_000, 65_534),             # 2-byte chars: 32,767 fit
    ("a" + "😀" * 20_000, 65_533),      # 4-byte chars after 1 byte: 16,383 fit
    ("short é", len("short é".encode())),
])
def test_text_truncated_at_a_char_boundary(db: Path, text: str, stored_bytes: int) -> None:
    assert len(truncate_utf8(text).encode()) == stored_bytes
    batch = make_batch("b0", 0, 1)
    batch.texts = [text]
    sink = open_sink(db)
    sink.write(batch)
    stored = next(milvus_query(sink, 'pk == "pk0"', fields=("text",)))["text"]
    assert len(stored.encode()) == stored_bytes and text.startswith(stored)
    sink.close()


def test_metadata_round_trip(db: Path) -> None:
    batch = make_batch("b0", 0, 2)
    batch.metadata = [{"title": "Ünïcødé 中文", "n": 3, "x": 1.5, "list": [1, "a", None],
                       "deep": {"a": {"b": [True, False]}}, "np": np.int64(7)}, {}]
    sink = open_sink(db)
    sink.write(batch)
    rows = {r["pk"]: r["metadata"] for r in milvus_query(sink, fields=("pk", "metadata"))}
    assert rows["pk0"] == {**batch.metadata[0], "np": 7}
    assert rows["pk1"] == {}
    sink.close()


def test_bad_vectors_are_refused(db: Path) -> None:
    sink = open_sink(db)
    batch = make_batch("b0", 0, 3)
    batch.vectors[1, 2] = np.nan
    with pytest.raises(SinkError, match="batch b0: vectors contain NaN"):
        sink.write(batch)
    with pytest.raises(SinkError, match=r"shape \(3, 4\), expected \(3, 8\)"):
        sink.write(make_batch("b1", 0, 3, dim=4))
    assert sink.count() == 0
    sink.close()


def test_store_text_off(db: Path) -> None:
    sink = open_sink(db, store_text=False)
    batch = make_batch("b0", 0, 4)
    batch.texts = None
    assert sink.write(batch) == ["b0"]
    assert set(next(milvus_query(sink, fields=("*",)))) == {
        "pk", "doc_id", "chunk_index", "doc_hash", "metadata", "vector"}
    sink.close()


def test_db_in_use_by_another_process(db: Path) -> None:
    db.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            client = MilvusClient({str(db)!r})
            print("holding", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        sink = MilvusSink(db, "chunks")
        with pytest.raises(SinkError, match="in use by another process") as e:
            sink.on_write_start(DIM)
        assert "\n" not in str(e.value) and "milvus-lite server" in str(e.value)
    finally:
        holder.communicate("", timeout=30)


def test_unreachable_server_is_transient() -> None:
    sink = MilvusSink(f"http://127.0.0.1:{free_port()}", "chunks")
    with pytest.raises(TransientError, match="connect"):
        sink.on_write_start(DIM)


def test_a_server_that_stops_answering_fails_each_call_in_time(tmp_path: Path) -> None:
    """pymilvus waits forever unless a call has a deadline; every call the sink makes gets the
    connection's, so a server that stops answering (here: stopped by SIGSTOP) gives each call
    a TransientError the runner retries, never a hang."""
    with lite_server_process(tmp_path / "served") as (uri, server):
        sink = MilvusSink(uri, "chunks", timeout=2.0)
        sink.on_write_start(DIM)
        sink.write(make_batch("b0", 0, 10))
        os.kill(server.pid, signal.SIGSTOP)
        calls = {"has_collection": lambda: sink.on_write_start(DIM), "flush": sink.on_write_complete,
                 "upsert": lambda: sink.write(make_batch("b1", 10, 5)), "count": sink.count}
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(TransientError, match="(?i)deadline|timed out|timeout"):
                call()
            assert time.monotonic() - started < 20, f"{name} was not bounded by the deadline"
        os.kill(server.pid, signal.SIGCONT)
        assert sink.count() == 10  # the server answers again: nothing was lost
        sink.close()


@pytest.mark.server
def test_server_scenario() -> None:
    """The same scenario against a real Milvus 2.3 server in an isolated network namespace."""
    run_script_in_namespace(Path(__file__).with_name("milvus_server.py"), OK_LINE, timeout=150)



_LITE_COUNT = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from helpers.sinks import DIM, make_batch
from pipeline.sinks.milvus.sink import MilvusSink
sink = MilvusSink({db!r}, "chunks")
sink.on_write_start(DIM)
if {write}:
    sink.write(make_batch("b0", 0, 30))
    sink.on_write_complete()
print("rows", sink.count())
sink.close()
"""


def _lite_process(db: Path, write: bool) -> subprocess.CompletedProcess[str]:
    here = Path(__file__).resolve().parent
    script = _LITE_COUNT.format(tests=str(here), root=str(here.parent),
                                db=str(db), write=write)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def test_a_lite_index_file_cut_short_by_a_kill_is_rebuilt(db: Path) -> None:
    """milvus-lite writes a segment's index file in place: a process killed while writing it
    leaves the file short, and Lite alone then fails to load the collection for good. The
    next process rebuilds the index from the data and reads every row."""
    first = _lite_process(db, write=True)
    assert first.returncode == 0 and "rows 30" in first.stdout, first.stderr
    index_files = list(db.glob("collections/chunks/partitions/*/indexes/*.idx"))
    assert index_files, "Lite wrote no index file: the layout this relies on changed"
    for path in index_files:
        path.write_bytes(path.read_bytes()[:10])  # cut short, as a kill mid-write leaves it
    again = _lite_process(db, write=False)
    assert again.returncode == 0 and "rows 30" in again.stdout, again.stderr
    assert "rebuilding the index of collection 'chunks'" in again.stderr
    assert all(p.stat().st_size > 10 for p in index_files)  # rebuilt


@pytest.mark.parametrize("code, opens", [(2, 2), (1, 1)])
def test_a_lite_server_that_cannot_be_reached_is_tried_again(
        db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int,
        opens: int) -> None:
    """pymilvus rebuilds its shared connection to a Lite server that sat idle for 30 s at the
    next open, and that rebuild was seen to fail once on a loaded host; a failed connect
    (code 2) is tried again, another failure is not. The failure is injected at pymilvus's
    constructor: it cannot be produced on demand."""
    real = milvus_client.MilvusClient
    calls: list[str] = []

    def first_fails(*args: object, **kwargs: object) -> object:
        calls.append(str(args[0]))
        if len(calls) == 1:
            raise MilvusException(code=code, message="Fail connecting to server on "
                                  "127.0.0.1:39443, illegal connection params or server "
                                  "unavailable" if code == 2 else "unexpected")
        return real(*args, **kwargs)

    monkeypatch.setattr(milvus_client, "LITE_OPEN_DELAY_S", 0.01)
    monkeypatch.setattr(milvus_client, "MilvusClient", first_fails)
    connection = milvus_client.MilvusConnection(db, "chunks")
    if opens == 1:
        with pytest.raises(SinkError, match="cannot open the Lite db: unexpected"):
            connection.connect()
    else:
        assert connection.connect().list_collections() == []
        assert "opening the Lite db failed" in caplog.text
        connection.close()
    assert calls == [str(db)] * opens
