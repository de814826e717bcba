"""Parquet files, read a batch of rows at a time so memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, one_line
from pipeline.job.sections import SourceConfig
from pipeline.readers.rows import projection, row_to_document
from pipeline.records import DeadLetter, Document

BATCH_ROWS = 1024


def read_parquet(path: Path, source: SourceConfig,
                 on_dead_letter: Callable[[DeadLetter], None],
                 row_groups: list[int] | None = None, first_row: int = 0) -> Iterator[Document]:
    """Documents from one Parquet file; ``source`` is ``file#ROW`` (0-based over the file).

    ``row_groups``: only these (consecutive, the first at row ``first_row``), so a cluster
    reads one file in parts; None: the whole file.
    """
    for index, row in enumerate(_rows(path, source, row_groups), first_row):
        doc = row_to_document(row, f"{path}#{index}", source, on_dead_letter)
        if doc is not None:
            yield doc


def row_group_rows(path: Path) -> list[int]:
    """Rows in each row group of the file (footer only)."""
    with _parquet_file(path) as pf:
        return [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]


def check_parquet(path: Path, source: SourceConfig) -> None:
    """Read only the footer: is it Parquet, and are the needed columns there?"""
    with _parquet_file(path) as pf:
        projection(source, pf.schema_arrow.names, str(path))


def _rows(path: Path, source: SourceConfig, row_groups: list[int] | None
          ) -> Iterator[dict[str, Any]]:
    """Rows of only the needed columns, one bounded batch in memory at a time."""
    with _parquet_file(path) as pf:
        columns = projection(source, pf.schema_arrow.names, str(path))
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns,
                                     row_groups=row_groups):
            yield from batch.to_pylist()


@contextmanager
def _parquet_file(path: Path) -> Iterator[pq.ParquetFile]:
    """The open file; an Arrow failure, on opening or mid-read, is terminal and names the file."""
    try:
        with pq.ParquetFile(path) as pf:
            yield pf
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file: {one_line(e)}") from None
