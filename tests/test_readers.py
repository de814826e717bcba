"""Readers: JSONL, Parquet and datasets sources, good and malformed, on real files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.errors import InputError
from pipeline.readers import check_source, read_documents
from pipeline.records import DeadLetter, Document, content_hash


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
    assert calls == [{"batch_size": calls[0]["batch_size"], "columns": ["id", "text", "lang"]}]
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
