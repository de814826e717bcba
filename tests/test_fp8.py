"""``model.quantization: fp8`` (transformers backend): the FP8 linear's math, the packed
decoder in FP8 on a tiny Qwen3, and the job lines that refuse it where it cannot run.

The GPU runs ``torch._scaled_mm`` on FP8 tensor cores; on this CPU the same operator runs too
(torch 2.13: it dequantizes and multiplies in float32), so the kernel is tested here as well
as an emulation of the quantize/dequantize math that does not depend on it. The one-pass
Triton kernels that make the activations on CUDA (``kernels``) are checked against the torch
reference by the ``gpu`` tests at the end, where a CUDA GPU with FP8 is (Triton's CPU
interpreter rounds casts differently from the hardware, so it cannot stand in). Speed, and the
quality on real weights, are measured on the GPU by ``bench/gpu_fp8.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.cli import invoke, run
from helpers.jobs import demo_docs, make_job
from transformers import AutoModel

from pipeline.embedders.transformers_backend import TransformersBackend, fp8_device_problem
from pipeline.embedders.transformers_backend.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    fp8_linear,
    quantize_linears,
    quantize_rows,
    quantize_weight,
)
from pipeline.embedders.transformers_backend.layer import (
    _rms_norm,
    attention_in,
    attention_out_mlp,
    kernels_available,
    quantized_activation,
    quantized_norm,
    quantized_silu_mul,
)
from pipeline.embedders.transformers_backend.model import TransformersEmbedder
from pipeline.embedders.transformers_backend.packed import PackedDecoder, UnsupportedModel, pack
from pipeline.errors import ConfigError
from pipeline.job.load import load_job
from pipeline.job.model_info import read_model_info


def _kernel_problem() -> str | None:
    """Why ``torch._scaled_mm`` with row-wise scales does not run on this CPU, or None."""
    try:
        a = torch.ones(16, 32).to(FP8)
        b = torch.ones(16, 32).to(FP8)
        out = torch._scaled_mm(a, b.t(), scale_a=torch.full((16, 1), 2.0),
                               scale_b=torch.full((1, 16), 0.5), out_dtype=torch.float32)
        return None if torch.allclose(out, torch.full((16, 16), 32.0)) else "wrong result"
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


KERNEL_PROBLEM = _kernel_problem()
needs_kernel = pytest.mark.skipif(
    KERNEL_PROBLEM is not None,
    reason=f"torch._scaled_mm does not run on this CPU ({KERNEL_PROBLEM}); the emulation "
           f"tests still check the scaling")


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def emulated_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The FP8 linear's math in float32 without the kernel: quantize both operands as the
    product does, dequantize (value x scale), multiply."""
    w_fp8, w_scale = quantize_weight(w)
    x_fp8, x_scale = quantize_rows(x)
    out = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale.t()).t()
    return out if bias is None else out + bias


def random_linear(seed: int, k: int = 256, n: int = 384, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():  # rows of very different sizes, as trained layers have
        lin.weight.mul_(torch.logspace(-4, 1, n).unsqueeze(1))
    return lin


# ---------------------------------------------------------------- quantization

def test_weights_are_quantized_per_output_row() -> None:
    w = random_linear(0).weight.detach()
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and q.shape == w.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (1, w.shape[0]) and scale.is_contiguous()
    # each row's largest weight maps to e4m3's largest value: nothing clipped, full range used
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((w.shape[0],), FP8_MAX))
    back = q.float() * scale.t()
    row_err = (back - w).norm(dim=1) / w.norm(dim=1)
    assert row_err.max() < 0.04  # 3 mantissa bits: ~2-3% relative error in every row
    # one scale for the whole tensor (per-tensor) would lose the small rows to underflow
    flat = w.abs().max() / FP8_MAX
    per_tensor = (w / flat).to(FP8).float() * flat
    tensor_err = (per_tensor - w).norm(dim=1) / w.norm(dim=1)
    assert tensor_err[:20].min() > 0.1 > 0.04 > row_err.max()  # the smallest rows: 12-21%


def test_activations_are_quantized_per_token() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 50.0, 1.0, 0.0, 1e3]).unsqueeze(1)
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert torch.equal(q[4].float(), torch.zeros(64))  # a row of zeros (padding) stays zero
    back = q.float() * scale
    for row in (0, 1, 2, 3, 5):  # every token keeps its precision, whatever its size
        assert (back[row] - x[row]).norm() / x[row].norm() < 0.04


