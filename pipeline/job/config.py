"""The job file: a validated, fully resolved description of one embedding job.

Paths in a job file are relative to the file's own directory, so a job behaves the
same whatever directory it is started from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.errors import ConfigError
from pipeline.secrets import uri_secret
from pipeline.state.layout import StateDir


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


class ChunkingConfig(_Strict):
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


class TLSConfig(_Strict):
    """Certificates for TLS to a Milvus server: PEM files, paths relative to the job file."""

    ca_cert: str | None = Field(
        None, description="the CA that signed the server's certificate (default: the system's)")
    client_cert: str | None = Field(
        None, description="this client's certificate, for a server that asks for one (mutual TLS)")
    client_key: str | None = Field(None, description="the client certificate's private key")
    server_name: str | None = Field(
        None, description="the name the server's certificate carries, when not the URI's host")

    @model_validator(mode="after")
    def _pairs(self) -> TLSConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("sink.tls.client_cert and sink.tls.client_key go together")
        if self.client_cert and not self.ca_cert:
            # pymilvus sends a client certificate only together with a CA file
            raise ValueError("sink.tls.client_cert needs sink.tls.ca_cert (the CA of the "
                             "server's certificate)")
        return self

    def files(self) -> dict[str, str]:
        """The certificate files given, by key, as written in the job file."""
        return {key: path for key in ("ca_cert", "client_cert", "client_key")
                if (path := getattr(self, key)) is not None}

    def resolved(self, resolve: Callable[[str], Path]) -> TLSConfig:
        """A copy whose file paths are resolved (relative to the job file)."""
        return self.model_copy(update={k: str(resolve(p)) for k, p in self.files().items()})


class SinkConfig(_Strict):
    """Where vectors go."""

    kind: Literal["milvus", "parquet"] = "milvus"
    uri: str | None = Field(None, description="milvus: a Lite file path or http(s)://host:port")
    token: str | None = Field(None, description="inline token (user:password); prefer token_env")
    token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable that holds the token, read when the sink is made")
    secure: bool | None = Field(
        None, description="TLS to the server; default: on for https:// URIs and when tls is set")
    tls: TLSConfig | None = None
    collection: str | None = None
    index: IndexConfig = Field(default_factory=IndexConfig)
    store_text: bool = True
    path: str | None = Field(None, description="parquet: output directory")
    rows_per_file: int = Field(10_000, gt=0, description="parquet: rows buffered per file")
    retries: int = Field(5, ge=1, description="attempts for a write that fails transiently")
    retry_base_delay_s: float = Field(0.5, ge=0, description="first backoff; doubles, with jitter")

    @model_validator(mode="after")
    def _target(self) -> SinkConfig:
        if self.kind == "milvus" and not self.uri:
            raise ValueError("sink.uri is required for a milvus sink")
        if self.kind == "parquet" and not self.path:
            raise ValueError("sink.path is required for a parquet sink")
        if self.token is not None and self.token_env is not None:
            raise ValueError("sink.token and sink.token_env: give one of them, not both")
        head, sep, _ = (self.uri or "").partition("://")
        scheme = head.lower() if sep else ""
        if self.secure is False and (scheme == "https" or self.tls):
            raise ValueError("sink.secure: false, but " + (
                "the URI is https://" if scheme == "https" else "sink.tls is set")
                + "; remove one of them")
        self.secure = bool(self.secure or scheme == "https" or self.tls)
        if self.kind == "milvus" and self.secure and scheme not in ("http", "https", "tcp"):
            raise ValueError("sink.secure / sink.tls: TLS is for a Milvus server "
                             "(http(s)://host:port), not a Milvus Lite path")
        return self

    def resolved_token(self) -> str | None:
        """The token, from the job file or from the variable ``token_env`` names. Read here,
        when the sink is made or validated, not when the job file is loaded, so that
        ``validate`` reports an unset variable as one of its problems."""
        if self.token_env is None:
            return self.token
        value = os.environ.get(self.token_env)
        if not value:
            raise ConfigError(f"sink.token_env: environment variable {self.token_env} is not set "
                              f"(or empty); export it with the server's token (user:password)")
        return value

    def secrets(self) -> list[str]:
        """Every secret this sink holds, for redaction: the token (and the password half of
        ``user:password``) and the URI's userinfo. Never raises."""
        try:
            token = self.resolved_token()
        except ConfigError:
            token = None
        # the password half alone only when it cannot be an ordinary word of a message
        # (the default 'root:Milvus' would turn "Milvus Lite" into "*** Lite")
        password = token.partition(":")[2] if token else ""
        found = [token, password if len(password) >= 8 else ""] if token else []
        in_uri = uri_secret(self.uri or "")
        if in_uri:
            found += [in_uri, unquote(in_uri)]
        return list(dict.fromkeys(s for s in found if s))


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
    _from_env: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def source_file(self) -> str:
        """The job file this job was read from, for error messages."""
        return self._source_file

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
            err["input"], (dict, list)) and err["loc"][-1:] != ("token",):  # never echo a token
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


_ENV_REF = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(value: Any, key: str, problems: list[str], used: set[str]) -> Any:
    """``value`` with ``${VAR}`` in its strings replaced by the environment variable
    (``$${`` keeps a literal ``${``); an unset variable is a problem naming it and ``key``."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}" if key else str(k), problems, used)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{key}.{i}", problems, used) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(ref: re.Match[str]) -> str:
        if ref[1]:
            return ref[0][1:]
        if ref[2] not in os.environ:
            problems.append(f"{key}: environment variable {ref[2]} is not set "
                            f"(the job file says ${{{ref[2]}}})")
            return ""
        used.add(key)
        return os.environ[ref[2]]

    return _ENV_REF.sub(substitute, value)


class _JobLoader(yaml.SafeLoader):
    """PyYAML's safe loader, noting each key given twice in one mapping (at any depth):
    PyYAML keeps the last value silently, so a second ``sink:`` would replace the first."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []  # (line, key, line of the first)
        self._written: dict[yaml.Node, list[tuple[yaml.Node, yaml.Node]]] = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # A merge (<<: *base) adds base's pairs to the node; keys it overrides are not repeats.
        self._written.setdefault(node, list(node.value))
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in self._written.get(node, node.value):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        self.duplicates.append((line, key, seen[key]))
                    else:
                        seen[key] = line
                except TypeError:
                    pass  # an unhashable key: the constructor refuses it below
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> tuple[Any, list[tuple[int, Any, int]]]:
    """The document, and the keys given twice in it (in the order of their lines)."""
    loader = _JobLoader(text)
    try:
        return loader.get_single_data(), sorted(loader.duplicates, key=lambda d: d[0])
    finally:
        loader.dispose()


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes one line of a ConfigError."""
    path = Path(path)
    try:
        raw, duplicates = _load_yaml(path.read_text(encoding="utf-8"))
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
    if duplicates:
        raise ConfigError("\n".join(f"{path}:{line}: duplicate key {key!r} (first at line {first})"
                                    for line, key, first in duplicates))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of settings")
    problems: list[str] = []
    used: set[str] = set()
    raw = _interpolate(raw, "", problems, used)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        errors = [dict(err) for err in e.errors()]
        raise ConfigError("\n".join(_error_lines(str(path), errors))) from None
    job._base_dir = path.resolve().parent
    job._source_file = str(path)
    job._from_env = frozenset(used)
    return job
