"""``embed-job audit``: a built index matches its source (exit 0); each fault planted behind
the product's back is found, counted and named (exit 7)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers.cli import invoke, run
from helpers.jobs import REPO, small_job
from helpers.planted import copied_job, published_files, with_value

from pipeline.errors import EXIT_AUDIT_MISMATCH
from pipeline.job.load import load_job


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = small_job(tmp_path_factory.mktemp("audit-built"), "parquet")
    run(job, process=True, expect={0})
    return job


def _audit(job: Path, expect: int) -> dict:
    done = invoke("audit", str(job), "--json")
    assert done.exit_code == expect, done.output
    return json.loads(done.stdout)


def _rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def test_a_built_index_matches_its_source(built):
    result = _audit(built, 0)
    assert result["ok"] and result["rows"] == result["chunks_expected"] > 0
    assert result["documents"] == 14
    assert all(f["count"] == 0 for f in result["findings"].values())


def _doc_of(table: pa.Table, row: int) -> str:
    return table.column("doc_id")[row].as_py()


def test_a_deleted_document_is_missing(built, tmp_path):
    job = copied_job(built, tmp_path)
    first = pq.read_table(published_files(job)[0])
    gone = _doc_of(first, 0)
    for path in published_files(job):
        _rewrite(path, lambda t: t.filter(pc.not_equal(t.column("doc_id"), gone)))
    f = _audit(job, EXIT_AUDIT_MISMATCH)["findings"]
    assert f["missing_documents"] == {"count": 1, "first": [gone]}
    assert f["orphan_rows"]["count"] == f["stale_rows"]["count"] == 0


def test_a_deleted_chunk_an_orphan_a_stale_hash_a_duplicate_and_a_bad_vector(built, tmp_path):
    job = copied_job(built, tmp_path)
    files = published_files(job)
    table = pq.read_table(files[0])
    lost = f"{_doc_of(table, 1)}#{table.column('chunk_index')[1].as_py()}"
    # a chunk deleted (row 1), a stale hash (row 2), a vector not of unit length (row 3)
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    vectors[3] *= 2
    changed = with_value(table, "doc_hash", 2, "0" * 16)
    changed = changed.set_column(changed.schema.get_field_index("vector"), "vector",
                                 pa.FixedSizeListArray.from_arrays(
                                     pa.array(vectors.reshape(-1)), vectors.shape[1]))
    stale = f"{_doc_of(table, 2)}#{table.column('chunk_index')[2].as_py()}"
    bad = f"{_doc_of(table, 3)}#{table.column('chunk_index')[3].as_py()}"
    pq.write_table(changed.take([i for i in range(table.num_rows) if i != 1]), files[0])
    # an orphan: a row of a document the source does not have, in a file of its own
    ghost = with_value(with_value(table.slice(0, 1), "doc_id", 0, "ghost"), "pk", 0, "ghost-pk")
    pq.write_table(ghost, files[0].with_name("zz-ghost.parquet"))
    # a duplicate: a file copied under another name
    shutil.copy(files[-1], files[-1].with_name("zz-copy.parquet"))
    dupes = pq.read_table(files[-1]).num_rows
    result = _audit(job, EXIT_AUDIT_MISMATCH)
    f = result["findings"]
    assert f["orphan_rows"] == {"count": 1, "first": [f"ghost#{table.column('chunk_index')[0]}"]}
    assert f["stale_rows"] == {"count": 1, "first": [stale]}
    assert f["bad_vectors"]["count"] == 1 and f["bad_vectors"]["first"] == [bad]
    assert f["duplicate_keys"]["count"] == dupes
    assert f["chunk_counts"]["count"] >= 1 and lost.split("#")[0] in f["chunk_counts"]["first"]
    assert f["missing_documents"]["count"] == 0


def test_chunks_in_the_dead_letter_file_are_expected_absent(built, tmp_path):
    job = copied_job(built, tmp_path)
    path = published_files(job)[0]
    table = pq.read_table(path)
    doc, index = _doc_of(table, 0), table.column("chunk_index")[0].as_py()
    pq.write_table(table.slice(1), path)
    assert _audit(job, EXIT_AUDIT_MISMATCH)["findings"]["chunk_counts"]["first"] == [doc]
    letters = load_job(job).dead_letter_file
    letters.write_text(json.dumps({"doc_id": doc, "source": "x", "reason": "unfit",
                                   "chunk_index": index}) + "\n")
    result = _audit(job, 0)
    assert result["dead_letters"] == 1


def test_before_any_run_it_is_one_line(tmp_path):
    job = small_job(tmp_path, "parquet")
    done = invoke("audit", str(job))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "nothing published yet" in line


def test_milvus_lite_a_document_deleted_behind_the_back(tmp_path):
    job = small_job(tmp_path)
    run(job, process=True, expect={0})
    # Milvus Lite keeps a db open in a process until it exits: plant and audit in children
    code = ("import sys; sys.path.insert(0, %r)\n"  # noqa: UP031
            "from pymilvus import MilvusClient\n"
            "c = MilvusClient(%r); c.load_collection('t')\n"
            "c.delete('t', filter='doc_id == \"py-aifc\"'); c.flush('t'); c.close()\n"
            % (str(REPO / "tests"), str(tmp_path / "out.db")))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    done = invoke("audit", str(job), "--json", process=True)
    assert done.exit_code == EXIT_AUDIT_MISMATCH, done.stderr
    f = json.loads(done.stdout)["findings"]
    assert f["missing_documents"] == {"count": 1, "first": ["py-aifc"]}
    assert "Traceback" not in done.stderr and "WARNING" not in done.stderr
