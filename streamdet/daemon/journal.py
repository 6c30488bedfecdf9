"""The daemon's durable journal: one SQLite database (WAL mode) in the state directory.

Two tables:

``files`` -- one row per *version* of an input: a file name in the inbox with one content
(sha256). A changed file with the same name gets a new row; the newest row of a name is its
current version.

========== ===========================================================================
column     meaning
========== ===========================================================================
id         row id (also names the run's staging directory)
name       file name in INBOX (no directory part)
path       absolute path where it was found
size       bytes, as stat'ed when taken (lstat for refused symlinks)
mtime_ns   modification time, nanoseconds
sha256     content hash (NULL for entries refused without reading them)
state      seen | running | done | failed | quarantined | ignored | vanished
attempts   runs started (interrupted ones included)
failures   failed runs that count against ``--retries`` (transient errors)
retry_at   epoch seconds before which a ``failed`` row is not retried
seen_at, started_at, finished_at   epoch seconds
seconds    processing time of the successful run (as the worker measured it)
timings    JSON: seconds per step of the successful run
products   JSON: {"rate": path, "rateints": path}
error      last error text;  error_kind: permanent | transient | security | unreadable |
           vanished | changed
moved_to   where the input was moved (archive or quarantine), if it was
move_pending 1 while that move is decided but not yet done (finished at start-up)
worker     host:pid (or Dask worker) of the last run
========== ===========================================================================

``runs`` -- one row per attempt: file_id, attempt, started_at, finished_at, outcome
(NULL while running; done | failed | interrupted | abandoned), seconds, worker, error.

State machine (see docs/watch.md)::

    (new file, complete) --> seen --> running --> done
                               ^        |  \\--> failed (transient, retries left) --> running
                               |        |  \\--> quarantined (permanent, or retries used up)
                               \\--------/ interrupted (daemon killed) / abandoned (shutdown)
    refused (symlink escaping INBOX, '..' in the name) --> quarantined (kind security)
    changed content of a done file --> new row: seen (--on-change reprocess) or ignored
    input gone before it ran --> vanished

Only the daemon's main thread writes; ``streamdet status`` reads concurrently (WAL).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1

STATES = ("seen", "running", "done", "failed", "quarantined", "ignored", "vanished")
#: states in which a row still has work to do
PENDING = ("seen", "failed")
#: states in which a version is settled
FINAL = ("done", "quarantined", "ignored", "vanished")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS files (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    path         TEXT NOT NULL,
    size         INTEGER,
    mtime_ns     INTEGER,
    sha256       TEXT,
    state        TEXT NOT NULL CHECK (state IN ('seen','running','done','failed',
                                                'quarantined','ignored','vanished')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    failures     INTEGER NOT NULL DEFAULT 0,
    retry_at     REAL,
    seen_at      REAL,
    started_at   REAL,
    finished_at  REAL,
    seconds      REAL,
    timings      TEXT,
    products     TEXT,
    error        TEXT,
    error_kind   TEXT,
    moved_to     TEXT,
    move_pending INTEGER NOT NULL DEFAULT 0,
    worker       TEXT
);
CREATE INDEX IF NOT EXISTS files_name ON files (name, id);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
CREATE INDEX IF NOT EXISTS files_finished ON files (finished_at);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY,
    file_id     INTEGER NOT NULL REFERENCES files (id),
    attempt     INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT CHECK (outcome IS NULL OR outcome IN
                            ('done','failed','interrupted','abandoned')),
    seconds     REAL,
    worker      TEXT,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS runs_file ON runs (file_id);
"""


@dataclass
class Row:
    """One row of ``files``."""

    id: int
    name: str
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    attempts: int
    failures: int
    retry_at: float | None
    seen_at: float | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    timings: str | None
    products: str | None
    error: str | None
    error_kind: str | None
    moved_to: str | None
    move_pending: int
    worker: str | None

    @property
    def product_paths(self) -> dict[str, str]:
        return json.loads(self.products) if self.products else {}


def storable(text: str) -> str:
    """``text`` as valid UTF-8 for the journal and the reports: an undecodable byte of a
    file name (a surrogate escape) becomes ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", errors="backslashreplace")


class JournalError(RuntimeError):
    pass


class JournalBroken(JournalError):
    """The journal file is corrupt, or not a streamdet journal (exit code 2: the file is
    kept as it is; ``streamdet watch --rebuild-journal`` moves it aside)."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}; the file was left as it is. Move it aside, or run "
                         "'streamdet watch INBOX --output OUTBOX --rebuild-journal' to move it "
                         "aside and rebuild the journal from OUTBOX")
        self.path = path


_OUR_TABLES = {"meta", "files", "runs"}


