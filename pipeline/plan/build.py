"""Phase one of a run: read, chunk and write the plan, window by window.

Runs in its own thread so the executor can embed window N while window N+1 is being
tokenized; with ``processes`` > 1 the tokenizing itself runs in worker processes
(``pipeline.plan.parallel``) and everything else stays here, in document order. Resumes
after the last window on disk: ``verify_prefix`` reads the documents the plan already holds
again and compares each one (id and content hash) with the plan's own records, so a source
that changed under an unfinished plan is noticed, never misaligned.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.chunking import Chunker
from pipeline.errors import InputError
from pipeline.faults import fault_point
from pipeline.job.sections import BatchingConfig
from pipeline.keys import chunk_pk
from pipeline.plan.batching import PlanRow, WindowBuilder, WindowStats
from pipeline.plan.parallel import Lookup, Planned, Pool, PoolFactory, RowsOf, read_ahead
from pipeline.plan.processes import ChunkPool
from pipeline.plan.store import PlanStore
from pipeline.records import (
    DUPLICATE,
    SKIPPED_UNCHANGED,
    UNREADABLE,
    Chunk,
    DeadLetter,
    Document,
)


class SeenIds:
    """Doc ids met so far, as sorted 64-bit hashes: 8 bytes a document, not a Python set."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._window: dict[int, str] = {}

    @staticmethod
    def _hash(doc_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"),
                                              digest_size=8).digest(), "little")

    def _sealed(self, h: int) -> bool:
        i = np.searchsorted(self._sorted, np.uint64(h))
        return bool(i < len(self._sorted) and self._sorted[i] == h)

    def first_seen(self, doc: Document) -> str | None:
        """Where this id was seen before (a source, or 'an earlier window'), else None."""
        h = self._hash(doc.doc_id)
        if h in self._window:
            return self._window[h]
        if self._sealed(h):
            return "an earlier window"
        self._window[h] = doc.source
        return None

    def holds(self, doc_id: str) -> bool:
        """Whether the id was seen before, without recording it."""
        h = self._hash(doc_id)
        return h in self._window or self._sealed(h)

    def add_ids(self, doc_ids: Iterator[str]) -> None:
        new = np.fromiter((self._hash(d) for d in doc_ids), dtype=np.uint64)
        self._sorted = np.union1d(self._sorted, new)

    def seal_window(self) -> None:
        new = np.fromiter(self._window.keys(), dtype=np.uint64, count=len(self._window))
        self._sorted = np.union1d(self._sorted, new)
        self._window.clear()


@dataclass
class RejectedRows:
    """The reader's dead-letter callback, remembering what the plan must know of each rejected
    row of the window being planned: its id when the row named one (the document is present,
    so it is never deleted as missing), or only that a row could not be read at all (then
    nothing may be deleted)."""

    dead_letter: Callable[[DeadLetter], None]
    letters: list[DeadLetter] = field(default_factory=list)
    # while documents are read ahead of planning (several processes): letters not yet due
    held: list[DeadLetter] | None = None

    def __call__(self, letter: DeadLetter) -> None:
        if self.held is not None:
            self.held.append(letter)
        else:
            self.deliver([letter])

    def deliver(self, letters: list[DeadLetter]) -> None:
        """Letters whose rows' turn has come."""
        for letter in letters:
            self.dead_letter(letter)
            self.letters.append(letter)

    def take_held(self) -> list[DeadLetter]:
        held, self.held = self.held or [], []
        return held

    def take(self) -> tuple[list[str], int]:
        """The window's (ids of named rows, count of unnamed rows); the next window starts."""
        ids = [d.doc_id for d in self.letters if d.doc_id is not None]
        unnamed = len(self.letters) - len(ids)
        self.letters = []
        return ids, unnamed

    def replay(self) -> None:
        """Send the window's letters again (the dead-letter file started over)."""
        for letter in self.letters:
            self.dead_letter(letter)


@dataclass(frozen=True)
class SourceChange:
    """Where the source stopped matching the plan: the first window to plan again."""

    window: int
    why: str


