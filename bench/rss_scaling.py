"""Host memory of ``embed-job run`` as the corpus grows: peak RSS for 1x and 10x the corpus.

Each run is a fresh process (peak RSS is per process): the bench corpus (3000 documents,
1.65M tokens; 10x = 30000 documents, 16.5M tokens) through the product path with the
transformers backend on a *tiny* random Qwen3 of the bench vocabulary (hidden 64, one layer),
so that the model's own memory is negligible and what is measured is the pipeline's: reader,
chunker, planner windows, executor, writer, sink. The plan is bounded by ``sort_window``
chunks, so runs are made with a window smaller than the corpus (memory should be flat) and
with the default window (200000 chunks: the whole 10x corpus is one window).

    python bench/rss_scaling.py [--copies 1,10] [--windows 2000,200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent


def child(work: Path, copies: int, window: int, rows_per_file: int | None) -> None:
    from common import import_datasets_or_stub, rss_now_mib, rss_peak_mib
    import_datasets_or_stub()
    from pipeline_run import job_dict, run_pipeline

    corpus = work / f"corpus-x{copies}.parquet"
    rss0 = rss_now_mib()
    job = job_dict(f"rss_x{copies}", corpus, work / "tiny", "transformers",
                   work / f"run-x{copies}-w{window}", sort_window=window, dimension=64,
                   model_extra={"device": "cpu", "dtype": "float32"})
    if rows_per_file:
        job["sink"]["rows_per_file"] = rows_per_file
    r = run_pipeline(job, work / f"run-x{copies}-w{window}")
    row = {"copies": copies, "sort_window": window, "rss_start_mib": round(rss0, 1),
           "rss_peak_mib": round(rss_peak_mib(), 1), "rows_per_file": rows_per_file,
           "tokens": r["tokens"], "chunks": r["chunks"], "wall_s": r["wall_s"],
           "tokens_per_s": r["tokens_per_s"]}
    print("RSS " + json.dumps(row), flush=True)


def prepare(work: Path, copies: list[int]) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from common import QWEN3_EMBEDDING_4B, make_docs, write_corpus, write_model_dir

    tiny = work / "tiny"
    if not (tiny / "model.safetensors").exists():
        cfg = dict(QWEN3_EMBEDDING_4B, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        write_model_dir(tiny, config=cfg)
        torch.manual_seed(0)
        Qwen3Model(Qwen3Config(**{k: v for k, v in cfg.items() if k != "architectures"})
                   ).save_pretrained(tiny)
    docs = make_docs(3000)
    for c in copies:
        if not (work / f"corpus-x{c}.parquet").exists():
            write_corpus(work / f"corpus-x{c}.parquet", docs, copies=c)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/embed-bench-rss")
    ap.add_argument("--copies", default="1,10")
    ap.add_argument("--windows", default="2000,200000")
    ap.add_argument("--rows-per-file", type=int, default=None, help="Parquet sink rows_per_file")
    ap.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        child(work, *args.child, args.rows_per_file)
        return 0
    copies = [int(c) for c in args.copies.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, copies)
    rows = []
    for window in (int(w) for w in args.windows.split(",")):
        for c in copies:
            t = time.monotonic()
            out = subprocess.run([sys.executable, str(HERE / "rss_scaling.py"), "--work", str(work),
                                  "--child", str(c), str(window)]
                                 + (["--rows-per-file", str(args.rows_per_file)]
                                    if args.rows_per_file else []), capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RSS ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"run x{c} w{window} failed")
            rows.append(json.loads(line[4:]))
            print(f"x{c} sort_window {window}: {rows[-1]} ({time.monotonic() - t:.0f}s)", flush=True)
    print(f"\nsink rows_per_file: {args.rows_per_file or 'default (50000)'}")
    print("| corpus | chunks | tokens | sort_window | peak RSS | RSS at start |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['copies']}x | {r['chunks']:,} | {r['tokens']:,} | {r['sort_window']:,} | "
              f"{r['rss_peak_mib']:,.0f} MiB | {r['rss_start_mib']:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
