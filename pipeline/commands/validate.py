"""Checks that need more than the job file: the model on disk, the source paths, the
sink's token variable and certificate files, the checkpoint directory, and the destination.

``validate`` prints every problem; ``run`` refuses to start on the same ones, so a job that
validates is a job that starts. Only two checks may need the network: a remote destination
(a Milvus server), and a ``datasets`` source named by its hub id; ``validate --offline`` skips
them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, JobError, TransientError
from pipeline.job.config import Job
from pipeline.run.context import load_model_info
from pipeline.sinks.paths import blocked, nearest_existing

if TYPE_CHECKING:
    from pipeline.sinks import Destination


def sink_problems(job: Job) -> list[str]:
    """What keeps the sink from being made (a token variable unset, a certificate file
    missing), found before anything connects."""
    return [f"{job.source_file}: {p}" for p in job.sink.problems(job.resolve)]


def sink_warnings(job: Job) -> list[str]:
    """What the sink's settings allow but should not stay so (a token in the job file)."""
    return [f"{job.source_file}: {w}"
            for w in job.sink.warnings(job.source_file, job.from_env, job.collection_name)]


def checkpoint_problems(job: Job, stored: dict[str, Any] | None) -> list[str]:
    """The checkpoint directory must be, or be creatable as, a writable directory (``run``
    takes its lock there before anything else), and not hold another job's state (``stored``:
    the identity its sync state records)."""
    where = job.checkpoint_path
    existing = nearest_existing(where)
    if not existing.is_dir():
        return [(f"{job.source_file}: checkpoint_dir: {blocked(where, existing)}; remove it "
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
    """What the job file says about the destination that is wrong before anything connects
    (a name the destination refuses, a file where a directory must go)."""
    return [f"{job.source_file}: {p}"
            for p in job.sink.destination_problems(job.resolve, job.collection_name)]


@dataclass
class Validation:
    """Everything ``validate`` found, and which checks it made or skipped (``notes``)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreachable: bool = False  # a remote destination did not answer (its checks were not made)


def validate_job(job: Job, offline: bool = False) -> Validation:
    """Every problem ``validate`` can find, each one line naming the job file. The destination
    is opened (never created) only when the job file's own sink settings are right."""
    from pipeline.readers import check_source

    out = Validation(warnings=sink_warnings(job),
                     notes=[f"ignored: {note}" for note in job.ignored])
    try:
        load_model_info(job)
    except ConfigError as e:
        out.problems += str(e).splitlines()
    if job.runner == "ray":
        from pipeline.run.cluster.session import import_ray

        try:
            import_ray()
        except ConfigError as e:
            out.problems.append(f"{job.source_file}: runner: {e}")
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
    sink, src = job.sink, job.source_file
    if sink.remote and offline:
        out.notes.append("destination: not checked (--offline)")
        return
    where = sink.location(job.resolve)
    try:
        probe = sink.probe(job.resolve, job.collection_name)
    except JobError as e:  # a Lite path not ending in .db, an index Lite does not build
        out.problems.append(f"{src}: {sink.where_key}: {e}")
        return
    local = sink.local_path(job.resolve)
    if local is not None and not local.exists():
        out.notes.append(f"destination: not checked ({where} does not exist yet; the first run "
                         f"creates it)")
        return
    try:
        problem = _ownership_problem(job, probe, owned)
    except TransientError as e:
        out.problems.append(f"{src}: sink.uri: cannot reach the server: {e}; check the URI and "
                            f"that the server is up (validate --offline skips this check)")
        out.notes.append(f"destination: not checked ({where} unreachable)")
        out.unreachable = True
        return
    except JobError as e:  # the destination could not be opened or read
        out.problems.append(f"{src}: {sink.where_key}: {e}")
        return
    finally:
        probe.close()
    if problem:
        out.problems.append(f"{src}: {sink.name_key}: {problem}")
    out.notes.append(f"destination: checked {where} ({'network' if sink.remote else 'local'})")


def _ownership_problem(job: Job, probe: Destination, owned: dict[str, str]) -> str | None:
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
    maker = "not made by embed-job" if mark is None else f"made by job {mark.job!r}"
    return (f"{job.sink.published_as(job.collection_name)} points at {live!r}, which this job "
            f"did not create ({maker}); use another {job.sink.name_key}")


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
