"""Error kinds, split the way a scheduler needs them: stop now, or try again."""

from __future__ import annotations


class JobError(Exception):
    """A terminal, user-facing problem (bad config, bad data, incompatible store).

    The message is one line naming the place (file, row, field); the CLI prints it
    without a traceback.
    """

    exit_code = 2


class ConfigError(JobError):
    """The job file is invalid."""


class InputError(JobError):
    """A source row or file is malformed and the job says to stop on bad rows."""


class SinkError(JobError):
    """The destination refused the data for a reason a retry cannot fix."""


class FingerprintMismatch(JobError):
    """The checkpoint was made by a job whose vectors would differ from this one's."""

    exit_code = 3


class TransientError(Exception):
    """A failure worth retrying (connection refused, timeout, rate limit)."""
