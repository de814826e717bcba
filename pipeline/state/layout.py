"""Every file and folder of a job's checkpoint directory, named once.

    <checkpoint_dir>/
      lock                 one run at a time (flock; holds the pid)
      sync.sqlite          what the published generation holds; generations; identity
      dead_letters.jsonl   this run's dead letters (the last run's: dead_letters.previous.jsonl)
      run/                 the unfinished run, removed once it is published
        checkpoint.json    the ledger (acknowledged batches, the run's decision)
        plan/              manifest.json, window-NNNNN.parquet, docs-NNNNN.parquet
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def sync_db(self) -> Path:
        return self.root / "sync.sqlite"

    @property
    def dead_letters(self) -> Path:
        return self.root / "dead_letters.jsonl"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def checkpoint(self) -> Path:
        return checkpoint_file(self.run_dir)

    @property
    def plan_dir(self) -> Path:
        return plan_dir(self.run_dir)


def checkpoint_file(run_dir: Path) -> Path:
    """The ledger of the run in ``run_dir``."""
    return run_dir / "checkpoint.json"


def plan_dir(run_dir: Path) -> Path:
    """The plan of the run in ``run_dir``."""
    return run_dir / "plan"
