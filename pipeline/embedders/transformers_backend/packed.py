"""Padding-free forward passes for decoder embedding models (the Llama / Qwen family).

A batch of token-id sequences becomes one row of ``sum(len)`` tokens: positions restart at 0
for every sequence, attention is causal *within* each sequence only (variable-length flash
attention driven by ``cu_seqlens``, the cumulative sequence starts), and pooling reads the
rows it needs (the last token of each sequence for Qwen3-Embedding). No token is computed
that is not in a chunk, so padding waste is zero whatever the batch looks like.

The layer math (``layer.py``) runs over the Hugging Face module's own weights, with two
fusions the HF modules do not do: Q/K/V in one matrix product and gate/up in one. The fused
weight is one tensor and the HF ``nn.Linear`` weights become views into it, so memory is not
doubled and the HF model still runs (the padded reference path uses it).

With ``quantization="fp8"`` the same layer functions take FP8 weights and their scales (made
here, once, from the bf16 weights, which are then freed: the model's own forward no longer
runs), and on CUDA their activations come from the one-pass Triton kernels of ``kernels``;
see ``pipeline.embedders.transformers_backend.fp8``.

On CUDA the attention is ``aten._flash_attention_forward`` with ``cu_seqlens`` (what
``torch.nn.attention.varlen.varlen_attn`` calls, with a stable signature across torch 2.5 -
2.13); elsewhere (CPU tests) each sequence runs through ``scaled_dot_product_attention``
alone, which is the reference the packed path must match.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.embedders.transformers_backend.fp8 import fits, quantize_weight
from pipeline.embedders.transformers_backend.layer import (
    attention_in,
    attention_out_mlp,
    compiled_halves,
    kernels_available,
)

# Decoder families whose layer is: RMSNorm -> (q, k, v)[+ per-head q/k RMSNorm] -> RoPE ->
# causal attention -> o_proj -> residual -> RMSNorm -> down(silu(gate) * up) -> residual.
SUPPORTED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral"})


class UnsupportedModel(ValueError):
    """The model's layers are not the ones the packed path implements."""


# ---------------------------------------------------------------- variable-length attention