def verify_prefix(docs: Iterator[Document], store: PlanStore, rejected: RejectedRows,
                  end: int | None = None) -> tuple[SourceChange | None, Iterator[Document]]:
    """Read the documents the plan holds (in windows before ``end``) again, comparing each
    with the plan's record.

    Returns the first window that no longer matches (or None) and the source positioned
    where planning goes on: after those windows, or at the start of the changed window.
    """
    for s in store.all_stats()[:end]:
        rejected.take()  # rejections before this window belong to windows already planned
        buffered: list[Document] = []
        for doc_id, doc_hash, n in store.doc_records(s.window):
            if n == UNREADABLE:
                continue
            doc = next(docs, None)
            if doc is None or doc.doc_id != doc_id or doc.content_hash != doc_hash:
                why = (f"the source now ends before document {doc_id!r}" if doc is None else
                       f"{doc.source} is not the document {doc_id!r} the plan read there"
                       if doc.doc_id != doc_id else f"{doc.source}: document {doc_id!r} changed")
                rest = itertools.chain(buffered, [] if doc is None else [doc], docs)
                return SourceChange(s.window, why), rest
            buffered.append(doc)
    rejected.take()
    return None, docs


def build_plan(docs: Iterator[Document], chunker: Chunker, store: PlanStore,
               batching: BatchingConfig, fingerprint: str, store_text: bool,
               dead_letter: Callable[[DeadLetter], None], on_window: Callable[[WindowStats], None],
               limit: int | None = None, stop: threading.Event | None = None,
               unchanged: Lookup | None = None, on_bad_row: str = "dead_letter",
               rejected: RejectedRows | None = None, max_id_bytes: int | None = None,
               processes: int = 1, pool: PoolFactory | None = None) -> None:
    """Append windows to ``store`` until the source (or ``limit`` documents) is exhausted;
    the store's manifest says which.

    ``docs`` starts after the documents the store already holds (see ``verify_prefix``).
    With ``unchanged`` (doc id, content hash -> skip?), a document the published generation
    already holds is recorded as skipped without being tokenized. A duplicate id is a bad
    row: dead-lettered, or an InputError with ``on_bad_row="error"``. ``rejected`` is the
    callback the reader reports its bad rows to. ``max_id_bytes``: the destination's limit
    on a document id (a longer one is a bad row, not a failed batch). ``processes`` > 1:
    documents are chunked in that many worker processes, ahead of their turn (``unchanged``
    too is asked ahead, still in this thread and in document order); the plan and the dead
    letters are the same as with one. ``pool``: where documents are chunked instead (a
    cluster), read ahead the same way.
    """
    def dead_or_raise(letter: DeadLetter) -> None:
        if on_bad_row == "error":
            raise InputError(f"{letter.source}: {letter.reason}")
        dead_letter(letter)

    done = store.all_stats()
    doc_offset = done[-1].doc_end if done else 0
    seen = SeenIds()
    for s in done:
        seen.add_ids(d for d, _, n in store.doc_records(s.window) if n != UNREADABLE)
    if limit is not None and doc_offset >= limit:
        return
    remaining = None if limit is None else limit - doc_offset
    window = WindowBuilder(window=len(done), doc_start=doc_offset)

    def flush() -> None:
        nonlocal window
        if rejected is not None:
            ids, window.unreadable_rows = rejected.take()
            window.rejected += ids
        table, stats = window.build(batching.token_budget, batching.max_batch_size)
        store.write_window(table, stats, window.records())
        seen.seal_window()
        fault_point("after_plan_window")
        on_window(stats)
        window = WindowBuilder(window=stats.window + 1, doc_start=stats.doc_end)

    def chunk_rows(doc: Document, doc_hash: str) -> list[PlanRow] | DeadLetter:
        chunks = chunker.chunk(doc)
        return chunks if isinstance(chunks, DeadLetter) else \
            _rows(doc, doc_hash, chunks, fingerprint, store_text)

    planned: Generator[Planned, None, None]
    chunks: Pool | None = None
    if pool is not None or processes > 1:
        chunks = pool(chunker, fingerprint) if pool is not None else \
            ChunkPool(chunker, fingerprint, processes)
        if rejected is not None:
            rejected.held = []  # the reader's letters wait for their rows' turn
        planned = read_ahead(docs, chunks, store_text, seen.holds, unchanged, max_id_bytes,
                             rejected.take_held if rejected is not None else list,
                             rejected.deliver if rejected is not None else lambda _: None,
                             remaining, stop)
    else:
        planned = ((doc, None, unchanged, chunk_rows) for doc in docs)
    exhausted = True
    finished = False  # every document read was planned: no worker is busy
    try:
        for doc, doc_hash, lookup, rows_of in planned:
            if stop is not None and stop.is_set():
                return
            if remaining is not None and remaining <= 0:
                exhausted = False
                break
            if remaining is not None:
                remaining -= 1
            fault_point("after_read")
            window.add(*_plan_doc(doc, doc_hash, seen, dead_letter, dead_or_raise, lookup,
                                  max_id_bytes, rows_of))
            fault_point("after_chunk")
            # documents skipped as unchanged cost no rows, so bound the window by documents too
            size = min(batching.first_window, batching.sort_window) if window.window == 0 \
                else batching.sort_window
            if (len(window.rows) >= size or window.tokens >= batching.window_tokens
                    or window.docs >= 4 * size):
                flush()
        finished = exhausted
    finally:
        planned.close()
        if chunks is not None:
            chunks.close(finished)
        if rejected is not None:
            rejected.held = None  # letters of rows read past the end of planning: never due
    if window.docs or (rejected is not None and rejected.letters):
        flush()
    if exhausted:
        store.mark_complete()


