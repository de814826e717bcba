"""``runner: ray`` on a local Ray cluster of this machine's 2 CPUs, MiniLM on two CPU actors:
the same keys and vectors as the local runner (Milvus Lite and Parquet), the same plan and
dead letters from a Parquet source read in parts, exactly once when an actor or the driver
is killed, and a day-2 incremental run equal to a fresh build. Each run starts its own
cluster (about 5 s); the tests are marked ``ray``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import dead_letters, invoke, ledger, run
from helpers.jobs import SMALL, SMALL_DOCS, SMALL_PARQUET, demo_docs, make_job, small_job
from helpers.rows import assert_same_store, stored_rows

from pipeline.job.load import load_job

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

# two actors of half a CPU each leave a CPU for the reading and chunking tasks
RAY = {"ray": {"actors": 2, "actor_cpus": 0.5, "object_store_mb": 256}}
MARK = "EMBED_JOB_TEST_CLUSTER"  # in the environment of every process of a test's cluster


@pytest.fixture
def cluster_marker(tmp_path: Path):
    """A value the test's Ray processes inherit; whatever of them outlives a killed driver
    (Ray's agents do) is ended after the test."""
    yield {MARK: str(tmp_path)}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={tmp_path}".encode() in env.split(b"\0"):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ray_job(tmp_path: Path, kind: str = "milvus", **extra) -> Path:
    return small_job(tmp_path, kind, **RAY, **extra)


def _counters(report: dict) -> None:
    workers = report["workers"]
    assert [w["worker"] for w in workers] == ["ray-cpu0", "ray-cpu1"]
    assert sum(w["tokens"] for w in workers) == report["tokens_embedded"]
    assert sum(w["batches"] for w in workers) == report["batches_embedded"]
    assert report["cluster"]["cpus"] == os.cpu_count() and report["cluster"]["nodes"] == 1


@pytest.mark.parametrize("kind", ["milvus", "parquet"])
def test_ray_stores_what_the_local_runner_stores(tmp_path, reference, kind, cluster_marker):
    job = _ray_job(tmp_path, kind)
    prom = tmp_path / "run.prom"
    done = run(job, "--runner", "ray", "--prom", str(prom), process=True, env=cluster_marker,
               expect={0})
    assert_same_store(stored_rows(job), reference[kind])  # keys equal, cosine >= 0.9999
    report = done.report
    assert report["status"] == "completed" and report["batches_embedded"] == report["batches"]
    _counters(report)
    assert sum(1 for w in report["workers"] if w["batches"]) == 2, "both actors embed"
    metrics = prom.read_text()
    assert f'embed_job_cluster_cpus{{job="t"}} {float(os.cpu_count() or 0)}' in metrics
    assert 'embed_job_worker_tokens_per_second{job="t",worker="ray-cpu1"}' in metrics


def _parquet_source(directory: Path) -> list[dict]:
    """The small corpus as Parquet in row groups of 3, with two rows that are no documents."""
    rows = [{"id": d["id"], "text": d["text"], "title": d["title"]} for d in SMALL_DOCS]
    rows[4]["text"] = None  # a dead letter
    rows.insert(9, {"id": None, "text": "a row without an id", "title": "x"})
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "corpus.parquet", row_group_size=3)
    return rows


def test_a_source_read_in_parts_plans_the_same_bytes_and_dead_letters(tmp_path, monkeypatch,
                                                                     cluster_marker):
    import pipeline.run.cluster.reading as reading

    monkeypatch.setattr(reading, "PART_ROWS", 4)  # five parts of whole row groups
    for key, value in cluster_marker.items():
        monkeypatch.setenv(key, value)
    _parquet_source(tmp_path)
    job = make_job(tmp_path, [], **{**SMALL, "sink": SMALL_PARQUET}, **RAY,
                   max_dead_letter_ratio=0.5,
                   source={"path": "corpus.parquet", "metadata_fields": ["title"]})
    loaded = load_job(job)
    assert len(reading.source_parts(loaded.source, loaded.resolve)) == 5
    seen = {}
    for runner in ("local", "ray"):
        shutil.rmtree(loaded.checkpoint_path, ignore_errors=True)
        shutil.rmtree(tmp_path / "vectors", ignore_errors=True)
        done = run(job, "--runner", runner, "--limit", "12", expect={0})  # partial: the plan
        assert done.report["status"] == "partial"                          # is kept
        plan = loaded.state.plan_dir
        seen[runner] = ({p.relative_to(plan): p.read_bytes() for p in sorted(plan.rglob("*"))
                         if p.is_file()}, dead_letters(job), ledger(job)["vectors_written"])
    assert seen["ray"][0] == seen["local"][0], "the same plan, byte for byte"
    assert seen["ray"][1] == seen["local"][1] and len(seen["ray"][1]) == 2
    assert seen["ray"][2] == seen["local"][2] > 0


