"""Matryoshka truncation, done the right way: cut, then re-normalize."""

from __future__ import annotations

import numpy as np


def truncate_and_normalize(vectors: np.ndarray, dimension: int | None, normalize: bool = True
                           ) -> np.ndarray:
    """Keep the first ``dimension`` components and rescale each row to unit L2 norm.

    A prefix of a unit vector is shorter than 1; storing it as-is skews cosine/IP scores,
    so normalization happens after the cut, in float32 (engines return bf16-rounded norms).
    """
    out = np.asarray(vectors, dtype=np.float32)
    if dimension is not None:
        if dimension > out.shape[1]:
            raise ValueError(f"dimension {dimension} > model output size {out.shape[1]}")
        out = out[:, :dimension]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, np.finfo(np.float32).tiny)
    return np.ascontiguousarray(out, dtype=np.float32)
