"""What every reader shares: finding files, choosing columns, and turning one row into a Document.

Every reader hands its rows (plain mappings) here, so id, text and metadata rules and
the bad-row policy cannot drift apart between JSONL, Parquet and datasets sources.
"""

from __future__ import annotations

import datetime
import decimal
import glob
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import SourceConfig
from pipeline.errors import InputError
from pipeline.records import DeadLetter, Document, content_hash

_MISSING = object()
_GLOB_CHARS = re.compile(r"[*?[]")
_MAX_MESSAGE = 300


class BadRow(Exception):
    """A row that cannot become a Document; ``reason`` is one line naming the field."""

    def __init__(self, reason: str, doc_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.doc_id = doc_id


def reject(source: SourceConfig, where: str, bad: BadRow,
           on_dead_letter: Callable[[DeadLetter], None]) -> None:
    """Apply ``on_bad_row``: stop with a one-line InputError, or record a dead letter."""
    if source.on_bad_row == "error":
        raise InputError(f"{where}: {bad.reason}")
    on_dead_letter(DeadLetter(doc_id=bad.doc_id, source=where, reason=bad.reason))


def row_to_document(row: Mapping[str, Any], where: str, source: SourceConfig,
                    on_dead_letter: Callable[[DeadLetter], None]) -> Document | None:
    """The row as a Document, or None after the bad-row policy has dealt with it."""
    try:
        return _build(row, where, source)
    except BadRow as bad:
        reject(source, where, bad, on_dead_letter)
        return None


def expand_paths(patterns: list[str], resolve: Callable[[str], Path]) -> list[Path]:
    """Files named by paths and globs, each glob sorted; a file named twice is read once."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        resolved = resolve(pattern)
        if _GLOB_CHARS.search(pattern):
            matches = [Path(p) for p in sorted(glob.glob(str(resolved), recursive=True))]
            matches = [p for p in matches if p.is_file()]
        else:
            matches = [resolved] if resolved.is_file() else []
        if not matches:
            raise InputError(f"{resolved}: no such file")
        files.update(dict.fromkeys(matches))
    return list(files)


def one_line(error: BaseException) -> str:
    """An exception's message on one short line, as every JobError message must be."""
    text = " ".join(str(error).split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def projection(source: SourceConfig, columns: Iterable[str], where: str) -> list[str]:
    """The columns worth reading; a missing text (or required id) column is a file-level error.

    Missing metadata columns are left out: their values become None, as in JSONL.
    """
    available = list(columns)
    required = [source.text_field]
    if source.id_fallback == "error":
        required.append(source.id_field)
    for name in required:
        if name not in available:
            raise InputError(f"{where}: column {name!r} not found; columns: {', '.join(available)}")
    wanted = [source.id_field, source.text_field, *source.metadata_fields]
    return [name for name in dict.fromkeys(wanted) if name in available]


def _build(row: Mapping[str, Any], where: str, source: SourceConfig) -> Document:
    raw_id = _plain(row.get(source.id_field, _MISSING))
    id_absent = _absence(raw_id)
    doc_id = None if id_absent else _id_string(raw_id, source.id_field)
    text = _text(_plain(row.get(source.text_field, _MISSING)), source.text_field, doc_id)
    if id_absent:
        if source.id_fallback != "content_hash":
            raise BadRow(f"field {source.id_field!r}: {id_absent}")
        doc_id = content_hash(text)
    metadata = {name: _metadata_value(row.get(name), name, doc_id)
                for name in source.metadata_fields}
    return Document(doc_id=doc_id, text=text, source=where, metadata=metadata)


def _absence(value: Any) -> str | None:
    """Why a value counts as absent ('missing', 'null', 'empty'), or None if present."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return None


def _id_string(value: Any, name: str) -> str:
    # bool is an int subclass, but True as an id is a data bug, not an id.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRow(f"field {name!r}: must be a string or an integer (got {type(value).__name__})")
    return str(value)


def _text(value: Any, name: str, doc_id: str | None) -> str:
    absent = _absence(value)
    if absent:
        raise BadRow(f"field {name!r}: {absent}", doc_id)
    if not isinstance(value, str):
        raise BadRow(f"field {name!r}: must be a string (got {type(value).__name__})", doc_id)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell lone surrogates (\ud800); no tokenizer or sink can store them.
        raise BadRow(f"field {name!r}: not valid Unicode (lone surrogate)", doc_id) from None
    return value


def _metadata_value(value: Any, name: str, doc_id: str | None) -> Any:
    try:
        return _jsonable(value)
    except TypeError as e:
        raise BadRow(f"field {name!r}: not JSON-serialisable ({e})", doc_id) from None


def _plain(value: Any) -> Any:
    """numpy and pyarrow scalars/arrays as the Python values they stand for."""
    if isinstance(value, pa.Scalar):
        return value.as_py()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _jsonable(value: Any) -> Any:
    """A value that ``json.dumps`` accepts, since metadata is stored as JSON by the sinks."""
    value = _plain(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact, unlike float
    raise TypeError(type(value).__name__)
