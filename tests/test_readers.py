"""Readers: JSONL, Parquet and datasets sources, good and malformed, on real files."""

from __future__ import annotations

import glob
import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.job.sections import SourceConfig
from pipeline.readers import check_source, read_documents, source_files
from pipeline.records import DeadLetter, Document, content_hash
from pipeline.sinks.fields import metadata_json


@pytest.fixture(autouse=True)
def _datasets_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, and no writes to the user's datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _resolver(base: Path):
    return lambda p: Path(p) if Path(p).is_absolute() else base / p


def read(base: Path, **settings: Any) -> tuple[list[Document], list[DeadLetter]]:
    dead: list[DeadLetter] = []
    docs = list(read_documents(SourceConfig(**settings), _resolver(base), dead.append))
    return docs, dead


def read_error(base: Path, **settings: Any) -> str:
    """The InputError message of a read that must fail; it is always one line."""
    with pytest.raises(InputError) as info:
        read(base, **settings)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------- JSONL


def test_jsonl_good_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "d1", "text": "hello", "lang": "en", "tags": ["x"]},
        {"id": 7, "text": "world", "lang": "fr"},
    ])
    docs, dead = read(tmp_path, path="a.jsonl", metadata_fields=["lang", "tags"])
    assert dead == []
    assert [(d.doc_id, d.text, d.source) for d in docs] == [
        ("d1", "hello", f"{path}:1"), ("7", "world", f"{path}:2")]
    assert docs[0].metadata == {"lang": "en", "tags": ["x"]}
    assert docs[1].metadata == {"lang": "fr", "tags": None}  # missing metadata -> None


def test_jsonl_custom_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"key": 1, "body": "b"}])
    docs, _ = read(tmp_path, path="a.jsonl", id_field="key", text_field="body")
    assert (docs[0].doc_id, docs[0].text) == ("1", "b")


def test_jsonl_bom_blank_lines_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "one"}\r\n\n   \n{"id": "b", "text": "two"}')
    docs, dead = read(tmp_path, path="a.jsonl")
    assert dead == []
    assert [(d.doc_id, d.source) for d in docs] == [("a", f"{path}:1"), ("b", f"{path}:4")]


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.json.gz"])
def test_jsonl_gz(tmp_path: Path, name: str) -> None:
    with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
        f.write('{"id": 1, "text": "zipped"}\n')
    docs, _ = read(tmp_path, path=name)
    assert [(d.doc_id, d.text, d.source) for d in docs] == [("1", "zipped", f"{tmp_path / name}:1")]


