"""Readers: a source from the job file in, a stream of Documents out.

File sources pick a reader by extension (like ``datasets``' extension-to-builder map)
unless ``source.kind`` says otherwise; ``kind: hf`` reads through ``datasets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import InputError
from pipeline.job.sections import SourceConfig
from pipeline.readers.hf import read_hf
from pipeline.readers.jsonl import read_jsonl
from pipeline.readers.parquet import check_parquet, read_parquet
from pipeline.readers.rows import expand_paths
from pipeline.records import DeadLetter, Document

FileReader = Callable[[Path, SourceConfig, Callable[[DeadLetter], None]], Iterator[Document]]

# Longest extensions first, so that '.jsonl.gz' wins over a shorter match.
READERS_BY_EXTENSION: dict[str, FileReader] = {
    ".jsonl.gz": read_jsonl,
    ".json.gz": read_jsonl,
    ".parquet": read_parquet,
    ".jsonl": read_jsonl,
    ".json": read_jsonl,
}
READERS_BY_KIND: dict[str, FileReader] = {"jsonl": read_jsonl, "parquet": read_parquet}
# Checks that cost no row reads; JSON lines have no header to check.
_CHECKS: dict[FileReader, Callable[[Path, SourceConfig], None]] = {read_parquet: check_parquet}

__all__ = ["check_source", "read_documents", "source_files", "file_readers",
           "READERS_BY_EXTENSION", "READERS_BY_KIND"]


def read_documents(source: SourceConfig, resolve: Callable[[str], Path],
                   on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    """Every document of the source, in a deterministic order.

    Files are found and their readers chosen now, so that a missing file or an unknown
    type fails before any work starts; rows are read lazily as the iterator is consumed.
    """
    if source.kind == "hf":
        return read_hf(source, resolve, on_dead_letter)
    return _read_files(file_readers(source, resolve), source, on_dead_letter)


def source_files(source: SourceConfig, resolve: Callable[[str], Path]) -> list[Path] | None:
    """The files a file source reads, in reading order (None for a datasets source)."""
    if source.kind == "hf":
        return None
    return [path for path, _ in file_readers(source, resolve)]


def check_source(source: SourceConfig, resolve: Callable[[str], Path]) -> None:
    """Raise InputError if the source cannot be read, without reading rows (``validate``).

    Files must exist and have a known type, Parquet footers must name the needed columns;
    a datasets source is opened streaming, so that checking never downloads or prepares it.
    """
    if source.kind == "hf":
        read_hf(source.model_copy(update={"streaming": True}), resolve, _ignore)
        return
    for path, reader in file_readers(source, resolve):
        check = _CHECKS.get(reader)
        if check is not None:
            check(path, source)


def file_readers(source: SourceConfig, resolve: Callable[[str], Path]
                 ) -> list[tuple[Path, FileReader]]:
    """Each file of a file source, in reading order, with the reader it is read with."""
    suffixes = [ext for ext, reader in READERS_BY_EXTENSION.items()
                if source.kind is None or reader is READERS_BY_KIND[source.kind]]
    return [(path, _reader_for(path, source.kind))
            for path in expand_paths(source.paths(), resolve, suffixes)]


def _read_files(plan: list[tuple[Path, FileReader]], source: SourceConfig,
                on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    for path, reader in plan:
        yield from reader(path, source, on_dead_letter)


def _reader_for(path: Path, kind: str | None) -> FileReader:
    if kind is not None:
        return READERS_BY_KIND[kind]
    name = path.name.lower()
    for extension, reader in READERS_BY_EXTENSION.items():
        if name.endswith(extension):
            return reader
    raise InputError(f"{path}: unknown file type; set source.kind or use one of: "
                     f"{', '.join(READERS_BY_EXTENSION)}")


def _ignore(_: DeadLetter) -> None:
    """No rows are read while checking, so there are no dead letters to keep."""
