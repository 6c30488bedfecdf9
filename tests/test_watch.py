"""``streamdet watch`` / ``streamdet status``: the watch-folder daemon, tested with real
processes, real files, a real watchdog observer and a real Dask LocalCluster.

One simulated SUB64 exposure (and its CRDS cache) serves every test: its uncal file is
copied under many names into the inbox, and every copy resolves through the same cache.
The reference products come from ``streamdet process`` run on the same file.
"""

from __future__ import annotations

import contextlib

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.daemon import watcher as w
from streamdet.testing import metadata_tree_text

SETTLE = "1.0"
IGNORED_CARDS = {"DATE", "FILENAME"}


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from streamdet.simulate import simulate

    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB64", ngroups=10, nints=2, seed=0)


@pytest.fixture(scope="module")
def env(sim):
    out = dict(os.environ)
    out.update(sim.env)
    out["STREAMDET_QUICKLOOK"] = "off"   # an installed observer plugin would only slow us
    out["PYTHONUNBUFFERED"] = "1"
    return out


def streamdet_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("streamdet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "streamdet.cli"]


@pytest.fixture(scope="module")
def reference(sim, env, tmp_path_factory):
    """What ``streamdet process`` makes of the simulated file: {'rate': Path, 'rateints': Path}."""
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(streamdet_cmd() + ["process", str(sim.uncal), "-o", str(out), "-q"],
                   env=env, check=True, timeout=120)
    base = sim.uncal.name[: -len("_uncal.fits")]
    return {"rate": out / f"{base}_rate.fits", "rateints": out / f"{base}_rateints.fits"}


_started: list["Daemon"] = []


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """Whatever a test does (or fails to do), the daemons it started end with it."""
    yield
    while _started:
        daemon = _started.pop()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            try:
                daemon.proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        if not daemon.logf.closed:
            daemon.logf.close()


class Daemon:
    """``streamdet watch`` as a real subprocess."""

    def __init__(self, inbox: Path, outbox: Path, env: dict, *args: str, log: Path | None = None):
        self.log = log or outbox.parent / f"watch-{time.time_ns()}.log"
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            streamdet_cmd() + ["watch", str(inbox), "--output", str(outbox), "--settle", SETTLE,
                               *args],
            env=env, stdout=self.logf, stderr=subprocess.STDOUT)
        _started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.logf.close()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def journal_rows(state: Path) -> list[dict]:
    path = state / "journal.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM files ORDER BY id")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def journal_runs(state: Path) -> list[dict]:
    db = sqlite3.connect(state / "journal.sqlite", timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        db.close()


def done_names(state: Path) -> set[str]:
    return {r["name"] for r in journal_rows(state) if r["state"] == "done"}


def wait_for(predicate, timeout: float, what: str, daemon: Daemon | None = None, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}) while waiting for "
                                 f"{what}:\n{daemon.text()[-4000:]}")
        time.sleep(step)
    log = daemon.text()[-4000:] if daemon is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def drop(src: Path, dest: Path, how: str = "copy", pause: float = 0.3) -> None:
    """Deliver ``src`` as ``dest`` the way producers do."""
    data = src.read_bytes()
    if how == "copy":
        shutil.copyfile(src, dest)
    elif how == "rename":               # written under a temporary name, then renamed
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    elif how == "part":                 # name.part, then renamed
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    elif how == "slow":                 # one handle: part of the bytes, a pause, the rest
        with open(dest, "wb") as f:
            f.write(data[: len(data) // 3])
            f.flush()
            time.sleep(pause)
            f.write(data[len(data) // 3:])
    elif how == "slow-reopen":          # closed after the first piece, appended later
        with open(dest, "wb") as f:
            f.write(data[: len(data) // 2 + 1000])
        time.sleep(pause)
        with open(dest, "ab") as f:
            f.write(data[len(data) // 2 + 1000:])
    else:
        raise ValueError(how)


def assert_same_product(got: Path, want: Path) -> None:
    """Every HDU's header cards (DATE and FILENAME apart) and data identical."""
    with fits.open(got) as a, fits.open(want) as b:
        assert [h.name for h in a] == [h.name for h in b], got
        for ha, hb in zip(a, b):
            ca = [(c.keyword, c.value) for c in ha.header.cards if c.keyword not in IGNORED_CARDS]
            cb = [(c.keyword, c.value) for c in hb.header.cards if c.keyword not in IGNORED_CARDS]
            # the ASDF table's width follows its text (compared below without run stamps)
            assert ca == cb or ha.name == "ASDF", f"{got} [{ha.name}] header differs"
            if ha.data is None or hb.data is None:
                assert ha.data is None and hb.data is None
            elif ha.name == "ASDF":  # the metadata tree, less the time of writing
                assert metadata_tree_text(ha) == metadata_tree_text(hb), f"{got} [ASDF] differs"
            elif isinstance(ha, fits.BinTableHDU):
                assert ha.data.tobytes() == hb.data.tobytes(), f"{got} [{ha.name}] data differs"
            else:
                np.testing.assert_array_equal(ha.data, hb.data, err_msg=f"{got} [{ha.name}]")


def products_of(outbox: Path) -> list[str]:
    if not outbox.exists():
        return []
    return sorted(p.name for p in outbox.iterdir() if not p.name.startswith("."))


def expected_products(names) -> list[str]:
    out = []
    for name in names:
        base = name[: -len("_uncal.fits")]
        out += [f"{base}_rate.fits", f"{base}_rateints.fits"]
    return sorted(out)


def assert_clean_outbox(outbox: Path, names, reference=None, check=None) -> None:
    assert products_of(outbox) == expected_products(names)
    umask = os.umask(0o022)
    os.umask(umask)
    for p in products_of(outbox):   # readable by others as the umask allows, not 0600
        assert (outbox / p).stat().st_mode & 0o777 == 0o666 & ~umask, p
    leftovers = [p.name for p in outbox.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    staging = outbox / ".streamdet-staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    if reference is not None:
        for name in (check if check is not None else names):
            base = name[: -len("_uncal.fits")]
            for kind in ("rate", "rateints"):
                assert_same_product(outbox / f"{base}_{kind}.fits", reference[kind])


def assert_journal_consistent(state: Path, names, exactly_once: bool = True) -> None:
    from streamdet.daemon.journal import Journal

    rows = journal_rows(state)
    assert not [r for r in rows if r["state"] == "running"]
    j = Journal(state, readonly=True)
    try:
        assert j.consistency_problems() == []
    finally:
        j.close()
    runs = journal_runs(state)
    assert not [r for r in runs if r["outcome"] is None]
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    for name in names:
        done = [r for r in by_name.get(name, []) if r["state"] == "done"]
        assert len(done) == 1, (name, by_name.get(name))
        if exactly_once:
            ok = [r for r in runs if r["file_id"] == done[0]["id"] and r["outcome"] == "done"]
            assert len(ok) == 1, (name, ok)
        products = json.loads(done[0]["products"])
        assert set(products) >= {"rate", "rateints"}
        assert all(Path(p).exists() for p in products.values())


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed): name -> (type, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------
# the command line stays light
# ------------------------------------------------------------------------------------------

def test_cli_import_stays_light():
    code = ("import sys, streamdet.cli; "
            "heavy = [m for m in ('watchdog', 'distributed', 'dask', 'streamdet.daemon.daemon', "
            "'streamdet.daemon.journal', 'streamdet.daemon.executor') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(streamdet_cmd() + ["--help"], capture_output=True, text=True)
    assert "watch" in res.stdout and "status" in res.stdout


# ------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------

def test_completeness_and_safety_rules(sim, tmp_path):
    good = tmp_path / "good_uncal.fits"
    shutil.copyfile(sim.uncal, good)
    assert w.fits_complete(good)
    data = good.read_bytes()
    (tmp_path / "short_uncal.fits").write_bytes(data[: len(data) // 2])
    assert not w.fits_complete(tmp_path / "short_uncal.fits")
    (tmp_path / "junk_uncal.fits").write_bytes(os.urandom(2880 * 3))
    assert not w.fits_complete(tmp_path / "junk_uncal.fits")
    (tmp_path / "long_uncal.fits").write_bytes(data + b"x" * 2880)
    assert not w.fits_complete(tmp_path / "long_uncal.fits")
    (tmp_path / "padded_uncal.fits").write_bytes(data + b"\0" * 2880)  # as the reader allows
    assert w.fits_complete(tmp_path / "padded_uncal.fits")
    # a Level 1B structure: whole, still growing, or never one
    assert w.structure(good) == "whole"
    with fits.open(good) as hdul:
        int_times_at = hdul["INT_TIMES"].fileinfo()["hdrLoc"]
    (tmp_path / "cut_uncal.fits").write_bytes(data[:int_times_at])   # on an HDU boundary
    assert w.fits_complete(tmp_path / "cut_uncal.fits")
    assert w.structure(tmp_path / "cut_uncal.fits") == "partial"
    assert w.structure(tmp_path / "short_uncal.fits") == "partial"
    assert w.structure(tmp_path / "junk_uncal.fits") == "foreign"
    assert w.structure(tmp_path / "long_uncal.fits") == "foreign"

    assert w.candidate_name("jw1_uncal.fits", "*_uncal.fits")
    for name in (".jw1_uncal.fits", "jw1_uncal.fits.part", "jw1_uncal.fits.tmp", "jw1_rate.fits"):
        assert not w.candidate_name(name, "*_uncal.fits"), name

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "out_uncal.fits").symlink_to(good)
    (inbox / "in_uncal.fits").symlink_to(inbox / "x_uncal.fits")
    (inbox / "x_uncal.fits").write_bytes(b"")
    assert "outside the inbox" in w.check_safe(inbox, "out_uncal.fits")
    assert w.check_safe(inbox, "in_uncal.fits") is None
    assert "'..'" in w.check_safe(inbox, "a..b_uncal.fits")
    assert w.check_safe(inbox, "x_uncal.fits") is None


# ------------------------------------------------------------------------------------------
# 20 files dropped at once: local pool and Dask
# ------------------------------------------------------------------------------------------

HOWS = ["copy"] * 7 + ["rename"] * 4 + ["part"] * 3 + ["slow"] * 3 + ["slow-reopen"] * 3


def _drop_twenty(sim, inbox: Path) -> list[str]:
    names = [f"jw{i:05d}001001_01101_00001_mirimage_uncal.fits" for i in range(20)]
    threads = []
    for name, how in zip(names, HOWS):
        if how.startswith("slow"):
            t = threading.Thread(target=drop, args=(sim.uncal, inbox / name, how, 0.3))
            t.start()
            threads.append(t)
        else:
            drop(sim.uncal, inbox / name, how)
    for t in threads:
        t.join()
    return names


def _check_twenty(inbox, outbox, state, names, reference, sim, daemon):
    wait_for(lambda: done_names(state) >= set(names), 180, "20 files done", daemon)
    time.sleep(0.5)   # nothing more should happen
    assert daemon.stop() == 0, daemon.text()[-3000:]
    rows = journal_rows(state)
    size = sim.uncal.stat().st_size
    assert all(r["size"] == size for r in rows), "a file was taken before it was complete"
    assert not [r for r in rows if r["state"] != "done"], rows
    assert_journal_consistent(state, names)
    assert_clean_outbox(outbox, names, reference)
    assert sorted(p.name for p in inbox.iterdir()) == sorted(names)   # inputs stay
    log = daemon.text()
    for name in names:
        assert f"taken      {name}" in log and f"done       {name} in " in log


def test_drop_twenty_files_local_pool(sim, env, reference, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    daemon = Daemon(inbox, outbox, env, "--workers", "2")
    state = outbox / ".streamdet"
    wait_for(lambda: (state / "journal.sqlite").exists(), 60, "daemon start", daemon)
    names = _drop_twenty(sim, inbox)
    _check_twenty(inbox, outbox, state, names, reference, sim, daemon)


def test_drop_twenty_files_dask(sim, env, reference, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    for key, value in env.items():       # the cluster's worker processes inherit this
        monkeypatch.setenv(key, value)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, scheduler_port=0) as cluster:
        daemon = Daemon(inbox, outbox, env, "--dask-scheduler", cluster.scheduler_address)
        state = outbox / ".streamdet"
        wait_for(lambda: (state / "journal.sqlite").exists(), 60, "daemon start", daemon)
        names = _drop_twenty(sim, inbox)
        _check_twenty(inbox, outbox, state, names, reference, sim, daemon)
        assert "Dask cluster at tcp://" in daemon.text()
        workers = {r["worker"] for r in journal_runs(state)}
        assert all(wk and str(os.getpid()) not in wk for wk in workers)


# ------------------------------------------------------------------------------------------
# SIGKILL at random moments while files arrive
# ------------------------------------------------------------------------------------------

def test_sigkill_restarts_lose_nothing_and_duplicate_nothing(sim, env, reference, tmp_path):
    rng = random.Random(4)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    names = [f"jw{i:05d}002001_01101_00001_mirimage_uncal.fits" for i in range(24)]
    hows = ["copy", "rename", "slow", "part", "slow-reopen", "copy"]

    def feeder():
        for i, name in enumerate(names):
            drop(sim.uncal, inbox / name, hows[i % len(hows)], 0.2)
            time.sleep(rng.uniform(0.05, 0.5))

    feed = threading.Thread(target=feeder)
    feed.start()
    kills = 0
    while kills < 6 or feed.is_alive():
        daemon = Daemon(inbox, outbox, env, "--workers", "2")
        if kills % 2:   # at a random moment of the start-up ...
            time.sleep(rng.uniform(0.3, 3.0))
        else:           # ... or of the work, once the workers are up
            wait_for(lambda: "workers ready" in daemon.text(), 90, "workers", daemon, step=0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        daemon.kill()
        kills += 1
        # after a crash: no file done twice, the journal consistent
        from streamdet.daemon.journal import Journal

        if (state / "journal.sqlite").exists():
            j = Journal(state, readonly=True)
            try:
                assert j.consistency_problems() == []
            finally:
                j.close()
        # after a crash: no partial product visible, rate never without its rateints
        visible = products_of(outbox)
        for p in visible:
            assert w.fits_complete(outbox / p), p
        for p in visible:
            if p.endswith("_rate.fits"):
                assert p.replace("_rate.fits", "_rateints.fits") in visible
        assert kills < 30, "the feeder never finished"
    feed.join()
    assert kills >= 5
    daemon = Daemon(inbox, outbox, env, "--workers", "2")
    wait_for(lambda: "workers ready" in daemon.text(), 60, "the last restart", daemon)
    wait_for(lambda: done_names(state) >= set(names), 180, "all files done after restarts", daemon)
    assert daemon.stop() == 0
    rows = journal_rows(state)
    assert not [r for r in rows if r["state"] != "done"], [r for r in rows if r["state"] != "done"]
    assert_journal_consistent(state, names)
    assert_clean_outbox(outbox, names, reference, check=names[::3])
    runs = journal_runs(state)
    assert any(r["outcome"] == "interrupted" for r in runs) or kills >= 5
    # workers of killed daemons do not linger
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in runs if r["worker"]}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------
# bad inputs end in quarantine; the good ones keep flowing
# ------------------------------------------------------------------------------------------

def _edit_header(src: Path, dest: Path, **cards) -> None:
    shutil.copyfile(src, dest)
    with fits.open(dest, mode="update") as hdul:
        for key, value in cards.items():
            hdul[0].header[key] = value


def test_corrupt_inputs_are_quarantined(sim, env, reference, tmp_path):
    inbox, outbox, work = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "work"
    for d in (inbox, work):
        d.mkdir()
    data = sim.uncal.read_bytes()
    (work / "truncated_uncal.fits").write_bytes(data[: len(data) * 6 // 10])
    (work / "random_uncal.fits").write_bytes(os.urandom(60000))
    _edit_header(sim.uncal, work / "nircam_uncal.fits", INSTRUME="NIRCAM", DETECTOR="NRCA1")
    _edit_header(sim.uncal, work / "noref_uncal.fits", DETECTOR="MIRIFULONG")
    expect = {"truncated_uncal.fits": "truncated", "random_uncal.fits": "not a readable FITS",
              "nircam_uncal.fits": "NIRCAM", "noref_uncal.fits": "no reference"}
    good = [f"good{i}_uncal.fits" for i in range(4)]
    daemon = Daemon(inbox, outbox, env, "--workers", "2", "--retries", "1")
    state = outbox / ".streamdet"
    # watching: a rename seen by the observer is taken at once, whatever the file holds (a
    # truncated file found only by a scan waits for the stall time, as it may still grow)
    wait_for(lambda: "workers ready" in daemon.text(), 60, "daemon start", daemon)
    drop(sim.uncal, inbox / good[0])
    for name in expect:
        drop(work / name, inbox / name, "rename")
    for name in good[1:]:
        drop(sim.uncal, inbox / name)
    wait_for(lambda: done_names(state) >= set(good) and
             {r["name"] for r in journal_rows(state) if r["state"] == "quarantined"} >= set(expect),
             120, "good files done and bad files quarantined", daemon)
    # still serving after the bad ones
    drop(sim.uncal, inbox / "late_uncal.fits")
    wait_for(lambda: "late_uncal.fits" in done_names(state), 60, "a file after the bad ones", daemon)
    assert daemon.stop() == 0
    good.append("late_uncal.fits")
    rows = {r["name"]: r for r in journal_rows(state)}
    quarantine = state / "quarantine"
    for name, reason in expect.items():
        row = rows[name]
        assert row["state"] == "quarantined" and row["error_kind"] == "permanent", row
        assert reason in row["error"], row["error"]
        assert row["attempts"] == 1          # permanent errors are not retried
        assert not (inbox / name).exists()   # moved, not deleted
        assert (quarantine / name).read_bytes() == (work / name).read_bytes()
        report = json.loads((quarantine / f"{name}.error.json").read_text())
        assert report["file"] == name and reason in report["reason"]
        assert report["kind"] == "permanent" and report["input_moved"] is True
    assert_clean_outbox(outbox, good, reference, check=good[:1])
    assert_journal_consistent(state, good)
    log = daemon.text()
    for name in expect:
        assert f"failed     {name}: " in log and "-> quarantined" in log


# ------------------------------------------------------------------------------------------
# symlinks leaving the inbox and names with '..'
# ------------------------------------------------------------------------------------------

def test_symlinks_and_dotdot_never_write_outside(sim, env, reference, tmp_path):
    root = tmp_path / "root"
    inbox, outbox, outside = root / "inbox", root / "outbox", root / "outside"
    for d in (inbox, outside):
        d.mkdir(parents=True)
    secret = outside / "secret_uncal.fits"
    shutil.copyfile(sim.uncal, secret)
    (outside / "dir_uncal.fits").mkdir()
    (inbox / "escape_uncal.fits").symlink_to(Path("..") / "outside" / "secret_uncal.fits")
    (inbox / "absolute_uncal.fits").symlink_to(secret)
    (inbox / "dirlink_uncal.fits").symlink_to(outside / "dir_uncal.fits")
    (inbox / "chain_uncal.fits").symlink_to(inbox / "escape_uncal.fits")
    shutil.copyfile(sim.uncal, inbox / "x..y_uncal.fits")
    shutil.copyfile(sim.uncal, inbox / "good_uncal.fits")
    (inbox / "alias_uncal.fits").symlink_to("good_uncal.fits")    # stays inside: fine
    before_outside, before_inbox = tree(outside), tree(inbox)
    before_tmp = set(os.listdir(tmp_path))

    res = subprocess.run(streamdet_cmd() + ["watch", str(inbox), "--output", str(outbox),
                                            "--once", "--workers", "1", "--settle", SETTLE,
                                            "--archive", str(root / "archive")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    state = outbox / ".streamdet"
    rows = {r["name"]: r for r in journal_rows(state)}
    refused = ["escape_uncal.fits", "absolute_uncal.fits", "dirlink_uncal.fits",
               "chain_uncal.fits", "x..y_uncal.fits"]
    for name in refused:
        assert rows[name]["state"] == "quarantined", rows[name]
        assert rows[name]["error_kind"] == "security"
        assert rows[name]["sha256"] is None            # never read
        report = json.loads((state / "quarantine" / f"{name}.error.json").read_text())
        assert report["kind"] == "security" and report["input_moved"] is False
    assert "outside the inbox" in rows["escape_uncal.fits"]["error"]
    assert "'..'" in rows["x..y_uncal.fits"]["error"]
    # nothing outside OUTBOX and the state directory changed, but for the archived inputs
    assert tree(outside) == before_outside
    after_inbox = tree(inbox)
    assert set(before_inbox) - set(after_inbox) == {"good_uncal.fits", "alias_uncal.fits"}
    assert {k: v for k, v in before_inbox.items() if k in after_inbox} == after_inbox
    assert sorted(os.listdir(root / "archive")) == ["alias_uncal.fits", "good_uncal.fits"]
    assert (root / "archive" / "alias_uncal.fits").is_symlink()   # the link moved, not its target
    assert set(os.listdir(root)) == {"inbox", "outbox", "outside", "archive"}
    assert set(os.listdir(tmp_path)) == before_tmp
    assert_clean_outbox(outbox, ["good_uncal.fits", "alias_uncal.fits"], reference)
    assert "secret" not in " ".join(os.listdir(outbox))

    # a second run does not record the refused entries again
    res = subprocess.run(streamdet_cmd() + ["watch", str(inbox), "--output", str(outbox),
                                            "--once", "--workers", "1", "--settle", SETTLE],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(journal_rows(state)) == len(rows)


# ------------------------------------------------------------------------------------------
# SIGTERM and restarts
# ------------------------------------------------------------------------------------------

def test_sigterm_finishes_or_abandons_then_restart_completes(sim, env, reference, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    names = [f"t{i}_uncal.fits" for i in range(8)]
    for name in names:
        drop(sim.uncal, inbox / name)
    # a first SIGTERM while files run: exit 0, no file left running
    daemon = Daemon(inbox, outbox, env, "--workers", "2")
    wait_for(lambda: any(r["state"] == "running" for r in journal_rows(state)), 60,
             "a running file", daemon, step=0.05)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.text()[-3000:]
    assert "SIGTERM: taking no new files" in daemon.text()
    rows = journal_rows(state)
    assert not [r for r in rows if r["state"] == "running"]
    assert not [r for r in journal_runs(state) if r["outcome"] is None]
    assert 0 < len(done_names(state)) < len(names)   # it stopped taking files

    # a grace of 0: running files are abandoned cleanly, and redone at restart. The pool's
    # workers are paused (SIGSTOP) so that the running files cannot finish before the signal.
    psutil = pytest.importorskip("psutil")
    daemon = Daemon(inbox, outbox, env, "--workers", "2", "--grace", "0")
    with paused_workers(psutil, daemon):
        wait_for(lambda: any(r["state"] == "running" for r in journal_rows(state)), 60,
                 "a running file", daemon)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.text()[-3000:]
    assert not [r for r in journal_rows(state) if r["state"] == "running"]
    assert "abandoned" in {r["outcome"] for r in journal_runs(state)}

    # a second signal exits at once; the interrupted runs are redone at restart
    more = [f"u{i}_uncal.fits" for i in range(2)]
    daemon = Daemon(inbox, outbox, env, "--workers", "2")
    with paused_workers(psutil, daemon):
        for name in more:
            drop(sim.uncal, inbox / name)
        wait_for(lambda: sum(r["state"] == "running" for r in journal_rows(state)) == 2, 60,
                 "two running files", daemon)
        daemon.signal(signal.SIGINT)
        wait_for(lambda: "SIGINT: taking no new files" in daemon.text(), 30, "first signal", daemon)
        daemon.signal(signal.SIGINT)
        assert daemon.wait(30) == 128 + signal.SIGINT
        assert "second signal (SIGINT): exiting at once" in daemon.text()
    names += more

    res = subprocess.run(streamdet_cmd() + ["watch", str(inbox), "--output", str(outbox),
                                            "--once", "--workers", "2", "--settle", SETTLE],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert_journal_consistent(state, names)
    assert_clean_outbox(outbox, names, reference, check=names[:2])
    outcomes = {r["outcome"] for r in journal_runs(state)}
    assert {"abandoned", "interrupted"} <= outcomes


@contextlib.contextmanager
def paused_workers(psutil, daemon):
    """The daemon's pool workers, stopped (SIGSTOP) so that the files they take cannot
    finish; by the end of the block the daemon must have ended them (any left are killed
    either way)."""
    wait_for(lambda: "workers ready" in daemon.text(), 60, "workers ready", daemon)
    workers = _pool_workers(psutil, daemon.pid)
    for p in workers:
        p.suspend()
    try:
        yield workers
        psutil.wait_procs(workers, timeout=10)
        assert not [p for p in workers if p.is_running() and p.status() != "zombie"]
    finally:
        for p in workers:
            if p.is_running():
                p.kill()


def _pool_workers(psutil, daemon_pid: int) -> list:
    """The local pool's worker processes: the children of the daemon's forkserver."""
    procs = psutil.Process(daemon_pid).children(recursive=True)
    server = [p for p in procs if "forkserver" in " ".join(p.cmdline())]
    workers = [p for p in procs if server and p.ppid() == server[0].pid]
    assert workers, [p.cmdline() for p in procs]
    return workers


def test_redelivery_changes_archive_and_status(sim, env, reference, tmp_path):
    inbox, outbox, archive = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "archive"
    inbox.mkdir()
    state = tmp_path / "state"
    common = ["--output", str(outbox), "--once", "--workers", "1", "--settle", SETTLE,
              "--state-dir", str(state), "--archive", str(archive)]

    def once(*extra):
        t0 = time.monotonic()
        res = subprocess.run(streamdet_cmd() + ["watch", str(inbox), *common, *extra],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        print("once", extra, round(time.monotonic() - t0, 2))
        return res.stderr

    names = ["a_uncal.fits", "b_uncal.fits", "c_uncal.fits"]
    for name in names:
        drop(sim.uncal, inbox / name)
    once()
    assert sorted(os.listdir(archive)) == names and not os.listdir(inbox)
    assert not (outbox / ".streamdet").exists()       # --state-dir used instead
    runs_before = len(journal_runs(state))

    # nothing new: nothing redone
    once()
    assert len(journal_runs(state)) == runs_before

    # the same content delivered again under the same name, with a new mtime (a plain
    # cp): recognised as done, and archived like the first delivery
    shutil.copy(archive / "a_uncal.fits", inbox / "a_uncal.fits")
    first = os.stat(archive / "a_uncal.fits").st_mtime_ns
    os.utime(inbox / "a_uncal.fits", ns=(first - 10**10, first - 10**10))
    log = once()
    assert "a_uncal.fits: already done (same content" in log
    assert len(journal_runs(state)) == runs_before
    assert (archive / "a_uncal.fits.1").exists() and not (inbox / "a_uncal.fits").exists()

    # a changed file with the same name: ignored with --on-change ignore ...
    _edit_header(sim.uncal, inbox / "b_uncal.fits", TARGPROP="CHANGED")
    log = once("--on-change", "ignore")
    assert "b_uncal.fits: content changed after it was processed; ignored" in log
    b_rows = [r for r in journal_rows(state) if r["name"] == "b_uncal.fits"]
    assert [r["state"] for r in b_rows] == ["done", "ignored"]
    assert_same_product(outbox / "b_rate.fits", reference["rate"])
    assert (inbox / "b_uncal.fits").exists()            # ignored inputs stay

    # ... and processed again with --on-change reprocess (another change)
    _edit_header(sim.uncal, inbox / "b_uncal.fits", TARGPROP="CHANGED2")
    log = once("--on-change", "reprocess")
    assert "changed content, reprocessing" in log
    b_rows = [r for r in journal_rows(state) if r["name"] == "b_uncal.fits"]
    assert [r["state"] for r in b_rows] == ["done", "ignored", "done"]
    assert fits.getval(outbox / "b_rate.fits", "TARGPROP") == "CHANGED2"
    assert products_of(outbox) == expected_products(names)

    # status: counts, throughput, last errors, waiting
    (inbox / "junk_uncal.fits").write_bytes(b"not fits" * 500)
    once("--retries", "0")
    drop(sim.uncal, inbox / "waiting_uncal.fits")
    res = subprocess.run(streamdet_cmd() + ["status", str(outbox), "--state-dir", str(state)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "done" in text and "quarantined" in text and "files/min" in text
    assert "junk_uncal.fits" in text and "not a readable FITS" in text
    assert "1 in the inbox not taken yet" in text
    assert "daemon not running" in text
    res = subprocess.run(streamdet_cmd() + ["status", str(outbox), "--state-dir", str(state),
                                            "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    info = json.loads(res.stdout)
    assert info["counts"]["done"] == 4 and info["counts"]["quarantined"] == 1
    assert info["counts"]["ignored"] == 1 and info["waiting"]["inbox_untaken"] == 1
    assert info["done_last_hour"] == 4 and info["problems"] == []
    res = subprocess.run(streamdet_cmd() + ["status", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no journal" in res.stderr


def test_json_log_and_poll_mode(sim, env, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    daemon = Daemon(inbox, outbox, env, "--workers", "1", "--poll", "--log-format", "json",
                    "--pattern", "*_uncal.fits")
    wait_for(lambda: (state / "journal.sqlite").exists(), 60, "daemon start", daemon)
    drop(sim.uncal, inbox / "p1_uncal.fits", "slow", 0.3)
    (inbox / "bad_uncal.fits").write_bytes(b"x" * 100)
    drop(sim.uncal, inbox / "ignored.fits")             # not the pattern
    wait_for(lambda: "p1_uncal.fits" in done_names(state) and any(
        r["state"] == "quarantined" for r in journal_rows(state)), 60, "poll mode", daemon)
    assert daemon.stop() == 0
    events = [json.loads(line) for line in daemon.text().splitlines() if line.strip()]
    kinds = {e["event"] for e in events}
    assert {"start", "taken", "started", "done", "failed", "stopped"} <= kinds
    done = [e for e in events if e["event"] == "done"]
    assert done[0]["file"] == "p1_uncal.fits" and done[0]["seconds"] > 0
    assert "ignored.fits" not in {r["name"] for r in journal_rows(state)}


# ------------------------------------------------------------------------------------------
# transient failures: retried, then quarantined (in-process, with a scripted executor)
# ------------------------------------------------------------------------------------------

class ScriptedExecutor:
    """An executor whose workers fail transiently a scripted number of times per file."""

    name = "scripted"

    def __init__(self, failures: dict[str, int]):
        import queue

        self.failures = dict(failures)
        self.completions = queue.SimpleQueue()
        self.calls: list[str] = []

    def describe(self):
        return "scripted"

    def start(self):
        pass

    def capacity(self):
        return 2

    def submit(self, job):
        from streamdet.daemon.jobs import JobDone, JobFailed

        name = Path(job.path).name
        self.calls.append(name)
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            result = JobFailed(kind="transient", error="OSError: disk hiccup")
        else:
            staging = Path(job.staging)
            staging.mkdir(parents=True)
            base = name[: -len("_uncal.fits")]
            products = {}
            for kind in ("rate", "rateints"):
                p = staging / f"{base}_{kind}.fits"
                p.write_bytes(b"product")
                products[kind] = str(p)
            result = JobDone(products=products, seconds=0.01, worker="scripted")
        self.completions.put((job.id, result))

    def outcome(self, job_id, handle):
        return handle

    def kill_workers(self):
        pass

    def shutdown(self, abandon):
        pass


def test_transient_failures_are_retried_then_quarantined(tmp_path, sim):
    from streamdet.daemon.daemon import Daemon as InProcess, WatchOptions
    from streamdet.daemon.log import EventLog

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    for name in ("flaky_uncal.fits", "broken_uncal.fits", "fine_uncal.fits"):
        shutil.copyfile(sim.uncal, inbox / name)
    executor = ScriptedExecutor({"flaky_uncal.fits": 2, "broken_uncal.fits": 99})
    logfile = tmp_path / "log.txt"
    with open(logfile, "w") as stream:
        opts = WatchOptions(inbox=inbox, outbox=outbox, once=True, settle=0.2, retries=2,
                            retry_delay=0.05)
        assert InProcess(opts, executor=executor, log=EventLog("text", stream),
                         capture_logging=False).run() == 0
    state = outbox / ".streamdet"
    rows = {r["name"]: r for r in journal_rows(state)}
    assert rows["fine_uncal.fits"]["state"] == "done" and rows["fine_uncal.fits"]["attempts"] == 1
    assert rows["flaky_uncal.fits"]["state"] == "done" and rows["flaky_uncal.fits"]["attempts"] == 3
    broken = rows["broken_uncal.fits"]
    assert broken["state"] == "quarantined" and broken["error_kind"] == "transient"
    assert broken["attempts"] == 3 and "gave up after 3 transient failures" in broken["error"]
    report = json.loads((state / "quarantine" / "broken_uncal.fits.error.json").read_text())
    assert [r["outcome"] for r in report["runs"]] == ["failed"] * 3
    assert (state / "quarantine" / "broken_uncal.fits").exists()
    assert executor.calls.count("broken_uncal.fits") == 3
    assert "retry in" in logfile.read_text()


# ------------------------------------------------------------------------------------------
# workers that die; bad arguments
# ------------------------------------------------------------------------------------------

def test_dead_pool_workers_are_replaced(sim, env, tmp_path):
    psutil = pytest.importorskip("psutil")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    state = outbox / ".streamdet"
    daemon = Daemon(inbox, outbox, env, "--workers", "1")
    wait_for(lambda: "workers ready" in daemon.text(), 60, "workers ready", daemon)
    drop(sim.uncal, inbox / "first_uncal.fits")
    wait_for(lambda: "first_uncal.fits" in done_names(state), 60, "first file", daemon)
    workers = _pool_workers(psutil, daemon.pid)
    for p in workers:        # the pool's own worker, found by pid
        p.kill()
    psutil.wait_procs(workers, timeout=10)
    time.sleep(0.5)
    drop(sim.uncal, inbox / "second_uncal.fits")
    wait_for(lambda: "second_uncal.fits" in done_names(state), 90, "a file after the pool broke",
             daemon)
    assert daemon.stop() == 0
    assert_journal_consistent(state, ["first_uncal.fits", "second_uncal.fits"], exactly_once=True)


def test_bad_arguments_exit_2(sim, env, tmp_path):
    cmd = streamdet_cmd() + ["watch"]
    res = subprocess.run(cmd + [str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a directory" in res.stderr
    (tmp_path / "inbox").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text("[steps.nosuchstep]\nx = 1\n")
    res = subprocess.run(cmd + [str(tmp_path / "inbox"), "--output", str(tmp_path / "o"),
                                "--config", str(bad)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "nosuchstep" in res.stderr
    res = subprocess.run(cmd + [str(tmp_path / "inbox"), "--output", str(tmp_path / "o"),
                                "--on-change", "sometimes"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    # one daemon per state directory
    first = Daemon(tmp_path / "inbox", tmp_path / "o", env, "--workers", "1")
    try:
        wait_for(lambda: (tmp_path / "o" / ".streamdet" / "journal.sqlite").exists(), 60,
                 "first daemon", first)
        res = subprocess.run(cmd + [str(tmp_path / "inbox"), "--output", str(tmp_path / "o"),
                                    "--once"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and f"pid {first.pid}" in res.stderr, res.stderr
    finally:
        first.kill()
