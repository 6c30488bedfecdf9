"""Finding files in the inbox and deciding when one is complete.

* :class:`InboxWatcher` -- a real watchdog observer (inotify ``Observer``, or
  ``PollingObserver`` for NFS and other filesystems without inotify) on INBOX, not
  recursive, that turns events into ``(kind, name)`` items on a queue: ``close`` (inotify
  close-after-write), ``change`` (created, modified) and ``gone``.
* :func:`scan` -- the names in INBOX now (start-up, ``--once``, periodic safety net).
* :class:`Settler` -- the "is it complete?" rules. A file is taken when it is

  - closed for writing (close-write event) *and* a structurally complete FITS file (every
    HDU's header and data are all there; see :func:`fits_complete`), or
  - a complete FITS file whose mtime is older than the settle time, or
  - unchanged (size and mtime) for the settle time while we watched it -- whatever it
    holds (a truncated or non-FITS file then fails and is quarantined).

* :func:`candidate_name` -- which names are ours at all (the glob; temporary names
  ``*.part``, ``*.tmp``, ``.*`` are ignored until renamed).
* :func:`check_safe` -- refuses names with ``..`` and symlinks that leave INBOX.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import stat as statmod
import time
from dataclasses import dataclass
from pathlib import Path

#: name suffixes of files still being written by their producer
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".crdownload")

FITS_BLOCK = 2880


def candidate_name(name: str, pattern: str) -> bool:
    """True if ``name`` (no directory) is one of ours: matches the glob and is not a
    temporary or hidden name."""
    if not name or "/" in name or "\x00" in name:
        return False
    if name.startswith(".") or name.endswith(TEMP_SUFFIXES):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def realpath(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, every symlink resolved, lies within ``root`` (resolved)."""
    return realpath(path).is_relative_to(realpath(root))


def check_safe(inbox: Path, name: str) -> str | None:
    """Why INBOX/``name`` must not be read, or None when it may.

    Refused: names containing ``..`` or a path separator, and symlinks (at any depth)
    whose target is outside INBOX. Nothing is read from a refused entry.
    """
    if ".." in name:
        return f"file name {name!r} contains '..'; refused"
    if "/" in name or os.sep in name or "\x00" in name:
        return f"file name {name!r} contains a path separator; refused"
    path = inbox / name
    if path.parent != inbox:
        return f"{name!r} is not directly in the inbox; refused"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if statmod.S_ISLNK(st.st_mode):
        target = realpath(path)
        if not target.is_relative_to(realpath(inbox)):
            return f"symlink {name} points outside the inbox (to {os.readlink(path)}); refused"
    return None


