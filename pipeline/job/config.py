"""The job: every section of a job file, validated and fully resolved.

Paths in a job file are relative to the file's own directory, so a job behaves the
same whatever directory it is started from. ``sink`` and ``model`` are the union of the
registered plug-ins' settings (``job/plugins.py``), told apart by ``kind`` / ``backend``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr

from pipeline.job import plugins
from pipeline.job.sections import (
    BatchingConfig,
    ChunkingConfig,
    ModelSettings,
    RayConfig,
    SinkSettings,
    SourceConfig,
    Strict,
    SyncConfig,
)
from pipeline.state.layout import StateDir

if TYPE_CHECKING:  # what mypy checks calls against; at run time, the plug-ins' union
    SinkConfig = SinkSettings
    ModelConfig = ModelSettings
else:
    SinkConfig = plugins.sink_union()
    ModelConfig = plugins.backend_union()


class Job(Strict):
    """One embedding job, as written in a job file."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
    source: SourceConfig
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    model: ModelConfig
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    sink: SinkConfig
    sync: SyncConfig = Field(default_factory=SyncConfig)
    runner: Literal["local", "ray"] = Field(
        "local", description="local: this host (--gpus/--workers); ray: a Ray cluster")
    ray: RayConfig = Field(default_factory=RayConfig)
    checkpoint_dir: str | None = Field(None, description="default: .embed-job/<name> beside the job file")
    dead_letter_path: str | None = Field(None, description="default: <checkpoint_dir>/dead_letters.jsonl")
    max_dead_letter_ratio: float | None = Field(
        0.1, ge=0, le=1, description="stop when more than this share of documents is dead-lettered")
    max_dead_letters: int | None = Field(None, ge=0, description="stop above this many dead letters")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_file: str = PrivateAttr(default="job")
    _from_env: frozenset[str] = PrivateAttr(default=frozenset())
    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @property
    def source_file(self) -> str:
        """The job file this job was read from, for error messages."""
        return self._source_file

    @property
    def ignored(self) -> tuple[str, ...]:
        """Settings of another sink kind or backend than the chosen one, left unused."""
        return self._ignored

    @property
    def from_env(self) -> frozenset[str]:
        """Dotted keys (``sink.token``) whose value came from a ``${VAR}`` in the job file."""
        return self._from_env

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, p: str) -> Path:
        """A path from the job file, relative to the job file's directory."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    @property
    def checkpoint_path(self) -> Path:
        return self.resolve(self.checkpoint_dir or f".embed-job/{self.name}")

    @property
    def state(self) -> StateDir:
        """The files of the checkpoint directory."""
        return StateDir(self.checkpoint_path)

    @property
    def dead_letter_file(self) -> Path:
        if self.dead_letter_path:
            return self.resolve(self.dead_letter_path)
        return self.state.dead_letters

    @property
    def collection_name(self) -> str:
        return self.sink.collection or self.name

    def plan_settings(self) -> dict[str, Any]:
        """Settings that change what the plan holds without changing a vector's meaning:
        which rows and fields are read, and whether chunk text is kept."""
        source = self.source.model_dump(mode="json", exclude={"on_bad_row"})
        return {"source": source, "store_text": self.sink.store_text}

    def fingerprint(self, tokenizer_id: str = "") -> str:
        """Hash of every setting that changes a stored vector or its key.

        Backend, dtype and device are left out on purpose: they change vectors only
        within floating-point tolerance, and a job may resume on another machine. A
        quantization is in (``ModelSettings.vector_settings``, only when set, so other jobs'
        fingerprints never changed): FP8 moves vectors further (cosine 0.997 of float32's on
        average on all-MiniLM-L6-v2, docs/benchmarks.md), so switching it builds a new
        generation beside the live one, and an unfinished run does not resume across it.
        """
        parts = {
            "model": self.model.path,
            "revision": self.model.revision,
            "pooling": self.model.pooling,
            "dimension": self.model.dimension,
            "normalize": self.model.normalize,
            "chunking": self.chunking.model_dump(),
            "tokenizer": tokenizer_id,
            **self.model.vector_settings(),
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()
