"""No harm, whatever arrives (issue 11, the ``streamdet process`` side).

streamdet removes only what it wrote itself, refuses nonsense header values, unreadable
file types and impossible names in one line with exit code 2 before any work, finds an
unusable output directory first, and leaves no scratch behind however it is stopped.

Most runs go through the typer application in this process (fast); the ones that need a
real exit path (signals, a hang) run the command in a subprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from streamdet.cli import app
from streamdet.core.products import fits_safe
from streamdet.core import engine
from streamdet.core.errors import shown
from streamdet.simulate import simulate
from streamdet.testing import crds_environment

TIMEOUT = 120


# -- helpers --------------------------------------------------------------------------------

class Outcome:
    def __init__(self, code: int, stdout: str, stderr: str, exception, warned: list):
        self.code, self.stdout, self.stderr = code, stdout, stderr
        self.exception, self.warned = exception, warned

    @property
    def lines(self) -> list[str]:
        """stderr as a terminal would show it (a Python warning is two lines)."""
        return self.stderr.splitlines() + ["<warning>"] * (2 * len(self.warned))


def invoke(*args) -> Outcome:
    """``streamdet process ARGS`` in this process, as the command line runs it."""
    runner = CliRunner()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["process", *map(str, args)])
    crashed = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr, crashed,
                   [w for w in warned if not issubclass(w.category, DeprecationWarning)])


def run_cli(args, env, cwd, prefix=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    cmd = prefix or [sys.executable, "-m", "streamdet.cli"]
    return subprocess.run([*cmd, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def tree(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory`` with what must not change about it."""
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(directory))] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


