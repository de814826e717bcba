"""JSON-lines files (``.jsonl``, ``.json``, gzipped or not), streamed line by line."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, one_line
from pipeline.job.sections import SourceConfig
from pipeline.readers.rows import BadRow, reject, row_to_document
from pipeline.records import DeadLetter, Document


def read_jsonl(path: Path, source: SourceConfig,
               on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    """Documents from one JSON-lines file; ``source`` is ``file:LINE`` (1-based)."""
    for lineno, raw in enumerate(_raw_lines(path), 1):
        if lineno == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = _parse(raw)
        except BadRow as bad:
            reject(source, where, bad, on_dead_letter)
            continue
        doc = row_to_document(row, where, source, on_dead_letter)
        if doc is not None:
            yield doc


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Lines as bytes, so that bad UTF-8 spoils one line rather than the whole file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (OSError, EOFError, zlib.error) as e:
        # A truncated or corrupt .gz (or an unreadable file) is a file-level problem.
        raise InputError(f"{path}: cannot read: {one_line(e)}") from None


def _parse(raw: bytes) -> dict[str, Any]:
    raw = raw.rstrip(b"\r\n")  # so a JSON error's column is on this line, not the next
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start + 1})") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadRow(f"not a JSON object (got {type(row).__name__})")
    return row
