"""Embedding batches with out-of-memory back-off.

A batch that runs out of memory is split in halves, recursively; a single chunk that still
fails is a dead letter. The padded size that last worked becomes the *safe budget*: later
batches above it are split before they are sent, it is saved in the checkpoint so a resumed
run starts from it, and it grows back by a quarter after every run of clean batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from pipeline.embedders.base import Embedder
from pipeline.records import padded_tokens

GROW_AFTER = 32  # clean batches before the safe budget grows back
ALONE_ATTEMPTS = 3  # a single chunk that fails this often alone is a dead letter


def is_oom(e: BaseException) -> bool:
    """Host MemoryError, torch's OutOfMemoryError, or a backend's 'out of memory' RuntimeError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@dataclass
class SafeBudget:
    """Padded tokens per embedding call that are known to fit; None = the plan's own budget."""

    limit: int | None
    ceiling: int
    clean: int = 0

    def failed(self, padded: int) -> None:
        self.limit = max(1, padded // 2) if self.limit is None else min(self.limit, max(1, padded // 2))
        self.clean = 0

    def succeeded(self) -> bool:
        """Count a clean batch; True when the limit changed (and should be saved)."""
        if self.limit is None:
            return False
        self.clean += 1
        if self.clean < GROW_AFTER:
            return False
        self.clean = 0
        grown = self.limit + max(1, self.limit // 4)
        self.limit = None if grown >= self.ceiling else grown
        return True


def split_to_fit(seqs: list[list[int]], limit: int | None) -> list[tuple[int, int]]:
    """[start, end) slices of a length-sorted batch whose padded size is within ``limit``."""
    if limit is None or padded_tokens(seqs) <= limit:
        return [(0, len(seqs))]
    half = len(seqs) // 2
    if half == 0:
        return [(0, len(seqs))]
    left = split_to_fit(seqs[:half], limit)
    right = split_to_fit(seqs[half:], limit)
    return left + [(s + half, e + half) for s, e in right]


class Batch(Protocol):
    """What is embedded: the sequences of one batch, length-sorted (a plan's batch is one)."""

    @property
    def token_ids(self) -> list[list[int]]: ...


B = TypeVar("B", bound=Batch)


class ResilientEmbedding(Generic[B]):
    """Drives ``embed_stream`` over batches; survives OOM and a crashed engine.

    ``on_unfit(batch, row)`` is told about a chunk that does not fit even alone; its vector
    row comes back as NaN so the caller can dead-letter it and keep the rest of the batch.
    A RuntimeError that is not an OOM (an engine process that died, a CUDA error) closes the
    embedder and starts a new one from ``make_embedder``, at most ``max_restarts`` times; the
    batches in flight are sent again.
    """

    def __init__(self, make_embedder: Callable[[], Embedder], budget: SafeBudget,
                 on_unfit: Callable[[B, int, BaseException], None] = lambda *a: None,
                 on_budget_change: Callable[[int | None], None] = lambda limit: None,
                 max_restarts: int = 2) -> None:
        self._make = make_embedder
        self.embedder = make_embedder()
        self.budget = budget
        self.on_unfit = on_unfit
        self.on_budget_change = on_budget_change
        self.restarts_left = max_restarts
        self.restarts = 0

    def close(self) -> None:
        self.embedder.close()

    def _restart(self, error: BaseException) -> bool:
        if self.restarts_left <= 0 or not isinstance(error, RuntimeError) or is_oom(error):
            return False
        self.restarts_left -= 1
        self.restarts += 1
        try:
            self.embedder.close()
        except Exception:  # noqa: BLE001 - the old engine is already broken
            pass
        self.embedder = self._make()
        return True

    def run(self, batches: Iterable[B]) -> Iterator[tuple[B, np.ndarray]]:
        """Results in the batches' order. Batches above the safe budget, and a batch that ran
        out of memory, leave the stream and go the careful way (split to fit), in their turn."""
        source = ((b, b.token_ids) for b in batches)  # each batch's ids are read once
        replay: deque[tuple[B, list[list[int]]]] = deque()
        while True:
            pending: deque[tuple[B, list[list[int]]]] = deque()  # with the engine, no result yet
            oversize: list[tuple[B, list[list[int]]]] = []

            def feed() -> Iterator[tuple[B, list[list[int]]]]:
                while (item := replay.popleft() if replay else next(source, None)) is not None:
                    if self.budget.limit is not None and padded_tokens(item[1]) > self.budget.limit:
                        oversize.append(item)  # ends this stream once what is in flight is back
                        return
                    pending.append(item)
                    yield item

            try:
                for batch, vectors in self.embedder.embed_stream(feed()):
                    pending.popleft()
                    if self.budget.succeeded():
                        self.on_budget_change(self.budget.limit)
                    yield batch, vectors
            except BaseException as e:
                if not pending:
                    raise
                if not is_oom(e):
                    if not self._restart(e):
                        raise
                    replay.extend([*pending, *oversize])
                    continue
                failed, seqs = pending.popleft()
                self.budget.failed(padded_tokens(seqs))
                self.on_budget_change(self.budget.limit)
                self.embedder.release_memory()
                yield failed, self._embed_carefully(failed, seqs)
                replay.extend([*pending, *oversize])
                continue
            if not oversize:
                return
            yield oversize[0][0], self._embed_carefully(*oversize[0])

    def _embed_carefully(self, batch: B, seqs: list[list[int]]) -> np.ndarray:
        out = np.full((len(seqs), self.embedder.native_dim), np.nan, dtype=np.float32)
        work = deque(split_to_fit(seqs, self.budget.limit))
        alone_failures: dict[int, int] = {}
        while work:
            s, e = work.popleft()
            try:
                out[s:e] = self.embedder.embed_batch(seqs[s:e])
            except BaseException as err:
                if not is_oom(err):
                    raise
                self.embedder.release_memory()
                if e - s == 1:
                    # alone, after freeing memory, ALONE_ATTEMPTS times: it does not fit
                    alone_failures[s] = alone_failures.get(s, 0) + 1
                    if alone_failures[s] < ALONE_ATTEMPTS:
                        work.appendleft((s, e))
                    else:
                        self.on_unfit(batch, s, err)
                    continue
                self.budget.failed(padded_tokens(seqs[s:e]))
                self.on_budget_change(self.budget.limit)
                mid = (s + e) // 2
                work.extendleft([(mid, e), (s, mid)])
        return out
