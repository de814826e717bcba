"""Checks that need more than the job file: the model on disk, the source paths, the
sink's token variable and certificate files, the checkpoint directory, and the destination.

``validate`` prints every problem; ``run`` refuses to start on the same ones, so a job that
validates is a job that starts. Only two checks may need the network: a Milvus server
destination, and a ``datasets`` source named by its hub id; ``validate --offline`` skips them.
"""

from __future__ import annotations

import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, JobError, TransientError
from pipeline.job.config import Job
from pipeline.job.model_info import ModelInfo, read_model_info, resolve_model_dir
from pipeline.sinks.milvus import MilvusSinkConfig
from pipeline.sinks.parquet import ParquetSinkConfig

if TYPE_CHECKING:
    from pipeline.sinks import Sink

# What a Milvus server accepts as a collection or alias name (Lite is laxer: it takes '-').
_MILVUS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MILVUS_NAME_MAX = 255
_GENERATION_SUFFIX = len("__") + 16  # target_name: <collection>__<16 hex of the fingerprint>
# validate waits this long for a server, not a run's 60 s per call: a firewalled host
# should not hold up a check
_SERVER_TIMEOUT_S = 10.0


def model_problems(job: Job, info: ModelInfo) -> list[str]:
    problems = []
    if job.model.dimension is not None and job.model.dimension > info.hidden_size:
        problems.append(f"model.dimension: {job.model.dimension} > model hidden size "
                        f"{info.hidden_size}")
    if job.chunking.max_tokens > info.max_context:
        problems.append(f"chunking.max_tokens: {job.chunking.max_tokens} > model context "
                        f"{info.max_context}")
    if job.batching.token_budget < min(job.chunking.max_tokens, info.max_context):
        problems.append(f"batching.token_budget: {job.batching.token_budget} < "
                        f"chunking.max_tokens {job.chunking.max_tokens}: a full chunk would not "
                        f"fit a batch")
    device = job.model.device_problem()
    if device:
        problems.append(device)
    return problems


def load_model_info(job: Job) -> ModelInfo:
    """The job's model, checked against the job; one ConfigError line per problem."""
    try:
        info = read_model_info(resolve_model_dir(job.model.path, job.model.revision, job.base_dir))
    except ConfigError as e:
        raise ConfigError(f"{job.source_file}: {e}") from None
    problems = model_problems(job, info)
    if problems:
        raise ConfigError("\n".join(f"{job.source_file}: {p}" for p in problems))
    return info


def sink_problems(job: Job) -> list[str]:
    """The sink's token variable and certificate files, checked before anything connects
    (pymilvus opens the files only when it connects, and a missing one would be a traceback)."""
    return [f"{job.source_file}: {p}" for p in job.sink.problems(job.resolve)]


def check_sink(job: Job) -> None:
    """``sink_problems`` as one ConfigError, so ``run`` refuses what ``validate`` reports."""
    problems = sink_problems(job)
    if problems:
        raise ConfigError("\n".join(problems))


