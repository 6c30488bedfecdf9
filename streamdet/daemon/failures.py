"""What the daemon does after a run failed: the retry policy, apart from its I/O.

:meth:`RetryPolicy.after` is pure: from the worker's :class:`~.jobs.JobFailed` and the
failures the file already counts it decides one of :class:`Retake`, :class:`Vanished`,
:class:`Retry` or :class:`GiveUp`; ``Daemon._failed`` carries it out (journal, retry
queue, quarantine, log). A lost worker is looked at before: when the pool itself is
broken no file is to blame, and the run is abandoned without asking the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import JobFailed


@dataclass(frozen=True)
class Retake:
    """The input was replaced between the daemon's look and the worker's open: the run
    is interrupted, and the file is taken again once it settles."""


@dataclass(frozen=True)
class Vanished:
    """The input disappeared before the worker opened it."""


@dataclass(frozen=True)
class Retry:
    """A transient failure with retries left: run it again after ``delay`` seconds."""

    delay: float
    error: str


@dataclass(frozen=True)
class GiveUp:
    """Quarantine the file. ``move_input``: the input is moved to the quarantine (if it is
    still the version that ran); an entry refused for safety stays where it is, as at the
    first look. ``counted``: the failure counts against ``--retries`` (transient)."""

    error: str
    counted: bool
    move_input: bool


Verdict = Retake | Vanished | Retry | GiveUp


@dataclass(frozen=True)
class RetryPolicy:
    """``--retries`` transient failures are retried, after ``retry_delay`` seconds,
    doubling each time, at most ``max_delay``; anything else is final at once."""

    retries: int = 2
    retry_delay: float = 2.0
    max_delay: float = 300.0

    def after(self, failed: JobFailed, failures: int) -> Verdict:
        """``failures``: transient failures the file counted before this one."""
        if failed.kind == "changed":
            return Retake()
        if failed.kind == "vanished":
            return Vanished()
        error = str(failed.error or "unknown error")
        transient = failed.kind == "transient"
        if transient and failures + 1 <= self.retries:
            return Retry(delay=min(self.max_delay, self.retry_delay * 2 ** failures),
                         error=error)
        if transient:
            error = f"{error} (gave up after {failures + 1} transient failures)"
        return GiveUp(error=error, counted=transient, move_input=failed.kind != "security")
