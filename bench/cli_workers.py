"""The real command on several embedding workers: ``python -m pipeline.cli run job.yaml
[--gpus G] [--workers K]`` in a fresh process per variant, on the bench corpus, side by side.

Each variant's report gives start-up (model_load_s) and tokens/s after start-up apart, and
each worker's own rate and waits; its Parquet output is read back to check exactly-once (as
many rows as chunks, no key twice, the same key set as the first variant). Printed as ratios
to the first variant, and, for ``gpus=all``/``gpus=N`` variants, as scaling efficiency:
total tokens/s / (N x the one-GPU variant's tokens/s).

    python bench/cli_workers.py --backend sglang --variants plain,gpus=1:workers=2
    python bench/cli_workers.py --backend transformers --variants gpus=1,gpus=all
    python bench/cli_workers.py --backend sglang --variants plain,runner=ray   # Ray, one GPU actor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    QWEN3_EMBEDDING_4B,
    Results,
    import_datasets_or_stub,
    log,
    make_docs,
    write_corpus,
    write_model_dir,
)
from pipeline_run import job_dict  # noqa: E402


def flags(variant: str) -> tuple[list[str], int]:
    """``gpus=1:workers=2`` -> the command's flags, and how many GPUs it uses (0: plain)."""
    if variant == "plain":
        return [], 0
    out, gpus = [], 0
    for part in variant.split(":"):
        key, _, value = part.partition("=")
        out += [f"--{key}", value]
        if key == "gpus":
            gpus = gpu_count() if value == "all" else len(value.split(",")) if "," in value \
                else int(value)
    return out, gpus


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def saved_random_weights(model_dir: Path, device: str = "cuda") -> None:
    """Random bf16 weights written once, so every worker process loads them as a user's would."""
    if (model_dir / "model.safetensors").exists() or (model_dir / "model.safetensors.index.json"
                                                      ).exists():
        return
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="20GB")
    del model
    torch.cuda.empty_cache()


def keys(vectors: Path) -> list[str]:
    import pyarrow.parquet as pq

    from pipeline.sinks.parquet import current_version

    version = current_version(vectors)
    assert version is not None, f"{vectors}: nothing published"
    return pq.read_table(version, columns=["pk"]).column("pk").to_pylist()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["sglang", "transformers"], default="sglang")
    ap.add_argument("--mode", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--variants", default="plain,gpus=1:workers=2")
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--copies", type=int, default=2, help="corpus copies (a longer run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/embed-bench")
    ap.add_argument("--deadline", type=float, default=540.0)
    ap.add_argument("--tiny", action="store_true", help="a CPU rehearsal: a 2-layer model of the "
                    "same family, transformers on the CPU (variants like plain,workers=2)")
    args = ap.parse_args()
    t0 = time.monotonic()
    import_datasets_or_stub()
    res = Results(Path(args.out) / "results.jsonl")
    work = Path(args.work)
    docs = make_docs(args.docs)
    model_dir = write_model_dir(work / ("qwen3-tiny" if args.tiny else "qwen3-4b"),
                                config={**QWEN3_EMBEDDING_4B, **TINY} if args.tiny else None)
    source = write_corpus(work / f"corpus-x{args.copies}.parquet", docs, copies=args.copies)
    if args.backend == "sglang":
        extra: dict[str, Any] = {"sglang": {"quantization": "fp8" if args.mode == "fp8" else None,
                                            "extra": {"load_format": "dummy"}}}
        budget = None
    else:
        t = time.monotonic()
        saved_random_weights(model_dir, "cpu" if args.tiny else "cuda")
        log(f"random weights saved in {time.monotonic() - t:.0f} s")
        extra = {"device": "cpu"} if args.tiny else {
            "dtype": "bfloat16", "packing": "on", "compile": "on",
            "quantization": "fp8" if args.mode == "fp8" else None}
        budget = 32768
    tag = f"{args.backend}-{args.mode}" if args.backend == "sglang" or args.mode == "fp8" \
        else "transformers"
    first: dict[str, Any] | None = None
    one_gpu: float | None = None
    for variant in args.variants.split(","):
        left = args.deadline - (time.monotonic() - t0)
        if left < 90:
            res.add(stage=f"cli_workers:{tag}:{variant}", error=f"skipped: {left:.0f} s left")
            continue
        argv, gpus = flags(variant)
        run_dir = work / f"cli-{tag}-{variant.replace(':', '_').replace('=', '')}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        job = job_dict(f"cli_{tag}", source, model_dir, args.backend, run_dir,
                       dimension=32 if args.tiny else 1024,
                       token_budget=budget, sort_window=None, model_extra=extra)
        if "runner=ray" in variant:  # a local cluster of the host, one actor per GPU
            job["ray"] = {"object_store_mb": 4096}
        (run_dir / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run",
                               str(run_dir / "job.yaml"), "--quiet", "--report",
                               str(run_dir / "report.json"), *argv],
                              capture_output=True, text=True, timeout=left - 10)
        wall = time.monotonic() - t
        if proc.returncode != 0:
            res.add(stage=f"cli_workers:{tag}:{variant}", error=f"exit {proc.returncode}: "
                    f"{proc.stderr[-1500:]}")
            continue
        r = json.loads((run_dir / "report.json").read_text())
        pks = keys(run_dir / "vectors")
        exactly_once = len(pks) == len(set(pks)) == r["chunks"] and (
            first is None or set(pks) == first["pks"])
        row = dict(stage=f"cli_workers:{tag}:{variant}", flags=" ".join(argv), gpus=gpus,
                   tokens=r["tokens_embedded"], process_wall_s=round(wall, 2),
                   model_load_s=round(r["model_load_s"], 2), tokens_per_s=round(r["tokens_per_s"], 1),
                   waited_for_plan_s=round(r["waited_for_plan_s"], 3),
                   waited_for_sink_s=round(r["waited_for_sink_s"], 3), rows=len(pks),
                   cluster_start_s=r.get("cluster", {}).get("start_s"),
                   chunks=r["chunks"], exactly_once=exactly_once,
                   workers=[{k: w[k] for k in ("worker", "tokens", "tokens_per_s",
                                                "waited_for_plan_s", "waited_for_sink_s",
                                                "load_s", "deaths")} for w in r["workers"]])
        if first is not None:
            row["ratio_to_first"] = round(r["tokens_per_s"] / first["tokens_per_s"], 3)
        if gpus == 1 and "workers" not in variant:
            one_gpu = r["tokens_per_s"]
        if gpus > 1 and one_gpu:
            row["scaling_efficiency"] = round(r["tokens_per_s"] / (gpus * one_gpu), 3)
        res.add(**row)
        if first is None:
            first = {"tokens_per_s": r["tokens_per_s"], "pks": set(pks)}
        time.sleep(3)  # the engines' processes give the GPU back
    return 0


if __name__ == "__main__":
    sys.exit(main())
