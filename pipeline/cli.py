"""The ``embed-job`` command line.

Exit codes: 0 done (documents embedded, synced), 1 internal error (a bug: traceback shown),
2 bad job/input/destination, 3 unfinished run of a different job configuration,
4 another run holds the lock, 5 nothing to do (incremental run, no document changed),
6 the destination stayed unavailable through every retry (try again later),
130/143 stopped by SIGINT/SIGTERM after checkpointing (resumable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from pipeline.config import load_job
from pipeline.errors import JobError, TransientError

EXIT_INTERRUPTED = 130
EXIT_NOTHING_TO_DO = 5
EXIT_UNAVAILABLE = 6


def _fail(error: JobError) -> None:
    for line in str(error).splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(error.exit_code)


@click.group()
@click.version_option(package_name="embed-job")
def main() -> None:
    """Embed a corpus into Milvus or Parquet, resumably. See README.md for job files."""


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
def run(job_file: Path, mode: str | None, restart: bool, limit: int | None, dry_run: bool,
        quiet: bool, report_path: Path | None, prom_path: Path | None) -> None:
    """Run (or resume) the job in JOB_FILE."""
    from pipeline.report import RunReport
    from pipeline.runner import RunOptions, run_job

    try:
        job = load_job(job_file)
        if dry_run:
            from pipeline.preview import preview

            click.echo(preview(job, mode))
            return
    except JobError as e:
        _fail(e)
    report = RunReport(job=job.name)
    try:
        run_job(job, RunOptions(restart=restart, limit=limit, progress=not quiet, mode=mode),
                report)
    except KeyboardInterrupt:
        report.status = "interrupted"
        click.echo("interrupted: progress is checkpointed; run the same command to resume",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except JobError as e:
        _fail(e)
    except TransientError as e:
        click.echo(f"error: {e} (still failing after {job.sink.retries} attempts; "
                   f"progress is checkpointed — run again later)", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    finally:
        if report_path:
            report.write_json(report_path)
        if prom_path:
            report.write_prometheus(prom_path)
    if not quiet:
        click.echo(report.summary(), err=True)
    if report.outcome == "nothing_to_do":
        sys.exit(EXIT_NOTHING_TO_DO)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
def validate(job_file: Path) -> None:
    """Check JOB_FILE (settings, model, source paths) and print the resolved job."""
    from pipeline.validation import job_problems

    try:
        job = load_job(job_file)
        problems = job_problems(job)
    except JobError as e:
        _fail(e)
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(2)
    click.echo(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False, allow_unicode=True),
               nl=False)
    click.echo(f"# {job_file}: OK", err=True)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(job_file: Path, as_json: bool) -> None:
    """Show a job's progress, read from its checkpoint (safe while it runs)."""
    from pipeline.status import job_status

    try:
        state = job_status(load_job(job_file))
    except JobError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    for key, value in state.items():
        click.echo(f"{key:16} {value}")


if __name__ == "__main__":
    main()
