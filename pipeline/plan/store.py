"""The plan on disk: each window's batches, its documents, and the manifest that commits them.

The plan is the contract between the two phases of a run. Each *window* of chunks is
sorted and cut into batches with deterministic ids (``w00003-b000012``) and written as one
Parquet file holding the token ids themselves, so executing (and resuming) never
re-tokenizes and always sees the same batches in the same order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, file_digest, seal, unseal
from pipeline.errors import JobError
from pipeline.plan.batching import PlannedBatch, WindowStats

_WINDOW_RE = re.compile(r"^window-(\d{5})\.parquet$")
_DOCS_RE = re.compile(r"^docs-(\d{5})\.parquet$")
COMPLETE_MARKER = "_COMPLETE"  # written by earlier versions; the manifest replaces it
MANIFEST = "manifest.json"


class PlanStore:
    """The plan directory: one Parquet file per window (and one of its documents), committed
    by a sealed manifest that names each window's files with their sizes and checksums.

    Only the manifest says what the plan holds: a window file it does not name is ignored, a
    named one that is missing or damaged is found by ``damaged`` before it is trusted.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._manifest: dict[str, Any] | None = None

    # -- the manifest -----------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def _read(self) -> dict[str, Any]:
        if self._manifest is None:
            if self.manifest_path.exists():
                body = unseal(self.manifest_path.read_bytes())
                if body is None:
                    raise JobError(f"{self.manifest_path}: plan manifest is corrupt (checksum "
                                   f"mismatch); run with --restart to plan again")
                self._manifest = body
            else:
                self._manifest = self._from_legacy_files()
        return self._manifest

    def _write(self, body: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_bytes(seal(body))
        self._manifest = body

    def _from_legacy_files(self) -> dict[str, Any]:
        """A plan written before manifests: its window files as they are now."""
        body: dict[str, Any] = {"windows": [], "complete": False, "source_files": None}
        if not self.dir.exists():
            return body
        listed = sorted(int(m.group(1)) for p in self.dir.iterdir()
                        if (m := _WINDOW_RE.match(p.name)))
        for w in listed:
            if not self.docs_path(w).exists():
                break
            stats = WindowStats.from_meta(pq.read_schema(self.window_path(w)).metadata)
            body["windows"].append(self._entry(stats))
        body["complete"] = (self.dir / COMPLETE_MARKER).exists() and \
            len(body["windows"]) == len(listed)
        return body

    def _entry(self, stats: WindowStats) -> dict[str, Any]:
        files = {kind: [path.stat().st_size, file_digest(path)]
                 for kind, path in (("window", self.window_path(stats.window)),
                                    ("docs", self.docs_path(stats.window)))}
        return {"stats": asdict(stats), "files": files}

    # -- reading ------------------------------------------------------------------------------

    def window_path(self, window: int) -> Path:
        return self.dir / f"window-{window:05d}.parquet"

    def docs_path(self, window: int) -> Path:
        return self.dir / f"docs-{window:05d}.parquet"

    def windows(self) -> list[int]:
        return [e["stats"]["window"] for e in self._read()["windows"]]

    def stats(self, window: int) -> WindowStats:
        entry = next(e for e in self._read()["windows"] if e["stats"]["window"] == window)
        return WindowStats(**entry["stats"])

    def all_stats(self) -> list[WindowStats]:
        return [WindowStats(**e["stats"]) for e in self._read()["windows"]]

    @property
    def complete(self) -> bool:
        return bool(self._read()["complete"])

    @property
    def source_files(self) -> list[str] | None:
        """The files the plan was read from (None: not recorded, or not a file source)."""
        return self._read().get("source_files")

    def damaged(self, done: Callable[[int], bool]) -> tuple[int, str] | None:
        """The first window whose files are missing or differ from what the manifest says,
        and why. A window not yet done is checked byte for byte (it is about to be read
        anyway); a done one by size, except its document records, which publishing reads."""
        for entry in self._read()["windows"]:
            w = entry["stats"]["window"]
            for kind, path in (("window", self.window_path(w)), ("docs", self.docs_path(w))):
                size, digest = entry["files"][kind]
                if not path.exists():
                    return w, f"{path.name} is missing"
                if path.stat().st_size != size:
                    return w, f"{path.name} changed size"
                if (kind == "docs" or not done(w)) and file_digest(path) != digest:
                    return w, f"{path.name} is damaged (checksum mismatch)"
        return None

    def doc_records(self, window: int) -> Iterator[tuple[str, str, int]]:
        """Every document the window's source range held: (id, hash, chunk count)."""
        t = pq.read_table(self.docs_path(window))
        yield from zip(t["doc_id"].to_pylist(), t["hash"].to_pylist(), t["n_chunks"].to_pylist())

    def all_doc_records(self) -> Iterator[tuple[str, str, int]]:
        for w in self.windows():
            yield from self.doc_records(w)

    def batch_ids(self, window: int) -> list[str]:
        column = pq.read_table(self.window_path(window), columns=["batch_id"])["batch_id"]
        return pc.unique(column).to_pylist()

    def batches(self, window: int) -> Iterator[PlannedBatch]:
        """The window's batches in plan order, one Arrow slice each."""
        table = pq.read_table(self.window_path(window))
        ids = table.column("batch_id").to_numpy(zero_copy_only=False)
        if len(ids) == 0:
            return
        cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(ids)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            yield PlannedBatch(batch_id=str(ids[s]), table=table.slice(s, e - s))

    # -- writing ------------------------------------------------------------------------------

    def start(self, source_files: list[str] | None) -> None:
        """Record what a new plan reads (before its first window)."""
        body = self._read()
        if not body["windows"]:
            self._write({**body, "source_files": source_files})

    def write_window(self, table: pa.Table, stats: WindowStats,
                     doc_records: list[tuple[str, str, int]]) -> None:
        """The document records and the window file, then the manifest entry that commits
        both."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ids, hashes, counts = zip(*doc_records) if doc_records else ((), (), ())
        docs = pa.table({"doc_id": pa.array(ids, pa.string()), "hash": pa.array(hashes, pa.string()),
                         "n_chunks": pa.array(counts, pa.int32())})
        with atomic_path(self.docs_path(stats.window)) as tmp:
            pq.write_table(docs, tmp)
        table = table.replace_schema_metadata(stats.to_meta())
        with atomic_path(self.window_path(stats.window)) as tmp:
            # one row group per ~batch run keeps reads of a single batch cheap
            pq.write_table(table, tmp, row_group_size=8192, compression="zstd")
        body = self._read()
        self._write({**body, "windows": [*body["windows"], self._entry(stats)]})

    def mark_complete(self) -> None:
        self._write({**self._read(), "complete": True})

    def truncate(self, window: int) -> None:
        """Forget windows ``window`` on: the manifest first, then their files."""
        body = self._read()
        self._write({**body, "complete": False,
                     "windows": [e for e in body["windows"] if e["stats"]["window"] < window]})
        (self.dir / COMPLETE_MARKER).unlink(missing_ok=True)
        for p in list(self.dir.iterdir()):
            m = _WINDOW_RE.match(p.name) or _DOCS_RE.match(p.name)
            if m and int(m.group(1)) >= window:
                p.unlink()
