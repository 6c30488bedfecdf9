"""Whatever arrives, ``streamdet process`` does no harm (issue 11, "beyond single cases").

Hypothesis mutates a valid Level 1B file — keyword values and their types, keywords
removed, raw card text, bytes overwritten, truncations at and around every HDU boundary
— and every run must: exit 0 or 2 (never 1, never a crash), write at most 3 lines on
stderr and no traceback, leave no product unless it exited 0, and touch nothing outside
its output directory (the tree around it is listed before and after).

The runs go through the typer application in this process, on a tiny exposure (SUB64,
4 groups, 2 integrations), so that the whole test stays well under a minute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from streamdet.cli import app
from streamdet.simulate import simulate
from streamdet.testing import crds_environment

#: CI runs the same 80 examples every time; STREAMDET_PROPERTY_EXAMPLES=2000
#: STREAMDET_PROPERTY_RANDOM=1 searches further
EXAMPLES = int(os.environ.get("STREAMDET_PROPERTY_EXAMPLES", "80"))
DERANDOMIZE = not os.environ.get("STREAMDET_PROPERTY_RANDOM")
#: milliseconds an example may take when searching for slow inputs (none in CI: no timing)
DEADLINE = int(os.environ["STREAMDET_PROPERTY_DEADLINE_MS"]) if os.environ.get(
    "STREAMDET_PROPERTY_DEADLINE_MS") else None

#: keywords per HDU that the reader, the steps or the FITS structure depend on
KEYWORDS = {
    "PRIMARY": ["SIMPLE", "BITPIX", "NAXIS", "EXTEND", "INSTRUME", "DETECTOR", "EXP_TYPE",
                "FILTER", "READPATT", "NINTS", "INTSTART", "INTEND", "NGROUPS", "NFRAMES",
                "GROUPGAP", "FRMDIVSR", "DRPFRMS1", "TFRAME", "TGROUP", "SUBARRAY",
                "SUBSTRT1", "SUBSTRT2", "SUBSIZE1", "SUBSIZE2", "DATE-OBS", "TIME-OBS",
                "EXPSTART", "NOUTPUTS", "FASTAXIS", "SLOWAXIS"],
    "SCI": ["XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4", "PCOUNT",
            "GCOUNT", "BZERO", "BSCALE", "EXTNAME"],
    "INT_TIMES": ["XTENSION", "NAXIS1", "NAXIS2", "TFIELDS", "EXTNAME", "TFORM1"],
    "GROUP": ["NAXIS2", "EXTNAME"],
}

VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1, 4, 5, 64, 72, 1024, 1032, 10**9, -10**9]),
    st.integers(-3, 2000),
    st.sampled_from([0.0, -2.775, 2.775, 1e-300, 1e300, 0.5, 4.0]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", " ", "FULL", "SUB64", "SUB256", "MIRI", "NIRCAM", "MIRIMAGE", "FASTR1",
                     "SLOWR1", "x", "1", "IMAGE", "SCI", "BINTABLE", "1J"]),
    st.booleans(),
)
#: value fields as raw card text, including what astropy cannot write itself
RAW_VALUES = st.sampled_from(["NAN", "INF", "-INF", "1E999", "'abc", "T", "F", "1.0D3",
                              "(1, 2)", "", "'   '", "-0", "0x10", "\udcff\udcfe"])


def _card(key: str, value) -> bytes:
    try:
        image = fits.Card(key, value).image
    except Exception:  # a value astropy will not write: write the text itself
        image = f"{key:<8}= {value!s:>20}"
    return image.encode("ascii", "replace")[:80].ljust(80)


def _raw_card(key: str, text: str) -> bytes:
    return f"{key:<8}= {text:>20}".encode("utf-8", "surrogateescape")[:80].ljust(80)


class Layout:
    """Where the valid file's HDUs and cards are."""

    def __init__(self, raw: bytes, path: Path):
        self.raw = raw
        self.cards: dict[tuple[str, str], int] = {}
        self.boundaries: set[int] = {0, len(raw)}
        with fits.open(path) as hdul:
            for hdu in hdul:
                info = hdu.fileinfo()
                start, data, span = info["hdrLoc"], info["datLoc"], info["datSpan"]
                self.boundaries.update({start, data, data + span})
                for at in range(start, data, 80):
                    key = raw[at:at + 8].decode("ascii").strip()
                    self.cards.setdefault((hdu.name, key), at)


