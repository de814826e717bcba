"""The readers' commands on the device: ``embed-job search``, ``eval`` and ``audit`` on an
index of the bench corpus built by ``embed-job run`` (transformers backend, the Qwen3-4B shape
with random weights, Parquet), each a fresh process as a user runs it.

Random weights say nothing about quality (the figures of ``eval`` are meaningless here); what
is measured is time: each command's wall clock, and the same less the model's load as the
run's report measured it, so the commands' own work shows apart from start-up.

    python bench/cli_quality.py --out $OUT
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli_workers import saved_random_weights  # noqa: E402
from common import Results, import_datasets_or_stub, make_docs, write_corpus, write_model_dir  # noqa: E402
from pipeline_run import job_dict  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/embed-bench")
    args = ap.parse_args()
    import_datasets_or_stub()
    res = Results(Path(args.out) / "results.jsonl")
    work = Path(args.work)
    model_dir = write_model_dir(work / "qwen3-4b")
    saved_random_weights(model_dir)
    source = write_corpus(work / "corpus-quality.parquet", make_docs(args.docs))
    run_dir = work / "cli-quality"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    job = job_dict("quality", source, model_dir, "transformers", run_dir, dimension=1024,
                   sort_window=None, model_extra={"dtype": "bfloat16", "packing": "on",
                                                  "compile": "on"})
    job_file = run_dir / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))

    def command(*argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True,
                              text=True, timeout=400)
        return time.monotonic() - t, done

    wall, done = command("run", str(job_file), "--quiet", "--report", str(run_dir / "r.json"))
    if done.returncode != 0:
        res.add(stage="quality:run", error=done.stderr[-1500:])
        return 1
    report = json.loads((run_dir / "r.json").read_text())
    load = report["model_load_s"]
    res.add(stage="quality:run", process_wall_s=round(wall, 2), model_load_s=round(load, 2),
            tokens_per_s=round(report["tokens_per_s"], 1), chunks=report["chunks"])
    for name, argv in [
        ("search", ["search", str(job_file), "t1 t2 t3 t4 t5 t6 t7 t8", "-k", "10", "--json"]),
        ("eval", ["eval", str(job_file), "--sample", str(args.sample), "--dims",
                  "128,256,512,full", "--json"]),
        ("audit", ["audit", str(job_file), "--json"]),
    ]:
        wall, done = command(*argv)
        row: dict = dict(stage=f"quality:{name}", process_wall_s=round(wall, 2), rc=done.returncode,
                         less_model_load_s=round(wall - load, 2) if name != "audit" else None)
        if done.returncode not in (0, 7):
            row["error"] = done.stderr[-800:]
        elif name == "eval":
            row["queries"] = json.loads(done.stdout)["queries"]
            row["queries_per_s_after_load"] = round(row["queries"] / max(wall - load, 1e-9), 1)
        elif name == "audit":
            row["ok"] = json.loads(done.stdout)["ok"]
        res.add(**row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