def test_emulated_fp8_linear_agrees_with_float32() -> None:
    lin = random_linear(2)
    x = torch.randn(50, 256)
    with torch.no_grad():
        want = lin(x)
        got = emulated_linear(x, lin.weight, lin.bias)
    rows = cosine(got, want)  # 0.9985-0.9997 seen: ~2.5% noise from each operand's rounding
    assert rows.min() >= 0.99 and rows.mean() >= 0.999


# ---------------------------------------------------------------- the kernel

@needs_kernel
def test_scaled_mm_is_the_emulated_math() -> None:
    lin = random_linear(3)
    x = torch.randn(37, 256)  # M need not be a multiple of 16
    w_fp8, w_scale = quantize_weight(lin.weight)
    got = fp8_linear(x, w_fp8, w_scale, lin.bias.detach())
    want = emulated_linear(x, lin.weight.detach(), lin.bias.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_fp8_linear_against_float32_nn_linear() -> None:
    """The product's case: bf16 activations in, bf16 out, against nn.Linear in float32."""
    lin = random_linear(4)
    x = torch.randn(3, 41, 256)  # any leading dimensions
    fp8 = Fp8Linear(lin)
    with torch.no_grad():
        got = fp8(x.to(torch.bfloat16))
        want = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    rows = cosine(got.float().reshape(-1, 384), want.reshape(-1, 384))
    assert rows.min() >= 0.99 and rows.mean() >= 0.999
    with pytest.raises(ValueError, match="multiple of 16"):
        Fp8Linear(torch.nn.Linear(40, 64))
    block = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    assert quantize_linears(block) == 2 and isinstance(block[2], Fp8Linear)


# ---------------------------------------------------------------- the packed decoder in FP8

def _packed(model: torch.nn.Module, pooling: str, batch: list[list[int]], **kw: Any) -> np.ndarray:
    p = pack(batch)
    with torch.inference_mode():
        out = PackedDecoder(model, pooling, **kw).forward(
            torch.from_numpy(p.ids), torch.from_numpy(p.positions), torch.from_numpy(p.cu_seqlens),
            p.max_seqlen)
    assert out.dtype == torch.float32  # pooled in float32
    return out.numpy()


@needs_kernel
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_fp8_tiny_qwen3_against_float32(tiny_qwen3_dir: Path, pooling: str) -> None:
    """The whole model in the product's configuration (bf16 activations, FP8 matrices) against
    float32: every vector within cosine 0.995 (0.9986-0.9998 seen); bf16 alone is ~0.99999."""
    rng = np.random.default_rng(0)
    batch = [rng.integers(1, 500, size=n).tolist() for n in (5, 40, 130, 17, 300, 2)]
    ref = _packed(AutoModel.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval(),
                  pooling, batch)
    model = AutoModel.from_pretrained(tiny_qwen3_dir, dtype=torch.bfloat16).eval()
    bf16 = _packed(model, pooling, batch)
    earlier = PackedDecoder(model, pooling)  # a bf16 decoder built before the FP8 one
    fp8 = _packed(model, pooling, batch, quantization="fp8")
    assert cosine(fp8, ref).min() >= 0.995
    assert cosine(bf16, ref).min() >= 0.9999
    assert not np.allclose(fp8, bf16)  # it did run in FP8
    # the FP8 decoder freed the model's bf16 matrices: the model's own forward fails loudly,
    # a new bf16 decoder is refused, one built before keeps its weights and its vectors ...
    layer = model.layers[0]
    assert all(m.weight.numel() == 0 for m in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_proj, layer.mlp.down_proj))
    with pytest.raises(RuntimeError):
        model(torch.tensor([batch[0]]))
    with pytest.raises(UnsupportedModel, match="load the model again"):
        PackedDecoder(model, pooling)
    p = pack(batch)
    with torch.inference_mode():
        kept = earlier.forward(torch.from_numpy(p.ids), torch.from_numpy(p.positions),
                               torch.from_numpy(p.cu_seqlens), p.max_seqlen).numpy()
    np.testing.assert_array_equal(kept, bf16)
    # ... and a second FP8 decoder reuses the quantized weights
    first = PackedDecoder(model, pooling, quantization="fp8").layers[0]
    again = PackedDecoder(model, pooling, quantization="fp8").layers[0]
    assert again.qkv_w is first.qkv_w and first.qkv_w.dtype == FP8
    assert first.qkv_s is not None and first.qkv_s.shape == (1, first.qkv_w.shape[0])


def test_fp8_needs_weights_in_multiples_of_16(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=100, hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=20)
    with pytest.raises(UnsupportedModel, match="multiples of 16"):
        PackedDecoder(Qwen3Model(cfg).eval(), "last", quantization="fp8")
    with pytest.raises(UnsupportedModel, match="unknown quantization"):
        PackedDecoder(Qwen3Model(cfg).eval(), "last", quantization="int4")


