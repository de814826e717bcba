"""Before any work: is this checkpoint directory this job's, and are the destination's names
this job's to write and to publish?

The job only ever removes or replaces what its own state recorded creating (see
``SyncState.generations``); everything else is refused up front with one line, before a
single document is embedded. Two recoveries are made here too: a lost sync state is rebuilt
from the destination (whose generations carry the job's mark), and a destination that lost
the published generation is rebuilt on ``--mode full``.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import JobError, SinkError
from pipeline.job.config import Job
from pipeline.run.context import JobContext
from pipeline.run.report import RunReport
from pipeline.sinks.base import GenerationMark, Generations
from pipeline.state.sync_state import Published, SyncState


def job_identity(job: Job) -> dict[str, Any]:
    """What makes a job this job: its name, what it reads, where it writes (as written in
    the job file, so a moved project is still the same job; no credentials)."""
    src, sink = job.source, job.sink
    where = sink.identity_where()
    return {
        "name": job.name,
        "source": {"kind": src.kind, "path": src.paths(), "dataset": src.dataset,
                   "config": src.config, "split": src.split, "data_files": src.data_files},
        "sink": {"kind": sink.kind, "where": where, "collection": job.collection_name},
    }


def check_identity(job: Job, sync: SyncState, restart: bool) -> None:
    """Refuse a checkpoint directory that holds another job's state; record this job's."""
    stored, mine = sync.identity(), job_identity(job)
    if stored is None or stored == mine:
        sync.set_identity(mine)
        return
    where = job.checkpoint_path
    if stored.get("name") != mine["name"] or stored.get("sink") != mine["sink"]:
        raise JobError(f"{where}: holds the state of job {stored.get('name')!r} writing to "
                       f"{_describe(stored.get('sink', {}))}; this job ({mine['name']!r}) writes "
                       f"to {_describe(mine['sink'])}: give it its own checkpoint_dir")
    if not restart:
        raise JobError(f"{where}: was built from source {_source(stored.get('source', {}))}, "
                       f"this job reads {_source(mine['source'])}; if the new source replaces the "
                       f"old one, run with --restart")
    sync.set_identity(mine)


def check_destination(ctx: JobContext, sync: SyncState, probe: Generations, mode: str | None,
                      report: RunReport) -> bool:
    """Check the published name and the live generation against this job's state, adopting
    or resetting the state where the destination says so. True when an unfinished run must
    be discarded (its decision was made on a state that no longer holds)."""
    clash = probe.clash()
    if clash:
        raise SinkError(clash)
    owned = sync.generations()
    live = probe.live()
    published = sync.published()
    alias = ctx.job.collection_name
    if published is None:
        if live is None or live in owned:
            return False
        mark = probe.mark_of(live)
        if mark is None or mark.job != ctx.job.name:
            raise SinkError(f"{report.sink}: {alias!r} points at {live!r}, which this job did not "
                            f"create ({_maker(mark)}); use another sink.collection / sink.path")
        n = sync.adopt(Published(mark.fingerprint, live, mark.generation), probe.rows_of(live))
        report.warn(f"sync state was missing: rebuilt from the live generation {live!r} "
                    f"({n:,} documents); it will not be dropped by this job")
        return True
    if not probe.exists(published.target):
        if mode != "full":
            raise SinkError(f"{report.sink}: the published generation {published.target!r} is "
                            f"gone from the destination, but the sync state says it holds "
                            f"{sync.doc_count():,} documents; run with --mode full to rebuild it")
        sync.reset_published()
        report.warn(f"the published generation {published.target!r} was gone from the "
                    f"destination: rebuilding it from scratch")
        return True
    if live is not None and live not in owned:
        raise SinkError(f"{report.sink}: {alias!r} now points at {live!r}, which this job did not "
                        f"create ({_maker(probe.mark_of(live))}); point it back at "
                        f"{published.target!r} or use another sink.collection / sink.path")
    return False


def check_target(sync: SyncState, probe: Generations, target: str, where: str,
                 report: RunReport) -> None:
    """The generation this run writes must be this job's or not exist yet; and say once what
    else the destination holds (it is never touched)."""
    owned = sync.generations()
    if target not in owned and probe.exists(target):
        mark = probe.mark_of(target)
        if mark is None or mark.state_id != sync.state_id:
            raise SinkError(f"{where}: {target!r} exists and was not created by this job "
                            f"({_maker(mark)}); remove it or use another sink.collection / "
                            f"sink.path")
    foreign = [n for n in probe.neighbours() if n not in owned and n != target]
    if foreign:
        report.warn(f"{where}: the destination also holds {len(foreign)} entries this job did "
                    f"not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                    f"they are left alone")


def _maker(mark: GenerationMark | None) -> str:
    return "not made by embed-job" if mark is None else f"made by job {mark.job!r}"


def _describe(sink: dict[str, Any]) -> str:
    return f"{sink.get('kind')} {sink.get('where')} ({sink.get('collection')})"


def _source(source: dict[str, Any]) -> str:
    return str(source.get("dataset") or source.get("path"))