def test_json_extension_is_json_lines(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.json", [{"id": 1, "text": "t"}])
    assert [d.doc_id for d in read(tmp_path, path="a.json")[0]] == ["1"]


def test_kind_overrides_extension(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus.txt", [{"id": 1, "text": "t"}])
    assert read_error(tmp_path, path="corpus.txt").startswith(f"{tmp_path / 'corpus.txt'}: unknown file type")
    assert [d.text for d in read(tmp_path, path="corpus.txt", kind="jsonl")[0]] == ["t"]


def test_globs_and_lists_in_deterministic_order(tmp_path: Path) -> None:
    (tmp_path / "part").mkdir()
    for name in ["c", "a", "b"]:
        write_jsonl(tmp_path / "part" / f"{name}.jsonl", [{"id": f"{name}1", "text": name},
                                                          {"id": f"{name}2", "text": name}])
    write_parquet(tmp_path / "extra.parquet", {"id": ["p0"], "text": ["p"]})
    docs, _ = read(tmp_path, path=["part/*.jsonl", "extra.parquet", "part/a.jsonl"])
    # a glob is sorted; list order is kept; a file named twice is read once
    assert [d.doc_id for d in docs] == ["a1", "a2", "b1", "b2", "c1", "c2", "p0"]
    assert docs[-1].source == f"{tmp_path / 'extra.parquet'}#0"


def test_recursive_glob(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    write_jsonl(tmp_path / "x" / "y" / "deep.jsonl", [{"id": 1, "text": "t"}])
    write_jsonl(tmp_path / "x" / "top.jsonl", [{"id": 2, "text": "t"}])
    assert [d.doc_id for d in read(tmp_path, path="x/**/*.jsonl")[0]] == ["2", "1"]


@pytest.mark.parametrize("path", ["nope.jsonl", "data/*.jsonl", "*.parquet"])
def test_missing_file_or_empty_glob(tmp_path: Path, path: str) -> None:
    assert read_error(tmp_path, path=path) == f"{tmp_path / path}: no such file"


def test_missing_file_fails_before_reading(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "t"}])
    with pytest.raises(InputError):
        read_documents(SourceConfig(path=["a.jsonl", "gone.jsonl"]), _resolver(tmp_path), print)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz"])
def test_empty_jsonl_file(tmp_path: Path, name: str) -> None:
    if name.endswith(".gz"):
        with gzip.open(tmp_path / name, "wb"):
            pass
    else:
        (tmp_path / name).write_bytes(b"")
    assert read(tmp_path, path=name) == ([], [])


def test_truncated_gzip_is_a_file_error(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(b'{"id": %d, "text": "row"}\n' % i for i in range(2000)))
    (tmp_path / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    message = read_error(tmp_path, path="a.jsonl.gz", on_bad_row="dead_letter")
    assert message.startswith(f"{tmp_path / 'a.jsonl.gz'}: cannot read:")


BAD_LINES = [
    # (line 2 of the file, dead letter doc_id, reason)
    (b'{"id": "x", "text": ', None, "invalid JSON: Expecting value (column 21)"),
    (b'[1, 2]', None, "not a JSON object (got list)"),
    (b'"just a string"', None, "not a JSON object (got str)"),
    (b'{"id": "x", "text": "caf\xe9"}', None, "invalid UTF-8 (byte 0xe9 at position 25)"),
    (b'{"id": "x"}', "x", "field 'text': missing"),
    (b'{"id": "x", "text": null}', "x", "field 'text': null"),
    (b'{"id": "x", "text": 12}', "x", "field 'text': must be a string (got int)"),
    (b'{"id": "x", "text": {"a": 1}}', "x", "field 'text': must be a string (got dict)"),
    (b'{"id": "x", "text": ""}', "x", "field 'text': empty"),
    (b'{"id": "x", "text": " \\n\\t "}', "x", "field 'text': empty"),
    (b'{"id": "x", "text": "\\ud800"}', "x", "field 'text': not valid Unicode (lone surrogate)"),
    (b'{"id": null, "text": "t"}', None, "field 'id': null"),
    (b'{"text": "t"}', None, "field 'id': missing"),
    (b'{"id": "", "text": "t"}', None, "field 'id': empty"),
    (b'{"id": true, "text": "t"}', None, "field 'id': must be a string or an integer (got bool)"),
    (b'{"id": 1.5, "text": "t"}', None, "field 'id': must be a string or an integer (got float)"),
    (b'{"id": "x", "text": "t", "m": 1}', None, None),  # control: a good line
]


def _bad_file(tmp_path: Path, line: bytes) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "ok1", "text": "fine"}\n' + line + b'\n{"id": "ok3", "text": "fine"}\n')
    return path


@pytest.mark.parametrize("line,doc_id,reason", BAD_LINES)
def test_jsonl_bad_line_dead_letter(tmp_path: Path, line: bytes, doc_id: str | None,
                                    reason: str | None) -> None:
    path = _bad_file(tmp_path, line)
    docs, dead = read(tmp_path, path="bad.jsonl", on_bad_row="dead_letter")
    if reason is None:
        assert (len(docs), dead) == (3, [])
        return
    assert [d.doc_id for d in docs] == ["ok1", "ok3"]
    assert dead == [DeadLetter(doc_id=doc_id, source=f"{path}:2", reason=reason)]


@pytest.mark.parametrize("line,doc_id,reason", [b for b in BAD_LINES if b[2] is not None])
def test_jsonl_bad_line_error(tmp_path: Path, line: bytes, doc_id: str | None, reason: str) -> None:
    path = _bad_file(tmp_path, line)
    assert read_error(tmp_path, path="bad.jsonl", on_bad_row="error") == f"{path}:2: {reason}"


def test_error_mode_yields_good_rows_before_the_bad_one(tmp_path: Path) -> None:
    _bad_file(tmp_path, b'{"id": "x"}')
    docs = read_documents(SourceConfig(path="bad.jsonl", on_bad_row="error"), _resolver(tmp_path), print)
    assert next(docs).doc_id == "ok1"
    with pytest.raises(InputError, match=r"bad\.jsonl:2: field 'text': missing"):
        next(docs)


@pytest.mark.parametrize("row", [{"text": "same"}, {"id": None, "text": "same"}, {"id": "", "text": "same"}])
def test_id_fallback_content_hash(tmp_path: Path, row: dict[str, Any]) -> None:
    write_jsonl(tmp_path / "a.jsonl", [row, {"id": 5, "text": "kept"}])
    docs, dead = read(tmp_path, path="a.jsonl", id_fallback="content_hash")
    assert dead == []
    assert [d.doc_id for d in docs] == [content_hash("same"), "5"]


def test_content_hash_fallback_still_needs_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": None}])
    _, dead = read(tmp_path, path="a.jsonl", id_fallback="content_hash")
    assert dead == [DeadLetter(doc_id=None, source=f"{path}:1", reason="field 'text': null")]


# ---------------------------------------------------------------- Parquet


def test_parquet_good_file_with_typed_metadata(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {
        "id": pa.array([10, 11], pa.int64()),
        "text": ["alpha", "beta"],
        "score": pa.array([0.5, 1.5], pa.float32()),
        "when": pa.array([0, 86_400_000_000], pa.timestamp("us")),
        "tags": [["a"], []],
        "ignored": ["big", "blob"],
    })
    docs, dead = read(tmp_path, path="a.parquet", metadata_fields=["score", "when", "tags", "absent"])
    assert dead == []
    assert [(d.doc_id, d.text, d.source) for d in docs] == [
        ("10", "alpha", f"{path}#0"), ("11", "beta", f"{path}#1")]
    assert docs[1].metadata == {"score": 1.5, "when": "1970-01-02T00:00:00", "tags": [], "absent": None}
    json.dumps([d.metadata for d in docs])  # the sinks store metadata as JSON


def test_parquet_rows_count_across_row_groups_and_files(tmp_path: Path) -> None:
    for part in ["p1", "p0"]:
        write_parquet(tmp_path / f"{part}.parquet",
                      {"id": [f"{part}-{i}" for i in range(5)], "text": ["t"] * 5}, row_group_size=2)
    docs, _ = read(tmp_path, path="*.parquet")
    assert [d.doc_id for d in docs] == [f"p{f}-{i}" for f in (0, 1) for i in range(5)]
    assert docs[4].source == f"{tmp_path / 'p0.parquet'}#4"


def test_parquet_bad_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {
        "id": ["a", "b", None, "d", "e"], "text": ["ok", None, "ok", "  ", "ok"]})
    docs, dead = read(tmp_path, path="a.parquet")
    assert [d.doc_id for d in docs] == ["a", "e"]
    assert dead == [
        DeadLetter("b", f"{path}#1", "field 'text': null"),
        DeadLetter(None, f"{path}#2", "field 'id': null"),
        DeadLetter("d", f"{path}#3", "field 'text': empty"),
    ]
    assert read_error(tmp_path, path="a.parquet", on_bad_row="error") == f"{path}#1: field 'text': null"


