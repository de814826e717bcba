"""Chunking in worker processes, so that planning keeps up with the accelerator.

Tokenizing is nearly all of a plan's cost, and the one step that does not depend on the
documents before it. So only that step moves: workers turn groups of texts into chunks
(token ids, spans and primary keys, as compact arrays). The calling process reads the
source, asks ahead and in reading order what decides whether a document is chunked at all
(its id already seen or too long, the unchanged lookup), and takes the groups back in
submission order (``read_ahead``); ``build_plan`` then decides everything in document order
exactly as it does alone, so the plan is the same bytes whatever the number of processes.

Where groups are chunked is a ``Pool``: this host's worker processes (``plan/processes.py``)
or a Ray cluster's tasks (``run/cluster/reading.py``). What is read ahead is bounded, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import itertools
import json
import threading
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np

from pipeline.chunking import Chunker
from pipeline.keys import chunk_pk
from pipeline.plan.batching import PlanRow
from pipeline.records import DeadLetter, Document

GROUP_CHARS = 1 << 20  # characters a task: about a second of one core's tokenizing
FIRST_GROUP_CHARS = 1 << 15  # the first groups are small and grow: the first window is quick
IN_FLIGHT = 2  # groups queued or running per process: a worker never waits for the caller

Outcome = int | DeadLetter | BaseException  # a document's chunk count, or why it has none
Lookup = Callable[[str, str], bool]  # (doc id, content hash) -> skip as unchanged
RowsOf = Callable[[Document, str], "list[PlanRow] | DeadLetter"]  # a document's rows
# a document to plan: its content hash if known, its unchanged lookup, its rows
Planned = tuple[Document, "str | None", "Lookup | None", RowsOf]


@dataclass
class ChunkedGroup:
    """What a worker returns for a group: one outcome per document sent (an exception ends
    the group, as it would end planning there), then every chunk of the group in order."""

    outcomes: list[Outcome]
    pks: list[str]
    spans: np.ndarray  # int64 (chunks, 2): start, end characters
    lengths: np.ndarray  # int32 tokens a chunk, special tokens included
    ids: np.ndarray  # int32, the chunks' token ids one after the other
    trace: str | None = None  # the worker's traceback of the exception, if any


class WorkerTraceback(Exception):
    """The ``__cause__`` of an exception raised in a worker: its traceback there."""


@dataclass
class Ahead:
    """A document read ahead of planning, with what was found for it out of order."""

    doc: Document
    doc_hash: str
    skip: bool | BaseException  # triage's answer: not to be chunked (or the lookup's error)
    rows: list[PlanRow] | DeadLetter | BaseException | None = None  # None: not chunked


def chunk_group(chunker: Chunker, fingerprint: str, docs: list[tuple[str, str, str]]
                ) -> ChunkedGroup:
    """Chunk (doc id, text, source) triples: what a worker (or a cluster's task) does."""
    outcomes: list[Outcome] = []
    pks: list[str] = []
    spans: list[int] = []
    lengths: list[int] = []
    ids: list[list[int]] = []
    trace = None
    for doc_id, text, source in docs:
        try:
            chunks = chunker.chunk(Document(doc_id, text, source))
        except Exception as e:
            outcomes.append(e)
            trace = traceback.format_exc()
            break
        if isinstance(chunks, DeadLetter):
            outcomes.append(chunks)
            continue
        outcomes.append(len(chunks))
        for c in chunks:
            pks.append(chunk_pk(fingerprint, doc_id, c.chunk_index))
            spans += (c.start, c.end)
            lengths.append(len(c.token_ids))
            ids.append(c.token_ids)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(lengths))
    return ChunkedGroup(outcomes, pks, np.array(spans, np.int64).reshape(-1, 2),
                        np.array(lengths, np.int32), flat, trace)


def _attach_rows(group: list[Ahead], result: ChunkedGroup, store_text: bool) -> None:
    """Give each chunked document of the group its plan rows (or its dead letter, or the
    exception that stopped chunking there)."""
    sent = [a for a in group if a.skip is False]
    starts = np.concatenate([[0], np.cumsum(result.lengths)]).tolist()
    spans = result.spans.tolist()
    j = 0
    for a, outcome in zip(sent, result.outcomes):
        if not isinstance(outcome, int):
            if isinstance(outcome, BaseException) and result.trace:
                outcome.__cause__ = WorkerTraceback(result.trace)
            a.rows = outcome
            continue
        doc = a.doc
        metadata = json.dumps(doc.metadata, ensure_ascii=False, default=str)
        a.rows = [PlanRow(pk=result.pks[k], doc_id=doc.doc_id, chunk_index=k - j,
                          start=spans[k][0], end=spans[k][1],
                          token_ids=result.ids[starts[k]:starts[k + 1]], doc_hash=a.doc_hash,
                          text=doc.text[spans[k][0]:spans[k][1]] if store_text else None,
                          metadata=metadata, source=doc.source)
                  for k in range(j, j + outcome)]
        j += outcome


class Pool(Protocol):
    """Where groups are chunked: this host's worker processes, or a cluster."""

    processes: int  # groups chunked at once

    def submit(self, docs: list[Ahead]) -> Future[ChunkedGroup]: ...

    def close(self, finished: bool) -> None: ...


