"""Embedding backends: each a plug-in whose settings class (``job/plugins.py``) builds its
embedder with ``make()``. torch, transformers and sglang are imported only by the backend in
use, so planning, chunking and `--help` stay fast and a CPU install never needs sglang."""

from __future__ import annotations

from pipeline.embedders.base import Embedder, model_name

__all__ = ["Embedder", "model_name"]