def test_activation_quantization_is_traced_into_the_layer_graph() -> None:
    """torch.compile sees the second layer half whole, quantization included (fullgraph: no
    break), with one scaled GEMM per matrix: Inductor can then fuse the per-token scale and the
    cast into the kernels around the GEMMs instead of launching them alone."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(5)
    o, o_s = quantize_weight(torch.randn(64, 64))
    gu, gu_s = quantize_weight(torch.randn(256, 64))
    down, down_s = quantize_weight(torch.randn(64, 128))
    fn = torch.compile(attention_out_mlp, backend=capture, fullgraph=True, dynamic=True)
    h, d = fn(torch.randn(37, 64), torch.randn(37, 4, 16), o, None, torch.ones(64), gu, down,
              1e-6, o_s, gu_s, down_s)
    # d: down_proj's output, which the next layer's norm adds
    assert d is not None and h.shape == d.shape == (37, 64) and len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function",
                                                                       "call_method")]
    assert sum("_scaled_mm" in t for t in targets) == 3
    assert targets.count("amax") == 3  # one per-token scale per GEMM, in the graph


# ---------------------------------------------------------------- where fp8 is refused

def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _fp8_job(tmp_path: Path, **model: Any) -> Path:
    return make_job(tmp_path, demo_docs(1), sink={"kind": "parquet", "path": "v"},
                    model={"quantization": "fp8", **model})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, where", [("cpu", "model.device is cpu"),
                                           ("auto", "torch sees no CUDA GPU here")])
def test_fp8_on_the_cpu_is_one_line(tmp_path: Path, device: str, where: str) -> None:
    job = _fp8_job(tmp_path, device=device)
    checked = invoke("validate", str(job))
    assert checked.exit_code == 2 and "Traceback" not in checked.output
    lines = error_lines(checked.output)
    assert lines == [f"error: {job}: model.quantization: fp8 needs a CUDA GPU with FP8 tensor "
                     f"cores (compute capability 8.9+: Ada, Hopper or later), but {where}; use "
                     f"quantization: null"], checked.output
    ran = run(job, catch=True)
    assert ran.exit_code == 2 and ran.exception is None and "Traceback" not in ran.output
    assert [line for line in error_lines(ran.output) if "model.quantization" in line] == lines


def test_quantization_is_in_the_fingerprint_only_when_set(tmp_path: Path) -> None:
    """FP8 moves vectors beyond floating-point tolerance, so it changes the fingerprint (a
    switch builds a new generation; a run does not resume across it), the same for either
    backend's FP8; a job without a quantization keeps the fingerprint it had before the key
    existed (the constants: computed before it), so no index is rebuilt for it."""
    def fingerprint(name: str, model: dict[str, Any]) -> str:
        job = load_job(make_job(tmp_path / name, demo_docs(1), model=model))
        return job.fingerprint("tok")

    sglang = {"backend": "sglang", "path": "/models/qwen3"}
    assert fingerprint("plain", {}) == "16bc0b236074f24b"
    assert fingerprint("sglang", sglang) == "f1f3632a1892c810"
    tf_fp8 = fingerprint("tf_fp8", {"backend": "transformers", "path": "/models/qwen3",
                                    "quantization": "fp8", "device": "cuda"})
    sglang_fp8 = fingerprint("sglang_fp8", {**sglang, "sglang": {"quantization": "fp8"}})
    assert tf_fp8 == sglang_fp8 != fingerprint("sglang_again", sglang)


@pytest.mark.parametrize("model, needle", [
    ({"quantization": "int8"}, "model.quantization"),
    ({"packing": "off"}, "model.quantization: fp8 runs in the packed path only, and "
                         "model.packing is off"),
    ({"dtype": "float32"}, "model.quantization: fp8 runs the rest of the model in bfloat16"),
])
def test_bad_fp8_settings_are_one_line(tmp_path: Path, model: dict[str, Any], needle: str) -> None:
    job = _fp8_job(tmp_path, device="cpu", **model)
    checked = invoke("validate", str(job))
    lines = error_lines(checked.output)
    assert checked.exit_code == 2 and len(lines) == 1, checked.output
    assert lines[0].startswith(f"error: {job}: ") and needle in lines[0], lines[0]
    assert "Traceback" not in checked.output


def test_fp8_needs_fp8_tensor_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: capability 8.9 (Ada) and 9.0 (Hopper) pass, 8.0 (A100) is named."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")
    for capability, ok in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True),
                           ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0, c=capability: c)
        for device in ("auto", "cuda", "cuda:1"):
            problem = fp8_device_problem(device)
            assert (problem is None) == ok, (capability, device, problem)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 0))
    problem = TransformersBackend(path="m", device="cuda:1", quantization="fp8").device_problem()
    assert problem == ("model.quantization: fp8 needs a GPU with FP8 tensor cores (compute "
                       "capability 8.9+: Ada, Hopper or later); cuda:1 (NVIDIA A100-SXM4-80GB) "
                       "has 8.0; use quantization: null")
    assert TransformersBackend(path="m", device="cuda:1").device_problem() is None


def test_the_embedder_refuses_fp8_where_the_packed_path_cannot_run(tiny_qwen3_dir: Path,
                                                                   minilm_dir: Path) -> None:
    with pytest.raises(ConfigError, match="model.quantization: fp8 needs a CUDA GPU"):
        TransformersEmbedder(read_model_info(tiny_qwen3_dir), 0, "last", device="cpu",
                             quantization="fp8")
    # on a GPU with FP8 (faked: the check runs before any weight moves), a model the packed
    # path cannot take (BERT) is refused at load, naming the setting
    emb = TransformersEmbedder(read_model_info(minilm_dir), 0, "mean", device="cpu")
    emb.device, emb.quantization = torch.device("cuda"), "fp8"
    with pytest.raises(ConfigError, match="model.quantization: fp8 runs in the packed path "
                                          "only, and the model 'model' cannot be packed: .*'bert'"):
        emb._setup_packing(read_model_info(minilm_dir), "auto", "auto")
    with pytest.raises(ConfigError, match="model.quantization: fp8 runs in the packed path only"):
        emb._setup_packing(read_model_info(minilm_dir), "off", "auto")


# ------------------------------------------------- the one-pass kernels, where they run (CUDA)

def _row_kernels_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability(0) < (8, 9):
        return "the GPU has no FP8 (compute capability below 8.9)"
    if not kernels_available():
        return "Triton is not installed"
    return None


ROW_KERNELS_PROBLEM = _row_kernels_problem()
needs_row_kernels = pytest.mark.skipif(
    ROW_KERNELS_PROBLEM is not None,
    reason=f"the FP8 activation kernels run on a CUDA GPU with FP8 ({ROW_KERNELS_PROBLEM}); "
           f"the CPU tests above check the torch reference they replace")


def test_the_kernels_register_their_operators_where_triton_is() -> None:
    """Where Triton is installed (any CUDA build of torch; here only if installed by hand) the
    kernels' module imports and registers every operator the layer calls: a broken import
    would otherwise surface only on a GPU."""
    pytest.importorskip("triton")
    from pipeline.embedders.transformers_backend import kernels  # noqa: F401

    for op in ("quantize_rows", "rms_norm_quantize", "add_rms_norm_quantize",
               "silu_mul_quantize", "qk_norm_rope"):
        assert hasattr(torch.ops.embed_job, op), op


def _error(q_s: tuple[torch.Tensor, ...], truth: torch.Tensor) -> float:
    """The largest error of the dequantized rows, relative to each row's largest value."""
    q, s = q_s[-2:]
    return float(((q.float() * s - truth).abs().amax(1) / truth.abs().amax(1)).max())


