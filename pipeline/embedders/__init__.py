"""Embedding backends. torch, transformers and sglang are imported only by the backend in use,
so planning, chunking and `--help` stay fast and a CPU install never needs sglang."""

from __future__ import annotations

from pipeline.embedders.base import DType, Embedder, model_name
from pipeline.job.model_info import ModelInfo
from pipeline.job.sections import ModelSettings

__all__ = ["DType", "Embedder", "make_embedder", "model_name"]


def make_embedder(model: ModelSettings, info: ModelInfo, pad_id: int) -> Embedder:
    """The job's embedder, built by its backend's settings; ``pad_id`` fills batches
    (transformers pads, SGLang does not)."""
    return model.make(info, pad_id)
