"""FP8 (e4m3) matrix products for the packed path (``model.quantization: fp8``).

What is quantized, and how:

- **Weights**, once at load, from the bf16 checkpoint: every ``nn.Linear`` of the decoder
  layers (q/k/v and o projections, gate/up and down projections; Q/K/V and gate/up already
  fused into one matrix each) becomes ``float8_e4m3fn`` with one float32 scale per output row
  (per channel): ``scale[n] = max|W[n, :]| / 448``. A row's largest weight maps to e4m3's
  largest value, so no row is clipped and a row of small weights keeps its precision.
- **Activations**, on the fly, one float32 scale per token (row-wise): ``max|x[t, :]| / 448``.
  On CUDA each FP8 activation comes from one Triton kernel that reads the row once
  (``kernels``: the RMSNorm before Q/K/V; the residual add, RMSNorm and quantization
  before gate/up; SiLU·up before down; the attention output before o_proj). Written as plain
  torch (``quantize_rows``, the reference, and what runs elsewhere), the reduction and the
  cast are fused by Inductor into the kernel producing the activation, but for rows wider than
  1,024 values it loops over each row twice (the maximum, then the scaling), recomputing
  SiLU·up; the profile in ``bench/gpu_fp8.py`` measured that pass as FP8's main overhead. The
  residual add after down_proj, which the bf16 GEMM absorbs (``addmm``) and ``_scaled_mm``
  cannot, is left to the next layer's norm kernel (``layer.attention_out_mlp``).
- **The product**: ``torch._scaled_mm(x_fp8, W_fp8.t(), scale_a=(T, 1), scale_b=(1, N),
  out_dtype=bfloat16)``: FP8 tensor cores with both scales applied in the GEMM's epilogue.
  Its requirements (torch 2.11-2.13, CUDA): compute capability 8.9 or 9.x+, K and N multiples
  of 16 (the model is checked at load), the first operand row-major, the second column-major
  (``W_fp8`` is stored (N, K) row-major, so ``.t()`` is column-major with no copy), both scales
  float32 and contiguous. ``use_fast_accum`` is on (``FAST_ACCUM``): Hopper's FP8 tensor cores
  then keep the running sum in their own accumulator instead of promoting it to float32 every
  few K-steps, as vLLM's CUTLASS FP8 GEMMs do; ``bench/gpu_fp8.py`` measures both.
- **Not quantized**: the embedding table, attention (flash attention in bf16: its FLOPs are a
  small share, and FP8 attention costs accuracy where long documents need it), RMSNorms, RoPE,
  residuals (bf16), pooling and the final normalization (float32).

Why ``torch._scaled_mm`` rather than torchao or a kernel of our own: it is in every torch this
product supports (no new dependency; torchao is not on the GPU machines and its float8 API
changes between releases), it dispatches to cuBLASLt's row-wise scaled FP8 GEMM on Hopper
with cuBLAS 12.9+ (torch's CUTLASS kernel on Ada and with older cuBLAS) — the same class of
kernel as SGLang's online FP8 (an FP8 tensor-core GEMM with the scales in its epilogue) — and
Inductor knows the operator, so the quantization around it fuses under ``torch.compile``.
torchao's ``Float8WeightOnly``/``Float8DynamicActivation`` configs would end in the same
``_scaled_mm`` call with a tensor-subclass layer on top; a hand-written triton GEMM would have
to beat cuBLAS at large M to be worth its upkeep. The cost of the choice: the activation
quantization is a separate (fused) pass over the activation rather than inside the GEMM's
prologue (the one-pass kernels keep that pass to one read of the row), which the profile in
``bench/gpu_fp8.py`` reports.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row of zeros (a padding token's embedding) gets this scale instead of 0 (no 0/0).
_MIN_AMAX = 1e-12
# Hopper's fast FP8 accumulation (see the module docstring); the bench may turn it off.
FAST_ACCUM = True
# _scaled_mm's shape rule: K and N multiples of 16.
ALIGN = 16


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (N, K) e4m3 (row-major) and its (1, N) float32 per-row scales."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale.reshape(1, -1).contiguous()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (M, K) e4m3 and their (M, 1) float32 per-row scales."""
    h = x.to(torch.float32)
    scale = h.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    return (h / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_linear(q: torch.Tensor, scale: torch.Tensor, w_fp8: torch.Tensor,
                  w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The FP8 GEMM of already quantized (M, K) rows ``q`` (scales (M, 1)) with a weight given
    as ``quantize_weight(W)``: (M, N) in ``out_dtype``."""
    out = torch._scaled_mm(q, w_fp8.t(), scale_a=scale, scale_b=w_scale, out_dtype=out_dtype,
                           use_fast_accum=FAST_ACCUM)
    if bias is not None:
        out = out + bias.to(out.dtype)  # outside the GEMM: fused with what follows it
    return out


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W given as ``quantize_weight(W)``: x quantized per row,
    one scaled FP8 GEMM, the result in x's dtype. x is (..., K)."""
    lead = x.shape[:-1]
    out = scaled_linear(*quantize_rows(x.reshape(-1, x.shape[-1])), w_fp8, w_scale, bias,
                        x.dtype)
    return out.reshape(*lead, w_fp8.shape[0])


def fits(weight: torch.Tensor) -> bool:
    """Whether ``_scaled_mm`` takes this (N, K) weight."""
    return weight.dim() == 2 and weight.shape[0] % ALIGN == 0 and weight.shape[1] % ALIGN == 0


class Fp8Linear(torch.nn.Module):
    """An ``nn.Linear`` run through ``fp8_linear`` (its weight quantized once, here). The
    packed path does not use modules; this puts the same math into any model (the bench's
    quality check on all-MiniLM-L6-v2, the tests)."""

    w_fp8: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if not fits(linear.weight):
            raise ValueError(f"a {tuple(linear.weight.shape)} weight is not a multiple of "
                             f"{ALIGN} in both dimensions")
        w_fp8, w_scale = quantize_weight(linear.weight)
        self.register_buffer("w_fp8", w_fp8)
        self.register_buffer("w_scale", w_scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.w_fp8, self.w_scale, self.bias)


def quantize_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an ``Fp8Linear``; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Fp8Linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count
