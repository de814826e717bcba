"""A stand-in for sglang 0.5.17's offline ``Engine`` in embedding mode, for CPU tests.

It enforces the contract the embedder relies on, as read in the real source
(``srt/entrypoints/engine.py``, ``srt/server_args.py``, ``srt/managers/tokenizer_manager.py``,
``srt/configs/model_config.py``):

- ``Engine(**kwargs)``: kwargs are ``ServerArgs`` fields (an unknown one is a TypeError);
  ``context_length`` above the model's ``max_position_embeddings`` is a ValueError.
  Only ``is_embedding=True`` with ``skip_tokenizer_init=True`` is modelled.
- ``engine.loop``; ``engine.tokenizer_manager.generate_request(obj, None)`` is an async
  generator yielding a list of ``{"embedding", "meta_info"}`` dicts for a batch (one dict for a
  single sequence); text input is rejected; a sequence of >= context length tokens is a
  ValueError before anything is computed.
- Vectors: the model at ``model_path`` run by transformers in float32, one sequence at a time
  (so batch-independent), last-token pooled, L2-normalized and rounded to bfloat16, so norms
  are close to but not exactly 1, as the real engine returns them. bf16 *compute* is not modelled.

It records what tests assert on: the kwargs, every request's input ids, the peak number of
requests in flight, and ``shutdown()`` calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

__version__ = "0.5.17+standin"

# A subset of the 458 ServerArgs fields of sglang 0.5.17 (srt/server_args.py), the ones an
# embedding job on one GPU can reasonably pass.
SERVER_ARGS = frozenset({
    "model_path", "tokenizer_path", "skip_tokenizer_init", "load_format", "trust_remote_code",
    "context_length", "is_embedding", "revision", "dtype", "quantization", "kv_cache_dtype",
    "mem_fraction_static", "max_running_requests", "max_total_tokens", "chunked_prefill_size",
    "max_prefill_tokens", "schedule_policy", "page_size", "disable_radix_cache", "tp_size",
    "dp_size", "device", "base_gpu_id", "random_seed", "log_level", "attention_backend",
    "disable_cuda_graph", "enable_torch_compile", "allow_auto_truncate",
})
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

ENGINES: list[Engine] = []


class Engine:
    # how long a request stays "on the GPU" before its result can be read: longer for more tokens
    seconds_per_token = 1e-5

    def __init__(self, **kwargs: Any) -> None:
        import torch
        from transformers import AutoModel

        unknown = sorted(set(kwargs) - SERVER_ARGS)
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        if "model_path" not in kwargs:
            raise TypeError("ServerArgs.__init__() missing 1 required positional argument: 'model_path'")
        if kwargs.get("is_embedding") is not True or kwargs.get("skip_tokenizer_init") is not True:
            raise ValueError("stand-in models only is_embedding=True with skip_tokenizer_init=True")
        if kwargs.get("dtype", "auto") not in DTYPES:
            raise ValueError(f"dtype {kwargs['dtype']!r} not in {DTYPES}")
        self.kwargs = dict(kwargs)
        path = Path(kwargs["model_path"])
        derived = int(json.loads((path / "config.json").read_text())["max_position_embeddings"])
        asked = kwargs.get("context_length")
        if asked is not None and asked > derived:
            raise ValueError(f"User-specified context_length ({asked}) is greater than the derived "
                             f"context_length ({derived}).")
        self.context_len = asked or derived
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.requests: list[list[list[int]]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.shutdown_calls = 0
        self.tokenizer_manager = _TokenizerManager(self)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        ENGINES.append(self)

    def shutdown(self) -> None:
        self.shutdown_calls += 1

    def embed_one(self, ids: list[int]) -> list[float]:
        import torch

        with torch.inference_mode():
            hidden = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        unit = torch.nn.functional.normalize(hidden, dim=-1)
        return unit.to(torch.bfloat16).to(torch.float32).tolist()


class _TokenizerManager:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def generate_request(self, obj: Any, request: Any = None) -> AsyncIterator[Any]:
        engine = self._engine
        if engine.shutdown_calls:
            raise RuntimeError("stand-in: request after shutdown() (the real engine would hang)")
        obj.normalize_batch_and_arguments()
        if obj.input_ids is None:
            raise ValueError("The engine initialized with skip_tokenizer_init=True cannot accept "
                             "text prompts. Please provide input_ids or re-initialize the engine "
                             "with skip_tokenizer_init=False.")
        batch = [obj.input_ids] if obj.is_single else obj.input_ids
        for ids in batch:
            if len(ids) >= engine.context_len:
                raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's "
                                 f"context length ({engine.context_len} tokens).")
        engine.requests.append([list(ids) for ids in batch])
        engine.in_flight += 1
        engine.peak_in_flight = max(engine.peak_in_flight, engine.in_flight)
        try:
            await asyncio.sleep(engine.seconds_per_token * sum(map(len, batch)))
            out = [{"embedding": engine.embed_one(ids), "meta_info": {"prompt_tokens": len(ids)}}
                   for ids in batch]
        finally:
            engine.in_flight -= 1
        yield out[0] if obj.is_single else out
