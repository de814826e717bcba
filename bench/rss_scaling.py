"""Host memory of ``embed-job run`` as the corpus grows: peak RSS for 1x and 10x the corpus.

Each run is a fresh process (peak RSS is per process) through the product path (``run_job``,
what the command calls) on the bench corpus (3000 documents, 1.65M tokens; 10x = 30000
documents, 16.5M tokens), Parquet sink with text, batching and sink at the product's defaults
unless ``--windows``/``--rows-per-file`` say otherwise:

- ``--device cuda``: the Qwen3-Embedding-4B shape with random bf16 weights on the GPU
  (transformers backend, packed + compiled as the product picks on CUDA): the host memory of
  a real job, everything in one process.
- ``--device cpu``: a tiny random Qwen3 (hidden 64, one layer) of the bench vocabulary, so the
  model's own memory is small and the pipeline's dominates.

    python bench/rss_scaling.py [--device cpu|cuda] [--copies 1,10] [--windows default,2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def child(work: Path, device: str, copies: int, window: str, rows_per_file: int | None) -> None:
    from common import import_datasets_or_stub, random_model_for, rss_now_mib, rss_peak_mib
    import_datasets_or_stub()
    from pipeline_run import job_dict, run_pipeline

    model_dir = work / ("qwen3-4b" if device == "cuda" else "tiny")
    rss0 = rss_now_mib()
    if device == "cuda":
        random_model_for(model_dir, "cuda")
        model_extra: dict[str, Any] = {}
    else:
        model_extra = {"device": "cpu", "dtype": "float32"}
    run_dir = work / f"run-{device}-x{copies}-w{window}"
    job = job_dict(f"rss_x{copies}", work / f"corpus-x{copies}.parquet", model_dir, "transformers",
                   run_dir, token_budget=None,
                   sort_window=None if window == "default" else int(window),
                   dimension=1024 if device == "cuda" else 64, model_extra=model_extra)
    if rows_per_file:
        job["sink"]["rows_per_file"] = rows_per_file
    samples: list[float] = []  # RSS every 0.5 s: the level between peaks, not only the peak
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(rss_now_mib())

    threading.Thread(target=sample, daemon=True).start()
    r = run_pipeline(job, run_dir)
    done.set()
    row = {"device": device, "copies": copies, "sort_window": window, "rows_per_file": rows_per_file,
           "rss_start_mib": round(rss0, 1), "rss_peak_mib": round(rss_peak_mib(), 1),
           "rss_median_mib": round(statistics.median(samples), 1) if samples else None,
           **{k: r[k] for k in ("tokens", "chunks", "batches", "wall_s", "model_load_s",
                                "tokens_per_s", "runner_tokens_per_s")}}
    print("RSS " + json.dumps(row), flush=True)


def prepare(work: Path, device: str, copies: list[int]) -> None:
    from common import QWEN3_EMBEDDING_4B, make_docs, write_corpus, write_model_dir

    if device == "cuda":
        write_model_dir(work / "qwen3-4b")
    elif not (work / "tiny" / "model.safetensors").exists():
        import torch
        from transformers import Qwen3Config, Qwen3Model

        cfg = dict(QWEN3_EMBEDDING_4B, **TINY)
        write_model_dir(work / "tiny", config=cfg)
        torch.manual_seed(0)
        Qwen3Model(Qwen3Config(**{k: v for k, v in cfg.items() if k != "architectures"})
                   ).save_pretrained(work / "tiny")
    docs = make_docs(3000)
    for c in copies:
        if not (work / f"corpus-x{c}.parquet").exists():
            write_corpus(work / f"corpus-x{c}.parquet", docs, copies=c)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/embed-bench-rss")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--copies", default="1,10")
    ap.add_argument("--windows", default="default",
                    help="comma-separated sort_window values; 'default' leaves the product's")
    ap.add_argument("--rows-per-file", type=int, default=None, help="Parquet sink rows_per_file")
    ap.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        child(work, args.device, int(args.child[0]), args.child[1], args.rows_per_file)
        return 0
    copies = [int(c) for c in args.copies.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.device, copies)
    rows = []
    for window in args.windows.split(","):
        for c in copies:
            t = time.monotonic()
            out = subprocess.run(
                [sys.executable, str(HERE / "rss_scaling.py"), "--work", str(work), "--device",
                 args.device, "--child", str(c), window]
                + (["--rows-per-file", str(args.rows_per_file)] if args.rows_per_file else []),
                capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RSS ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"run x{c} window {window} failed")
            rows.append(json.loads(line[4:]))
            print(f"x{c} sort_window {window}: {rows[-1]} ({time.monotonic() - t:.0f}s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print(f"\ndevice {args.device}; sink rows_per_file: {args.rows_per_file or 'default'}")
    print("| corpus | chunks | tokens | sort_window | peak RSS | vs 1x | median RSS | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["sort_window"]: r["rss_peak_mib"] for r in rows if r["copies"] == 1}
    for r in rows:
        ratio = r["rss_peak_mib"] / base[r["sort_window"]] if r["sort_window"] in base else None
        print(f"| {r['copies']}x | {r['chunks']:,} | {r['tokens']:,} | {r['sort_window']} | "
              f"{r['rss_peak_mib']:,.0f} MiB | {f'{ratio:.2f}x' if ratio else '—'} | "
              f"{r['rss_median_mib'] or 0:,.0f} MiB | {r['runner_tokens_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
