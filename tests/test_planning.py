"""The batcher and the plan files: budgets, order, padding accounting, resume coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.plan.batching import PlanRow, WindowBuilder, pack_batches
from pipeline.plan.store import PlanStore
from pipeline.records import make_batch_id, window_of


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=400), st.integers(600, 5000),
       st.integers(1, 64))
def test_pack_batches_respects_budget_and_size(lengths: list[int], budget: int, max_bs: int
                                               ) -> None:
    sorted_lengths = np.sort(np.asarray(lengths))
    bounds = pack_batches(sorted_lengths, budget, max_bs)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
    for s, e in bounds:
        assert 1 <= e - s <= max_bs
        assert (e - s) * sorted_lengths[e - 1] <= budget  # padded tokens within budget


def test_a_chunk_longer_than_the_budget_gets_a_batch_alone() -> None:
    assert pack_batches(np.array([10, 10, 900]), 500, 8) == [(0, 2), (2, 3)]


def _row(doc: str, i: int, n: int) -> PlanRow:
    return PlanRow(pk=f"{doc}-{i}", doc_id=doc, chunk_index=i, start=0, end=1,
                   token_ids=np.arange(n, dtype=np.int32), doc_hash="h", text=None,
                   metadata="{}", source=f"f:{doc}")


def test_window_is_sorted_and_padding_waste_is_exact(tmp_path: Path) -> None:
    builder = WindowBuilder(window=3, doc_start=10)
    lengths = [50, 7, 300, 7, 120, 64, 64, 9]
    for i, n in enumerate(lengths):
        builder.add([_row(f"d{i}", 0, n)], (f"d{i}", "h", 1))
    table, stats = builder.build(token_budget=256, max_batch_size=3)
    store = PlanStore(tmp_path)
    store.write_window(table, stats, builder.doc_records)

    batches = list(store.batches(3))
    seen = [n for b in batches for n in b.table["n_tokens"].to_pylist()]
    assert seen == sorted(lengths)  # corpus order replaced by length order
    assert [b.batch_id for b in batches] == [make_batch_id(3, i) for i in range(len(batches))]
    assert all(window_of(b.batch_id) == 3 for b in batches)
    padded = sum(b.padded_tokens for b in batches)
    assert stats.padded_tokens == padded
    assert stats.tokens == sum(lengths) == sum(b.n_tokens for b in batches)
    assert all(b.padded_tokens <= 256 or b.table.num_rows == 1 for b in batches)
    # hand-computed: [7,7,9] [50,64,64] [120] [300] -> 27 + 192 + 120 + 300 padded
    assert padded == 3 * 9 + 3 * 64 + 120 + 300
    assert (stats.doc_start, stats.doc_end, stats.window) == (10, 18, 3)
    assert store.stats(3) == stats
    assert [r[0] for r in store.doc_records(3)] == [f"d{i}" for i in range(8)]


def test_token_ids_round_trip_exactly(tmp_path: Path) -> None:
    builder = WindowBuilder(window=0, doc_start=0)
    ids = [np.array([5, 6, 7], np.int32), np.array([1], np.int32)]
    builder.add([PlanRow("a", "a", 0, 0, 1, ids[0], "h", "x", "{}", "s")], ("a", "h", 1))
    builder.add([PlanRow("b", "b", 0, 0, 1, ids[1], "h", "y", "{}", "s")], ("b", "h", 1))
    table, stats = builder.build(100, 10)
    store = PlanStore(tmp_path)
    store.write_window(table, stats, builder.doc_records)
    (batch,) = store.batches(0)
    assert batch.token_ids == [[1], [5, 6, 7]]


def test_windows_are_bounded_by_tokens_whatever_the_chunk_count(tmp_path: Path,
                                                                 minilm_dir: Path) -> None:
    """Host memory follows the window, so a window is cut by tokens as well as by chunks: long
    chunks cannot make a window of sort_window chunks arbitrarily large."""
    from helpers.jobs import demo_docs

    from pipeline.chunking import Chunker, ModelTokenizer
    from pipeline.job.sections import BatchingConfig, ChunkingConfig
    from pipeline.plan.build import build_plan
    from pipeline.records import Document

    docs = [Document(d["id"], d["text"], f"demo:{i}") for i, d in enumerate(demo_docs(30))]
    chunker = Chunker(ModelTokenizer.from_model_dir(minilm_dir, "mean"),
                      ChunkingConfig(max_tokens=256), 512)
    store = PlanStore(tmp_path / "plan")
    windows: list = []
    build_plan(iter(docs), chunker, store, BatchingConfig(window_tokens=2000, first_window=10_000),
               "fp", False, lambda letter: None, windows.append)
    longest_doc = max(sum(c.n_tokens for c in chunker.chunk(d)) for d in docs)
    assert store.complete and len(windows) >= 4
    assert sum(w.docs for w in windows) == len(docs)
    # a window closes at the first document that takes it to the bound
    assert all(w.tokens < 2000 + longest_doc for w in windows)
    assert all(w.tokens >= 2000 for w in windows[:-1])
