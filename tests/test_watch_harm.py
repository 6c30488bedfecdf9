"""``streamdet watch`` against a hostile or unlucky inbox (issue 11): swapped symlinks,
deliveries paused on an HDU boundary, a source tree in the working directory, a corrupt
journal, worker pools that cannot start, hostile names and an unwritable OUTBOX.

Real daemons (subprocesses), real worker processes, a real watchdog observer and real
files, as in tests/test_watch.py, whose helpers and fixtures these tests share.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from .test_watch import (  # noqa: F401  (sim and env are fixtures)
    Daemon, _edit_header, _pool_workers, done_names, env, journal_rows, journal_runs, sim,
    streamdet_cmd, tree, wait_for,
)


def _watch_once(inbox: Path, outbox: Path, env: dict, *args: str, cwd=None,
                cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run((cmd or streamdet_cmd()) + ["watch", str(inbox), "--output",
                                                      str(outbox), "--once", "--workers", "1",
                                                      "--settle", "0.5", *args],
                          env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ------------------------------------------------------------------------------------------
# finding 2: a symlink swapped in after the daemon's check is not followed
# ------------------------------------------------------------------------------------------

def test_symlink_swapped_in_after_the_check_is_not_read(sim, env, tmp_path):
    """The file the daemon checked is replaced by a symlink to a file outside INBOX while
    its job waits for the (paused) worker: the worker must not process the outside file."""
    psutil = pytest.importorskip("psutil")
    inbox, outbox, outside = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    secret = outside / "secret_uncal.fits"
    _edit_header(sim.uncal, secret, TARGPROP="SECRET")
    state = outbox / ".streamdet"
    daemon = Daemon(inbox, outbox, env, "--workers", "1", "--retries", "0")
    wait_for(lambda: "workers ready" in daemon.text(), 60, "workers ready", daemon)
    workers = _pool_workers(psutil, daemon.pid)
    for p in workers:
        p.suspend()
    try:
        shutil.copyfile(sim.uncal, inbox / "swap_uncal.fits")
        wait_for(lambda: any(r["state"] == "running" for r in journal_rows(state)), 60,
                 "the file handed to the paused worker", daemon)
        link = inbox / ".swap.tmp"
        link.symlink_to(secret)
        os.replace(link, inbox / "swap_uncal.fits")
    finally:
        for p in workers:
            p.resume()
    wait_for(lambda: not any(r["state"] in ("running", "seen", "failed")
                             for r in journal_rows(state)) and journal_rows(state), 60,
             "the run to end", daemon)
    assert daemon.stop() == 0
    for product in outbox.glob("*.fits"):
        assert fits.getval(product, "TARGPROP") != "SECRET", product
    row = journal_rows(state)[0]
    assert row["state"] != "done", row
    assert row["error_kind"] == "security" and "outside the inbox" in row["error"], row
    assert (inbox / "swap_uncal.fits").is_symlink()       # refused entries are not moved
    assert secret.exists()


# ------------------------------------------------------------------------------------------
# finding 3: a delivery paused on an HDU boundary is not taken half-written
# ------------------------------------------------------------------------------------------

def _hdu_starts(path: Path) -> dict[str, int]:
    with fits.open(path) as hdul:
        return {(h.name or "PRIMARY"): h.fileinfo()["hdrLoc"] for h in hdul}


def test_delivery_paused_on_an_hdu_boundary_waits_for_the_rest(sim, env, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    data = sim.uncal.read_bytes()
    starts = _hdu_starts(sim.uncal)
    cuts = {"nosci_uncal.fits": starts["SCI"],            # PRIMARY only
            "nointtimes_uncal.fits": starts["INT_TIMES"]}  # cut just after SCI (and GROUP)
    daemon = Daemon(inbox, outbox, env, "--workers", "1", "--retries", "0", "--settle", "5")
    wait_for(lambda: "workers ready" in daemon.text(), 60, "workers ready", daemon)
    for name, cut in cuts.items():         # part, close ...
        (inbox / name).write_bytes(data[:cut])
    time.sleep(1.0)                        # ... pause (well under --settle) ...
    for name, cut in cuts.items():         # ... append the rest
        with open(inbox / name, "ab") as f:
            f.write(data[cut:])
    wait_for(lambda: done_names(state) >= set(cuts) or any(
        r["state"] == "quarantined" for r in journal_rows(state)), 90, "both deliveries done",
        daemon)
    assert daemon.stop() == 0
    for name in cuts:
        rows = [r for r in journal_rows(state) if r["name"] == name]
        assert len(rows) == 1 and rows[0]["size"] == len(data), rows   # taken once, whole
        assert rows[0]["attempts"] == 1, rows
        base = name[: -len("_uncal.fits")]
        with fits.open(outbox / f"{base}_rateints.fits") as hdul:
            assert "INT_TIMES" in hdul
    assert not (state / "quarantine").exists() or not os.listdir(state / "quarantine")


# ------------------------------------------------------------------------------------------
# finding 4: a streamdet/ source tree in the working directory is not what workers run
# ------------------------------------------------------------------------------------------

def test_workers_run_the_daemons_code_whatever_the_working_directory(sim, env, tmp_path):
    """The daemon started in a clone of the sources (its C kernels not built): the workers
    must run the installed package the daemon runs, not the tree they find in the cwd."""
    import streamdet

    clone = tmp_path / "clone"
    shutil.copytree(Path(streamdet.__file__).parent, clone / "streamdet",
                    ignore=shutil.ignore_patterns("*.so", "*.dylib", "*.pyd", "__pycache__"))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    shutil.copyfile(sim.uncal, inbox / "cwd_uncal.fits")
    res = _watch_once(inbox, outbox, env, "--retries", "0", cwd=clone)
    assert res.returncode == 0, res.stderr
    rows = journal_rows(outbox / ".streamdet")
    assert [r["state"] for r in rows] == ["done"], (rows, res.stderr[-3000:])


# ------------------------------------------------------------------------------------------
# finding 8: a corrupt or foreign journal; --rebuild-journal
# ------------------------------------------------------------------------------------------

def test_corrupt_or_foreign_journal_is_named_and_kept(sim, env, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    shutil.copyfile(sim.uncal, inbox / "kept_uncal.fits")
    res = _watch_once(inbox, outbox, env)
    assert res.returncode == 0, res.stderr
    assert done_names(state) == {"kept_uncal.fits"}
    products = {p.name: p.stat().st_mtime_ns for p in outbox.glob("*.fits")}
    assert len(products) == 2

    journal = state / "journal.sqlite"
    for what in ("corrupt", "foreign"):
        for extra in ("journal.sqlite-wal", "journal.sqlite-shm"):
            (state / extra).unlink(missing_ok=True)
        if what == "corrupt":
            journal.write_bytes(b"this is not a database\n" * 400)
        else:
            journal.unlink()
            db = sqlite3.connect(journal)
            db.execute("CREATE TABLE accounts (who TEXT, balance REAL)")
            db.commit()
            db.close()
        before = journal.read_bytes()
        for cmd in (["status", str(outbox)],
                    ["watch", str(inbox), "--output", str(outbox), "--once", "--workers", "1"]):
            res = subprocess.run(streamdet_cmd() + cmd, env=env, capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 2, (what, cmd[0], res.returncode, res.stderr)
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, (what, cmd[0], res.stderr)
            assert str(journal) in lines[0] and "--rebuild-journal" in lines[0], lines
            _no_traceback(res.stderr)
            assert journal.read_bytes() == before          # kept as it was

    # rebuilt from OUTBOX: the done file is recognised, nothing is processed again
    res = _watch_once(inbox, outbox, env, "--rebuild-journal")
    assert res.returncode == 0, res.stderr
    aside = [p for p in state.iterdir() if p.name.startswith("journal.sqlite.broken")]
    assert len(aside) == 1 and aside[0].read_bytes() == before
    rows = journal_rows(state)
    assert [(r["name"], r["state"]) for r in rows] == [("kept_uncal.fits", "done")], rows
    assert {p.name: p.stat().st_mtime_ns for p in outbox.glob("*.fits")} == products
    res = subprocess.run(streamdet_cmd() + ["status", str(outbox)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "journal problems" not in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------
# finding 12: a worker pool that cannot start stops the daemon; files stay untouched
# ------------------------------------------------------------------------------------------

def _removable_interpreter(root: Path) -> Path:
    """A venv-like directory whose ``bin/python`` is a symlink to this interpreter (with
    this venv's packages): removing the link makes the interpreter unreachable for new
    worker processes while the daemon already running from it carries on."""
    venv = Path(sys.prefix)
    (root / "bin").mkdir(parents=True)
    exe = root / "bin" / "python"
    exe.symlink_to(os.path.realpath(sys.executable))
    if (venv / "pyvenv.cfg").exists():
        shutil.copyfile(venv / "pyvenv.cfg", root / "pyvenv.cfg")
        (root / "lib").symlink_to(venv / "lib")
    return exe


def test_a_pool_that_cannot_start_workers_stops_the_daemon(sim, env, tmp_path):
    psutil = pytest.importorskip("psutil")
    exe = _removable_interpreter(tmp_path / "venv")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    log = tmp_path / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(exe), "-m", "streamdet.cli", "watch", str(inbox),
                                 "--output", str(outbox), "--workers", "1", "--settle", "0.5",
                                 "--retries", "0"],
                                env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            wait_for(lambda: "workers ready" in log.read_text(errors="replace"), 60,
                     "workers ready")
            # the forkserver and its workers die, and no new one can start
            children = psutil.Process(proc.pid).children(recursive=True)
            server = [p for p in children if "forkserver" in " ".join(p.cmdline())]
            assert server, [p.cmdline() for p in children]
            doomed = server + [p for p in children if p.ppid() == server[0].pid]
            exe.unlink()
            for p in doomed:
                p.kill()
            wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                                 for p in doomed), 10, "the workers to die")
            names = ["a_uncal.fits", "b_uncal.fits"]
            for name in names:
                shutil.copyfile(sim.uncal, inbox / name)
            wait_for(lambda: proc.poll() is not None or any(
                r["state"] == "quarantined" for r in journal_rows(state)), 90,
                "the daemon to stop")
            code = proc.poll()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "worker pool is broken" in text, text[-3000:]
    _no_traceback(text)
    assert sorted(os.listdir(inbox)) == names                      # untouched
    assert not (state / "quarantine").exists() or not os.listdir(state / "quarantine")
    assert all(r["state"] == "seen" for r in journal_rows(state)), journal_rows(state)
    assert not [r for r in journal_runs(state) if r["outcome"] == "failed"]


# ------------------------------------------------------------------------------------------
# finding 6: hostile names
# ------------------------------------------------------------------------------------------

def test_names_cannot_forge_log_lines_and_impossible_names_are_refused(sim, env, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    forged = "x\n2026-01-01T00:00:00.000Z INFO    done       forged_uncal.fits"
    long = "j" * (255 - len("_uncal.fits")) + "_uncal.fits"          # 255 bytes: allowed
    latin1 = os.fsdecode(b"caf\xe9_uncal.fits")                      # not UTF-8
    for name in (forged, long, latin1, "plain_uncal.fits"):
        shutil.copyfile(sim.uncal, inbox / name)
    res = _watch_once(inbox, outbox, env, "--retries", "0")
    assert res.returncode == 0, res.stderr
    assert not [line for line in res.stderr.splitlines() if line.startswith("2026-01-01")]
    rows = {r["name"]: r for r in journal_rows(state)}
    assert rows["plain_uncal.fits"]["state"] == "done"
    assert forged in rows and "\\n2026-01-01" in res.stderr   # logged, escaped
    refused = rows[long]
    assert refused["state"] == "quarantined", refused
    assert "too long" in refused["error"] and refused["error_kind"] == "name", refused
    assert (inbox / long).exists()                                  # refused, not moved
    assert rows["caf\\xe9_uncal.fits"]["error_kind"] == "name"      # stored escaped
    assert "not valid UTF-8" in rows["caf\\xe9_uncal.fits"]["error"]
    assert (inbox / latin1).exists()
    reports = [json.loads(p.read_text()) for p in (state / "quarantine").glob("*.error.json")]
    assert [r for r in reports if r["file"] == long][0]["kind"] == "name"
    res = subprocess.run(streamdet_cmd() + ["status", str(outbox)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "too long" in res.stdout
    assert not [line for line in res.stdout.splitlines() if line.startswith("2026-01-01")]


# ------------------------------------------------------------------------------------------
# finding 9: an unwritable OUTBOX is exit 2, before anything is processed
# ------------------------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write in (for root too: the immutable attribute)."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("running as root without chattr +i")
        yield path
        subprocess.run(["chattr", "-i", str(path)])
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_unwritable_outbox_is_exit_2_before_any_processing(sim, env, tmp_path, read_only_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(sim.uncal, inbox / "w_uncal.fits")
    before = tree(inbox)
    state = tmp_path / "state"
    for outbox, extra in ((read_only_dir, ["--state-dir", str(state)]),
                          (read_only_dir / "sub", []),
                          (read_only_dir, [])):
        res = _watch_once(inbox, outbox, env, *extra)
        assert res.returncode == 2, (outbox, extra, res.returncode, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(outbox) in lines[0], res.stderr
        _no_traceback(res.stderr)
        assert tree(inbox) == before
        assert not journal_rows(state) or all(r["state"] != "quarantined"
                                               for r in journal_rows(state))


# ------------------------------------------------------------------------------------------
# the pieces behind finding 2: open_entry, and the engine reading through a descriptor
# ------------------------------------------------------------------------------------------

def test_open_entry_opens_only_entries_of_the_inbox(sim, tmp_path):
    from streamdet.core.exposure import Exposure
    from streamdet.daemon import watcher as w

    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    shutil.copyfile(sim.uncal, inbox / "real_uncal.fits")
    shutil.copyfile(sim.uncal, outside / "secret_uncal.fits")
    (inbox / "alias_uncal.fits").symlink_to("real_uncal.fits")
    (inbox / "absolute_uncal.fits").symlink_to(inbox / "real_uncal.fits")
    (inbox / "out_uncal.fits").symlink_to(outside / "secret_uncal.fits")
    (inbox / "chain_uncal.fits").symlink_to("out_uncal.fits")
    (inbox / "dangling_uncal.fits").symlink_to("nothing_uncal.fits")
    os.mkfifo(inbox / "fifo_uncal.fits")
    (inbox / "dir_uncal.fits").mkdir()

    real = os.stat(inbox / "real_uncal.fits").st_ino
    for name in ("real_uncal.fits", "alias_uncal.fits", "absolute_uncal.fits"):
        fd, st = w.open_entry(inbox, name)
        os.close(fd)
        assert st.st_ino == real, name
    for name in ("out_uncal.fits", "chain_uncal.fits"):
        with pytest.raises(w.Refused, match="outside the inbox"):
            w.open_entry(inbox, name)
    with pytest.raises(w.Refused, match="'..'"):
        w.open_entry(inbox, "..")
    with pytest.raises(FileNotFoundError):
        w.open_entry(inbox, "dangling_uncal.fits")
    for name in ("fifo_uncal.fits", "dir_uncal.fits"):   # at once: a FIFO does not block
        with pytest.raises(w.NotRegular):
            w.open_entry(inbox, name)

    # the engine reads the descriptor's file, whatever the path names by then
    fd, _ = w.open_entry(inbox, "real_uncal.fits")
    try:
        with fits.open(sim.uncal) as hdul:
            want = hdul["SCI"].data[0, :, :4].astype("float32")
        (inbox / "real_uncal.fits").unlink()
        (inbox / "real_uncal.fits").write_bytes(b"replaced" * 1000)
        with Exposure(inbox / "real_uncal.fits", fd=fd) as exposure:
            data, _ = exposure.read(slice(0, 1), slice(0, 4))
        assert exposure.meta.path == inbox / "real_uncal.fits"
        assert (data[0] == want).all()
    finally:
        os.close(fd)
