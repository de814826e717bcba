"""``embed-job audit --repair``: each fault planted behind the product's back is mended by the
product's own incremental run (real MiniLM, real Parquet and Milvus Lite), a following audit
exits 0, the documents that were fine are neither embedded again nor deleted, and no
Parquet file is modified in place."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import invoke, run
from helpers.jobs import REPO, SMALL_DOCS, small_job, write_jsonl
from helpers.planted import copied_job, published_files, with_value
from helpers.rows import milvus_state_in_subprocess, parquet_rows, published_version

from pipeline.errors import EXIT_AUDIT_MISMATCH


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = small_job(tmp_path_factory.mktemp("repair-built"), "parquet")
    run(job, process=True, expect={0})
    return job


# each fault planted in the published version's files (behind the product's back); returns
# the documents it concerns, and whether they are in the source (re-embedded) or not (deleted)
def _deleted_row(files: list[Path]) -> tuple[set[str], bool]:
    table = pq.read_table(files[0])
    pq.write_table(table.slice(1), files[0])  # a chunk lost: its document's count is wrong
    return {table.column("doc_id")[0].as_py()}, True


def _orphan_row(files: list[Path]) -> tuple[set[str], bool]:
    ghost = with_value(with_value(pq.read_table(files[0]).slice(0, 1), "doc_id", 0, "ghost"), "pk", 0, "ghost-pk")
    pq.write_table(ghost, files[0].with_name("zz-ghost.parquet"))
    return {"ghost"}, False


def _stale_hash(files: list[Path]) -> tuple[set[str], bool]:
    table = pq.read_table(files[1])
    pq.write_table(with_value(table, "doc_hash", 2, "0" * 16), files[1])
    return {table.column("doc_id")[2].as_py()}, True


def _duplicate(files: list[Path]) -> tuple[set[str], bool]:
    shutil.copy(files[-1], files[-1].with_name("zz-copy.parquet"))  # every key of it twice
    return set(pq.read_table(files[-1]).column("doc_id").to_pylist()), True


def _duplicate_chunk(files: list[Path]) -> tuple[set[str], bool]:
    row = pq.read_table(files[1]).slice(0, 1)  # a chunk again, under a key the job never makes
    pq.write_table(with_value(row, "pk", 0, "planted-pk"), files[1].with_name("zz-dup.parquet"))
    return {row.column("doc_id")[0].as_py()}, True


def _bad_vector(files: list[Path]) -> tuple[set[str], bool]:
    table = pq.read_table(files[0])
    vectors = table.column("vector").to_pylist()
    vectors[4] = [2 * x for x in vectors[4]]  # not of unit length
    i = table.schema.get_field_index("vector")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(vectors, table.schema.field(i).type)),
                   files[0])
    return {table.column("doc_id")[4].as_py()}, True


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _repair(job: Path, expect: int = 0, process: bool = False) -> dict:
    done = invoke("audit", str(job), "--repair", "--json", process=process)
    assert done.exit_code == expect, done.output
    assert "Traceback" not in done.stderr and "WARNING" not in done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("plant", [_deleted_row, _orphan_row, _stale_hash, _duplicate,
                                   _duplicate_chunk, _bad_vector])
def test_parquet_each_fault_is_repaired_and_only_its_documents_are_touched(
        built: Path, tmp_path: Path, plant: Callable[[list[Path]], tuple[set[str], bool]]):
    job = copied_job(built, tmp_path)
    clean = parquet_rows(job.parent / "vectors")
    docs, in_source = plant(published_files(job))
    live = published_version(job.parent / "vectors")
    assert live is not None
    planted = _digests(live)

    result = _repair(job)
    assert not result["before"]["ok"] and result["after"]["ok"] and result["ok"]
    plan, report = result["repair"], result["repair"]["run"]
    if in_source:
        assert plan["reembed"] == len(docs) and set(plan["first"]["reembed"]) == docs
        # exactly those documents' chunks were embedded, nothing else
        chunks = sum(1 for r in clean.values() if r["doc_id"] in docs)
        assert report["chunks_embedded"] == chunks and report["docs_updated"] == len(docs)
    else:
        assert plan["delete"] == 1 and plan["first"]["delete"] == ["ghost"]
        assert report["chunks_embedded"] == report["batches_embedded"] == 0
    assert invoke("audit", str(job)).exit_code == 0

    # a new version, CURRENT switched; the audited one untouched, byte for byte, and kept
    now = published_version(job.parent / "vectors")
    assert now != live and _digests(live) == planted
    rows = parquet_rows(job.parent / "vectors")  # fails on a duplicate key
    assert rows.keys() == clean.keys()  # no document that was fine is deleted, no row planted stays
    for pk, row in clean.items():
        if row["doc_id"] not in docs:  # not embedded again: the very same vector
            assert (rows[pk]["vector"] == row["vector"]).all(), pk


def test_a_document_gone_from_the_source_is_kept_without_delete_missing(built, tmp_path):
    job = copied_job(built, tmp_path)
    gone = SMALL_DOCS[3]["id"]
    write_jsonl(job.parent / "corpus.jsonl", [d for d in SMALL_DOCS if d["id"] != gone])
    done = invoke("audit", str(job), "--repair")
    assert done.exit_code == EXIT_AUDIT_MISMATCH, done.output
    assert "sync.delete_missing is off" in done.output and gone in done.output
    assert any(r["doc_id"] == gone for r in parquet_rows(job.parent / "vectors").values())


def test_nothing_to_repair_exits_0_and_writes_nothing(built, tmp_path):
    job = copied_job(built, tmp_path)
    live = published_version(job.parent / "vectors")
    result = _repair(job)
    assert result["ok"] and result["repair"] is None
    assert published_version(job.parent / "vectors") == live


def test_refusals_are_one_line_and_change_nothing(built, tmp_path):
    job = copied_job(built, tmp_path)
    _deleted_row(published_files(job))
    live = published_version(job.parent / "vectors")
    digests = _digests(live)
    text = job.read_text()
    job.write_text(text.replace("max_tokens: 128", "max_tokens: 100"))  # another fingerprint
    done = invoke("audit", str(job), "--repair")
    assert done.exit_code == 2
    line, = done.stderr.strip().splitlines()
    assert "settings changed" in line and "run the job" in line
    job.write_text(text)
    run(job, "--limit", "2", expect={0})  # a trial run: unfinished, beside the live generation
    done = invoke("audit", str(job), "--repair")
    assert done.exit_code == 2
    line, = done.stderr.strip().splitlines()
    assert "unfinished run" in line
    assert published_version(job.parent / "vectors") == live and _digests(live) == digests


_PLANT_MILVUS = """
import sys; sys.path.insert(0, %r)
from pymilvus import MilvusClient
c = MilvusClient(%r); c.load_collection('t')
rows = c.query('t', filter='doc_id in ["py-array", "py-argparse"]', output_fields=['*'])
c.delete('t', filter='doc_id == "py-aifc"')                    # a document lost
ghost = dict(rows[0], doc_id='ghost', pk='ghost-pk')             # an orphan row
stale = dict(next(r for r in rows if r['doc_id'] == 'py-array'), doc_hash='0' * 16)
c.upsert('t', [stale])                                           # a stale hash
dup = dict(next(r for r in rows if r['doc_id'] == 'py-argparse'), pk='planted-pk')
c.insert('t', [ghost, dup])                                      # a chunk under a foreign key
c.flush('t'); c.close()
"""  # noqa: UP031


def test_milvus_lite_faults_are_repaired_in_place(tmp_path):
    job = small_job(tmp_path)
    run(job, process=True, expect={0})
    clean, collection, _ = milvus_state_in_subprocess(tmp_path / "out.db", "t")
    # Milvus Lite keeps a db open in a process until it exits: plant, repair, read in children
    subprocess.run([sys.executable, "-c", _PLANT_MILVUS % (str(REPO / "tests"), str(tmp_path / "out.db"))],
                   check=True, capture_output=True)
    result = _repair(job, process=True)
    before = result["before"]["findings"]
    assert before["missing_documents"]["first"] == ["py-aifc"]
    assert before["orphan_rows"]["count"] == 1 and before["stale_rows"]["count"] == 1
    assert before["duplicate_chunks"]["count"] == 1
    touched = {"py-aifc", "py-array", "py-argparse"}
    assert set(result["repair"]["first"]["reembed"]) == touched
    assert result["repair"]["first"]["delete"] == ["ghost"]
    assert result["after"]["ok"]
    assert invoke("audit", str(job), process=True).exit_code == 0
    rows, now, _ = milvus_state_in_subprocess(tmp_path / "out.db", "t")
    assert now == collection and rows.keys() == clean.keys()
    chunks = sum(1 for r in clean.values() if r["doc_id"] in touched)
    assert result["repair"]["run"]["chunks_embedded"] == chunks
    for pk, row in clean.items():
        if row["doc_id"] not in touched:
            assert (rows[pk]["vector"] == row["vector"]).all(), pk
