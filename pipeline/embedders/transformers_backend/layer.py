"""One decoder layer's math for the packed path, in two halves around the attention.

A pre-norm Llama/Qwen layer: RMSNorm -> Q/K/V (fused: one matrix) [-> per-head Q/K RMSNorm]
-> RoPE | attention (``packed.varlen_attention``, eager) | o_proj -> residual -> RMSNorm ->
gate/up (fused) -> SiLU·up -> down -> residual. Written in plain torch over the Hugging Face
module's own weights, as functions of tensors, so ``torch.compile`` builds each half once, with
dynamic shapes, and every layer reuses that code (compilation takes seconds, not minutes).

With FP8 weights (their per-row scales given) every matrix product is an FP8 GEMM
(``fp8.scaled_linear``) of activations quantized per token: by the one-pass Triton kernels
(``kernels``, ``kernels=True``, CUDA) or by the torch reference (``fp8.quantize_rows``). The Q/K
norm + RoPE has a Triton kernel too, in either dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.embedders.transformers_backend.fp8 import quantize_rows, scaled_linear


def kernels_available() -> bool:
    """Whether the one-pass Triton kernels (``kernels.py``) can run here: a CUDA device is
    present and Triton imports. Importing them registers their ``torch.ops.embed_job``
    operators."""
    if not torch.cuda.is_available():
        return False
    try:
        from pipeline.embedders.transformers_backend import kernels  # noqa: F401
    except ModuleNotFoundError as e:  # no Triton: the torch reference; any other error is ours
        if (e.name or "").partition(".")[0] != "triton":
            raise
        return False
    return True


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Hugging Face's Llama/Qwen RMSNorm: float32 statistics, weight applied in x's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def quantized_norm(h: torch.Tensor, d: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   kernels: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h' = h (+ d, the residual add), and RMSNorm(h') * weight as FP8 rows with their scales:
    one Triton kernel (``kernels``) or the torch reference."""
    if kernels:
        ops = torch.ops.embed_job
        if d is None:
            return (h, *ops.rms_norm_quantize(h, weight, eps))
        return ops.add_rms_norm_quantize(h, d, weight, eps)
    if d is not None:
        h = h + d
    return (h, *quantize_rows(_rms_norm(h, weight, eps)))


def quantized_silu_mul(gate_up: torch.Tensor, kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up of the fused gate/up output, as FP8 rows with their scales."""
    if kernels:
        return torch.ops.embed_job.silu_mul_quantize(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return quantize_rows(F.silu(gate) * up)


def quantized_activation(x: torch.Tensor, kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) rows (the attention output) as FP8 rows with their scales."""
    return torch.ops.embed_job.quantize_rows(x) if kernels else quantize_rows(x)


def attention_in(h: torch.Tensor, d: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 in_norm: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, n_q: int, n_kv: int,
                 head_dim: int, eps: float, qkv_s: torch.Tensor | None = None,
                 kernels: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a pre-norm decoder layer: [the previous layer's residual add,] RMSNorm,
    fused Q/K/V, per-head Q/K RMSNorm (Qwen3), RoPE. ``h`` (T, hidden) and ``d`` (the previous
    layer's MLP output, not yet added: FP8; or None), cos/sin (T, head_dim) -> the residual
    h + d, q (T, n_q, D), k/v (T, n_kv, D); v is a view into the Q/K/V product (attention reads
    strided rows). ``qkv_s``: the per-row scales of an FP8 ``qkv_w``; ``kernels``: the Triton
    kernels make its activation and the Q/K norm + RoPE."""
    if qkv_s is None:
        if d is not None:
            h = h + d
        qkv = F.linear(_rms_norm(h, in_norm, eps), qkv_w, qkv_b)
    else:
        h, x, x_s = quantized_norm(h, d, in_norm, eps, kernels)
        qkv = scaled_linear(x, x_s, qkv_w, qkv_s, qkv_b, h.dtype)
    v = qkv[:, (n_q + n_kv) * head_dim:].view(-1, n_kv, head_dim)
    q, k = norm_rope(qkv, cos, sin, q_norm, k_norm, n_q, n_kv, head_dim, eps, kernels)
    return h, q, k, v


def norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, n_q: int, n_kv: int,
              head_dim: int, eps: float, kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, n_q, D) and k (T, n_kv, D) of the fused Q/K/V rows, RMSNorm'd per head (Qwen3)
    and rotated (RoPE): one Triton kernel (``kernels.qk_norm_rope``, for a power-of-two
    head size) or the torch reference."""
    if kernels and head_dim >= 2 and head_dim & (head_dim - 1) == 0:
        return torch.ops.embed_job.qk_norm_rope(qkv, cos, sin, q_norm, k_norm, n_q, n_kv,
                                                head_dim, eps)
    T = qkv.shape[0]
    q, k = qkv[:, :(n_q + n_kv) * head_dim].split([n_q * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(T, n_q, head_dim)
    k = k.reshape(T, n_kv, head_dim)
    if q_norm is not None:
        q = _rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = _rms_norm(k, k_norm, eps)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    return q.contiguous(), k.contiguous()


def attention_out_mlp(h: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor,
                      o_b: torch.Tensor | None, post_norm: torch.Tensor, gate_up_w: torch.Tensor,
                      down_w: torch.Tensor, eps: float, o_s: torch.Tensor | None = None,
                      gate_up_s: torch.Tensor | None = None, down_s: torch.Tensor | None = None,
                      kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Second half: o_proj + residual, RMSNorm, fused gate/up, SiLU, down + residual (the
    ``*_s`` scales: FP8 weights; ``kernels``: their activations made by the Triton kernels).
    Returns the residual and, in FP8, down_proj's output apart: FP8 GEMMs cannot add the
    residual in their epilogue as the bf16 ones do, so the next layer's norm adds it
    (``attention_in``; one pass over the row instead of two) and the last one's caller."""
    a = attn.reshape(h.shape[0], -1)
    if o_s is None or gate_up_s is None or down_s is None:
        h = h + F.linear(a, o_w, o_b)  # bf16: cuBLAS adds the residual in the GEMM's epilogue
        gate, up = F.linear(_rms_norm(h, post_norm, eps), gate_up_w).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, down_w), None
    o = scaled_linear(*quantized_activation(a, kernels), o_w, o_s, o_b, h.dtype)
    h, x, x_s = quantized_norm(h, o, post_norm, eps, kernels)
    gate_up = scaled_linear(x, x_s, gate_up_w, gate_up_s, None, h.dtype)
    return h, scaled_linear(*quantized_silu_mul(gate_up, kernels), down_w, down_s, None, h.dtype)


_COMPILED: dict[str, Any] = {}


def compiled_halves() -> tuple[Any, Any]:
    """The two halves of a layer under ``torch.compile``, built once per process and shared by
    every layer and embedder (layers differ only in the weight tensors passed in). The
    attention between them runs eagerly: it takes a host int (the longest sequence) that
    would otherwise become a symbolic input, and it is one fused kernel already."""
    if not _COMPILED:
        _COMPILED["in"] = torch.compile(attention_in)
        _COMPILED["out"] = torch.compile(attention_out_mlp)
    return _COMPILED["in"], _COMPILED["out"]
