"""The command line, run in this process (Click's runner) or in a child process (where a real
process, a signal or a kill is the point), and what a run leaves in its checkpoint directory.

Either way a command gets the caller's environment without its ``EMBED_JOB_*`` variables (a
fault or a limit set in the shell must not leak into a test), plus the ``env`` given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from helpers.jobs import state_dir
from pipeline.cli import main

Env = Mapping[str, str | None]  # None: the variable unset
TIMEOUT_S = 300


@dataclass(frozen=True)
class Result:
    """How one command ended."""

    exit_code: int  # a child killed by a signal: minus the signal's number
    stdout: str
    stderr: str
    output: str  # what a user would read: Click's mix of both; a child's stdout, then stderr
    report_file: Path | None = None  # where --report was asked for
    exception: BaseException | None = None  # raised in this process (with catch), not SystemExit

    @property
    def report(self) -> dict[str, Any]:
        """The JSON report the run wrote."""
        assert self.report_file is not None, "the command was run without --report"
        return json.loads(self.report_file.read_text())


def _environment(env: Env | None, fault: str | None = None) -> dict[str, str | None]:
    """The changes to the caller's environment a command runs with; ``fault`` is
    EMBED_JOB_FAULT's value."""
    changes: dict[str, str | None] = {k: None for k in os.environ if k.startswith("EMBED_JOB_")}
    changes.update(env or {})
    if fault:
        changes["EMBED_JOB_FAULT"] = fault
    return changes


def _child_environment(changes: Mapping[str, str | None]) -> dict[str, str]:
    """A child process's whole environment."""
    return {k: v for k, v in {**os.environ, **changes}.items() if v is not None}


def invoke(*args: str, process: bool = False, env: Env | None = None, cwd: Path | None = None,
           catch: bool = False, fault: str | None = None) -> Result:
    """``embed-job ARGS``: in this process, where an exception other than SystemExit
    propagates (with ``catch``, the result holds it, as a crash a test records); or with
    ``process`` as ``python -m pipeline.cli ARGS`` in a child process in ``cwd``."""
    changes = _environment(env, fault)
    if process:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args],
                              env=_child_environment(changes), cwd=cwd, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        return Result(done.returncode, done.stdout, done.stderr, done.stdout + done.stderr)
    assert cwd is None, "a working directory needs a child process"
    result = CliRunner().invoke(main, list(args), env=changes, catch_exceptions=catch)
    crashed = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
    return Result(result.exit_code, result.stdout, result.stderr, result.output,
                  exception=crashed)


def _run_args(job: Path, args: tuple[str, ...], quiet: bool, report: bool
              ) -> tuple[list[str], Path | None]:
    """The arguments of ``embed-job run JOB``, and the report file (an older one removed)."""
    report_file = job.parent / "report.json" if report else None
    if report_file is not None:
        report_file.unlink(missing_ok=True)
    return (["run", str(job), *(["--quiet"] if quiet else []),
             *(["--report", str(report_file)] if report_file else []), *args], report_file)


def run(job: Path, *args: str, quiet: bool = True, report: bool = True, process: bool = False,
        fault: str | None = None, env: Env | None = None, catch: bool = False,
        expect: Collection[int] | None = None) -> Result:
    """``embed-job run JOB [--quiet] [--report JOB_DIR/report.json] ARGS`` as ``invoke`` runs
    it (a child process in the job's directory); with ``expect``, the exit code must be one
    of those."""
    argv, report_file = _run_args(job, args, quiet, report)
    done = invoke(*argv, process=process, env=env, cwd=job.parent if process else None,
                  catch=catch, fault=fault)
    if expect is not None:
        assert done.exit_code in expect, done.output
    return replace(done, report_file=report_file)


@dataclass(frozen=True)
class Running:
    """An ``embed-job run`` in a child process, still going: signal it, then finish it."""

    job: Path
    proc: subprocess.Popen[str]
    report_file: Path | None

    def finish(self, timeout: float = TIMEOUT_S) -> Result:
        """Wait for the process to end; how it ended."""
        stdout, stderr = self.proc.communicate(timeout=timeout)
        return Result(self.proc.returncode, stdout, stderr, stdout + stderr, self.report_file)


def start(job: Path, *args: str, quiet: bool = True, report: bool = True,
          fault: str | None = None, env: Env | None = None) -> Running:
    """``run``'s command started in a child process, not waited for."""
    argv, report_file = _run_args(job, args, quiet, report)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv],
                            env=_child_environment(_environment(env, fault)),
                            cwd=job.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return Running(job, proc, report_file)


def ledger(job: Path) -> dict[str, Any]:
    """The unfinished run's checkpoint (the body its checksum seals)."""
    return _sealed(state_dir(job).checkpoint)


def _sealed(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["state"]


def dead_letters(job: Path) -> list[dict[str, Any]]:
    """The dead letters of the job's last run ([] without a dead-letter file)."""
    path = state_dir(job).dead_letters
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_for_first_ack(running: Running, timeout: float = 120.0) -> None:
    """Poll the run's checkpoint until some vectors are acknowledged; the process must still
    be running then (so a signal sent next lands mid-run)."""
    checkpoint = state_dir(running.job).checkpoint
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running.proc.poll() is None:
        if checkpoint.exists() and _sealed(checkpoint)["vectors_written"] > 0:
            break
        time.sleep(0.005)
    assert running.proc.poll() is None, "the run finished before the signal could be sent"
