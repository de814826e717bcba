"""Embedding with a plain transformers model: the reference backend, CPU or one GPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.embedders import DType, model_name
from pipeline.embedders.base import Embedder
from pipeline.embedders.pooling import POOLERS
from pipeline.models import ModelInfo, Pooling

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' takes the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"model.device: {device!r} is not a torch device ({e})") from None


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class TransformersEmbedder(Embedder):
    """``AutoModel`` + pooling over token ids that already carry every special token.

    Batches are padded to their longest sequence. Last-token models are padded on the left so
    that position -1 is each sequence's EOS, and get explicit position ids (counting real
    tokens only), so a sequence's vector does not depend on how much padding its batch has.
    """

    def __init__(self, info: ModelInfo, pad_id: int, dtype: DType = "auto", device: str = "auto",
                 pooling: Pooling | None = None) -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pooling: Pooling = pooling or info.pooling
        self.pad_id = pad_id
        self.name = model_name(info.path)
        self.native_dim = info.hidden_size
        self.max_context = info.max_context
        self._left_pad = self.pooling == "last"
        # transformers draws a "Loading weights" bar on stderr; a batch job has its own progress
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._model: torch.nn.Module | None = AutoModel.from_pretrained(
                str(info.path), dtype=self.dtype).to(self.device).eval()
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError(f"embedder {self.name} is closed")
        if not batch:
            return np.zeros((0, self.native_dim), dtype=np.float32)
        lengths = [len(seq) for seq in batch]
        if min(lengths) == 0:
            raise ValueError("cannot embed an empty token sequence")
        if max(lengths) > self.max_context:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the model's context "
                             f"of {self.max_context}")
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            cols = slice(width - len(seq), width) if self._left_pad else slice(0, len(seq))
            ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._left_pad:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        with torch.inference_mode():
            hidden = self._model(**inputs).last_hidden_state
            vectors = POOLERS[self.pooling](hidden, inputs["attention_mask"])
        return vectors.to(torch.float32).cpu().numpy()

    def close(self) -> None:
        if self._model is None:
            return
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