def test_parquet_non_string_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"id": ["a"], "text": [3]})
    assert read(tmp_path, path="a.parquet")[1] == [
        DeadLetter("a", f"{path}#0", "field 'text': must be a string (got int)")]


def test_parquet_unserialisable_metadata_is_a_bad_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"id": ["a"], "text": ["t"], "raw": [b"\x00"]})
    assert read(tmp_path, path="a.parquet", metadata_fields=["raw"])[1] == [
        DeadLetter("a", f"{path}#0", "field 'raw': not JSON-serialisable (bytes)")]


def test_parquet_id_fallback_without_id_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", {"text": ["x", "y"]})
    docs, _ = read(tmp_path, path="a.parquet", id_fallback="content_hash")
    assert [d.doc_id for d in docs] == [content_hash("x"), content_hash("y")]


@pytest.mark.parametrize("columns,missing", [({"id": ["a"]}, "text"), ({"text": ["t"]}, "id")])
@pytest.mark.parametrize("mode", ["error", "dead_letter"])
def test_parquet_missing_column(tmp_path: Path, columns: dict[str, list[str]], missing: str,
                                mode: str) -> None:
    path = write_parquet(tmp_path / "a.parquet", columns)
    message = read_error(tmp_path, path="a.parquet", on_bad_row=mode)
    assert message.startswith(f"{path}: column {missing!r} not found; columns: ")


