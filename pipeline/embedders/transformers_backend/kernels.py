"""One-pass Triton kernels of the packed path (CUDA only): each reads a token's row once.

Four make the FP8 activations: they keep the row in registers and write the e4m3 row and its
float32 scale (``max|y| / 448``, as ``fp8.quantize_rows``): the reduction and the scaling of
the same values in one pass. Inductor does this itself for rows of up to 1,024 values (a
"persistent" reduction); the packed path's rows are wider (2,560 hidden, 4,096 attention
output, 9,728 SiLU·up at Qwen3-Embedding-4B), so there it loops over the row twice — once for
the maximum, once to scale — and recomputes SiLU·up in each loop. The profile of that
(``bench/gpu_fp8.py``, docs/benchmarks.md) is why these exist:

- ``quantize_rows(x)``: the attention output before o_proj.
- ``rms_norm_quantize(x, w, eps)``: the RMSNorm before Q/K/V, quantized.
- ``add_rms_norm_quantize(x, d, w, eps)``: a residual add (after o_proj; after the previous
  layer's down_proj), the RMSNorm after it and its quantization; also returns the sum (the
  next residual).
- ``silu_mul_quantize(gate_up)``: SiLU(gate)·up before down_proj, quantized.

One runs in bf16 and FP8 alike: ``qk_norm_rope(qkv, ...)``, Qwen3's per-head RMSNorm of Q and
K and RoPE, from the fused Q/K/V row straight into attention's q and k (Inductor's fusion of
it ran at 1.6 TB/s, and copied v, which attention reads in place).

They are ``torch.library.triton_op`` operators, so ``torch.compile`` keeps them in the layer's
graph (no graph break) and Inductor fuses what surrounds them. Their math is the torch
reference's (``layer.py``'s ``quantized_*`` with ``kernels=False``: ``_rms_norm``, ``F.silu``,
``fp8.quantize_rows``) except that SiLU·up stays in float32 until it is scaled (the reference
rounds it to bf16 first); ``tests/test_fp8.py``'s ``gpu`` tests check them against it on a
CUDA GPU (Triton's CPU interpreter rounds casts unlike the hardware, so it cannot stand in).
Importing this module needs Triton: ``layer.kernels_available()`` imports it only where it
can run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pipeline.embedders.transformers_backend.fp8 import _MIN_AMAX, FP8, FP8_MAX


def _launch(n: int) -> tuple[int, int]:
    """The whole row in one block (a power of two) and the warps that hold it: 4 up to 4,096
    values, 8 above (measured on an H100 at 16,384 tokens, docs/benchmarks.md)."""
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 4096 else 8


@triton.jit
def _scale_store(y, q_row, s_ptr, row, cols, mask, MIN_AMAX: tl.constexpr, MAX: tl.constexpr):
    """Write row ``y`` (float32, masked lanes 0) as e4m3 with its per-row scale."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), MIN_AMAX) / MAX
    q = tl.minimum(tl.maximum(y / scale, -MAX), MAX)
    tl.store(q_row + cols, q.to(q_row.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n, stride_x, stride_q,
                          BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr, MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _scale_store(y, q_ptr + row * stride_q, s_ptr, row, cols, mask, MIN_AMAX, MAX)


@triton.jit
def _rms_norm_quantize_kernel(x_ptr, d_ptr, w_ptr, h_ptr, q_ptr, s_ptr, n, stride_x, stride_d,
                              stride_h, stride_q, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                              MIN_AMAX: tl.constexpr, MAX: tl.constexpr):
    """RMSNorm as Hugging Face's (float32 statistics, the weight applied in x's dtype), of x
    or, with ADD, of x + d (that sum written to h: the next residual)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * stride_d + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    h = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # x's dtype between the steps, as the reference rounds (arithmetic itself in float32)
    y = (w * h.to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    _scale_store(y, q_ptr + row * stride_q, s_ptr, row, cols, mask, MIN_AMAX, MAX)


@triton.jit
def _silu_mul_quantize_kernel(gu_ptr, q_ptr, s_ptr, n, stride_gu, stride_q,
                              BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr, MAX: tl.constexpr):
    """gate_up rows are [gate (n) | up (n)], as the fused gate/up matrix writes them."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    base = gu_ptr + row * stride_gu
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + n + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    _scale_store(y, q_ptr + row * stride_q, s_ptr, row, cols, mask, MIN_AMAX, MAX)


@triton.jit
def _norm_rope(src, w_ptr, dst, c, s, eps, N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
               NORM: tl.constexpr):
    """N heads of D values at ``src`` (H = N rounded up to a power of two): per-head RMSNorm
    (with NORM) and RoPE, written to ``dst``. RoPE's rotate-half partner of value d is
    d ± D/2 of the same head; it is loaded again (a cache hit) rather than shuffled."""
    heads = tl.arange(0, H)[:, None]
    d = tl.arange(0, D)[None, :]
    partner = (d + D // 2) % D
    mask = (heads < N) & (d < D)  # d < D: always true, makes the mask the tile's shape
    x = tl.load(src + heads * D + d, mask=mask, other=0.0)
    xp = tl.load(src + heads * D + partner, mask=mask, other=0.0).to(tl.float32)
    y = x.to(tl.float32)
    if NORM:  # as ``layer._rms_norm``: float32 statistics, rounded to x's dtype between steps
        r = tl.rsqrt(tl.sum(y * y, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + d).to(tl.float32)
        wp = tl.load(w_ptr + partner).to(tl.float32)
        y = (w * (y * r).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
        xp = (wp * (xp * r).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    rotated = tl.where(d < D // 2, -xp, xp)  # rotate_half(x)[d]
    tl.store(dst + heads * D + d, (y * c + rotated * s).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, stride_qkv,
                         stride_cs, eps, N_Q: tl.constexpr, N_KV: tl.constexpr, D: tl.constexpr,
                         HQ: tl.constexpr, HKV: tl.constexpr, NORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)[None, :]
    c = tl.load(cos_ptr + row * stride_cs + d).to(tl.float32)
    s = tl.load(sin_ptr + row * stride_cs + d).to(tl.float32)
    src = qkv_ptr + row * stride_qkv
    _norm_rope(src, qw_ptr, q_ptr + row * (N_Q * D), c, s, eps, N_Q, HQ, D, NORM)
    _norm_rope(src + N_Q * D, kw_ptr, k_ptr + row * (N_KV * D), c, s, eps, N_KV, HKV, D, NORM)


def _outputs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.shape[0]
    return (torch.empty((m, n), dtype=FP8, device=x.device),
            torch.empty((m, 1), dtype=torch.float32, device=x.device))


@triton_op("embed_job::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) e4m3 and (M, 1) float32 scales; one pass."""
    n = x.shape[1]
    q, s = _outputs(x, n)
    block, warps = _launch(n)
    wrap_triton(_quantize_rows_kernel)[(x.shape[0],)](
        x, q, s, n, x.stride(0), q.stride(0), BLOCK=block, MIN_AMAX=_MIN_AMAX, MAX=FP8_MAX,
        num_warps=warps)
    return q, s


@triton_op("embed_job::rms_norm_quantize", mutates_args=())
def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * weight as e4m3 rows and their scales; one pass."""
    n = x.shape[1]
    q, s = _outputs(x, n)
    block, warps = _launch(n)
    wrap_triton(_rms_norm_quantize_kernel)[(x.shape[0],)](
        x, x, weight, x, q, s, n, x.stride(0), x.stride(0), x.stride(0), q.stride(0), eps,
        ADD=False, BLOCK=block, MIN_AMAX=_MIN_AMAX, MAX=FP8_MAX, num_warps=warps)
    return q, s


@triton_op("embed_job::add_rms_norm_quantize", mutates_args=())
def add_rms_norm_quantize(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x + d, and RMSNorm(h) * weight as e4m3 rows and their scales; one pass."""
    n = x.shape[1]
    h = torch.empty_like(x)
    q, s = _outputs(x, n)
    block, warps = _launch(n)
    wrap_triton(_rms_norm_quantize_kernel)[(x.shape[0],)](
        x, d, weight, h, q, s, n, x.stride(0), d.stride(0), h.stride(0), q.stride(0), eps,
        ADD=True, BLOCK=block, MIN_AMAX=_MIN_AMAX, MAX=FP8_MAX, num_warps=warps)
    return h, q, s


@triton_op("embed_job::silu_mul_quantize", mutates_args=())
def silu_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 2N) [gate | up] -> SiLU(gate) * up as (M, N) e4m3 and (M, 1) scales; one pass."""
    n = gate_up.shape[1] // 2
    q, s = _outputs(gate_up, n)
    block, warps = _launch(n)
    wrap_triton(_silu_mul_quantize_kernel)[(gate_up.shape[0],)](
        gate_up, q, s, n, gate_up.stride(0), q.stride(0), BLOCK=block, MIN_AMAX=_MIN_AMAX,
        MAX=FP8_MAX, num_warps=warps)
    return q, s


@triton_op("embed_job::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, n_q: int, n_kv: int,
                 head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, (n_q + 2 n_kv) * D) fused Q/K/V rows and (T, D) cos/sin -> q (T, n_q, D) and
    k (T, n_kv, D), RMSNorm'd per head (when the norms are given) and rotated; one pass. D must
    be a power of two (``layer.norm_rope`` checks)."""
    t = qkv.shape[0]
    q = torch.empty((t, n_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, n_kv, head_dim), dtype=qkv.dtype, device=qkv.device)
    norm = q_norm is not None and k_norm is not None
    wrap_triton(_qk_norm_rope_kernel)[(t,)](
        qkv, cos, sin, q_norm if norm else cos, k_norm if norm else cos, q, k, qkv.stride(0),
        cos.stride(0), eps, N_Q=n_q, N_KV=n_kv, D=head_dim, HQ=triton.next_power_of_2(n_q),
        HKV=triton.next_power_of_2(n_kv), NORM=norm, num_warps=4)
    return q, k
