"""``model.quantization: fp8`` beside bf16: the transformers backend's packed path, one process.

Same model shape and corpus as ``gpu_transformers.py`` (the Qwen3-Embedding-4B shape with random
bf16 weights; the smoke corpus: 3000 documents, 1,654,541 tokens; sorted 32K-token plan,
``embed_stream``, the product's ``TransformersEmbedder`` with packing and ``torch.compile``):

  kernels:*                         each one-pass Triton kernel that makes an FP8 activation
                                    (``kernels``) beside Inductor's fusion of the torch
                                    reference, at the model's widths and 16,384 tokens: error
                                    against the float32 truth, time (do_bench), bytes/s
  attention                         the packed path's attention (flash attention 2's varlen
                                    kernel, torch's) beside cuDNN's ragged attention over the
                                    bench plan's batches: time, agreement, first-call cost
  tf_fp8:memory                     GPU memory of a model of its own: its bf16 weights, then
                                    after the FP8 decoder is built (the bf16 matrices freed)
                                    and the peak while building it
  tf_bf16:startup, tf_bf16:stream   the packed path in bf16 (the product's GPU default)
  tf_fp8:startup, tf_fp8:stream     the same embedder with ``quantization="fp8"``: its linear
                                    layers quantized at load from the same bf16 weights
  tf_bf16_inductor:stream,          both without the Triton kernels: what they make (the FP8
  tf_fp8_inductor:stream            activations, the Q/K norm + RoPE) made by Inductor's fusion
                                    of the torch reference instead (what ran before them)
  tf_fp8:profile                    torch.profiler over the same batches of both paths: GPU time
                                    by kind (attention, GEMMs, the fused kernels that quantize
                                    activations, other fused kernels, copies) and the GPU's idle
                                    time between kernels (launch gaps); a table
  tf_fp8:pipeline                   ``embed-job run`` end to end with the fp8 job (the run builds
                                    its own embedder, as the command does) on 2 copies of the
                                    corpus (``--pipeline-copies``), vs the fp8 stream; once per
                                    ``batching.planner_processes`` in $BENCH_PLANNER_PROCESSES
                                    (comma-separated; default: the product's)
  quality_minilm                    fp8 / bf16 / float32 on all-MiniLM-L6-v2 over the demo corpus
                                    (``fp8_quality.py``), where the model is here
  tf_fp8_exact_accum:stream         fp8 with ``use_fast_accum=False``
  tf_bf16:stream_2, tf_fp8:stream_2 both streams again (the run-to-run spread)
  golden_fp8                        fp8 vs bf16 vectors of 16 documents (random weights: a smoke
                                    check that nothing broke, not a quality figure)

Stages run in that order, each time-boxed (``--deadline``) and guarded: a failure is recorded
and the next stage runs. ``bash bench/run_device.sh tf-fp8`` runs it on the device.

    python bench/gpu_fp8.py --out $OUT [--deadline 270] [--stages tf_bf16,tf_fp8,profile]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    EOS,
    QWEN3_EMBEDDING_4B,
    Results,
    Stages,
    import_datasets_or_stub,
    log,
    make_docs,
    random_model_for,
    rss_peak_mib,
    write_corpus,
    write_model_dir,
)

T0 = time.monotonic()
GOAL = 110_000  # tokens/s on one H200 (the issue's)
STAGES = ("kernels", "attention", "memory", "tf_bf16", "tf_fp8", "inductor", "profile",
          "pipeline", "quality", "exact_accum", "repeat", "golden")
# Qwen3-Embedding-4B's attention heads: query heads, key/value heads, head size
HEADS = tuple(int(QWEN3_EMBEDDING_4B[k]) for k in ("num_attention_heads", "num_key_value_heads",
                                                   "head_dim"))
KINDS = ("attention", "matmul", "quantize (fused)", "other fused", "other kernels",
         "memcpy/memset")
GEMM_NAMES = ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm89_", "sm100_", "f8f8", "scaled_mm",
              "cublas", "wgmma")


def gib(x: int) -> float:
    return round(x / 2**30, 2)


def kernel_kind(event: dict[str, Any]) -> str:
    """Which part of the layer a GPU event of the profile belongs to, by its name.

    Inductor names its kernels after the aten ops they fuse (``triton_per_fused_..._amax_...``):
    a kernel with ``amax`` computes a per-token FP8 scale (fused with the RMSNorm, SiLU·up or
    layout copy that produces the activation), as do ``kernels``' (``*quantize*``); the
    GEMMs are cuBLASLt's (``nvjet``/``sm90_xmma`` names) or CUTLASS's."""
    name = str(event.get("name", "")).lower()
    if event.get("cat") in ("gpu_memcpy", "gpu_memset"):
        return "memcpy/memset"
    if "flash" in name or "fmha" in name or "attention" in name:
        return "attention"
    if name.startswith("triton_tem"):  # an Inductor GEMM template (max-autotune)
        return "matmul"
    if "quantize" in name:  # the one-pass kernels (_silu_mul_quantize_kernel, ...)
        return "quantize (fused)"
    if name.startswith("triton"):  # named after the aten ops it fuses, `_scaled_mm` included
        return "quantize (fused)" if "amax" in name else "other fused"
    if any(s in name for s in GEMM_NAMES):
        return "matmul"
    return "other kernels"


def breakdown(events: list[dict[str, Any]], forwards: int) -> dict[str, Any]:
    """GPU time by kind, and idle time: the profiled span minus the union of busy intervals."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in
           ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the profile"}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in gpu)
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = spans[-1][1] - spans[0][0]
    by_kind = {k: 0.0 for k in KINDS}
    names: dict[tuple[str, str], list[float]] = {}
    kernels = 0
    for e in gpu:
        kind = kernel_kind(e)
        by_kind[kind] += float(e.get("dur", 0))
        names.setdefault((str(e.get("name", "?")), kind), []).append(float(e.get("dur", 0)))
        kernels += e.get("cat") == "kernel"
    top = sorted(names.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {
        "span_ms": round(window / 1e3, 2), "idle_ms": round((window - busy) / 1e3, 2),
        "idle_share": round((window - busy) / window, 4),
        "kinds_ms": {k: round(v / 1e3, 2) for k, v in by_kind.items()},
        "kinds_share": {k: round(v / window, 4) for k, v in by_kind.items()},
        "kernels": kernels, "forward_passes": forwards,
        "kernels_per_forward": round(kernels / max(forwards, 1), 1),
        "top_kernels": [{"name": n[:110], "kind": k, "calls": len(d), "ms": round(sum(d) / 1e3, 2)}
                        for (n, k), d in top]}


def print_profile(rows: dict[str, dict[str, Any]]) -> None:
    labels = [k for k in rows if "kinds_ms" in rows[k]]
    if not labels:
        return
    print("| GPU time, same batches | " + " | ".join(f"{k} ms | share" for k in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    for kind in KINDS:
        cells = " | ".join(f"{rows[k]['kinds_ms'][kind]:,.1f} | {rows[k]['kinds_share'][kind]:.1%}"
                           for k in labels)
        print(f"| {kind} | {cells} |")
    cells = " | ".join(f"{rows[k]['idle_ms']:,.1f} | {rows[k]['idle_share']:.1%}" for k in labels)
    print(f"| idle (launch gaps, host waits) | {cells} |")
    cells = " | ".join(f"{rows[k]['span_ms']:,.1f} | 100%" for k in labels)
    print(f"| span (first kernel start to last end) | {cells} |")
    cells = " | ".join(f"{rows[k]['kernels_per_forward']} | " for k in labels)
    print(f"| kernels per forward pass | {cells} |")
    if {"bf16", "fp8"} <= set(labels):  # quantizing rides in the fused kernels: their growth
        fused = {k: rows[k]["kinds_ms"]["quantize (fused)"] + rows[k]["kinds_ms"]["other fused"]
                 for k in ("bf16", "fp8")}
        print(f"| what quantizing activations adds to the fused kernels (fp8 - bf16) | "
              f"{fused['fp8'] - fused['bf16']:,.1f} ms | "
              f"{(fused['fp8'] - fused['bf16']) / rows['fp8']['span_ms']:.1%} of the fp8 span | | |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/embed-bench-fp8")
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--deadline", type=float, default=270.0, help="seconds; later stages skip")
    ap.add_argument("--stages", default="all", help=f"comma-separated of {','.join(STAGES)}")
    ap.add_argument("--profile-batches", type=int, default=8)
    ap.add_argument("--pipeline-copies", type=int, default=2,
                    help="the end-to-end run's corpus: this many copies of the bench corpus, so "
                         "its fixed ~1-2 s of job set-up and first window weigh less")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke test)")
    ap.add_argument("--hidden", type=int, default=None, help="a smaller model (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one")
    ap.add_argument("--minilm-archive", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import_datasets_or_stub()
    out, work = Path(args.out), Path(args.work)
    res = Results(out / "results.jsonl")
    stages = set(args.stages.split(",")) if args.stages != "all" else set(STAGES)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    try:  # kernel names that say what they fuse (the profile's classification reads them)
        import torch._inductor.config as inductor_config

        inductor_config.triton.descriptive_names = "original_aten"
    except Exception as e:  # noqa: BLE001
        log(f"inductor config: {e!r}")

    run = Stages(res, stages, args.deadline, T0,
                 after_error=torch.cuda.empty_cache if cuda else None)
    want, guarded = run.want, run.guarded

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name(0) if cuda else "cpu"}
    if cuda:
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        env["transformers"] = repr(e)
    res.add(stage="fp8_env", **env)

    if cuda and want("kernels", 30):
        guarded("kernels", lambda: kernel_stages(res))
    if cuda and want("attention", 40):
        guarded("attention", lambda: attention_stage(res, args.docs))
    if cuda and want("memory", 40):
        guarded("tf_fp8:memory", lambda: memory_stage(res, work))
    throughput = stages & {"tf_bf16", "tf_fp8", "inductor", "profile", "pipeline", "exact_accum",
                           "repeat", "golden"}
    if throughput:
        guarded("fp8_throughput", lambda: throughput_stages(args, res, device, want, guarded,
                                                            sync, work, out))
    if want("quality", 40):
        from fp8_quality import ARCHIVE, measure

        guarded("quality_minilm", lambda: measure(res, str(device), args.minilm_archive or ARCHIVE))
    res.add(stage="fp8_done", seconds=round(run.elapsed(), 1), rss_peak_mib=round(rss_peak_mib(), 1))
    return 0


def kernel_stages(res: Results, tokens: int = 16384) -> None:
    """The one-pass kernels (``kernels.py``) beside Inductor's fusion of the torch reference
    (compiled with dynamic shapes, as in the layer), at Qwen3-Embedding-4B's widths."""
    import functools

    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from pipeline.embedders.transformers_backend.layer import (
        kernels_available,
        norm_rope,
        quantized_activation,
        quantized_norm,
        quantized_silu_mul,
    )

    if not kernels_available():  # imports them: their torch.ops.embed_job operators
        raise RuntimeError("the FP8 activation kernels need Triton and a CUDA GPU")
    cfg, eps, dev = QWEN3_EMBEDDING_4B, 1e-6, "cuda"
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    attn_width = HEADS[0] * HEADS[2]
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    d = torch.randn_like(x)
    w = (torch.rand(hidden, device=dev) + 0.5).to(torch.bfloat16)
    gu = (torch.randn(tokens, 2 * inter, device=dev) * 3).to(torch.bfloat16)
    a = torch.randn(tokens, attn_width, device=dev, dtype=torch.bfloat16)

    def norm(h: torch.Tensor) -> torch.Tensor:
        f = h.float()
        return f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    g, u = gu.float().chunk(2, dim=-1)
    # name: (the activation maker given kernels=True/False, float32 truth, bytes moved once)
    cases: dict[str, tuple[Any, Any, int]] = {
        "rms_norm_quantize": (lambda k: quantized_norm(x, None, w, eps, k)[1:],
                              lambda: norm(x), tokens * hidden * 3),
        "add_rms_norm_quantize": (lambda k: quantized_norm(x, d, w, eps, k),
                                  lambda: norm(x + d), tokens * hidden * 7),
        "silu_mul_quantize": (lambda k: quantized_silu_mul(gu, k), lambda: F.silu(g) * u,
                              tokens * inter * 5),
        "quantize_rows": (lambda k: quantized_activation(a, k), lambda: a.float(),
                          tokens * attn_width * 3),
    }

    def error(out: tuple[Any, ...], truth: Any) -> float:
        q, s = out[-2:]
        return float(((q.float() * s - truth).abs().amax(1) / truth.abs().amax(1)).max())

    for name, (fn, truth_fn, nbytes) in cases.items():
        inductor = torch.compile(functools.partial(fn, False), dynamic=True)
        kernel = functools.partial(fn, True)
        truth = truth_fn()
        err_k, err_i = error(kernel(), truth), error(inductor(), truth)
        ms_k, ms_i = do_bench(kernel), do_bench(inductor)
        res.add(stage=f"kernels:{name}", tokens=tokens, kernel_ms=round(ms_k, 4),
                inductor_ms=round(ms_i, 4), speedup=round(ms_i / ms_k, 2),
                kernel_gb_per_s=round(nbytes / ms_k / 1e6, 1),
                kernel_error=round(err_k, 5), inductor_error=round(err_i, 5),
                agrees=err_k <= max(1.05 * err_i, 1 / 16),
                note="error: largest |dequantized - float32 truth| / the row's largest value; "
                     "bytes: the kernel's reads and writes once")

    # the Q/K norm + RoPE kernel (no FP8) beside Inductor's fusion of the reference
    n_q, n_kv, hd = HEADS
    qkv = torch.randn(tokens, (n_q + 2 * n_kv) * hd, device=dev, dtype=torch.bfloat16)
    cos, sin = (f(torch.rand(tokens, hd, device=dev) * 6).to(torch.bfloat16)
                for f in (torch.cos, torch.sin))
    qn, kn = ((torch.rand(hd, device=dev) + 0.5).to(torch.bfloat16) for _ in range(2))
    rope = functools.partial(norm_rope, qkv, cos, sin, qn, kn, n_q, n_kv, hd, eps)
    rope_inductor = torch.compile(functools.partial(rope, False), dynamic=True)
    ref_q, ref_k = rope_inductor()
    ker_q, ker_k = rope(True)
    ms_k, ms_i = do_bench(functools.partial(rope, True)), do_bench(rope_inductor)
    nbytes = tokens * ((n_q + n_kv) * hd * 4 + hd * 4)  # q/k read and written, cos/sin read
    res.add(stage="kernels:qk_norm_rope", tokens=tokens, kernel_ms=round(ms_k, 4),
            inductor_ms=round(ms_i, 4), speedup=round(ms_i / ms_k, 2),
            kernel_gb_per_s=round(nbytes / ms_k / 1e6, 1),
            max_diff_q=float((ker_q.float() - ref_q.float()).abs().max()),
            max_diff_k=float((ker_k.float() - ref_k.float()).abs().max()),
            note="Qwen3's per-head RMSNorm of q and k + RoPE, from the fused Q/K/V rows; "
                 "max_diff: kernel vs Inductor's (both round once, to bf16)")

    # the warps per program that the kernels' launch rule picks, beside the others
    from triton import next_power_of_2 as triton_block

    from pipeline.embedders.transformers_backend import kernels as K
    from pipeline.embedders.transformers_backend.fp8 import _MIN_AMAX, FP8, FP8_MAX

    def launch(kernel: Any, src: Any, n: int, warps: int) -> Any:
        q = torch.empty((tokens, n), dtype=FP8, device=dev)
        s = torch.empty((tokens, 1), dtype=torch.float32, device=dev)
        return lambda: kernel[(tokens,)](src, q, s, n, src.stride(0), q.stride(0),
                                         BLOCK=triton_block(n), MIN_AMAX=_MIN_AMAX, MAX=FP8_MAX,
                                         num_warps=warps)

    for name, kernel, src, n, nbytes in (
            ("silu_mul_quantize", K._silu_mul_quantize_kernel, gu, inter, tokens * inter * 5),
            ("quantize_rows", K._quantize_rows_kernel, a, attn_width, tokens * attn_width * 3)):
        times = {w: do_bench(launch(kernel, src, n, w)) for w in (4, 8, 16, 32)}
        res.add(stage=f"kernels:{name}:warps", chosen=K._launch(n)[1],
                ms={w: round(t, 4) for w, t in times.items()},
                gb_per_s={w: round(nbytes / t / 1e6, 1) for w, t in times.items()})


def memory_stage(res: Results, work: Path) -> None:
    """GPU memory of the FP8 decoder on a model of its own (random bf16 weights, the
    Qwen3-Embedding-4B shape): the bf16 model, then the FP8 decoder built over it (its bf16
    matrices freed layer by layer) and the peak while building it."""
    import torch
    from transformers import AutoConfig, AutoModel

    from pipeline.embedders.transformers_backend.packed import PackedDecoder

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(
            write_model_dir(work / "qwen3-4b-memory", config=dict(QWEN3_EMBEDDING_4B))),
            dtype=torch.bfloat16).eval()
    loaded = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    decoder = PackedDecoder(model, "last", quantization="fp8")
    after = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    res.add(stage="tf_fp8:memory", bf16_model_gib=gib(loaded), fp8_decoder_gib=gib(after),
            peak_while_quantizing_gib=gib(peak), ratio_to_bf16=round(after / loaded, 3),
            note="allocated by this model alone; the FP8 decoder keeps the FP8 matrices, their "
                 "scales, the embeddings and norms in bf16, and frees the bf16 matrices")
    del decoder, model
    torch.cuda.empty_cache()


def attention_stage(res: Results, n_docs: int, every: int = 3) -> None:
    """Attention alone over every ``every``-th batch of the bench plan (the corpus's lengths,
    32K-token batches, Qwen3-Embedding-4B's heads): the product's flash attention (FA2) beside
    cuDNN's attention with ragged offsets (``aten._cudnn_attention_forward`` with cu_seqlens),
    the candidate for Hopper. Random q/k/v: times and agreement, not quality."""
    import torch
    from triton.testing import do_bench

    from pipeline.embedders.transformers_backend.packed import varlen_attention
    from pipeline.plan.batching import pack_batches

    dev = "cuda"
    n_q, n_kv, hd = HEADS
    lengths = np.sort([len(d) for d in make_docs(n_docs)])
    bounds = pack_batches(lengths, 32768, 256)[::every]
    scale = hd ** -0.5
    totals = {"fa2": 0.0, "cudnn": 0.0}
    first_ms, worst, tokens, error = [], 0.0, 0, None
    torch.manual_seed(0)
    for s, e in bounds:
        lens = torch.tensor(lengths[s:e], dtype=torch.int32)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        cu = cu.to(dev)
        t, longest = int(lens.sum()), int(lens.max())
        q = torch.randn(t, n_q, hd, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(t, n_kv, hd, device=dev, dtype=torch.bfloat16) for _ in range(2))

        def fa2() -> torch.Tensor:
            return varlen_attention(q, k, v, cu, longest, scale, True)

        def cudnn() -> torch.Tensor:
            return torch.ops.aten._cudnn_attention_forward(
                q, k, v, None, cu, cu, longest, longest, False, 0.0, True, scale=scale)[0]

        ref = fa2()
        if error is None:
            try:
                torch.cuda.synchronize()
                t0 = time.monotonic()
                out = cudnn()
                torch.cuda.synchronize()
                first_ms.append((time.monotonic() - t0) * 1e3)
                worst = max(worst, float((out.float() - ref.float()).abs().max()))
                totals["cudnn"] += do_bench(cudnn, warmup=5, rep=20)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
        totals["fa2"] += do_bench(fa2, warmup=5, rep=20)
        tokens += t
    res.add(stage="attention", batches=len(bounds), tokens=tokens,
            fa2_ms=round(totals["fa2"], 2),
            cudnn_ms=None if error else round(totals["cudnn"], 2),
            cudnn_speedup=None if error else round(totals["fa2"] / totals["cudnn"], 3),
            cudnn_max_diff=None if error else worst, cudnn_error=error,
            cudnn_first_call_ms=[round(x, 1) for x in first_ms[:8]],
            note=f"every {every}th batch of the bench plan; times per forward of one layer's "
                 "attention (do_bench); first_call: the first call per new shape (cuDNN "
                 "builds a graph per shape)")


def throughput_stages(args: Any, res: Results, device: Any, want: Any, guarded: Any, sync: Any,
                      work: Path, out: Path) -> None:
    import torch

    from pipeline.embedders.transformers_backend import fp8
    from pipeline.embedders.transformers_backend.model import TransformersEmbedder
    from pipeline.job.model_info import read_model_info
    from pipeline.plan.batching import pack_batches

    cuda = device.type == "cuda"
    cfg = dict(QWEN3_EMBEDDING_4B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.hidden:
        cfg.update(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4)
    model_dir = write_model_dir(work / "qwen3-4b", config=cfg)
    docs = make_docs(args.docs)
    n_tokens = sum(map(len, docs))
    model = random_model_for(model_dir, device)
    info = read_model_info(model_dir)
    ordered = sorted(docs, key=len)
    plan = [ordered[s:e] for s, e in pack_batches(np.array([len(d) for d in ordered]), 32768, 256)]
    log(f"corpus: {len(docs)} docs, {n_tokens} tokens, {len(plan)} batches; "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device}")
    rates: dict[str, float] = {}

    def start(name: str, quantization: str | None) -> TransformersEmbedder:
        if cuda:
            torch.cuda.empty_cache()
        t = time.monotonic()
        emb = TransformersEmbedder(info, EOS, "last", dtype="bfloat16", device=str(device),
                                   packing="on", compile="on", packed_tokens=32768,
                                   quantization=quantization)
        sync()
        res.add(stage=f"{name}:startup", seconds=round(time.monotonic() - t, 1),
                gpu_allocated_gib=gib(torch.cuda.memory_allocated()) if cuda else None,
                note="weight fusion (+ FP8 quantization) + torch.compile warm-up (2 calls); "
                     "the bench's embedders share one model: the bf16 embedder, made first, "
                     "keeps the bf16 matrices alive that the FP8 one frees (memory stage)")
        return emb

    def stream(name: str, emb: TransformersEmbedder, tag: str = "stream") -> float:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        emb.embed_batch(plan[-1])  # warm-up: the longest batch (compiles if a guard changed)
        sync()
        warm = time.monotonic() - t
        t = time.monotonic()
        rows = sum(len(v) for _, v in emb.embed_stream(enumerate(plan)))
        dt = time.monotonic() - t
        tps = n_tokens / dt
        rates.setdefault(name, tps)
        extra: dict[str, Any] = {}
        if name != "tf_bf16" and "tf_bf16" in rates:
            extra["ratio_to_bf16"] = round(tps / rates["tf_bf16"], 3)
        if name != "tf_bf16":
            extra["vs_goal_110k"] = round(tps / GOAL, 3)
        res.add(stage=f"{name}:{tag}", tokens=n_tokens, seconds=round(dt, 2),
                tokens_per_s=round(tps, 1), batches=len(plan), vectors=rows,
                warmup_s=round(warm, 1), padding_waste=0.0,
                gpu_peak_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None, **extra)
        return tps

    bf16 = guarded("tf_bf16", lambda: start("tf_bf16", None)) if want("tf_bf16", 60) else None
    if bf16 is not None and want("tf_bf16", 40):
        guarded("tf_bf16:stream", lambda: stream("tf_bf16", bf16))
    f8 = guarded("tf_fp8", lambda: start("tf_fp8", "fp8")) if want("tf_fp8", 60) else None
    if f8 is not None and want("tf_fp8", 35):
        guarded("tf_fp8:stream", lambda: stream("tf_fp8", f8))

    def inductor(name: str, emb: TransformersEmbedder) -> None:
        """The same weights with Inductor's fusion of the torch reference instead of the
        Triton kernels (recompiles)."""
        emb._packed.kernels = False
        try:
            stream(f"{name}_inductor", emb)
        finally:
            emb._packed.kernels = True

    for name, emb in (("tf_bf16", bf16), ("tf_fp8", f8)):
        if emb is not None and emb._packed.kernels and want("inductor", 50):
            guarded(f"{name}_inductor:stream", lambda n=name, e=emb: inductor(n, e))

    def profile() -> None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        step = max(1, len(plan) // args.profile_batches)
        batches = plan[step // 2::step][:args.profile_batches]  # spread over the length range
        rows: dict[str, dict[str, Any]] = {}
        for label, emb in (("bf16", bf16), ("fp8", f8)):
            if emb is None:
                continue
            sync()
            activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
            with torch_profile(activities=activities) as prof:
                for _ in emb.embed_stream(enumerate(batches)):
                    pass
                sync()
            trace = work / f"trace-{label}.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text()).get("traceEvents", [])
            rows[label] = breakdown(events, len(batches))
            if label == "fp8":
                with open(trace, "rb") as src, gzip.open(out / "trace-fp8.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        res.add(stage="tf_fp8:profile", tokens=sum(map(len, (d for b in batches for d in b))),
                batches=len(batches), **rows,
                note="GPU kernels of the same batches, embed_stream; 'quantize (fused)': Inductor "
                     "kernels that compute a per-token FP8 scale, fused with the op producing "
                     "the activation; idle: span minus the union of kernel/copy intervals; "
                     "trace of the fp8 run in trace-fp8.json.gz (Perfetto)")
        print_profile(rows)

    if f8 is not None and want("profile", 25):
        guarded("tf_fp8:profile", profile)

    def pipeline(processes: str | None) -> None:
        from pipeline_run import job_dict, run_pipeline

        if cuda:
            torch.cuda.empty_cache()
        big = write_corpus(work / "corpus-e2e.parquet", docs, copies=args.pipeline_copies)
        job = job_dict("e2e_tf_fp8", big, model_dir, "transformers", work / "e2e-fp8",
                       sort_window=None, dimension=min(1024, int(cfg["hidden_size"])),
                       model_extra={"dtype": "bfloat16", "device": str(device), "packing": "on",
                                    "compile": "on", "quantization": "fp8"})
        if processes:  # batching.planner_processes of the run
            job["batching"]["planner_processes"] = \
                processes if processes == "auto" else int(processes)
        r = run_pipeline(job, work / "e2e-fp8")  # the run makes its embedder from the job
        ref = rates.get("tf_fp8")
        ratio = r["tokens_per_s"] / ref if ref else None
        res.add(stage="tf_fp8:pipeline", planner_processes=processes or "default",
                padding_waste=0.0, ratio_to_embedder=round(ratio, 3) if ratio else None,
                within_5pct_of_embedder=bool(ratio and ratio >= 0.95),
                runner_ratio_to_embedder=round(r["runner_tokens_per_s"] / ref, 3) if ref else None,
                **r)

    for processes in os.environ.get("BENCH_PLANNER_PROCESSES", "").split(","):  # "": default
        if f8 is not None and want("pipeline", 25 + 20 * args.pipeline_copies):
            guarded(f"tf_fp8:pipeline[{processes or 'default'}]",
                    lambda p=processes: pipeline(p or None))

    def exact_accum() -> None:
        assert f8 is not None
        fp8.FAST_ACCUM = False
        try:
            stream("tf_fp8_exact_accum", f8)
        finally:
            fp8.FAST_ACCUM = True

    if f8 is not None and want("exact_accum", 50):
        guarded("tf_fp8_exact_accum:stream", exact_accum)
    if bf16 is not None and want("repeat", 30):
        guarded("tf_bf16:stream_2", lambda: stream("tf_bf16", bf16, "stream_2"))
    if f8 is not None and want("repeat", 22):
        guarded("tf_fp8:stream_2", lambda: stream("tf_fp8", f8, "stream_2"))

    def golden() -> None:
        assert bf16 is not None and f8 is not None
        rng = np.random.default_rng(5)
        sample = [docs[i] for i in sorted(rng.choice(len(docs), size=16, replace=False).tolist())]
        a, b = bf16.embed_batch(sample), f8.embed_batch(sample)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        res.add(stage="golden_fp8", cos_fp8_vs_bf16_min=round(float(cos.min()), 5),
                cos_fp8_vs_bf16_mean=round(float(cos.mean()), 5),
                finite=bool(np.isfinite(b).all()), lengths=[len(s) for s in sample],
                note="random weights (chaotic over 36 layers): bf16 itself drifts from float32 to "
                     "a min of 0.57 here (docs/benchmarks.md); quality: quality_minilm")

    if bf16 is not None and f8 is not None and want("golden", 10):
        guarded("golden_fp8", golden)


if __name__ == "__main__":
    sys.exit(main())