def test_parquet_empty_table(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    assert read(tmp_path, path="a.parquet") == ([], [])


@pytest.mark.parametrize("content", ["truncated", "not parquet", "zero bytes"])
@pytest.mark.parametrize("mode", ["error", "dead_letter"])
def test_unreadable_parquet_is_a_file_error(tmp_path: Path, content: str, mode: str) -> None:
    path = tmp_path / "a.parquet"
    if content == "truncated":
        write_parquet(path, {"id": ["a"] * 100, "text": ["t"] * 100})
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_bytes(b"" if content == "zero bytes" else b'{"id": 1, "text": "json, really"}\n')
    message = read_error(tmp_path, path="a.parquet", on_bad_row=mode)
    assert message.startswith(f"{path}: not a readable Parquet file: ")


def test_parquet_reads_only_needed_columns_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded: the first document arrives after one batch, not the whole file."""
    n = 5000
    write_parquet(tmp_path / "big.parquet", {
        "id": list(range(n)), "text": [f"doc {i}" for i in range(n)],
        "lang": ["en"] * n, "payload": ["x" * 100] * n}, row_group_size=100)
    calls: list[dict[str, Any]] = []
    batches: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, **kwargs: Any):
        calls.append(kwargs)
        for batch in original(self, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs = read_documents(SourceConfig(path="big.parquet", metadata_fields=["lang"]),
                          _resolver(tmp_path), print)
    assert next(docs).doc_id == "0"
    assert calls == [{"batch_size": calls[0]["batch_size"], "columns": ["id", "text", "lang"],
                      "row_groups": None}]  # every row group: the whole file
    assert len(batches) == 1 and batches[0] < n
    assert sum(1 for _ in docs) == n - 1


# ---------------------------------------------------------------- datasets


def _dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


GOOD_ROWS = [{"id": 1, "text": "one", "lang": "en"}, {"id": 2, "text": "two", "lang": "de"}]


def test_hf_save_to_disk_dataset(tmp_path: Path) -> None:
    _dataset(GOOD_ROWS).save_to_disk(str(tmp_path / "saved"))
    docs, dead = read(tmp_path, dataset="saved", metadata_fields=["lang"])
    assert dead == []
    assert [(d.doc_id, d.text, d.source, d.metadata) for d in docs] == [
        ("1", "one", "hf:saved[train]#0", {"lang": "en"}),
        ("2", "two", "hf:saved[train]#1", {"lang": "de"})]


def test_hf_save_to_disk_dataset_dict_split(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _dataset(GOOD_ROWS), "test": _dataset([{"id": 9, "text": "t"}])}) \
        .save_to_disk(str(tmp_path / "dd"))
    docs, _ = read(tmp_path, dataset="dd", split="test")
    assert [(d.doc_id, d.source) for d in docs] == [("9", "hf:dd[test]#0")]
    assert read_error(tmp_path, dataset="dd", split="dev") == \
        "hf:dd: split 'dev' not found; available: train, test"


def test_hf_numpy_format_values_become_python(tmp_path: Path) -> None:
    ds = _dataset([{"id": 1, "text": "one", "score": 0.25, "vec": [1, 2]}])
    ds.set_format("numpy")
    ds.save_to_disk(str(tmp_path / "np"))
    docs, dead = read(tmp_path, dataset="np", metadata_fields=["score", "vec"])
    assert dead == []
    assert docs[0].doc_id == "1" and docs[0].text == "one"
    assert docs[0].metadata == {"score": 0.25, "vec": [1, 2]}
    assert type(docs[0].metadata["score"]) is float


def test_hf_bad_rows(tmp_path: Path) -> None:
    _dataset([{"id": "a", "text": "ok"}, {"id": "b", "text": None}, {"id": None, "text": "ok"}]) \
        .save_to_disk(str(tmp_path / "saved"))
    docs, dead = read(tmp_path, dataset="saved")
    assert [d.doc_id for d in docs] == ["a"]
    assert dead == [DeadLetter("b", "hf:saved[train]#1", "field 'text': null"),
                    DeadLetter(None, "hf:saved[train]#2", "field 'id': null")]
    assert read_error(tmp_path, dataset="saved", on_bad_row="error") == \
        "hf:saved[train]#1: field 'text': null"


def test_hf_missing_column(tmp_path: Path) -> None:
    _dataset([{"id": 1, "body": "x"}]).save_to_disk(str(tmp_path / "saved"))
    assert read_error(tmp_path, dataset="saved") == "hf:saved: column 'text' not found; columns: id, body"


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_load_dataset_streaming(tmp_path: Path, builder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    for part in range(2):
        rows = [{"id": f"{part}-{i}", "text": f"t{i}", "lang": "en"} for i in range(3)]
        if builder == "json":
            write_jsonl(tmp_path / "data" / f"{part}.jsonl", rows)
        else:
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"{part}.parquet")
    loaded: list[Any] = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    ext = "jsonl" if builder == "json" else "parquet"
    docs, dead = read(tmp_path, dataset=builder, data_files=[f"data/*.{ext}"], streaming=True,
                      metadata_fields=["lang"])
    assert isinstance(loaded[0], datasets.IterableDataset)  # never materialised
    assert dead == []
    assert [d.doc_id for d in docs] == [f"{p}-{i}" for p in range(2) for i in range(3)]
    assert docs[4].source == f"hf:{builder}[train]#4"
    assert docs[0].metadata == {"lang": "en"}
    assert not any((tmp_path / "hf-cache").rglob("*.arrow"))


def test_hf_load_dataset_not_streaming(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "x"}, {"id": 2, "text": None}])
    docs, dead = read(tmp_path, dataset="json", data_files="a.jsonl")
    assert [d.doc_id for d in docs] == ["1"]
    assert dead == [DeadLetter("2", "hf:json[train]#1", "field 'text': null")]


def test_hf_load_dataset_local_directory(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", [{"id": 1, "text": "x"}])
    docs, _ = read(tmp_path, dataset="corpus", streaming=True)
    assert [(d.doc_id, d.source) for d in docs] == [("1", "hf:corpus[train]#0")]


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_load_dataset_bad_split(tmp_path: Path, streaming: bool) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "x"}])
    message = read_error(tmp_path, dataset="json", data_files="a.jsonl", split="test", streaming=streaming)
    assert message == "hf:json: split 'test' not found; available: train"


@pytest.mark.parametrize("data_files", ["nope/*.jsonl", "nope.jsonl"])
def test_hf_builder_missing_data_files(tmp_path: Path, data_files: str) -> None:
    message = read_error(tmp_path, dataset="json", data_files=data_files, streaming=True)
    assert message == f"{tmp_path / data_files}: no such file"


def test_hf_local_directory_missing_data_files(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", [{"id": 1, "text": "x"}])
    message = read_error(tmp_path, dataset="corpus", data_files="zz.jsonl", streaming=True)
    assert message.startswith("hf:corpus: Unable to find") and len(message) < 320


def test_hf_streaming_missing_text_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "x"}])
    message = read_error(tmp_path, dataset="json", data_files="a.jsonl", streaming=True)
    assert message == "hf:json: column 'text' not found; columns: id, body"


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_malformed_data_file_is_terminal(tmp_path: Path, streaming: bool) -> None:
    """datasets cannot skip a bad line; the jsonl reader is the one that dead-letters lines."""
    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": \n', encoding="utf-8")
    message = read_error(tmp_path, dataset="json", data_files="a.jsonl", streaming=streaming)
    # while loading (schema inference) or, when streaming, while iterating
    assert message.startswith(("hf:json: ", "hf:json[train]: "))


# ---------------------------------------------------------------- check_source (validate)


def check_error(base: Path, **settings: Any) -> str:
    with pytest.raises(InputError) as info:
        check_source(SourceConfig(**settings), _resolver(base))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_check_source_passes_good_sources(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "t"}])
    write_parquet(tmp_path / "b.parquet", {"id": [1], "text": ["t"]})
    _dataset(GOOD_ROWS).save_to_disk(str(tmp_path / "saved"))
    check_source(SourceConfig(path=["a.jsonl", "b.parquet"]), _resolver(tmp_path))
    check_source(SourceConfig(dataset="saved"), _resolver(tmp_path))


def test_check_source_finds_file_problems(tmp_path: Path) -> None:
    write_parquet(tmp_path / "b.parquet", {"id": [1], "body": ["t"]})
    (tmp_path / "c.parquet").write_bytes(b"nope")
    (tmp_path / "d.csv").write_text("id,text\n")
    assert check_error(tmp_path, path="gone/*.jsonl") == f"{tmp_path / 'gone/*.jsonl'}: no such file"
    assert check_error(tmp_path, path="b.parquet").startswith(f"{tmp_path / 'b.parquet'}: column 'text'")
    assert check_error(tmp_path, path="c.parquet").startswith(f"{tmp_path / 'c.parquet'}: not a readable")
    assert check_error(tmp_path, path="d.csv").startswith(f"{tmp_path / 'd.csv'}: unknown file type")


def test_check_source_opens_datasets_without_preparing_them(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "x"}])
    check_source(SourceConfig(dataset="json", data_files="a.jsonl"), _resolver(tmp_path))
    assert not any((tmp_path / "hf-cache").rglob("*.arrow"))
    assert check_error(tmp_path, dataset="json", data_files="a.jsonl", split="dev") == \
        "hf:json: split 'dev' not found; available: train"


# ---------------------------------------------------------------- NaN and Infinity in metadata
# JSON has no NaN or Infinity and the sinks store metadata as JSON: they become null when read.


def _stored_json(doc: Document) -> str:
    """The metadata as the sinks store it (this refused NaN, stopping the job at the sink)."""
    return metadata_json(doc.metadata, doc.source)


def test_parquet_nan_and_infinity_metadata_become_null(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    path = write_parquet(tmp_path / "a.parquet", {
        "id": ["a", "b", "c", "d"], "text": ["t"] * 4,
        "score": pa.array([nan, inf, -inf, 0.5], pa.float64()),
        "f32": pa.array([nan, 1.0, 2.0, -inf], pa.float32()),
        "vec": pa.array([[1.0, nan], [inf], [], None], pa.list_(pa.float64())),
        "nested": [{"w": nan, "n": 1}, {"w": 2.0, "n": 2}, {"w": -inf, "n": 3}, {"w": 0.0, "n": 4}],
    })
    docs, dead = read(tmp_path, path="a.parquet", metadata_fields=["score", "f32", "vec", "nested"])
    assert dead == []
    assert [d.metadata for d in docs] == [
        {"score": None, "f32": None, "vec": [1.0, None], "nested": {"w": None, "n": 1}},
        {"score": None, "f32": 1.0, "vec": [None], "nested": {"w": 2.0, "n": 2}},
        {"score": None, "f32": 2.0, "vec": [], "nested": {"w": None, "n": 3}},
        {"score": 0.5, "f32": None, "vec": None, "nested": {"w": 0.0, "n": 4}}]
    assert _stored_json(docs[0]) == '{"f32": null, "nested": {"n": 1, "w": null}, "score": null, ' \
        '"vec": [1.0, null]}'
    assert docs[0].source == f"{path}#0"


@pytest.mark.parametrize("writer", ["pandas.to_parquet", "pyarrow.Table.from_pandas"])
def test_pandas_written_parquet_with_missing_floats(tmp_path: Path, writer: str) -> None:
    """pandas' float columns hold NaN for a missing value, and ±inf from arithmetic."""
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "text": ["one", "two", "three", np.nan],
                          "score": [1.5, np.nan, np.inf, -np.inf],
                          "ratio": np.array([np.nan, 2.0, 3.0, 4.0], np.float32),
                          "count": pd.array([1, None, 3, 4], "Int64")})
    path = tmp_path / "a.parquet"
    if writer == "pandas.to_parquet":
        frame.to_parquet(path)
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    docs, dead = read(tmp_path, path="a.parquet", metadata_fields=["score", "ratio", "count"])
    assert [(d.doc_id, d.metadata) for d in docs] == [
        ("a", {"score": 1.5, "ratio": None, "count": 1}),
        ("b", {"score": None, "ratio": 2.0, "count": None}),
        ("c", {"score": None, "ratio": 3.0, "count": 3})]
    assert [_stored_json(d) for d in docs]  # all valid JSON now
    assert dead == [DeadLetter("d", f"{path}#3", "field 'text': null")]  # NaN text: still bad