def names(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def assert_refused(o: Outcome, *fragments: str) -> str:
    """Exit 2, exactly one ``streamdet: error:`` line containing ``fragments``, no crash."""
    assert o.exception is None, repr(o.exception)
    assert o.code == 2, (o.code, o.stderr)
    assert "Traceback" not in o.stderr + o.stdout
    assert len(o.lines) == 1, o.lines
    line = o.lines[0]
    assert line.startswith("streamdet: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def edited(src: Path, dst: Path, edit) -> Path:
    with fits.open(src) as hdul:
        copy = fits.HDUList([hdu.copy() for hdu in hdul])
    edit(copy)
    copy.writeto(dst)
    return dst


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A tiny exposure (SUB64, 5 groups, 2 integrations): ~0.3 s a run."""
    return simulate(tmp_path_factory.mktemp("sim"), ngroups=5, nints=2, seed=11)


@pytest.fixture()
def crds(sim):
    with crds_environment(sim):
        yield sim


@pytest.fixture()
def scratch(tmp_path, monkeypatch) -> Path:
    """This test's TMPDIR, for the scratch files of in-process runs."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture(scope="module")
def cli_env(sim):
    out = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    out.update(sim.env)
    return out


# -- 1. a failed run removes only what it wrote ---------------------------------------------

def test_failed_run_leaves_the_input_and_other_runs_products(crds, tmp_path, monkeypatch, scratch):
    """The input sits among products (no ``-o``); while the run is under way the input is
    still being written to and another run finishes its products under the same base
    name; then this run fails. Everything that was not written by this run stays."""
    work = tmp_path / "work"
    work.mkdir()
    uncal = work / crds.uncal.name
    uncal.write_bytes(crds.uncal.read_bytes())
    base = uncal.name.replace("_uncal.fits", "")
    junk = work / "junk_dark.fits"
    junk.write_bytes(b"SIMPLE  = nonsense" * 10)
    real_resolve = engine.refmod.resolve

    def meanwhile(*args, **kwargs):
        # what other processes do while this run is under way
        os.utime(uncal, ns=(1, 10**18))
        (work / f"{base}_rate.fits").write_bytes(b"another run's rate")
        (work / f"{base}_rateints.fits").write_bytes(b"another run's rateints")
        return real_resolve(*args, **kwargs)   # then fails: the dark is not FITS

    monkeypatch.setattr(engine.refmod, "resolve", meanwhile)
    o = invoke(uncal, "--override", f"dark={junk}")
    assert_refused(o, uncal.name, junk.name)
    assert names(work) == sorted([uncal.name, junk.name, f"{base}_rate.fits",
                                  f"{base}_rateints.fits"])
    assert uncal.read_bytes() == crds.uncal.read_bytes()
    assert (work / f"{base}_rate.fits").read_bytes() == b"another run's rate"
    assert names(scratch) == []


def test_withdraw_removes_only_the_files_still_its_own(tmp_path):
    mine, replaced = tmp_path / "x_rate.fits", tmp_path / "x_rateints.fits"
    mine.write_bytes(b"mine")
    replaced.write_bytes(b"mine too")
    placed = [(p, p.stat().st_dev, p.stat().st_ino) for p in (mine, replaced)]
    other = tmp_path / "other"
    other.write_bytes(b"someone else's, renamed over mine")
    os.replace(other, replaced)
    engine.withdraw(placed)
    assert names(tmp_path) == ["x_rateints.fits"]
    assert replaced.read_bytes() == b"someone else's, renamed over mine"


# -- 5. header values -------------------------------------------------------------------------

HEADER_CASES = {
    # keyword: (value, words the error line must hold)
    "TGROUP=0": ("TGROUP", 0.0, "TGROUP=0.0"),
    "TGROUP<0": ("TGROUP", -2.775, "TGROUP=-2.775"),
    "TFRAME=0": ("TFRAME", 0.0, "TFRAME=0.0"),
    "NFRAMES=0": ("NFRAMES", 0, "NFRAMES=0"),
    "NFRAMES huge": ("NFRAMES", 10**9, "NFRAMES=1000000000"),
    "FRMDIVSR=0": ("FRMDIVSR", 0, "FRMDIVSR=0"),
    "GROUPGAP<0": ("GROUPGAP", -1, "GROUPGAP=-1"),
    "DRPFRMS1<0": ("DRPFRMS1", -4, "DRPFRMS1=-4"),
    "INTSTART=0": ("INTSTART", 0, "INTSTART=0"),
    "SUBSTRT1 off the detector": ("SUBSTRT1", 1000, "SUBSTRT1=1000"),
    "SUBSTRT2=0": ("SUBSTRT2", 0, "SUBSTRT2=0"),
    "TGROUP text": ("TGROUP", "fast", "TGROUP='fast'"),
    "READPATT number": ("READPATT", 7, "READPATT=7"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_nonsense_header_value_is_refused_in_one_line(crds, tmp_path, scratch, case):
    key, value, words = HEADER_CASES[case]

    def edit(h):
        h[0].header[key] = value
    bad = edited(crds.uncal, tmp_path / "bad_uncal.fits", edit)
    out = tmp_path / "out"
    o = invoke("-q", bad, "-o", out)
    assert_refused(o, bad.name, words)
    assert names(out) == [] and names(scratch) == []


def _card_at(raw: bytes, key: str, end: int) -> int:
    return next(i for i in range(0, end, 80) if raw[i:i + 8].rstrip() == key.encode())


def test_complex_bzero_is_refused_in_one_line(crds, tmp_path, scratch):
    raw = bytearray(crds.uncal.read_bytes())
    with fits.open(crds.uncal) as hdul:
        sci = hdul["SCI"].fileinfo()
    at = _card_at(raw, "BZERO", sci["datLoc"])
    raw[at:at + 80] = f"{'BZERO':<8}= {'(1, 2)':>20}".ljust(80).encode()
    bad = tmp_path / "bzero_uncal.fits"
    bad.write_bytes(bytes(raw))
    o = invoke("-q", bad, "-o", tmp_path / "out")
    assert_refused(o, bad.name, "BZERO")
    assert names(tmp_path / "out") == []


def test_card_of_no_known_convention_is_one_warning_line(crds, tmp_path, scratch):
    """astropy warns in two lines each time such a card is copied (four for the two
    products); streamdet leaves it out and says so once."""
    raw = bytearray(crds.uncal.read_bytes())
    at = _card_at(raw, "OBSERVTN", 2880 * 3)
    raw[at + 2:at + 8] = b"\0" * 6
    odd = tmp_path / "odd_uncal.fits"
    odd.write_bytes(bytes(raw))
    out = tmp_path / "out"
    o = invoke(odd, "-o", out)
    assert o.code == 0, o.stderr
    said = [ln for ln in o.lines if "OB" in ln or "warning" in ln.lower()]   # (the rest: timings)
    assert len(said) == 1, o.lines
    assert said[0].startswith("streamdet: warning: ") and odd.name in said[0]
    assert "OB\\x00" in said[0]
    with fits.open(out / "odd_rate.fits") as hdul:
        assert "OBSERVTN" not in hdul[0].header and hdul[0].header["VISIT"] == fits.getval(crds.uncal, "VISIT")


# -- 6. names ---------------------------------------------------------------------------------

FORGED = "x\nstreamdet: error: forged\x1b[2K"


def assert_not_forged(o: Outcome) -> list[str]:
    printed = o.stdout.splitlines() + o.stderr.splitlines()
    assert not [ln for ln in printed if ln.startswith("streamdet: error: forged")], printed
    assert not [ln for ln in printed if "\x1b[2K" in ln], printed
    return printed


def test_newline_and_escape_in_a_directory_name_cannot_forge_lines(crds, tmp_path, scratch):
    out = tmp_path / FORGED
    o = invoke(crds.uncal, "-o", out)
    assert o.code == 0, o.stderr
    printed = assert_not_forged(o)
    rate = crds.uncal.name.replace("_uncal", "_rate")
    assert f"rate: {tmp_path}/{shown(FORGED)}/{rate}" in printed, printed


def test_newline_and_escape_in_a_bad_file_name_cannot_forge_lines(crds, tmp_path, scratch):
    bad = tmp_path / f"{FORGED}_uncal.fits"
    bad.write_bytes(crds.uncal.read_bytes()[:5000])
    o = invoke(bad, "-o", tmp_path / "out")
    assert_not_forged(o)
    assert_refused(o, shown(bad.name), "truncated")


def test_newline_and_escape_in_an_input_name_are_processed_and_shown_escaped(crds, tmp_path, scratch):
    uncal = tmp_path / f"{FORGED}_uncal.fits"
    uncal.write_bytes(crds.uncal.read_bytes())
    out = tmp_path / "out"
    o = invoke(uncal, "-o", out)
    assert o.code == 0, o.stderr
    printed = assert_not_forged(o)
    assert f"rate: {out}/{shown(FORGED)}_rate.fits" in printed, printed
    products = [name for name in os.listdir(out) if name.endswith(".fits")]  # (a quick-look
    assert sorted(products) == sorted([f"{FORGED}_rate.fits", f"{FORGED}_rateints.fits"])
    with fits.open(out / f"{FORGED}_rate.fits") as hdul:  # plugin may add a PNG)
        assert hdul[0].header["FILENAME"] == fits_safe(f"{FORGED}_rate.fits")


def test_name_that_is_not_utf8_is_shown_escaped(crds, tmp_path, scratch):
    name = os.fsdecode(b"caf\xe9_uncal.fits")   # Latin-1 bytes, as an old system writes them
    bad = tmp_path / name
    bad.write_bytes(crds.uncal.read_bytes()[:5000])
    o = invoke(bad, "-o", tmp_path / "out")
    assert_refused(o, "caf\\xe9_uncal.fits", "truncated")


def test_name_leaving_no_room_for_the_products_is_refused_up_front(crds, tmp_path, monkeypatch, scratch):
    long_name = "j" * (255 - len("_uncal.fits")) + "_uncal.fits"
    uncal = tmp_path / long_name
    uncal.write_bytes(crds.uncal.read_bytes())
    resolved = []
    monkeypatch.setattr(engine.refmod, "resolve",
                        lambda *a, **k: resolved.append(1) or pytest.fail("work was started"))
    out = tmp_path / "out"
    o = invoke(uncal, "-o", out)
    assert_refused(o, "name too long", "_rateints.fits", "255")
    assert resolved == []
    assert names(out) == []


# -- 7. file types ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fifo_or_device_is_refused_at_once(sim, cli_env, tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe_uncal.fits"
        os.mkfifo(path)
        words = "FIFO"
    else:
        path = Path("/dev/zero")
        words = "character device"
    try:
        result = run_cli(["process", path, "-o", tmp_path / "out"], cli_env, tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"streamdet process hung on a {kind}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and path.name in lines[0] and words in lines[0], lines
    assert "not a regular file" in lines[0]
    assert names(tmp_path / "out") == []


def test_gzip_data_is_called_gzip_compressed(crds, tmp_path, scratch):
    bad = tmp_path / "zipped_uncal.fits"
    bad.write_bytes(gzip.compress(crds.uncal.read_bytes()))
    o = invoke(bad, "-o", tmp_path / "out")
    line = assert_refused(o, bad.name, "gzip-compressed")
    assert "truncated" not in line


@pytest.fixture(scope="module")
def sim_rice(tmp_path_factory):
    """An exposure whose SCI compresses well (10 groups): the compressed table is much
    smaller than the image, as in real data."""
    sim = simulate(tmp_path_factory.mktemp("sim_rice"), ngroups=10, nints=2, seed=12)
    rice = sim.uncal.parent / "rice" / sim.uncal.name
    rice.parent.mkdir()
    with fits.open(sim.uncal) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)]
        for hdu in hdul[1:]:
            hdus.append(fits.CompImageHDU(data=hdu.data, header=hdu.header, name="SCI",
                                          compression_type="RICE_1")
                        if hdu.name == "SCI" else hdu.copy())
        fits.HDUList(hdus).writeto(rice)
    with fits.open(rice) as hdul:
        sci = hdul["SCI"]
        assert isinstance(sci, fits.CompImageHDU)
        assert sci.fileinfo()["datSpan"] < sci.data.nbytes  # really compressed
    return sim, rice


def test_rice_tile_compressed_exposure_gives_the_same_products(sim_rice, tmp_path, scratch):
    sim, rice = sim_rice
    with crds_environment(sim):
        plain = invoke("-q", sim.uncal, "-o", tmp_path / "plain")
        assert plain.code == 0, plain.stderr
        o = invoke("-q", rice, "-o", tmp_path / "rice", "--threads", "2")
    assert o.code == 0, o.stderr
    assert o.lines == []
    for kind in ("rate", "rateints"):
        name = sim.uncal.name.replace("_uncal", f"_{kind}")
        with fits.open(tmp_path / "plain" / name) as a, fits.open(tmp_path / "rice" / name) as b:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                assert np.array_equal(a[ext].data, b[ext].data, equal_nan=True), (kind, ext)


def test_damaged_compressed_tiles_are_refused(sim_rice, tmp_path, scratch):
    sim, rice = sim_rice
    raw = bytearray(rice.read_bytes())
    with fits.open(rice) as hdul:
        info = hdul["SCI"].fileinfo()
    heap_end = info["datLoc"] + info["datSpan"]
    raw[heap_end - 3000:heap_end - 100] = os.urandom(2900)   # the last tiles' bytes
    bad = tmp_path / rice.name
    bad.write_bytes(bytes(raw))
    with crds_environment(sim):
        o = invoke("-q", bad, "-o", tmp_path / "out")
    if o.code == 0:   # RICE may decode noise as values: then the data are merely different
        return
    assert_refused(o, bad.name)
    assert names(tmp_path / "out") == []


# -- 9. the output directory ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["a file", "under a file", "not writable", "cannot be created"])
def test_unusable_output_directory_is_refused_before_any_work(crds, tmp_path, monkeypatch, scratch, where):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a directory")
    # /sys refuses new entries even to root (a real test of writability, unlike the mode bits)
    out = {"a file": blocker, "under a file": blocker / "out", "not writable": Path("/sys"),
           "cannot be created": Path("/sys/streamdet-no-such-output")}[where]
    if where != "a file" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    resolved = []
    monkeypatch.setattr(engine.refmod, "resolve",
                        lambda *a, **k: resolved.append(1) or pytest.fail("work was started"))
    second = tmp_path / "second_uncal.fits"
    second.write_bytes(crds.uncal.read_bytes())
    o = invoke("-q", crds.uncal, second, "-o", out)
    line = assert_refused(o, shown(out))   # one line for both files
    if out.is_dir():
        assert "not writable" in line
    assert resolved == []
    assert blocker.read_bytes() == b"a file, not a directory"
    assert not out.exists() or out in (blocker, Path("/sys"))


# -- 10. signals ------------------------------------------------------------------------------

# the run stops itself with a real signal at a known point: just after the band pass has
# written its first band of the saved ramp (--save-ramp) to its scratch files, on disk
_SIGNAL_MID_RUN = """
import os, signal, sys
from streamdet.core import products
signum = int(os.environ["TEST_SIGNAL"])
_put = products.CubeStore.put
def put(self, *args):
    _put(self, *args)
    os.kill(os.getpid(), signum)
products.CubeStore.put = put
from streamdet.cli import main
sys.argv = ["streamdet", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_a_stopped_run_leaves_no_scratch(sim, cli_env, tmp_path, signum):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "out"
    env = {**cli_env, "TMPDIR": str(tmpdir), "TEST_SIGNAL": str(int(signum))}
    before = sim.uncal.read_bytes()
    result = run_cli(["process", "--threads", "1", sim.uncal, "-o", out, "--save-ramp"], env,
                     tmp_path, prefix=[sys.executable, "-c", _SIGNAL_MID_RUN])
    assert names(tmpdir) == [], "scratch left in TMPDIR"
    assert names(out) == []
    assert sim.uncal.read_bytes() == before
    if signum == signal.SIGKILL:
        assert result.returncode == -signal.SIGKILL
        return
    assert result.returncode == 128 + signum, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], lines
