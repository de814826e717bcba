"""The SGLang backend on the GPU: raw engine vs ``embed-job run``, in the same process.

One engine per process (``--mode bf16|fp8|awq``), started once through the product's
``SGLangEmbedder`` (start-up timed on its own), then:

  warm-up      64 documents, one of 8192 tokens (triton kernels compile here)
  raw          the engine alone, as smoke.py drives it: all 3000 documents in requests of 500,
               all in flight at once, straight into ``tokenizer_manager.generate_request``
  stream       ``SGLangEmbedder.embed_stream`` over the sorted 32K-token plan batches
  pipeline     ``embed-job run`` end to end with that same engine (Parquet in -> chunking ->
               plan -> engine -> MRL -> Parquet out)
  long_32k     one 32768-token chunk
  cli          after this engine is shut down: the real command, ``python -m pipeline.cli run
               job.yaml`` in a fresh process that starts (and warms up) its own engine, as a user
               runs it; its report gives start-up (model_load_s) and tokens/s after start-up apart

    source shared/sglang-device/activate.sh && python bench/gpu_sglang.py --mode bf16 --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    EOS,
    Results,
    Stages,
    import_datasets_or_stub,
    make_docs,
    rss_peak_mib,
    write_corpus,
    write_model_dir,
)

T0 = time.monotonic()


def gpu_used_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return round(int(out.split()[0]) / 1024, 1)
    except Exception:  # noqa: BLE001
        return None


def raw_requests(emb: Any, batches: list[list[list[int]]]) -> list[Any]:
    """smoke.py's method, the engine alone: every batch one request, all in flight at once,
    straight into the tokenizer manager of the engine ``emb`` holds, on its loop."""
    from sglang.srt.managers.io_struct import EmbeddingReqInput

    engine = emb._live_engine()

    async def run_all() -> list[Any]:
        async def one(b: list[list[int]]) -> Any:
            gen = engine.tokenizer_manager.generate_request(EmbeddingReqInput(input_ids=b), None)
            return await gen.__anext__()
        return await asyncio.gather(*(one(b) for b in batches))

    return emb._on_loop(run_all()).result()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["bf16", "fp8", "awq"], default="bf16")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/embed-bench")
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--deadline", type=float, default=240.0)
    ap.add_argument("--stages", default="raw,stream,pipeline,long_32k")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--max-tokens-in-flight", type=int, default=None)
    ap.add_argument("--pipeline-variants", default="w500",
                    help="comma-separated w<sort_window>[f<K tokens in flight>]; the first is "
                    "reported as 'pipeline'")
    ap.add_argument("--stream-variants", default="f",
                    help="comma-separated f (default in-flight) or f<K tokens in flight>")
    ap.add_argument("--cli-copies", type=int, default=1,
                    help="the cli stage runs on this many copies of the corpus (a longer run, "
                    "whose later windows are planned while earlier ones embed)")
    ap.add_argument("--model-dir", default=None, help="use this model dir (CPU rehearsal with "
                    "tests/standins on PYTHONPATH and a tiny model)")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    out, work = Path(args.out), Path(args.work)
    res = Results(out / "results.jsonl")
    import_datasets_or_stub()

    run = Stages(res, None, args.deadline, T0, prefix=f"{args.mode}:")
    guarded, left = run.guarded, run.left

    docs = make_docs(args.docs)
    n_tokens = sum(map(len, docs))
    model_dir = Path(args.model_dir) if args.model_dir else write_model_dir(
        work / ("qwen3-4b-awq" if args.mode == "awq" else "qwen3-4b"),
        quant=args.mode if args.mode == "awq" else None)
    corpus = work / "corpus.parquet"
    if not corpus.exists():
        write_corpus(corpus, docs)

    t = time.monotonic()
    import sglang

    from pipeline.embedders.sglang_backend import SGLangBackend, SGLangConfig
    from pipeline.embedders.sglang_backend.engine import SGLangEmbedder
    from pipeline.job.model_info import read_model_info

    res.add(stage=f"{args.mode}:import", seconds=round(time.monotonic() - t, 1),
            sglang=sglang.__version__)
    cfg = SGLangConfig(quantization="fp8" if args.mode == "fp8" else None,
                       attention_backend=args.attention_backend,
                       extra={"load_format": "dummy"},
                       **({"max_tokens_in_flight": args.max_tokens_in_flight}
                          if args.max_tokens_in_flight else {}))
    info = read_model_info(model_dir)
    settings = SGLangBackend(path=str(model_dir), sglang=cfg)
    engine_kwargs = settings.engine_kwargs(info)
    t = time.monotonic()
    emb = SGLangEmbedder(settings, info)
    res.add(stage=f"{args.mode}:engine_start", seconds=round(time.monotonic() - t, 1),
            engine_kwargs={k: v for k, v in engine_kwargs.items() if k != "model_path"},
            gpu_used_gib=gpu_used_gib())
    try:
        def warmup() -> None:
            t = time.monotonic()
            w = make_docs(64, seed=1)
            w[0] = w[0][:1] * 8191 + [EOS]
            v = emb.embed_batch(w)
            assert v.shape == (64, info.hidden_size)
            res.add(stage=f"{args.mode}:warmup", seconds=round(time.monotonic() - t, 1),
                    norms=[round(float(x), 4) for x in np.linalg.norm(v[:3], axis=1)])

        guarded("warmup", warmup)

        def raw() -> dict[str, Any]:
            batches = [docs[i:i + 500] for i in range(0, len(docs), 500)]
            t = time.monotonic()
            outs = raw_requests(emb, batches)
            dt = time.monotonic() - t
            assert sum(len(o) for o in outs) == len(docs)
            return res.add(stage=f"{args.mode}:raw_engine", tokens=n_tokens, seconds=round(dt, 2),
                           tokens_per_s=round(n_tokens / dt, 1), padding_waste=0.0,
                           gpu_used_gib=gpu_used_gib(),
                           note="smoke.py's method: 6 requests of 500 docs, all in flight")

        raw_row = guarded("raw", raw) if "raw" in stages and left() > 30 else None

        def pipeline(variant: str) -> None:
            """variant: w<sort_window>[f<tokens in flight, K>], e.g. w500, w4000f1024."""
            from pipeline_run import job_dict, run_pipeline

            window, _, flight = variant[1:].rstrip("r").partition("f")  # 'r': a repeat
            default_flight = emb.max_tokens_in_flight
            if flight:
                emb.max_tokens_in_flight = int(flight) * 1024
            try:
                model_extra = {"sglang": {"quantization": cfg.quantization,
                                          "max_tokens_in_flight": emb.max_tokens_in_flight,
                                          "extra": {"load_format": "dummy"}}}
                job = job_dict(f"e2e_sglang_{args.mode}", corpus, model_dir, "sglang",
                               work / f"e2e-{args.mode}", model_extra=model_extra,
                               dimension=min(1024, info.hidden_size), sort_window=int(window))
                r = run_pipeline(job, work / f"e2e-{args.mode}", embedder=emb)
            finally:
                emb.max_tokens_in_flight = default_flight
            name = "pipeline" if variant == args.pipeline_variants.split(",")[0] else f"pipeline_{variant}"
            res.add(stage=f"{args.mode}:{name}", padding_waste=0.0, sort_window=int(window),
                    max_tokens_in_flight=int(flight) * 1024 if flight else default_flight,
                    ratio_to_raw=round(r["tokens_per_s"] / raw_row["tokens_per_s"], 3) if raw_row else None,
                    **r)

        if "pipeline" in stages:
            for variant in args.pipeline_variants.split(","):
                if left() > 30:
                    guarded(f"pipeline_{variant}", lambda: pipeline(variant))

        def long_chunk() -> None:
            seq = np.random.default_rng(9).integers(0, EOS, size=32767).tolist() + [EOS]
            t = time.monotonic()
            v = emb.embed_batch([seq])
            res.add(stage=f"{args.mode}:long_32k", tokens=len(seq),
                    seconds=round(time.monotonic() - t, 2), finite=bool(np.isfinite(v).all()),
                    context_length=engine_kwargs["context_length"], gpu_used_gib=gpu_used_gib())

        if "long_32k" in stages and left() > 15:
            guarded("long_32k", long_chunk)
        def stream(flight_k: int | None) -> None:
            from pipeline.plan.batching import pack_batches

            srt = sorted(docs, key=len)
            lens = np.array([len(d) for d in srt])
            plan = [srt[s:e] for s, e in pack_batches(lens, 32768, 256)]
            default_flight = emb.max_tokens_in_flight
            if flight_k:
                emb.max_tokens_in_flight = flight_k * 1024
            try:
                t = time.monotonic()
                n = sum(len(v) for _, v in emb.embed_stream((i, b) for i, b in enumerate(plan)))
                dt = time.monotonic() - t
            finally:
                emb.max_tokens_in_flight = default_flight
            assert n == len(docs)
            res.add(stage=f"{args.mode}:embedder_stream" + (f"_f{flight_k}" if flight_k else ""),
                    tokens=n_tokens, seconds=round(dt, 2), tokens_per_s=round(n_tokens / dt, 1),
                    padding_waste=0.0, batches=len(plan),
                    max_tokens_in_flight=flight_k * 1024 if flight_k else default_flight,
                    ratio_to_raw=round(n_tokens / dt / raw_row["tokens_per_s"], 3) if raw_row else None)

        for variant in [v for v in args.stream_variants.split(",") if v]:
            if "stream" in stages and left() > 35:
                guarded(f"stream_{variant}", lambda: stream(int(variant[1:]) if variant != "f" else None))

    finally:
        t = time.monotonic()
        emb.close()
        res.add(stage=f"{args.mode}:shutdown", seconds=round(time.monotonic() - t, 1),
                total_s=round(time.monotonic() - T0, 1), rss_peak_mib=round(rss_peak_mib(), 1))

    def cli() -> None:
        from pipeline_run import job_dict

        run_dir = work / f"cli-{args.mode}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        source = corpus
        if args.cli_copies > 1:
            source = work / f"corpus-x{args.cli_copies}.parquet"
            if not source.exists():
                write_corpus(source, docs, copies=args.cli_copies)
        job = job_dict(f"cli_sglang_{args.mode}", source, model_dir, "sglang", run_dir,
                       dimension=min(1024, info.hidden_size), token_budget=None, sort_window=None,
                       model_extra={"sglang": {"quantization": cfg.quantization,
                                               "extra": {"load_format": "dummy"}}})
        (run_dir / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(run_dir / "job.yaml"),
                               "--quiet", "--report", str(run_dir / "report.json")],
                              capture_output=True, text=True, timeout=max(left(), 1))
        wall = time.monotonic() - t
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        r = json.loads((run_dir / "report.json").read_text())
        res.add(stage=f"{args.mode}:cli" + (f"_x{args.cli_copies}" if args.cli_copies > 1 else ""),
                corpus_copies=args.cli_copies, tokens=r["tokens_embedded"],
                process_wall_s=round(wall, 2),
                run_wall_s=round(r["wall_s"], 2), model_load_s=round(r["model_load_s"], 2),
                tokens_per_s=round(r["tokens_per_s"], 1),
                ratio_to_raw=round(r["tokens_per_s"] / raw_row["tokens_per_s"], 3) if raw_row else None,
                waited_for_plan_s=round(r["waited_for_plan_s"], 3),
                waited_for_sink_s=round(r["waited_for_sink_s"], 3), padding_waste=0.0,
                vectors_written=r["vectors_written"], status=r["status"],
                note="python -m pipeline.cli run, fresh process: import + engine start + warm-up "
                     "are model_load_s; tokens_per_s is the report's, after start-up")

    if "cli" in stages and left() > 60:
        time.sleep(2)  # the scheduler process releases the GPU
        guarded("cli", cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