def test_jsonl_nan_and_infinity_metadata_become_null(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": "a", "text": "t", "m": NaN, "v": [Infinity, -Infinity, 1.5]}\n'
                     b'{"id": "b", "text": NaN, "m": 1}\n')
    docs, dead = read(tmp_path, path="a.jsonl", metadata_fields=["m", "v"])
    assert [(d.doc_id, d.metadata, _stored_json(d)) for d in docs] == [
        ("a", {"m": None, "v": [None, None, 1.5]}, '{"m": null, "v": [null, null, 1.5]}')]
    assert dead == [DeadLetter("b", f"{path}:2", "field 'text': must be a string (got float)")]


@pytest.mark.parametrize("format_", [None, "numpy"])
def test_hf_nan_metadata_becomes_null(tmp_path: Path, format_: str | None) -> None:
    ds = _dataset([{"id": 1, "text": "one", "score": float("nan")},
                   {"id": 2, "text": "two", "score": float("-inf")},
                   {"id": 3, "text": "three", "score": 0.25}])
    if format_:
        ds.set_format(format_)
    ds.save_to_disk(str(tmp_path / "saved"))
    docs, dead = read(tmp_path, dataset="saved", metadata_fields=["score"])
    assert dead == []
    assert [d.metadata for d in docs] == [{"score": None}, {"score": None}, {"score": 0.25}]
    assert [_stored_json(d) for d in docs] == ['{"score": null}', '{"score": null}',
                                               '{"score": 0.25}']