def fits_complete(path: str | os.PathLike) -> bool:
    """True if the file is a FITS file whose every HDU (header and data) is present and
    nothing trails the last one: walks the headers, adds up the data sizes they declare
    and compares with the file size. Cheap: reads the header blocks only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or size % FITS_BLOCK:
                return False
            offset = 0
            first = True
            while offset < size:
                f.seek(offset)
                cards: dict[str, str] = {}
                ended = False
                header_blocks = 0
                while not ended:
                    block = f.read(FITS_BLOCK)
                    if len(block) < FITS_BLOCK:
                        return False
                    header_blocks += 1
                    if header_blocks > 10000:
                        return False
                    text = block.decode("ascii", errors="replace")
                    if first and header_blocks == 1 and not text.startswith("SIMPLE  ="):
                        return False
                    if not first and header_blocks == 1 and not text.startswith("XTENSION="):
                        return False
                    for i in range(0, FITS_BLOCK, 80):
                        card = text[i:i + 80]
                        key = card[:8].strip()
                        if key == "END":
                            ended = True
                            break
                        if card[8:10] == "= " and (key in _SIZE_KEYS or key.startswith("NAXIS")):
                            value = card[10:].split("/", 1)[0].strip()
                            cards[key] = value
                try:
                    bitpix = abs(int(cards["BITPIX"]))
                    naxis = int(cards["NAXIS"])
                    count = 1
                    for k in range(1, naxis + 1):
                        count *= int(cards[f"NAXIS{k}"])
                    if naxis == 0:
                        count = 0
                    pcount = int(cards.get("PCOUNT", 0) or 0)
                    gcount = int(cards.get("GCOUNT", 1) or 1)
                except (KeyError, ValueError):
                    return False
                nbytes = bitpix // 8 * gcount * (pcount + count)
                offset += header_blocks * FITS_BLOCK + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
                first = False
            return offset == size
    except OSError:
        return False


_SIZE_KEYS = {"BITPIX", "NAXIS", "PCOUNT", "GCOUNT"}


def scan(inbox: Path, pattern: str) -> list[str]:
    """Names in INBOX (not recursive) that match the pattern, oldest first."""
    out = []
    try:
        with os.scandir(inbox) as it:
            for entry in it:
                if candidate_name(entry.name, pattern):
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                    except FileNotFoundError:
                        continue
                    out.append((mtime, entry.name))
    except FileNotFoundError:
        return []
    return [name for _, name in sorted(out)]


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    changed_at: float      # monotonic time we last saw size or mtime change
    closed: bool = False   # a close-after-write arrived since the last change


class Settler:
    """Tracks names not yet taken and says which are complete."""

    def __init__(self, inbox: Path, settle: float):
        self.inbox = inbox
        self.settle = settle
        self.pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, name: str) -> bool:
        return name in self.pending

    def observe(self, name: str, closed: bool = False, now: float | None = None) -> None:
        """A name was seen (scan or event); ``closed`` for a close-after-write."""
        now = time.monotonic() if now is None else now
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self.pending.pop(name, None)
            return
        p = self.pending.get(name)
        if p is None or (p.size, p.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.pending[name] = p = _Pending(st.st_size, st.st_mtime_ns, now)
        if closed:
            p.closed = True

    def forget(self, name: str) -> None:
        self.pending.pop(name, None)

    def ready(self, now: float | None = None) -> list[str]:
        """Names that are complete now (they stay tracked until :meth:`forget`)."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        out = []
        for name in list(self.pending):
            p = self.pending[name]
            path = self.inbox / name
            try:
                lst = os.lstat(path)
            except FileNotFoundError:
                del self.pending[name]
                continue
            if (lst.st_size, lst.st_mtime_ns) != (p.size, p.mtime_ns):
                self.pending[name] = _Pending(lst.st_size, lst.st_mtime_ns, now)
                continue
            if statmod.S_ISLNK(lst.st_mode) or not statmod.S_ISREG(lst.st_mode):
                # a symlink (checked for safety before anything reads it) or something odd:
                # let the daemon decide at once
                out.append(name)
                continue
            stable = now - p.changed_at >= self.settle
            if stable:
                out.append(name)
                continue
            if p.closed or wall - lst.st_mtime_ns / 1e9 >= self.settle:
                if fits_complete(path):
                    out.append(name)
        return out


class InboxWatcher:
    """A watchdog observer on INBOX feeding ``(kind, name)`` into :attr:`events`."""

    def __init__(self, inbox: Path, pattern: str, poll: bool = False, poll_interval: float = 1.0):
        from watchdog.events import FileSystemEventHandler

        self.inbox = inbox
        self.pattern = pattern
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                kind = event.event_type
                if kind == "moved":
                    # renamed into place (from a temporary name): written completely, by
                    # convention -- still taken early only if it is a complete FITS file
                    watcher._put("gone", event.src_path)
                    watcher._put("close", event.dest_path)
                elif kind == "closed":
                    watcher._put("close", event.src_path)
                elif kind in ("created", "modified"):
                    watcher._put("change", event.src_path)
                elif kind == "deleted":
                    watcher._put("gone", event.src_path)

        if poll:
            from watchdog.observers.polling import PollingObserver

            self.observer = PollingObserver(timeout=poll_interval)
        else:
            from watchdog.observers import Observer

            self.observer = Observer()
        self.observer.schedule(Handler(), str(inbox), recursive=False)

    def _put(self, kind: str, path) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        directory, name = os.path.split(path)
        if os.path.normpath(directory) != os.path.normpath(str(self.inbox)):
            return
        if candidate_name(name, self.pattern):
            self.events.put((kind, name))

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def drain(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out
