"""Embedding backends. torch, transformers and sglang are imported only by the backend in use,
so planning, chunking and `--help` stay fast and a CPU install never needs sglang."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.embedders.base import Embedder
from pipeline.errors import ConfigError
from pipeline.job.config import ModelConfig
from pipeline.job.model_info import ModelInfo

__all__ = ["DType", "Embedder", "make_embedder", "model_name"]

DType = Literal["auto", "float32", "bfloat16", "float16"]


def make_embedder(model: ModelConfig, info: ModelInfo, pad_id: int) -> Embedder:
    """The job's embedder; ``pad_id`` fills batches (transformers pads, SGLang does not)."""
    pooling = info.pooling if model.pooling == "auto" else model.pooling
    embedder: Embedder
    if model.backend == "sglang":
        if pooling != "last":
            # SGLang's decoder embedding models (qwen2/qwen3/llama...) pool the last token, and
            # its BERT pools [CLS]: asking it for anything else would silently change vectors.
            raise ConfigError(f"model.pooling: the sglang backend supports last-token models only "
                              f"(this model pools '{pooling}'); use backend: transformers")
        from pipeline.embedders.sglang_backend import SGLangEmbedder

        embedder = SGLangEmbedder(info, model.sglang, dtype=model.dtype, device=model.device)
    else:
        from pipeline.embedders.transformers_backend import TransformersEmbedder

        embedder = TransformersEmbedder(info, pad_id, dtype=model.dtype, device=model.device,
                                        pooling=pooling, packing=model.packing,
                                        compile=model.compile, packed_tokens=model.packed_tokens)
    embedder.revision = model.revision
    return embedder


def model_name(path: Path) -> str:
    """The model directory's name; for a hub-cache snapshot (named by commit), the repo's name."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name
