"""Data safety: the job touches only what it created, and never calls an incomplete index
complete. Real Milvus Lite and real Parquet; every case ends by comparing the destination
with a fresh build (or with what was there before), and records a row of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import demo_docs, make_job, write_jsonl
from reliability import record
from store_readers import assert_same_store, milvus_rows, parquet_rows

from pipeline.cli import main

DOCS = demo_docs(24)
# small windows, so an unfinished plan has several, and a fast retry
SMALL = {"chunking": {"max_tokens": 64, "overlap_tokens": 0},
         "batching": {"token_budget": 512, "max_batch_size": 8, "sort_window": 16,
                      "first_window": 16},
         "sink": {"retry_base_delay_s": 0.01}}
PARQUET = {"kind": "parquet", "path": "vectors", "rows_per_file": 20,
           "retry_base_delay_s": 0.01}
CATEGORY = "data safety"


def job_at(tmp: Path, docs: list[dict], kind: str = "milvus", **extra) -> Path:
    overrides = {**SMALL, **extra}
    if kind == "parquet":
        overrides["sink"] = {**PARQUET, **extra.get("sink", {})}
    return make_job(tmp, docs, **overrides)


def run(job: Path, *args: str) -> tuple[int, dict, str]:
    """In-process `embed-job run`: exit code, the JSON report, stderr."""
    report = job.parent / "report.json"
    report.unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["run", str(job), "--quiet", "--report", str(report),
                                       *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(report.read_text()), result.output


def cli(job: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_JOB_")}
    if fault:
        env["EMBED_JOB_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet",
                           "--report", str(job.parent / "report.json"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def rows(tmp: Path, kind: str) -> dict[str, dict]:
    return milvus_rows(tmp / "out.db", "t") if kind == "milvus" else parquet_rows(tmp / "vectors")


def fresh_rows(tmp: Path, docs: list[dict], kind: str, **extra) -> dict[str, dict]:
    job = job_at(tmp, docs, kind, **extra)
    code, _, out = run(job)
    assert code == 0, out
    return rows(tmp, kind)


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


# -- 1. Parquet publish deletes only this job's versions ---------------------------------

def test_parquet_never_removes_what_it_did_not_write(tmp_path: Path) -> None:
    for name in ("venv", "vendor", "very_important_backup"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    job = job_at(tmp_path, DOCS[:6], "parquet", sink={"path": ".", "rows_per_file": 20})
    code, _, out = run(job)
    assert code == 0, out
    assert "6 entries this job did not write" in out and "left alone" in out
    # a model change with keep_previous 0: the job's own first version goes, nothing else
    first_version = json.loads((tmp_path / "CURRENT").read_text())["version"]
    job = job_at(tmp_path, DOCS[:6], "parquet", sink={"path": ".", "rows_per_file": 20},
                 chunking={"max_tokens": 48, "overlap_tokens": 0}, sync={"keep_previous": 0})
    code, _, out = run(job)
    assert code == 0, out
    for name in ("venv", "vendor", "very_important_backup"):
        assert (tmp_path / name / "keep.txt").read_text() == "mine"
    assert not (tmp_path / first_version).exists()
    assert (tmp_path / json.loads((tmp_path / "CURRENT").read_text())["version"]).is_dir()
    record(CATEGORY, "parquet sink.path '.' beside venv/, vendor/, very_important_backup/",
           "foreign directories untouched (warned); only the job's own old version dropped",
           "exit 0 twice; venv/, vendor/, very_important_backup/ intact; old version removed")


# -- 2. Milvus publish drops only collections this job recorded creating -----------------

def _hand_made_collection(db: Path, name: str, dim: int = 4) -> None:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(db))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, max_length=64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
    client.upsert(name, [{"pk": "x", "vector": [1.0] + [0.0] * (dim - 1)}])
    client.close()


def _collections(db: Path) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(str(db))
    try:
        return sorted(client.list_collections())
    finally:
        client.close()


def test_milvus_never_drops_collections_it_did_not_create(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    assert run(job)[0] == 0
    _hand_made_collection(tmp_path / "out.db", "t__my_backup")
    job = job_at(tmp_path, DOCS[:6], chunking={"max_tokens": 48, "overlap_tokens": 0},
                 sync={"keep_previous": 0})
    code, report, out = run(job)
    assert code == 0, out
    assert _collections(tmp_path / "out.db") == sorted(["t__my_backup", report["target"]])
    record(CATEGORY, "hand-made collection t__my_backup beside the job's generations",
           "kept; only the job's own previous generation dropped",
           f"exit 0; collections after a model change: {_collections(tmp_path / 'out.db')}")


def test_second_job_on_the_same_collection_is_refused_before_embedding(tmp_path: Path) -> None:
    a = job_at(tmp_path / "a", DOCS[:6], sink={"uri": "../shared.db"})
    assert run(a)[0] == 0
    before = milvus_rows(tmp_path / "shared.db", "t")
    # another job (own name, own checkpoint dir), other dimension, same collection name
    b = job_at(tmp_path / "b", DOCS[6:12], name="other", model={"dimension": 128},
               sink={"uri": "../shared.db"})
    code, report, out = run(b)
    line = one_line(out)
    assert code == 2 and "made by job 't'" in line and "sink.collection" in line, out
    assert report["tokens_embedded"] == 0
    assert milvus_rows(tmp_path / "shared.db", "t").keys() == before.keys()
    assert run(a)[0] == 5  # A is unharmed and still in sync
    record(CATEGORY, "two jobs, one collection name (different dimensions)",
           "the second refused up front, one line; the first's index untouched",
           f"exit {code}, 0 tokens embedded: {line[:120]}")


def test_alias_name_taken_by_a_real_collection_is_refused_at_start(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    (tmp_path / "out.db").parent.mkdir(parents=True, exist_ok=True)
    _hand_made_collection(tmp_path / "out.db", "t")
    code, report, out = run(job)
    line = one_line(out)
    assert code == 2 and "a collection named 't' exists" in line
    assert report["tokens_embedded"] == 0 and report["model_load_s"] == 0
    assert _collections(tmp_path / "out.db") == ["t"]
    record(CATEGORY, "the alias name is already a real collection",
           "refused in the start phase (before the model loads), one line",
           f"exit {code}, 0 tokens embedded: {line[:120]}")


# -- 3. A checkpoint dir holds one job's state ----------------------------------------------

def test_two_jobs_sharing_a_checkpoint_dir_are_refused(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    assert run(job)[0] == 0
    spec = yaml.safe_load(job.read_text())
    write_jsonl(tmp_path / "other.jsonl", DOCS[6:12])
    other_source = tmp_path / "job2.yaml"
    other_source.write_text(yaml.safe_dump({**spec, "source": {"path": "other.jsonl"}}))
    code, report, out = run(other_source)
    line = one_line(out)
    assert code == 2 and "--restart" in line and report["tokens_embedded"] == 0
    other_sink = tmp_path / "job3.yaml"
    other_sink.write_text(yaml.safe_dump({**spec, "sink": {**spec["sink"], "uri": "b.db"}}))
    code, _, out = run(other_sink)
    assert code == 2 and "give it its own checkpoint_dir" in one_line(out)
    assert run(job)[0] == 5  # the first job still owns its state
    record(CATEGORY, "job copied to job2.yaml keeping name (other source / other sink)",
           "refused at start with one line; the first job's state untouched",
           f"exit 2 both; {line[:100]}")


# -- 4. Resume after the source changed ----------------------------------------------------

@pytest.mark.parametrize("kind", ["milvus", "parquet"])
@pytest.mark.parametrize("in_place", [False, True], ids=["first-build", "nightly"])
def test_resume_after_the_source_changed_equals_a_fresh_build(tmp_path: Path, kind: str,
                                                              in_place: bool) -> None:
    sync = {"sync": {"delete_missing": True}}
    job = job_at(tmp_path / "run", DOCS[:20], kind, **sync)
    if in_place:
        assert run(job)[0] == 0
        edited = [dict(d) for d in DOCS[:20]]
        edited[1]["text"] += " Edited for day two."
        job = job_at(tmp_path / "run", edited, kind, **sync)
    code, partial, out = run(job, "--limit", "12")  # an unfinished, acknowledged plan
    assert code == 0 and partial["status"] == "partial", out
    final = [d for i, d in enumerate(DOCS[:20]) if i not in (2, 3, 4)] + DOCS[20:24]
    final[0] = {**final[0], "text": final[0]["text"] + " Changed while the run was stopped."}
    job = job_at(tmp_path / "run", final, kind, **sync)
    code, report, out = run(job)
    assert code == 0 and "planned again" in out, out
    assert_same_store(rows(tmp_path / "run", kind),
                      fresh_rows(tmp_path / "fresh", final, kind, **sync))
    record(CATEGORY, f"source edited between a stopped run and its resume ({kind}, "
           f"{'nightly' if in_place else 'first build'})",
           "the change is found document by document; the changed part is planned again; "
           "the index equals a fresh build", f"exit 0; warning: {report['warnings'][0][:90]}")


def test_restart_of_an_unfinished_nightly_run_takes_its_writes_back(tmp_path: Path) -> None:
    job = job_at(tmp_path / "run", DOCS[:10])
    assert run(job)[0] == 0
    grown = [dict(d) for d in DOCS[:10]]
    grown[1]["text"] += "\n\n" + DOCS[20]["text"]  # more chunks than published
    code, partial, out = run(job_at(tmp_path / "run", grown), "--limit", "4")
    assert code == 0 and partial["status"] == "partial", out
    code, report, out = run(job_at(tmp_path / "run", DOCS[:10]), "--restart")
    assert code == 0, out
    assert_same_store(rows(tmp_path / "run", "milvus"),
                      fresh_rows(tmp_path / "fresh", DOCS[:10], "milvus"))
    record(CATEGORY, "--restart of an unfinished nightly run after its source was reverted",
           "what the discarded run wrote into the live index is taken back",
           f"exit 0; {report['docs_updated']} re-embedded; index equals a fresh build")


# -- 5. A missing or damaged plan window ---------------------------------------------------

@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_missing_or_damaged_plan_window_is_planned_again_never_published(
        tmp_path: Path, damage: str) -> None:
    job = job_at(tmp_path, DOCS[:20])
    killed = cli(job, fault="before_publish@1:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    plan = tmp_path / ".embed-job" / "t" / "run" / "plan"
    if damage == "delete":
        victim = plan / "window-00001.parquet"
        victim.unlink()
    else:  # the document records publishing reads: same size, one byte flipped
        victim = plan / "docs-00001.parquet"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    code, report, out = run(job)
    assert code == 0 and victim.name in out, out
    assert_same_store(rows(tmp_path, "milvus"), fresh_rows(tmp_path / "fresh", DOCS[:20],
                                                           "milvus"))
    record(CATEGORY, f"plan window file {damage}d between planning and publish",
           "found by the manifest; planned again from that window; index complete",
           f"exit 0; {report['warnings'][0][:90]}")


# -- 6. Verification against the destination ---------------------------------------------

def test_verification_catches_a_lost_row_hidden_by_a_foreign_one(tmp_path: Path) -> None:
    from pymilvus import MilvusClient

    job = job_at(tmp_path, DOCS[:10])
    killed = cli(job, fault="before_publish@1:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ledger = tmp_path / ".embed-job" / "t" / "run" / "checkpoint.json"
    target = json.loads(ledger.read_text())["state"]["run"]["target"]
    client = MilvusClient(str(tmp_path / "out.db"))
    client.load_collection(target)
    row = client.query(target, filter='pk != ""', limit=1,
                       output_fields=["pk", "doc_hash", "vector", "doc_id", "chunk_index",
                                      "metadata", "text"])[0]
    client.delete(target, filter=f'pk == "{row["pk"]}"')
    other = "0" if row["doc_hash"][0] != "0" else "1"
    client.upsert(target, [{**row, "pk": "foreign", "doc_id": "foreign",
                            "doc_hash": other + row["doc_hash"][1:]}])
    client.close()
    code, report, out = run(job)
    line = one_line(out)
    assert code == 2 and "verification failed" in line, out
    assert "t" not in _aliases(tmp_path / "out.db")
    record(CATEGORY, "a lost vector replaced by a foreign row (same total count)",
           "verification by doc_hash bucket refuses to publish; alias not created",
           f"exit {code}: {line[:110]}")


def _aliases(db: Path) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(str(db))
    try:
        return client.list_aliases().get("aliases", [])
    finally:
        client.close()


# -- 7. Deletes need a source read completely --------------------------------------------

def test_a_torn_row_or_a_missing_file_never_deletes(tmp_path: Path) -> None:
    sync = {"sync": {"delete_missing": True}}
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", DOCS[:6])
    write_jsonl(tmp_path / "data" / "b.jsonl", DOCS[6:10])
    job = job_at(tmp_path, [], source={"path": "data/*.jsonl"}, max_dead_letter_ratio=0.5,
                 **sync)
    assert run(job)[0] == 0
    everything = milvus_rows(tmp_path / "out.db", "t").keys()
    # a torn line (no id can be read) and an emptied text (id known): nothing deleted
    lines = (tmp_path / "data" / "a.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    lines[2] = json.dumps({"id": DOCS[2]["id"], "text": " "})
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(lines) + "\n")
    code, report, out = run(job)
    assert code in (0, 5) and report["docs_deleted"] == 0, out
    assert "no documents deleted" in out
    assert milvus_rows(tmp_path / "out.db", "t").keys() == everything
    # fixed rows, but a file the published run read is gone: still nothing deleted...
    write_jsonl(tmp_path / "data" / "a.jsonl", DOCS[:6])
    (tmp_path / "data" / "b.jsonl").unlink()
    code, report, out = run(job)
    assert report["docs_deleted"] == 0 and "--accept-missing-files" in out, out
    assert milvus_rows(tmp_path / "out.db", "t").keys() == everything
    # ...until the user says it was removed on purpose
    code, report, out = run(job, "--accept-missing-files")
    assert code == 0 and report["docs_deleted"] == 4, out
    assert {r["doc_id"] for r in milvus_rows(tmp_path / "out.db", "t").values()} == \
        {d["id"] for d in DOCS[:6]}
    record(CATEGORY, "delete_missing with a torn JSON line / an emptied text / a file gone",
           "no deletes (warned) until the source is read completely or the removal accepted",
           "0 deleted twice with warnings; 4 deleted with --accept-missing-files")


# -- 8. Lost local state, intact destination ------------------------------------------------

@pytest.mark.parametrize("kind", ["milvus", "parquet"])
def test_lost_sync_state_is_rebuilt_from_the_destination(tmp_path: Path, kind: str) -> None:
    job = job_at(tmp_path, DOCS[:10], kind)
    assert run(job)[0] == 0
    before = rows(tmp_path, kind)
    shutil.rmtree(tmp_path / ".embed-job")
    code, report, out = run(job)
    assert code == 5 and report["tokens_embedded"] == 0, out
    assert "rebuilt from the live generation" in out
    assert_same_store(rows(tmp_path, kind), before, min_cos=0.99999)
    # and it goes on incrementally: one changed document is all that is embedded
    edited = [dict(d) for d in DOCS[:10]]
    edited[4]["text"] += " One more sentence."
    code, report, out = run(job_at(tmp_path, edited, kind))
    assert code == 0 and report["docs_updated"] == 1 and report["docs_unchanged"] == 9, out
    record(CATEGORY, f"sync.sqlite lost, destination intact ({kind})",
           "state rebuilt from the destination (one line); nothing re-embedded",
           "exit 5, 0 tokens embedded; next day: 1 updated, 9 unchanged")


# -- 9. Destination lost, state intact -------------------------------------------------------

def test_lost_destination_is_rebuilt_with_mode_full(tmp_path: Path) -> None:
    """Child processes: a Lite db removed under a process that has it open is not gone."""
    job = job_at(tmp_path, DOCS[:10])
    assert cli(job).returncode == 0
    shutil.rmtree(tmp_path / "out.db")
    done = cli(job)
    line = one_line(done.stderr)
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 2 and "--mode full" in line and report["tokens_embedded"] == 0
    done = cli(job, "--mode", "full")
    assert done.returncode == 0 and "rebuilding it from scratch" in done.stderr, done.stderr
    assert_same_store(rows(tmp_path, "milvus"), fresh_rows(tmp_path / "fresh", DOCS[:10],
                                                           "milvus"))
    record(CATEGORY, "Lite db deleted, state intact",
           "one line naming --mode full; --mode full rebuilds",
           f"exit 2: {line[:80]}; then exit 0, index equals a fresh build")


def test_mode_on_the_command_line_is_never_silently_ignored(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:10])
    assert run(job, "--limit", "4")[0] == 0  # an unfinished incremental run
    code, _, out = run(job, "--mode", "full")
    line = one_line(out)
    assert code == 2 and "--restart" in line
    code, report, out = run(job, "--mode", "full", "--restart")
    assert code == 0 and report["mode"] == "full", out
    record(CATEGORY, "--mode full while an unfinished incremental run exists",
           "refused with one line (or applied with --restart), never ignored",
           f"exit 2: {line[:100]}")


# -- 2 and 8 on a real Milvus server --------------------------------------------------------

@pytest.mark.server
def test_server_keeps_foreign_collections_and_rebuilds_a_lost_state() -> None:
    from milvus_server import run_script_in_namespace
    from server_jobs import OK_LINE

    out = run_script_in_namespace(Path(__file__).with_name("server_jobs.py"), OK_LINE, 600)

    record(CATEGORY, "real Milvus server: hand-made t__my_backup, a second job, lost state",
           "foreign collections kept, second job refused, state rebuilt from the server",
           out.strip().splitlines()[-2][:150])
