"""Parquet sink: batches grouped into files named after their first batch, written atomically.

A file is named ``part-<first batch id>.parquet``. Batches arrive in plan order and, after a
resume, the first unacknowledged batch starts a new file, so a redone file gets the same name
and replaces the old one: no duplicates. Batch ids are acknowledged only once their file has
been renamed into place. The columns match the Milvus sink's schema so the files can be
bulk-imported; dimension and the caller's model info go into the schema metadata, the batch ids
a file holds into its file-level key-value metadata (known only when it is finished).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from pipeline.atomic import TEMP_SUFFIX, atomic_path, atomic_write_bytes
from pipeline.errors import SinkError
from pipeline.job.sections import SinkSettings
from pipeline.records import HASH_BUCKETS, window_of
from pipeline.sinks.base import (
    Destination,
    GenerationMark,
    Hit,
    ScannedRows,
    Searchable,
    VectorBatch,
)
from pipeline.sinks.fields import columns
from pipeline.sinks.parquet_file import PartFile, link_or_copy
from pipeline.sinks.paths import blocked, nearest_existing

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
T = TypeVar("T")


CURRENT = "CURRENT"
VERSION_PREFIX = "v"  # a version directory: v<generation>-<fingerprint>
MARK_FILE = "_embed_job.json"  # in each version directory: who made it


def part_name(first_batch_id: str, prefix: str = "") -> str:
    """The deterministic file name of the file that starts with this batch."""
    return f"part-{prefix}{first_batch_id}.parquet"


def current_version(root: Path) -> Path | None:
    """The version directory readers should use, from the root's CURRENT pointer."""
    pointer = root / CURRENT
    if not pointer.exists():
        return None
    return root / json.loads(pointer.read_text())["version"]


# rows are written to the open file in row groups of about this size, so the sink holds at
# most one row group in memory however many rows a file gets
ROW_GROUP_BYTES = 32 * 2**20
ROWS_PER_FILE = 10_000


class ParquetSinkConfig(SinkSettings):
    """Vectors into Parquet files: one version directory per generation under ``path``,
    published by the ``CURRENT`` file that names the live one (Parquet files cannot be
    updated in place, so every run writes a version of its own)."""

    where_key: ClassVar[str] = "sink.path"
    name_key: ClassVar[str] = "sink.path"

    kind: Literal["parquet"] = "parquet"
    path: str | None = Field(None, description="the output directory")
    rows_per_file: int = Field(ROWS_PER_FILE, gt=0, description="rows buffered per file")

    @model_validator(mode="after")
    def _target(self) -> ParquetSinkConfig:
        if not self.path:
            raise ValueError("sink.path is required for a parquet sink")
        return self

    def target_name(self, alias: str, fingerprint: str, generation: int) -> str:
        return f"{VERSION_PREFIX}{generation:05d}-{fingerprint}"

    def identity_where(self) -> str:
        return self.path or ""

    def describe(self, resolve: Callable[[str], Path], target: str, alias: str) -> str:
        return f"{self.location(resolve)}/{target}"

    def local_path(self, resolve: Callable[[str], Path]) -> Path | None:
        return resolve(self.path or "")

    def published_as(self, alias: str) -> str:
        return CURRENT

    def destination_problems(self, resolve: Callable[[str], Path], alias: str) -> list[str]:
        """A file where the output directory must go."""
        root = resolve(self.path or "")
        existing = nearest_existing(root)
        return [] if existing.is_dir() else [
            f"sink.path: {blocked(root, existing)}; Parquet output needs a directory"]

    def make(self, resolve: Callable[[str], Path], alias: str, target: str,
             base: str | None = None, file_metadata: Mapping[str, str] | None = None,
             mark: GenerationMark | None = None) -> ParquetSink:
        root = resolve(self.path or "")
        return ParquetSink(root / target, rows_per_file=self.rows_per_file,
                           store_text=self.store_text, file_metadata=file_metadata, root=root,
                           base=root / base if base else None, file_prefix=f"{target[:6]}-",
                           mark=mark)


