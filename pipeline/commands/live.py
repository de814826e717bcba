"""The live generation, opened for reading by ``search``, ``audit`` and ``eval``, and how
those commands end on a user's mistake."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from pipeline.errors import JobError
from pipeline.job.config import Job
from pipeline.run.context import check_sink
from pipeline.secrets import quiet_client_logs
from pipeline.sinks.base import Searchable


@contextmanager
def live_index(job: Job) -> Iterator[Searchable]:
    """What readers see now, through the job's sink; one line when nothing is published."""
    check_sink(job)
    local = job.sink.local_path(job.resolve)
    if local is not None and not local.exists():
        raise JobError(f"{job.source_file}: {job.sink.where_key}: {local} does not exist: "
                       f"nothing published yet (run the job first)")
    sink = job.sink.make(job.resolve, job.collection_name, job.collection_name)
    try:
        if not isinstance(sink, Searchable):
            raise JobError(f"{job.source_file}: sink.kind {job.sink.kind}: this sink cannot be "
                           f"read back")
        with quiet_client_logs():  # after make(): importing pymilvus resets its loggers
            yield sink
    finally:
        sink.close()


def fail(error: JobError) -> NoReturn:
    """One ``error:`` line per line of the message, and the error's exit code."""
    for line in str(error).splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(error.exit_code)