# ---------------------------------------------------------------- paths: directories, links, FIFOs


@pytest.mark.parametrize("given", ["data", "data/"])
def test_directory_as_path_suggests_a_glob(tmp_path: Path, given: str) -> None:
    (tmp_path / "data").mkdir()
    for name in ["a.parquet", "b.parquet", "notes.jsonl"]:
        write_parquet(tmp_path / "data" / name, {"id": ["x"], "text": ["t"]})
    expected = f"{tmp_path / 'data'}/ is a directory; use a glob such as {tmp_path / 'data'}/*.parquet"
    assert read_error(tmp_path, path=given) == expected
    assert check_error(tmp_path, path=given) == expected
    # the suggestion works
    assert [d.source for d in read(tmp_path, path="data/*.parquet")[0]] == [
        f"{tmp_path / 'data' / 'a.parquet'}#0", f"{tmp_path / 'data' / 'b.parquet'}#0"]


def test_directory_suggestion_follows_kind_and_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "2024").mkdir(parents=True)
    write_jsonl(tmp_path / "nested" / "2024" / "a.jsonl", [{"id": 1, "text": "t"}])
    assert read_error(tmp_path, path="empty") == \
        f"{tmp_path / 'empty'}/ is a directory; use a glob such as {tmp_path / 'empty'}/*.jsonl"
    assert read_error(tmp_path, path="empty", kind="parquet").endswith(f"{tmp_path / 'empty'}/*.parquet")
    assert read_error(tmp_path, path="nested").endswith(f"{tmp_path / 'nested'}/**/*.jsonl")
    # a Spark-style output directory named like a file
    (tmp_path / "out.parquet").mkdir()
    write_parquet(tmp_path / "out.parquet" / "part-0.parquet", {"id": ["x"], "text": ["t"]})
    assert read_error(tmp_path, path="out.parquet") == (
        f"{tmp_path / 'out.parquet'}/ is a directory; use a glob such as "
        f"{tmp_path / 'out.parquet'}/*.parquet")


