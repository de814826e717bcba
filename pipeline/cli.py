"""The ``embed-job`` command line: commands, one-line errors and warnings, reports.

The exit codes are ``pipeline.errors``' EXIT_* table (and the group help lists them); 1 is
an internal error, the only case with a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
import yaml

from pipeline.commands.audit_cli import audit_command
from pipeline.commands.evaluate import eval_command
from pipeline.commands.search import search
from pipeline.errors import (
    EXIT_BAD_INPUT,
    EXIT_NOTHING_TO_DO,
    EXIT_SIGNAL_BASE,
    EXIT_UNAVAILABLE,
    JobError,
    TransientError,
)
from pipeline.job.config import Job
from pipeline.job.load import load_job
from pipeline.run.devices import NO_MULTICAST
from pipeline.secrets import MASK, quiet_client_logs, redact, redacted_logging

if TYPE_CHECKING:
    from pipeline.run.report import RunReport

EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT

# gRPC's C core logs a failed TLS handshake at INFO on stderr, beside our one-line error.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# NVLink multicast off here as in every worker: an engine this process starts (an SGLang
# engine given tp_size > 1 in model.sglang.extra) inherits it.
os.environ.update(NO_MULTICAST)


def _fail(error: JobError, secrets: Sequence[str] = ()) -> None:
    for line in redact(str(error), secrets).splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(error.exit_code)


def _resolved(job: Job) -> str:
    """The job as ``validate`` prints it: defaults filled in, the token as ***, URIs without
    their password."""
    data = job.model_dump(mode="json")
    if data["sink"].get("token") is not None:
        data["sink"]["token"] = MASK
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return redact(text, job.sink.secrets())


@click.group()
@click.version_option(package_name="embed-job")
def main() -> None:
    """Embed a corpus into Milvus or Parquet, resumably.

    A job file (YAML) says what to read (source), how to chunk and embed it (chunking, model,
    batching), where the vectors go (sink) and where progress is kept (checkpoint_dir). Paths
    in it are relative to the job file. The init command prints one with every setting, its
    default and what it does.

    \b
    Start:
      embed-job init > job.yaml     a commented job file: edit source, model, sink
      embed-job validate job.yaml   check settings, model, source, destination
      embed-job run job.yaml        run it; again to resume, or to sync changes
      embed-job status job.yaml     progress (safe while it runs)

    \b
    Exit codes:
      0    done
      1    internal error (a bug; the only case with a traceback)
      2    bad job file, input or destination, or too many dead letters
      3    unfinished run of a different configuration (--restart discards it)
      4    another run of this job holds the lock
      5    nothing to do (incremental run, no document changed)
      6    destination unavailable after every retry (progress kept; retry later)
      7    audit: the index differs from the source
      130  stopped by SIGINT (Ctrl-C), resumable: run the same command again
      143  stopped by SIGTERM, resumable: run the same command again
    """


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["full", "incremental"]),
              help="Override sync.mode: full re-embeds every document, incremental only changed ones.")
@click.option("--restart", is_flag=True, help="Discard the unfinished run (plan and checkpoint).")
@click.option("--limit", type=click.IntRange(min=1), help="Plan at most N documents (a trial run).")
@click.option("--dry-run", is_flag=True, help="Print what would be added/updated/deleted; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary (for cron).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a JSON report of the run to this file (also when it fails).")
@click.option("--prom", "prom_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report's counters as a Prometheus textfile (*.prom).")
@click.option("--accept-missing-files", is_flag=True,
              help="Source files read before and missing now were removed on purpose: let "
                   "sync.delete_missing delete their documents.")
@click.option("--progress-every", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="When stderr is not a terminal: print a progress line this many seconds "
                   "apart (instead of a redrawn bar).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: every line on stderr is a JSON object (progress, "
                                      "warnings, errors, the summary) for log shippers.")
@click.option("--gpus", help="Embed on GPUs of this host, one worker process each: all, a "
                             "count (2), or indexes (0,2,5). Overrides model.gpus.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes per GPU, or on "
              "the CPU without --gpus. Overrides model.workers.")
@click.option("--runner", type=click.Choice(["local", "ray"]), help="Overrides runner.")
@click.option("--ray-address", help="A Ray cluster (host:6379, ray://host:10001); overrides ray.address.")
def run(job_file: Path, mode: str | None, restart: bool, limit: int | None, dry_run: bool,
        quiet: bool, report_path: Path | None, prom_path: Path | None,
        accept_missing_files: bool, progress_every: float, log_format: str,
        gpus: str | None, workers: int | None, runner: str | None, ray_address: str | None) -> None:
    """Run (or resume) the job in JOB_FILE.

    A run plans (reads the source, chunks it, sorts the chunks into batches on disk), embeds
    the batches its ledger lacks, writes them to the sink and publishes the result. Killed
    or stopped, it resumes where it stopped when run again; run nightly, it embeds only the
    documents that changed. Warnings (dead letters, deletions, anything refused) are printed
    even with --quiet; --report and --prom are written whatever happens.
    """
    from pipeline.run.context import RunOptions
    from pipeline.run.devices import parse_gpus
    from pipeline.run.report import RunReport
    from pipeline.run.runner import run_job
    from pipeline.run.signals import graceful_stop
    from pipeline.state.checkpoint import Mode

    out = _Console(log_format)
    report = RunReport(job=job_file.stem)
    secrets: list[str] = []
    # signal handlers first: a Ctrl-C or SIGTERM during start-up stops cleanly, with a message
    with graceful_stop() as stop:
        try:
            try:
                job = load_job(job_file)
            except JobError as e:
                report.status, report.error = "failed", str(e).splitlines()[0]
                raise
            report.job = job.name
            if dry_run:
                from pipeline.run.preview import preview

                report_path = prom_path = None  # a dry run writes nothing
                click.echo(preview(job, mode))
                return
            secrets = job.sink.secrets()
            report.hide(secrets)
            options = RunOptions(restart=restart, limit=limit, progress=not quiet,
                                 gpus=None if gpus is None else parse_gpus(gpus),
                                 workers=workers, runner=runner, ray_address=ray_address,
                                 mode=cast("Mode | None", mode),
                                 accept_missing_files=accept_missing_files,
                                 progress_interval_s=progress_every,
                                 progress_emit=out.progress)
            with redacted_logging(secrets), quiet_client_logs():
                run_job(job, options, report, stop)
        except KeyboardInterrupt:
            report.status = "interrupted"
            out.error("interrupted: progress is checkpointed; run the same command to resume")
            sys.exit(EXIT_INTERRUPTED)
        except JobError as e:
            out.fail(e, secrets)
        except TransientError as e:
            out.error(redact(f"{e} (still failing after {job.sink.retries} attempts; progress "
                             f"is checkpointed — run again later)", secrets))
            sys.exit(EXIT_UNAVAILABLE)
        except OSError as e:  # the machine, not the job: a full disk, a read-only directory
            report.status, report.error = "failed", _os_error(e)
            out.error(redact(_os_error(e), secrets))
            sys.exit(EXIT_BAD_INPUT)
        finally:
            for warning in report.warnings:
                out.warn(redact(warning, secrets))
            if report_path:
                report.write_json(report_path)
            if prom_path:
                report.write_prometheus(prom_path)
    if not quiet:
        out.summary(report)
    if report.outcome == "nothing_to_do":
        sys.exit(EXIT_NOTHING_TO_DO)


class _Console:
    """Where `run` tells the user things: plain lines, or one JSON object a line."""

    def __init__(self, log_format: str) -> None:
        self.json = log_format == "json"

    def _line(self, level: str, message: str) -> None:
        if self.json:
            click.echo(json.dumps({"level": level, "message": message}), err=True)
        else:
            click.echo(message if level == "info" else f"{level}: {message}", err=True)

    def progress(self, line: str) -> None:
        self._line("info", line)

    def warn(self, message: str) -> None:
        self._line("warning", message)

    def error(self, message: str) -> None:
        self._line("error", message)

    def fail(self, error: JobError, secrets: Sequence[str]) -> None:
        for line in redact(str(error), secrets).splitlines():
            self.error(line)
        sys.exit(error.exit_code)

    def summary(self, report: RunReport) -> None:
        if self.json:
            click.echo(json.dumps({"level": "info", "summary": report.to_dict()}), err=True)
        else:
            click.echo(report.summary(), err=True)


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; nothing acknowledged is lost — fix it and run again"


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--offline", is_flag=True,
              help="Skip the checks that need the network: a Milvus server destination "
                   "(http(s)://) and a source named by its Hugging Face hub id.")
def validate(job_file: Path, offline: bool) -> None:
    """Check a job file; print it resolved.

    Checks the settings, the model, the source, the sink's token and certificates, the
    checkpoint directory and the destination: a Milvus Lite db or Parquet directory that
    exists is opened and read (nothing is created), a Milvus server is connected to. The
    destination must not hold, under the job's collection name, something this job did not
    make. Two checks need the network, and --offline skips them: a Milvus server
    destination, and a source named by its Hugging Face hub id.

    Prints the job with every default filled in on stdout (the token as ***); on stderr, one
    "error:" line per problem and "#" lines saying what was checked or skipped.

    \b
    Exit codes:
      0  the job is valid
      2  problems, one line each
      6  nothing else wrong, but the Milvus server did not answer (try again later)
    """
    from pipeline.commands.validate import validate_job

    try:
        job = load_job(job_file)
        with quiet_client_logs():
            found = validate_job(job, offline)
    except JobError as e:
        _fail(e)
    secrets = job.sink.secrets()
    for prefix, lines in (("warning: ", found.warnings), ("error: ", found.problems),
                          ("# ", found.notes)):
        for line in lines:
            click.echo(prefix + redact(line, secrets), err=True)
    if found.problems:
        only_unreachable = found.unreachable and len(found.problems) == 1
        sys.exit(EXIT_UNAVAILABLE if only_unreachable else EXIT_BAD_INPUT)
    click.echo(_resolved(job), nl=False)
    click.echo(f"# {job_file}: OK", err=True)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(job_file: Path, as_json: bool) -> None:
    """Show a job's progress and dead letters.

    Read from the checkpoint directory without taking the lock, so it is safe while a run
    goes on: the published generation, the unfinished run (batches done of those planned;
    "plan incomplete" while the corpus is still being planned, when no percentage is known),
    and where the dead letters are, with their most common reasons.
    """
    from pipeline.commands.status import job_status

    try:
        state = job_status(load_job(job_file))
    except JobError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    width = max(map(len, state))
    for key, value in state.items():
        click.echo(f"{key:{width}}  {_shown(value)}")


def _shown(value: object) -> str:
    """A status value on one line: reasons as "count x reason; ...", nothing as "-"."""
    if isinstance(value, dict):
        return "; ".join(f"{n} x {reason}" for reason, n in value.items()) or "-"
    return "-" if value is None else str(value)


@main.command()
@click.option("--sink", "sink_kind", type=click.Choice(["milvus", "parquet"]), default="milvus",
              show_default=True, help="Where vectors go: Milvus (a Lite db, or a server) or "
                                      "Parquet files.")
@click.option("--source", "source_kind", type=click.Choice(["jsonl", "parquet", "hf"]),
              default="jsonl", show_default=True,
              help="What the corpus is: JSON lines, Parquet files, or a Hugging Face "
                   "datasets dataset.")
def init(sink_kind: str, source_kind: str) -> None:
    """Print a commented job file to start from.

    Every setting is there with a one-line comment, at its default (model.device: cpu
    aside). It only prints (it never writes or overwrites a file), so redirect it:

    \b
      embed-job init > job.yaml
      embed-job init --sink parquet --source hf > job.yaml

    As printed, the job embeds data/*.jsonl (beside the job file) with the model
    all-MiniLM-L6-v2 on the CPU (no download: its weights ship as a package) into the Milvus
    Lite db out/my_job.db; it validates as soon as that corpus exists.
    """
    click.echo(job_template(sink=sink_kind, source=source_kind), nl=False)


def job_template(**choices: str) -> str:
    """pipeline/job/job_template.yaml for these choices: a line ``#@ key=value`` starts lines
    kept only when ``choices[key] == value``, up to the next ``#@`` line (``#@ end``: kept
    whatever the choice). One file holds every variant, so they cannot drift apart."""
    from importlib.resources import files

    text = files("pipeline.job").joinpath("job_template.yaml").read_text(encoding="utf-8")
    lines, keep = [], True
    for line in text.splitlines(keepends=True):
        marker = line.strip()
        if marker.startswith("#@"):
            key, _, value = marker[2:].strip().partition("=")
            keep = key == "end" or choices[key] == value
        elif keep:
            lines.append(line)
    return "".join(lines)


main.add_command(search)
main.add_command(audit_command)
main.add_command(eval_command)

if __name__ == "__main__":
    main()
