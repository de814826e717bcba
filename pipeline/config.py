"""The job file: a validated, fully resolved description of one embedding job.

Paths in a job file are relative to the file's own directory, so a job behaves the
same whatever directory it is started from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
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
    def _where(self) -> "SourceConfig":
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


class ChunkingConfig(_Strict):
    """How documents become chunks the model can take whole."""

    max_tokens: int = Field(512, gt=8, description="tokens per chunk, special tokens included")
    overlap_tokens: int = Field(0, ge=0)
    over_length: Literal["split", "truncate", "skip"] = Field(
        "split", description="a document longer than max_tokens: split it, keep its head, "
        "or send it to the dead-letter file")

    @model_validator(mode="after")
    def _overlap(self) -> "ChunkingConfig":
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError(
                f"chunking.overlap_tokens: {self.overlap_tokens} must be < max_tokens/2 "
                f"({self.max_tokens // 2})")
        return self


class SGLangConfig(_Strict):
    """Settings passed to the embedded ``sglang.Engine``."""

    quantization: str | None = Field(
        None, description="None: as the checkpoint says (AWQ -> awq_marlin); 'fp8' for online FP8")
    attention_backend: str = "triton"
    mem_fraction_static: float = Field(0.8, gt=0, le=1)
    context_length: int | None = None
    chunked_prefill_size: int | None = -1
    max_prefill_tokens: int | None = 65536
    disable_cuda_graph: bool = True
    max_in_flight: int = Field(64, ge=1, description="at most this many batches with the engine")
    max_tokens_in_flight: int = Field(
        262144, ge=1, description="submit more batches until this many tokens are with the engine "
        "(several prefill passes, so the GPU never waits for the next request)")
    warmup_tokens: int = Field(
        8192, ge=0, description="at start, embed a few dummy sequences of up to this many tokens "
        "so the engine compiles its kernels during start-up (reported with the model load), not "
        "in the first batches; 0: off")
    extra: dict[str, Any] = Field(default_factory=dict, description="more Engine kwargs")


class ModelConfig(_Strict):
    """The embedding model and how its output becomes the stored vector."""

    backend: Literal["transformers", "sglang"] = "transformers"
    path: str = Field(..., description="a directory, 'package:<module>/<subdir>', or a hub id")
    revision: str | None = None
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    dimension: int | None = Field(None, gt=0, description="Matryoshka dimension; None = native")
    normalize: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    query_instruction: str | None = Field(
        None, description="task text for queries: 'Instruct: {task}\\nQuery:{text}'; never for documents")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="transformers backend: run each batch as one row of concatenated "
        "sequences with variable-length attention, no padding (auto: on a CUDA device for "
        "decoder models of the Llama/Qwen family)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="transformers backend: torch.compile the packed decoder layer "
        "(auto: on when packing runs on a CUDA device)")
    packed_tokens: int = Field(
        32768, gt=0, description="transformers backend: tokens per packed forward pass (a "
        "longer sequence runs alone)")
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)


class BatchingConfig(_Strict):
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


class IndexConfig(_Strict):
    type: str = "AUTOINDEX"
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"
    params: dict[str, Any] = Field(default_factory=dict)


class SinkConfig(_Strict):
    """Where vectors go."""

    kind: Literal["milvus", "parquet"] = "milvus"
    uri: str | None = Field(None, description="milvus: a Lite file path or http(s)://host:port")
    token: str | None = None
    collection: str | None = None
    index: IndexConfig = Field(default_factory=IndexConfig)
    store_text: bool = True
    path: str | None = Field(None, description="parquet: output directory")
    rows_per_file: int = Field(10_000, gt=0, description="parquet: rows buffered per file")
    retries: int = Field(5, ge=1, description="attempts for a write that fails transiently")
    retry_base_delay_s: float = Field(0.5, ge=0, description="first backoff; doubles, with jitter")

    @model_validator(mode="after")
    def _target(self) -> "SinkConfig":
        if self.kind == "milvus" and not self.uri:
            raise ValueError("sink.uri is required for a milvus sink")
        if self.kind == "parquet" and not self.path:
            raise ValueError("sink.path is required for a parquet sink")
        return self


class SyncConfig(_Strict):
    """How a run relates to what earlier runs published (nightly re-indexing)."""

    mode: Literal["full", "incremental"] = Field(
        "incremental", description="incremental: skip documents whose content hash is unchanged")
    delete_missing: bool = Field(
        False, description="remove documents absent from the source (opt-in: a partial source "
        "must not wipe the index)")
    keep_previous: int = Field(
        1, ge=0, description="older generations (collections / Parquet versions) kept after a "
        "model or settings change")


class Job(_Strict):
    """One embedding job, as written in a job file."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
    source: SourceConfig
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    model: ModelConfig
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    sink: SinkConfig
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint_dir: str | None = Field(None, description="default: .embed-job/<name> beside the job file")
    dead_letter_path: str | None = Field(None, description="default: <checkpoint_dir>/dead_letters.jsonl")
    max_dead_letter_ratio: float | None = Field(
        0.1, ge=0, le=1, description="stop when more than this share of documents is dead-lettered")
    max_dead_letters: int | None = Field(None, ge=0, description="stop above this many dead letters")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_file: str = PrivateAttr(default="job")

    @property
    def source_file(self) -> str:
        """The job file this job was read from, for error messages."""
        return self._source_file

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
    def dead_letter_file(self) -> Path:
        if self.dead_letter_path:
            return self.resolve(self.dead_letter_path)
        return self.checkpoint_path / "dead_letters.jsonl"

    @property
    def collection_name(self) -> str:
        return self.sink.collection or self.name

    def fingerprint(self, tokenizer_id: str = "") -> str:
        """Hash of every setting that changes a stored vector or its key.

        Backend, dtype and device are left out on purpose: they change vectors only
        within floating-point tolerance, and a job may resume on another machine.
        """
        parts = {
            "model": self.model.path,
            "revision": self.model.revision,
            "pooling": self.model.pooling,
            "dimension": self.model.dimension,
            "normalize": self.model.normalize,
            "chunking": self.chunking.model_dump(),
            "tokenizer": tokenizer_id,
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _format_error(where: str, err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if "input" in err and err["type"] not in ("extra_forbidden", "missing") and not isinstance(
            err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    if not loc or msg.startswith(f"{loc}."):  # a section's check names its own field
        return f"{where}: {msg}"
    return f"{where}: {loc}: {msg}"


# pydantic names each member of a union it tried ('str', 'list[str]', "literal['a','b']")
_UNION_MEMBER = re.compile(r"(str|int|float|bool|[a-z-]+\[.*\])")


def _error_lines(where: str, errors: list[dict[str, Any]]) -> list[str]:
    """One line per problem: a value that fits none of a union's members is one problem,
    reported inside the member it came closest to (``source.path.1``) when there is one."""
    order: list[str | tuple] = []  # a finished line, or the location of a union
    unions: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        at = next((i for i, part in enumerate(loc) if i and isinstance(part, str)
                   and _UNION_MEMBER.fullmatch(part)), None)
        if at is None:
            order.append(_format_error(where, err))
            continue
        if loc[:at] not in unions:
            order.append(loc[:at])
        unions.setdefault(loc[:at], []).append((loc[at], {**err, "loc": loc[:at] + loc[at + 1:]}))
    lines = []
    for item in order:
        if isinstance(item, str):
            lines.append(item)
            continue
        tried = unions[item]
        deeper = [err for _, err in tried if len(err["loc"]) > len(item)]
        if deeper:
            lines += [_format_error(where, err) for err in deeper]
            continue
        value = tried[0][1].get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        lines.append(f"{where}: {'.'.join(map(str, item))}: expected "
                     f"{' or '.join(member for member, _ in tried)}{got}")
    return lines


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes one line of a ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})"
                          ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of settings")
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_error_lines(str(path), e.errors()))) from None
    job._base_dir = path.resolve().parent
    job._source_file = str(path)
    return job