def test_glob_matching_only_directories(tmp_path: Path) -> None:
    for year in ["2023", "2024"]:
        (tmp_path / "data" / year).mkdir(parents=True)
        write_jsonl(tmp_path / "data" / year / "a.jsonl", [{"id": year, "text": "t"}])
    assert read_error(tmp_path, path="data/*") == (
        f"{tmp_path / 'data/*'}: matches only directories (2, e.g. {tmp_path / 'data' / '2023'}); "
        f"use a glob such as {tmp_path / 'data/*'}/*.jsonl")
    assert [d.doc_id for d in read(tmp_path, path="data/*/*.jsonl")[0]] == ["2023", "2024"]


def _loop_tree(tmp_path: Path, loops: int) -> Path:
    """x/top.jsonl, x/d/deep.jsonl, and symlinks under x/d back up to x (and to x/d itself)."""
    (tmp_path / "x" / "d").mkdir(parents=True)
    write_jsonl(tmp_path / "x" / "top.jsonl", [{"id": "top", "text": "t"}])
    write_jsonl(tmp_path / "x" / "d" / "deep.jsonl", [{"id": "deep", "text": "t"}])
    os.symlink("..", tmp_path / "x" / "d" / "up")
    if loops > 1:
        os.symlink(".", tmp_path / "x" / "d" / "self")
    return tmp_path / "x"


def test_symlink_loop_under_double_star_reads_each_file_once(tmp_path: Path) -> None:
    """glob follows x/d/up -> .. lap after lap (~40 times): each file is read once."""
    root = _loop_tree(tmp_path, loops=1)
    docs, dead = read(tmp_path, path="x/**/*.jsonl")
    assert dead == []
    assert [(d.doc_id, d.source) for d in docs] == [
        ("deep", f"{root / 'd' / 'deep.jsonl'}:1"), ("top", f"{root / 'top.jsonl'}:1")]
    assert source_files(SourceConfig(path="x/**"), _resolver(tmp_path)) == [
        root / "d" / "deep.jsonl", root / "top.jsonl"]


def test_two_symlink_loops_under_double_star_finish(tmp_path: Path) -> None:
    """Two loops made glob list paths without end (memory and time): in a child process,
    so that a regression fails here instead of hanging the test session."""
    _loop_tree(tmp_path, loops=2)
    code = ("import sys; from pathlib import Path; from pipeline.readers.rows import expand_paths; "
            "print(*expand_paths([sys.argv[1]], Path), sep='\\n')")
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x/**/*.jsonl")],
                              capture_output=True, text=True, timeout=20, check=False,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("expanding x/**/*.jsonl with two symlink loops did not finish in 20 s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "x/d/deep.jsonl"), str(tmp_path / "x/top.jsonl")]
    assert time.monotonic() - started < 20


def test_a_file_named_through_several_paths_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "t"}])
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"id": "b", "text": "t"}])
    os.symlink(path, tmp_path / "link.jsonl")
    os.symlink(tmp_path / "sub", tmp_path / "sublink")
    docs, _ = read(tmp_path, path=["link.jsonl", "a.jsonl", "sub/../a.jsonl", str(path),
                                   "sublink/*.jsonl", "sub/b.jsonl"])
    # the first name a file was given under is the one kept, in the order given
    assert [(d.doc_id, d.source) for d in docs] == [
        ("a", f"{tmp_path / 'link.jsonl'}:1"), ("b", f"{tmp_path / 'sublink' / 'b.jsonl'}:1")]


