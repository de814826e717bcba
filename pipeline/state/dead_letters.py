"""The dead-letter file: every row or chunk that could not be embedded, and why."""

from __future__ import annotations

import json
import threading
from collections import Counter
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

    def chunk_failures(self) -> Counter[str]:
        """Chunks planned but not stored, per document: dead-lettered at embedding time
        (they name a chunk)."""
        return Counter(doc for doc, index in {(k[0], k[2]) for k in self._seen
                                              if k[2] is not None})

    def start_over(self) -> None:
        """The whole plan is made again: its letters will be found again, so the file starts
        afresh (the old one kept beside it, as at the start of a run)."""
        with self._lock:
            self.rotate(self.path)
            self._seen.clear()
            self.count = self.added = 0

    def reasons(self) -> Counter[str]:
        """How many dead letters gave each reason."""
        return Counter(key[3] for key in self._seen)

    def rows(self) -> int:
        """Rows and documents with a dead letter (a document with several failed chunks
        counts once)."""
        return len({key[:2] if key[2] is not None else key for key in self._seen})

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
