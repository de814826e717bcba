"""The transformers backend's settings and facts; the model (``model.py``, with torch) is
imported only when a job embeds with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.job.model_info import ModelInfo
from pipeline.job.sections import ModelSettings

if TYPE_CHECKING:
    from pipeline.embedders.base import Embedder

# FP8 tensor cores: Ada (8.9), Hopper (9.x) and later; torch._scaled_mm refuses older GPUs.
FP8_CAPABILITY = (8, 9)


def fp8_device_problem(device: str) -> str | None:
    """Why ``model.quantization: fp8`` cannot run on ``device`` (auto, cpu, cuda, cuda:N), or
    None. The one statement of it: validation and the embedder's load both ask here."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        where = "model.device is cpu" if device == "cpu" else "torch sees no CUDA GPU here"
        return (f"model.quantization: fp8 needs a CUDA GPU with FP8 tensor cores (compute "
                f"capability 8.9+: Ada, Hopper or later), but {where}; use quantization: null")
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    if index >= torch.cuda.device_count():
        return None  # model.device's own check names it
    capability = torch.cuda.get_device_capability(index)
    if capability < FP8_CAPABILITY:
        return (f"model.quantization: fp8 needs a GPU with FP8 tensor cores (compute capability "
                f"8.9+: Ada, Hopper or later); cuda:{index} ({torch.cuda.get_device_name(index)}) "
                f"has {capability[0]}.{capability[1]}; use quantization: null")
    return None


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
    quantization: Literal["fp8"] | None = Field(
        None, description="fp8: the packed path's linear layers in FP8 e4m3 (weights per "
        "channel at load, activations per token), on GPUs with FP8 tensor cores (compute "
        "capability 8.9+); null: the model's dtype")

    def vector_settings(self) -> dict[str, Any]:
        return {"quantization": self.quantization} if self.quantization else {}

    @model_validator(mode="after")
    def _fp8_needs_packing(self) -> TransformersBackend:
        if self.quantization == "fp8" and self.packing == "off":
            raise ValueError("model.quantization: fp8 runs in the packed path only, and "
                             "model.packing is off (use auto or on)")
        if self.quantization == "fp8" and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"model.quantization: fp8 runs the rest of the model in bfloat16, "
                             f"not model.dtype {self.dtype} (use auto or bfloat16)")
        return self

    def device_problem(self) -> str | None:
        """The devices every backend takes, and for fp8 a GPU with FP8 tensor cores."""
        problem = super().device_problem()
        if problem is None and self.quantization == "fp8":
            return fp8_device_problem(self.device)
        return problem

    def make(self, info: ModelInfo, pad_id: int) -> Embedder:
        from pipeline.embedders.transformers_backend.model import TransformersEmbedder

        return TransformersEmbedder(info, pad_id, self.pooling_for(info), dtype=self.dtype,
                                    device=self.device, packing=self.packing,
                                    compile=self.compile, packed_tokens=self.packed_tokens,
                                    quantization=self.quantization)