@pytest.mark.gpu
@needs_row_kernels
@pytest.mark.parametrize("width", [80, 2560, 4096, 9728])
def test_row_kernels_against_the_reference(width: int) -> None:
    """Each kernel's FP8 rows against the float32 truth, no worse than the torch reference's
    (half an e4m3 step of the row's largest value: 1/16 at most), scales within bf16 rounding,
    and the residual sum exactly the bf16 sum."""
    torch.manual_seed(width)
    dev, bf16, eps = "cuda", torch.bfloat16, 1e-6
    x = (torch.randn(257, width, device=dev) * torch.logspace(-2, 1, 257, device=dev)[:, None]
         ).to(bf16)
    d = torch.randn_like(x)
    w = (torch.rand(width, device=dev) + 0.5).to(bf16)
    gu = (torch.randn(257, 2 * width, device=dev) * 3).to(bf16)

    def norm(h: torch.Tensor) -> torch.Tensor:
        f = h.float()
        return f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    g, u = gu.float().chunk(2, dim=-1)
    cases = {
        "quantize_rows": (lambda k: quantized_activation(x, k), x.float()),
        "rms_norm_quantize": (lambda k: quantized_norm(x, None, w, eps, k), norm(x)),
        "add_rms_norm_quantize": (lambda k: quantized_norm(x, d, w, eps, k), norm(x + d)),
        "silu_mul_quantize": (lambda k: quantized_silu_mul(gu, k), F.silu(g) * u),
    }
    for name, (fn, truth) in cases.items():
        kernel, reference = fn(True), fn(False)
        assert kernel[-2].dtype == FP8 and kernel[-1].shape == (257, 1), name
        assert _error(kernel, truth) <= max(_error(reference, truth) * 1.05, 1 / 16), name
        torch.testing.assert_close(kernel[-1], reference[-1], rtol=2 ** -7, atol=0)
    h = quantized_norm(x, d, w, eps, True)[0]
    assert torch.equal(h, x + d)