def test_a_killed_actor_is_restarted_and_its_batches_written_once(tmp_path, reference,
                                                                   cluster_marker):
    job = _ray_job(tmp_path)
    done = run(job, "--runner", "ray", process=True, fault="worker_after_embed@2:kill",
               env=cluster_marker, expect={0})
    assert_same_store(stored_rows(job), reference["milvus"])  # none lost, none twice
    report = done.report
    assert [w["deaths"] for w in report["workers"]] == [1, 0]
    assert report["vectors_written"] == len(reference["milvus"])
    _counters(report)


def test_a_killed_driver_resumes_redoing_only_unacknowledged_batches(tmp_path, reference,
                                                                     cluster_marker):
    job = _ray_job(tmp_path)
    run(job, "--runner", "ray", process=True, fault="after_ack@3:kill", env=cluster_marker,
        expect={-9})
    acked = ledger(job)["vectors_written"]
    assert 0 < acked < len(reference["milvus"])
    done = run(job, "--runner", "ray", process=True, env=cluster_marker, expect={0})
    assert_same_store(stored_rows(job), reference["milvus"])
    report = done.report
    assert report["vectors_written"] == len(reference["milvus"]) - acked  # nothing twice
    assert report["batches_skipped"] > 0
    assert report["batches_embedded"] + report["batches_skipped"] == report["batches"]


def test_a_day_two_incremental_run_on_ray_equals_a_fresh_build(tmp_path, cluster_marker):
    day1 = demo_docs(16)
    day2 = [dict(d) for d in day1[2:]] + demo_docs(18)[16:]  # 2 gone, 2 new
    day2[0]["text"] += " Revised."  # changed
    settings = {**SMALL, **RAY, "sync": {"delete_missing": True}}
    job = make_job(tmp_path / "nightly", day1, **settings)
    run(job, "--runner", "ray", process=True, env=cluster_marker, expect={0})
    job = make_job(tmp_path / "nightly", day2, **settings)
    done = run(job, "--runner", "ray", process=True, env=cluster_marker, expect={0})
    report = done.report
    assert (report["docs_added"], report["docs_updated"], report["docs_deleted"]) == (2, 1, 2)
    assert report["docs_unchanged"] == 13
    fresh = make_job(tmp_path / "fresh", day2, **settings)
    run(fresh, process=True, expect={0})  # the local runner
    assert_same_store(stored_rows(job), stored_rows(fresh))


def test_without_ray_installed_one_line_says_how_to_install(tmp_path):
    job = small_job(tmp_path)
    hide = ("import sys; sys.modules['ray'] = None; from pipeline.cli import main; "
            "main(['run', sys.argv[1], '--runner', 'ray'])")
    done = subprocess.run([sys.executable, "-c", hide, str(job)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert 'pip install "embed-job[ray]"' in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_validate_names_a_missing_ray_for_a_ray_job(tmp_path):
    job = small_job(tmp_path, runner="ray")
    hide = ("import sys; sys.modules['ray'] = None; from pipeline.cli import main; "
            "main(['validate', sys.argv[1], '--offline'])")
    done = subprocess.run([sys.executable, "-c", hide, str(job)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if "runner:" in line and 'pip install "embed-job[ray]"' in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr


def test_host_device_options_are_refused_with_the_ray_runner(tmp_path):
    done = run(small_job(tmp_path), "--runner", "ray", "--workers", "2", expect={2})
    assert "with runner ray, set ray.actors" in done.output


def test_more_actors_than_the_cluster_can_hold_is_one_line(tmp_path, cluster_marker):
    job = small_job(tmp_path, ray={"actors": 3, "actor_cpus": 1.0, "object_store_mb": 256})
    done = run(job, "--runner", "ray", process=True, env=cluster_marker, expect={2})
    assert "ray.actors 3 x ray.actor_cpus 1" in done.stderr and "Traceback" not in done.stderr
    assert invoke("status", str(job)).exit_code == 0  # the lock was released
