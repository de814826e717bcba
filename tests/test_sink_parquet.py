"""The Parquet sink writing real files: naming, atomicity, schema, grouping, rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.sinks import DIM, make_batch

from pipeline.atomic import atomic_path, atomic_write_bytes
from pipeline.errors import SinkError
from pipeline.sinks.parquet import ParquetSink, ParquetSinkConfig

META = {"model": "tiny", "fingerprint": "abc123"}


def batches(n: int = 5, rows: int = 4) -> list:
    return [make_batch(f"b{i:03d}", i * rows, rows) for i in range(n)]


def open_sink(out: Path, rows_per_file: int = 8, **kwargs: object) -> ParquetSink:
    sink = ParquetSink(out, rows_per_file=rows_per_file, file_metadata=META,
                       **kwargs)  # type: ignore[arg-type]
    sink.on_write_start(DIM)
    return sink


def run(out: Path, rows_per_file: int = 8) -> list[list[str]]:
    sink = open_sink(out, rows_per_file)
    acks = [sink.write(b) for b in batches()]
    acks.append(sink.on_write_complete())
    sink.close()
    return acks


def test_acks_only_when_the_file_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = open_sink(out)
    bs = batches()
    assert sink.write(bs[0]) == []
    assert list(out.iterdir()) == []  # buffered, not durable, not acknowledged
    assert sink.write(bs[1]) == ["b000", "b001"]
    assert sorted(p.name for p in out.iterdir()) == ["part-b000.parquet"]
    assert sink.write(bs[2]) == []
    assert sink.write(bs[3]) == ["b002", "b003"]
    assert sink.write(bs[4]) == []
    assert sink.on_write_complete() == ["b004"]
    assert sink.on_write_complete() == []
    assert sorted(p.name for p in out.iterdir()) == [
        "part-b000.parquet", "part-b002.parquet", "part-b004.parquet"]  # no temp left


def test_a_file_is_streamed_in_row_groups_and_renamed_when_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is one row group, not one file: row groups go to a hidden temp file as they fill,
    the file appears under its name (and its batches are acknowledged) only when finished."""
    import pipeline.sinks.parquet as parquet_sink

    bs = batches(6)
    monkeypatch.setattr(parquet_sink, "ROW_GROUP_BYTES", 1)  # every batch fills a group
    out = tmp_path / "out"
    sink = open_sink(out, rows_per_file=12)
    assert sink.write(bs[0]) == [] and sink.write(bs[1]) == []
    (temp,) = out.iterdir()  # two row groups written, not yet a file
    assert temp.name.startswith(".part-b000.parquet.") and temp.name.endswith(".tmp")
    assert sink.write(bs[2]) == ["b000", "b001", "b002"]
    assert [p.name for p in out.iterdir()] == ["part-b000.parquet"]
    sink.write(bs[3])
    sink.on_write_failed(RuntimeError("the run failed"))  # the open file's temp is removed
    assert [p.name for p in out.iterdir()] == ["part-b000.parquet"]
    sink.close()
    f = pq.ParquetFile(out / "part-b000.parquet")
    assert f.metadata.num_row_groups == 3
    assert f.read().column("pk").to_pylist() == bs[0].pks + bs[1].pks + bs[2].pks


def test_schema_and_contents(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out)
    table = pq.read_table(out / "part-b000.parquet")
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert table.schema.field("chunk_index").type == pa.int32()
    assert table.column_names == ["pk", "doc_id", "chunk_index", "doc_hash", "text", "metadata",
                                  "vector"]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert {k: meta[k] for k in ("model", "fingerprint", "dimension")} == {**META, "dimension": "8"}
    file_meta = pq.ParquetFile(out / "part-b000.parquet").metadata.metadata
    assert json.loads(file_meta[b"batch_ids"]) == ["b000", "b001"]
    b0, b1 = batches()[:2]
    assert table.column("pk").to_pylist() == b0.pks + b1.pks
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(vectors, np.concatenate([b0.vectors, b1.vectors]))
    metadata = [json.loads(m) for m in table.column("metadata").to_pylist()]
    assert metadata == b0.metadata + b1.metadata


def test_rewrite_is_identical_and_adds_no_files(tmp_path: Path) -> None:
    """A resume redoes files under the same names: same bytes, no duplicate rows."""
    out = tmp_path / "out"
    run(out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    sink = open_sink(out)  # resume at b002: the first unacknowledged batch starts a file
    acks = [sink.write(b) for b in batches()[2:]] + [sink.on_write_complete()]
    assert acks == [[], ["b002", "b003"], [], ["b004"]]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert pq.read_table(out).num_rows == 20


def test_failure_discards_the_buffer_and_temps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = open_sink(out)
    sink.write(batches()[0])
    (out / ".part-b000.parquet.123.deadbeef.tmp").write_bytes(b"torn")  # a killed run's
    sink.on_write_failed(RuntimeError("embedder died"))
    assert list(out.iterdir()) == []
    assert sink.on_write_complete() == []  # nothing acknowledged that was not written


def test_stale_temps_swept_at_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".part-b000.parquet.1.cafe.tmp").write_bytes(b"torn")
    open_sink(out)
    assert list(out.iterdir()) == []


def test_store_text_off_and_long_text(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = open_sink(out, rows_per_file=1, store_text=False)
    batch = make_batch("b0", 0, 2)
    batch.texts = None
    assert sink.write(batch) == ["b0"]
    assert "text" not in pq.read_table(out / "part-b0.parquet").column_names
    sink = open_sink(out, rows_per_file=1)
    batch = make_batch("b1", 0, 1)
    batch.texts = ["é" * 40_000]
    sink.write(batch)
    text = pq.read_table(out / "part-b1.parquet").column("text")[0].as_py()
    assert len(text.encode()) == 65_534


def test_bad_batches_are_refused(tmp_path: Path) -> None:
    sink = open_sink(tmp_path / "out")
    with pytest.raises(SinkError, match="cannot name a file"):
        sink.write(make_batch("../evil", 0, 1))
    with pytest.raises(SinkError, match=r"shape \(2, 4\), expected \(2, 8\)"):
        sink.write(make_batch("b0", 0, 2, dim=4))
    batch = make_batch("b0", 0, 2)
    batch.metadata[0]["bad"] = float("nan")
    with pytest.raises(SinkError, match="metadata is not valid JSON"):
        sink.write(batch)


def test_factory(tmp_path: Path) -> None:
    config = ParquetSinkConfig(path="vectors", rows_per_file=3)
    sink = config.make(lambda p: tmp_path / p, "ignored", "v00002-abc", file_metadata=META)
    assert isinstance(sink, ParquetSink)
    assert sink.directory == tmp_path / "vectors" / "v00002-abc"
    assert sink.root == tmp_path / "vectors" and sink.file_prefix == "v00002-"
    assert (sink.rows_per_file, sink.file_metadata) == (3, META)


def test_atomic_helpers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "ledger.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"torn")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["ledger.json"]
