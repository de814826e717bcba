"""The job file's sections that every job has, and the base of the plug-in sections.

A sink's and a backend's own settings live beside the plug-in (``sinks/parquet.py``,
``embedders/sglang_backend/``), as a subclass of ``SinkSettings`` / ``ModelSettings``; the job
file's ``sink`` and ``model`` are their union (``job/plugins.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.job.model_info import ModelInfo, Pooling

if TYPE_CHECKING:
    from pipeline.embedders.base import Embedder
    from pipeline.sinks.base import Destination, GenerationMark

DType = Literal["auto", "float32", "bfloat16", "float16"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

class Strict(BaseModel):
    """A section of the job file: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class SourceConfig(Strict):
    """Where documents come from and which fields hold what."""

    kind: Literal["jsonl", "parquet", "hf"] | None = Field(
        None, description="inferred from the path's extension when omitted")
    path: str | list[str] | None = Field(None, description="file, glob, or list of them")
    dataset: str | None = Field(None, description="hf: a hub name or a local dataset directory")
    config: str | None = Field(None, description="hf: dataset configuration name")
    split: str = "train"
    streaming: bool = False
    data_files: str | list[str] | None = None
    id_field: str = "id"
    text_field: str = "text"
    metadata_fields: list[str] = Field(default_factory=list)
    id_fallback: Literal["error", "content_hash"] = Field(
        "error", description="what to do with a row without an id")
    on_bad_row: Literal["error", "dead_letter"] = "dead_letter"

    @model_validator(mode="after")
    def _where(self) -> SourceConfig:
        if self.kind == "hf" or (self.kind is None and self.dataset):
            if not self.dataset:
                raise ValueError("source.dataset is required for kind 'hf'")
            self.kind = "hf"
        elif not self.path:
            raise ValueError("source.path (or source.dataset for a datasets source) is required")
        return self

    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


