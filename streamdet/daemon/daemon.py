"""The watch loop: inbox events -> complete files -> journal -> executor -> products.

One thread (the main one) owns the journal and every decision; the watchdog observer and
the executors only put items on thread-safe queues. See docs/watch.md for the guarantees.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
import os
import shutil
import signal
import sqlite3
import stat as statmod
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import watcher as w
from .failures import GiveUp, Retake, Retry, RetryPolicy, Vanished
from .intake import (AlreadyDone, Decision, FileVersion, IgnoreChange, Intake, IntakeFacts, Look,
                     Opened, Requeue, Refuse, SameContent, Take, Unreadable)
from .jobs import Job, JobDone, JobFailed
from .journal import PENDING, Journal, Row
from .journal import storable as _storable
from .log import EventLog

STAGING = ".streamdet-staging"
QUARANTINE = "quarantine"
LOCKFILE = "daemon.lock"
#: where local workers' stdout/stderr (library warnings) go
WORKER_LOG = "workers.log"


class WatchError(Exception):
    """A problem with the daemon's arguments or environment (exit code 2)."""


@dataclass
class WatchOptions:
    inbox: Path
    outbox: Path
    state_dir: Path | None = None
    workers: int | None = None
    dask_scheduler: str | None = None
    config: Any = None                 # streamdet.core.engine.RunConfig
    once: bool = False
    poll: bool = False
    settle: float = 2.0
    pattern: str = "*_uncal.fits"
    retries: int = 2
    archive: Path | None = None
    on_change: str = "reprocess"       # or "ignore"
    log_format: str = "text"
    grace: float = 30.0                # seconds to let running files finish on SIGTERM
    rescan_interval: float = 30.0      # safety-net rescan of INBOX (missed events)
    summary_interval: float = 60.0
    retry_delay: float = 2.0           # first retry after this, doubling, at most 300 s
    poll_interval: float = 1.0
    #: quiet time after which a still structurally incomplete file is taken anyway
    #: (None: max(60 s, 10 x settle); with --once: the settle time)
    stall: float | None = None
    rebuild_journal: bool = False      # move a broken journal aside, rebuild from OUTBOX


@dataclass
class _Flight:
    row: Row
    run_id: int
    attempt: int
    staging: Path
    started: float = field(default_factory=time.monotonic)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _move_entry(src: Path, dest: Path) -> None:
    """Move the inbox entry ``src`` itself (a symlink stays a symlink, its target is never
    read); across filesystems a regular file is copied through one ``O_NOFOLLOW``
    descriptor and the original unlinked only if it is still that file."""
    import errno

    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    if statmod.S_ISLNK(os.lstat(src).st_mode):
        os.symlink(os.readlink(src), dest)
        os.unlink(src)
        return
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise OSError(f"{src} is not a regular file")
        tmp = dest.with_name(f".move-{os.getpid()}-{time.time_ns()}.tmp")
        try:
            with open(os.dup(fd), "rb") as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if FileVersion.of(os.lstat(src)) == FileVersion.of(st):
            os.unlink(src)
    finally:
        os.close(fd)


def _make_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WatchError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise WatchError(f"{what} {path} is not a directory")


def _check_writable(directory: Path, what: str) -> None:
    from streamdet.core.products import probe_writable

    try:
        probe_writable(directory)
    except OSError as exc:
        raise WatchError(f"cannot write in {what} {directory}: {exc.strerror or exc}") from None


