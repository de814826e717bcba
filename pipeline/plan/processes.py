"""The planner's worker processes on this host: spawned, never forked (the caller may be a
thread of a process that holds torch or CUDA), each holding the run's chunker, which reaches
it once through an inherited file; ``plan/parallel.py`` decides what they chunk and in which
order the results are used."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import reduction
from typing import IO, Any

from pipeline.chunking import Chunker
from pipeline.plan.parallel import Ahead, ChunkedGroup, chunk_group

_worker: tuple[Chunker, str] | BaseException | None = None


class _Inherited:
    """Bytes for every worker, in an unlinked temporary file that a worker inherits as a file
    descriptor while it is spawned. Not in its arguments: the caller writes those to a new
    process before it starts the next one, so megabytes there (a tokenizer) would start the
    workers one after the other. Nothing of the file outlives the pool, however it ends."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file, self.size = file, size

    @classmethod
    def of(cls, data: bytes) -> _Inherited:
        file = tempfile.TemporaryFile()
        file.write(data)
        file.flush()
        return cls(file, len(data))

    def __reduce__(self) -> tuple[Callable[[Any, int], _Inherited], tuple[Any, int]]:
        return _Inherited._inherit, (reduction.DupFd(self.file.fileno()), self.size)

    @classmethod
    def _inherit(cls, dup: Any, size: int) -> _Inherited:
        return cls(os.fdopen(dup.detach(), "rb"), size)

    def read(self) -> bytes:
        """All of it, at its own offset (``pread``): the workers share the file's."""
        parts: list[bytes] = []
        while (done := sum(map(len, parts))) < self.size:
            parts.append(os.pread(self.file.fileno(), self.size - done, done))
            if not parts[-1]:
                raise EOFError(f"{self.file.name}: cut short at {done} of {self.size} bytes")
        return b"".join(parts)


def _start_worker(state: _Inherited, parent: int) -> None:
    """Pool initializer: the chunker, once per worker. A failure to rebuild it is raised by
    the first task, so the caller gets the error itself, not a broken pool."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's stop event ends the work
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    try:
        with state.file:
            _worker = pickle.loads(state.read())
    except Exception as e:
        _worker = e


def _exit_with(parent: int) -> None:
    """End the worker when its caller is gone (killed): nothing else would, since it waits
    for work on a pipe it holds both ends of."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _chunk_group(docs: list[tuple[str, str, str]]) -> ChunkedGroup:
    """Chunk (doc id, text, source) triples in a worker."""
    if not isinstance(_worker, tuple):
        raise _worker or RuntimeError("planner worker not initialized")
    return chunk_group(*_worker, docs)


class ChunkPool:
    """The worker processes, spawned with the chunker; killed at once on an early exit."""

    def __init__(self, chunker: Chunker, fingerprint: str, processes: int) -> None:
        self.state = _Inherited.of(pickle.dumps((chunker, fingerprint)))
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker,
                                        initargs=(self.state, os.getpid()))
        self.processes = processes

    def submit(self, docs: list[Ahead]) -> Future[ChunkedGroup]:
        return self.pool.submit(_chunk_group, [(a.doc.doc_id, a.doc.text, a.doc.source)
                                               for a in docs])

    def close(self, finished: bool) -> None:
        """Shut the pool down; when planning ended early, without waiting for the workers:
        one may be minutes into a huge document."""
        # private, but the one handle on the workers before Python 3.14's terminate_workers()
        workers = [] if finished else list((self.pool._processes or {}).values())
        for p in workers:
            p.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for p in workers:
            p.join()
        self.state.file.close()


