"""One contract, every sink kind: the memory sink, Parquet and Milvus Lite (real), each made by
its settings as a run makes it; and a sink plug-in from outside the product, run by the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.jobs import REPO, demo_docs, make_job
from helpers.sinks import DIM, stored

import pipeline.sinks.memory as memory
import pipeline.sinks.parquet as parquet
from pipeline.errors import SinkError
from pipeline.job.sections import SinkSettings
from pipeline.records import HASH_BUCKETS, make_batch_id
from pipeline.sinks.base import Destination, GenerationMark, VectorBatch
from pipeline.sinks.memory import MemorySinkConfig
from pipeline.sinks.parquet import ParquetSinkConfig

ALIAS = "chunks"
FP1, FP2 = "0123456789abcdef", "fedcba9876543210"
META = {"model": "m", "fingerprint": FP1}
ROWS = tuple[str, int, str]  # doc id, chunk index, doc hash


def doc_hash(doc_id: str, version: int = 1) -> str:
    return hashlib.sha256(f"{doc_id} v{version}".encode()).hexdigest()


def batch(window: int, index: int, chunks: list[tuple[str, int]], version: int = 1) -> VectorBatch:
    """A batch of plan window ``window`` holding these (doc id, chunk index) chunks."""
    rng = np.random.default_rng(window * 1000 + index)
    vectors = rng.standard_normal((len(chunks), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return VectorBatch(
        batch_id=make_batch_id(window, index),
        pks=[f"{doc}#{i}" for doc, i in chunks],
        doc_ids=[doc for doc, _ in chunks],
        chunk_indexes=[i for _, i in chunks],
        doc_hashes=[doc_hash(doc, version) for doc, _ in chunks],
        vectors=vectors,
        texts=[f"text of {doc} #{i}" for doc, i in chunks],
        metadata=[{"doc": doc} for doc, _ in chunks],
    )


def rows_of(*batches: VectorBatch) -> dict[str, ROWS]:
    return {pk: (doc, i, h) for b in batches
            for pk, doc, i, h in zip(b.pks, b.doc_ids, b.chunk_indexes, b.doc_hashes)}


def buckets(rows: dict[str, ROWS]) -> dict[str, int]:
    counts = Counter(h[0] for _, _, h in rows.values())
    return {b: counts[b] for b in HASH_BUCKETS}


# three chunks a batch, so Parquet (8 rows a file) holds batches of two windows in one file
W0 = [batch(0, 0, [("a", 0), ("a", 1), ("a", 2)]), batch(0, 1, [("b", 0), ("b", 1), ("c", 0)])]
W1 = [batch(1, 0, [("d", 0), ("d", 1), ("e", 0)]), batch(1, 1, [("f", 0), ("f", 1), ("f", 2)])]


class Kind:
    """A sink kind's settings, and sinks made from them as a run makes them."""

    def __init__(self, settings: SinkSettings, root: Path) -> None:
        self.settings, self.root = settings, root
        self.opened: list[Destination] = []

    def target(self, fingerprint: str = FP1, generation: int = 1) -> str:
        return self.settings.target_name(ALIAS, fingerprint, generation)

    def sink(self, target: str | None = None, base: str | None = None,
             mark: GenerationMark | None = None) -> Destination:
        sink = self.settings.make(lambda p: self.root / p, ALIAS, target or self.target(), base,
                                  META, mark)
        self.opened.append(sink)
        return sink

    def probe(self) -> Destination:
        return self.sink(ALIAS)


@pytest.fixture(params=["memory", "parquet", "milvus"])
def kind(request: pytest.FixtureRequest, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Kind]:
    monkeypatch.setattr(memory, "STORE", memory.MemoryStore())  # this test's own destination
    if request.param == "milvus":
        from pipeline.sinks.milvus import MilvusSinkConfig

        settings: SinkSettings = MilvusSinkConfig(uri="out/vectors.db")
    elif request.param == "parquet":
        settings = ParquetSinkConfig(path="out", rows_per_file=8)
    else:
        settings = MemorySinkConfig()
    made = Kind(settings, tmp_path)
    yield made
    for sink in made.opened:
        sink.close()


def write_all(sink: Destination, batches: list[VectorBatch],
              check: Callable[[list[str]], None] = lambda acked: None) -> list[str]:
    """Every batch, then complete; the ids acknowledged, in order."""
    acked: list[str] = []
    for b in batches:
        acked += sink.write(b)
        check(acked)
    acked += sink.on_write_complete()
    check(acked)
    return acked


