"""The ledger: which planned batches the sink has acknowledged, durable across kills.

Written with an atomic replace after every acknowledgement, with a checksum so a torn or
edited file is detected instead of trusted. Batches of finished windows collapse into one
window number, so the file stays small however long the job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.atomic import atomic_path, seal, unseal
from pipeline.errors import FingerprintMismatch, JobError
from pipeline.faults import fault_point
from pipeline.records import window_of
from pipeline.state.layout import checkpoint_file

FORMAT = 1
Mode = Literal["full", "incremental"]


@dataclass(frozen=True)
class RunPlan:
    """The run's decision, made once when it starts and kept in the ledger, so a resumed run
    writes where it began, on what it began (``base``), the way it began."""

    generation: int
    target: str  # the generation's name in the destination (collection / version directory)
    base: str | None  # the published generation it builds on (None: a fresh build)
    skip_unchanged: bool  # documents the published generation holds as they are: not embedded
    mode: Mode
    plan_settings: dict[str, Any] | None = None  # None: planned by a version that kept none

    @property
    def in_place(self) -> bool:
        """It updates the published generation itself (a nightly sync), not a new one."""
        return self.base == self.target

    def planned_with(self, settings: dict[str, Any]) -> RunPlan:
        return replace(self, plan_settings=settings)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RunPlan:
        return cls(generation=body["generation"], target=body["target"], base=body["base"],
                   skip_unchanged=body["skip_unchanged"], mode=body["mode"],
                   plan_settings=body.get("plan_settings"))


@dataclass
class Checkpoint:
    path: Path
    fingerprint: str
    done_windows: set[int] = field(default_factory=set)
    done_batches: dict[int, set[str]] = field(default_factory=dict)
    vectors_written: int = 0
    safe_token_budget: int | None = None
    run: RunPlan | None = None  # None until the run has decided
    is_new: bool = True

    @classmethod
    def open(cls, directory: Path, fingerprint: str) -> Checkpoint:
        """Load the ledger of a previous run, or start an empty one.

        A ledger written by a job whose vectors would differ is refused: resuming would
        mix two embeddings under one index.
        """
        found = cls.peek(directory)
        if found is None:
            return cls(path=checkpoint_file(directory), fingerprint=fingerprint)
        if found.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"{found.path}: checkpoint was written by a different job configuration "
                f"(fingerprint {found.fingerprint} != {fingerprint}: model, dimension, pooling "
                f"or chunking changed); run with --restart to re-embed from scratch")
        return found

    @classmethod
    def peek(cls, directory: Path) -> Checkpoint | None:
        """The ledger in ``directory`` as it is (verified, whatever job wrote it), or None."""
        path = checkpoint_file(directory)
        if not path.exists():
            return None
        state = _read_verified(path)
        return cls(
            path=path,
            fingerprint=state["fingerprint"],
            done_windows=set(state["done_windows"]),
            done_batches={int(w): set(b) for w, b in state["done_batches"].items()},
            vectors_written=state["vectors_written"],
            safe_token_budget=state.get("safe_token_budget"),
            run=RunPlan.from_json(state["run"]) if state.get("run") else None,
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
            "run": self.run.to_json() if self.run is not None else {},
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
