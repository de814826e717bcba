"""Embedding with a plain transformers model: CPU or one GPU.

Two paths compute the same vectors (cosine >= 0.999 in bfloat16, 1e-5 in float32):

- **packed** (decoder models of the Llama/Qwen family, default on CUDA): a batch is one row of
  concatenated sequences with variable-length flash attention, no padding at all, last-token
  rows pooled, the layer compiled with ``torch.compile``; token ids travel through pinned host
  memory with non-blocking copies, and ``embed_stream`` keeps the next batch queued on the GPU
  while the previous result is copied back. See ``pipeline.embedders.transformers_backend.packed``.
  With ``quantization="fp8"`` its matrix products run in FP8 (``fp8.py``); only this path does.
- **padded** (every model; the reference, and the CPU path): sequences padded to a common
  length, the model's own attention with a mask. A batch is first cut into length-homogeneous
  groups, so little is computed on padding even when a batch mixes lengths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from pipeline.embedders.base import Embedder, T, model_name
from pipeline.embedders.pooling import POOLERS
from pipeline.errors import ConfigError
from pipeline.job.model_info import ModelInfo, Pooling
from pipeline.job.sections import DType

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Switch = Literal["auto", "on", "off"]

# Padded path: a group of sequences may carry this share of padding before it is cut ...
PAD_TOLERANCE = 0.10
# ... unless it is still smaller than this many padded tokens (tiny groups cost more in
# per-call overhead than their padding does).
MIN_GROUP_TOKENS = {"cpu": 512, "cuda": 8192}


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


def padded_groups(lengths: Sequence[int], min_tokens: int, tolerance: float = PAD_TOLERANCE
                  ) -> list[np.ndarray]:
    """Indices of the sequences, cut into groups of similar length.

    Sequences are taken shortest first; a group grows while its padded size (rows x longest)
    stays within ``1 + tolerance`` of its real tokens, or below ``min_tokens``.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    groups: list[np.ndarray] = []
    start, real = 0, 0
    for i, idx in enumerate(order.tolist()):
        n = int(lengths[idx])
        rows = i - start + 1
        padded = rows * n
        if rows > 1 and padded > min_tokens and padded > (real + n) * (1 + tolerance):
            groups.append(np.sort(order[start:i]))  # rows keep the batch's order
            start, real = i, 0
        real += n
    if start < len(order):
        groups.append(np.sort(order[start:]))
    return groups


