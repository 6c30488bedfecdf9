"""What crosses between the daemon and its workers: one :class:`Job` out, one result back.

These travel through a local process pool or a Dask cluster (pickled by reference), so
they are plain dataclasses in a module every worker imports, light enough for any worker
(standard library only), holding only picklable values.

A result is :class:`JobDone` or :class:`JobFailed`. :attr:`JobFailed.kind` says what the
daemon does next:

========== ============================================================================
kind       meaning
========== ============================================================================
permanent  a :class:`~streamdet.core.errors.BadInputError` (corrupt or truncated file,
           not MIRI, no reference for it): quarantined at once
transient  anything else (a crash, an I/O error, a lost worker): retried, then quarantined
security   the worker refused the entry (a symlink swapped in that leaves INBOX)
changed    the entry is not the version the daemon hashed: taken again once it settles
vanished   the entry disappeared before the worker opened it
========== ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """Process the inbox entry ``name`` (found at ``path``) into ``staging``."""

    id: int                  # the journal row
    attempt: int
    path: str
    name: str
    staging: str
    #: the inbox the worker opens ``name`` in (as an entry of it); None: open ``path``
    inbox: str | None = None
    #: (inode, size, mtime_ns) of the version the daemon hashed -- not the device number,
    #: which differs between hosts sharing a network filesystem
    expect: tuple[int, int, int] | None = None
    config: Any = None       # streamdet.core.engine.RunConfig; None: the defaults
    #: the daemon's CRDS_* variables, set in the worker before crds is imported
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobDone:
    """The products are in the job's staging directory."""

    products: dict[str, str]          # kind ("rate", "rateints") -> staged path
    seconds: float
    worker: str | None = None         # host:pid
    timings: dict[str, float] | None = None
    #: one-line warnings of observer plugins that failed (the file itself is fine)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobFailed:
    """The job produced nothing usable; ``kind`` (module doc) says why."""

    kind: str
    error: str
    worker: str | None = None
    seconds: float | None = None
    #: the worker was lost (died, or cannot run the daemon's code): the pool may be broken
    lost: bool = False
    traceback: str | None = None


JobResult = JobDone | JobFailed