def test_write_then_ack(kind: Kind) -> None:
    """Every batch is acknowledged exactly once, only once its rows are stored, and the target
    then holds exactly the rows written, counted as a whole and by doc_hash bucket."""
    sink = kind.sink()
    sink.on_write_start(DIM)
    batches = W0 + W1
    by_id = {b.batch_id: b for b in batches}

    def acked_are_stored(acked: list[str]) -> None:
        assert rows_of(*(by_id[b] for b in acked)).items() <= stored(sink).items()

    acked = write_all(sink, batches, acked_are_stored)
    assert sorted(acked) == sorted(by_id)
    assert stored(sink) == rows_of(*batches)
    assert sink.count() == 12
    assert sink.count_by_bucket() == buckets(rows_of(*batches))


def test_resume_after_a_kill_redoes_without_duplicates(kind: Kind,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed mid-write whose last acknowledgement never reached the ledger: the next
    one writes again from the first batch the ledger lacks, and the target holds every row
    once."""
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 1)  # Parquet: the open file is on disk
    batches = W0 + W1 + [batch(2, 0, [("g", 0), ("g", 1)])]
    killed = kind.sink()
    killed.on_write_start(DIM)
    acks = [killed.write(b) for b in batches[:4]]  # killed here: no complete, no close
    last = [ack for ack in acks if ack][-1]
    # the kill came between the sink's last acknowledgement and the ledger's record of it
    ledger = {b for ack in acks for b in ack} - set(last)
    redo = [b for b in batches if b.batch_id not in ledger]
    assert redo[0].batch_id == last[0]
    directory = kind.root / "out" / kind.target()
    if isinstance(kind.settings, ParquetSinkConfig):
        assert any(p.name.endswith(".tmp") for p in directory.iterdir())  # the torn file

    resumed = kind.sink()
    resumed.on_write_start(DIM)
    acked = write_all(resumed, redo)
    assert sorted(acked) == sorted(b.batch_id for b in redo)
    assert stored(resumed) == rows_of(*batches)
    assert resumed.count() == 14
    if isinstance(kind.settings, ParquetSinkConfig):  # the redone file replaced, no temp
        assert sorted(p.name for p in directory.iterdir()) == [
            "part-v00001-w00000-b000000.parquet", "part-v00001-w00001-b000001.parquet"]


def test_forget_takes_back_later_windows(kind: Kind) -> None:
    """``forget`` removes every row of windows from ``from_window`` on; rows of earlier
    batches it took along are returned, and writing those and the later windows again
    restores the target exactly."""
    first = kind.sink()
    first.on_write_start(DIM)
    write_all(first, W0 + W1)
    first.close()

    resumed = kind.sink()
    resumed.on_write_start(DIM)
    lost = resumed.forget(1, sorted({d for b in W1 for d in b.doc_ids}))
    assert set(lost) <= {b.batch_id for b in W0}
    kept = [b for b in W0 if b.batch_id not in lost]
    assert stored(resumed) == rows_of(*kept)
    assert resumed.count_by_bucket() == buckets(rows_of(*kept))

    again = [b for b in W0 if b.batch_id in lost] + W1
    write_all(resumed, again)
    assert stored(resumed) == rows_of(*W0, *W1)


def test_retire_after_an_incremental_run(kind: Kind) -> None:
    """A run building on the published generation writes the changed documents, then
    ``retire`` drops what the base held for them: the new target holds the unchanged rows,
    the new ones, and no stale chunk; retiring again changes nothing."""
    base = kind.target(FP1, 1)
    first = kind.sink(base)
    first.on_write_start(DIM)
    write_all(first, W0)
    first.publish()
    first.close()

    target = kind.target(FP1, 2)  # Milvus and memory: the same name, updated in place
    sink = kind.sink(target, base)
    sink.on_write_start(DIM)
    changed = batch(0, 0, [("a", 0)], version=2)  # a: 3 chunks -> 1, new content; b: removed
    write_all(sink, [changed])
    sink.retire([("a", 3, 1), ("b", 2, 0)])
    expected = rows_of(changed) | {"c#0": rows_of(*W0)["c#0"]}
    assert stored(sink) == expected
    sink.retire([("a", 3, 1), ("b", 2, 0)])
    assert stored(sink) == expected
    assert sink.count() == 2 and sink.count_by_bucket() == buckets(expected)


def test_publish_live_drop(kind: Kind) -> None:
    """Readers see a generation only once it is published; a later one replaces it; a
    generation no longer live can be dropped, twice; a discarded target is gone."""
    probe = kind.probe()
    t1, t2 = kind.target(FP1, 1), kind.target(FP2, 2)
    mark = GenerationMark("job", "state", FP1, 1)
    assert probe.live() is None and not probe.exists(t1)

    one = kind.sink(t1, mark=mark)
    one.on_write_start(DIM)
    write_all(one, W0)
    assert probe.exists(t1) and probe.mark_of(t1) == mark and probe.live() is None
    one.publish()
    one.publish()
    assert kind.probe().live() == t1
    assert sorted(probe.rows_of(t1)) == sorted(rows_of(*W0).values())

    two = kind.sink(t2)
    two.on_write_start(DIM)
    write_all(two, W1)
    two.publish()
    assert probe.live() == t2
    probe.drop(t1)
    probe.drop(t1)
    assert not probe.exists(t1) and probe.exists(t2)
    assert stored(two) == rows_of(*W1)

    abandoned = kind.sink(kind.target(FP1, 3))
    abandoned.on_write_start(DIM)
    write_all(abandoned, W0)
    abandoned.discard_target()
    assert not probe.exists(kind.target(FP1, 3)) and probe.live() == t2


@pytest.mark.parametrize("kind", ["memory", "milvus"], indirect=True)
def test_what_readers_see_is_never_rebuilt_in_place(kind: Kind) -> None:
    """The kinds that update one target per fingerprint in place refuse to discard or drop
    the published one, and to write vectors of another dimension into it."""
    sink = kind.sink()
    sink.on_write_start(DIM)
    sink.publish()
    with pytest.raises(SinkError, match="is published"):
        sink.discard_target()
    with pytest.raises(SinkError, match="has an alias"):
        sink.drop(kind.target())
    with pytest.raises(SinkError, match=f"vector dimension {DIM} != job dimension {DIM // 2}"):
        kind.sink().on_write_start(DIM // 2)
    assert kind.probe().live() == kind.target()


# ---------------------------------------------------------------- a plug-in from outside

PLUGIN = '''
"""A sink outside the product: the memory sink, appending every row it writes to a file."""

import json
from typing import Literal

from pipeline.sinks.memory import MemorySink, MemorySinkConfig


class RowsFileConfig(MemorySinkConfig):
    kind: Literal["rows_file"] = "rows_file"
    file: str

    def make(self, resolve, alias, target, base=None, file_metadata=None, mark=None):
        return RowsFileSink(resolve(self.file), target, alias=alias, mark=mark,
                            store_text=self.store_text)


class RowsFileSink(MemorySink):
    def __init__(self, path, target, **kwargs):
        super().__init__(target, **kwargs)
        self.path = path

    def write(self, batch):
        acked = super().write(batch)
        with open(self.path, "a", encoding="utf-8") as f:
            for pk, doc, i, v in zip(batch.pks, batch.doc_ids, batch.chunk_indexes,
                                     batch.vectors):
                f.write(json.dumps({"pk": pk, "doc_id": doc, "chunk_index": int(i),
                                    "vector": [float(x) for x in v]}) + "\\n")
        return acked
'''


def test_a_sink_plugin_outside_the_product(tmp_path: Path) -> None:
    """A module and its dist-info's entry point on PYTHONPATH are all a new sink kind needs:
    the real CLI runs a job with it, and every chunk arrives exactly once."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "rows_file_sink.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    info = plugins / "rows_file_sink-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rows-file-sink\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[embed_job.sinks]\nrows_file = rows_file_sink:RowsFileConfig\n")
    docs = demo_docs(8)
    job = make_job(tmp_path / "job", docs, sink={"kind": "rows_file", "file": "rows.jsonl"})

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EMBED_JOB_")},
           "PYTHONPATH": os.pathsep.join([str(plugins), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet",
                          "--report", "report.json"], cwd=job.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((job.parent / "report.json").read_text())

    rows = [json.loads(line) for line in (job.parent / "rows.jsonl").read_text().splitlines()]
    chunks = Counter((r["doc_id"], r["chunk_index"]) for r in rows)
    assert set(chunks.values()) == {1}, chunks.most_common(3)  # none written twice
    assert len({r["pk"] for r in rows}) == len(rows)
    per_doc = Counter(doc for doc, _ in chunks)
    assert set(per_doc) == {d["id"] for d in docs}
    assert all({i for d, i in chunks if d == doc} == set(range(n)) for doc, n in per_doc.items())
    assert max(per_doc.values()) > 1  # long documents were split, and every piece arrived
    assert report["status"] == "completed" and report["vectors_written"] == len(rows)
    assert report["vectors_in_target"] == len(rows)  # verified through the plug-in's count
    norms = np.linalg.norm(np.array([r["vector"] for r in rows], dtype=np.float32), axis=1)
    assert norms.shape == (len(rows),) and np.allclose(norms, 1.0, atol=1e-4)