def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, causal: bool = True) -> torch.Tensor:
    """Attention of packed sequences: q (T, Hq, D), k/v (T, Hkv, D), Hq a multiple of Hkv.

    ``cu_seqlens`` (n+1,) int32 holds each sequence's start and the total; tokens attend only
    to tokens of their own sequence (and, causal, not to later ones). Flash attention's
    variable-length kernel on CUDA (grouped K/V heads natively), the reference elsewhere.
    """
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False,
            scale=scale)[0]
    return reference_varlen_attention(q, k, v, cu_seqlens, scale, causal)


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` per sequence: slow, obviously right."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        # (L, H, D) -> (1, H, L, D)
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                           enable_gqa=ks.shape[1] != qs.shape[1])
        out[s:e] = o.squeeze(0).transpose(0, 1)
    return out


# ---------------------------------------------------------------------------- packing

@dataclass
class Packed:
    """One batch as a single row: ``ids`` and ``positions`` (T,), ``cu_seqlens`` (n+1,)."""

    ids: np.ndarray
    positions: np.ndarray
    cu_seqlens: np.ndarray
    lengths: np.ndarray

    @property
    def max_seqlen(self) -> int:
        return int(self.lengths.max())

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


def pack(batch: Sequence[Sequence[int]]) -> Packed:
    """Concatenate sequences; positions count from 0 in each one."""
    lengths = np.fromiter((len(s) for s in batch), dtype=np.int64, count=len(batch))
    if len(batch) == 0 or lengths.min() == 0:
        raise ValueError("cannot embed an empty token sequence")
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=total)
    cu = np.zeros(len(batch) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    return Packed(ids, positions, cu, lengths)


def split_for_packing(lengths: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive sequences of at most ``max_tokens`` tokens together
    (a longer sequence gets a run of its own)."""
    runs: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_tokens:
            runs.append((start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        runs.append((start, len(lengths)))
    return runs


# ---------------------------------------------------------------------- the decoder

@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    # FP8: the four weights above are e4m3 and these their per-row scales (None: bf16)
    qkv_s: torch.Tensor | None = None
    o_s: torch.Tensor | None = None
    gate_up_s: torch.Tensor | None = None
    down_s: torch.Tensor | None = None


def _fuse(linears: list[torch.nn.Linear], attr: str) -> torch.Tensor | None:
    """One tensor holding the linears' weights (or biases) stacked; the modules' parameters
    become views into it, so the model keeps working and no memory is duplicated."""
    parts = [getattr(m, attr) for m in linears]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        parts = [p if p is not None else torch.zeros(m.out_features, dtype=linears[0].weight.dtype,
                                                     device=linears[0].weight.device)
                 for p, m in zip(parts, linears)]
    fused = torch.cat([p.detach() for p in parts], dim=0)
    offset = 0
    for m, p in zip(linears, parts):
        n = p.shape[0]
        if getattr(m, attr) is not None:
            setattr(m, attr, torch.nn.Parameter(fused[offset:offset + n], requires_grad=False))
        offset += n
    return fused


def _release(layer: torch.nn.Module) -> None:
    """Free a layer's bf16 matrices once its FP8 copies exist: the module's seven linear
    weights become empty, so the model's own forward fails loudly if called (an FP8 embedder
    never calls it: FP8 runs in the packed path only). A decoder built on this model before
    keeps its own references, so its weights stay alive and it keeps working."""
    attn, mlp = layer.self_attn, layer.mlp
    layer._embed_job_fused = None
    for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
              mlp.down_proj):
        m.weight = torch.nn.Parameter(m.weight.new_empty(0), requires_grad=False)


class PackedDecoder:
    """Runs a Hugging Face decoder model (``AutoModel``: embed_tokens, layers, norm,
    rotary_emb) over packed sequences and pools one vector per sequence."""

    def __init__(self, model: torch.nn.Module, pooling: str, compile: bool = False,
                 quantization: str | None = None) -> None:
        config = model.config
        model_type = getattr(config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"packing supports {sorted(SUPPORTED_MODEL_TYPES)}, "
                                   f"not model_type {model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"packing supports silu MLPs, not {config.hidden_act!r}")
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise UnsupportedModel("packing does not implement sliding-window attention")
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(model, name):
                raise UnsupportedModel(f"the model has no {name!r} (load it with AutoModel)")
        if pooling not in ("last", "mean", "cls"):
            raise UnsupportedModel(f"unknown pooling {pooling!r}")
        if quantization not in (None, "fp8"):
            raise UnsupportedModel(f"unknown quantization {quantization!r}")
        self.model = model
        self.pooling = pooling
        first = model.layers[0].self_attn
        self.head_dim = int(getattr(first, "head_dim", config.hidden_size // config.num_attention_heads))
        self.n_q = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_q)
        self.eps = float(config.rms_norm_eps)
        self.scale = float(getattr(first, "scaling", self.head_dim ** -0.5))
        self.quantization = quantization
        self.layers = [self._fp8(layer) if quantization == "fp8" else self._prepare(layer)
                       for layer in model.layers]
        # the one-pass Triton kernels where they run (CUDA): the FP8 activations, and the Q/K
        # norm + RoPE in either dtype; a switch so the bench can measure Inductor's own fusion
        self.kernels = next(model.parameters()).is_cuda and kernels_available()
        self.compiled = compile
        self._eager = (attention_in, attention_out_mlp)
        self._fns = compiled_halves() if compile else self._eager

    @staticmethod
    def _kept(layer: torch.nn.Module) -> dict[str, Any]:
        """What both dtypes read from the module as it is: the norms and o_proj's bias."""
        attn = layer.self_attn
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return {"in_norm": layer.input_layernorm.weight,
                "q_norm": q_norm.weight if q_norm is not None else None,
                "k_norm": k_norm.weight if k_norm is not None else None,
                "o_b": attn.o_proj.bias, "post_norm": layer.post_attention_layernorm.weight}

    @staticmethod
    def _prepare(layer: torch.nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(layer, "_embed_job_fp8", None) is not None:
            raise UnsupportedModel("this model's matrices went to an FP8 decoder, which freed "
                                   "their bf16 weights: load the model again for bf16")
        cached = getattr(layer, "_embed_job_fused", None)
        if cached is None:
            with torch.no_grad():
                qkv_w = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
                qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
                gate_up_w = _fuse([mlp.gate_proj, mlp.up_proj], "weight")
            if mlp.gate_proj.bias is not None or mlp.down_proj.bias is not None:
                raise UnsupportedModel("packing does not implement MLP biases")
            cached = (qkv_w, qkv_b, gate_up_w)
            layer._embed_job_fused = cached  # idempotent: a second embedder reuses the fusion
        qkv_w, qkv_b, gate_up_w = cached
        return _Layer(qkv_w=qkv_w, qkv_b=qkv_b, o_w=attn.o_proj.weight, gate_up_w=gate_up_w,
                      down_w=mlp.down_proj.weight, **PackedDecoder._kept(layer))

    @staticmethod
    def _fp8(layer: torch.nn.Module) -> _Layer:
        """The layer's four matrices in FP8 with per-row scales, quantized once from the bf16
        weights and cached on the layer; then the bf16 matrices are freed (``_release``), one
        layer at a time, so loading peaks at the bf16 model plus one layer's FP8 copy and
        runs in about half the bf16 model's weight memory."""
        cached = getattr(layer, "_embed_job_fp8", None)
        if cached is None:
            w = PackedDecoder._prepare(layer)
            mats = (w.qkv_w, w.o_w, w.gate_up_w, w.down_w)
            bad = [tuple(m.shape) for m in mats if not fits(m)]
            if bad:
                raise UnsupportedModel(f"fp8 needs weight dimensions that are multiples of 16, "
                                       f"not {bad[0]}")
            with torch.no_grad():
                cached = (tuple(quantize_weight(m) for m in mats), w.qkv_b)
            layer._embed_job_fp8 = cached
            _release(layer)
        ((qkv, qkv_s), (o, o_s), (gu, gu_s), (down, down_s)), qkv_b = cached
        return _Layer(qkv_w=qkv, qkv_b=qkv_b, o_w=o, gate_up_w=gu, down_w=down, qkv_s=qkv_s,
                      o_s=o_s, gate_up_s=gu_s, down_s=down_s, **PackedDecoder._kept(layer))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        """Packed ids/positions (T,) and cu_seqlens (n+1,) int32, all on the model's device ->
        float32 (n, hidden), pooled, not normalized."""
        model = self.model
        h = model.embed_tokens(ids)
        cos, sin = model.rotary_emb(h.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].to(h.dtype), sin[0].to(h.dtype)
        fn_in, fn_out = self._fns
        dynamic = self.compiled and h.shape[0] > 1
        if not dynamic:  # a 1-token batch would be a graph of its own: not worth compiling
            fn_in, fn_out = self._eager
        mark = torch._dynamo.mark_dynamic
        d: torch.Tensor | None = None  # FP8: the last MLP output, added by the next norm
        for w in self.layers:
            if dynamic:  # T is symbolic from the first compilation on: one graph for all lengths
                for t in (h, d, cos, sin):
                    if t is not None:
                        mark(t, 0)
            h, q, k, v = fn_in(h, d, cos, sin, w.in_norm, w.qkv_w, w.qkv_b, w.q_norm, w.k_norm,
                               self.n_q, self.n_kv, self.head_dim, self.eps, w.qkv_s,
                               self.kernels)
            attn = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, True)
            if dynamic:
                mark(h, 0)
                mark(attn, 0)
            h, d = fn_out(h, attn, w.o_w, w.o_b, w.post_norm, w.gate_up_w, w.down_w, self.eps,
                          w.o_s, w.gate_up_s, w.down_s, self.kernels)
        if d is not None:
            h = h + d
        cu = cu_seqlens.to(torch.long)
        if self.pooling == "last":
            return model.norm(h.index_select(0, cu[1:] - 1)).to(torch.float32)
        if self.pooling == "cls":
            return model.norm(h.index_select(0, cu[:-1])).to(torch.float32)
        normed = model.norm(h).to(torch.float32)
        lengths = cu[1:] - cu[:-1]
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=h.device), lengths,
                                          output_size=h.shape[0])
        sums = torch.zeros((len(lengths), h.shape[1]), dtype=torch.float32, device=h.device)
        sums.index_add_(0, segment, normed)
        return sums / lengths.unsqueeze(1).to(torch.float32)
