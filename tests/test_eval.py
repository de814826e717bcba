"""``embed-job eval``: real MiniLM over the demo corpus in Milvus Lite, with the labelled
queries of tests/data/demo_queries.jsonl (written about the corpus's topics), a BEIR layout
of the same, and the self-retrieval sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import invoke, run
from helpers.jobs import DEMO_CORPUS, REPO, make_job

DOCS = [json.loads(line) for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines()]
QUERIES = REPO / "tests" / "data" / "demo_queries.jsonl"


# the session's demo index in Milvus Lite (HNSW: an approximate index to measure)
MILVUS = pytest.mark.parametrize("demo_index", ["milvus"], indirect=True)


def _eval(job: Path, *args: str) -> dict:
    done = invoke("eval", str(job), "--json", *args)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


@MILVUS
def test_labelled_queries_give_stable_figures_and_the_dimension_trend(demo_index):
    a = _eval(demo_index, "--queries", str(QUERIES), "--dims", "64,128,256,384")
    assert a["kind"] == "labelled" and a["queries"] == 20
    full = a["by_dimension"]["384"]
    assert full["recall"] >= 0.8 and full["mrr"] >= 0.6 and 0 < full["ndcg"] <= 1
    ndcg = [a["by_dimension"][d]["ndcg"] for d in ("64", "128", "256", "384")]
    for smaller, larger in zip(ndcg, ndcg[1:]):
        assert smaller <= larger + 0.05  # fewer dimensions never clearly better
    assert ndcg[0] < ndcg[-1]  # and 64 of 384 costs quality
    b = _eval(demo_index, "--queries", str(QUERIES), "--dims", "64,128,256,384")
    assert a == b  # the same index and queries give the same figures
    assert 0.9 <= a["index_recall_vs_exact"] <= 1.0


@MILVUS
def test_a_beir_directory_is_read_as_the_jsonl(demo_index, tmp_path):
    rows = [json.loads(line) for line in QUERIES.read_text().splitlines()]
    (tmp_path / "qrels").mkdir()
    (tmp_path / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n" for i, r in enumerate(rows)))
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d}\t1\n" for i, r in enumerate(rows) for d in r["relevant"]))
    beir = _eval(demo_index, "--queries", str(tmp_path))
    labelled = _eval(demo_index, "--queries", str(QUERIES))
    assert beir["by_dimension"] == labelled["by_dimension"]


@MILVUS
def test_without_queries_it_samples_self_retrieval_and_says_so(demo_index):
    done = invoke("eval", str(demo_index), "--sample", "30")
    assert done.exit_code == 0, done.output
    assert "30 self-retrieval queries" in done.stdout and "recall@10" in done.stdout
    result = _eval(demo_index, "--sample", "30")
    assert result["kind"] == "self-retrieval" and result["by_dimension"]["384"]["recall"] >= 0.8


def test_exact_search_is_brute_force():
    from pipeline.run.retrieval import exact_top
    from pipeline.sinks.base import ScannedRows

    rng = np.random.default_rng(0)
    stored = rng.normal(size=(50, 8)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    queries = stored[:3] + 0.1 * rng.normal(size=(3, 8)).astype(np.float32)
    batches = [ScannedRows([f"p{i}" for i in range(s, s + 20)], [f"d{i}" for i in range(s, s + 20)],
                           list(range(s, s + 20)), ["h"] * 20, stored[s:s + 20])
               for s in (0, 20, 40)]
    batches[-1] = ScannedRows(*(x[:10] for x in (batches[-1].pks, batches[-1].doc_ids,
                                                 batches[-1].chunk_indexes,
                                                 batches[-1].doc_hashes)), stored[40:50])
    got = exact_top(iter(batches), queries, [None, 4], depth=5)
    for d in (None, 4):
        s, q = stored[:, :d], queries[:, :d]
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        want = np.argsort(-(q @ s.T), axis=1)[:, :5]
        assert [[h[1] for h in hits] for hits in got[d]] == want.tolist()


@MILVUS
def test_a_bad_queries_file_is_one_line(demo_index, tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"query": "x"}\n')
    done = invoke("eval", str(demo_index), "--queries", str(bad))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "line 1" in line and "relevant" in line
    done = invoke("eval", str(demo_index), "--dims", "999")
    assert done.exit_code == 2 and "stores 384 dimensions" in done.output


def test_the_publish_gate_blocks_a_bad_generation_and_lets_a_good_one_through(tmp_path):
    from helpers.rows import published_version

    gate = {"min_recall_at_10": 0.8, "sample": 30}
    settings = {"chunking": {"max_tokens": 256, "overlap_tokens": 32},
                "batching": {"token_budget": 8192, "max_batch_size": 64},
                "sink": {"kind": "parquet", "path": "vectors"}}
    docs = DOCS[:40]
    job = make_job(tmp_path, docs, **settings)
    run(job, process=True, expect={0})
    first = published_version(tmp_path / "vectors")
    job = make_job(tmp_path, docs, model={"dimension": 4}, sync={"publish_gate": gate},
                   **settings)
    blocked = run(job, process=True, expect={2})
    line, = [x for x in blocked.stderr.splitlines() if x.startswith("error")]
    assert "sync.publish_gate" in line and "< min_recall_at_10 0.8" in line
    assert published_version(tmp_path / "vectors") == first  # readers (this process) stay
    assert blocked.report["extra"]["publish_gate"]["by_dimension"]["4"]["recall"] < 0.8
    low = blocked.report["extra"]["publish_gate"]["agreement_at_10"]  # before the next run's report
    job = make_job(tmp_path, docs, model={"dimension": 256}, sync={"publish_gate": gate},
                   **settings)
    passed = run(job, "--restart", process=True, quiet=False, expect={0})  # the blocked build is dropped
    assert published_version(tmp_path / "vectors") != first
    assert passed.report["extra"]["publish_gate"]["by_dimension"]["256"]["recall"] >= 0.8
    # old vs new agreement on a model change: informational, beside the gate's figures
    high = passed.report["extra"]["publish_gate"]["agreement_at_10"]
    assert low["previous"] == high["previous"] == first.name
    assert low["chunks"] == high["chunks"] == 30  # every sampled chunk is in both generations
    assert 0 <= low["at_10"] < 0.5 < high["at_10"] <= 1  # 4 of 384 dimensions vs 256 of 384
    assert f"agreement@10 with {first.name}: {high['at_10']:.3f} on 30 chunks" in passed.stderr
    second = published_version(tmp_path / "vectors")
    job = make_job(tmp_path, docs, model={"dimension": 128},
                   sync={"publish_gate": {**gate, "min_agreement_at_10": 0.99}}, **settings)
    blocked = run(job, process=True, expect={2})
    line, = [x for x in blocked.stderr.splitlines() if x.startswith("error")]
    assert "< min_agreement_at_10 0.99 on 30 chunks" in line and second.name in line
    assert published_version(tmp_path / "vectors") == second


def test_agreement_is_the_overlap_of_each_chunks_neighbours_in_both_generations():
    from pipeline.run.agreement import agreement_at_10
    from pipeline.sinks.base import ScannedRows, Searchable

    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    class Two(Searchable):
        """Two generations of 40 chunks (keys differ, as between generations); "new" has
        one chunk "old" lacks."""

        def __init__(self):
            base = unit(rng.normal(size=(41, 8)))
            self.rows = {"old": (base[:40], [f"o{i}" for i in range(40)]),
                         "new": (unit(base + 0.3 * rng.normal(size=base.shape)),
                                 [f"n{i}" for i in range(41)])}

        def search(self, vectors, k, generation=None):
            raise AssertionError("exact search only")

        def scan(self, generation=None):
            vectors, pks = self.rows[generation]
            n = len(pks)
            for s in range(0, n, 16):
                yield ScannedRows(pks[s:s + 16], [f"d{i // 4}" for i in range(s, min(n, s + 16))],
                                  [i % 4 for i in range(s, min(n, s + 16))], ["h"] * len(pks[s:s + 16]),
                                  vectors[s:s + 16])

    two = Two()
    same = agreement_at_10(two, "old", "old", sample=100)
    assert same.chunks == 40 and same.at_10 == 1.0
    got = agreement_at_10(two, "new", "old", sample=100)
    assert got.chunks == 40 and got.previous == "old"  # the 41st chunk is not in "old"
    want = []
    for name in ("new", "old"):
        v = two.rows[name][0]
        scores = v[:40] @ v.T  # in "new", the 41st chunk may be a neighbour
        scores[np.arange(40), np.arange(40)] = -np.inf  # the chunk itself is left out
        want.append([set(row[:10].tolist()) for row in np.argsort(-scores, axis=1)])
    expected = np.mean([len(a & b) / 10 for a, b in zip(*want)])
    assert got.at_10 == pytest.approx(expected, abs=1e-4) and got.at_10 < 1
    assert agreement_at_10(two, "new", "old", sample=5).chunks <= 5


@MILVUS
def test_plot_draws_quality_against_dimension(demo_index, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    png = tmp_path / "dims.png"
    done = invoke("eval", str(demo_index), "--queries", str(QUERIES), "--dims", "64,128,full",
                  "--plot", str(png))
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().endswith(f"plot: {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape
    assert width > 600 and height > 400
    done = invoke("eval", str(demo_index), "--plot", str(tmp_path / "no" / "dims.png"))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "is not a directory" in line


def test_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path):
    job = make_job(tmp_path, DOCS[:2])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    done = invoke("eval", str(job), "--plot", str(tmp_path / "dims.png"))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "pip install matplotlib" in line
    assert not (tmp_path / "dims.png").exists()