def _plan_doc(doc: Document, doc_hash: str | None, seen: SeenIds,
              dead_letter: Callable[[DeadLetter], None], bad_row: Callable[[DeadLetter], None],
              unchanged: Lookup | None, max_id_bytes: int | None, rows_of: RowsOf
              ) -> tuple[list[PlanRow], tuple[str, str, int]]:
    """A document's plan rows and its record; duplicates and unchunkable ones go to the dead
    letters. ``doc_hash``: the content hash, if already computed.

    Every document counts towards the window's document range, embedded or not, so that
    resume offsets stay in step with the reader.
    """
    doc_hash = doc_hash or doc.content_hash
    first = seen.first_seen(doc)
    if first is not None:
        # the first occurrence owns the id: this one leaves no record that could override it
        bad_row(DeadLetter(doc.doc_id, doc.source, f"duplicate id, first seen at {first}"))
        return [], (doc.doc_id, doc_hash, DUPLICATE)
    id_bytes = len(doc.doc_id.encode("utf-8", "surrogatepass"))
    if max_id_bytes is not None and id_bytes > max_id_bytes:
        bad_row(DeadLetter(doc.doc_id[:200], doc.source, f"field id: {id_bytes} bytes, the "
                           f"destination stores at most {max_id_bytes}: shorten the ids (or use "
                           f"source.id_fallback: content_hash without an id field)"))
        return [], (doc.doc_id, doc_hash, 0)
    if unchanged is not None and unchanged(doc.doc_id, doc_hash):
        return [], (doc.doc_id, doc_hash, SKIPPED_UNCHANGED)
    rows = rows_of(doc, doc_hash)
    if isinstance(rows, DeadLetter):
        dead_letter(rows)
        return [], (doc.doc_id, doc_hash, 0)
    return rows, (doc.doc_id, doc_hash, len(rows))


def _rows(doc: Document, doc_hash: str, chunks: list[Chunk], fingerprint: str,
          store_text: bool) -> list[PlanRow]:
    metadata = json.dumps(doc.metadata, ensure_ascii=False, default=str)
    return [PlanRow(pk=chunk_pk(fingerprint, doc.doc_id, c.chunk_index), doc_id=doc.doc_id,
                    chunk_index=c.chunk_index, start=c.start, end=c.end,
                    token_ids=np.asarray(c.token_ids, dtype=np.int32), doc_hash=doc_hash,
                    text=doc.text[c.start:c.end] if store_text else None, metadata=metadata,
                    source=doc.source)
            for c in chunks]
