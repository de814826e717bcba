"""The embedding layer's resilience: splitting a batch to fit the device, and the budget
learnt from out-of-memory failures."""

from __future__ import annotations

from pipeline.embedders.resilient import SafeBudget, split_to_fit


def test_split_to_fit_and_safe_budget() -> None:
    seqs = [[0] * n for n in (10, 10, 20, 20, 40, 40, 80, 80)]
    parts = split_to_fit(seqs, 100)
    assert parts[0][0] == 0 and parts[-1][1] == len(seqs)
    assert all(len(seqs[s:e]) * max(len(x) for x in seqs[s:e]) <= 100 or e - s == 1
               for s, e in parts)
    budget = SafeBudget(None, ceiling=1000)
    budget.failed(800)
    assert budget.limit == 400
    for _ in range(31):
        assert not budget.succeeded()
    assert budget.succeeded() and budget.limit == 500  # grows back by a quarter
