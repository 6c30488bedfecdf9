"""The intake decision: what the daemon does with an inbox entry the settler found complete.

:meth:`Intake.decide` is pure: it reads only the :class:`IntakeFacts` it is given and
returns one typed decision. The daemon (``Daemon._take``) gathers the facts -- the
entry's ``lstat``, the safety check, the journal's current row for the name, the opened
file's ``fstat``, its SHA-256 -- and carries the decision out (journal, log, queue, moves).

Some facts cost something or are unsafe to gather too early: an entry is opened only once
its name and symlink chain are known to be safe, and hashed only when its content
matters. So the decision may be :class:`Look` -- "open it" or "hash it" -- and the daemon
gathers that fact and asks again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from .journal import PENDING, Row
from .watcher import name_problem


@dataclass(frozen=True)
class FileVersion:
    """One version of one file as ``stat`` saw it: same inode, same size, same mtime."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def ident(self) -> tuple[int, int]:
        """(size, mtime_ns): what the journal records of a version."""
        return self.size, self.mtime_ns


@dataclass(frozen=True)
class Opened:
    """What opening the entry as an entry of INBOX (:func:`.watcher.open_entry`) gave."""

    outcome: Literal["file", "refused", "not_file", "denied"]
    #: the opened regular file's ``fstat`` (outcome ``file``)
    version: FileVersion | None = None
    #: why and as what kind it was refused (outcome ``refused``: a symlink leaving INBOX)
    reason: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class IntakeFacts:
    """What the daemon observed about one inbox entry."""

    name: str
    #: the entry's ``lstat``; None: it is gone
    entry: FileVersion | None
    #: :func:`.watcher.check_safe`'s reason to refuse the entry without reading it
    unsafe: str | None = None
    #: the journal's current row for the name (the newest one)
    latest: Row | None = None
    #: the version of ``latest`` the daemon last hashed in this run
    hashed: FileVersion | None = None
    #: ``latest`` is already waiting in the daemon's queue or running
    scheduled: bool = False
    #: None: not opened yet
    opened: Opened | None = None
    #: None: not hashed yet
    sha256: str | None = None
    #: the file changed while it was being hashed (its hash means nothing)
    hash_unstable: bool = False


# -- decisions ------------------------------------------------------------------------------

class Decision:
    """What to do with the entry.

    ``keep_watching``: not decided yet, the settler keeps the name; ``remember``: the
    entry's (size, mtime) is remembered so that rescans do not look at it again until it
    changes."""

    keep_watching: ClassVar[bool] = False
    remember: ClassVar[bool] = True


@dataclass(frozen=True)
class Look(Decision):
    """Gather one more fact and decide again."""

    what: Literal["open", "hash"]


@dataclass(frozen=True)
class Wait(Decision):
    """The file changed while it was hashed: look again once it has settled."""

    keep_watching: ClassVar[bool] = True
    remember: ClassVar[bool] = False


@dataclass(frozen=True)
class Gone(Decision):
    """The entry disappeared before it was looked at: nothing to do."""

    remember: ClassVar[bool] = False


@dataclass(frozen=True)
class Running(Decision):
    """Its journal row is running: looked at again when the run ends."""

    row_id: int
    remember: ClassVar[bool] = False


@dataclass(frozen=True)
class Refuse(Decision):
    """Refused without reading it (kind ``security``: unsafe name or symlink; ``name``:
    a name the daemon cannot handle). ``recorded``: this very version of the entry is
    already recorded as refused, so nothing is written again."""

    reason: str
    kind: str
    recorded: bool


@dataclass(frozen=True)
class Unreadable(Decision):
    """The daemon may not read it (permission denied); ``recorded`` as for :class:`Refuse`."""

    recorded: bool


@dataclass(frozen=True)
class NotAFile(Decision):
    """A dangling symlink, a directory, a FIFO...: ignored."""