def token_warning(job: Job) -> str | None:
    """A token written in the job file (which tends to end up in git), and said louder when
    the file is readable by group or others, as ssh says for a private key."""
    if not isinstance(job.sink, MilvusSinkConfig) or job.sink.token is None \
            or "sink.token" in job.from_env:
        return None
    text = f"{job.source_file}: sink.token is written in the job file"
    try:
        mode = stat.S_IMODE(Path(job.source_file).stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o044:
        text += f", which group/others can read (mode {mode:04o})"
    return f"{text}; put the token in an environment variable and name it in sink.token_env"


def name_warning(job: Job) -> str | None:
    """A collection name Milvus Lite takes but a server refuses (a job name with '-'): the
    job runs, but its index cannot move to a server under the same name."""
    if job.sink.kind != "milvus" or _is_server(job) or _MILVUS_NAME.match(job.collection_name):
        return None
    return f"{job.source_file}: {_name_problem(job)} (Milvus Lite accepts it, a server would not)"


def checkpoint_problems(job: Job, stored: dict[str, Any] | None) -> list[str]:
    """The checkpoint directory must be, or be creatable as, a writable directory (``run``
    takes its lock there before anything else), and not hold another job's state (``stored``:
    the identity its sync state records)."""
    where = job.checkpoint_path
    existing = _nearest_existing(where)
    if not existing.is_dir():
        return [(f"{job.source_file}: checkpoint_dir: {_blocked(where, existing)}; remove it "
                 f"or set checkpoint_dir")]
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        what = where if existing == where else f"{existing} (where {where} would be created)"
        return [(f"{job.source_file}: checkpoint_dir: {what} is not writable "
                 f"({e.strerror or e}); fix its permissions or set checkpoint_dir")]
    from pipeline.run.ownership import job_identity

    mine = job_identity(job)
    if stored is None or stored == mine:
        return []
    if stored.get("name") != mine["name"] or stored.get("sink") != mine["sink"]:
        return [(f"{job.source_file}: checkpoint_dir: {where} holds the state of job "
                 f"{stored.get('name')!r} writing to {_described(stored.get('sink', {}))}; "
                 f"give this job its own checkpoint_dir")]
    source = stored.get("source", {})
    return [(f"{job.source_file}: checkpoint_dir: {where} was built from another source "
             f"({source.get('dataset') or source.get('path')}); if the new source replaces the "
             f"old one, run with --restart")]


def destination_problems(job: Job) -> list[str]:
    """What the job file says about the destination that is wrong before anything connects:
    a name a Milvus server refuses, a file where a directory must go."""
    src, sink = job.source_file, job.sink
    if isinstance(sink, ParquetSinkConfig):
        assert sink.path is not None  # ParquetSinkConfig validates it
        root = job.resolve(sink.path)
        existing = _nearest_existing(root)
        return [] if existing.is_dir() else [
            f"{src}: sink.path: {_blocked(root, existing)}; Parquet output needs a directory"]
    problems = []
    name = job.collection_name
    if _is_server(job) and not _MILVUS_NAME.match(name):
        problems.append(f"{src}: {_name_problem(job)}")
    if len(name.encode()) + _GENERATION_SUFFIX > _MILVUS_NAME_MAX:
        problems.append(f"{src}: sink.collection: {name[:20]!r}... is too long: each generation "
                        f"is a collection <name>__<16 hex digits>, at most {_MILVUS_NAME_MAX} "
                        f"bytes; use at most {_MILVUS_NAME_MAX - _GENERATION_SUFFIX}")
    if isinstance(sink, MilvusSinkConfig) and not _is_server(job):
        assert sink.uri is not None  # MilvusSinkConfig validates it
        db = job.resolve(sink.uri)
        existing = _nearest_existing(db)
        if existing == db and not db.is_dir():
            problems.append(f"{src}: sink.uri: {db} exists and is not a Milvus Lite db (a Lite "
                            f"db is a directory); remove it or point sink.uri elsewhere")
        elif not existing.is_dir():
            problems.append(f"{src}: sink.uri: {_blocked(db, existing)}; point sink.uri elsewhere")
    return problems


@dataclass
class Validation:
    """Everything ``validate`` found, and which checks it made or skipped (``notes``)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreachable: bool = False  # the Milvus server did not answer (its checks were not made)


def validate_job(job: Job, offline: bool = False) -> Validation:
    """Every problem ``validate`` can find, each one line naming the job file. The destination
    is opened (never created) only when the job file's own sink settings are right."""
    from pipeline.readers import check_source

    out = Validation(warnings=[w for w in (token_warning(job), name_warning(job)) if w],
                     notes=[f"ignored: {note}" for note in job.ignored])
    try:
        load_model_info(job)
    except ConfigError as e:
        out.problems += str(e).splitlines()
    hub = job.source.kind == "hf" and not job.resolve(str(job.source.dataset)).exists()
    if offline and hub:
        out.notes.append(f"source: hub dataset {job.source.dataset!r} not checked (--offline)")
    else:
        try:
            check_source(job.source, job.resolve)
        except JobError as e:
            out.problems.append(f"{job.source_file}: {e}")
        if hub:
            out.notes.append(f"source: checked hub dataset {job.source.dataset!r} (network)")
    try:
        stored, owned = _sync_state(job)
    except JobError as e:
        out.problems.append(f"{job.source_file}: checkpoint_dir: {e}")
        stored, owned = None, {}
    out.problems += checkpoint_problems(job, stored)
    sink = sink_problems(job) + destination_problems(job)
    out.problems += sink
    if not sink:
        _check_destination(job, offline, owned, out)
    return out


def _check_destination(job: Job, offline: bool, owned: dict[str, str], out: Validation) -> None:
    """Open the destination as ``run`` would and refuse what ``run`` refuses before any work:
    an alias name held by a real collection, or a published name that points at a generation
    this job neither recorded nor marked. Read-only: nothing is created, not even the sync
    state."""
    from pipeline.secrets import mask_uri

    sink, src = job.sink, job.source_file
    milvus, server = isinstance(sink, MilvusSinkConfig), _is_server(job)
    if server and offline:
        out.notes.append("destination: not checked (--offline)")
        return
    written = sink.uri if isinstance(sink, MilvusSinkConfig) else getattr(sink, "path", "")
    where = mask_uri(str(written)) if server else str(job.resolve(str(written)))
    try:
        probe = sink.make(job.resolve, job.collection_name, job.collection_name)
    except JobError as e:  # a Lite path not ending in .db, an index Lite does not build
        out.problems.append(f"{src}: {'sink.uri' if milvus else 'sink.path'}: {e}")
        return
    if not server and not Path(where).exists():
        out.notes.append(f"destination: not checked ({where} does not exist yet; the first run "
                         f"creates it)")
        return
    if server:
        from pipeline.sinks.milvus.sink import MilvusSink

        assert isinstance(probe, MilvusSink)
        probe.timeout = _SERVER_TIMEOUT_S
    try:
        problem = _ownership_problem(job, probe, owned)
    except TransientError as e:
        out.problems.append(f"{src}: sink.uri: cannot reach the server: {e}; check the URI and "
                            f"that the server is up (validate --offline skips this check)")
        out.notes.append(f"destination: not checked ({where} unreachable)")
        out.unreachable = True
        return
    except JobError as e:  # the destination could not be opened or read
        out.problems.append(f"{src}: {'sink.uri' if milvus else 'sink.path'}: {e}")
        return
    finally:
        probe.close()
    if problem:
        out.problems.append(f"{src}: {'sink.collection' if milvus else 'sink.path'}: {problem}")
    out.notes.append(f"destination: checked {where} ({'network' if server else 'local'})")


def _ownership_problem(job: Job, probe: Sink, owned: dict[str, str]) -> str | None:
    """``ownership.check_destination`` without its recoveries: a live generation this job
    neither recorded (``owned``) nor marked is refused; one marked with this job's name is
    what a lost sync state is rebuilt from, so it passes."""
    clash = probe.clash()
    if clash:
        return clash
    live = probe.live()
    if live is None or live in owned:
        return None
    mark = probe.mark_of(live)
    if mark is not None and mark.job == job.name:
        return None
    milvus = job.sink.kind == "milvus"
    published = f"the alias {job.collection_name!r}" if milvus else "CURRENT"
    maker = "not made by embed-job" if mark is None else f"made by job {mark.job!r}"
    return (f"{published} points at {live!r}, which this job did not create ({maker}); use "
            f"another {'sink.collection' if milvus else 'sink.path'}")


def _sync_state(job: Job) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The identity and the generations recorded in the job's sync state; read only when the
    file exists (``validate`` never creates it)."""
    from pipeline.state.sync_state import SyncState

    path = job.state.sync_db
    if not path.is_file():
        return None, {}
    sync = SyncState(path)
    try:
        return sync.identity(), sync.generations()
    finally:
        sync.close()


def _described(sink: dict[str, Any]) -> str:
    return f"{sink.get('kind')} {sink.get('where')} ({sink.get('collection')})"


def _is_server(job: Job) -> bool:
    """A Milvus server URI (the one destination behind the network), by the sink's own rule."""
    return isinstance(job.sink, MilvusSinkConfig) and job.sink.is_server


def _name_problem(job: Job) -> str:
    name = job.collection_name
    what = repr(name) if job.sink.collection else f"the job name {name!r} (the default)"
    return (f"sink.collection: {what} is not a Milvus collection name (letters, digits and _, "
            f"not starting with a digit); set sink.collection, e.g. {_suggest(name)!r}")


def _suggest(name: str) -> str:
    fixed = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return fixed if _MILVUS_NAME.match(fixed) else f"_{fixed}"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the root always does)."""
    return next(p for p in (path, *path.parents) if p.exists())


def _blocked(path: Path, existing: Path) -> str:
    """Why ``path`` cannot be a directory: it, or the ancestor ``existing``, is a file."""
    if existing == path:
        return f"{path} is a file, not a directory"
    return f"{existing} is a file, so {path} cannot be created"