def test_double_star_glob_matches_as_glob_does(tmp_path: Path) -> None:
    """Without loops, the loop-safe ``**`` matches what ``glob.glob(recursive=True)`` does:
    hidden names skipped, symlinked directories followed, zero or more directories."""
    from pipeline.readers.rows import _glob

    for name in ["a/1.jsonl", "a/b/2.jsonl", "a/b/c/3.jsonl", "a/.h.jsonl", ".hid/x/4.jsonl",
                 "e/5.parquet", "top.jsonl", "a/b/c/x.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    os.symlink("../e", tmp_path / "a" / "linked")
    os.symlink("a/b/c/3.jsonl", tmp_path / "l3.jsonl")
    os.symlink("nowhere", tmp_path / "broken.jsonl")
    for pattern in ["**", "**/*.jsonl", "*/**/*.jsonl", "**/b/**", "**/c", "**/.h*", "**/*",
                    ".hid/**", "a/../**/*.parquet", "**/**/*.jsonl", "a/./**/3.jsonl",
                    "**/*[0-9].*", "a/**/"]:
        full = str(tmp_path / pattern)
        expected = sorted({p.rstrip("/") for p in glob.glob(full, recursive=True)})
        assert sorted({p.rstrip("/") for p in _glob(full)}) == expected, pattern


def test_fifo_named_as_a_path_is_one_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jsonl")
    expected = (f"{tmp_path / 'pipe.jsonl'}: not a regular file but a FIFO (named pipe); "
                "source paths must name regular files")
    assert read_error(tmp_path, path="pipe.jsonl") == expected
    assert check_error(tmp_path, path="pipe.jsonl") == expected


def test_glob_skips_fifos_and_directories(tmp_path: Path) -> None:
    """A glob takes the regular files it matches and skips the rest (never opening a FIFO,
    which would block); when nothing regular is left, one line says what it matched."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "t"}])
    os.symlink("gone.jsonl", tmp_path / "broken.jsonl")
    assert [d.doc_id for d in read(tmp_path, path="*.jsonl")[0]] == ["a"]
    assert read_error(tmp_path, path="p*.jsonl") == \
        f"{tmp_path / 'p*.jsonl'}: matches no regular file ({tmp_path / 'pipe.jsonl'} is a FIFO (named pipe))"
    assert read_error(tmp_path, path="b*.jsonl") == \
        f"{tmp_path / 'b*.jsonl'}: matches no regular file ({tmp_path / 'broken.jsonl'} is a broken symbolic link)"
    assert read_error(tmp_path, path="broken.jsonl") == \
        f"{tmp_path / 'broken.jsonl'}: no such file (a broken symbolic link)"
    message = read_error(tmp_path, dataset="json", data_files=["*.jsonl", "p*.jsonl"])
    assert message.startswith(f"{tmp_path / 'p*.jsonl'}: matches no regular file")


# ---------------------------------------------------------------- datasets: hub out of reach


HUB_NAME = "nonexistent-org/nonexistent-dataset"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt to resolve a name or open a connection, recorded and refused."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[:2])
        raise OSError(101, "Network is unreachable (no network in this test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _online_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if HF_HUB_OFFLINE was not set when datasets and huggingface_hub were imported."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_hf_hub_dataset_offline_is_one_line_and_never_tries_the_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> None:
    _online_libraries(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after the libraries read it: still honoured
    started = time.monotonic()
    for check in (read_error, check_error):
        message = check(tmp_path, dataset=HUB_NAME)
        assert message.startswith(f"hf:{HUB_NAME}: not a local dataset "
                                  f"({tmp_path / HUB_NAME} does not exist)")
        assert "HF_HUB_OFFLINE is set" in message and "save_to_disk" in message
        assert "data_files" in message
    assert time.monotonic() - started < 10
    assert no_network == []
    assert datasets.config.HF_HUB_OFFLINE is False  # put back as found


def test_hf_hub_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       no_network: list[Any]) -> None:
    """Not offline, no network: one short attempt instead of datasets' ~30 s of retries."""
    _online_libraries(monkeypatch)
    started = time.monotonic()
    message = read_error(tmp_path, dataset=HUB_NAME, streaming=True)
    assert time.monotonic() - started < 10
    assert message.startswith(f"hf:{HUB_NAME}: not a local dataset")
    assert "the Hugging Face Hub cannot be reached (" in message
    assert "Network is unreachable" in message
    assert len(no_network) == 1  # the one probe


def test_hf_hub_that_answers_no_is_one_line(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub that can be reached (here a local server that says 404 to everything) is asked
    as before; the dataset it does not have is one line."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _online_libraries(monkeypatch)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        started = time.monotonic()
        message = read_error(tmp_path, dataset=HUB_NAME)
        assert time.monotonic() - started < 10
    finally:
        server.shutdown()
        server.server_close()
    assert message.startswith(f"hf:{HUB_NAME}: ") and "Hub" in message


def test_hf_hub_dataset_in_the_cache_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   no_network: list[Any]) -> None:
    """Offline, datasets still finds a hub dataset it cached before: kept, with no network."""
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "cached"}])
    datasets.load_dataset("json", data_files=str(tmp_path / "a.jsonl"), split="train")
    built = next(p for p in (tmp_path / "hf-cache" / "json").glob("*/*/*") if p.is_dir())
    cached = tmp_path / "hf-cache" / "some-org___cached-set" / "default" / "0.0.0" / built.name
    cached.parent.mkdir(parents=True)
    built.rename(cached)
    (cached / "json-train.arrow").rename(cached / "cached-set-train.arrow")
    _online_libraries(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for streaming in (False, True):
        docs, _ = read(tmp_path, dataset="some-org/cached-set", streaming=streaming)
        assert [(d.doc_id, d.text, d.source) for d in docs] == [
            ("1", "cached", "hf:some-org/cached-set[train]#0")]
    assert no_network == []
