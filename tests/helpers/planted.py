"""Faults planted behind the product's back in a built Parquet index (a copy of it, so a
module's one build serves every test): what ``audit`` must find and ``--repair`` must fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa

from helpers.rows import published_version


def copied_job(built: Path, tmp_path: Path) -> Path:
    """A copy of a built job's directory (job file, state, vectors): the copy's job file."""
    shutil.copytree(built.parent, tmp_path / "job")
    return tmp_path / "job" / built.name


def published_files(job: Path) -> list[Path]:
    """The Parquet files of the version the job's ``vectors`` directory publishes."""
    version = published_version(job.parent / "vectors")
    assert version is not None
    return sorted(version.glob("*.parquet"))


def with_value(table: pa.Table, name: str, row: int, value: object) -> pa.Table:
    """``table`` with one cell of column ``name`` replaced."""
    values = table.column(name).to_pylist()
    values[row] = value
    field = table.schema.field(name)
    return table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
