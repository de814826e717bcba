"""The planner alone: read + tokenize + chunk + plan written, by number of processes.

Plans the bench corpus (``bench/plan_corpus.py``: the Debian Reference in Chinese and English
plus the demo corpus, ~666K Qwen3 tokens), repeated under new ids to ``--tokens``, with the real
Qwen3 tokenizer, through the product's own path: the JSON-lines reader, then ``build_plan``
into a ``PlanStore`` on local disk at the product's chunking and batching defaults. One JSON
line per process count: tokens planned a second (wall clock, workers' start included), the
speedup over one process, the calling process's own CPU time (``parent_cpu_s``; tokens /
that is the most it could plan however many workers it had), the time to the first window,
its peak RSS so far (the runs go one after the other), and the manifest's digest, the same for
every process count when the plans are the same.

    python3 bench/plan_bench.py [--processes 1,4,8,16] [--tokens 50e6] [--data .bench-data]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def measure(processes: int, args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    from pipeline.chunking import Chunker, ModelTokenizer
    from pipeline.job.sections import BatchingConfig, ChunkingConfig, SourceConfig
    from pipeline.plan.batching import WindowStats
    from pipeline.plan.build import RejectedRows, build_plan
    from pipeline.plan.store import PlanStore
    from pipeline.readers.jsonl import read_jsonl
    from pipeline.records import DeadLetter, Document

    tokenizer = ModelTokenizer.from_model_dir(args.data / "qwen3-tokenizer", "last")
    chunker = Chunker(tokenizer, ChunkingConfig(max_tokens=args.max_tokens), 32768)
    corpus = args.data / "plan-corpus.jsonl"
    source = SourceConfig(path=str(corpus), metadata_fields=["lang", "source"])
    letters: list[DeadLetter] = []
    rejected = RejectedRows(letters.append)

    def docs() -> Iterator[Document]:
        for r in range(repeats):
            for doc in read_jsonl(corpus, source, rejected):
                yield dataclasses.replace(doc, doc_id=f"{doc.doc_id}~{r}")

    store_dir = args.work / f"plan-p{processes}"
    shutil.rmtree(store_dir, ignore_errors=True)
    windows: list[WindowStats] = []
    first: list[float] = []
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def on_window(stats: WindowStats) -> None:
        windows.append(stats)
        if not first:
            first.append(time.perf_counter() - t0)

    build_plan(docs(), chunker, PlanStore(store_dir), BatchingConfig(), "bench", not args.no_text,
               letters.append, on_window, rejected=rejected, processes=processes)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    tokens = sum(w.tokens for w in windows)
    out = {"bench": "plan", "processes": processes, "cores": os.cpu_count(), "tokens": tokens,
           "docs": sum(w.docs for w in windows), "chunks": sum(w.chunks for w in windows),
           "windows": len(windows), "dead_letters": len(letters), "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall), "first_window_s": round(first[0], 3),
           "parent_cpu_s": round(cpu, 3), "parent_ceiling_tokens_per_s": round(tokens / cpu),
           "workers_cpu_s": round(children.ru_utime + children.ru_stime
                                  - children0.ru_utime - children0.ru_stime, 3),
           "plan_mib": round(sum(p.stat().st_size for p in store_dir.iterdir()) / 2**20, 1),
           "parent_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "manifest_digest": hashlib.blake2b((store_dir / "manifest.json").read_bytes(),
                                              digest_size=8).hexdigest()}
    if not args.keep:
        shutil.rmtree(store_dir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,4,8,16", help="comma-separated process counts")
    ap.add_argument("--tokens", type=float, default=50e6, help="corpus size to reach, in "
                    "Qwen3 tokens (the corpus is repeated under new ids)")
    ap.add_argument("--data", type=Path, default=HERE.parent / ".bench-data")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "plan-bench")
    ap.add_argument("--max-tokens", type=int, default=512, help="chunking.max_tokens")
    ap.add_argument("--no-text", action="store_true", help="plan without the chunks' text")
    ap.add_argument("--keep", action="store_true", help="keep the plans in --work")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()

    from common import import_datasets_or_stub, log

    import_datasets_or_stub()  # pipeline.readers imports it; only JSON lines are read here
    meta = json.loads((args.data / "plan-corpus.json").read_text())
    repeats = max(1, math.ceil(args.tokens / meta["qwen3_tokens_total"]))
    log(f"{meta['docs']} documents, {meta['qwen3_tokens_total']:,} tokens x {repeats}")
    base = None
    results = []
    for processes in (int(p) for p in args.processes.split(",")):
        r = measure(processes, args, repeats)
        if processes == 1:
            base = r["tokens_per_s"]
        r["speedup_vs_1"] = None if base is None else round(r["tokens_per_s"] / base, 2)
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
        results.append(r)
    digests = {r["manifest_digest"] for r in results}
    log("same plan for every process count" if len(digests) == 1 else
        f"PLANS DIFFER: manifest digests {sorted(digests)}")
    for r in results:
        log(f"{r['processes']:>3} processes: {r['tokens_per_s'] / 1e6:6.2f}M tokens/s"
            f"  x{r['speedup_vs_1'] or float('nan'):.2f}  parent busy "
            f"{r['parent_cpu_s'] / r['wall_s']:.0%}")


if __name__ == "__main__":
    main()
