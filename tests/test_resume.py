"""Kill a run anywhere, run it again: the store ends exactly as after an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

from helpers.cli import ledger, run, start, wait_for_first_ack
from helpers.jobs import SMALL_DOCS, make_job, small_job
from helpers.rows import assert_same_store, stored_rows


def test_external_sigkill_mid_run_then_resume(tmp_path: Path, reference) -> None:
    """No fault hook: a real `kill -9` from outside once some batches are acknowledged."""
    job = small_job(tmp_path)
    running = start(job)
    wait_for_first_ack(running)
    running.proc.send_signal(signal.SIGKILL)
    running.finish()
    state = ledger(job)
    assert state["vectors_written"] < sum(1 for _ in reference["milvus"])
    resumed = run(job, process=True)
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_store(stored_rows(job), reference["milvus"])


def test_changed_fingerprint_is_refused_until_restart(tmp_path: Path) -> None:
    """An unfinished run is never resumed with settings that would give other vectors."""
    parquet = {"sink": {"kind": "parquet", "path": "v"}}
    docs = SMALL_DOCS[:4]
    job = make_job(tmp_path, docs, **parquet)
    assert run(job, "--limit", "2").exit_code == 0
    job2 = make_job(tmp_path, docs, chunking={"max_tokens": 96}, **parquet)
    refused = run(job2)
    assert refused.exit_code == 3
    assert "different job configuration" in refused.output and "--restart" in refused.output
    assert "Traceback" not in refused.output
    again = run(job2, "--restart")
    assert again.exit_code == 0, again.output
    ref = make_job(tmp_path / "fresh", docs, chunking={"max_tokens": 96}, **parquet)
    assert run(ref).exit_code == 0
    assert_same_store(stored_rows(job2), stored_rows(ref))
