"""Row values shaped the same way for every sink, so Parquet output imports into Milvus as is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import SinkError
from pipeline.sinks.base import VectorBatch

# Milvus VARCHAR max_length counts UTF-8 bytes on a server (Lite counts characters).
MAX_DOC_ID_BYTES = 1024  # the doc_id field's max_length: a server counts UTF-8 bytes
MAX_VARCHAR_BYTES = 65535


@dataclass(frozen=True)
class Columns:
    """A batch's values as every sink stores them, checked once (the ids are the batch's)."""

    vectors: np.ndarray  # (rows, dimension) finite float32
    texts: list[str] | None  # None when the sink does not store text
    metadata: list[str]  # canonical JSON, one per row


def columns(batch: VectorBatch, dimension: int, store_text: bool, where: str) -> Columns:
    """The batch's stored values, or a SinkError naming ``where`` and what is wrong."""
    vectors = checked_vectors(batch.vectors, len(batch), dimension, where)
    texts = None
    if store_text:
        if batch.texts is None:
            raise SinkError(f"{where}: the batch has no texts but sink.store_text is on")
        texts = [truncate_utf8(t) for t in batch.texts]
    metadata = [metadata_json(m, where) for m in batch.metadata or [{}] * len(batch)]
    return Columns(vectors, texts, metadata)


def truncate_utf8(text: str, max_bytes: int = MAX_VARCHAR_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, at a character boundary.

    Lone surrogates (possible in decoded input) become '?' since Milvus needs valid UTF-8.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "replace")
    else:
        if len(data) <= max_bytes:
            return text
    return data[:max_bytes].decode("utf-8", "ignore")


def metadata_json(metadata: dict[str, Any], where: str) -> str:
    """Metadata as canonical JSON text; NaN/Infinity are refused because stores reject them."""
    try:
        return json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=_json_default,
                          allow_nan=False)
    except ValueError as e:
        raise SinkError(f"{where}: metadata is not valid JSON: {e}") from None


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays as numbers/lists; anything else (dates...) as its text."""
    return value.tolist() if isinstance(value, (np.generic, np.ndarray)) else str(value)


def checked_vectors(vectors: np.ndarray, rows: int, dimension: int, where: str) -> np.ndarray:
    """The batch's vectors as (rows, dimension) finite float32, or a SinkError.

    Milvus Lite stores NaN silently while a server refuses it: check here for the same
    behaviour everywhere.
    """
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape != (rows, dimension):
        raise SinkError(
            f"{where}: vectors have shape {tuple(v.shape)}, expected ({rows}, {dimension})")
    if not np.isfinite(v).all():
        raise SinkError(f"{where}: vectors contain NaN or infinity")
    return v
