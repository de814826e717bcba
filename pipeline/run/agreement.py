"""How far a new generation agrees with the one it replaces on a model or settings change
(``sync.publish_gate``), so that a model change is a measured decision.

The old model's query settings are not kept in the state, so nothing is embedded: chunks
present in both generations, matched by (doc id, chunk index) since primary keys differ
between generations, are sampled; each generation is searched exactly with the chunk's own
stored vector in that generation, and the two sets of its 10 nearest neighbours (the chunk
itself left out) are compared. The mean overlap is 1 when the new model arranges the corpus
around each chunk as the old one did.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.job.sections import PublishGate
from pipeline.run.retrieval import exact_top
from pipeline.sinks.base import ScannedRows, Searchable

K = 10
Key = tuple[str, int]  # (doc id, chunk index): the same chunk in either generation


@dataclass(frozen=True)
class Agreement:
    previous: str  # the generation compared with
    chunks: int  # sampled chunks found in both generations
    at_10: float | None  # mean overlap@10 of their neighbours; None: no chunk in both


def agreement_at_10(index: Searchable, new: str, old: str, sample: int, seed: int = 0
                    ) -> Agreement:
    """Mean overlap@10 of the neighbours of up to ``sample`` chunks of ``new`` also in ``old``."""
    mine = _reservoir(index.scan(new), sample, random.Random(seed))
    theirs: dict[Key, np.ndarray] = {}
    for rows in index.scan(old):
        for i, key in enumerate(zip(rows.doc_ids, rows.chunk_indexes)):
            if key in mine and key not in theirs:
                theirs[key] = rows.vectors[i].copy()
    keys = [k for k in mine if k in theirs]
    if not keys:
        return Agreement(old, 0, None)
    a = _neighbours(index, new, keys, np.stack([mine[k] for k in keys]))
    b = _neighbours(index, old, keys, np.stack([theirs[k] for k in keys]))
    overlap = [len(x & y) / max(len(x), len(y), 1) for x, y in zip(a, b)]
    return Agreement(old, len(keys), round(float(np.mean(overlap)), 4))


def agreement_failure(gate: PublishGate, generation: str, agreement: Agreement) -> str | None:
    """Why ``generation`` may not replace ``agreement.previous`` under
    ``min_agreement_at_10`` (None: it may, or no bar is set)."""
    bar, old = gate.min_agreement_at_10, agreement.previous
    if bar is None or (agreement.at_10 is not None and agreement.at_10 >= bar):
        return None
    found = ("cannot be measured: no sampled chunk is in both" if agreement.at_10 is None
             else f"is {agreement.at_10:.3f} < min_agreement_at_10 {bar} on {agreement.chunks} "
                  f"chunks")
    return (f"sync.publish_gate: the new generation {generation}'s agreement@10 with {old} "
            f"(the overlap of the chunks' top-10 neighbours) {found}; not published, readers "
            f"stay on {old} (the new generation is kept: change the settings, or the gate, and "
            f"run again)")


def _reservoir(batches: Iterator[ScannedRows], n: int, rng: random.Random
               ) -> dict[Key, np.ndarray]:
    """``n`` rows drawn evenly from a generation, by key."""
    picked: list[tuple[Key, np.ndarray]] = []
    seen = 0
    for rows in batches:
        for i, key in enumerate(zip(rows.doc_ids, rows.chunk_indexes)):
            if len(picked) < n:
                picked.append((key, rows.vectors[i].copy()))
            elif (j := rng.randrange(seen + 1)) < n:
                picked[j] = (key, rows.vectors[i].copy())
            seen += 1
    return dict(picked)


def _neighbours(index: Searchable, generation: str, keys: list[Key], vectors: np.ndarray
                ) -> list[set[Key]]:
    """Each chunk's ``K`` nearest other chunks in ``generation``, by exact search."""
    top = exact_top(index.scan(generation), vectors, [None], K + 1)[None]
    return [{(d, c) for d, c, _ in [h for h in hits if (h[0], h[1]) != key][:K]}
            for key, hits in zip(keys, top)]
