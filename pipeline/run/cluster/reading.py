"""Reading and chunking on the cluster, in the plan's order.

Reading: Ray Data runs one task per part of the source (a JSON-lines file, or a run of a
Parquet file's row groups), each through the product's own reader, so ids, text, metadata,
``source`` positions and dead letters are exactly a local run's; the driver takes the parts
back in order (``preserve_order``) and plans them. A ``datasets`` source is read by the
driver (``datasets`` streams it) and only chunked on the cluster.

Chunking: the driver decides, in document order, what is chunked at all (duplicates, ids
too long, unchanged documents: ``plan/parallel.py``), and sends groups of documents to Ray
tasks, which return the chunks; so the plan is the same bytes as a local run's.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chunking import Chunker
from pipeline.job.sections import SourceConfig
from pipeline.plan.parallel import Ahead, ChunkedGroup, chunk_group
from pipeline.readers import file_readers, read_documents
from pipeline.readers.jsonl import read_jsonl
from pipeline.readers.parquet import read_parquet, row_group_rows
from pipeline.records import DeadLetter, Document
from pipeline.run.cluster.session import cause, import_ray

PART_ROWS = 16_384  # Parquet rows a reading task, in whole row groups
OUT_ROWS = 2_048  # documents a block a reading task hands back


@dataclass(frozen=True)
class Part:
    """What one reading task reads: a JSON-lines file, or row groups of a Parquet file."""

    path: str
    row_groups: tuple[int, ...] | None = None  # None: a JSON-lines file, whole
    first_row: int = 0


def source_parts(source: SourceConfig, resolve: Callable[[str], Path]) -> list[Part]:
    """The file source in reading order, cut into parts (Parquet at row-group boundaries)."""
    parts: list[Part] = []
    for path, reader in file_readers(source, resolve):
        if reader is not read_parquet:
            parts.append(Part(str(path)))
            continue
        groups: list[int] = []
        first = rows = 0
        for i, n in enumerate(row_group_rows(path)):
            if groups and rows + n > PART_ROWS:
                parts.append(Part(str(path), tuple(groups), first))
                first, groups, rows = first + rows, [], 0
            groups.append(i)
            rows += n
        parts.append(Part(str(path), tuple(groups), first))
    return parts


def _read_part(batch: dict[str, Any], source: SourceConfig) -> Iterator[dict[str, list[bytes]]]:
    """A Ray Data task: the part's documents and dead letters, pickled, in reading order."""
    (blob,) = batch["part"]
    part: Part = pickle.loads(blob)
    out: list[bytes] = []
    letter = lambda d: out.append(pickle.dumps(d))
    docs = read_jsonl(Path(part.path), source, letter) if part.row_groups is None else \
        read_parquet(Path(part.path), source, letter, list(part.row_groups), part.first_row)
    for doc in docs:
        out.append(pickle.dumps(doc))
        if len(out) >= OUT_ROWS:
            yield {"item": out}
            out = []
    yield {"item": out}


def cluster_documents(source: SourceConfig, resolve: Callable[[str], Path],
                      on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    """Every document of the source in a local run's order, read on the cluster."""
    if source.kind == "hf":
        yield from read_documents(source, resolve, on_dead_letter)
        return
    ray = import_ray()
    parts = source_parts(source, resolve)
    if not parts:
        return
    ds = ray.data.from_items([{"part": pickle.dumps(p)} for p in parts],
                             override_num_blocks=len(parts))
    ds = ds.map_batches(_read_part, batch_size=1, fn_kwargs={"source": source}, num_cpus=0.5)
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in block.column("item").to_pylist():
                item = pickle.loads(blob)
                if isinstance(item, DeadLetter):
                    on_dead_letter(item)
                else:
                    yield item
    except Exception as e:  # a file that breaks: the reader's own one-line error
        raise cause(e) from None


_chunkers: dict[str, tuple[Chunker, str]] = {}  # per worker process: the run's chunker


def _chunk_on_worker(state: list[Any], docs: list[tuple[str, str, str]]) -> ChunkedGroup:
    """A Ray task: chunk a group. ``state`` holds the reference to the (chunker,
    fingerprint), fetched once per worker process, not once per task."""
    ray = import_ray()
    (ref,) = state
    key = ref.hex()
    if key not in _chunkers:
        _chunkers.clear()
        _chunkers[key] = pickle.loads(ray.get(ref))
    return chunk_group(*_chunkers[key], docs)


class ClusterChunkPool:
    """``plan/parallel.py``'s pool on Ray tasks: groups submitted in order, results as
    futures; a task whose worker dies is retried by Ray."""

    def __init__(self, chunker: Chunker, fingerprint: str, processes: int) -> None:
        ray = self._ray = import_ray()
        self.processes = processes
        self._state = [ray.put(pickle.dumps((chunker, fingerprint)))]
        self._task = ray.remote(_chunk_on_worker).options(num_cpus=1, max_retries=3)
        self._out: dict[Any, Future[ChunkedGroup]] = {}

    def submit(self, docs: list[Ahead]) -> Future[ChunkedGroup]:
        ref = self._task.remote(self._state, [(a.doc.doc_id, a.doc.text, a.doc.source)
                                              for a in docs])
        mine: Future[ChunkedGroup] = Future()
        self._out[ref] = mine
        ref.future().add_done_callback(lambda f: self._settle(ref, f, mine))
        return mine

    def _settle(self, ref: Any, done: Future[ChunkedGroup], mine: Future[ChunkedGroup]) -> None:
        self._out.pop(ref, None)
        error = done.exception()
        if error is not None:
            mine.set_exception(cause(error))
        else:
            mine.set_result(done.result())

    def close(self, finished: bool) -> None:
        """Cancel what is still running when planning ended early."""
        for ref in list(self._out):
            self._ray.cancel(ref, force=True)
        self._out.clear()
