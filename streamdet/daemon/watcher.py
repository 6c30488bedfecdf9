"""Finding files in the inbox, deciding when one is complete, and opening it safely.

* :class:`InboxWatcher` -- a real watchdog observer (inotify ``Observer``, or
  ``PollingObserver`` for NFS and other filesystems without inotify) on INBOX, not
  recursive, that turns events into ``(kind, name)`` items on a queue: ``renamed`` (moved
  into INBOX under this name), ``change`` (created, modified, closed) and ``gone``.
* :func:`scan` -- the names in INBOX now (start-up, ``--once``, periodic safety net).
* :class:`Settler` -- tracks the names not yet taken; :func:`completeness` -- the "is it
  complete?" rules, pure (the settler gathers their facts). A close is no proof of
  completeness (a producer may close after a piece and append later), so a file is taken
  when

  - it was renamed into INBOX under its name (the producer says it is done), or
  - it has been quiet (size and mtime unchanged) for the settle time *and* its structure
    is whole: every HDU a Level 1B file needs, the sizes its headers declare adding up to
    the file's size (see :func:`structure`), or
  - it has been quiet for the settle time and can never become a Level 1B file by
    growing (not FITS, or damaged): it is taken, fails and is quarantined, or
  - it has been quiet for the (longer) stall time, whatever it holds.

* :func:`candidate_name` -- which names are ours at all (the glob; temporary names
  ``*.part``, ``*.tmp``, ``.*`` are ignored until renamed).
* :func:`check_safe` -- refuses names with ``..`` and symlinks that leave INBOX, without
  reading anything; :func:`open_entry` -- the one way anything of INBOX is read: opens an
  entry *of INBOX itself* (``O_NOFOLLOW``; a symlink is followed only to another entry
  directly in INBOX) and checks what it opened, so no swap between check and use can make
  the daemon or a worker read a file outside INBOX.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import queue
import stat as statmod
import time
from dataclasses import dataclass
from pathlib import Path

from .log import printable

#: name suffixes of files still being written by their producer
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".crdownload")

FITS_BLOCK = 2880

#: extensions without which a file is not a whole Level 1B exposure (jwst's Level1bModel
#: writes SCI, GROUP, INT_TIMES and ASDF; streamdet needs SCI, and INT_TIMES for the
#: products' integration times)
LEVEL1B_EXTENSIONS = ("SCI", "INT_TIMES")

#: how many symlinks within INBOX are followed from one name
MAX_LINKS = 8

#: bytes of name the daemon adds to a report's name, beyond the input's
#: (``<name>.NN.error.json`` in the quarantine)
REPORT_NAME_EXTRA = len(".99.error.json")


class Refused(Exception):
    """An inbox entry that must not be read (the message says why)."""

    def __init__(self, reason: str, kind: str = "security"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class NotRegular(Exception):
    """An inbox entry that is not a regular file (a directory, a FIFO, a device)."""


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


def name_problem(name: str, name_max: int = 255) -> str | None:
    """Why the daemon cannot handle a name the filesystem allowed, or None: names too
    long to leave room for the product names or the quarantine report (``name_max``: the
    longest name the output directories take), and names that are not valid UTF-8 (the
    journal and the reports are text). Every other name is processed."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return (f"file name {printable(name)} is not valid UTF-8; refused (rename it and "
                "deliver it again)")
    from ..core.products import TEMP_NAME_EXTRA, output_paths

    longest = max(len(p.name.encode()) for p in output_paths(name).values())
    need = max(longest + TEMP_NAME_EXTRA, size + REPORT_NAME_EXTRA)
    if need > name_max:
        return (f"file name too long ({size} bytes): its products and quarantine report "
                f"would need names of {need} bytes, more than the {name_max} allowed here; "
                f"refused (rename it to at most {size - (need - name_max)} bytes and deliver "
                "it again)")
    return None


def _entry_in(inbox: Path, target: str) -> str | None:
    """The name of the INBOX entry a symlink's ``target`` designates, or None when it is
    not an entry directly in INBOX. Whatever the answer, the caller opens that name in
    INBOX without following it: a race can only make it read another INBOX entry."""
    root = os.path.realpath(inbox)
    path = os.path.normpath(os.path.join(root, target))
    parent, base = os.path.split(path)
    if not base or base in (".", ".."):
        return None
    if os.path.realpath(parent) != root:
        return None
    return base


