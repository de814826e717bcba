"""Several embedding worker processes fed from one plan (``--workers`` on the CPU, the same
code path as ``--gpus``): the same vectors as one process, each batch written once whatever
dies, and a one-line error for GPUs that are not there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers.cli import dead_letters, ledger, run, start, wait_for_first_ack
from helpers.jobs import SMALL, small_job
from helpers.rows import assert_same_store, stored_rows

from pipeline.errors import ConfigError
from pipeline.run.devices import Slot, parse_gpus, planner_processes, worker_slots


def _counters_add_up(report: dict) -> None:
    workers = report["workers"]
    assert workers, "a multi-worker run reports its workers"
    assert sum(w["tokens"] for w in workers) == report["tokens_embedded"]
    assert sum(w["batches"] for w in workers) == report["batches_embedded"]
    assert report["batches_embedded"] == report["batches"]  # a fresh run embeds every batch


@pytest.mark.parametrize("workers", [2, 3])
def test_n_workers_store_what_one_process_stores(tmp_path, reference, workers):
    job = small_job(tmp_path, "parquet")
    done = run(job, "--workers", str(workers), process=True, expect={0})
    assert_same_store(stored_rows(job), reference["parquet"])
    report = done.report
    _counters_add_up(report)
    assert [w["worker"] for w in report["workers"]] == [f"cpu{i}" for i in range(workers)]
    assert sum(1 for w in report["workers"] if w["batches"]) >= 2, "the queue is shared"


def test_a_run_planned_by_several_processes_stores_the_same(tmp_path, reference):
    job = small_job(tmp_path, "parquet",
                    batching={**SMALL["batching"], "planner_processes": 2})
    run(job, "--workers", "2", process=True, expect={0})
    assert_same_store(stored_rows(job), reference["parquet"])


def test_a_killed_worker_is_replaced_and_its_batches_written_once(tmp_path, reference):
    job = small_job(tmp_path)
    done = run(job, "--workers", "2", process=True, fault="worker_after_embed@2:kill",
               expect={0})
    assert_same_store(stored_rows(job), reference["milvus"])  # same keys: none lost, none twice
    report = done.report
    assert [w["deaths"] for w in report["workers"]] == [1, 0]
    assert report["vectors_written"] == len(reference["milvus"])
    _counters_add_up(report)


def test_a_killed_job_resumes_exactly_once(tmp_path, reference):
    job = small_job(tmp_path)
    run(job, "--workers", "2", process=True, fault="after_ack@3:kill", expect={-9})
    acked = ledger(job)["vectors_written"]
    assert 0 < acked < len(reference["milvus"])
    done = run(job, "--workers", "2", process=True, expect={0})
    assert_same_store(stored_rows(job), reference["milvus"])
    assert done.report["vectors_written"] == len(reference["milvus"]) - acked  # only the rest


def test_sigint_drains_every_worker_then_resumes(tmp_path, reference):
    job = small_job(tmp_path, "parquet")
    running = start(job, "--workers", "2")
    wait_for_first_ack(running)
    running.proc.send_signal(signal.SIGINT)
    stopped = running.finish()
    if stopped.exit_code == 0:
        pytest.skip("the run finished before the signal landed")
    assert stopped.exit_code == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    run(job, "--workers", "2", process=True, expect={0})
    assert_same_store(stored_rows(job), reference["parquet"])


def test_out_of_memory_back_off_works_in_each_worker(tmp_path, reference):
    job = small_job(tmp_path, "parquet")
    done = run(job, "--workers", "2", process=True,
               env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "300"}, expect={0})
    assert_same_store(stored_rows(job), reference["parquet"], min_cos=0.999)
    assert done.report["extra"]["safe_token_budget"] is not None


def test_a_chunk_that_fits_no_worker_is_a_dead_letter_as_in_one_process(tmp_path):
    """Chunks above the (simulated) device memory are dead letters, the same ones whichever
    worker met them; the rest is stored."""
    runs = {}
    for workers in ("1", "2"):
        job = small_job(tmp_path / workers, "parquet", max_dead_letter_ratio=None)
        run(job, "--workers", workers, process=True,
            env={"EMBED_JOB_MEMORY_LIMIT_TOKENS": "100"}, expect={0})
        letters = {(d["doc_id"], d["chunk_index"]) for d in dead_letters(job)}
        runs[workers] = (letters, stored_rows(job))
    (one, stored_one), (two, stored_two) = runs["1"], runs["2"]
    assert one and one == two
    assert_same_store(stored_two, stored_one, min_cos=0.999)


def test_gpus_on_a_machine_without_them_is_one_line(tmp_path):
    job = small_job(tmp_path)
    done = run(job, "--gpus", "2", expect={2})
    line, = [x for x in done.output.splitlines() if x.strip()]
    assert "--gpus 2" in line and "no CUDA GPU" in line and "--workers" in line


def test_validate_names_gpus_the_machine_lacks(tmp_path):
    from helpers.cli import invoke
    from helpers.jobs import demo_docs, make_job

    job = make_job(tmp_path, demo_docs(2), model={"device": "auto", "gpus": 2})
    done = invoke("validate", str(job), "--offline")
    assert done.exit_code == 2
    assert "model.gpus 2: torch sees no CUDA GPU here; on the CPU, use --workers N" in done.output


def test_worker_slots():
    h200 = (2, "NVIDIA H200")
    assert worker_slots(None, 1, "cpu") == [Slot(0, None, 1)]
    assert worker_slots("all", 1, "auto", h200) == [Slot(0, 0, 1), Slot(1, 1, 1)]
    assert worker_slots(1, 2, "cuda", h200) == [Slot(0, 0, 2), Slot(1, 0, 2)]
    assert [s.label for s in worker_slots([1], 2, "auto", h200)] == ["gpu1.0", "gpu1.1"]
    assert parse_gpus("0,1") == [0, 1] and parse_gpus(" all ") == "all" and parse_gpus("3") == 3
    for gpus, message in [(4, "this machine has 2 GPU(s) (NVIDIA H200)"),
                          ([0, 5], "GPU 5 is not there"), ([0, 0], "each GPU once")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            worker_slots(gpus, 1, "auto", h200)
    with pytest.raises(ConfigError, match="model.device cuda:1"):
        worker_slots(2, 1, "cuda:1", h200)
    with pytest.raises(ConfigError, match="expected 'all'"):
        parse_gpus("two")


def test_planner_processes_auto(monkeypatch):
    """Two tokenizing processes per GPU, the run's own included (its planning then leaves the
    launching thread's interpreter lock alone); one, in the process, for the CPU."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    here = [Slot(0, None, 1)]
    assert planner_processes("auto", here, "cpu", found=1) == 1
    assert planner_processes("auto", here, "auto", found=0) == 1
    assert planner_processes("auto", here, "auto", found=1) == 2
    assert planner_processes("auto", here, "cuda:0", found=1) == 2
    eight = worker_slots("all", 1, "auto", (8, "NVIDIA H200"))
    assert planner_processes("auto", eight, "auto", found=8) == 14  # the cores, less two
    assert planner_processes("auto", [Slot(0, None, 2), Slot(1, None, 2)], "cpu", found=0) == 1
    assert planner_processes(3, here, "cpu", found=0) == 3


def test_a_worker_env_keeps_multicast_off_and_names_its_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    env = Slot(1, 1, 1).env(threads=None)
    assert env["CUDA_VISIBLE_DEVICES"] == "6"  # the parent's second visible GPU
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert Slot(0, None, 2).env(threads=1)["OMP_NUM_THREADS"] == "1"


def test_the_runs_own_process_keeps_multicast_off_for_an_engine_it_starts():
    """An engine started in the run's process (SGLang with tp_size > 1) inherits its
    environment: the command turns NVLink multicast off there too, whatever was set."""
    code = ("import os, pipeline.cli; print(os.environ['NCCL_NVLS_ENABLE'], "
            "os.environ['TORCH_SYMM_MEM_DISABLE_MULTICAST'], os.environ['NVSHMEM_DISABLE_NVLS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NCCL_NVLS_ENABLE": "1"}).stdout.split()
    assert out == ["0", "1", "1"]
