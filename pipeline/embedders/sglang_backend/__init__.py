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

# The kwargs that make the engine an embedder fed with our token ids; job files may not change them.
_FIXED = ("model_path", "is_embedding", "skip_tokenizer_init")


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
    """Decoder embedding models (Qwen3-Embedding...) on an embedded ``sglang.Engine``.

    What the engine is told (``engine_kwargs``) and what the job may send it
    (``max_context``, ``device_problem``) are decided here, together, so they cannot drift
    apart; ``engine.py`` only runs the engine.
    """

    backend: Literal["sglang"] = "sglang"
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)

    def vector_settings(self) -> dict[str, Any]:
        """An explicit ``sglang.quantization`` (online FP8: the same rounding as the
        transformers backend's, so the same fingerprint); None: as the checkpoint says."""
        quantization = self.sglang.quantization
        return {"quantization": quantization} if quantization else {}

    def context_length(self, info: ModelInfo) -> int:
        """The engine's context length: the job's, or the model's."""
        return self.sglang.context_length or info.max_context

    def max_context(self, info: ModelInfo) -> int:
        """SGLang refuses a sequence of exactly its context length: one token less."""
        return self.context_length(info) - 1

    def device_problem(self) -> str | None:
        """The devices this backend takes: auto (SGLang's choice), cuda and cuda:N."""
        if self.device == "cpu":
            return "model.device: the sglang backend needs a CUDA GPU; use backend: transformers"
        return super().device_problem()

    def sharing_device(self, share: int) -> SGLangBackend:
        """The engine reserves ``mem_fraction_static`` of the GPU at start: each of
        ``share`` engines on one GPU takes its part."""
        if share == 1:
            return self
        cfg = self.sglang.model_copy(
            update={"mem_fraction_static": self.sglang.mem_fraction_static / share})
        return self.model_copy(update={"sglang": cfg})

    def tokens_in_flight(self, token_budget: int) -> int:
        return self.sglang.max_tokens_in_flight

    def engine_kwargs(self, info: ModelInfo) -> dict[str, Any]:
        """The ``sglang.Engine`` kwargs for this model and job, None values left out.

        dtype 'auto' is bfloat16 (the engine always runs on a GPU; SGLang's own 'auto' would
        pick float16 for a float32 checkpoint). Radix (prefix) caching is off: embedding
        requests are prefill-only and share no prefix worth caching.
        """
        cfg = self.sglang
        clash = [k for k in _FIXED if k in cfg.extra]
        if clash:
            raise ConfigError(f"model.sglang.extra: {', '.join(clash)} cannot be overridden")
        kwargs: dict[str, Any] = {
            "model_path": str(info.path),
            "is_embedding": True,
            "skip_tokenizer_init": True,
            "disable_radix_cache": True,
            "dtype": "bfloat16" if self.dtype == "auto" else self.dtype,
            "quantization": cfg.quantization,
            "attention_backend": cfg.attention_backend,
            "mem_fraction_static": cfg.mem_fraction_static,
            "context_length": self.context_length(info),
            "chunked_prefill_size": cfg.chunked_prefill_size,
            "max_prefill_tokens": cfg.max_prefill_tokens,
            "disable_cuda_graph": cfg.disable_cuda_graph,
            "log_level": "warning",
            **self._device_kwargs(),
            **cfg.extra,
        }
        return {k: v for k, v in kwargs.items() if v is not None}

    def _device_kwargs(self) -> dict[str, Any]:
        """'cuda:N' is SGLang's device plus ``base_gpu_id``; 'auto' leaves the choice to SGLang.
        A translation only: which devices are allowed is ``device_problem``'s to say."""
        if self.device == "auto":
            return {}
        kind, _, index = self.device.partition(":")
        return {"device": kind, "base_gpu_id": int(index) if index else None}

    def make(self, info: ModelInfo, pad_id: int) -> Embedder:
        pooling = self.pooling_for(info)
        if pooling != "last":
            # SGLang's decoder embedding models (qwen2/qwen3/llama...) pool the last token, and
            # its BERT pools [CLS]: asking it for anything else would silently change vectors.
            raise ConfigError(f"model.pooling: the sglang backend supports last-token models only "
                              f"(this model pools '{pooling}'); use backend: transformers")
        from pipeline.embedders.sglang_backend.engine import SGLangEmbedder

        return SGLangEmbedder(self, info)
