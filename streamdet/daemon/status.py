"""``streamdet status OUTBOX``: what the journal says."""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path

from . import watcher as w
from .log import printable
from .journal import STATES, Journal, storable


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding the state directory's lock, or None."""
    import fcntl

    path = state_dir / "daemon.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def collect(state_dir: Path, n_errors: int = 5) -> dict:
    journal = Journal(state_dir, readonly=True)
    try:
        counts = journal.counts()
        now = time.time()
        hour = journal.done_since(now - 3600)
        errors = journal.last_errors(n_errors)
        inbox = journal.get_meta("inbox")
        pattern = journal.get_meta("pattern") or "*_uncal.fits"
        untaken = 0
        if inbox and Path(inbox).is_dir():
            for name in w.scan(Path(inbox), pattern):
                latest = journal.latest(storable(name))
                try:
                    st = os.stat(Path(inbox) / name)
                except OSError:
                    continue
                if latest is None or (latest.size, latest.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    untaken += 1
        span_min = None
        if hour:
            first = journal.db.execute(
                "SELECT min(coalesce(started_at, seen_at)) FROM files WHERE state = 'done' "
                "AND finished_at >= ?", (now - 3600,)).fetchone()[0]
            span_min = max((now - (first or now)) / 60, 1 / 60)
        problems = journal.consistency_problems()
        return {
            "state_dir": str(state_dir),
            "inbox": inbox,
            "outbox": journal.get_meta("outbox"),
            "daemon_pid": daemon_pid(state_dir),
            "heartbeat": float(journal.get_meta("heartbeat") or 0) or None,
            "counts": counts,
            "waiting": {"journal": counts["seen"] + counts["failed"], "inbox_untaken": untaken},
            "done_last_hour": len(hour),
            "files_per_min_last_hour": len(hour) / 60,
            "files_per_min_active": (len(hour) / span_min) if span_min else 0.0,
            "last_errors": [{"file": r.name, "state": r.state, "kind": r.error_kind,
                             "error": r.error, "moved_to": r.moved_to,
                             "time": _iso(r.finished_at or r.seen_at)} for r in errors],
            "problems": problems,
        }
    finally:
        journal.close()


def render(info: dict) -> str:
    lines = []
    pid = info["daemon_pid"]
    running = f"running (pid {pid})" if pid else "not running"
    lines.append(f"state:   {info['state_dir']}  (daemon {running})")
    if info["inbox"]:
        lines.append(f"inbox:   {info['inbox']}")
        lines.append(f"outbox:  {info['outbox']}")
    lines.append("")
    lines.append(f"{'state':<12} {'files':>7}")
    for state in STATES:
        lines.append(f"{state:<12} {info['counts'].get(state, 0):>7}")
    wait = info["waiting"]
    lines.append("")
    lines.append(f"waiting:    {wait['journal'] + wait['inbox_untaken']} "
                 f"({wait['journal']} taken and queued or awaiting retry, "
                 f"{wait['inbox_untaken']} in the inbox not taken yet)")
    lines.append(f"throughput: {info['files_per_min_last_hour']:.2f} files/min over the last "
                 f"hour ({info['done_last_hour']} done; "
                 f"{info['files_per_min_active']:.2f} files/min while active)")
    if info["last_errors"]:
        lines.append("")
        lines.append("last errors:")
        for e in info["last_errors"]:
            lines.append(printable(f"  {e['time']}  {e['file']}  [{e['kind']}, {e['state']}] "
                                   f"{e['error']}"))
    if info["problems"]:
        lines.append("")
        lines.append("journal problems:")
        lines.extend(f"  {p}" for p in info["problems"])
    return "\n".join(lines)


def _iso(t: float | None) -> str | None:
    if not t:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
