"""The bad-input promise of ``streamdet process``, checked through the real command line.

Each bad input must give exit code 2 (1 for an internal error), exactly one line on
stderr that starts with ``streamdet: error:`` and names the file, no traceback unless
``--debug``, no product or temporary file left behind, and an untouched input.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.simulate import simulate

TIMEOUT = 180


# -- helpers --------------------------------------------------------------------------------

def run_cli(args, env, cwd, prefix=None) -> subprocess.CompletedProcess:
    cmd = prefix or [sys.executable, "-m", "streamdet.cli"]
    return subprocess.run([*cmd, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT)


def snapshot(path: Path) -> tuple[str, int, int]:
    """What must not change about an input: its bytes, size and modification time."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


def tree(directory: Path) -> list[str]:
    """Every entry under ``directory`` (hidden ones too), or [] if it does not exist."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def assert_one_error_line(result: subprocess.CompletedProcess, *names: str) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("streamdet: error: "), line
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    return line


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the FITS file ``src`` to ``dst`` through astropy, ``edit(hdul)`` in between."""
    with fits.open(src) as hdul:
        copy = fits.HDUList([hdu.copy() for hdu in hdul])
    copy = edit(copy) or copy
    copy.writeto(dst)
    return dst


def with_mapping_edit(cache: Path, dst: Path, glob: str, edit) -> Path:
    """A copy of the CRDS cache ``cache`` in which the mapping matching ``glob`` is
    edited and its sha1sum recomputed (CRDS_OFFLINE.md section 4)."""
    shutil.copytree(cache, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (mapping,) = (dst / "mappings" / "jwst").glob(glob)
    text = edit(mapping.read_text())
    kept = "".join(ln for ln in text.splitlines(True) if "sha1sum" not in ln)
    sha1 = hashlib.sha1(kept.encode("utf-8")).hexdigest()
    mapping.write_text(re.sub(r"'sha1sum' : '[0-9a-f]*'", f"'sha1sum' : '{sha1}'", text))
    return dst


# -- the simulated exposure, made once ----------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def env(sim, tmp_path_factory):
    out = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    out.update(sim.env)
    out["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))  # scratch must not be left here
    return out


@dataclass
class Case:
    name: str
    args: list
    names: list            # strings the error line must contain (the file named)
    phrase: str            # words that say what the problem is
    inputs: list           # files that must stay untouched
    env: dict = field(default_factory=dict)
    drop_env: tuple = ()


def _cases(sim, work: Path) -> list[Case]:
    src = sim.uncal
    raw = src.read_bytes()
    bad = work / "bad"
    bad.mkdir()
    cases: list[Case] = []

    def file_case(name, path, phrase):
        cases.append(Case(name, [path], [path.name], phrase, [path]))

    p = bad / "random_uncal.fits"
    p.write_bytes(np.random.default_rng(1).bytes(20000))
    file_case("not_fits", p, "not a readable FITS file")
    p = bad / "empty_uncal.fits"
    p.write_bytes(b"")
    file_case("empty", p, "not a readable FITS file")
    p = bad / "half_uncal.fits"
    p.write_bytes(raw[: len(raw) // 2])
    file_case("truncated_in_sci", p, "truncated")
    with fits.open(src) as hdul:
        sci_header_at = hdul["SCI"].fileinfo()["hdrLoc"]
    p = bad / "cuthdr_uncal.fits"
    p.write_bytes(raw[: sci_header_at + 100])
    file_case("truncated_in_sci_header", p, "truncated")
    p = bad / "lastbyte_uncal.fits"
    p.write_bytes(raw[:-1])
    file_case("truncated_last_byte", p, "truncated")
    p = rewrite(src, bad / "nosci_uncal.fits",
                lambda h: fits.HDUList([hdu for hdu in h if hdu.name != "SCI"]))
    file_case("no_sci", p, "no SCI extension")

    def sci3d(h):
        h["SCI"].data = np.ascontiguousarray(h["SCI"].data[0])
    file_case("sci_3d", rewrite(src, bad / "sci3d_uncal.fits", sci3d), "3 dimensions")

    def sci_float(h):
        h["SCI"].data = h["SCI"].data.astype(np.float32)
    file_case("sci_float32", rewrite(src, bad / "float_uncal.fits", sci_float), "BITPIX=-32")

    def nircam(h):
        h[0].header["INSTRUME"] = "NIRCAM"
    file_case("not_miri", rewrite(src, bad / "nircam_uncal.fits", nircam), "MIRI")

    def no_ngroups(h):
        del h[0].header["NGROUPS"]
    file_case("missing_keyword", rewrite(src, bad / "nongroups_uncal.fits", no_ngroups),
              "missing keyword NGROUPS")

    def bad_nframes(h):
        h[0].header["NFRAMES"] = "many"
    file_case("bad_keyword_value", rewrite(src, bad / "nframes_uncal.fits", bad_nframes),
              "NFRAMES")
    missing = bad / "missing_uncal.fits"
    cases.append(Case("no_such_file", [missing], [missing.name], "no such file", []))

    # references: the exposure is fine, the reference is not
    mask10 = bad / "mask10.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((10, 10), np.uint32), name="DQ")]
                 ).writeto(mask10)
    cases.append(Case("reference_wrong_shape", [src, "--override", f"mask={mask10}"],
                      [src.name, mask10.name, "mask"], "shape (10, 10)", [src, mask10]))
    junk = bad / "junk_dark.fits"
    junk.write_bytes(b"SIMPLE  = nonsense" * 10)
    cases.append(Case("reference_not_fits", [src, "--override", f"dark={junk}"],
                      [src.name, junk.name, "dark"], "not readable FITS", [src, junk]))
    # CRDS: a copy of the cache whose dark rmap selects another subarray
    nomatch = with_mapping_edit(sim.crds_path, work / "cache_nomatch", "*_dark_*.rmap",
                                lambda t: t.replace("'SUB64'", "'SUB128'"))
    cases.append(Case("crds_no_match", [src], [src.name, "dark"], "CRDS found no",
                      [src], env={"CRDS_PATH": str(nomatch)}))
    # ... and a cache whose dark file is gone: the message names the file and the cache
    nofile = work / "cache_nofile"
    shutil.copytree(sim.crds_path, nofile)
    (gone,) = nofile.rglob("*_dark_*.fits")
    gone.unlink()
    cases.append(Case("crds_file_missing", [src], [src.name, "dark", gone.name, str(nofile)],
                      "missing from the CRDS cache", [src], env={"CRDS_PATH": str(nofile)}))

    # reference arrays of the wrong dimensions or shape: the reference file, its type and
    # extension, the shape found and the one expected (no internal error)
    def ref_case(name, reftype, edit, expected):
        path = rewrite(sim.refs[reftype], bad / f"{name}.fits", edit)
        with fits.open(path) as hdul:
            ext = next(e for e in ("SCI", "COEFFS", "DQ") if f"{reftype.upper()} {e}" in expected)
            shape = hdul[ext].data.shape
        cases.append(Case(name, [src, "--override", f"{reftype}={path}"],
                          [src.name, str(path), expected], f"has shape {shape}, expected [",
                          [src, path]))

    def replace(ext, make):
        def edit(h):
            h[ext].data = np.ascontiguousarray(make(h[ext].data))
        return edit

    ref_case("dark_sci_2d", "dark", replace("SCI", lambda a: a[0, 0]), "DARK SCI")
    ref_case("dark_one_group", "dark", replace("SCI", lambda a: a[:, :1]),
             "DARK SCI has shape (2, 1, 64, 72), expected [nints?, ngroups>=2, ny, nx]")
    ref_case("linearity_coeffs_2d", "linearity", replace("COEFFS", lambda a: a[0]),
             "LINEARITY COEFFS")
    ref_case("linearity_dq_3d", "linearity", replace("DQ", lambda a: a[None].repeat(2, 0)),
             "LINEARITY DQ")
    ref_case("saturation_sci_3d", "saturation", replace("SCI", lambda a: a[None].repeat(2, 0)),
             "SATURATION SCI")
    ref_case("mask_dq_3d", "mask", replace("DQ", lambda a: a[None].repeat(2, 0)), "MASK DQ")
    ref_case("reset_dq_3d", "reset", replace("DQ", lambda a: a[None].repeat(2, 0)), "RESET DQ")
    ref_case("gain_sci_3d", "gain", replace("SCI", lambda a: a[None].repeat(2, 0)), "GAIN SCI")
    ref_case("readnoise_sci_3d", "readnoise", replace("SCI", lambda a: a[None].repeat(2, 0)),
             "READNOISE SCI")
    # ... also when CRDS resolved it: the message names the cached file
    badcache = work / "cache_bad_dark"
    shutil.copytree(sim.crds_path, badcache, copy_function=os.link)
    (cached,) = badcache.rglob("*_dark_*.fits")
    cached.unlink()
    rewrite(sim.refs["dark"], cached, replace("SCI", lambda a: a[0, 0]))
    cases.append(Case("crds_dark_sci_2d", [src], [src.name, str(cached), "DARK SCI"],
                      "has shape (64, 72), expected [nints?, ngroups, ny, nx] covering the "
                      "exposure's 64x72 SUB64 subarray at (row",
                      [src], env={"CRDS_PATH": str(badcache)}))
    # a reference the rate cannot be computed without, N/A
    cases.append(Case("gain_not_applicable", [src, "--override", "gain=N/A"],
                      [src.name, "gain reference is N/A"], "cannot compute the rate", [src]))
    cases.append(Case("crds_not_configured", [src], [src.name], "CRDS_PATH", [src],
                      drop_env=("CRDS_PATH",)))
    return cases


@dataclass
class Outcome:
    case: Case
    returncode: int
    lines: list            # the stderr lines about this case
    stdout: str
    before: list
    after: list
    out_dir: Path
    input_dirs: dict


@pytest.fixture(scope="module")
def outcomes(sim, env, tmp_path_factory) -> dict[str, Outcome]:
    """Every bad-input case. The bad exposures go through one ``streamdet process`` run
    together (each must give exactly its own one line); the reference and CRDS cases,
    which need their own options or environment, run one process each, concurrently."""
    work = tmp_path_factory.mktemp("bad_input")
    cases = _cases(sim, work)
    batch = [c for c in cases if not (c.env or c.drop_env or len(c.args) > 1)]
    alone = [c for c in cases if c not in batch]

    def run(group: list[Case], out_dir: Path) -> list[Outcome]:
        case_env = {k: v for k, v in env.items() if k not in group[0].drop_env}
        case_env.update(group[0].env)
        inputs = [Path(p) for c in group for p in c.inputs]
        input_dirs = {d: tree(d) for d in {p.parent for p in inputs}}
        before = {p: snapshot(p) for p in inputs}
        args = [a for c in group for a in c.args]
        result = run_cli(["process", *args, "-o", out_dir], case_env, work)
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        lines = result.stderr.splitlines()
        if len(group) > 1:  # one line per bad file, in the order given
            assert len(lines) == len(group), result.stderr
        out = []
        for i, c in enumerate(group):
            mine = [lines[i]] if len(group) > 1 and i < len(lines) else lines
            out.append(Outcome(c, result.returncode, mine, result.stdout,
                               [before[Path(p)] for p in c.inputs],
                               [snapshot(Path(p)) for p in c.inputs], out_dir, input_dirs))
        return out

    jobs = [(batch, work / "out_batch")] + [([c], work / f"out_{c.name}") for c in alone]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    return {o.case.name: o for group in results for o in group}


CASE_NAMES = ["not_fits", "empty", "truncated_in_sci", "truncated_in_sci_header",
              "truncated_last_byte", "no_sci", "sci_3d", "sci_float32", "not_miri",
              "missing_keyword", "bad_keyword_value", "no_such_file", "reference_wrong_shape",
              "reference_not_fits", "crds_no_match", "crds_file_missing",
              "crds_not_configured", "dark_sci_2d", "dark_one_group", "linearity_coeffs_2d",
              "linearity_dq_3d", "saturation_sci_3d", "mask_dq_3d", "reset_dq_3d",
              "gain_sci_3d", "readnoise_sci_3d", "crds_dark_sci_2d", "gain_not_applicable"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(outcomes, name):
    o = outcomes[name]
    assert o.returncode == 2, (o.returncode, o.lines)
    assert len(o.lines) == 1, o.lines
    line = o.lines[0]
    assert line.startswith("streamdet: error: "), line
    for fragment in o.case.names:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert o.case.phrase in line, line
    assert o.stdout == ""
    assert tree(o.out_dir) == [], "something was left in the output directory"
    assert o.after == o.before, "an input file was modified"
    for directory, listing in o.input_dirs.items():
        assert tree(directory) == listing, f"files appeared beside the input in {directory}"


def test_all_cases_checked(outcomes):
    assert sorted(outcomes) == sorted(CASE_NAMES)


def test_scratch_space_is_clean(outcomes, env):
    assert tree(Path(env["TMPDIR"])) == []


def test_debug_shows_the_traceback(sim, env, tmp_path):
    bad = tmp_path / "random_uncal.fits"
    bad.write_bytes(np.random.default_rng(2).bytes(5000))
    result = run_cli(["process", bad, "-o", tmp_path / "out", "--debug"], env, tmp_path)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "BadInputError" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("streamdet: error: ") and bad.name in last
    assert tree(tmp_path / "out") == []


def test_existing_product_is_not_replaced(sim, env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rate = out / sim.uncal.name.replace("_uncal.fits", "_rate.fits")
    rate.write_bytes(b"an older product")
    before, uncal_before = snapshot(rate), snapshot(sim.uncal)
    result = run_cli(["process", sim.uncal, "-o", out], env, tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result, rate.name, "--overwrite")
    assert snapshot(rate) == before
    assert tree(out) == [rate.name], "the other product was written anyway"
    assert snapshot(sim.uncal) == uncal_before

    result = run_cli(["process", "-q", sim.uncal, "-o", out, "--overwrite"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert snapshot(rate) != before
    with fits.open(rate) as hdul:
        assert hdul["SCI"].data.shape == (64, 72)
    assert snapshot(sim.uncal) == uncal_before


def test_several_files_one_bad(sim, env, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good1 = inputs / sim.uncal.name
    shutil.copy2(sim.uncal, good1)
    good2 = inputs / "jw09999001001_01101_00002_mirimage_uncal.fits"
    shutil.copy2(sim.uncal, good2)
    bad = inputs / "jw09999001001_01101_00003_mirimage_uncal.fits"
    bad.write_bytes(sim.uncal.read_bytes()[:50000])
    before = {p: snapshot(p) for p in (good1, bad, good2)}
    out = tmp_path / "out"
    result = run_cli(["process", "-q", good1, bad, good2, "-o", out], env, tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result, bad.name, "truncated")
    for good in (good1, good2):
        base = good.name.replace("_uncal.fits", "")
        for kind in ("rate", "rateints"):
            with fits.open(out / f"{base}_{kind}.fits") as hdul:
                assert np.isfinite(hdul["SCI"].data).any()
    bad_base = bad.name.replace("_uncal.fits", "")
    assert not [p for p in tree(out) if bad_base in p]
    assert not [p for p in tree(out) if p.startswith(".") or p.endswith(".tmp")]
    assert {p: snapshot(p) for p in before} == before, "an input was modified"
    assert tree(inputs) == sorted(p.name for p in before)


_FAIL_SECOND_WRITE = """
import sys
from astropy.io import fits
_write = fits.HDUList.writeto
_calls = []
def writeto(self, *args, **kwargs):
    _calls.append(1)
    _write(self, *args, **kwargs)
    if len(_calls) == 2:
        raise RuntimeError("simulated failure while writing the second product")
fits.HDUList.writeto = writeto
from streamdet.cli import main
sys.argv = ["streamdet", *sys.argv[1:]]
main()
"""


def test_internal_error_exit_1_and_no_partial_products(sim, env, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run_env = {**env, "TMPDIR": str(scratch)}
    out = tmp_path / "out"
    before = snapshot(sim.uncal)
    result = run_cli(["process", "-q", sim.uncal, "-o", out], run_env, tmp_path,
                     prefix=[sys.executable, "-c", _FAIL_SECOND_WRITE])
    assert result.returncode == 1, result.stderr
    line = assert_one_error_line(result, sim.uncal.name, "internal error", "RuntimeError")
    assert "--debug" in line
    assert tree(out) == [], "a partial product or temporary file was left behind"
    assert tree(scratch) == [], "scratch files were left behind"
    assert snapshot(sim.uncal) == before


def test_product_path_taken_by_a_directory_leaves_no_partial_products(sim, env, tmp_path):
    out = tmp_path / "out"
    blocker = out / sim.uncal.name.replace("_uncal.fits", "_rateints.fits")
    blocker.mkdir(parents=True)
    result = run_cli(["process", "-q", sim.uncal, "-o", out, "--overwrite"], env, tmp_path)
    assert result.returncode in (1, 2), result.stderr  # 2 once products.py refuses it early
    assert_one_error_line(result, sim.uncal.name)
    assert tree(out) == [blocker.name], "the rate product was left without its rateints"