PoolFactory = Callable[[Chunker, str], Pool]  # (chunker, fingerprint) -> pool


@dataclass
class _Group:
    """Documents sent to one task, each with the reader's dead letters of the rows before it."""

    docs: list[tuple[Ahead, list[DeadLetter]]]
    chars: int
    future: Future[ChunkedGroup] | None  # None: nothing in it to chunk


def read_ahead(docs: Iterator[Document], pool: Pool, store_text: bool,
               known: Callable[[str], bool], unchanged: Lookup | None, max_id_bytes: int | None,
               letters: Callable[[], list[DeadLetter]],
               deliver: Callable[[list[DeadLetter]], None], limit: int | None,
               stop: threading.Event | None) -> Generator[Planned, None, None]:
    """``build_plan``'s documents in reading order, each once its group is chunked, with what
    was found for it ahead of its turn: (document, content hash, lookup, rows); an error
    found ahead (the lookup's, a worker's) is raised at its turn.

    Asked ahead, in reading order: the checks ``build_plan`` makes before chunking (``known``:
    the ids it has planned; ``max_id_bytes``; ``unchanged``), to chunk only what it will plan;
    and ``letters``, after each read, for the reader's dead letters of the rows before that
    document. Those are handed to ``deliver`` just before the document is yielded, the last
    ones after the last document: when planning alone would have met them. At most ``limit``
    + 1 documents are read, as planning alone reads them (the last only to learn that the
    source goes on). What the reader raises is raised after the documents before it. Once
    ``stop`` is set nothing more is read or waited for: the documents still yielded are
    never planned. Read ahead: at most ``IN_FLIGHT`` groups a process, and about as many
    times ``GROUP_CHARS`` characters (a group more at most).
    """
    groups: deque[_Group] = deque()
    most = IN_FLIGHT * pool.processes
    size = FIRST_GROUP_CHARS
    ahead: set[str] = set()  # ids read ahead of planning, which ``known`` does not know yet
    failure: BaseException | None = None
    tail: list[DeadLetter] = []  # the reader's letters after the last document read
    read = 0
    more = True

    def triage(doc: Document, doc_hash: str) -> bool | BaseException:
        """True (or the lookup's error) when the document will not be chunked."""
        if doc.doc_id in ahead or known(doc.doc_id):
            return True  # a duplicate
        ahead.add(doc.doc_id)
        if max_id_bytes is not None and len(doc.doc_id.encode("utf-8", "surrogatepass")) \
                > max_id_bytes:
            return True
        try:
            return unchanged is not None and unchanged(doc.doc_id, doc_hash)
        except Exception as e:
            return e

    def fill() -> None:
        nonlocal size, failure, read, more
        while more and len(groups) < most and sum(g.chars for g in groups) < most * GROUP_CHARS:
            # once stopped, one document more (if none is left to yield): planning alone too
            # reads the next one before it stops, and ends the plan if there is none
            stopped = stop is not None and stop.is_set()
            if stopped and groups:
                return
            group: list[tuple[Ahead, list[DeadLetter]]] = []
            chars = 0
            while chars < size:
                try:
                    doc = next(docs)
                except StopIteration:
                    more = False
                except Exception as e:
                    more, failure = False, e
                if not more:
                    tail.extend(letters())
                    break
                read += 1
                if stopped or (limit is not None and read > limit):  # never to be planned
                    group.append((Ahead(doc, "", True), letters()))
                    more = stopped  # past the limit, planning alone reads no further either
                    break
                doc_hash = doc.content_hash
                group.append((Ahead(doc, doc_hash, triage(doc, doc_hash)), letters()))
                chars += len(doc.text)
            sent = [a for a, _ in group if a.skip is False]
            groups.append(_Group(group, chars, pool.submit(sent) if sent else None))
            size = min(2 * size, GROUP_CHARS)
            if stopped:
                return

    fill()
    while groups:
        group = groups.popleft()
        fill()
        if group.future is not None:
            result = _wait(group.future, stop)
            if result is not None:
                _attach_rows([a for a, _ in group.docs], result, store_text)
        for a, before in group.docs:
            deliver(before)
            yield (a.doc, a.doc_hash, None if unchanged is None else partial(_answer, a.skip),
                   partial(_found, a))
            ahead.discard(a.doc.doc_id)
    deliver(tail)
    if failure is not None:
        raise failure


def _answer(skip: bool | BaseException, _doc_id: str, _doc_hash: str) -> bool:
    """The unchanged lookup, asked ahead of its turn."""
    if isinstance(skip, BaseException):
        raise skip
    return skip


def _found(a: Ahead, _doc: Document, _doc_hash: str) -> list[PlanRow] | DeadLetter:
    """The rows chunked ahead of their turn."""
    if isinstance(a.rows, BaseException):
        raise a.rows
    if a.rows is None:
        raise AssertionError(f"{a.doc.source}: planned but never chunked")
    return a.rows


def _wait(future: Future[ChunkedGroup], stop: threading.Event | None) -> ChunkedGroup | None:
    """The group's result; None once ``stop`` is set."""
    while True:
        try:
            return future.result(timeout=None if stop is None else 0.1)
        except FutureTimeout:
            if stop is not None and stop.is_set():
                return None