@pytest.mark.gpu
@needs_row_kernels
@pytest.mark.parametrize("n_q,n_kv,head_dim,norms", [(32, 8, 128, True), (28, 4, 128, True),
                                                      (16, 16, 64, False)])
def test_qk_norm_rope_kernel_against_the_reference(n_q: int, n_kv: int, head_dim: int,
                                                   norms: bool) -> None:
    """The Q/K norm + RoPE kernel against the float32 truth from the same bf16 Q/K/V rows: no
    worse than the torch reference in bf16 (Qwen3-4B's heads, a head count that is not a power
    of two, no per-head norms as in Llama); v is a view of the rows, not a copy."""
    torch.manual_seed(n_q)
    dev, bf16, eps, t = "cuda", torch.bfloat16, 1e-6, 301
    width = (n_q + 2 * n_kv) * head_dim
    h = torch.randn(t, 64, device=dev, dtype=bf16)
    w = (torch.randn(width, 64, device=dev) / 8).to(bf16)
    angles = torch.rand(t, head_dim // 2, device=dev) * 6.3
    cos, sin = (f(torch.cat([angles, angles], -1)).to(bf16) for f in (torch.cos, torch.sin))
    qn, kn = ((torch.rand(head_dim, device=dev) + 0.5).to(bf16) if norms else None
              for _ in range(2))
    ones = torch.ones(64, device=dev, dtype=bf16)

    def halves(kernels: bool) -> tuple[torch.Tensor, ...]:
        return attention_in(h, None, cos, sin, ones, w, None, qn, kn, n_q, n_kv, head_dim, eps,
                            kernels=kernels)[1:]

    # the truth: the bf16 path's own Q/K/V product, then per-head norm and RoPE in float32
    qkv = torch.nn.functional.linear(_rms_norm(h, ones, eps), w).float()
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    truth = []
    for x, weight in ((q.reshape(t, n_q, head_dim), qn), (k.reshape(t, n_kv, head_dim), kn)):
        if weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        half = head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        truth.append(x * cos.float()[:, None] + rotated * sin.float()[:, None])
    truth.append(v.reshape(t, n_kv, head_dim))
    kernel, reference = halves(True), halves(False)
    for name, k_out, r_out, true in zip("qkv", kernel, reference, truth):
        assert k_out.shape == r_out.shape and k_out.dtype == bf16, name
        k_err, r_err = ((x.float() - true).abs().max().item() for x in (k_out, r_out))
        assert k_err <= r_err * 1.05 + 1e-3, (name, k_err, r_err)
    assert kernel[2]._base is not None and not kernel[2].is_contiguous()  # a view


@pytest.mark.gpu
@needs_row_kernels
@pytest.mark.parametrize("quantization", ["fp8", None])
def test_the_decoder_uses_the_kernels_on_cuda(tiny_qwen3_dir: Path, quantization: str | None
                                              ) -> None:
    """On CUDA the packed decoder runs the Triton kernels (FP8: its activations; both: the Q/K
    norm + RoPE), compiled too, and its vectors agree with the torch reference's."""
    model = AutoModel.from_pretrained(tiny_qwen3_dir, dtype=torch.bfloat16).cuda().eval()
    rng = np.random.default_rng(1)
    p = pack([rng.integers(1, 500, size=n).tolist() for n in (5, 40, 130, 17, 300, 2)])
    args = [torch.from_numpy(a).cuda() for a in (p.ids, p.positions, p.cu_seqlens)]
    out = {}
    for compiled in (False, True):
        decoder = PackedDecoder(model, "last", compile=compiled, quantization=quantization)
        assert decoder.kernels
        with torch.inference_mode():
            out[compiled] = decoder.forward(*args, p.max_seqlen).cpu().numpy()
            decoder.kernels = False
            reference = decoder.forward(*args, p.max_seqlen).cpu().numpy()
        assert cosine(out[compiled], reference).min() >= 0.999
    assert cosine(out[True], out[False]).min() >= 0.999
