"""State written by the previous layout (commit 9cc33a9) still loads: its unfinished run is
shown by ``status`` and resumed by ``run``, and the result equals a fresh run of today's code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from helpers.cli import invoke, run
from helpers.rows import published_version

OLD_STATE = Path(__file__).parent / "fixtures" / "state-9cc33a9"


def _published(project: Path) -> dict[str, tuple[str, str, np.ndarray]]:
    """pk -> (doc id, text, vector) of the published Parquet version."""
    version = published_version(project / "vectors")
    assert version is not None
    table = pq.read_table(sorted(version.glob("*.parquet")))
    return {pk: (doc, text, np.asarray(vec, dtype=np.float32))
            for pk, doc, text, vec in zip(*(table[c].to_pylist()
                                           for c in ("pk", "doc_id", "text", "vector")))}


def test_an_unfinished_run_of_the_previous_layout_resumes_to_a_fresh_runs_result(
        tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(OLD_STATE, old)
    status = invoke("status", str(old / "job.yaml"), "--json", process=True)
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert shown["state"] == "in progress" and shown["run_mode"] == "incremental"
    assert shown["run_target"].startswith("v00003-") and 0 < shown["batches_done"]

    report = run(old / "job.yaml", process=True, expect=[0]).report
    assert report["status"] == "completed" and report["batches_skipped"] > 0  # resumed

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("job.yaml", "corpus.jsonl"):
        shutil.copy(OLD_STATE / name, fresh / name)
    run(fresh / "job.yaml", process=True, expect=[0])

    got, want = _published(old), _published(fresh)
    # documents gone from the source stay as the old version published them
    # (sync.delete_missing is off): the rest is exactly what a fresh run writes
    before = _published(OLD_STATE)
    corpus = {json.loads(line)["id"] for line in (OLD_STATE / "corpus.jsonl").open()}
    kept = {pk: row for pk, row in before.items() if row[0] not in corpus}
    assert {row[0] for row in kept.values()} == {"py-asyncore", "py-calendar"}
    want = {**want, **kept}
    assert got.keys() == want.keys()
    for pk, (doc, text, vector) in want.items():
        assert got[pk][:2] == (doc, text)
        np.testing.assert_allclose(got[pk][2], vector, atol=1e-5)
