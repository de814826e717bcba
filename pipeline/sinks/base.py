"""What a run asks of a destination: a write protocol, and generations.

``Sink`` is the write protocol, a lifecycle with no-op defaults where one makes sense (a
minimal sink writes one method): ``write`` returns the ids of the batches that are now
durable in the destination. Only those ids enter the ledger, so a batch the sink has not
acknowledged is re-done on resume; sinks make that harmless (upsert by primary key, or
overwrite a deterministically named file).

``Generations`` is what readers see: a run writes one generation (a target) and makes it
live only on ``publish``. A sink kind's settings make a ``Destination``, both at once.

The calls a run makes, in order:

1. on a probe made for the published name (``target`` = the alias, no base): ``clash``,
   ``live``, ``mark_of`` / ``rows_of`` (the live generation), ``exists`` and ``mark_of``
   (the published one, the run's target), ``neighbours``; then ``close``;
2. on the run's sink (its target, its base): ``discard_target`` (a fresh build on a target
   of its own), ``on_write_start(dimension)``, ``forget`` (when part of the plan is made
   again), ``write`` for each batch not yet acknowledged, ``on_write_complete``, or
   ``on_write_failed`` after an error;
3. on a complete plan: ``retire`` (a run building on a base), ``count_by_bucket`` (checked
   against the sync state), ``publish``, ``drop`` (generations beyond ``keep_previous``),
   or only ``count`` when the run was committed before it was killed; ``close`` at last.

Every call may be made again after a kill, and must then do the same.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class GenerationMark:
    """Who made a generation, written into it when it is created (collection properties, a
    file in the version directory), so the destination itself can say what is whose."""

    job: str
    state_id: str
    fingerprint: str
    generation: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> GenerationMark | None:
        """The mark, or None for anything else (a hand-made target, another tool's text)."""
        try:
            value = json.loads(text or "")
            return cls(job=str(value["job"]), state_id=str(value["state_id"]),
                       fingerprint=str(value["fingerprint"]),
                       generation=int(value["generation"]))
        except (ValueError, KeyError, TypeError):
            return None


class Sink(ABC):
    """The write protocol: where a run's vectors go, acknowledged batch by batch."""

    def on_write_start(self, dimension: int) -> None:
        """Connect, create or check the target (a dimension mismatch is a SinkError)."""

    @abstractmethod
    def write(self, batch: VectorBatch) -> list[str]:
        """Write one batch; return the batch ids now durable (maybe none yet, maybe several)."""

    def on_write_complete(self) -> list[str]:
        """Make everything durable and visible (flush, final file); return newly durable ids."""
        return []

    def on_write_failed(self, error: BaseException) -> None:
        """Release resources after a failure; what was acknowledged stays."""

    def close(self) -> None:
        """Release connections. Safe to call twice."""


class Generations(ABC):
    """The destination's generations: what readers see changes only on ``publish``."""

    @abstractmethod
    def discard_target(self) -> None:
        """A new build starts on a clean target: remove what an abandoned build left there.
        Called only on a target this job recorded creating, never on a published one."""

    @abstractmethod
    def forget(self, from_window: int, doc_ids: list[str]) -> list[str]:
        """Remove what was written for plan windows ``from_window`` on (their documents are
        ``doc_ids``), because that part of the plan is being made again. Returns the ids of
        earlier acknowledged batches that went with it (to be written again)."""

    @abstractmethod
    def count_by_bucket(self) -> dict[str, int]:
        """Vectors the target holds now, per first hex digit of ``doc_hash``."""

    # -- what the destination says about itself (checked before any work) -------------

    @abstractmethod
    def live(self) -> str | None:
        """The generation readers see now (alias target, CURRENT), or None."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether generation ``name`` exists in the destination."""

    @abstractmethod
    def mark_of(self, name: str) -> GenerationMark | None:
        """The mark generation ``name`` was created with, or None (absent or unmarked)."""

    def clash(self) -> str | None:
        """Why the published name cannot be used (e.g. a real collection holds it), or None."""
        return None

    def neighbours(self) -> list[str]:
        """Other things beside this job's generations in the destination (never touched)."""
        return []

    @abstractmethod
    def rows_of(self, name: str) -> Iterator[tuple[str, int, str]]:
        """(doc id, chunk index, doc hash) of every vector of generation ``name``: what a
        lost sync state is rebuilt from."""

    @abstractmethod
    def drop(self, name: str) -> None:
        """Remove generation ``name`` (this job's, recorded; never the live one). Idempotent."""

    @abstractmethod
    def retire(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Drop what the base generation held for changed documents, as (doc id, old chunk
        count, new chunk count); new count 0 removes the document. Idempotent."""

    @abstractmethod
    def count(self) -> int:
        """Vectors the target holds now, every acknowledged write included."""

    @abstractmethod
    def publish(self) -> None:
        """Make the target what readers see, atomically. Idempotent."""


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk of the live generation, its score (higher is nearer, as
    the destination's metric gives it), its text when the sink stores it."""

    doc_id: str
    chunk_index: int
    score: float
    text: str | None = None


@dataclass
class ScannedRows:
    """A batch of the live generation's rows, as ``embed-job audit`` and ``eval`` read them."""

    pks: list[str]
    doc_ids: list[str]
    chunk_indexes: list[int]
    doc_hashes: list[str]
    vectors: np.ndarray  # (rows, dimension) float32, as stored


class Searchable(ABC):
    """The live generation as readers query it (``embed-job search``, ``embed-job audit``)."""

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int, generation: str | None = None
               ) -> list[list[Hit]]:
        """The ``k`` nearest chunks of each unit-length vector, best first, in ``generation``
        (None: the one readers see now; a SinkError when nothing is published)."""

    @abstractmethod
    def scan(self, generation: str | None = None) -> Iterator[ScannedRows]:
        """Every row of ``generation`` (None: the live one), batch by batch (bounded memory)."""


def norms(vectors: np.ndarray) -> np.ndarray:
    """Each row's L2 norm; NaN or inf where a vector is not finite."""
    with np.errstate(all="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", vectors.astype(np.float64), vectors))


def top_k(scores: np.ndarray, k: int) -> list[np.ndarray]:
    """Row by row, the indexes of the ``k`` highest scores, highest first (exact search)."""
    k = min(k, scores.shape[1])
    if k == 0:
        return [np.empty(0, np.int64) for _ in range(scores.shape[0])]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [row[np.argsort(-scores[i, row], kind="stable")] for i, row in enumerate(part)]


class Destination(Sink, Generations):
    """A sink writing one generation of a destination: what a sink kind's settings make
    (``SinkSettings.make``) and what a run drives, in the order the module says."""
