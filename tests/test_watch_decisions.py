"""The daemon's pure decisions, branch by branch, on real values: when a file is complete
(``watcher.completeness``, on the structure of real FITS files), the intake decision
(``streamdet.daemon.intake``: real files' stat and SHA-256, rows of a real journal driven
through its states) and the retry policy after a failed run (``streamdet.daemon.failures``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest

from streamdet.daemon import watcher as w
from streamdet.daemon.failures import GiveUp, Retake, Retry, RetryPolicy, Vanished
from streamdet.daemon.intake import (AlreadyDone, FileVersion, Gone, IgnoreChange, Intake,
                                     IntakeFacts, Look, NotAFile, Opened, Refuse, Requeue,
                                     Running, SameContent, Settled, Take, Unreadable, Wait)
from streamdet.daemon.journal import Journal
from streamdet.daemon.jobs import JobDone, JobFailed

NAME = "jw01234001001_01101_00001_mirimage_uncal.fits"


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "state")
    yield j
    j.close()


@pytest.fixture
def inbox(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    return d


def deliver(inbox, content: bytes, name: str = NAME):
    """Write a file into the inbox; its stat and hash, as the daemon would see them."""
    path = inbox / name
    path.write_bytes(content)
    st = os.lstat(path)
    return FileVersion.of(st), hashlib.sha256(content).hexdigest()


def opened_facts(inbox, name: str = NAME, **kw) -> IntakeFacts:
    """The facts of a safe regular file, opened the daemon's way."""
    fd, st = w.open_entry(inbox, name)
    os.close(fd)
    lst = os.lstat(inbox / name)
    return IntakeFacts(name, entry=FileVersion.of(lst), unsafe=w.check_safe(inbox, name),
                       opened=Opened("file", version=FileVersion.of(st)), **kw)


def row_in(journal, version: FileVersion, sha: str, state: str, name: str = NAME,
           moved_to: str | None = None):
    """A journal row for ``version`` brought to ``state`` through the journal's own API."""
    fid = journal.add(name=name, path=f"/inbox/{name}", size=version.size,
                      mtime_ns=version.mtime_ns, sha256=sha,
                      state="ignored" if state == "ignored" else "seen")
    if state in ("running", "done", "failed", "quarantined"):
        run_id, _ = journal.start(fid)
        if state == "done":
            journal.done(fid, run_id, products={"rate": "/out/x_rate.fits"}, seconds=1.0,
                         timings=None, worker="w", moved_to=moved_to)
        elif state == "failed":
            journal.fail(fid, run_id, error="OSError", kind="transient", quarantine=False,
                         counted=True, retry_at=0.0)
        elif state == "quarantined":
            journal.fail(fid, run_id, error="truncated", kind="permanent", quarantine=True,
                         counted=False, moved_to=moved_to)
    elif state == "vanished":
        journal.set_state(fid, "vanished", error="gone", error_kind="vanished")
    row = journal.latest(name)
    assert row.state == state
    return row


# ------------------------------------------------------------------------------------------
# is it complete?
# ------------------------------------------------------------------------------------------