class ParquetSink(Destination, Searchable):
    """Vectors into a directory of Parquet files of about ``rows_per_file`` rows each.

    A file is written row group by row group to a temp file and renamed to its deterministic
    name when full; its batches are acknowledged then, so a killed run redoes at most the
    batches of the file it was writing, and a redone file replaces, never duplicates.

    Each run writes a new version directory under ``root``; ``publish`` flips the root's
    ``CURRENT`` pointer (an atomic rename) so readers switch versions in one step. An
    incremental run carries the base version's files over — hard links for files no changed
    document touches, filtered rewrites for the others — so unchanged vectors are not
    re-embedded and files stay immutable.
    """

    def __init__(self, directory: str | Path, *, rows_per_file: int = ROWS_PER_FILE,
                 store_text: bool = True, file_metadata: Mapping[str, str] | None = None,
                 root: str | Path | None = None, base: str | Path | None = None,
                 file_prefix: str = "", mark: GenerationMark | None = None) -> None:
        """``file_metadata``: extra key-value pairs (model, fingerprint...) for every file;
        ``base``: the version an incremental run builds on; ``file_prefix`` keeps this run's
        file names apart from those it carries over; ``mark``: written into the version
        directory so the destination says who made it."""
        self.directory = Path(directory)
        self.mark = mark
        self.root = Path(root) if root is not None else self.directory.parent
        self.base = Path(base) if base is not None else None
        self.file_prefix = file_prefix
        self.rows_per_file = rows_per_file
        self.store_text = store_text
        self.file_metadata = dict(file_metadata or {})
        self.dimension: int | None = None
        self._schema: pa.Schema | None = None
        self._file: PartFile | None = None

    def on_write_start(self, dimension: int) -> None:
        """Create the directory and sweep temp files a killed run left behind."""
        self.dimension = dimension
        self._schema = self._make_schema(dimension)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"parquet {self.directory}: cannot create the directory: {e}") from e
        if self.mark is not None and not (self.directory / MARK_FILE).exists():
            atomic_write_bytes(self.directory / MARK_FILE, self.mark.to_json().encode())
        self._remove_temps()

    def write(self, batch: VectorBatch) -> list[str]:
        """Add the batch to the open file; when the file is full, finish it and acknowledge
        all its batches."""
        record = self._record_batch(batch)
        if self._file is None:
            if not _SAFE_ID.match(batch.batch_id):
                raise SinkError(f"parquet {self.directory}: batch id {batch.batch_id!r} cannot "
                                "name a file")
            self._file = PartFile(self.directory / part_name(batch.batch_id, self.file_prefix),
                                  self._schema)
        self._file.add(batch.batch_id, record)
        if self._file.buffered_bytes >= ROW_GROUP_BYTES:
            self._guarded(self._file.flush_group)
        return self._finish_file() if self._file.rows >= self.rows_per_file else []

    def on_write_complete(self) -> list[str]:
        """Finish the last, partial file."""
        return self._finish_file() if self._file is not None else []

    def on_write_failed(self, error: BaseException) -> None:
        """Drop the unacknowledged buffer (its batches will be redone) and any temp file."""
        self._discard()
        self._remove_temps()

    def close(self) -> None:
        self._discard()

    def discard_target(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Carry the base version over, without the rows of changed or removed documents."""
        if self.base is None:
            return
        changed = pa.array({doc_id for doc_id, _, _ in changes}, pa.string())
        for src in sorted(self.base.glob("*.parquet")):
            dest = self.directory / src.name
            if dest.exists():
                continue  # carried by an earlier attempt
            table = pq.read_table(src)
            keep = pc.invert(pc.is_in(table["doc_id"], value_set=changed))
            if pc.all(keep).as_py():
                link_or_copy(src, dest)
            elif pc.any(keep).as_py():
                with atomic_path(dest) as tmp:
                    pq.write_table(table.filter(keep), tmp)

    def count(self) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self._files(self.directory))

    def count_by_bucket(self) -> dict[str, int]:
        out = dict.fromkeys(HASH_BUCKETS, 0)
        for f in self._files(self.directory):
            column = pq.read_table(f, columns=["doc_hash"])["doc_hash"]
            for bucket, n in zip(*pc.value_counts(pc.utf8_slice_codeunits(column, 0, 1))
                                 .flatten()):
                out[bucket.as_py()] = out.get(bucket.as_py(), 0) + n.as_py()
        return out

    def forget(self, from_window: int, doc_ids: list[str]) -> list[str]:
        """Remove this run's files holding a batch of ``from_window`` or later; batches of
        earlier windows in them are returned, to be written again."""
        lost: list[str] = []
        for f in self.directory.glob(part_name("*", self.file_prefix)):
            ids = json.loads((pq.read_metadata(f).metadata or {}).get(b"batch_ids", b"[]"))
            if any(window_of(b) >= from_window for b in ids):
                lost += [b for b in ids if window_of(b) < from_window]
                f.unlink()
        self._remove_temps()
        return lost

    def publish(self) -> None:
        """Flip CURRENT to this version, atomically."""
        with atomic_path(self.root / CURRENT) as tmp:
            Path(tmp).write_text(json.dumps({"version": self.directory.name}))

    def live(self) -> str | None:
        current = current_version(self.root)
        return current.name if current is not None else None

    def search(self, vectors: np.ndarray, k: int, generation: str | None = None
               ) -> list[list[Hit]]:
        from pipeline.sinks.parquet_search import search_version

        return search_version(self._published(generation), vectors, k, self.store_text)

    def scan(self, generation: str | None = None) -> Iterator[ScannedRows]:
        from pipeline.sinks.parquet_search import scan_version

        return scan_version(self._published(generation))

    def _published(self, generation: str | None) -> Path:
        if generation is not None:
            return self.root / generation
        current = current_version(self.root)
        if current is None:
            raise SinkError(f"{self.root}: nothing published yet ({CURRENT} is missing)")
        return current

    def exists(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def mark_of(self, name: str) -> GenerationMark | None:
        path = self.root / name / MARK_FILE
        return GenerationMark.from_json(path.read_text()) if path.is_file() else None

    def neighbours(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name != CURRENT and not p.name.startswith(f".{CURRENT}."))

    def rows_of(self, name: str) -> Iterator[tuple[str, int, str]]:
        for f in self._files(self.root / name):
            t = pq.read_table(f, columns=["doc_id", "chunk_index", "doc_hash"])
            yield from zip(t["doc_id"].to_pylist(), t["chunk_index"].to_pylist(),
                           t["doc_hash"].to_pylist())

    def drop(self, name: str) -> None:
        """Remove a version directory this job recorded writing (never called on others)."""
        shutil.rmtree(self.root / name, ignore_errors=True)

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        return sorted(directory.glob("*.parquet")) if directory.is_dir() else []

    def _make_schema(self, dimension: int) -> pa.Schema:
        fields = [
            pa.field("pk", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("doc_hash", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("metadata", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
        ]
        return pa.schema([f for f in fields if self.store_text or f.name != "text"],
                         metadata={**self.file_metadata, "dimension": str(dimension)})

    def _record_batch(self, batch: VectorBatch) -> pa.RecordBatch:
        """The batch as Arrow now, so bad data fails on its own batch, not at file time."""
        assert self._schema is not None and self.dimension is not None, "on_write_start first"
        values = columns(batch, self.dimension, self.store_text,
                         f"parquet {self.directory}: batch {batch.batch_id}")
        arrays: dict[str, pa.Array] = {
            "pk": pa.array(batch.pks, pa.string()),
            "doc_id": pa.array(batch.doc_ids, pa.string()),
            "chunk_index": pa.array(batch.chunk_indexes, pa.int32()),
            "doc_hash": pa.array(batch.doc_hashes, pa.string()),
            "metadata": pa.array(values.metadata, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(values.vectors.reshape(-1), pa.float32()), self.dimension),
        }
        if values.texts is not None:
            arrays["text"] = pa.array(values.texts, pa.string())
        return pa.RecordBatch.from_arrays([arrays[n] for n in self._schema.names],
                                          schema=self._schema)

    def _finish_file(self) -> list[str]:
        assert self._file is not None
        ids = self._guarded(self._file.finish)
        self._file = None
        return ids

    def _guarded(self, step: Callable[[], T]) -> T:
        """A disk error drops the open file (its batches are not acknowledged: they are
        written again) and becomes a SinkError naming the file."""
        assert self._file is not None
        try:
            return step()
        except OSError as e:
            path = self._file.path
            self._discard()
            raise SinkError(f"parquet {path}: {e}") from e

    def _discard(self) -> None:
        if self._file is not None:
            self._file.abandon()
            self._file = None

    def _remove_temps(self) -> None:
        for tmp in self.directory.glob(f".part-*.parquet.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
