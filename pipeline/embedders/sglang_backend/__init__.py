"""The SGLang backend's settings and facts; the engine (``engine.py``, with sglang) is
imported only when a job embeds with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.job.model_info import ModelInfo
from pipeline.job.sections import ModelSettings, Strict

if TYPE_CHECKING:
    from pipeline.embedders.base import Embedder


class SGLangConfig(Strict):
    """Settings passed to the embedded ``sglang.Engine``."""

    quantization: str | None = Field(
        None, description="None: as the checkpoint says (AWQ -> awq_marlin); 'fp8' for online FP8")
    attention_backend: str = "triton"
    mem_fraction_static: float = Field(0.8, gt=0, le=1)
    context_length: int | None = None
    chunked_prefill_size: int | None = -1
    max_prefill_tokens: int | None = 65536
    disable_cuda_graph: bool = True
    max_in_flight: int = Field(64, ge=1, description="at most this many batches with the engine")
    max_tokens_in_flight: int = Field(
        262144, ge=1, description="submit more batches until this many tokens are with the engine "
        "(several prefill passes, so the GPU never waits for the next request)")
    warmup_tokens: int = Field(
        8192, ge=0, description="at start, embed a few dummy sequences of up to this many tokens "
        "so the engine compiles its kernels during start-up (reported with the model load), not "
        "in the first batches; 0: off")
    extra: dict[str, Any] = Field(default_factory=dict, description="more Engine kwargs")


class SGLangBackend(ModelSettings):
    """Decoder embedding models (Qwen3-Embedding...) on an embedded ``sglang.Engine``."""

    backend: Literal["sglang"] = "sglang"
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)

    def max_context(self, info: ModelInfo) -> int:
        """SGLang refuses a sequence of exactly its context length: one token less."""
        return (self.sglang.context_length or info.max_context) - 1

    def device_problem(self) -> str | None:
        if self.device == "cpu":
            return "model.device: the sglang backend needs a CUDA GPU; use backend: transformers"
        return super().device_problem()

    def make(self, info: ModelInfo, pad_id: int) -> Embedder:
        pooling = self.pooling_for(info)
        if pooling != "last":
            # SGLang's decoder embedding models (qwen2/qwen3/llama...) pool the last token, and
            # its BERT pools [CLS]: asking it for anything else would silently change vectors.
            raise ConfigError(f"model.pooling: the sglang backend supports last-token models only "
                              f"(this model pools '{pooling}'); use backend: transformers")
        from pipeline.embedders.sglang_backend.engine import SGLangEmbedder

        return SGLangEmbedder(info, self.sglang, dtype=self.dtype, device=self.device)
