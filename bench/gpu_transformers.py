"""The transformers backend on the GPU, against the naive baselines, in one process.

Rows (Qwen3-Embedding-4B shape, random bf16 weights, the smoke corpus of 3000 documents):

  naive       the script everyone writes first: HF AutoModel + SDPA, corpus order, left
              padding, batches of 8 (and one try at batches of 32)
  sorted      same model call, chunks sorted by length and cut into 32K padded-token batches
  packed      the product's packed path (pipeline.embedders.transformers_backend.packed) without torch.compile
  packed+compile  the product's default on CUDA: packed + compiled layer + pipelined stream
  pipeline    ``embed-job run`` end to end (Parquet in, chunking, plan, embed, MRL, Parquet out)

plus: the golden-vector check (packed vs the padded reference, bf16), a 32K-token chunk, the
attention kernel check, start-up (compile) time. Each stage is time-boxed and guarded: a
failure is recorded and the next stage runs.

    python bench/gpu_transformers.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/embed-bench")
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds; later stages skip")
    ap.add_argument("--naive-seconds", type=float, default=20.0)
    ap.add_argument("--subset-every", type=int, default=2,
                    help="the slow padded baselines run on every N-th document")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke test)")
    ap.add_argument("--stages", default="all")
    ap.add_argument("--pipeline-windows", default="500",
                    help="sort_window of each end-to-end run (comma-separated)")
    args = ap.parse_args()

    import torch

    import_datasets_or_stub()
    out = Path(args.out)
    work = Path(args.work)
    res = Results(out / "results.jsonl")
    stages = set(args.stages.split(",")) if args.stages != "all" else None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Stages(res, stages, args.deadline, T0,
                 after_error=torch.cuda.empty_cache if device.type == "cuda" else None)
    want, guarded = run.want, run.guarded
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        env["transformers"] = repr(e)
    try:
        import torch.nn.attention.varlen as varlen
        env["torch.nn.attention.varlen"] = "present: " + ", ".join(varlen.__all__)
    except Exception as e:  # noqa: BLE001
        env["torch.nn.attention.varlen"] = f"absent ({type(e).__name__})"
    res.add(stage="env", **env)

    # ------------------------------------------------------------------ corpus + model
    cfg_json = dict(QWEN3_EMBEDDING_4B)
    if args.layers:
        cfg_json["num_hidden_layers"] = args.layers
    model_dir = write_model_dir(work / "qwen3-4b", config=cfg_json)
    docs = make_docs(args.docs)
    n_tokens = sum(map(len, docs))
    corpus = write_corpus(work / "corpus.parquet", docs)
    log(f"corpus: {len(docs)} docs, {n_tokens} tokens; model dir {model_dir}")

    from transformers import AutoConfig, AutoModel

    t = time.monotonic()
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    # every AutoModel.from_pretrained of the bench model dir gets this model (random weights)
    model = random_model_for(model_dir, device)
    torch.cuda.synchronize() if device.type == "cuda" else None
    res.add(stage="model_init", seconds=round(time.monotonic() - t, 1),
            params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            attn_impl=model.config._attn_implementation)

    from pipeline.embedders.transformers_backend.model import TransformersEmbedder
    from pipeline.embedders.transformers_backend.packed import reference_varlen_attention, varlen_attention
    from pipeline.job.model_info import read_model_info
    from pipeline.plan.batching import pack_batches

    info = read_model_info(model_dir)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def reset_mem() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib() -> float:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else 0.0

    # ------------------------------------------------------------------ attention kernel check
    def attention_check() -> None:
        g = torch.Generator(device=device).manual_seed(1)
        lengths = [1, 17, 300, 64, 1000]
        T = sum(lengths)
        q = torch.randn(T, 32, 128, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, 8, 128, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, 8, 128, device=device, dtype=torch.bfloat16, generator=g)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32,
                          device=device)
        got = varlen_attention(q, k, v, cu, max(lengths), 128 ** -0.5, True)
        ref = reference_varlen_attention(q.float(), k.float(), v.float(), cu, 128 ** -0.5, True)
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        row = {"rel_err_vs_fp32_reference": round(rel, 5)}
        try:  # torch's public wrapper, where this torch has it
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            params = inspect.signature(varlen_attn).parameters
            kw: dict[str, Any] = {"scale": 128 ** -0.5}
            if "is_causal" in params:
                kw["is_causal"] = True
            else:
                kw["window_size"] = (-1, 0)
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            alt = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **kw)
            row["varlen_attn_rel_err"] = round(((alt.float() - ref).norm() / ref.norm()).item(), 5)
            row["varlen_attn_signature"] = str(inspect.signature(varlen_attn))[:200]
        except Exception as e:  # noqa: BLE001
            row["varlen_attn"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.add(stage="attention_check", **row)

    if want("attention_check", 5):
        guarded("attention_check", attention_check)

    # ------------------------------------------------------------------ product embedder
    emb: TransformersEmbedder | None = None

    def start_product() -> TransformersEmbedder:
        reset_mem()
        t = time.monotonic()
        e = TransformersEmbedder(info, EOS, "last", dtype="bfloat16", device=str(device),
                                 packing="on", compile="on", packed_tokens=32768)
        sync()
        res.add(stage="packed_compile_startup", seconds=round(time.monotonic() - t, 1),
                note="weight fusion + torch.compile of the two layer halves (2 warm-up calls)")
        return e

    if want("packed_compile_startup", 90):
        emb = guarded("packed_compile_startup", start_product)

    # ------------------------------------------------------------------ golden vectors
    def golden() -> None:
        """Packed bf16 against the padded HF path, and both against a float32 reference.

        Random weights make a deep network chaotic: bf16 rounding differences grow over 36
        layers, so HF's own bf16 path drifts from itself too (padded vs alone). The fair
        question is whether packing is as accurate as the HF path: both vs float32."""
        assert emb is not None
        rng = np.random.default_rng(5)
        picks = sorted(rng.choice(len(docs), size=15, replace=False).tolist())
        longest = int(np.argmax([len(d) for d in docs]))
        sample = [docs[i] for i in picks] + [docs[longest]]
        packed = emb.embed_batch(sample)
        packed_alone = np.stack([emb.embed_batch([s])[0] for s in sample])
        alone = np.stack([emb._embed_padded([s])[0] for s in sample])  # HF forward, no padding
        padded = np.concatenate([emb._embed_padded(sample[i:i + 4]) for i in range(0, 16, 4)])
        ref = None
        try:
            with torch.device(device):
                m32 = AutoModel.from_config(hf_cfg).eval()
            m32.to(torch.float32)
            m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            with torch.inference_mode():
                ref = np.stack([m32(input_ids=torch.tensor([s], device=device))
                                .last_hidden_state[0, -1].float().cpu().numpy() for s in sample])
            del m32
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            log(f"float32 reference failed: {type(e).__name__}: {e}")

        def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

        row: dict[str, Any] = {
            "cos_packed_in_batch_vs_packed_alone_min": round(float(cos(packed, packed_alone).min()), 6),
            "cos_packed_vs_hf_alone_min": round(float(cos(packed, alone).min()), 6),
            "cos_packed_vs_hf_padded4_min": round(float(cos(packed, padded).min()), 6),
            "cos_hf_padded4_vs_hf_alone_min": round(float(cos(padded, alone).min()), 6),
            "cross_doc_cos_mean": round(float(np.mean([cos(alone[i:i + 1], alone[j:j + 1])[0]
                                                       for i in range(16) for j in range(i)])), 4),
            "lengths": [len(s) for s in sample]}
        if ref is not None:
            row.update({
                "cos_vs_fp32_packed_bf16_min": round(float(cos(packed, ref).min()), 6),
                "cos_vs_fp32_hf_alone_bf16_min": round(float(cos(alone, ref).min()), 6),
                "cos_vs_fp32_hf_padded4_bf16_min": round(float(cos(padded, ref).min()), 6),
                "cos_vs_fp32_packed_bf16_mean": round(float(cos(packed, ref).mean()), 6),
                "cos_vs_fp32_hf_alone_bf16_mean": round(float(cos(alone, ref).mean()), 6)})
        res.add(stage="golden_bf16", **row)

    if emb is not None and want("golden_bf16", 25):
        guarded("golden_bf16", golden)

    # ------------------------------------------------------------------ baselines
    def hf_padded(batch: list[list[int]]) -> torch.Tensor:
        """The naive script: left padding, mask, position ids, last token."""
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), EOS, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return h[:, -1].float().cpu()

    def timed_batches(name: str, batches: list[list[list[int]]], fn: Any, budget_s: float,
                      **extra: Any) -> dict[str, Any]:
        reset_mem()
        fn(batches[0])  # warm-up (kernels, allocator)
        sync()
        t, real, padded, done = time.monotonic(), 0, 0, 0
        for b in batches[1:]:
            fn(b)
            real += sum(map(len, b))
            padded += len(b) * max(map(len, b))
            done += 1
            if time.monotonic() - t > budget_s:
                break
        sync()
        dt = time.monotonic() - t
        return res.add(stage=name, tokens=real, seconds=round(dt, 2),
                       tokens_per_s=round(real / dt, 1),
                       padding_waste=round(1 - real / padded, 4) if padded else 0.0,
                       batches=done, of_batches=len(batches) - 1, gpu_peak_gib=peak_gib(), **extra)

    naive = None
    if want("naive_unsorted_b8", args.naive_seconds + 15):
        batches = [docs[i:i + 8] for i in range(0, len(docs), 8)]
        naive = guarded("naive_unsorted_b8", lambda: timed_batches(
            "naive_unsorted_b8", batches, hf_padded, args.naive_seconds))

    def try_b32() -> None:
        longest = int(np.argmax([len(d) for d in docs]))
        s = (longest // 32) * 32
        reset_mem()
        try:
            hf_padded(docs[s:s + 32])
            sync()
            res.add(stage="naive_unsorted_b32_longest_batch", result="fits", gpu_peak_gib=peak_gib())
        except torch.OutOfMemoryError as e:
            res.add(stage="naive_unsorted_b32_longest_batch", result="out of memory",
                    detail=str(e).splitlines()[0][:160])
        torch.cuda.empty_cache()

    if want("naive_unsorted_b32_longest_batch", 10) and device.type == "cuda":
        guarded("naive_unsorted_b32_longest_batch", try_b32)

    subset = docs[::args.subset_every]
    subset_sorted = sorted(subset, key=len)
    lens = np.array([len(d) for d in subset_sorted])
    plan32 = [subset_sorted[s:e] for s, e in pack_batches(lens, 32768, 256)]
    note = f"every {args.subset_every}th document ({len(subset)} docs, {int(lens.sum())} tokens)"
    if want("sorted_padded_32k", 40):
        guarded("sorted_padded_32k", lambda: timed_batches(
            "sorted_padded_32k", plan32, hf_padded, 60, corpus=note))

    if emb is not None and want("packed_nocompile_32k", 35):
        def packed_nocompile() -> None:
            e = TransformersEmbedder(info, EOS, "last", dtype="bfloat16", device=str(device),
                                     packing="on", compile="off", packed_tokens=32768)
            timed_batches("packed_nocompile_32k", plan32, e.embed_batch, 60, corpus=note)

        guarded("packed_nocompile_32k", packed_nocompile)

    # the product path over the whole corpus: sorted 32K plan, embed_stream (pipelined)
    all_sorted = sorted(docs, key=len)
    all_lens = np.array([len(d) for d in all_sorted])
    plan_all = [all_sorted[s:e] for s, e in pack_batches(all_lens, 32768, 256)]

    def packed_stream(name: str) -> None:
        assert emb is not None
        reset_mem()
        emb.embed_batch(plan_all[-1])  # warm-up: the longest batch
        sync()
        t = time.monotonic()
        rows = 0
        for _, v in emb.embed_stream((i, b) for i, b in enumerate(plan_all)):
            rows += len(v)
        dt = time.monotonic() - t
        res.add(stage=name, tokens=n_tokens, seconds=round(dt, 2),
                tokens_per_s=round(n_tokens / dt, 1), padding_waste=0.0, batches=len(plan_all),
                vectors=rows, gpu_peak_gib=peak_gib(),
                ratio_to_naive=round(n_tokens / dt / naive["tokens_per_s"], 2) if naive else None)

    if emb is not None and want("packed_compile_stream", 45):
        guarded("packed_compile_stream", lambda: packed_stream("packed_compile_stream"))

    # ------------------------------------------------------------------ a 32K-token chunk
    def long_chunk() -> None:
        assert emb is not None
        seq = np.random.default_rng(9).integers(0, EOS, size=32767).tolist() + [EOS]
        for name, fn in (("long_32k_packed", emb.embed_batch),
                         ("long_32k_hf_sdpa_padded_path", emb._embed_padded)):
            reset_mem()
            t = time.monotonic()
            try:
                v = fn([seq])
                sync()
                res.add(stage=name, tokens=len(seq), seconds=round(time.monotonic() - t, 2),
                        finite=bool(np.isfinite(v).all()), gpu_peak_gib=peak_gib())
            except torch.OutOfMemoryError as e:
                res.add(stage=name, result="out of memory", detail=str(e).splitlines()[0][:160])
            torch.cuda.empty_cache()

    if emb is not None and want("long_32k", 15):
        guarded("long_32k", long_chunk)

    # ------------------------------------------------------------------ the pipeline
    def pipeline_run(window: int, name: str) -> None:
        from pipeline_run import job_dict, run_pipeline

        reset_mem()
        job = job_dict("e2e_transformers", corpus, model_dir, "transformers", work / "e2e-tf",
                       sort_window=window,
                       model_extra={"dtype": "bfloat16", "device": str(device), "packing": "on",
                                    "compile": "on"})
        r = run_pipeline(job, work / "e2e-tf")
        raw = next((x for x in res.rows if x.get("stage") == "packed_compile_stream"
                    and x.get("tokens_per_s")), None)
        res.add(stage=name, padding_waste=0.0, gpu_peak_gib=peak_gib(), sort_window=window,
                ratio_to_embedder=round(r["tokens_per_s"] / raw["tokens_per_s"], 3) if raw else None,
                ratio_to_naive=round(r["tokens_per_s"] / naive["tokens_per_s"], 2) if naive else None,
                **r)

    for i, window in enumerate(int(w) for w in args.pipeline_windows.split(",")):
        name = "pipeline_transformers" if i == 0 else f"pipeline_transformers_w{window}"
        if emb is not None and want("pipeline_transformers", 40):
            guarded(name, lambda: pipeline_run(window, name))

    res.add(stage="done", seconds=round(run.elapsed(), 1), rss_peak_mib=round(rss_peak_mib(), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
