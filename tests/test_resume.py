"""Kill a run anywhere, run it again: the store ends exactly as after an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import demo_docs, make_job
from store_readers import assert_same_store, milvus_rows, parquet_rows, wait_for_first_ack

from pipeline.cli import main

DOCS = demo_docs(14)
# small windows and batches so that a run has many of both to be killed between
SMALL = {"batching": {"token_budget": 512, "max_batch_size": 4, "sort_window": 12}}


def run_cli(job: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EMBED_JOB_FAULT", None)
    if fault:
        env["EMBED_JOB_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict]]:
    """Uninterrupted runs, one per sink kind."""
    out = {}
    for kind in ("milvus", "parquet"):
        tmp = tmp_path_factory.mktemp(f"ref-{kind}")
        job = make_job(tmp, DOCS, **SMALL, **_sink(kind))
        result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
        assert result.exit_code == 0, result.output
        out[kind] = _rows(tmp, kind)
    return out


def _sink(kind: str) -> dict:
    if kind == "parquet":
        return {"sink": {"kind": "parquet", "path": "vectors", "rows_per_file": 10}}
    return {}


def _rows(tmp: Path, kind: str) -> dict[str, dict]:
    return milvus_rows(tmp / "out.db", "t") if kind == "milvus" else parquet_rows(tmp / "vectors")


def test_external_sigkill_mid_run_then_resume(tmp_path: Path, reference) -> None:
    """No fault hook: a real `kill -9` from outside once some batches are acknowledged."""
    job = make_job(tmp_path, DOCS, **SMALL)
    ckpt = tmp_path / ".embed-job" / "t" / "run" / "checkpoint.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_first_ack(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(ckpt.read_text())["state"]
    assert state["vectors_written"] < sum(1 for _ in reference["milvus"])
    resumed = run_cli(job)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(milvus_rows(tmp_path / "out.db", "t"), reference["milvus"])


def test_changed_fingerprint_is_refused_until_restart(tmp_path: Path) -> None:
    """An unfinished run is never resumed with settings that would give other vectors."""
    parquet = {"sink": {"kind": "parquet", "path": "v"}}
    job = make_job(tmp_path, DOCS[:4], **parquet)
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(job), "--quiet", "--limit", "2"]).exit_code == 0
    job2 = make_job(tmp_path, DOCS[:4], chunking={"max_tokens": 96}, **parquet)
    refused = runner.invoke(main, ["run", str(job2), "--quiet"])
    assert refused.exit_code == 3
    assert "different job configuration" in refused.output and "--restart" in refused.output
    assert "Traceback" not in refused.output
    again = runner.invoke(main, ["run", str(job2), "--quiet", "--restart"])
    assert again.exit_code == 0, again.output
    fresh = tmp_path / "fresh"
    ref = make_job(fresh, DOCS[:4], chunking={"max_tokens": 96}, **parquet)
    assert runner.invoke(main, ["run", str(ref), "--quiet"]).exit_code == 0
    assert_same_store(parquet_rows(tmp_path / "v"), parquet_rows(fresh / "v"))