@st.composite
def mutations(draw, layout: Layout):
    """A list of edits: (offset, bytes) to write, or ("cut", length)."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "raw", "remove", "bytes", "cut"]))
        if kind in ("value", "raw", "remove"):
            hdu = draw(st.sampled_from(sorted(KEYWORDS)))
            key = draw(st.sampled_from(KEYWORDS[hdu]))
            at = layout.cards.get((hdu, key))
            if at is None:
                continue
            card = {"value": lambda: _card(key, draw(VALUES)),
                    "raw": lambda: _raw_card(key, draw(RAW_VALUES)),
                    "remove": lambda: b" " * 80}[kind]()
            edits.append((at, card))
        elif kind == "bytes":
            at = draw(st.integers(0, len(layout.raw) - 1))
            edits.append((at, draw(st.binary(min_size=1, max_size=16))))
        else:
            edge = draw(st.sampled_from(sorted(layout.boundaries)))
            shift = draw(st.sampled_from([0, 0, -1, 1, -80, 80, -2879, 2879]))
            edits.append(("cut", max(0, min(len(layout.raw), edge + shift))))
    return edits


def apply(raw: bytes, edits) -> bytes:
    data = bytearray(raw)
    cut = None
    for at, what in edits:
        if at == "cut":
            cut = what if cut is None else min(cut, what)
        else:
            data[at:at + len(what)] = what
            del data[len(raw):]
    return bytes(data if cut is None else data[:cut])


def terminal_lines(w: warnings.WarningMessage) -> list[str]:
    """The lines a warning takes on stderr outside this test: astropy's logger prints its
    own as ``WARNING: message [module]``; Python adds the source line to the others."""
    lines = str(w.message).splitlines() or [""]
    return lines if issubclass(w.category, AstropyWarning) else lines + [f"  ({w.filename})"]


def listing(directory: Path, skip: Path | None = None) -> dict[str, tuple]:
    out = {}
    for p in sorted(directory.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st_ = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(directory))] = (st_.st_ino, st_.st_size, st_.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    sim = simulate(tmp_path_factory.mktemp("sim"), ngroups=4, nints=2, seed=5)
    raw = sim.uncal.read_bytes()
    return sim, raw, Layout(raw, sim.uncal)


def test_mutated_exposures_do_no_harm(valid, tmp_path_factory, monkeypatch):
    sim, raw, layout = valid
    # streamdet's own steps: what an installed plugin prints about a damaged input is its own
    monkeypatch.setenv("STREAMDET_DISABLE_PLUGIN_AUTOLOAD", "1")
    base = tmp_path_factory.mktemp("mutants")
    sim_before = listing(sim.outdir)
    seen = {0: 0, 2: 0}
    runner = CliRunner()

    @settings(max_examples=EXAMPLES, deadline=DEADLINE, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(edits=mutations(layout))
    def check(edits):
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            inbox, out, tmpdir = work / "in", work / "out", work / "tmp"
            for d in (inbox, tmpdir):
                d.mkdir()
            mutant = inbox / sim.uncal.name
            mutant.write_bytes(apply(raw, edits))
            (inbox / "neighbour_rate.fits").write_bytes(b"someone else's product")
            before = listing(work, skip=out)
            saved_tempdir = tempfile.tempdir
            tempfile.tempdir = str(tmpdir)   # this run's scratch goes where we can see it
            try:
                with warnings.catch_warnings(record=True) as warned:
                    warnings.simplefilter("always")
                    result = runner.invoke(app, ["process", "-q", str(mutant), "-o", str(out)])
            finally:
                tempfile.tempdir = saved_tempdir
            lines = result.stderr.splitlines() + [
                line for w in warned if not issubclass(w.category, DeprecationWarning)
                for line in terminal_lines(w)]
            assert isinstance(result.exception, (SystemExit, type(None))), (
                f"crashed: {result.exception!r}")
            assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
            assert "Traceback" not in result.stderr + result.stdout
            assert len(lines) <= 3, lines
            products = sorted(p.name for p in out.iterdir()) if out.exists() else []
            if result.exit_code == 0:   # (an installed quick-look plugin adds a picture)
                stem = sim.uncal.name.replace("_uncal.fits", "")
                assert {f"{stem}_rate.fits", f"{stem}_rateints.fits"} <= set(products), products
                assert all(p.startswith(stem + "_") for p in products), products
            else:
                assert products == [], products
                assert len(result.stderr.splitlines()) == 1, result.stderr
                assert result.stderr.startswith("streamdet: error: ")
            assert listing(work, skip=out) == before, "something outside the output directory changed"
            seen[result.exit_code] += 1
        finally:
            shutil.rmtree(work)

    with crds_environment(sim):
        check()
    assert listing(sim.outdir) == sim_before, "the exposure's references or CRDS cache changed"
    assert seen[0] and seen[2], seen   # both outcomes were exercised
