"""The ``embed-job audit JOB [--repair] [--json]`` command line: the audit (``audit.py``), or
the repair (``repair.py``, imported only then: it loads the run's machinery)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from pipeline.commands.audit import audit
from pipeline.commands.live import fail
from pipeline.errors import (
    EXIT_AUDIT_MISMATCH,
    EXIT_SIGNAL_BASE,
    EXIT_UNAVAILABLE,
    JobError,
    TransientError,
)
from pipeline.job.config import Job
from pipeline.job.load import load_job
from pipeline.secrets import redact


@click.command(name="audit")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--repair", is_flag=True,
              help="Make the live index agree with the source: embed again the documents the "
                   "findings concern, through an incremental run, delete rows of documents "
                   "this job never published; then audit again.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (with --repair: both audits and the run).")
def audit_command(job_file: Path, repair: bool, as_json: bool) -> None:
    """Reconcile the source with the live index, document by document.

    Reports documents missing from the index, rows whose document is gone (orphans) or
    changed (stale), duplicate keys and chunks, chunk counts that differ from the current
    chunking, and vectors that are not finite or not unit length. With --repair, prints what
    it will do, does it, and audits again. Exit 0 when the index matches the source (after a
    repair: now matches), 7 when it does not (2 for a bad job file or an unreadable
    destination, 6 for a destination that did not answer).
    """
    job = None
    try:
        job = load_job(job_file)
        if not repair:
            result = audit(job)
            click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())
            ok = result.ok
        else:
            ok = _repair(job, as_json)
    except JobError as e:
        fail(e)
    except TransientError as e:
        text = redact(str(e), job.sink.secrets() if job is not None else ())
        click.echo(f"error: {text} (still failing after every retry; run again later: a repair "
                   f"under way is finished by `embed-job run`)", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        click.echo("error: interrupted (a repair under way is finished by `embed-job run`)",
                   err=True)
        sys.exit(EXIT_SIGNAL_BASE + signal.SIGINT)
    if not ok:
        sys.exit(EXIT_AUDIT_MISMATCH)


def _repair(job: Job, as_json: bool) -> bool:
    """The repair, told as it goes (on stderr with --json, so stdout is the JSON alone)."""
    from pipeline.commands.repair import repair

    result = repair(job, lambda line: click.echo(line, err=as_json))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif result.after is not None:
        click.echo(result.run_line())
        click.echo(result.after.summary())
    return result.ok
