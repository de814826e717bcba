"""Fault injection: kill, break or starve a real run anywhere; the result never changes.

Every case ends by comparing the store with an uninterrupted run's: exactly the same primary
keys, each once, with the same vectors. Each case also records a row of docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers.cli import dead_letters, run, start, wait_for_first_ack
from helpers.jobs import SMALL, SMALL_DOCS, SMALL_PARQUET, make_job, small_job, state_dir
from helpers.rows import assert_same_store, stored_rows
from milvus_server import lite_server_process
from reliability import record

from pipeline.state.lock import JobLock

KILL_POINTS = ["after_read@5", "after_chunk@9", "after_plan_window@1", "during_embed@2",
               "after_embed@3", "before_sink_write@2", "after_sink_write@2", "after_ack@4",
               "during_checkpoint_write@3"]


@pytest.mark.parametrize("kind", ["milvus", "parquet"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_each_fault_point_then_resume(tmp_path: Path, reference, kind: str,
                                                 point: str) -> None:
    job = small_job(tmp_path, kind)
    killed = run(job, process=True, fault=f"{point}:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    resumed = run(job, process=True)
    assert resumed.exit_code == 0, resumed.stderr
    final = stored_rows(job)
    assert_same_store(final, reference[kind])
    record("SIGKILL at a fault point", f"{point} ({kind})",
           "resume completes; store equals an uninterrupted run",
           f"killed (signal 9); resume exit {resumed.exit_code}; {len(final)} keys, each once, "
           f"vectors equal")


def test_memory_limit_splits_batches_and_output_is_unchanged(tmp_path: Path, reference) -> None:
    """A device that fits 300 padded tokens at a time: batches split, nothing lost."""
    job = small_job(tmp_path, "parquet")
    done = run(job, process=True, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "300"})
    assert done.exit_code == 0, done.stderr
    assert dead_letters(job) == []
    assert_same_store(stored_rows(job), reference["parquet"])
    budget = done.report["extra"]["safe_token_budget"]
    assert budget is not None and budget <= 300
    record("out of memory", "every call > 300 padded tokens fails",
           "batches split in halves until they fit; output unchanged; safe budget kept",
           f"exit 0; 0 dead letters; store equals the fault-free run; safe budget {budget}")


def test_chunks_that_cannot_fit_alone_are_the_only_dead_letters(tmp_path: Path) -> None:
    job = small_job(tmp_path, "parquet", chunking={"max_tokens": 128, "overlap_tokens": 0},
                    max_dead_letter_ratio=1.0)
    done = run(job, process=True, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100"})
    assert done.exit_code == 0, done.stderr
    plan_free = small_job(tmp_path / "ref", "parquet",
                          chunking={"max_tokens": 128, "overlap_tokens": 0})
    assert run(plan_free, process=True).exit_code == 0
    ref = stored_rows(plan_free)
    got = stored_rows(job)
    letters = dead_letters(job)
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
    job = small_job(tmp_path, "milvus")
    done = run(job, process=True, fault="during_embed~0.15:oom",
               env={"EMBED_JOB_FAULT_SEED": "7"})
    assert done.exit_code == 0, done.stderr
    assert dead_letters(job) == []
    assert_same_store(stored_rows(job), reference["milvus"])
    record("out of memory", "random OOM in 15% of embedding calls (seeded)",
           "retried split; output identical; no dead letters",
           "exit 0; 0 dead letters; store equals the fault-free run")


def test_random_transient_sink_failures_leave_output_identical(tmp_path: Path, reference) -> None:
    job = small_job(tmp_path, "milvus")
    done = run(job, process=True, fault="before_sink_write~0.3:transient",
               env={"EMBED_JOB_FAULT_SEED": "3"})
    assert done.exit_code == 0, done.stderr
    assert_same_store(stored_rows(job), reference["milvus"])
    record("sink", "transient failure on 30% of writes (seeded)",
           "retried with backoff and jitter; output identical",
           "exit 0; store equals the fault-free run")


def test_transient_failures_that_never_end_stop_the_run_resumably(tmp_path: Path, reference
                                                                  ) -> None:
    job = small_job(tmp_path, "milvus")
    done = run(job, process=True, fault="before_sink_write~1.0:transient")
    assert done.exit_code == 6, done.stderr
    assert "Traceback" not in done.stderr and "transient" in done.stderr
    assert run(job, process=True).exit_code == 0
    assert_same_store(stored_rows(job), reference["milvus"])
    record("sink", "every write fails transiently",
           "stops after the configured retries with one line; a re-run completes",
           f"exit {done.exit_code}: {done.stderr.strip().splitlines()[-1][:80]}…; re-run exit 0, "
           f"store equals the fault-free run")


def test_engine_crash_restarts_the_engine(tmp_path: Path, reference) -> None:
    job = small_job(tmp_path, "milvus")
    done = run(job, process=True, fault="during_embed@3:raise")
    assert done.exit_code == 0, done.stderr
    assert done.report["extra"]["engine_restarts"] == 1
    assert_same_store(stored_rows(job), reference["milvus"])
    record("engine", "the embedding engine fails mid-run (RuntimeError)",
           "engine restarted (bounded), batches in flight re-sent; output identical",
           "exit 0; 1 restart; store equals the fault-free run")


def test_disk_full_while_checkpointing_loses_nothing(tmp_path: Path, reference) -> None:
    job = small_job(tmp_path, "parquet")
    full = run(job, process=True, fault="during_checkpoint_write@4:enospc")
    assert full.exit_code == 2, full.stderr
    message = full.stderr.strip().splitlines()
    assert len(message) == 1 and "No space left" in message[0] and "Traceback" not in full.stderr
    assert run(job, process=True).exit_code == 0
    assert_same_store(stored_rows(job), reference["parquet"])
    record("checkpoint", "disk full while writing the checkpoint",
           "one-line error; the previous checkpoint intact; a re-run completes",
           f"exit 2: '{message[0][-60:]}'; re-run exit 0; store equals the fault-free run")


def test_corrupt_checkpoint_is_refused_until_restart(tmp_path: Path, reference) -> None:
    job = small_job(tmp_path, "parquet")
    killed = run(job, process=True, fault="after_ack@3:kill")
    assert killed.exit_code == -signal.SIGKILL
    ckpt = state_dir(job).checkpoint
    ckpt.write_text(ckpt.read_text().replace('"vectors_written"', '"vectors_writen"', 1))
    refused = run(job, process=True)
    assert refused.exit_code == 2 and "corrupt" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert run(job, "--restart", process=True).exit_code == 0
    assert_same_store(stored_rows(job), reference["parquet"])
    record("checkpoint", "checkpoint edited/torn (checksum mismatch)",
           "refuses to guess; one-line error naming --restart",
           "exit 2 'checkpoint is corrupt'; --restart completes; store equals the fault-free run")


def test_second_concurrent_run_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    job = small_job(tmp_path, "parquet")
    with JobLock(state_dir(job).root):
        refused = run(job, process=True)
    assert refused.exit_code == 4, refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr
    record("concurrency", "a second run while one holds the lock",
           "refused at once with exit 4, naming the holder's pid", "exit 4: pid named")


def test_two_runs_started_together_exactly_one_proceeds(tmp_path: Path) -> None:
    job = small_job(tmp_path, "parquet")
    started = [start(job) for _ in range(2)]
    done = [s.finish() for s in started]
    codes = sorted(d.exit_code for d in done)
    assert codes == [0, 4], [d.stderr for d in done]
    record("concurrency", "two runs started at the same moment", "exactly one proceeds",
           f"exit codes {codes}")


def test_stale_lock_file_from_a_dead_process_does_not_block(tmp_path: Path) -> None:
    job = small_job(tmp_path, "parquet")
    lock = state_dir(job).lock
    lock.parent.mkdir(parents=True)
    lock.write_text("999999")
    assert run(job, process=True).exit_code == 0
    record("concurrency", "lock file left by a killed run", "does not block",
           "exit 0 (the kernel released the flock with the process)")


def test_sigterm_finishes_in_flight_work_and_resumes(tmp_path: Path, reference) -> None:
    job = small_job(tmp_path, "milvus")
    running = start(job, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100000"})
    wait_for_first_ack(running)
    running.proc.send_signal(signal.SIGTERM)
    stopped = running.finish(timeout=120)
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.stderr
    assert "resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert run(job, process=True).exit_code == 0
    assert_same_store(stored_rows(job), reference["milvus"])
    record("signals", "SIGTERM mid-run",
           "in-flight batches written and checkpointed; exit 143; a re-run completes",
           f"exit {stopped.exit_code}; re-run exit 0; store equals the fault-free run")


def test_a_server_that_stops_answering_mid_run_stops_it_resumably(tmp_path: Path, reference
                                                                   ) -> None:
    """A Milvus server that stops answering after the first writes (SIGSTOP: a frozen host):
    each call gives up after sink.timeout_s and is retried; when the retries are spent the run
    stops with one line. A write the run gave up on may still land once the server wakes, so
    the re-run must write each batch again without a duplicate."""
    with lite_server_process(tmp_path / "served") as (uri, server):
        job = small_job(tmp_path, sink={**SMALL["sink"], "uri": uri, "timeout_s": 1,
                                        "retries": 2})
        running = start(job, env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100000"})
        wait_for_first_ack(running)
        os.kill(server.pid, signal.SIGSTOP)
        stopped = running.finish(timeout=120)
        os.kill(server.pid, signal.SIGCONT)
        if stopped.exit_code == 0:
            pytest.skip("the run finished before the server was stopped")
        assert stopped.exit_code == 6, stopped.stderr
        lines = stopped.stderr.strip().splitlines()
        assert len(lines) == 1 and "deadline" in lines[0].lower(), stopped.stderr
        assert "checkpointed" in lines[0]
        assert run(job, process=True).exit_code == 0
        assert_same_store(stored_rows(job), reference["milvus"])  # each key once
    said = lines[0].split("': ", 1)[-1]  # from the call that failed: the URI's port varies
    record("sink", "the Milvus server stops answering mid-run (SIGSTOP)",
           "each call gives up after sink.timeout_s; exit 6, one line, once the retries are "
           "spent; a re-run completes",
           f"exit {stopped.exit_code}: {said}; re-run exit 0, store equals the fault-free run")


def test_too_many_dead_letters_abort_with_a_clear_message(tmp_path: Path) -> None:
    docs = [dict(d) for d in SMALL_DOCS]
    for d in docs[:6]:
        d["text"] = ""
    job = make_job(tmp_path, docs, max_dead_letter_ratio=0.2,
                   sink=SMALL_PARQUET)
    done = run(job, process=True)
    assert done.exit_code == 2, done.stderr
    assert "max_dead_letter_ratio" in done.stderr and "Traceback" not in done.stderr
    record("dead letters", "6 of 14 documents have empty text, max_dead_letter_ratio 0.2",
           "the job stops with a one-line message naming the dead-letter file",
           f"exit 2: {done.stderr.strip()[:90]}…")
