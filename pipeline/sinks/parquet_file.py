"""One Parquet output file, written row group by row group to a temp file and renamed to its
name only when finished, so a file under its name is always whole and a killed run leaves at
most a temp file behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, commit_temp, temp_name


class PartFile:
    """One output file being written: row groups go to a temp file, renamed when finished."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.tmp = temp_name(path)
        self.batch_ids: list[str] = []
        self.rows = 0
        self._group: list[pa.RecordBatch] = []
        self._writer: pq.ParquetWriter | None = None

    @property
    def buffered_bytes(self) -> int:
        return sum(rb.nbytes for rb in self._group)

    def add(self, batch_id: str, record: pa.RecordBatch) -> None:
        self.batch_ids.append(batch_id)
        self._group.append(record)
        self.rows += record.num_rows

    def flush_group(self) -> None:
        if not self._group:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        self._writer.write_table(pa.Table.from_batches(self._group, schema=self.schema))
        self._group.clear()

    def finish(self) -> list[str]:
        """Write what is buffered, close, rename into place; the batch ids it holds."""
        self.flush_group()
        assert self._writer is not None
        # which batches the file holds, for provenance (file-level key-value metadata)
        self._writer.add_key_value_metadata({"batch_ids": json.dumps(self.batch_ids)})
        self._writer.close()
        self._writer = None
        commit_temp(self.tmp, self.path)
        return self.batch_ids

    def abandon(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass
            self._writer = None
        self.tmp.unlink(missing_ok=True)
        self._group.clear()


def link_or_copy(src: Path, dest: Path) -> None:
    """Files are immutable once written, so a hard link is a safe, free copy."""
    try:
        os.link(src, dest)
    except OSError:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
