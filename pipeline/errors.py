"""Error kinds, split the way a scheduler needs them: stop now, or try again; and the one
table of exit codes the command line returns."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from typing import TypeVar

# exit codes of `embed-job` (the README and `embed-job --help` list the same)
EXIT_BAD_INPUT = 2  # JobError: bad job file, input or destination, too many dead letters
EXIT_OTHER_CONFIGURATION = 3  # FingerprintMismatch
EXIT_LOCKED = 4  # JobLocked
EXIT_NOTHING_TO_DO = 5
EXIT_UNAVAILABLE = 6  # TransientError after every retry
EXIT_AUDIT_MISMATCH = 7  # `embed-job audit`: the index differs from the source
EXIT_SIGNAL_BASE = 128  # Interrupted: 128 + the signal (130 SIGINT, 143 SIGTERM)


class JobError(Exception):
    """A terminal, user-facing problem (bad config, bad data, incompatible store).

    The message is one line naming the place (file, row, field); the CLI prints it
    without a traceback.
    """

    exit_code = EXIT_BAD_INPUT


class ConfigError(JobError):
    """The job file is invalid."""


class InputError(JobError):
    """A source row or file is malformed and the job says to stop on bad rows."""


class SinkError(JobError):
    """The destination refused the data for a reason a retry cannot fix."""


class FingerprintMismatch(JobError):
    """The checkpoint was made by a job whose vectors would differ from this one's."""

    exit_code = EXIT_OTHER_CONFIGURATION


class TransientError(Exception):
    """A failure worth retrying (connection refused, timeout, rate limit)."""


class JobLocked(JobError):
    """Another live process holds this job's lock."""

    exit_code = EXIT_LOCKED


class Interrupted(JobError):
    """The run stopped on a signal after checkpointing; running it again resumes."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; progress is checkpointed — run the same command "
                         f"to resume")
        self.exit_code = EXIT_SIGNAL_BASE + signum


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one short line, as every JobError message must be (a
    library's own text, which may span lines or pages, is folded and cut)."""
    text = " ".join((getattr(error, "message", "") or str(error) or type(error).__name__).split())
    return text if len(text) <= limit else text[:limit] + "..."


T = TypeVar("T")


def with_retries(fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.5) -> T:
    """Retry transient sink failures with exponential backoff and full jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except TransientError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0, base_delay * 2 ** attempt))
    raise AssertionError("unreachable")
