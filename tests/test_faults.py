"""Fault injection: kill, break or starve a real run anywhere; the result never changes.

Every case ends by comparing the store with an uninterrupted run's: exactly the same primary
keys, each once, with the same vectors. Each case also records a row of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import demo_docs, make_job
from reliability import record
from store_readers import assert_same_store, milvus_rows, parquet_rows, wait_for_first_ack

from pipeline.state.lock import JobLock

DOCS = demo_docs(14)
# small windows and batches, so a run has many of both to be broken between
SMALL = {"batching": {"token_budget": 512, "max_batch_size": 4, "sort_window": 12},
         "sink": {"retry_base_delay_s": 0.01}}
PARQUET = {"kind": "parquet", "path": "vectors", "rows_per_file": 10,
           "retry_base_delay_s": 0.01}


def job_for(tmp: Path, kind: str, **extra) -> Path:
    overrides = {**SMALL, **extra}
    if kind == "parquet":
        overrides["sink"] = PARQUET
    return make_job(tmp, DOCS, **overrides)


def cli(job: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_JOB_")}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet",
           "--report", str(job.parent / "report.json"), *args]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def rows(tmp: Path, kind: str) -> dict[str, dict]:
    return milvus_rows(tmp / "out.db", "t") if kind == "milvus" else parquet_rows(tmp / "vectors")


def report(job: Path) -> dict:
    return json.loads((job.parent / "report.json").read_text())


def dead_letters(tmp: Path) -> list[dict]:
    path = tmp / ".embed-job" / "t" / "dead_letters.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict]]:
    """Fault-free runs, one per sink kind, in child processes like the faulty ones."""
    out = {}
    for kind in ("milvus", "parquet"):
        tmp = tmp_path_factory.mktemp(f"ref-{kind}")
        done = cli(job_for(tmp, kind))
        assert done.returncode == 0, done.stderr
        out[kind] = rows(tmp, kind)
    return out


KILL_POINTS = ["after_read@5", "after_chunk@9", "after_plan_window@1", "during_embed@2",
               "after_embed@3", "before_sink_write@2", "after_sink_write@2", "after_ack@4",
               "during_checkpoint_write@3"]


@pytest.mark.parametrize("kind", ["milvus", "parquet"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_each_fault_point_then_resume(tmp_path: Path, reference, kind: str,
                                                 point: str) -> None:
    job = job_for(tmp_path, kind)
    killed = cli(job, env={"EMBED_JOB_FAULT": f"{point}:kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli(job)
    assert resumed.returncode == 0, resumed.stderr
    final = rows(tmp_path, kind)
    assert_same_store(final, reference[kind])
    record("SIGKILL at a fault point", f"{point} ({kind})",
           "resume completes; store equals an uninterrupted run",
           f"killed (signal 9); resume exit {resumed.returncode}; {len(final)} keys, each once, "
           f"vectors equal")


def test_memory_limit_splits_batches_and_output_is_unchanged(tmp_path: Path, reference) -> None:
    """A device that fits 300 padded tokens at a time: batches split, nothing lost."""
    job = job_for(tmp_path, "parquet")
    done = cli(job, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "300"})
    assert done.returncode == 0, done.stderr
    assert dead_letters(tmp_path) == []
    assert_same_store(rows(tmp_path, "parquet"), reference["parquet"])
    budget = report(job)["extra"]["safe_token_budget"]
    assert budget is not None and budget <= 300
    record("out of memory", "every call > 300 padded tokens fails",
           "batches split in halves until they fit; output unchanged; safe budget kept",
           f"exit 0; 0 dead letters; store equals the fault-free run; safe budget {budget}")


def test_chunks_that_cannot_fit_alone_are_the_only_dead_letters(tmp_path: Path) -> None:
    job = job_for(tmp_path, "parquet", chunking={"max_tokens": 128, "overlap_tokens": 0},
                  max_dead_letter_ratio=1.0)
    done = cli(job, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100"})
    assert done.returncode == 0, done.stderr
    plan_free = job_for(tmp_path / "ref", "parquet", chunking={"max_tokens": 128, "overlap_tokens": 0})
    assert cli(plan_free).returncode == 0
    ref = rows(tmp_path / "ref", "parquet")
    got = rows(tmp_path, "parquet")
    letters = dead_letters(tmp_path)
    assert letters and all("out of memory" in d["reason"] for d in letters)
    lost = {(d["doc_id"], d["chunk_index"]) for d in letters}
    assert {(r["doc_id"], r["chunk_index"]) for r in ref.values()} - \
        {(r["doc_id"], r["chunk_index"]) for r in got.values()} == lost
    assert_same_store(got, {pk: r for pk, r in ref.items()
                            if (r["doc_id"], r["chunk_index"]) not in lost})
    record("out of memory", "chunks longer than the device fits (limit 100 tokens, chunks up to 128)",
           "only those chunks go to the dead-letter file; every other vector is stored",
           f"exit 0; {len(lost)} dead letters, all 'out of memory even alone'; the other "
           f"{len(got)} vectors equal the fault-free run's")


def test_random_oom_leaves_output_identical(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "milvus")
    done = cli(job, env={"EMBED_JOB_FAULT": "during_embed~0.15:oom", "EMBED_JOB_FAULT_SEED": "7"})
    assert done.returncode == 0, done.stderr
    assert dead_letters(tmp_path) == []
    assert_same_store(rows(tmp_path, "milvus"), reference["milvus"])
    record("out of memory", "random OOM in 15% of embedding calls (seeded)",
           "retried split; output identical; no dead letters",
           "exit 0; 0 dead letters; store equals the fault-free run")


def test_random_transient_sink_failures_leave_output_identical(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "milvus")
    done = cli(job, env={"EMBED_JOB_FAULT": "before_sink_write~0.3:transient",
                         "EMBED_JOB_FAULT_SEED": "3"})
    assert done.returncode == 0, done.stderr
    assert_same_store(rows(tmp_path, "milvus"), reference["milvus"])
    record("sink", "transient failure on 30% of writes (seeded)",
           "retried with backoff and jitter; output identical",
           "exit 0; store equals the fault-free run")


def test_transient_failures_that_never_end_stop_the_run_resumably(tmp_path: Path, reference
                                                                  ) -> None:
    job = job_for(tmp_path, "milvus")
    done = cli(job, env={"EMBED_JOB_FAULT": "before_sink_write~1.0:transient"})
    assert done.returncode == 6, done.stderr
    assert "Traceback" not in done.stderr and "transient" in done.stderr
    assert cli(job).returncode == 0
    assert_same_store(rows(tmp_path, "milvus"), reference["milvus"])
    record("sink", "every write fails transiently",
           "stops after the configured retries with one line; a re-run completes",
           f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1][:80]}…; re-run exit 0, "
           f"store equals the fault-free run")


def test_engine_crash_restarts_the_engine(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "milvus")
    done = cli(job, env={"EMBED_JOB_FAULT": "during_embed@3:raise"})
    assert done.returncode == 0, done.stderr
    assert report(job)["extra"]["engine_restarts"] == 1
    assert_same_store(rows(tmp_path, "milvus"), reference["milvus"])
    record("engine", "the embedding engine fails mid-run (RuntimeError)",
           "engine restarted (bounded), batches in flight re-sent; output identical",
           "exit 0; 1 restart; store equals the fault-free run")


def test_disk_full_while_checkpointing_loses_nothing(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "parquet")
    full = cli(job, env={"EMBED_JOB_FAULT": "during_checkpoint_write@4:enospc"})
    assert full.returncode == 2, full.stderr
    message = full.stderr.strip().splitlines()
    assert len(message) == 1 and "No space left" in message[0] and "Traceback" not in full.stderr
    assert cli(job).returncode == 0
    assert_same_store(rows(tmp_path, "parquet"), reference["parquet"])
    record("checkpoint", "disk full while writing the checkpoint",
           "one-line error; the previous checkpoint intact; a re-run completes",
           f"exit 2: '{message[0][-60:]}'; re-run exit 0; store equals the fault-free run")


def test_corrupt_checkpoint_is_refused_until_restart(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "parquet")
    killed = cli(job, env={"EMBED_JOB_FAULT": "after_ack@3:kill"})
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / ".embed-job" / "t" / "run" / "checkpoint.json"
    ckpt.write_text(ckpt.read_text().replace('"vectors_written"', '"vectors_writen"', 1))
    refused = cli(job)
    assert refused.returncode == 2 and "corrupt" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert cli(job, "--restart").returncode == 0
    assert_same_store(rows(tmp_path, "parquet"), reference["parquet"])
    record("checkpoint", "checkpoint edited/torn (checksum mismatch)",
           "refuses to guess; one-line error naming --restart",
           "exit 2 'checkpoint is corrupt'; --restart completes; store equals the fault-free run")


def test_second_concurrent_run_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    job = job_for(tmp_path, "parquet")
    with JobLock(tmp_path / ".embed-job" / "t"):
        refused = cli(job)
    assert refused.returncode == 4, refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr
    record("concurrency", "a second run while one holds the lock",
           "refused at once with exit 4, naming the holder's pid", "exit 4: pid named")


def test_two_runs_started_together_exactly_one_proceeds(tmp_path: Path) -> None:
    job = job_for(tmp_path, "parquet")
    procs = [cli(job, wait=False) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes == [0, 4], [p.stderr.read() for p in procs]
    record("concurrency", "two runs started at the same moment", "exactly one proceeds",
           f"exit codes {codes}")


def test_stale_lock_file_from_a_dead_process_does_not_block(tmp_path: Path) -> None:
    job = job_for(tmp_path, "parquet")
    lock = tmp_path / ".embed-job" / "t" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("999999")
    assert cli(job).returncode == 0
    record("concurrency", "lock file left by a killed run", "does not block",
           "exit 0 (the kernel released the flock with the process)")


def test_sigterm_finishes_in_flight_work_and_resumes(tmp_path: Path, reference) -> None:
    job = job_for(tmp_path, "milvus")
    proc = cli(job, wait=False, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100000"})
    wait_for_first_ack(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, stderr
    assert "resume" in stderr and "Traceback" not in stderr
    assert cli(job).returncode == 0
    assert_same_store(rows(tmp_path, "milvus"), reference["milvus"])
    record("signals", "SIGTERM mid-run",
           "in-flight batches written and checkpointed; exit 143; a re-run completes",
           f"exit {code}; re-run exit 0; store equals the fault-free run")


def test_too_many_dead_letters_abort_with_a_clear_message(tmp_path: Path) -> None:
    docs = [dict(d) for d in DOCS]
    for d in docs[:6]:
        d["text"] = ""
    job = make_job(tmp_path, docs, max_dead_letter_ratio=0.2,
                   sink=PARQUET)
    done = cli(job)
    assert done.returncode == 2, done.stderr
    assert "max_dead_letter_ratio" in done.stderr and "Traceback" not in done.stderr
    record("dead letters", "6 of 14 documents have empty text, max_dead_letter_ratio 0.2",
           "the job stops with a one-line message naming the dead-letter file",
           f"exit 2: {done.stderr.strip()[:90]}…")
