"""The values that flow between stages: documents in, chunks through, dead letters out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Verification counts vectors per first hex digit of their document's content hash: cheap on
# every destination (16 filtered counts), and a lost window or a foreign writer shows up.
HASH_BUCKETS = "0123456789abcdef"

# chunk counts in the plan's and the sync state's document records that are not counts
SKIPPED_UNCHANGED = -1  # the published generation holds this exact content
DUPLICATE = -2  # a later row with an id already seen (dead-lettered)
UNREADABLE = -3  # a row that named this id but could not be read (kept as published)


def make_batch_id(window: int, index: int) -> str:
    """A batch's id in the plan: its window and its place in it (``w00003-b000012``)."""
    return f"w{window:05d}-b{index:06d}"


def window_of(batch_id: str) -> int:
    return int(batch_id[1:6])


def padded_size(rows: int, longest: int) -> int:
    """What a batch costs the accelerator when every row is padded to its longest one (the
    plan's token budget is in these units)."""
    return rows * longest


def padded_tokens(seqs: Sequence[Sequence[int]]) -> int:
    """``padded_size`` of a batch of token-id sequences."""
    return padded_size(len(seqs), max((len(s) for s in seqs), default=0))


def content_hash(text: str, metadata: dict[str, Any] | None = None) -> str:
    """Stable hash of what a document says: its text plus the metadata stored beside it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(text.encode("utf-8", "surrogatepass"))
    if metadata:
        h.update(b"\x00")
        h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Document:
    """One row of the corpus.

    ``source`` names where it came from (``file:line`` or ``file#row``) so that every
    error and dead letter can point at the exact place.
    """

    doc_id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        return content_hash(self.text, self.metadata)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document, as the exact token ids the model will see.

    ``token_ids`` include the model's special tokens (CLS/SEP or Qwen3's EOS), so
    ``n_tokens`` is the count that batching budgets and the embedder computes on.
    ``start``/``end`` are character offsets into the document's text.
    """

    doc_id: str
    chunk_index: int
    start: int
    end: int
    token_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class DeadLetter:
    """A row or chunk that could not be embedded, with the reason, for the dead-letter file."""

    doc_id: str | None
    source: str
    reason: str
    chunk_index: int | None = None
