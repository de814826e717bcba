"""Shared fixtures: the real models the suite embeds with, and a fault-free reference run.
What tests import lives in tests/helpers/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_qwen3  # noqa: E402

pytest_plugins = ["reliability"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from helpers.jobs import MINILM

    from pipeline.job.model_info import resolve_model_dir

    return resolve_model_dir(MINILM)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Qwen3 vocabulary as a HF tokenizer directory (~5 s to build, once a session)."""
    from qwen_vocab import build_qwen_tokenizer_dir

    return build_qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen-vocab"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict]]:
    """What ``small_job`` stores without faults, by sink kind: uninterrupted runs in child
    processes, like the faulty ones."""
    from helpers.cli import run
    from helpers.jobs import small_job
    from helpers.rows import stored_rows

    out = {}
    for kind in ("milvus", "parquet"):
        job = small_job(tmp_path_factory.mktemp(f"ref-{kind}"), kind)
        done = run(job, process=True)
        assert done.exit_code == 0, done.stderr
        out[kind] = stored_rows(job)
    return out


@pytest.fixture(scope="session", params=["milvus", "parquet"])
def demo_index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole demo corpus embedded with MiniLM and published, to Milvus Lite (HNSW) or
    Parquet: built once a session for the search and eval tests, which only read it."""
    import json

    from helpers.cli import run
    from helpers.jobs import DEMO_CORPUS, make_job

    docs = [json.loads(line) for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines()]
    sink = ({"kind": "parquet", "path": "vectors"} if request.param == "parquet" else
            {"index": {"type": "HNSW", "params": {"M": 16, "efConstruction": 200}}})
    job = make_job(tmp_path_factory.mktemp(f"demo-index-{request.param}"), docs,
                   chunking={"max_tokens": 256, "overlap_tokens": 32},
                   batching={"token_budget": 8192, "max_batch_size": 64}, sink=sink)
    run(job, process=True, expect={0})
    return job
