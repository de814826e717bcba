"""The ledger: which planned batches the sink has acknowledged, durable across kills.

Written with an atomic replace after every acknowledgement, with a checksum so a torn or
edited file is detected instead of trusted. Batches of finished windows collapse into one
window number, so the file stays small however long the job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path, seal, unseal
from pipeline.errors import FingerprintMismatch, JobError
from pipeline.faults import fault_point
from pipeline.records import window_of
from pipeline.state.layout import checkpoint_file

FORMAT = 1


@dataclass
class Checkpoint:
    path: Path
    fingerprint: str
    done_windows: set[int] = field(default_factory=set)
    done_batches: dict[int, set[str]] = field(default_factory=dict)
    vectors_written: int = 0
    safe_token_budget: int | None = None
    run: dict[str, Any] = field(default_factory=dict)
    is_new: bool = True

    @classmethod
    def open(cls, directory: Path, fingerprint: str) -> Checkpoint:
        """Load the ledger of a previous run, or start an empty one.

        A ledger written by a job whose vectors would differ is refused: resuming would
        mix two embeddings under one index.
        """
        path = checkpoint_file(directory)
        if not path.exists():
            return cls(path=path, fingerprint=fingerprint)
        state = _read_verified(path)
        if state["fingerprint"] != fingerprint:
            raise FingerprintMismatch(
                f"{path}: checkpoint was written by a different job configuration "
                f"(fingerprint {state['fingerprint']} != {fingerprint}: model, dimension, pooling "
                f"or chunking changed); run with --restart to re-embed from scratch")
        return cls(
            path=path,
            fingerprint=fingerprint,
            done_windows=set(state["done_windows"]),
            done_batches={int(w): set(b) for w, b in state["done_batches"].items()},
            vectors_written=state["vectors_written"],
            safe_token_budget=state.get("safe_token_budget"),
            run=state.get("run", {}),
            is_new=False,
        )

    def is_done(self, batch_id: str) -> bool:
        w = window_of(batch_id)
        return w in self.done_windows or batch_id in self.done_batches.get(w, ())

    def window_done(self, window: int) -> bool:
        return window in self.done_windows

    def record(self, batch_ids: list[str], vectors: int) -> None:
        """Mark batches acknowledged by the sink, durably, before anything else happens."""
        for b in batch_ids:
            self.done_batches.setdefault(window_of(b), set()).add(b)
        self.vectors_written += vectors
        self.save()

    def close_window(self, window: int) -> None:
        """All of a window's batches are acknowledged: keep one number instead of their ids."""
        self.done_windows.add(window)
        self.done_batches.pop(window, None)
        self.save()

    def forget_from(self, window: int, lost: list[str],
                    batch_ids_of: Callable[[int], list[str]]) -> None:
        """Windows ``window`` on are planned again, and ``lost`` batches of earlier windows
        went with them in the destination: none of them is done any more."""
        self.done_windows = {w for w in self.done_windows if w < window}
        self.done_batches = {w: b for w, b in self.done_batches.items() if w < window}
        for w in sorted({window_of(b) for b in lost}):
            if w in self.done_windows:
                self.done_windows.discard(w)
                self.done_batches[w] = set(batch_ids_of(w))
            self.done_batches[w] = self.done_batches.get(w, set()) - set(lost)
        self.save()

    def save(self) -> None:
        body = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "done_windows": sorted(self.done_windows),
            "done_batches": {str(w): sorted(b) for w, b in sorted(self.done_batches.items())},
            "vectors_written": self.vectors_written,
            "safe_token_budget": self.safe_token_budget,
            "run": self.run,
        }
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(seal(body))
                fault_point("during_checkpoint_write")  # written, not yet renamed into place
        except OSError as e:
            # the previous checkpoint is intact (atomic replace): what it lists stays done
            raise JobError(f"{self.path}: cannot write the checkpoint ({e.strerror or e}); "
                           f"nothing acknowledged is lost — fix it and run again") from e


def _read_verified(path: Path) -> dict[str, Any]:
    body = unseal(path.read_bytes())
    if body is None:
        raise JobError(f"{path}: checkpoint is corrupt (checksum mismatch); refusing to guess "
                       f"what was written — run with --restart to start over")
    if body.get("format") != FORMAT:
        raise JobError(f"{path}: checkpoint format {body.get('format')} is not supported")
    return body


def read_state(directory: Path) -> dict[str, Any] | None:
    """The raw ledger, for `embed-job status` (verified, no fingerprint check)."""
    path = checkpoint_file(directory)
    return _read_verified(path) if path.exists() else None