class TransformersEmbedder(Embedder):
    """``AutoModel`` + pooling over token ids that already carry every special token.

    Padded batches of last-token models are padded on the left so that position -1 is each
    sequence's EOS, with explicit position ids (counting real tokens only), so a sequence's
    vector does not depend on how much padding its batch has.
    """

    def __init__(self, info: ModelInfo, pad_id: int, pooling: Pooling, dtype: DType = "auto",
                 device: str = "auto", packing: Switch = "auto", compile: Switch = "auto",
                 packed_tokens: int = 32768, quantization: str | None = None) -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.info = info
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pooling = pooling
        self.pad_id = pad_id
        self.packed_tokens = packed_tokens
        self.quantization = quantization
        if quantization is not None:
            from pipeline.embedders.transformers_backend import fp8_device_problem

            problem = fp8_device_problem(str(self.device))
            if problem:
                raise ConfigError(problem)
        self._left_pad = self.pooling == "last"
        self._min_group = MIN_GROUP_TOKENS.get(self.device.type, MIN_GROUP_TOKENS["cuda"])
        # transformers draws a "Loading weights" bar on stderr; a batch job has its own progress
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._model: torch.nn.Module | None = AutoModel.from_pretrained(
                str(info.path), dtype=self.dtype).to(self.device).eval()
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self._packed: Any = None
        self._pin = self.device.type == "cuda"
        self._setup_packing(info, packing, compile)

    # ------------------------------------------------------------------ setup

    def _setup_packing(self, info: ModelInfo, packing: Switch, compile: Switch) -> None:
        from pipeline.embedders.transformers_backend.packed import PackedDecoder, UnsupportedModel

        if packing == "off" or (packing == "auto" and self.device.type != "cuda"):
            if self.quantization:
                raise ConfigError("model.quantization: fp8 runs in the packed path only, and "
                                  "model.packing is off")
            if compile == "on":
                raise ConfigError("model.compile: on needs model.packing (the compiled code is "
                                  "the packed decoder layer)")
            return
        use_compile = compile == "on" or (compile == "auto" and self.device.type == "cuda")
        try:
            assert self._model is not None
            self._packed = PackedDecoder(self._model, self.pooling, compile=use_compile,
                                         quantization=self.quantization)
        except UnsupportedModel as e:
            if self.quantization:
                raise ConfigError(f"model.quantization: fp8 runs in the packed path only, and "
                                  f"the model {info.path.name!r} cannot be packed: {e}") from None
            if packing == "on":
                raise ConfigError(f"model.packing: {info.path.name}: {e}") from None
            return  # auto: this model keeps the padded path
        if use_compile or self.quantization:
            try:
                self._warm_up()
            except RuntimeError as e:
                if not self.quantization or "scaled_mm" not in str(e):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"model.quantization: fp8 does not run on this GPU: "
                                  f"{first}") from None

    def _warm_up(self) -> None:
        """Compile now (start-up time, reported with the model load), not in the first batch:
        two calls of different shapes, so the graph is the dynamic one from the start."""
        token = self.pad_id if self.pad_id is not None else 0
        for lengths in ((7, 61), (3, 130, 17)):
            self.embed_batch([[token] * n for n in lengths])

    @property
    def name(self) -> str:
        return model_name(self.info.path)

    @property
    def max_context(self) -> int:
        return self.info.max_context

    @property
    def native_dim(self) -> int:
        return self.info.hidden_size

    @property
    def packing(self) -> bool:
        return self._packed is not None

    # ------------------------------------------------------------------ embedding

    def _check(self, batch: Sequence[Sequence[int]]) -> list[int]:
        if self._model is None:
            raise RuntimeError(f"embedder {self.name} is closed")
        lengths = [len(seq) for seq in batch]
        if lengths and min(lengths) == 0:
            raise ValueError("cannot embed an empty token sequence")
        if lengths and max(lengths) > self.max_context:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the model's context "
                             f"of {self.max_context}")
        return lengths

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        lengths = self._check(batch)
        if not batch:
            return np.zeros((0, self.native_dim), dtype=np.float32)
        if self._packed is not None:
            return self._wait(self._launch(batch, lengths))
        out = np.empty((len(batch), self.native_dim), dtype=np.float32)
        for group in padded_groups(lengths, self._min_group):
            out[group] = self._embed_padded([batch[i] for i in group.tolist()])
        return out

    def embed_stream(self, batches: Iterable[tuple[T, Sequence[Sequence[int]]]]
                     ) -> Iterator[tuple[T, np.ndarray]]:
        """Packed on CUDA: batch k+1 is queued on the GPU before batch k's result is awaited,
        so the GPU keeps computing while the caller handles a result."""
        if self._packed is None or self.device.type != "cuda":
            yield from super().embed_stream(batches)
            return
        window: deque[tuple[T, Any]] = deque()
        for key, batch in batches:
            lengths = self._check(batch)
            try:
                launched = self._launch(batch, lengths) if batch else None
            except BaseException:
                # hand back what finished before the failing batch, so the caller knows
                # which batch failed (the next one it has not received)
                while window:
                    done_key, handle = window.popleft()
                    yield done_key, self._wait(handle)
                raise
            window.append((key, launched))
            if len(window) > 1:
                done_key, handle = window.popleft()
                yield done_key, self._wait(handle)
        while window:
            done_key, handle = window.popleft()
            yield done_key, self._wait(handle)

    def _launch(self, batch: Sequence[Sequence[int]], lengths: list[int]) -> Any:
        """Queue the packed forward passes of a batch; returns what ``_wait`` needs."""
        from pipeline.embedders.transformers_backend.packed import pack, split_for_packing

        parts: list[tuple[torch.Tensor, torch.cuda.Event | None, Any, Any]] = []
        for s, e in split_for_packing(lengths, self.packed_tokens):
            p = pack(batch[s:e])
            host = torch.from_numpy(np.stack([p.ids, p.positions]))
            cu_host = torch.from_numpy(p.cu_seqlens)
            if self._pin:
                host, cu_host = host.pin_memory(), cu_host.pin_memory()
            dev = host.to(self.device, non_blocking=True)
            cu = cu_host.to(self.device, non_blocking=True)
            with torch.inference_mode():
                vectors = self._packed.forward(dev[0], dev[1], cu, p.max_seqlen)
            if self._pin:
                out = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
                out.copy_(vectors, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                parts.append((out, done, host, cu_host))
            else:
                parts.append((vectors, None, host, cu_host))
        return parts

    def _wait(self, parts: Any) -> np.ndarray:
        if parts is None:
            return np.zeros((0, self.native_dim), dtype=np.float32)
        arrays = []
        for out, done, _host, _cu in parts:
            if done is not None:
                done.synchronize()
            arrays.append(out.numpy().copy() if done is not None else out.numpy())
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def _embed_padded(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        assert self._model is not None
        width = max(len(seq) for seq in batch)
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

    def release_memory(self) -> None:
        """After an out-of-memory error: give cached blocks back before the smaller retry."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        if self._model is None:
            return
        self._model = None
        self._packed = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