class Daemon:
    def __init__(self, opts: WatchOptions, executor=None, log: EventLog | None = None,
                 capture_logging: bool = True):
        self.opts = opts
        self.capture_logging = capture_logging
        self.log = log or EventLog(opts.log_format)
        if opts.on_change not in ("reprocess", "ignore"):
            raise WatchError(f"--on-change must be reprocess or ignore, not {opts.on_change!r}")
        if opts.retries < 0:
            raise WatchError("--retries must be >= 0")
        inbox = Path(opts.inbox)
        if not inbox.is_dir():
            raise WatchError(f"inbox {inbox} is not a directory")
        self.inbox = w.realpath(inbox)
        outbox = Path(opts.outbox)
        _make_dir(outbox, "the outbox")
        self.outbox = w.realpath(outbox)
        state = Path(opts.state_dir) if opts.state_dir else outbox / ".streamdet"
        _make_dir(state, "the state directory")
        self.state_dir = w.realpath(state)
        self.staging_root = self.outbox / STAGING
        self.quarantine_dir = self.state_dir / QUARANTINE
        self.archive = None
        if opts.archive:
            _make_dir(Path(opts.archive), "the archive")
            self.archive = w.realpath(opts.archive)
            if self.archive == self.inbox:
                raise WatchError("--archive must not be the inbox")
        if self.outbox == self.inbox:
            raise WatchError("the outbox must not be the inbox")
        if self.state_dir == self.inbox:
            raise WatchError("the state directory must not be the inbox")
        from streamdet.core import products

        # found now, not after the first file ran: every directory the daemon writes in
        for directory, what in ((self.outbox, "the outbox"), (self.state_dir, "the state directory"),
                                (self.archive, "the archive")):
            if directory is not None:
                _check_writable(directory, what)
        #: the longest file name every directory the daemon names files in takes
        self.name_max = min(products.name_max(d) for d in (self.outbox, self.state_dir, self.archive)
                            if d is not None)
        self.executor = executor
        self.journal: Journal | None = None
        self.watcher: w.InboxWatcher | None = None
        self.intake = Intake(name_max=self.name_max, on_change=opts.on_change,
                             archive=self.archive is not None)
        self.retry_policy = RetryPolicy(retries=opts.retries, retry_delay=opts.retry_delay)
        self.settler = w.Settler(self.inbox, opts.settle,
                                 stall=opts.settle if opts.once else opts.stall)
        #: the version of each row's file the daemon hashed (run only if still that one)
        self.hashed: dict[int, FileVersion] = {}
        self.pool_broken: str | None = None
        self.ready: collections.deque[int] = collections.deque()
        self.retry: list[tuple[float, int]] = []
        self.queued: set[int] = set()
        self.inflight: dict[int, _Flight] = {}
        self.known: dict[str, tuple[int, int]] = {}
        self.stop_requested = 0
        self.exit_code = 0
        self.early_stop: list[int] = []
        self._lock_fd: int | None = None
        self._activity = False
        self._done_this_run = 0
        self._started_wall = time.time()

    # =====================================================================================
    # lifecycle
    # =====================================================================================
    def run(self) -> int:
        self._acquire_lock()
        old_handlers = self._install_signals()
        if self.early_stop and not self.stop_requested:   # signalled while starting up
            self.stop_requested = self.early_stop[0]
            self.log("stop", f"{signal.Signals(self.stop_requested).name} while starting up: "
                     "stopping")
        try:
            self._startup()
            self._loop()
            self._shutdown()
        finally:
            for sig, handler in old_handlers.items():
                try:
                    signal.signal(sig, handler)
                except (ValueError, TypeError):
                    pass
            if self.journal is not None:
                self.journal.close()
            self._release_lock()
        return self.exit_code

    def _acquire_lock(self) -> None:
        import fcntl

        path = self.state_dir / LOCKFILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise WatchError(f"another streamdet watch (pid {other or '?'}) is using the state "
                             f"directory {self.state_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _install_signals(self) -> dict:
        old = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread (tests driving the daemon in a thread)
            pass
        return old

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            self.log("stop", f"second signal ({signal.Signals(signum).name}): exiting at once; "
                     "running files will be redone at restart", level="warning")
            try:
                if self.executor is not None:
                    self.executor.kill_workers()
            finally:
                os._exit(128 + signum)
        self.stop_requested = signum
        self.log("stop", f"{signal.Signals(signum).name}: taking no new files; waiting up to "
                 f"{self.opts.grace:g} s for {len(self.inflight)} running file(s)")

    def request_stop(self) -> None:
        """Stop like a first SIGTERM (for callers driving the daemon in-process)."""
        self.stop_requested = self.stop_requested or signal.SIGTERM

    def _startup(self) -> None:
        opts = self.opts
        if opts.rebuild_journal:
            from .journal import rebuild

            aside, summary = rebuild(self.state_dir, self.inbox, self.outbox, opts.pattern,
                                     archive=self.archive)
            self.log("rebuilt", (f"journal moved aside to {aside}; " if aside else "")
                     + f"rebuilt from {self.outbox}: {summary}")
        self.journal = Journal(self.state_dir)
        self.journal.set_meta_many({
            "inbox": str(self.inbox), "outbox": str(self.outbox), "pattern": opts.pattern,
            "pid": str(os.getpid()), "started_at": repr(time.time())})
        for row in self.journal.recover_interrupted():
            self.log("recovered", f"{row.name}: was running when the daemon stopped; "
                     "it will be redone", file=row.name, id=row.id)
        self._finish_pending_moves()
        self._clean_leftovers()
        if self.executor is None:
            self.executor = make_executor(opts, self.state_dir)
        if self.capture_logging:
            self.log.capture_python_logging()
        self.log("start", f"watching {self.inbox} -> {self.outbox}; {self.executor.describe()}; "
                 f"state {self.state_dir}; pattern {opts.pattern}; settle {opts.settle:g} s"
                 + ("; --once" if opts.once else ""),
                 inbox=str(self.inbox), outbox=str(self.outbox), state_dir=str(self.state_dir))
        if not opts.once:
            self.watcher = w.InboxWatcher(self.inbox, opts.pattern, poll=opts.poll,
                                          poll_interval=opts.poll_interval)
            self.watcher.start()   # before the scan, so nothing lands unseen in between
        if not opts.once and not self.stop_requested:  # --once: only if there is work
            t0 = time.monotonic()
            self.executor.start()
            self.log("ready", f"workers ready in {time.monotonic() - t0:.1f} s")
        now = time.time()
        for row in self.journal.pending():
            if row.state == "failed" and row.retry_at and row.retry_at > now:
                self._schedule_retry(row.id, row.retry_at)
            else:
                self._enqueue(row.id)
        # files already settled (done and left in the inbox, refused, ignored) are not
        # looked at again unless their size or mtime changed
        self.known = self.journal.settled_identities()
        self._rescan()

    def _loop(self) -> None:
        opts = self.opts
        next_rescan = time.monotonic() + opts.rescan_interval
        next_summary = time.monotonic() + opts.summary_interval
        while not self.stop_requested:
            now = time.monotonic()
            if self.watcher is not None:
                for kind, name in self.watcher.drain():
                    if kind == "gone":
                        self.known.pop(name, None)
                        if name in self.settler:
                            self.settler.observe(name)   # drops it if it is gone
                        continue
                    self.settler.observe(name, renamed=(kind == "renamed"))
            if now >= next_rescan and not opts.once:
                next_rescan = now + opts.rescan_interval
                if not self.inbox.is_dir():
                    self.log("error", f"the inbox {self.inbox} is gone; stopping", level="error")
                    self.exit_code = 1
                    self.stop_requested = self.stop_requested or signal.SIGTERM
                    break
                self._rescan()
                self._clean_stale_staging()
            for name in self.settler.ready():
                if self.stop_requested:
                    break
                try:
                    taken = self._take(name)
                except sqlite3.Error:
                    raise                   # no journal, no guarantees: stop (exit 1)
                except Exception as exc:    # one odd file must not stop the daemon
                    self._internal_error(name, exc)
                    taken = True
                if taken:
                    self.settler.forget(name)
            self._submit_ready()
            self._wait_completions(0.2)
            now = time.monotonic()
            idle = not (self.inflight or self.ready or self.retry or len(self.settler))
            if now >= next_summary or (idle and self._activity):
                next_summary = now + opts.summary_interval
                self._summary()
                self._activity = False
            if opts.once and idle:
                break

    def _shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.inflight:
            deadline = time.monotonic() + self.opts.grace
            while self.inflight and time.monotonic() < deadline:
                self._wait_completions(0.2)
        abandoned = list(self.inflight.values())
        for flight in abandoned:
            self.journal.abandon(flight.row.id, flight.run_id)
            self.log("abandoned", f"{flight.row.name}: still running at shutdown; it will be "
                     "redone at restart", file=flight.row.name, id=flight.row.id)
        self.inflight.clear()
        self.executor.shutdown(abandon=bool(abandoned))
        self._clean_stale_staging(age=0.0)      # nothing runs any more
        self._summary(final=True)

    # =====================================================================================
    # start-up housekeeping
    # =====================================================================================
    def _clean_leftovers(self) -> None:
        """Temporary files of runs that died: the staging area and ``.*.tmp`` in OUTBOX and
        in the quarantine directory (products and error reports are written to a hidden
        temporary name and renamed into place, so these are never finished files)."""
        removed = 0
        if self.staging_root.exists():
            for entry in self.staging_root.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        for directory in (self.outbox, self.quarantine_dir, self.state_dir):
            if directory.is_dir():
                for entry in directory.iterdir():
                    if entry.name.startswith(".") and entry.name.endswith(".tmp") and \
                            entry.is_file() and not entry.is_symlink():
                        entry.unlink(missing_ok=True)
                        removed += 1
        worker_log = self.state_dir / WORKER_LOG
        try:
            if worker_log.stat().st_size > 16 * 1024**2:
                os.replace(worker_log, worker_log.with_name(WORKER_LOG + ".1"))
        except FileNotFoundError:
            pass
        if removed:
            self.log("cleanup", f"removed {removed} temporary leftover(s) of interrupted runs")

    def _clean_stale_staging(self, age: float = 60.0) -> None:
        """Staging directories no running job owns (a worker orphaned by a killed daemon
        may still have been writing when the daemon restarted)."""
        if not self.staging_root.exists():
            return
        live = {f.staging.name for f in self.inflight.values()}
        now = time.time()
        for entry in self.staging_root.iterdir():
            if entry.name in live:
                continue
            try:
                if now - entry.lstat().st_mtime > age:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def _finish_pending_moves(self) -> None:
        """Archive/quarantine moves decided (journal committed) but not done before a crash."""
        for row in self.journal.pending_moves():
            src = self.inbox / row.name
            if row.state == "quarantined":
                self._write_error_report(row, Path(row.moved_to))
            self._move_input(row, src, Path(row.moved_to))

    def _rescan(self) -> None:
        present = set()
        for name in w.scan(self.inbox, self.opts.pattern):
            present.add(name)
            if name in self.settler:
                continue
            try:
                ident = _ident(os.lstat(self.inbox / name))
            except FileNotFoundError:
                continue
            if self.known.get(name) != ident:
                self.settler.observe(name)
        for name in list(self.known):
            if name not in present:
                del self.known[name]

    # =====================================================================================
    # taking files
    # =====================================================================================
    def _take(self, name: str) -> bool:
        """Decide about a complete file (:mod:`.intake`) and carry the decision out.
        False: not decided yet (keep watching it)."""
        facts = self._look(name)
        fd = None
        try:
            while isinstance(decision := self.intake.decide(facts), Look):
                if decision.what == "open":
                    fd, opened = self._open(name)
                    facts = replace(facts, opened=opened)
                else:
                    sha = self._hash(fd, facts.opened.version)
                    facts = replace(facts, sha256=sha, hash_unstable=sha is None)
            self._carry_out(decision, facts)
        finally:
            if fd is not None:
                os.close(fd)
        return not decision.keep_watching

    def _look(self, name: str) -> IntakeFacts:
        """The first facts about an inbox entry: what reads nothing of it."""
        try:
            lst = os.lstat(self.inbox / name)
        except FileNotFoundError:
            return IntakeFacts(name, entry=None)
        unsafe = w.check_safe(self.inbox, name)
        # a name refused as not UTF-8 is recorded under its storable spelling
        latest = self.journal.latest(_storable(name))
        return IntakeFacts(
            name, entry=FileVersion.of(lst), unsafe=unsafe, latest=latest,
            hashed=self.hashed.get(latest.id) if latest else None,
            scheduled=latest is not None and (latest.id in self.queued
                                              or latest.id in self.inflight))

    def _open(self, name: str) -> tuple[int | None, Opened]:
        try:
            fd, st = w.open_entry(self.inbox, name)
        except w.Refused as exc:
            return None, Opened("refused", reason=exc.reason, kind=exc.kind)
        except (FileNotFoundError, w.NotRegular):
            return None, Opened("not_file")
        except PermissionError:
            return None, Opened("denied")
        return fd, Opened("file", version=FileVersion.of(st))

    def _carry_out(self, decision: Decision, facts: IntakeFacts) -> None:
        """Do what the intake decided: journal, log, queue, moves."""
        name, latest = facts.name, facts.latest
        path = self.inbox / name
        if decision.remember:
            self.known[name] = facts.entry.ident
        version = facts.opened.version if facts.opened is not None else None
        sha = facts.sha256
        match decision:
            case Refuse(reason=reason, kind=kind, recorded=False):
                self._record_refused(name, path, facts.entry, reason, kind)
            case Unreadable(recorded=False):
                self._record_unreadable(name, path, facts.entry)
            case Requeue(row_id=fid, identity_changed=changed, enqueue=enqueue):
                if changed:
                    self.journal.update_identity(fid, path=str(path), size=version.size,
                                                 mtime_ns=version.mtime_ns, sha256=sha)
                    self.log("changed", f"{name}: changed before it ran; the new content "
                             "will be processed", file=name, id=fid)
                self.hashed[fid] = version
                if enqueue:
                    self._enqueue(fid)
            case AlreadyDone(row_id=fid, archive=archive):
                self.journal.update_identity(fid, path=str(path), size=version.size,
                                             mtime_ns=version.mtime_ns)
                self.log("skipped", f"{name}: already done (same content, sha256 {sha[:12]})",
                         file=name, id=fid, sha256=sha)
                if archive:  # the row as just updated: the delivery may bear a new mtime
                    self._move_input(self.journal.get(fid), path, _unique(self.archive, name),
                                     record=False)
            case SameContent(row_id=fid):
                self.journal.update_identity(fid, path=str(path), size=version.size,
                                             mtime_ns=version.mtime_ns)
            case IgnoreChange():
                fid = self.journal.add(name=name, path=str(path), size=version.size,
                                       mtime_ns=version.mtime_ns, sha256=sha, state="ignored",
                                       error_kind="changed",
                                       error="content changed after it was processed "
                                             "(--on-change ignore)")
                self.log("ignored", f"{name}: content changed after it was processed; ignored "
                         "(--on-change ignore)", file=name, id=fid, sha256=sha)
            case Take(changed=changed):
                fid = self.journal.add(name=name, path=str(path), size=version.size,
                                       mtime_ns=version.mtime_ns, sha256=sha)
                self.hashed[fid] = version
                what = "changed content, reprocessing" if changed else "new"
                self.log("taken", f"{name} ({version.size} bytes, sha256 {sha[:12]}; {what})",
                         file=name, id=fid, size=version.size, sha256=sha, changed=changed)
                self._activity = True
                self._enqueue(fid)
            # Gone, Running, Wait, NotAFile, Settled, already recorded refusals: nothing

    def _record_unreadable(self, name: str, path: Path, entry: FileVersion) -> None:
        fid = self.journal.add(name=name, path=str(path), size=entry.size,
                               mtime_ns=entry.mtime_ns, sha256=None, state="quarantined",
                               error="cannot read the file (permission denied); "
                                     "deliver it again readable",
                               error_kind="unreadable")
        self._write_error_report(self.journal.get(fid), None)
        self.log("failed", f"{name}: cannot read it (permission denied) -> recorded "
                 "in quarantine", level="error", file=name, id=fid)

    def _internal_error(self, what: str, exc: BaseException) -> None:
        import traceback

        self.log("error", f"{what}: internal error {type(exc).__name__}: {exc}; skipped",
                 level="error", traceback=traceback.format_exc(limit=8))
        if isinstance(what, str) and "/" not in what:
            try:
                self.known[what] = _ident(os.lstat(self.inbox / what))
            except OSError:
                pass

    @staticmethod
    def _hash(fd: int, version: FileVersion) -> str | None:
        """sha256 of the open file, read through its descriptor; None if it changed while
        being read."""
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        if FileVersion.of(os.fstat(fd)) != version or offset != version.size:
            return None
        return digest.hexdigest()

    def _record_refused(self, name: str, path: Path, entry: FileVersion, reason: str,
                        kind: str) -> None:
        """Record an entry refused without reading it (the intake decides it is not
        recorded yet: once per version of the entry)."""
        fid = self.journal.add(name=_storable(name), path=_storable(str(path)), size=entry.size,
                               mtime_ns=entry.mtime_ns, sha256=None, state="quarantined",
                               error=reason, error_kind=kind)
        row = self.journal.get(fid)
        self._write_error_report(row, None)
        self.log("refused", f"{name}: {reason} (recorded in quarantine; nothing read or "
                 "written)", level="warning", file=name, id=fid, reason=reason)
        self._activity = True

    def _enqueue(self, fid: int) -> None:
        if fid not in self.queued:
            self.queued.add(fid)
            self.ready.append(fid)

    def _schedule_retry(self, fid: int, at: float) -> None:
        if fid not in self.queued:
            self.queued.add(fid)
            heapq.heappush(self.retry, (at, fid))

    # =====================================================================================
    # running files
    # =====================================================================================
    def _submit_ready(self) -> None:
        now = time.time()
        while self.retry and self.retry[0][0] <= now:
            _, fid = heapq.heappop(self.retry)
            self.ready.append(fid)
        while self.ready and not self.stop_requested \
                and len(self.inflight) < self.executor.capacity():
            fid = self.ready.popleft()
            self.queued.discard(fid)
            try:
                self._submit(fid)
            except sqlite3.Error:
                raise
            except Exception as exc:
                self._internal_error(f"journal row {fid}", exc)

    def _submit(self, fid: int) -> None:
        row = self.journal.get(fid)
        if row.state not in PENDING:
            return
        path = self.inbox / row.name
        try:
            fd, st = w.open_entry(self.inbox, row.name)
            os.close(fd)
        except w.Refused as exc:
            self.journal.set_state(fid, "quarantined", error=exc.reason, error_kind=exc.kind)
            self._write_error_report(self.journal.get(fid), None)
            self.log("refused", f"{row.name}: {exc.reason}", level="warning", file=row.name,
                     id=fid)
            return
        except (OSError, w.NotRegular):
            self._vanished(row)
            return
        hashed = self.hashed.get(fid)
        if (row.size, row.mtime_ns) != _ident(st) or (hashed and hashed != FileVersion.of(st)):
            self.hashed.pop(fid, None)
            self.settler.observe(row.name)      # hashed again (and run) once it settles
            return
        run_id, attempt = self.journal.start(fid)
        staging = self.staging_root / f"{fid}-{attempt}"
        # the worker opens the entry itself, checks it is this very version (or refuses),
        # and reads only through that descriptor
        job = Job(id=fid, attempt=attempt, path=str(path), inbox=str(self.inbox),
                  name=row.name, expect=(st.st_ino, st.st_size, st.st_mtime_ns),
                  staging=str(staging), config=self.opts.config, env=_crds_env())
        flight = _Flight(self.journal.get(fid), run_id, attempt, staging)
        self.inflight[fid] = flight
        try:
            self.executor.submit(job)
        except Exception as exc:
            self._failed(flight, JobFailed(kind="transient", lost=True,
                                           error=f"cannot submit: {type(exc).__name__}: {exc}"))
            return
        self.log("started", f"{row.name} (attempt {attempt})", file=row.name, id=fid,
                 attempt=attempt)

    def _pool_is_broken(self) -> bool:
        """After a lost worker: can the executor still start workers? If not, no file is
        to blame -- stop (exit 1) and leave every file as it is for the next start."""
        if self.pool_broken is None:
            check = getattr(self.executor, "check", None)
            problem = check() if check is not None else None
            if problem is None:
                return False
            self.pool_broken = problem
            self.log("error", f"the worker pool is broken: {problem}; stopping with exit code "
                     "1 (no file is failed or moved: they are processed at the next start)",
                     level="error", reason=problem)
            self.exit_code = 1
            self.stop_requested = self.stop_requested or signal.SIGTERM
        return True

    def _vanished(self, row: Row) -> None:
        self.journal.set_state(row.id, "vanished", error="the input disappeared from the "
                               "inbox before it was processed", error_kind="vanished")
        self.log("vanished", f"{row.name}: disappeared before it was processed",
                 level="warning", file=row.name, id=row.id)

    def _wait_completions(self, timeout: float) -> None:
        import queue

        try:
            item = self.executor.completions.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._completed(*item)
            try:
                item = self.executor.completions.get_nowait()
            except queue.Empty:
                return

    def _completed(self, fid: int, handle) -> None:
        flight = self.inflight.pop(fid, None)
        result = self.executor.outcome(fid, handle)
        if flight is None:
            return
        self._activity = True
        if isinstance(result, JobDone):
            for text in result.warnings:
                self.log("plugin", f"{flight.row.name}: {text}", level="warning",
                         file=flight.row.name, id=fid)
            try:
                self._commit(flight, result)
            except OSError as exc:
                self.inflight[fid] = flight
                self._failed(flight, JobFailed(kind="transient", worker=result.worker,
                                               error=f"cannot move products into place: {exc}"))
        else:
            self.inflight[fid] = flight
            self._failed(flight, result)
        shutil.rmtree(flight.staging, ignore_errors=True)
        # the input may have changed while it ran: look at it again
        try:
            ident = _ident(os.stat(self.inbox / flight.row.name))
            if ident != (flight.row.size, flight.row.mtime_ns):
                self.known.pop(flight.row.name, None)
                self.settler.observe(flight.row.name)
        except (FileNotFoundError, OSError):
            pass

    def _commit(self, flight: _Flight, result: JobDone) -> None:
        row = flight.row
        staging = w.realpath(flight.staging)
        staged = {kind: Path(p) for kind, p in result.products.items()}
        # files observer plugins wrote beside the products (a quick-look PNG, say)
        extras = {e.name: e for e in sorted(flight.staging.iterdir())
                  if e.name not in {p.name for p in staged.values()}
                  and not e.name.startswith(".") and e.is_file() and not e.is_symlink()}
        # rate last: a visible _rate.fits means everything of this run is in place
        order = [(k, staged[k]) for k in staged if k != "rate"] + list(extras.items()) \
            + [(k, staged[k]) for k in staged if k == "rate"]
        finals: dict[str, str] = {}
        for kind, src in order:
            if w.realpath(src.parent) != staging or src.name.startswith("."):
                raise OSError(f"product {src} is not in the run's staging directory")
            dest = self.outbox / src.name
            if w.realpath(dest.parent) != self.outbox:
                raise OSError(f"product {dest} would land outside {self.outbox}")
            # temporary files are created private (0600); products get the usual mode
            os.chmod(src, 0o666 & ~_UMASK)
            os.replace(src, dest)
            finals[kind] = str(dest)
        moved_to = None
        path = self.inbox / row.name
        if self.archive is not None:
            moved_to = str(_unique(self.archive, row.name))
        seconds = float(result.seconds or 0.0)
        self.journal.done(row.id, flight.run_id, products=finals, seconds=seconds,
                          timings=result.timings, worker=result.worker, moved_to=moved_to)
        self._done_this_run += 1
        self.hashed.pop(row.id, None)
        if moved_to:
            self._move_input(self.journal.get(row.id), path, Path(moved_to))
        self.log("done", f"{row.name} in {seconds:.2f} s -> "
                 + ", ".join(Path(finals[k]).name for k in ("rate", "rateints") if k in finals),
                 file=row.name, id=row.id, seconds=round(seconds, 3),
                 products=finals, worker=result.worker)

    def _failed(self, flight: _Flight, result: JobFailed) -> None:
        """Carry out the retry policy's verdict on a failed run (:mod:`.failures`)."""
        self.inflight.pop(flight.row.id, None)
        row = self.journal.get(flight.row.id)
        if result.lost and self._pool_is_broken():
            # not the file's fault: it is left as it is for the next start
            self.journal.abandon(row.id, flight.run_id)
            return
        kind, worker = result.kind, result.worker
        verdict = self.retry_policy.after(result, row.failures)
        if isinstance(verdict, Retake):
            self.journal.abandon(row.id, flight.run_id, outcome="interrupted")
            self.hashed.pop(row.id, None)
            self.known.pop(row.name, None)
            self.settler.observe(row.name)
            self.log("changed", f"{row.name}: changed before the worker opened it; taken "
                     "again once it settles", file=row.name, id=row.id)
        elif isinstance(verdict, Vanished):
            self.journal.abandon(row.id, flight.run_id, outcome="interrupted")
            self._vanished(self.journal.get(row.id))
        elif isinstance(verdict, Retry):
            at = time.time() + verdict.delay
            self.journal.fail(row.id, flight.run_id, error=verdict.error, kind=kind,
                              quarantine=False, counted=True, retry_at=at, worker=worker)
            self._schedule_retry(row.id, at)
            self.log("failed", f"{row.name}: {verdict.error} [transient, attempt "
                     f"{flight.attempt}; retry in {verdict.delay:g} s]", level="warning",
                     file=row.name, id=row.id, kind=kind, reason=verdict.error,
                     retry_in=verdict.delay)
        else:
            self._quarantine(row, flight.run_id, verdict, kind, worker)

    def _quarantine(self, row: Row, run_id: int, verdict: GiveUp, kind: str,
                    worker: str | None) -> None:
        path = self.inbox / row.name
        dest = None
        try:
            # only the very version that ran is moved
            if verdict.move_input and _ident(os.lstat(path)) == (row.size, row.mtime_ns):
                dest = _unique(self.quarantine_dir, row.name)
        except (FileNotFoundError, OSError):
            pass
        self.hashed.pop(row.id, None)
        error = verdict.error
        self.journal.fail(row.id, run_id, error=error, kind=kind, quarantine=True,
                          counted=verdict.counted, moved_to=str(dest) if dest else None,
                          worker=worker)
        row = self.journal.get(row.id)
        self._write_error_report(row, dest)
        if dest is not None:
            self._move_input(row, path, dest)
        self.log("failed", f"{row.name}: {error} [{kind}] -> quarantined"
                 + (f" ({dest})" if dest else ""), level="error", file=row.name, id=row.id,
                 kind=kind, reason=error, quarantine=str(dest) if dest else None)

    # =====================================================================================
    # moving inputs, error reports
    # =====================================================================================
    def _move_input(self, row: Row, src: Path, dest: Path, record: bool = True) -> None:
        """Move an input out of the inbox (archive or quarantine) -- only the very file
        the journal knows (same size and mtime); never delete it."""
        moved = None
        try:
            st = os.stat(src)
            if _ident(st) == (row.size, row.mtime_ns) and w.check_safe(self.inbox, row.name) is None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists() or dest.is_symlink():
                    dest = _unique(dest.parent, row.name)
                _move_entry(src, dest)
                moved = str(dest)
        except FileNotFoundError:
            moved = str(dest) if dest.exists() else None
        except OSError as exc:
            self.log("warning", f"{row.name}: could not move the input to {dest}: {exc}",
                     level="warning", file=row.name, id=row.id)
        if record:
            self.journal.move_finished(row.id, moved)
        if moved is not None:
            self.known.pop(row.name, None)

    def _write_error_report(self, row: Row, moved_to: Path | None) -> Path:
        """``<name>.error.json`` in the quarantine directory (beside the moved input)."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        base = moved_to.name if moved_to is not None else row.name
        if len(os.fsencode(base)) + len(".error.json") > self.name_max:
            # a name refused as too long: the report gets a shortened one (the journal
            # row and the report's "file" hold the whole name)
            digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:12]
            base = os.fsencode(base)[: self.name_max - 40].decode("utf-8", "ignore") + "-" + digest
        report = self.quarantine_dir / _storable(f"{base}.error.json")
        if w.realpath(report.parent) != w.realpath(self.quarantine_dir):
            raise OSError(f"refusing to write {report}")
        runs = self.journal.runs(row.id)
        body = {
            "file": row.name,
            "inbox_path": row.path,
            "quarantined_input": str(moved_to) if moved_to else None,
            "input_moved": moved_to is not None,
            "state": row.state,
            "kind": row.error_kind,
            "reason": row.error,
            "sha256": row.sha256,
            "size": row.size,
            "attempts": row.attempts,
            "transient_failures": row.failures,
            "runs": [{"attempt": r["attempt"], "outcome": r["outcome"], "error": r["error"],
                      "worker": r["worker"], "started_at": _iso(r["started_at"]),
                      "finished_at": _iso(r["finished_at"])} for r in runs],
            "time": _iso(time.time()),
            "journal_id": row.id,
            "what_to_do": _advice(row.error_kind),
        }
        tmp = report.with_name(f".report-{row.id}-{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(body, indent=2) + "\n")
            os.replace(tmp, report)
        except OSError as exc:
            self.log("warning", f"{row.name}: could not write {report}: {exc}", level="warning",
                     file=row.name)
        return report

    # =====================================================================================
    # reporting
    # =====================================================================================
    def _summary(self, final: bool = False) -> None:
        counts = self.journal.counts()
        hour = self.journal.done_since(time.time() - 3600)
        waiting = len(self.ready) + len(self.retry) + len(self.settler)
        msg = (f"{counts['done']} done, {counts['quarantined']} quarantined, "
               f"{counts['failed']} retrying, {len(self.inflight)} running, {waiting} waiting; "
               f"{len(hour) / 60:.1f} files/min over the last hour"
               f" ({self._done_this_run} done since start)")
        self.log("stopped" if final else "progress", msg, done=counts["done"],
                 quarantined=counts["quarantined"], failed=counts["failed"],
                 running=len(self.inflight), waiting=waiting,
                 files_per_min_last_hour=round(len(hour) / 60, 3),
                 done_since_start=self._done_this_run)
        self.journal.set_meta("heartbeat", repr(time.time()))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def make_executor(opts: WatchOptions, state_dir: Path):
    from ..core.engine import usable_cpus
    from .executor import DaskExecutor, LocalExecutor

    if opts.dask_scheduler:
        # a Dask worker already runs one task per thread
        _default_threads(opts, 1)
        return DaskExecutor(opts.dask_scheduler, workers=opts.workers)
    workers = opts.workers or usable_cpus()
    _default_threads(opts, max(1, usable_cpus() // workers))
    return LocalExecutor(workers, output=str(state_dir / WORKER_LOG))


def _default_threads(opts: WatchOptions, threads: int) -> None:
    """Band threads per file when neither the configuration nor $STREAMDET_THREADS says:
    the cores are shared out among the files in flight, not multiplied by them."""
    if opts.config is None:
        from ..core.engine import RunConfig

        opts.config = RunConfig()
    if opts.config.threads is None and not os.environ.get("STREAMDET_THREADS", "").strip():
        opts.config.threads = threads


def _crds_env() -> dict[str, str]:
    from .worker import daemon_env

    return daemon_env()


def _unique(directory: Path, name: str) -> Path:
    dest = directory / name
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = directory / f"{name}.{n}"
        n += 1
    return dest


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _advice(kind: str | None) -> str:
    return {
        "permanent": "the input cannot be processed as it is (corrupt, not MIRI, or no "
                     "reference matches it); fix it or the CRDS cache and drop it into the "
                     "inbox again",
        "transient": "processing failed repeatedly for a reason other than the input; check "
                     "the workers, then drop the file into the inbox again",
        "security": "the inbox entry was refused without being read (a symlink leaving the "
                    "inbox, or a name with '..'); replace it with a regular file",
        "name": "the file name cannot be handled (too long for the product and report names, "
                "or not UTF-8); rename it and deliver it again",
        "vanished": "the input was removed from the inbox before it was processed",
        "unreadable": "the daemon may not read the file; deliver it again with read "
                      "permission (a new copy is looked at afresh)",
    }.get(kind or "", "")