@dataclass(frozen=True)
class Requeue(Decision):
    """Its journal row still has work to do (seen, or failed and waiting for a retry).
    ``identity_changed``: the file was replaced meanwhile, the row takes the new size,
    mtime and hash (the new content is what runs); ``enqueue``: it is not already queued
    or running."""

    row_id: int
    identity_changed: bool
    enqueue: bool


@dataclass(frozen=True)
class Settled(Decision):
    """The very file (same size and mtime, left in place) whose row is already settled."""

    row_id: int


@dataclass(frozen=True)
class AlreadyDone(Decision):
    """Same content as the version already done: nothing is redone (the input is archived
    again when ``archive``)."""

    row_id: int
    archive: bool


@dataclass(frozen=True)
class SameContent(Decision):
    """Same content as a version ignored, or quarantined and left in place: the row takes
    the entry's new size and mtime, nothing else happens."""

    row_id: int


@dataclass(frozen=True)
class IgnoreChange(Decision):
    """New content under the name of a processed file, with ``--on-change ignore``: a new
    row records it as ignored."""


@dataclass(frozen=True)
class Take(Decision):
    """A new version to process: a new row, queued. ``changed``: a processed file's name
    with new content (``--on-change reprocess``)."""

    changed: bool


# -- the decision ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Intake:
    """The daemon's intake rules (docs/watch.md, "How a file travels")."""

    #: the longest file name every directory the daemon names files in takes
    name_max: int = 255
    on_change: Literal["reprocess", "ignore"] = "reprocess"
    #: done inputs are moved to an archive
    archive: bool = False

    def decide(self, facts: IntakeFacts) -> Decision:
        f = facts
        if f.entry is None:
            return Gone()
        reason, kind = f.unsafe, "security"
        if reason is None:
            reason, kind = name_problem(f.name, self.name_max), "name"
        if reason:
            return self._refuse(f, reason, kind)
        if f.opened is None:
            return Look("open")
        if f.opened.outcome == "refused":
            return self._refuse(f, f.opened.reason or "refused", f.opened.kind or "security")
        if f.opened.outcome == "not_file":
            return NotAFile()
        if f.opened.outcome == "denied":
            return Unreadable(recorded=self._recorded(f, "unreadable"))
        version = f.opened.version
        latest = f.latest
        if latest is not None:
            if latest.state == "running":
                return Running(latest.id)
            if latest.state in PENDING:
                changed = False
                if f.hashed != version:    # not hashed as it is now
                    if f.hash_unstable:
                        return Wait()
                    if f.sha256 is None:
                        return Look("hash")
                    changed = (latest.size, latest.mtime_ns, latest.sha256) != \
                        (*version.ident, f.sha256)
                return Requeue(latest.id, identity_changed=changed, enqueue=not f.scheduled)
            if (latest.size, latest.mtime_ns) == version.ident and not latest.moved_to:
                return Settled(latest.id)
        if f.hash_unstable:
            return Wait()
        if f.sha256 is None:
            return Look("hash")
        if latest is not None and latest.sha256 == f.sha256:
            if latest.state == "done":
                return AlreadyDone(latest.id, archive=self.archive)
            if latest.state == "ignored" or (latest.state == "quarantined"
                                             and not latest.moved_to):
                return SameContent(latest.id)
            # quarantined and moved away, or vanished: a fresh delivery, tried again
        changed = latest is not None and latest.state in ("done", "ignored")
        if changed and self.on_change == "ignore":
            return IgnoreChange()
        return Take(changed=changed)

    @staticmethod
    def _recorded(f: IntakeFacts, kind: str) -> bool:
        """This version of the entry is already recorded as refused for ``kind``."""
        return (f.latest is not None and f.latest.error_kind == kind
                and (f.latest.size, f.latest.mtime_ns) == f.entry.ident)

    def _refuse(self, f: IntakeFacts, reason: str, kind: str) -> Refuse:
        return Refuse(reason, kind, recorded=self._recorded(f, kind))
