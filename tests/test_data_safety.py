"""Data safety: the job touches only what it created, and never calls an incomplete index
complete. Real Milvus Lite and real Parquet; every case ends by comparing the destination
with a fresh build (or with what was there before), and records a row of docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from helpers.cli import ledger, run
from helpers.jobs import demo_docs, make_job, state_dir, write_jsonl
from helpers.rows import assert_same_store, milvus_collections, published_version, stored_rows
from reliability import record

from pipeline.plan.store import PlanStore

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


def fresh_rows(tmp: Path, docs: list[dict], kind: str, **extra) -> dict[str, dict]:
    job = job_at(tmp, docs, kind, **extra)
    done = run(job)
    assert done.exit_code == 0, done.output
    return stored_rows(job)


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
    done = run(job)
    assert done.exit_code == 0, done.output
    assert "6 entries this job did not write" in done.output and "left alone" in done.output
    # a model change with keep_previous 0: the job's own first version goes, nothing else
    first_version = published_version(tmp_path)
    job = job_at(tmp_path, DOCS[:6], "parquet", sink={"path": ".", "rows_per_file": 20},
                 chunking={"max_tokens": 48, "overlap_tokens": 0}, sync={"keep_previous": 0})
    done = run(job)
    assert done.exit_code == 0, done.output
    for name in ("venv", "vendor", "very_important_backup"):
        assert (tmp_path / name / "keep.txt").read_text() == "mine"
    assert not first_version.exists()
    assert published_version(tmp_path).is_dir()
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


def test_milvus_never_drops_collections_it_did_not_create(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    assert run(job).exit_code == 0
    _hand_made_collection(tmp_path / "out.db", "t__my_backup")
    job = job_at(tmp_path, DOCS[:6], chunking={"max_tokens": 48, "overlap_tokens": 0},
                 sync={"keep_previous": 0})
    done = run(job)
    assert done.exit_code == 0, done.output
    collections = milvus_collections(tmp_path / "out.db")
    assert collections == sorted(["t__my_backup", done.report["target"]])
    record(CATEGORY, "hand-made collection t__my_backup beside the job's generations",
           "kept; only the job's own previous generation dropped",
           f"exit 0; collections after a model change: {collections}")


def test_second_job_on_the_same_collection_is_refused_before_embedding(tmp_path: Path) -> None:
    a = job_at(tmp_path / "a", DOCS[:6], sink={"uri": "../shared.db"})
    assert run(a).exit_code == 0
    before = stored_rows(a)
    # another job (own name, own checkpoint dir), other dimension, same collection name
    b = job_at(tmp_path / "b", DOCS[6:12], name="other", model={"dimension": 128},
               sink={"uri": "../shared.db"})
    done = run(b)
    line = one_line(done.output)
    assert done.exit_code == 2 and "made by job 't'" in line and "sink.collection" in line, \
        done.output
    assert done.report["tokens_embedded"] == 0
    assert stored_rows(a).keys() == before.keys()
    assert run(a).exit_code == 5  # A is unharmed and still in sync
    record(CATEGORY, "two jobs, one collection name (different dimensions)",
           "the second refused up front, one line; the first's index untouched",
           f"exit {done.exit_code}, 0 tokens embedded: {line[:120]}")


def test_alias_name_taken_by_a_real_collection_is_refused_at_start(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    (tmp_path / "out.db").parent.mkdir(parents=True, exist_ok=True)
    _hand_made_collection(tmp_path / "out.db", "t")
    done = run(job)
    line = one_line(done.output)
    assert done.exit_code == 2 and "a collection named 't' exists" in line
    assert done.report["tokens_embedded"] == 0 and done.report["model_load_s"] == 0
    assert milvus_collections(tmp_path / "out.db") == ["t"]
    record(CATEGORY, "the alias name is already a real collection",
           "refused in the start phase (before the model loads), one line",
           f"exit {done.exit_code}, 0 tokens embedded: {line[:120]}")


# -- 3. A checkpoint dir holds one job's state ----------------------------------------------

def test_two_jobs_sharing_a_checkpoint_dir_are_refused(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:6])
    assert run(job).exit_code == 0
    spec = yaml.safe_load(job.read_text())
    write_jsonl(tmp_path / "other.jsonl", DOCS[6:12])
    other_source = tmp_path / "job2.yaml"
    other_source.write_text(yaml.safe_dump({**spec, "source": {"path": "other.jsonl"}}))
    done = run(other_source)
    line = one_line(done.output)
    assert done.exit_code == 2 and "--restart" in line and done.report["tokens_embedded"] == 0
    other_sink = tmp_path / "job3.yaml"
    other_sink.write_text(yaml.safe_dump({**spec, "sink": {**spec["sink"], "uri": "b.db"}}))
    done = run(other_sink)
    assert done.exit_code == 2 and "give it its own checkpoint_dir" in one_line(done.output)
    assert run(job).exit_code == 5  # the first job still owns its state
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
        assert run(job).exit_code == 0
        edited = [dict(d) for d in DOCS[:20]]
        edited[1]["text"] += " Edited for day two."
        job = job_at(tmp_path / "run", edited, kind, **sync)
    partial = run(job, "--limit", "12")  # an unfinished, acknowledged plan
    assert partial.exit_code == 0 and partial.report["status"] == "partial", partial.output
    final = [d for i, d in enumerate(DOCS[:20]) if i not in (2, 3, 4)] + DOCS[20:24]
    final[0] = {**final[0], "text": final[0]["text"] + " Changed while the run was stopped."}
    job = job_at(tmp_path / "run", final, kind, **sync)
    done = run(job)
    assert done.exit_code == 0 and "planned again" in done.output, done.output
    assert_same_store(stored_rows(job), fresh_rows(tmp_path / "fresh", final, kind, **sync))
    record(CATEGORY, f"source edited between a stopped run and its resume ({kind}, "
           f"{'nightly' if in_place else 'first build'})",
           "the change is found document by document; the changed part is planned again; "
           "the index equals a fresh build",
           f"exit 0; warning: {done.report['warnings'][0][:90]}")


def test_restart_of_an_unfinished_nightly_run_takes_its_writes_back(tmp_path: Path) -> None:
    job = job_at(tmp_path / "run", DOCS[:10])
    assert run(job).exit_code == 0
    grown = [dict(d) for d in DOCS[:10]]
    grown[1]["text"] += "\n\n" + DOCS[20]["text"]  # more chunks than published
    partial = run(job_at(tmp_path / "run", grown), "--limit", "4")
    assert partial.exit_code == 0 and partial.report["status"] == "partial", partial.output
    done = run(job_at(tmp_path / "run", DOCS[:10]), "--restart")
    assert done.exit_code == 0, done.output
    assert_same_store(stored_rows(job), fresh_rows(tmp_path / "fresh", DOCS[:10], "milvus"))
    record(CATEGORY, "--restart of an unfinished nightly run after its source was reverted",
           "what the discarded run wrote into the live index is taken back",
           f"exit 0; {done.report['docs_updated']} re-embedded; index equals a fresh build")


# -- 5. A missing or damaged plan window ---------------------------------------------------

@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_missing_or_damaged_plan_window_is_planned_again_never_published(
        tmp_path: Path, damage: str) -> None:
    job = job_at(tmp_path, DOCS[:20])
    killed = run(job, process=True, fault="before_publish@1:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    plan = PlanStore(state_dir(job).plan_dir)
    if damage == "delete":
        victim = plan.window_path(1)
        victim.unlink()
    else:  # the document records publishing reads: same size, one byte flipped
        victim = plan.docs_path(1)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    done = run(job)
    assert done.exit_code == 0 and victim.name in done.output, done.output
    assert_same_store(stored_rows(job), fresh_rows(tmp_path / "fresh", DOCS[:20], "milvus"))
    record(CATEGORY, f"plan window file {damage}d between planning and publish",
           "found by the manifest; planned again from that window; index complete",
           f"exit 0; {done.report['warnings'][0][:90]}")


# -- 6. Verification against the destination ---------------------------------------------

def test_verification_catches_a_lost_row_hidden_by_a_foreign_one(tmp_path: Path) -> None:
    from pymilvus import MilvusClient

    job = job_at(tmp_path, DOCS[:10])
    killed = run(job, process=True, fault="before_publish@1:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    target = ledger(job)["run"]["target"]
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
    done = run(job)
    line = one_line(done.output)
    assert done.exit_code == 2 and "verification failed" in line, done.output
    assert "t" not in _aliases(tmp_path / "out.db")
    record(CATEGORY, "a lost vector replaced by a foreign row (same total count)",
           "verification by doc_hash bucket refuses to publish; alias not created",
           f"exit {done.exit_code}: {line[:110]}")


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
    assert run(job).exit_code == 0
    everything = stored_rows(job).keys()
    # a torn line (no id can be read) and an emptied text (id known): nothing deleted
    lines = (tmp_path / "data" / "a.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    lines[2] = json.dumps({"id": DOCS[2]["id"], "text": " "})
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(lines) + "\n")
    done = run(job)
    assert done.exit_code in (0, 5) and done.report["docs_deleted"] == 0, done.output
    assert "no documents deleted" in done.output
    assert stored_rows(job).keys() == everything
    # fixed rows, but a file the published run read is gone: still nothing deleted...
    write_jsonl(tmp_path / "data" / "a.jsonl", DOCS[:6])
    (tmp_path / "data" / "b.jsonl").unlink()
    done = run(job)
    assert done.report["docs_deleted"] == 0 and "--accept-missing-files" in done.output, \
        done.output
    assert stored_rows(job).keys() == everything
    # ...until the user says it was removed on purpose
    done = run(job, "--accept-missing-files")
    assert done.exit_code == 0 and done.report["docs_deleted"] == 4, done.output
    assert {r["doc_id"] for r in stored_rows(job).values()} == {d["id"] for d in DOCS[:6]}
    record(CATEGORY, "delete_missing with a torn JSON line / an emptied text / a file gone",
           "no deletes (warned) until the source is read completely or the removal accepted",
           "0 deleted twice with warnings; 4 deleted with --accept-missing-files")


# -- 8. Lost local state, intact destination ------------------------------------------------

@pytest.mark.parametrize("kind", ["milvus", "parquet"])
def test_lost_sync_state_is_rebuilt_from_the_destination(tmp_path: Path, kind: str) -> None:
    job = job_at(tmp_path, DOCS[:10], kind)
    assert run(job).exit_code == 0
    before = stored_rows(job)
    shutil.rmtree(state_dir(job).root)
    done = run(job)
    assert done.exit_code == 5 and done.report["tokens_embedded"] == 0, done.output
    assert "rebuilt from the live generation" in done.output
    assert_same_store(stored_rows(job), before, min_cos=0.99999)
    # and it goes on incrementally: one changed document is all that is embedded
    edited = [dict(d) for d in DOCS[:10]]
    edited[4]["text"] += " One more sentence."
    done = run(job_at(tmp_path, edited, kind))
    report = done.report
    assert done.exit_code == 0 and report["docs_updated"] == 1 and report["docs_unchanged"] == 9, \
        done.output
    record(CATEGORY, f"sync.sqlite lost, destination intact ({kind})",
           "state rebuilt from the destination (one line); nothing re-embedded",
           "exit 5, 0 tokens embedded; next day: 1 updated, 9 unchanged")


# -- 9. Destination lost, state intact -------------------------------------------------------

def test_lost_destination_is_rebuilt_with_mode_full(tmp_path: Path) -> None:
    """Child processes: a Lite db removed under a process that has it open is not gone."""
    job = job_at(tmp_path, DOCS[:10])
    assert run(job, process=True).exit_code == 0
    shutil.rmtree(tmp_path / "out.db")
    done = run(job, process=True)
    line = one_line(done.stderr)
    assert done.exit_code == 2 and "--mode full" in line and done.report["tokens_embedded"] == 0
    done = run(job, "--mode", "full", process=True)
    assert done.exit_code == 0 and "rebuilding it from scratch" in done.stderr, done.stderr
    assert_same_store(stored_rows(job), fresh_rows(tmp_path / "fresh", DOCS[:10], "milvus"))
    record(CATEGORY, "Lite db deleted, state intact",
           "one line naming --mode full; --mode full rebuilds",
           f"exit 2: {line[:80]}; then exit 0, index equals a fresh build")


def test_mode_on_the_command_line_is_never_silently_ignored(tmp_path: Path) -> None:
    job = job_at(tmp_path, DOCS[:10])
    assert run(job, "--limit", "4").exit_code == 0  # an unfinished incremental run
    done = run(job, "--mode", "full")
    line = one_line(done.output)
    assert done.exit_code == 2 and "--restart" in line
    done = run(job, "--mode", "full", "--restart")
    assert done.exit_code == 0 and done.report["mode"] == "full", done.output
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
           next(line for line in out.splitlines() if line.startswith("collections "))[:150])