class Journal:
    """The SQLite journal. Every method is one transaction."""

    FILENAME = "journal.sqlite"

    def __init__(self, state_dir: str | os.PathLike, *, readonly: bool = False):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / self.FILENAME
        if readonly:
            if not self.path.exists():
                raise JournalError(f"no journal at {self.path}")
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                  check_same_thread=False)
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise JournalBroken(self.path, f"not a readable SQLite database ({exc})") from None
        except JournalError:
            self.db.close()
            raise

    def _open(self, readonly: bool) -> None:
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 30000")
        # looked at before anything is written: a foreign database is never changed
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables or readonly:
            if not _OUR_TABLES <= tables:
                what = (f"holds the tables {', '.join(sorted(tables))}" if tables else
                        "is empty")
                raise JournalBroken(self.path, f"not a streamdet journal (it {what})")
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise JournalBroken(self.path, f"the database is damaged ({check})")
            if self.get_meta("schema_version") is None:
                raise JournalBroken(self.path, "not a streamdet journal (no schema version)")
        if not readonly:
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"{self.path}: cannot use WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif not str(version).isdigit() or int(version) > SCHEMA_VERSION:
                raise JournalBroken(self.path, f"schema version {version!r} is not one this "
                                    f"streamdet understands ({SCHEMA_VERSION}: a newer "
                                    "streamdet wrote it?)")

    def close(self) -> None:
        self.db.close()

    # -- helpers ---------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self.db)

    @staticmethod
    def _row(r: sqlite3.Row | None) -> Row | None:
        return Row(**dict(r)) if r is not None else None

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    def set_meta(self, key: str, value: str) -> None:
        self.set_meta_many({key: value})

    def set_meta_many(self, values: dict[str, str]) -> None:
        with self._tx():
            self.db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) "
                                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                list(values.items()))

    # -- reading ---------------------------------------------------------------------------
    def get(self, file_id: int) -> Row:
        row = self._row(self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())
        if row is None:
            raise JournalError(f"no journal row {file_id}")
        return row

    def latest(self, name: str) -> Row | None:
        """The current version of ``name`` (its newest row)."""
        return self._row(self.db.execute(
            "SELECT * FROM files WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)).fetchone())

    def rows(self, where: str = "1", params: Iterable[Any] = ()) -> list[Row]:
        return [self._row(r) for r in
                self.db.execute(f"SELECT * FROM files WHERE {where} ORDER BY id", tuple(params))]

    def pending(self) -> list[Row]:
        """Rows with work left, oldest first."""
        return self.rows("state IN ('seen', 'failed')")

    def runs(self, file_id: int | None = None) -> list[dict]:
        if file_id is None:
            cur = self.db.execute("SELECT * FROM runs ORDER BY id")
        else:
            cur = self.db.execute("SELECT * FROM runs WHERE file_id = ? ORDER BY id", (file_id,))
        return [dict(r) for r in cur]

    def settled_identities(self) -> dict[str, tuple[int, int]]:
        """name -> (size, mtime_ns) of names whose current version is settled and whose
        input was left in place (so the same file in the inbox needs no second look)."""
        out = {}
        for r in self.db.execute(
                "SELECT name, size, mtime_ns FROM files WHERE id IN "
                "(SELECT max(id) FROM files GROUP BY name) "
                "AND state IN ('done', 'quarantined', 'ignored') AND moved_to IS NULL "
                "AND size IS NOT NULL"):
            out[r[0]] = (r[1], r[2])
        return out

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for state, n in self.db.execute("SELECT state, count(*) FROM files GROUP BY state"):
            out[state] = n
        return out

    def last_errors(self, n: int = 5) -> list[Row]:
        return [self._row(r) for r in self.db.execute(
            "SELECT * FROM files WHERE error IS NOT NULL AND state IN "
            "('failed', 'quarantined', 'vanished') "
            "ORDER BY coalesce(finished_at, seen_at) DESC, id DESC LIMIT ?", (n,))]

    def done_since(self, since: float) -> list[float]:
        return [r[0] for r in self.db.execute(
            "SELECT finished_at FROM files WHERE state = 'done' AND finished_at >= ? "
            "ORDER BY finished_at", (since,))]

    def consistency_problems(self) -> list[str]:
        """What is wrong with the journal, if anything (used by tests and ``status``)."""
        problems = []
        for r in self.db.execute(
                "SELECT f.id, f.name, count(r.id) FROM files f JOIN runs r ON r.file_id = f.id "
                "WHERE r.outcome = 'done' GROUP BY f.id HAVING count(r.id) > 1"):
            problems.append(f"{r[1]} (row {r[0]}) has {r[2]} successful runs")
        for r in self.db.execute(
                "SELECT f.id, f.name, f.state FROM files f WHERE f.state = 'done' AND NOT EXISTS "
                "(SELECT 1 FROM runs r WHERE r.file_id = f.id AND r.outcome = 'done')"):
            problems.append(f"{r[1]} (row {r[0]}) is done without a successful run")
        for r in self.db.execute(
                "SELECT f.id, f.name, f.state FROM files f JOIN runs r ON r.file_id = f.id "
                "WHERE r.outcome IS NULL AND f.state != 'running'"):
            problems.append(f"{r[1]} (row {r[0]}) has an open run but is {r[2]}")
        for r in self.db.execute(
                "SELECT id, name FROM files WHERE state = 'done' AND products IS NULL"):
            problems.append(f"{r[1]} (row {r[0]}) is done without products")
        return problems

    # -- writing ---------------------------------------------------------------------------
    def add(self, *, name: str, path: str, size: int | None, mtime_ns: int | None,
            sha256: str | None, state: str = "seen", error: str | None = None,
            error_kind: str | None = None, now: float | None = None) -> int:
        now = now or time.time()
        finished = now if state in FINAL else None
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO files (name, path, size, mtime_ns, sha256, state, seen_at, "
                "finished_at, error, error_kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, path, size, mtime_ns, sha256, state, now, finished, error, error_kind))
            return cur.lastrowid

    def update_identity(self, file_id: int, *, path: str, size: int, mtime_ns: int,
                        sha256: str | None = None) -> None:
        with self._tx():
            if sha256 is None:
                self.db.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                                (path, size, mtime_ns, file_id))
            else:
                self.db.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ?, sha256 = ? "
                                "WHERE id = ?", (path, size, mtime_ns, sha256, file_id))

    def start(self, file_id: int, now: float | None = None) -> tuple[int, int]:
        """seen/failed -> running; opens a run. Returns (run id, attempt number)."""
        now = now or time.time()
        with self._tx():
            row = self.db.execute("SELECT state, attempts FROM files WHERE id = ?",
                                  (file_id,)).fetchone()
            if row is None or row["state"] not in PENDING:
                raise JournalError(f"row {file_id} cannot start from state "
                                   f"{row['state'] if row else None}")
            attempt = row["attempts"] + 1
            self.db.execute("UPDATE files SET state = 'running', attempts = ?, started_at = ?, "
                            "retry_at = NULL WHERE id = ?", (attempt, now, file_id))
            cur = self.db.execute("INSERT INTO runs (file_id, attempt, started_at) "
                                  "VALUES (?, ?, ?)", (file_id, attempt, now))
            return cur.lastrowid, attempt

    def done(self, file_id: int, run_id: int, *, products: dict[str, str], seconds: float,
             timings: dict[str, float] | None, worker: str | None, moved_to: str | None,
             now: float | None = None) -> None:
        now = now or time.time()
        with self._tx():
            self.db.execute(
                "UPDATE files SET state = 'done', finished_at = ?, seconds = ?, timings = ?, "
                "products = ?, error = NULL, error_kind = NULL, moved_to = ?, "
                "move_pending = ?, worker = ? WHERE id = ?",
                (now, seconds, json.dumps(timings or {}), json.dumps(products), moved_to,
                 1 if moved_to else 0, worker, file_id))
            self._close_run(run_id, "done", now, seconds, worker, None)

    def fail(self, file_id: int, run_id: int | None, *, error: str, kind: str,
             quarantine: bool, counted: bool, retry_at: float | None = None,
             moved_to: str | None = None, worker: str | None = None,
             now: float | None = None) -> None:
        """A run failed: -> failed (retry later) or -> quarantined."""
        now = now or time.time()
        with self._tx():
            self.db.execute(
                "UPDATE files SET state = ?, finished_at = ?, error = ?, error_kind = ?, "
                "failures = failures + ?, retry_at = ?, moved_to = ?, move_pending = ?, "
                "worker = coalesce(?, worker) WHERE id = ?",
                ("quarantined" if quarantine else "failed", now if quarantine else None,
                 error, kind, 1 if counted else 0, None if quarantine else retry_at,
                 moved_to, 1 if moved_to else 0, worker, file_id))
            if run_id is not None:
                self._close_run(run_id, "failed", now, None, worker, error)

    def set_state(self, file_id: int, state: str, *, error: str | None = None,
                  error_kind: str | None = None, now: float | None = None) -> None:
        now = now or time.time()
        with self._tx():
            self.db.execute("UPDATE files SET state = ?, error = coalesce(?, error), "
                            "error_kind = coalesce(?, error_kind), finished_at = ? WHERE id = ?",
                            (state, error, error_kind, now if state in FINAL else None, file_id))

    def abandon(self, file_id: int, run_id: int, outcome: str = "abandoned",
                now: float | None = None) -> None:
        """running -> seen without counting a failure (daemon stopping)."""
        now = now or time.time()
        with self._tx():
            self.db.execute("UPDATE files SET state = 'seen' WHERE id = ? AND state = 'running'",
                            (file_id,))
            self._close_run(run_id, outcome, now, None, None, None)

    def recover_interrupted(self, now: float | None = None) -> list[Row]:
        """At start-up: rows left ``running`` by a daemon that died go back to ``seen``."""
        now = now or time.time()
        with self._tx():
            rows = [self._row(r) for r in
                    self.db.execute("SELECT * FROM files WHERE state = 'running' ORDER BY id")]
            self.db.execute("UPDATE files SET state = 'seen' WHERE state = 'running'")
            self.db.execute("UPDATE runs SET outcome = 'interrupted', finished_at = ? "
                            "WHERE outcome IS NULL", (now,))
        return rows

    def pending_moves(self) -> list[Row]:
        return self.rows("move_pending = 1")

    def move_finished(self, file_id: int, moved_to: str | None) -> None:
        with self._tx():
            self.db.execute("UPDATE files SET move_pending = 0, moved_to = ? WHERE id = ?",
                            (moved_to, file_id))

    def _close_run(self, run_id: int, outcome: str, now: float, seconds: float | None,
                   worker: str | None, error: str | None) -> None:
        self.db.execute("UPDATE runs SET outcome = ?, finished_at = ?, seconds = ?, "
                        "worker = coalesce(?, worker), error = ? WHERE id = ? AND outcome IS NULL",
                        (outcome, now, seconds, worker, error, run_id))


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False


def move_aside(state_dir: str | os.PathLike) -> Path | None:
    """Rename the journal (and its WAL files) to ``journal.sqlite.broken-<UTC time>``;
    returns the new name, or None when there was no journal. Never deletes anything."""
    path = Path(state_dir) / Journal.FILENAME
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.broken-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.broken-{stamp}.{n}")
        n += 1
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside


def rebuild(state_dir: str | os.PathLike, inbox: Path, outbox: Path, pattern: str,
            archive: Path | None = None) -> tuple[Path | None, str]:
    """``streamdet watch --rebuild-journal``: move the journal aside and write a new one
    from what is on disk -- an input (in INBOX or the archive) whose products
    ``<base>_rate.fits`` and ``<base>_rateints.fits`` are in OUTBOX is done (a product
    is trusted to belong to the input of its base name); every ``*.error.json`` of the
    quarantine gives back its quarantined row. Everything else is processed afresh."""
    import hashlib

    from ..core.products import output_paths
    from . import watcher as w

    aside = move_aside(state_dir)
    journal = Journal(state_dir)
    done = quarantined = 0
    try:
        sources = [(inbox, name) for name in w.scan(inbox, pattern)]
        if archive is not None and archive.is_dir():
            sources += [(archive, name) for name in w.scan(archive, pattern)]
        for directory, name in sources:
            if storable(name) != name:          # refused names are recorded when seen
                continue
            products = dict(reversed(output_paths(name, outbox).items()))  # rate last
            if not all(p.is_file() for p in products.values()) or journal.latest(name):
                continue
            try:
                fd, st = w.open_entry(directory, name)
            except (OSError, w.Refused, w.NotRegular):
                continue
            try:
                digest = hashlib.sha256()
                offset = 0
                while chunk := os.pread(fd, 1 << 20, offset):
                    digest.update(chunk)
                    offset += len(chunk)
            finally:
                os.close(fd)
            fid = journal.add(name=name, path=str(inbox / name), size=st.st_size,
                              mtime_ns=st.st_mtime_ns, sha256=digest.hexdigest())
            run_id, _ = journal.start(fid)
            moved_to = str(directory / name) if directory != inbox else None
            journal.done(fid, run_id, products={k: str(p) for k, p in products.items()},
                         seconds=0.0, timings=None, worker="rebuilt", moved_to=moved_to)
            journal.move_finished(fid, moved_to)
            done += 1
        quarantine = Path(state_dir) / "quarantine"
        reports = sorted(quarantine.glob("*.error.json")) if quarantine.is_dir() else []
        for report in reports:
            try:
                body = json.loads(report.read_text())
                name = str(body["file"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            fid = journal.add(name=name, path=str(body.get("inbox_path") or inbox / name),
                              size=body.get("size"), mtime_ns=None, sha256=body.get("sha256"),
                              state="quarantined", error=body.get("reason"),
                              error_kind=body.get("kind"))
            journal.move_finished(fid, body.get("quarantined_input"))
            quarantined += 1
    finally:
        journal.close()
    return aside, f"{done} done, {quarantined} quarantined"
