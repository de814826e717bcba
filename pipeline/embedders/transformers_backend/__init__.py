"""The transformers backend's settings and facts; the model (``model.py``, with torch) is
imported only when a job embeds with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from pipeline.job.model_info import ModelInfo
from pipeline.job.sections import ModelSettings

if TYPE_CHECKING:
    from pipeline.embedders.base import Embedder


class TransformersBackend(ModelSettings):
    """Any Hugging Face encoder or decoder embedding model, on CPU or GPU, through torch."""

    backend: Literal["transformers"] = "transformers"
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="run each batch as one row of concatenated sequences with "
        "variable-length attention, no padding (auto: on a CUDA device for decoder models of "
        "the Llama/Qwen family)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the packed decoder layer (auto: on when packing "
        "runs on a CUDA device)")
    packed_tokens: int = Field(
        32768, gt=0, description="tokens per packed forward pass (a longer sequence runs alone)")

    def make(self, info: ModelInfo, pad_id: int) -> Embedder:
        from pipeline.embedders.transformers_backend.model import TransformersEmbedder

        return TransformersEmbedder(info, pad_id, self.pooling_for(info), dtype=self.dtype,
                                    device=self.device, packing=self.packing,
                                    compile=self.compile, packed_tokens=self.packed_tokens)
