"""The dead-letter file: every row or chunk that could not be embedded, and why."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

from pipeline.records import DeadLetter


class DeadLetterFile:
    """Append-only JSONL, safe to share between the planner and the writer threads.

    A resumed run re-reads part of the source and meets the same bad rows again; entries
    already in the file are not written twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: set[tuple] = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self._seen.add(self._key(DeadLetter(**json.loads(line))))
                except (ValueError, TypeError):
                    continue  # a torn last line from a killed run
        self.count = len(self._seen)
        self.added = 0

    @staticmethod
    def rotate(path: Path) -> None:
        """A new run starts a new file; the last run's stays beside it as ``*.previous.jsonl``."""
        if path.exists():
            path.replace(path.with_suffix(".previous.jsonl"))

    @property
    def chunk_failures(self) -> int:
        """Chunks planned but not stored: dead-lettered at embedding time (they name a chunk)."""
        return sum(1 for key in self._seen if key[2] is not None)

    @staticmethod
    def _key(d: DeadLetter) -> tuple:
        return (d.doc_id, d.source, d.chunk_index, d.reason)

    def __call__(self, letter: DeadLetter) -> None:
        key = self._key(letter)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(letter), ensure_ascii=False) + "\n")
            self.count += 1
            self.added += 1
