"""Phase one of a run: read, chunk and write the plan, window by window.

Runs in its own thread so the executor can embed window N while window N+1 is being
tokenized. Resumes after the last window on disk: the reader is deterministic, so skipping
the documents that earlier windows hold lands exactly where the plan stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.chunking import Chunker
from pipeline.config import BatchingConfig
from pipeline.errors import InputError
from pipeline.faults import fault_point
from pipeline.keys import chunk_pk
from pipeline.planning import (DUPLICATE, SKIPPED_UNCHANGED, PlanRow, PlanStore, WindowBuilder,
                               WindowStats)
from pipeline.records import DeadLetter, Document


class SeenIds:
    """Doc ids met so far, as sorted 64-bit hashes: 8 bytes a document, not a Python set."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._window: dict[int, str] = {}

    @staticmethod
    def _hash(doc_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"),
                                              digest_size=8).digest(), "little")

    def first_seen(self, doc: Document) -> str | None:
        """Where this id was seen before (a source, or 'an earlier window'), else None."""
        h = self._hash(doc.doc_id)
        if h in self._window:
            return self._window[h]
        i = np.searchsorted(self._sorted, np.uint64(h))
        if i < len(self._sorted) and self._sorted[i] == h:
            return "an earlier window"
        self._window[h] = doc.source
        return None

    def add_ids(self, doc_ids: Iterator[str]) -> None:
        new = np.fromiter((self._hash(d) for d in doc_ids), dtype=np.uint64)
        self._sorted = np.union1d(self._sorted, new)

    def seal_window(self) -> None:
        new = np.fromiter(self._window.keys(), dtype=np.uint64, count=len(self._window))
        self._sorted = np.union1d(self._sorted, new)
        self._window.clear()


def build_plan(docs: Iterator[Document], chunker: Chunker, store: PlanStore,
               batching: BatchingConfig, fingerprint: str, store_text: bool,
               dead_letter: Callable[[DeadLetter], None], on_window: Callable[[WindowStats], None],
               limit: int | None = None, stop: threading.Event | None = None,
               published: Callable[[str], tuple[str, int] | None] | None = None,
               on_bad_row: str = "dead_letter") -> None:
    """Append windows to ``store`` until the source (or ``limit`` documents) is exhausted;
    the store's completion marker says which.

    With ``published`` (doc id -> stored (hash, chunk count)), a document whose content hash
    is unchanged is recorded as skipped without being tokenized. A duplicate id is a bad row:
    dead-lettered, or an InputError with ``on_bad_row="error"``.
    """
    def dead_or_raise(letter: DeadLetter) -> None:
        if on_bad_row == "error":
            raise InputError(f"{letter.source}: {letter.reason}")
        dead_letter(letter)

    done = store.all_stats()
    doc_offset = done[-1].doc_end if done else 0
    seen = SeenIds()
    for s in done:
        seen.add_ids(d for d, _, _ in store.doc_records(s.window))
    if limit is not None and doc_offset >= limit:
        return
    remaining = None if limit is None else limit - doc_offset
    window = WindowBuilder(window=len(done), doc_start=doc_offset)

    def flush() -> None:
        nonlocal window
        table, stats = window.build(batching.token_budget, batching.max_batch_size)
        store.write_window(table, stats, window.doc_records)
        seen.seal_window()
        fault_point("after_plan_window")
        on_window(stats)
        window = WindowBuilder(window=stats.window + 1, doc_start=stats.doc_end)

    exhausted = True
    for doc in itertools.islice(docs, doc_offset, None):
        if stop is not None and stop.is_set():
            return
        if remaining is not None and remaining <= 0:
            exhausted = False
            break
        if remaining is not None:
            remaining -= 1
        fault_point("after_read")
        window.add(*_plan_doc(doc, chunker, seen, fingerprint, store_text, dead_letter,
                              dead_or_raise, published))
        fault_point("after_chunk")
        # documents skipped as unchanged cost no rows, so bound the window by documents too
        size = min(batching.first_window, batching.sort_window) if window.window == 0 \
            else batching.sort_window
        if (len(window.rows) >= size or window.tokens >= batching.window_tokens
                or window.docs >= 4 * size):
            flush()
    if window.docs:
        flush()
    if exhausted:
        store.mark_complete({"docs": window.doc_start})


def _plan_doc(doc: Document, chunker: Chunker, seen: SeenIds, fingerprint: str,
              store_text: bool, dead_letter: Callable[[DeadLetter], None],
              bad_row: Callable[[DeadLetter], None], published: Callable[[str], tuple[str, int] | None] | None
              ) -> tuple[list[PlanRow], tuple[str, str, int]]:
    """A document's plan rows and its record; duplicates and unchunkable ones go to the dead
    letters.

    Every document counts towards the window's document range, embedded or not, so that
    resume offsets stay in step with the reader.
    """
    doc_hash = doc.content_hash
    first = seen.first_seen(doc)
    if first is not None:
        # the first occurrence owns the id: this one leaves no record that could override it
        bad_row(DeadLetter(doc.doc_id, doc.source, f"duplicate id, first seen at {first}"))
        return [], (doc.doc_id, doc_hash, DUPLICATE)
    if published is not None:
        stored = published(doc.doc_id)
        if stored is not None and stored[0] == doc_hash and stored[1] > 0:
            return [], (doc.doc_id, doc_hash, SKIPPED_UNCHANGED)
    chunks = chunker.chunk(doc)
    if isinstance(chunks, DeadLetter):
        dead_letter(chunks)
        return [], (doc.doc_id, doc_hash, 0)
    metadata = json.dumps(doc.metadata, ensure_ascii=False, default=str)
    rows = [PlanRow(pk=chunk_pk(fingerprint, doc.doc_id, c.chunk_index), doc_id=doc.doc_id,
                    chunk_index=c.chunk_index, start=c.start, end=c.end,
                    token_ids=np.asarray(c.token_ids, dtype=np.int32), doc_hash=doc_hash,
                    text=doc.text[c.start:c.end] if store_text else None, metadata=metadata,
                    source=doc.source)
            for c in chunks]
    return rows, (doc.doc_id, doc_hash, len(rows))
