"""The embedder the fault tests break: it fails like a small device, or at a named fault
point, when ``EMBED_JOB_MEMORY_LIMIT_TOKENS`` / ``EMBED_JOB_FAULT`` say so (``pipeline.faults``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pipeline.embedders.base import Embedder
from pipeline.faults import fault_point, memory_limit
from pipeline.records import padded_tokens


def wrap_embedder(embedder: Embedder) -> Embedder:
    """The embedder itself, or one that fails like a small device when faults are set."""
    if "EMBED_JOB_FAULT" not in os.environ and memory_limit() is None:
        return embedder
    return _FaultyEmbedder(embedder)


class _FaultyEmbedder(Embedder):
    """The inner embedder, batch by batch (the inherited ``embed_stream``), so a failure is
    the oldest batch's, as with a real backend."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def max_context(self) -> int:
        return self._inner.max_context

    @property
    def native_dim(self) -> int:
        return self._inner.native_dim

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        limit = memory_limit()
        padded = padded_tokens(batch)
        if limit is not None and padded > limit:
            raise MemoryError(f"injected out-of-memory: {padded} padded tokens > {limit}")
        fault_point("during_embed")
        return self._inner.embed_batch(batch)

    def release_memory(self) -> None:
        self._inner.release_memory()

    def close(self) -> None:
        self._inner.close()