def check_safe(inbox: Path, name: str) -> str | None:
    """Why INBOX/``name`` must not be read, or None when it may (a first look that reads
    nothing: :func:`open_entry` checks again what it actually opens).

    Refused: names containing ``..`` or a path separator, and symlinks whose chain leaves
    INBOX (every link of the chain must name an entry directly in INBOX)."""
    reason = check_safe_name(name)
    if reason:
        return reason
    entry = name
    for _ in range(MAX_LINKS + 1):
        try:
            st = os.lstat(inbox / entry)
        except FileNotFoundError:
            return None
        if not statmod.S_ISLNK(st.st_mode):
            return None
        target = os.readlink(inbox / entry)
        entry = _entry_in(inbox, target)
        if entry is None:
            return f"symlink {printable(name)} points outside the inbox (to {printable(target)}); refused"
    return f"symlink {printable(name)}: more than {MAX_LINKS} links in a row; refused"


_SYMLINK_ERRNOS = {errno.ELOOP, errno.EMLINK}   # O_NOFOLLOW on a link: Linux, FreeBSD


def open_entry(inbox: Path, name: str) -> tuple[int, os.stat_result]:
    """Open INBOX/``name`` for reading and return ``(fd, fstat of fd)``.

    The descriptor is an entry of INBOX itself: every open is ``O_NOFOLLOW`` relative to
    INBOX's own descriptor, and a symlink is followed by hand only to another entry
    directly in INBOX. ``O_NONBLOCK`` keeps a FIFO from hanging the open. Raises
    :class:`Refused` (a link leaving INBOX, a bad name), :class:`NotRegular`,
    ``FileNotFoundError`` (gone, or a dangling link), ``PermissionError``."""
    reason = check_safe_name(name)
    if reason:
        raise Refused(reason)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    dirfd = os.open(inbox, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        entry = name
        for _ in range(MAX_LINKS + 1):
            try:
                fd = os.open(entry, flags, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno not in _SYMLINK_ERRNOS:
                    raise
                target = os.readlink(entry, dir_fd=dirfd)
                entry = _entry_in(inbox, target)
                if entry is None:
                    raise Refused(f"symlink {printable(name)} points outside the inbox (to "
                                  f"{printable(target)}); refused") from None
                continue
            try:
                st = os.fstat(fd)
                if not statmod.S_ISREG(st.st_mode):
                    raise NotRegular(f"{printable(name)} is not a regular file")
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd, st
        raise Refused(f"symlink {printable(name)}: more than {MAX_LINKS} links in a row; refused")
    finally:
        os.close(dirfd)


def check_safe_name(name: str) -> str | None:
    """Names refused for safety: ``..`` or a path separator in them."""
    if ".." in name:
        return f"file name '{printable(name)}' contains '..'; refused"
    if "/" in name or os.sep in name or "\x00" in name:
        return f"file name '{printable(name)}' contains a path separator; refused"
    return None


def _walk_hdus(f, size: int) -> tuple[str, list[str]]:
    """Walk the HDU headers of the open binary file ``f`` (``size`` bytes): returns
    ``(how, extnames)`` where ``how`` is ``"exact"`` (the HDUs end where the file does,
    blank padding aside), ``"short"`` (the file ends inside a header or inside the data a
    header declares: more may be on its way) or ``"foreign"`` (not FITS, or damaged: no
    appending can make it whole)."""
    names: list[str] = []
    offset = 0
    first = True
    while offset < size:
        f.seek(offset)
        cards: dict[str, str] = {}
        header_blocks = 0
        ended = False
        while not ended:
            block = f.read(FITS_BLOCK)
            if header_blocks == 0:
                lead = b"SIMPLE  =" if first else b"XTENSION="
                if not block.startswith(lead[:len(block)]) or (len(block) >= 9 and
                                                               not block.startswith(lead)):
                    if not first and not block.strip(b"\0 ") and not f.read().strip(b"\0 "):
                        return "exact", names        # blank padding after the last HDU
                    return "foreign", names
            if len(block) < FITS_BLOCK:
                return "short", names
            header_blocks += 1
            if header_blocks > 10000:
                return "foreign", names
            text = block.decode("ascii", errors="replace")
            for i in range(0, FITS_BLOCK, 80):
                card = text[i:i + 80]
                key = card[:8].strip()
                if key == "END":
                    ended = True
                    break
                if card[8:10] == "= " and (key in _SIZE_KEYS or key.startswith("NAXIS")):
                    cards[key] = card[10:].split("/", 1)[0].strip()
        try:
            bitpix = abs(int(cards["BITPIX"]))
            naxis = int(cards["NAXIS"])
            count = 0 if naxis == 0 else 1
            for k in range(1, naxis + 1):
                count *= int(cards[f"NAXIS{k}"])
            pcount = int(cards.get("PCOUNT", 0) or 0)
            gcount = int(cards.get("GCOUNT", 1) or 1)
        except (KeyError, ValueError):
            return "foreign", names
        names.append(cards.get("EXTNAME", "").strip("' ").upper() or ("PRIMARY" if first else ""))
        nbytes = bitpix // 8 * gcount * (pcount + count)
        offset += header_blocks * FITS_BLOCK + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
        first = False
    if offset > size:
        return "short", names
    return ("exact" if names else "short"), names


def _open_nofollow(path: str | os.PathLike):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    return os.fdopen(fd, "rb")


def fits_complete(path: str | os.PathLike) -> bool:
    """True if the file is a FITS file whose every HDU (header and data) is present and
    nothing but blank padding trails the last one. Reads the header blocks only."""
    try:
        with _open_nofollow(path) as f:
            size = os.fstat(f.fileno()).st_size
            return size > 0 and _walk_hdus(f, size)[0] == "exact"
    except OSError:
        return False


def structure(path: str | os.PathLike) -> str:
    """``"whole"``: a FITS file whose HDUs add up to its size and include every extension
    a Level 1B exposure needs (:data:`LEVEL1B_EXTENSIONS`); ``"partial"``: a FITS file
    that may still grow into one (cut inside an HDU, or on an HDU boundary before all of
    them); ``"foreign"``: something no appending can make whole (not FITS, damaged).
    Reads the header blocks only, never following a symlink."""
    try:
        with _open_nofollow(path) as f:
            size = os.fstat(f.fileno()).st_size
            how, names = _walk_hdus(f, size)
    except OSError:
        return "foreign"
    if how == "foreign":
        return "foreign"
    if how == "exact" and all(n in names for n in LEVEL1B_EXTENSIONS):
        return "whole"
    return "partial"


_SIZE_KEYS = {"BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "EXTNAME"}


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
    renamed: bool = False  # renamed into INBOX under this name since the last change


class Settler:
    """Tracks names not yet taken and says which are complete (rules in the module doc).

    ``stall``: how long a file that is still structurally incomplete must stay quiet
    before it is taken anyway (to fail and be quarantined, or to be processed if it is a
    Level 1B file without the usual extensions)."""

    def __init__(self, inbox: Path, settle: float, stall: float | None = None):
        self.inbox = inbox
        self.settle = settle
        self.stall = max(60.0, 10 * settle) if stall is None else max(stall, settle)
        self.pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, name: str) -> bool:
        return name in self.pending

    def observe(self, name: str, renamed: bool = False, now: float | None = None) -> None:
        """A name was seen (scan or event); ``renamed``: it was just renamed into INBOX."""
        now = time.monotonic() if now is None else now
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self.pending.pop(name, None)
            return
        p = self.pending.get(name)
        if p is None or (p.size, p.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.pending[name] = p = _Pending(st.st_size, st.st_mtime_ns, now)
        if renamed:
            p.renamed = True

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
            # quiet: unchanged while we watched, or not modified since (mtime) -- a writer
            # that paused shows the time of its last write
            facts = dict(regular=statmod.S_ISREG(lst.st_mode), renamed=p.renamed,
                         quiet=max(now - p.changed_at, wall - lst.st_mtime_ns / 1e9),
                         settle=self.settle, stall=self.stall)
            verdict = completeness(**facts)
            if verdict == "look":
                verdict = completeness(**facts, structure=structure(path))
            if verdict == "complete":
                out.append(name)
        return out


def completeness(*, regular: bool, renamed: bool, quiet: float, settle: float, stall: float,
                 structure: str | None = None) -> str:
    """The "is it complete?" rule (module doc) for an entry unchanged since the settler
    last saw it; pure (:meth:`Settler.ready` gathers the facts).

    ``regular``: a regular file -- a symlink or anything else goes to the daemon at once,
    which checks it for safety before anything reads it; ``renamed``: renamed into INBOX
    under its name; ``quiet``: seconds since it last changed; ``structure``: what
    :func:`structure` found, None when not read yet. Returns ``"complete"``, ``"wait"``,
    or ``"look"``: read its structure and ask again."""
    if not regular or renamed:
        return "complete"
    if quiet < settle:
        return "wait"
    if quiet >= stall:
        return "complete"
    if structure is None:
        return "look"
    return "wait" if structure == "partial" else "complete"


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
                    # convention
                    watcher._put("gone", event.src_path)
                    watcher._put("renamed", event.dest_path)
                elif kind in ("created", "modified", "closed"):
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
