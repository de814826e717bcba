"""Nightly re-indexing on real Milvus Lite and Parquet: a sync equals a fresh build."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from helpers.cli import run
from helpers.jobs import demo_docs, make_job, state_dir
from helpers.rows import assert_same_store, milvus_state_in_subprocess, stored_rows

ALL = demo_docs(24)
SYNC = {"chunking": {"max_tokens": 64, "overlap_tokens": 0},
        "sync": {"delete_missing": True}}
PARQUET = {"sink": {"kind": "parquet", "path": "v", "rows_per_file": 25}}


def day1() -> list[dict]:
    return [dict(d) for d in ALL[:20]]


def day2() -> list[dict]:
    """10% changed (one grows, one shrinks), 5% deleted, 5% new."""
    docs = day1()
    docs[3]["text"] = docs[3]["text"] + "\n\n" + ALL[22]["text"]   # grows
    docs[7]["text"] = docs[7]["text"][:120]                         # shrinks
    del docs[11]                                                    # deleted
    docs.append(ALL[21])                                            # new
    return docs


SYNCED = (0, 5)  # a sync that embedded something, or had nothing to do


@pytest.mark.parametrize("kind", ["milvus", "parquet"])
def test_day2_sync_equals_a_fresh_build_and_embeds_only_changes(tmp_path: Path, kind: str) -> None:
    extra = PARQUET if kind == "parquet" else {}
    job = make_job(tmp_path / "nightly", day1(), **SYNC, **extra)
    first = run(job, expect=SYNCED)
    assert first.exit_code == 0 and first.report["docs_added"] == 20
    job = make_job(tmp_path / "nightly", day2(), **SYNC, **extra)
    done = run(job, expect=SYNCED)
    second = done.report
    assert done.exit_code == 0 and second["outcome"] == "synced"
    assert (second["docs_added"], second["docs_updated"], second["docs_deleted"],
            second["docs_unchanged"]) == (1, 2, 1, 17)

    fresh_job = make_job(tmp_path / "fresh", day2(), **SYNC, **extra)
    run(fresh_job, expect=SYNCED)
    synced, fresh = stored_rows(job), stored_rows(fresh_job)
    assert_same_store(synced, fresh)
    changed = {ALL[3]["id"], ALL[7]["id"], ALL[21]["id"]}
    assert second["chunks_embedded"] == sum(1 for r in fresh.values() if r["doc_id"] in changed)
    assert ALL[11]["id"] not in {r["doc_id"] for r in synced.values()}


def test_unchanged_corpus_embeds_nothing_and_exits_5(tmp_path: Path) -> None:
    job = make_job(tmp_path, day1(), **SYNC)
    run(job, expect=SYNCED)
    done = run(job, "--prom", str(tmp_path / "sync.prom"), expect=SYNCED)
    report = done.report
    assert done.exit_code == 5 and report["outcome"] == "nothing_to_do"
    assert report["tokens_embedded"] == 0 and report["docs_unchanged"] == 20
    prom = (tmp_path / "sync.prom").read_text()
    assert 'embed_job_docs_unchanged{job="t"} 20' in prom
    assert 'embed_job_tokens_embedded{job="t"} 0' in prom


def test_full_mode_re_embeds_everything(tmp_path: Path) -> None:
    job = make_job(tmp_path, day1(), **SYNC)
    first = run(job, expect=SYNCED).report
    again = run(job, "--mode", "full", expect=SYNCED)
    assert again.exit_code == 0 and again.report["chunks_embedded"] == first["chunks"]
    assert len(stored_rows(job)) == first["chunks"]


def test_missing_documents_stay_unless_delete_missing(tmp_path: Path) -> None:
    keep = {"chunking": SYNC["chunking"], "sync": {"delete_missing": False}}
    job = make_job(tmp_path, day1(), **keep)
    run(job, expect=SYNCED)
    job = make_job(tmp_path, day1()[:10], **keep)
    done = run(job, expect=SYNCED)
    assert done.exit_code == 5 and done.report["docs_deleted"] == 0
    assert {r["doc_id"] for r in stored_rows(job).values()} == {d["id"] for d in day1()}


def test_dry_run_reports_and_writes_nothing(tmp_path: Path) -> None:
    job = make_job(tmp_path, day1(), **SYNC)
    run(job, expect=SYNCED)
    before = stored_rows(job)
    job = make_job(tmp_path, day2(), **SYNC)
    result = run(job, "--dry-run", quiet=False, report=False)
    assert result.exit_code == 0, result.output
    assert "would add 1, update 2, skip 17 unchanged; 1 deleted" in result.output
    assert stored_rows(job).keys() == before.keys()
    assert not state_dir(job).run_dir.exists()


def test_model_change_builds_a_new_collection_and_moves_the_alias_after_it(tmp_path: Path
                                                                           ) -> None:
    """Every run here is a child process, so the test can watch the alias between them."""
    db = tmp_path / "out.db"
    job = make_job(tmp_path, day1(), **SYNC)
    done = run(job, process=True)
    assert done.exit_code == 0
    first = done.report
    old_rows, target, _ = milvus_state_in_subprocess(db, "t")
    assert target == first["target"]
    changed = make_job(tmp_path, day1(), chunking={"max_tokens": 48, "overlap_tokens": 0},
                       sync={"delete_missing": True, "keep_previous": 1})
    # the rebuild is killed midway: readers still get the old collection through the alias
    killed = run(changed, process=True, fault="after_ack@3:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    rows_mid, target_mid, collections_mid = milvus_state_in_subprocess(db, "t")
    assert target_mid == first["target"] and rows_mid.keys() == old_rows.keys()
    assert len(collections_mid) == 2  # the half-built one exists, unpublished
    done = run(changed, process=True)
    assert done.exit_code == 0
    second = done.report
    new_rows, target_now, collections = milvus_state_in_subprocess(db, "t")
    assert target_now == second["target"] != first["target"]
    assert not new_rows.keys() & old_rows.keys()
    assert collections == sorted([first["target"], second["target"]])  # keep_previous: 1
    fresh = make_job(tmp_path / "fresh", day1(), chunking={"max_tokens": 48, "overlap_tokens": 0})
    run(fresh, expect=SYNCED)
    assert_same_store(new_rows, stored_rows(fresh))


@pytest.mark.parametrize("fault", ["after_embed@2", "after_ack@2"])
def test_kill_during_incremental_sync_then_rerun_equals_fresh_build(tmp_path: Path, fault: str
                                                                    ) -> None:
    job = make_job(tmp_path / "nightly", day1(), **SYNC)
    assert run(job, process=True).exit_code == 0
    job = make_job(tmp_path / "nightly", day2(), **SYNC)
    killed = run(job, process=True, fault=f"{fault}:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    assert run(job, process=True).exit_code == 0
    fresh = make_job(tmp_path / "fresh", day2(), **SYNC)
    run(fresh, expect=SYNCED)
    synced, _, _ = milvus_state_in_subprocess(tmp_path / "nightly" / "out.db", "t")
    assert_same_store(synced, stored_rows(fresh))
