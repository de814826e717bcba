"""The sink lifecycle: start, write batches, complete or fail.

``write`` returns the ids of the batches that are now durable in the destination. Only
those ids enter the ledger, so a batch the sink has not acknowledged is re-done on resume;
sinks make that harmless (upsert by primary key, or overwrite a deterministically named file).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class VectorBatch:
    """One planned batch after embedding, in the shape every sink writes."""

    batch_id: str
    pks: list[str]
    doc_ids: list[str]
    chunk_indexes: list[int]
    doc_hashes: list[str]
    vectors: np.ndarray  # (n, dim) float32, unit norm
    texts: list[str] | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pks)


class Sink(ABC):
    """A destination for vectors."""

    @abstractmethod
    def on_write_start(self, dimension: int) -> None:
        """Connect, create or check the target (a dimension mismatch is a SinkError)."""

    @abstractmethod
    def write(self, batch: VectorBatch) -> list[str]:
        """Write one batch; return the batch ids now durable (maybe none yet, maybe several)."""

    @abstractmethod
    def on_write_complete(self) -> list[str]:
        """Make everything durable and visible (flush, final file); return newly durable ids."""

    def on_write_failed(self, error: BaseException) -> None:
        """Release resources after a failure; what was acknowledged stays."""

    def close(self) -> None:
        """Release connections. Safe to call twice."""

    # -- generations: what readers see changes only on publish ------------------------

    @abstractmethod
    def discard_target(self) -> None:
        """A new build starts on a clean target: remove what an abandoned build left there.
        Never called on a published target."""

    @abstractmethod
    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Drop what the base generation held for changed documents, as (doc id, old chunk
        count, new chunk count); new count 0 removes the document. Idempotent."""

    @abstractmethod
    def count(self) -> int:
        """Vectors the target holds now, every acknowledged write included."""

    @abstractmethod
    def publish(self, keep: list[str]) -> None:
        """Make the target what readers see, atomically; drop this job's other generations
        except those named in ``keep``. Idempotent."""