def test_completeness_rules(tmp_path):
    import numpy as np
    from astropy.io import fits

    whole = tmp_path / "whole_uncal.fits"
    fits.HDUList([fits.PrimaryHDU(),
                  fits.ImageHDU(np.zeros((2, 3, 8, 8), ">u2"), name="SCI"),
                  fits.BinTableHDU.from_columns([fits.Column("int_start_MJD_UTC", "D",
                                                             array=[1.0, 2.0])],
                                                name="INT_TIMES")]).writeto(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut_uncal.fits"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk_uncal.fits"
    junk.write_bytes(b"not FITS at all" * 400)
    found = {p.name: w.structure(p) for p in (whole, cut, junk)}
    assert found == {"whole_uncal.fits": "whole", "cut_uncal.fits": "partial",
                     "junk_uncal.fits": "foreign"}
    rules = dict(settle=2.0, stall=60.0)
    # renamed into the inbox, or not a regular file (a symlink: checked by the intake)
    assert w.completeness(regular=True, renamed=True, quiet=0.0, **rules) == "complete"
    assert w.completeness(regular=False, renamed=False, quiet=0.0, **rules) == "complete"
    # not quiet long enough
    assert w.completeness(regular=True, renamed=False, quiet=1.9, **rules) == "wait"
    # quiet: its structure decides, read only now
    quiet = dict(regular=True, renamed=False, quiet=2.0, **rules)
    assert w.completeness(**quiet) == "look"
    assert w.completeness(**quiet, structure=found["whole_uncal.fits"]) == "complete"
    assert w.completeness(**quiet, structure=found["junk_uncal.fits"]) == "complete"
    assert w.completeness(**quiet, structure=found["cut_uncal.fits"]) == "wait"
    # stalled: taken whatever it holds, without reading it
    assert w.completeness(regular=True, renamed=False, quiet=60.0, **rules) == "complete"


# ------------------------------------------------------------------------------------------
# the intake decision
# ------------------------------------------------------------------------------------------

def test_gone_entry_is_forgotten():
    decision = Intake().decide(IntakeFacts(NAME, entry=None))
    assert decision == Gone()
    assert not decision.keep_watching and not decision.remember


def test_unsafe_entry_is_refused_once_per_version(inbox, journal):
    outside = inbox.parent / "secret_uncal.fits"
    outside.write_bytes(b"not yours")
    os.symlink(outside, inbox / NAME)
    lst = FileVersion.of(os.lstat(inbox / NAME))
    unsafe = w.check_safe(inbox, NAME)
    assert unsafe and "points outside the inbox" in unsafe
    facts = IntakeFacts(NAME, entry=lst, unsafe=unsafe)
    assert Intake().decide(facts) == Refuse(unsafe, "security", recorded=False)
    # the daemon recorded it (as _record_refused does): the same version is not recorded again
    journal.add(name=NAME, path=str(inbox / NAME), size=lst.size, mtime_ns=lst.mtime_ns,
                sha256=None, state="quarantined", error=unsafe, error_kind="security")
    again = replace(facts, latest=journal.latest(NAME))
    decision = Intake().decide(again)
    assert decision == Refuse(unsafe, "security", recorded=True) and decision.remember
    # a new version of the link (another size) is recorded again
    moved = replace(again, entry=replace(lst, size=lst.size + 1))
    assert Intake().decide(moved) == Refuse(unsafe, "security", recorded=False)


def test_names_the_daemon_cannot_handle_are_refused(inbox):
    long_name = "x" * 234 + "_uncal.fits"      # 245 bytes: the filesystem takes it
    version, _ = deliver(inbox, b"data", long_name)
    decision = Intake(name_max=255).decide(IntakeFacts(long_name, entry=version))
    assert isinstance(decision, Refuse) and decision.kind == "name"
    assert "too long" in decision.reason and not decision.recorded
    # the same name fits where names may be longer: the entry is opened
    assert Intake(name_max=1024).decide(IntakeFacts(long_name, entry=version)) == Look("open")
    bad = os.fsdecode(b"bad\xff_uncal.fits")
    decision = Intake().decide(IntakeFacts(bad, entry=version))
    assert decision.kind == "name" and "not valid UTF-8" in decision.reason


def test_a_safe_entry_is_opened_before_anything_else(inbox):
    version, _ = deliver(inbox, b"data")
    facts = IntakeFacts(NAME, entry=version, unsafe=w.check_safe(inbox, NAME))
    assert facts.unsafe is None
    assert Intake().decide(facts) == Look("open")


def test_what_the_open_found(inbox, journal):
    version, _ = deliver(inbox, b"data")
    facts = IntakeFacts(NAME, entry=version)
    # a symlink swapped in between the look and the open
    refused = Opened("refused", reason="symlink leaves the inbox", kind="security")
    assert Intake().decide(replace(facts, opened=refused)) == \
        Refuse("symlink leaves the inbox", "security", recorded=False)
    assert Intake().decide(replace(facts, opened=Opened("not_file"))) == NotAFile()
    denied = replace(facts, opened=Opened("denied"))
    assert Intake().decide(denied) == Unreadable(recorded=False)
    journal.add(name=NAME, path=str(inbox / NAME), size=version.size,
                mtime_ns=version.mtime_ns, sha256=None, state="quarantined",
                error="cannot read", error_kind="unreadable")
    assert Intake().decide(replace(denied, latest=journal.latest(NAME))) == \
        Unreadable(recorded=True)


def test_a_running_row_is_left_to_its_run(inbox, journal):
    version, sha = deliver(inbox, b"data")
    row = row_in(journal, version, sha, "running")
    decision = Intake().decide(opened_facts(inbox, latest=row))
    assert decision == Running(row.id) and not decision.remember


@pytest.mark.parametrize("state", ["seen", "failed"])
def test_a_pending_row_already_hashed_is_queued_without_hashing(inbox, journal, state):
    version, sha = deliver(inbox, b"data")
    row = row_in(journal, version, sha, state)
    facts = opened_facts(inbox, latest=row, hashed=version)
    assert Intake().decide(facts) == Requeue(row.id, identity_changed=False, enqueue=True)
    assert Intake().decide(replace(facts, scheduled=True)) == \
        Requeue(row.id, identity_changed=False, enqueue=False)


def test_a_pending_row_is_hashed_again_when_its_file_changed(inbox, journal):
    old, old_sha = deliver(inbox, b"first content")
    row = row_in(journal, old, old_sha, "seen")
    new, new_sha = deliver(inbox, b"second, longer content")
    facts = opened_facts(inbox, latest=row, hashed=old)
    assert Intake().decide(facts) == Look("hash")
    assert Intake().decide(replace(facts, hash_unstable=True)) == Wait()
    assert Intake().decide(replace(facts, sha256=new_sha)) == \
        Requeue(row.id, identity_changed=True, enqueue=True)
    # not hashed in this run (a restart), same file: the row stays as it is
    same = opened_facts(inbox, latest=row_in(journal, new, new_sha, "seen"), hashed=None)
    assert Intake().decide(same) == Look("hash")
    assert Intake().decide(replace(same, sha256=new_sha)).identity_changed is False


def test_the_very_file_already_settled_is_not_hashed(inbox, journal):
    version, sha = deliver(inbox, b"data")
    for state in ("done", "ignored", "quarantined", "vanished"):
        row = row_in(journal, version, sha, state)
        assert Intake().decide(opened_facts(inbox, latest=row)) == Settled(row.id)
    # moved away (archived): the same name in the inbox again is a new delivery
    archived = row_in(journal, version, sha, "done", moved_to="/archive/x")
    assert Intake().decide(opened_facts(inbox, latest=archived)) == Look("hash")


def test_same_content_as_a_done_file_is_not_redone(inbox, journal):
    old, sha = deliver(inbox, b"data")
    row = row_in(journal, old, sha, "done", moved_to="/archive/x")
    facts = opened_facts(inbox, latest=row, sha256=sha)
    assert Intake().decide(facts) == AlreadyDone(row.id, archive=False)
    assert Intake(archive=True).decide(facts) == AlreadyDone(row.id, archive=True)
    # copied again (a new mtime), not archived
    os.utime(inbox / NAME, ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    row = row_in(journal, old, sha, "done")
    assert Intake().decide(opened_facts(inbox, latest=row, sha256=sha)) == \
        AlreadyDone(row.id, archive=False)


def test_same_content_as_an_ignored_or_quarantined_file(inbox, journal):
    old, sha = deliver(inbox, b"data")
    os.utime(inbox / NAME, ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    for state in ("ignored", "quarantined"):
        row = row_in(journal, old, sha, state)
        assert Intake().decide(opened_facts(inbox, latest=row, sha256=sha)) == \
            SameContent(row.id)
    # quarantined and moved aside, or vanished: delivered afresh, tried again
    for row in (row_in(journal, old, sha, "quarantined", moved_to="/state/quarantine/x"),
                row_in(journal, old, sha, "vanished")):
        assert Intake().decide(opened_facts(inbox, latest=row, sha256=sha)) == \
            Take(changed=False)


@pytest.mark.parametrize("state", ["done", "ignored"])
def test_new_content_under_a_processed_name(inbox, journal, state):
    old, old_sha = deliver(inbox, b"first content")
    row = row_in(journal, old, old_sha, state)
    _, new_sha = deliver(inbox, b"second, longer content")
    facts = opened_facts(inbox, latest=row, sha256=new_sha)
    assert Intake(on_change="reprocess").decide(facts) == Take(changed=True)
    assert Intake(on_change="ignore").decide(facts) == IgnoreChange()


def test_a_new_name_is_hashed_then_taken(inbox):
    deliver(inbox, b"data")
    facts = opened_facts(inbox)
    assert Intake().decide(facts) == Look("hash")
    wait = Intake().decide(replace(facts, hash_unstable=True))
    assert wait == Wait() and wait.keep_watching and not wait.remember
    taken = Intake(on_change="ignore").decide(
        replace(facts, sha256=hashlib.sha256(b"data").hexdigest()))
    assert taken == Take(changed=False) and taken.remember and not taken.keep_watching


def test_job_results_survive_pickling():
    """Results cross a process boundary (a local pool, a Dask cluster)."""
    import pickle

    done = JobDone(products={"rate": "/s/x_rate.fits"}, seconds=1.5, worker="h:1",
                   timings={"jump": 0.5}, warnings=("quicklook: failed",))
    failed = JobFailed(kind="permanent", error="truncated", worker="h:1", seconds=0.1)
    assert pickle.loads(pickle.dumps(done)) == done
    assert pickle.loads(pickle.dumps(failed)) == failed


# ------------------------------------------------------------------------------------------
# after a failed run
# ------------------------------------------------------------------------------------------

def test_transient_failures_are_retried_with_doubling_delays_then_given_up():
    policy = RetryPolicy(retries=2, retry_delay=2.0)
    failed = JobFailed(kind="transient", error="OSError: disk hiccup", worker="h:1")
    assert policy.after(failed, failures=0) == Retry(delay=2.0, error="OSError: disk hiccup")
    assert policy.after(failed, failures=1) == Retry(delay=4.0, error="OSError: disk hiccup")
    assert policy.after(failed, failures=2) == GiveUp(
        error="OSError: disk hiccup (gave up after 3 transient failures)", counted=True,
        move_input=True)
    # no retries at all; the delay is capped
    assert isinstance(RetryPolicy(retries=0).after(failed, failures=0), GiveUp)
    assert RetryPolicy(retries=20, retry_delay=2.0).after(failed, failures=10).delay == 300.0
    assert RetryPolicy(retries=2).after(JobFailed(kind="transient", error=""), 0).error == \
        "unknown error"


def test_permanent_and_refused_failures_are_final_at_once():
    policy = RetryPolicy(retries=5)
    bad = JobFailed(kind="permanent", error="x_uncal.fits: is truncated")
    assert policy.after(bad, failures=0) == GiveUp(error="x_uncal.fits: is truncated",
                                                   counted=False, move_input=True)
    # a symlink swapped in after the daemon's look: refused, and left where it is
    unsafe = JobFailed(kind="security", error="symlink points outside the inbox")
    assert policy.after(unsafe, failures=1) == GiveUp(
        error="symlink points outside the inbox", counted=False, move_input=False)


def test_an_input_replaced_or_gone_before_the_worker_opened_it():
    policy = RetryPolicy(retries=0)
    assert policy.after(JobFailed(kind="changed", error="replaced"), failures=3) == Retake()
    assert policy.after(JobFailed(kind="vanished", error="gone"), failures=0) == Vanished()