class ChunkingConfig(Strict):
    """How documents become chunks the model can take whole."""

    max_tokens: int = Field(512, gt=8, description="tokens per chunk, special tokens included")
    overlap_tokens: int = Field(0, ge=0)
    over_length: Literal["split", "truncate", "skip"] = Field(
        "split", description="a document longer than max_tokens: split it, keep its head, "
        "or send it to the dead-letter file")

    @model_validator(mode="after")
    def _overlap(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError(
                f"chunking.overlap_tokens: {self.overlap_tokens} must be < max_tokens/2 "
                f"({self.max_tokens // 2})")
        return self


class BatchingConfig(Strict):
    """How sorted chunks are packed into batches."""

    token_budget: int = Field(16384, gt=0, description="padded tokens per batch (rows x longest)")
    max_batch_size: int = Field(256, gt=0)
    sort_window: int = Field(50_000, gt=0, description="chunks sorted together at most (one "
                             "plan file)")
    window_tokens: int = Field(
        2_097_152, gt=0, description="tokens sorted together at most: with sort_window, bounds "
        "the host memory a plan window takes (token ids and text), whatever the chunk sizes and "
        "however large the corpus")
    first_window: int = Field(
        256, gt=0, description="chunks in the first plan window: small, so the engine gets its "
        "first batch while the rest of the corpus is still being planned")
    planner_processes: int | Literal["auto"] = Field(
        "auto", description="processes that tokenize and chunk (the plan is the same for any "
        "number); auto: 2 per GPU (the run's own, or each worker's with --gpus), 1 in the "
        "run's process on the CPU")


class RayConfig(Strict):
    """Where and how a ``runner: ray`` run embeds (``docs/cluster.md``)."""

    address: str | None = Field(
        None, description="a Ray cluster (host:6379 or ray://host:10001); None: RAY_ADDRESS, "
        "else a local cluster started for the run and shut down after")
    actors: int | Literal["auto"] = Field(
        "auto", description="embedding actors, each holding one embedder for its lifetime; "
        "auto: one per GPU of the cluster (one on a CPU-only cluster)")
    actor_cpus: float = Field(
        1.0, gt=0, description="CPUs each actor reserves; keep the sum below the cluster's "
        "CPUs, or the reading and chunking tasks never get one")
    local_cpus: int | None = Field(
        None, gt=0, description="CPUs of a local cluster; None: this machine's")
    object_store_mb: int | None = Field(
        None, gt=0, description="object store of a local cluster; None: Ray's default")


class PublishGate(Strict):
    """A bar a new generation must clear before readers are switched to it."""

    min_recall_at_10: float = Field(..., ge=0, le=1, description="document recall@10 the new "
                                    "generation must reach on the queries")
    queries: str | None = Field(None, description="JSONL of {query, relevant} or a BEIR "
                                "directory; None: a self-retrieval sample of the source")
    sample: int = Field(200, gt=0, description="documents sampled when queries is None; and "
                        "chunks sampled to compare the new generation with the old one")
    min_agreement_at_10: float | None = Field(
        None, ge=0, le=1, description="on a model or settings change: the mean overlap of the "
        "top-10 neighbours of sampled chunks, old generation vs new, the new one must reach; "
        "None: reported, never blocks")


class SyncConfig(Strict):
    """How a run relates to what earlier runs published (nightly re-indexing)."""

    mode: Literal["full", "incremental"] = Field(
        "incremental", description="incremental: skip documents whose content hash is unchanged")
    delete_missing: bool = Field(
        False, description="remove documents absent from the source (opt-in: a partial source "
        "must not wipe the index)")
    keep_previous: int = Field(
        1, ge=0, description="older generations (collections / Parquet versions) kept after a "
        "model or settings change")
    publish_gate: PublishGate | None = Field(
        None, description="checked on a new generation (a model or settings change) before "
        "readers switch to it; failing, readers stay on the old one")


class ModelSettings(Strict):
    """The embedding model and how its output becomes the stored vector: what every backend
    shares. A backend adds its own settings in a subclass named by ``backend``."""

    backend: str
    path: str = Field(..., description="a directory, 'package:<module>/<subdir>', or a hub id")
    revision: str | None = None
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    dimension: int | None = Field(None, gt=0, description="Matryoshka dimension; None = native")
    normalize: bool = True
    dtype: DType = "auto"
    device: str = "auto"
    query_instruction: str | None = Field(
        None, description="task text for queries: 'Instruct: {task}\\nQuery:{text}'; never for documents")
    gpus: int | Literal["all"] | list[int] | None = Field(
        None, description="GPUs of this host to embed on, one worker process each: a count, "
        "'all', or indexes [0, 2, 5]; None: model.device, in the run's own process")
    workers: int = Field(1, ge=1, description="worker processes per GPU (they split its "
                         "memory), or on the CPU when gpus is None; 1: in the run's process")

    def pooling_for(self, info: ModelInfo) -> Pooling:
        """The pooling to use: the job's, or the model's own for ``auto``."""
        return info.pooling if self.pooling == "auto" else self.pooling

    def max_context(self, info: ModelInfo) -> int:
        """The longest sequence, special tokens included, the backend embeds."""
        return info.max_context

    def vector_settings(self) -> dict[str, Any]:
        """This backend's settings that move vectors beyond floating-point tolerance (an FP8
        quantization), for the job's fingerprint; empty when none is set, so a job without
        them keeps the fingerprint it always had."""
        return {}

    def device_problem(self) -> str | None:
        """An unknown device, or a GPU the machine does not have, said before a model loads.

        The one statement of the devices a backend takes (a backend that takes fewer says so
        in its override); its embedder only translates them.
        """
        if not _DEVICE.match(self.device):
            return f"model.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N"
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return (f"model.device: {self.device} asked for, but torch sees no CUDA GPU on "
                        f"this machine")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                return (f"model.device: {self.device}: this machine has "
                        f"{torch.cuda.device_count()} GPU(s)")
        return None

    def make(self, info: ModelInfo, pad_id: int) -> Embedder:
        """The embedder; ``pad_id`` fills batches for a backend that pads."""
        raise NotImplementedError

    def sharing_device(self, share: int) -> ModelSettings:
        """The settings for one of ``share`` workers on one GPU (a backend that reserves
        device memory up front takes its part of it)."""
        return self

    def tokens_in_flight(self, token_budget: int) -> int:
        """Tokens an embedder holds before it hands a result back: a worker is given this
        much, and a batch more, so its engine never waits for the next batch."""
        return 2 * token_budget


class SinkSettings(Strict):
    """Where vectors go: what every sink shares. A sink adds its own settings in a subclass
    named by ``kind``, and answers for its kind through these methods, so nothing outside
    it (the run, ``validate``) asks which kind it is."""

    # the job file's keys that name where the destination is, and what readers use
    where_key: ClassVar[str] = "sink"
    name_key: ClassVar[str] = "sink.collection"

    kind: str
    collection: str | None = Field(
        None, description="the name readers use (Milvus alias, Parquet CURRENT); default: the "
        "job's name")
    store_text: bool = True
    retries: int = Field(5, ge=1, description="attempts for a write that fails transiently")
    retry_base_delay_s: float = Field(0.5, ge=0, description="first backoff; doubles, with jitter")

    def target_name(self, alias: str, fingerprint: str, generation: int) -> str:
        """Where generation ``generation`` of these settings (``fingerprint``) is written."""
        raise NotImplementedError

    def describe(self, resolve: Callable[[str], Path], target: str, alias: str) -> str:
        """The destination in words, for the report and the messages (never a secret)."""
        raise NotImplementedError

    def identity_where(self) -> str:
        """Where it writes, as the job file says it (no credentials): part of the job's
        identity, so another job's state is never taken for this one's."""
        raise NotImplementedError

    def doc_id_limit(self) -> int | None:
        """The longest document id, in UTF-8 bytes, the destination stores (None: any)."""
        return None

    def problems(self, resolve: Callable[[str], Path]) -> list[str]:
        """What keeps the sink from being made, found without connecting (one line each)."""
        return []

    def secrets(self) -> list[str]:
        """Every secret these settings hold, for redaction. Never raises."""
        return []

    # -- what ``validate`` asks before a run would start ------------------------------------

    @property
    def remote(self) -> bool:
        """Whether the destination is behind the network (``validate --offline`` skips it)."""
        return False

    def local_path(self, resolve: Callable[[str], Path]) -> Path | None:
        """Where on this machine the destination lives (None: remote, or in no file)."""
        return None

    def location(self, resolve: Callable[[str], Path]) -> str:
        """Where the destination is, in words (never a secret)."""
        path = self.local_path(resolve)
        return self.kind if path is None else str(path)

    def published_as(self, alias: str) -> str:
        """What readers look the live generation up by, in words."""
        return f"the published name {alias!r}"

    def destination_problems(self, resolve: Callable[[str], Path], alias: str) -> list[str]:
        """What is wrong with the destination's names and paths before anything connects
        (one line each, without the job file's name)."""
        return []

    def warnings(self, job_file: str, from_env: AbstractSet[str], alias: str) -> list[str]:
        """What works but should not stay as it is, one line each without the job file's
        name; ``from_env``: the dotted keys whose value came from the environment."""
        return []

    def probe(self, resolve: Callable[[str], Path], alias: str) -> Destination:
        """The destination as ``validate`` opens it: only read, never created."""
        return self.make(resolve, alias, alias)

    # -- the sink ---------------------------------------------------------------------------

    def make(self, resolve: Callable[[str], Path], alias: str, target: str,
             base: str | None = None, file_metadata: Mapping[str, str] | None = None,
             mark: GenerationMark | None = None) -> Destination:
        """The sink writing generation ``target``, published as ``alias``.

        ``base`` is the published generation an incremental run builds on (None: a fresh
        build); ``file_metadata`` (model, fingerprint) goes into what the sink writes;
        ``mark`` into the generation when it is created.
        """
        raise NotImplementedError
