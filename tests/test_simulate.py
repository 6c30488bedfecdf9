"""Tests of ``streamdet.simulate``: the simulated exposure, its references and CRDS cache.

The parity tests run jwst's own ``Detector1Pipeline`` on simulated data, resolving every
reference through the generated CRDS cache with no overrides and no network. crds reads
its configuration when it is first imported, and caches mappings per process, so jwst
and crds always run here in a fresh subprocess whose environment is ``SimResult.env``.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from .oracle import last_json, run_python
from .oracle import run_jwst_detector1 as oracle_detector1
from streamdet.simulate import (
    FULL_SHAPE,
    SUBARRAYS,
    SimParams,
    SimulationError,
    crds_env,
    simulate,
)

HAVE_JWST = importlib.util.find_spec("jwst") is not None
HAVE_STDATAMODELS = importlib.util.find_spec("stdatamodels") is not None
HAVE_CRDS = importlib.util.find_spec("crds") is not None

# Every reference type jwst 3.0's Detector1Pipeline prefetches for MIRI, plus step lookups.
FILE_TYPES = ["mask", "saturation", "linearity", "rscd", "dark", "gain", "readnoise", "reset"]
NA_TYPES = ["ipc", "superbias", "refpix", "sirskernel", "emicorr", "pictureframe", "persat",
            "trapdensity", "trappars", "flat", "pastasoss", "pars-jumpstep",
            "pars-detector1pipeline"]

def run_jwst_detector1(result, outdir: Path) -> dict[str, Path]:
    """jwst's Detector1Pipeline, references from the generated cache only; rate + jump files."""
    return oracle_detector1(result.uncal, result.env, outdir, steps={"jump": {"save_results": True}},
                            products=("rate", "rateints", "jump"))


def rate_statistics(rate_file: Path, truth_file: Path):
    """(z, good mask, rate header) with z = (rate - truth) / err over DQ == 0 pixels."""
    truth = fits.getdata(truth_file).astype(np.float64)
    with fits.open(rate_file) as h:
        sci = h["SCI"].data.astype(np.float64)
        err = h["ERR"].data.astype(np.float64)
        dq = h["DQ"].data
        hdr = h[0].header.copy()
    good = (dq == 0) & np.isfinite(sci) & (err > 0)
    z = np.full(sci.shape, np.nan)
    z[good] = (sci[good] - truth[good]) / err[good]
    return z, good, hdr


def robust(z: np.ndarray) -> tuple[float, float]:
    z = z[np.isfinite(z)]
    med = float(np.median(z))
    return med, float(1.4826 * np.median(np.abs(z - med)))


def jump_recovery(jump_file: Path, catalog: dict, min_sigma: float = 10.0):
    """Fraction of injected jumps above ``min_sigma`` that jwst flagged JUMP_DET."""
    gdq = fits.getdata(jump_file, "GROUPDQ")
    wanted = [j for j in catalog["jumps"]
              if j["sigma"] > min_sigma and j["usable"] and not j["saturated_3x3"]
              and not j["bad_pixel"]]
    found = [j for j in wanted if gdq[j["int"], j["group"], j["y"], j["x"]] & 4]
    return len(found), len(wanted)


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sub64(tmp_path_factory):
    """The default small case (SUB64, 10 groups x 2 integrations, full-frame references)."""
    return simulate(tmp_path_factory.mktemp("sub64") / "sim", seed=1)


@pytest.fixture(scope="module")
def sub64_jwst(sub64, tmp_path_factory):
    if not HAVE_JWST:
        pytest.skip("jwst is not installed")
    return run_jwst_detector1(sub64, tmp_path_factory.mktemp("sub64_jwst"))


# ---------------------------------------------------------------------------------------
# 1. jwst's own pipeline recovers the truth
# ---------------------------------------------------------------------------------------


@pytest.mark.parity
def test_jwst_detector1_recovers_truth_sub64(sub64, sub64_jwst):
    z, good, hdr = rate_statistics(sub64_jwst["rate"], sub64.truth_rate)
    med, rsig = robust(z[good])
    print(f"SUB64 10x2: {good.sum()} good pixels, median z {med:.4f}, robust sigma {rsig:.4f}")
    assert good.sum() > 0.8 * z.size
    assert abs(med) < 0.1
    assert 0.8 < rsig < 1.3

    # The references came from the generated cache, not from overrides or a server.
    assert hdr["CRDS_CTX"] == sub64.context
    for key, reftype in (("R_MASK", "mask"), ("R_SATURA", "saturation"), ("R_LINEAR", "linearity"),
                         ("R_DARK", "dark"), ("R_GAIN", "gain"), ("R_READNO", "readnoise"),
                         ("R_RSCD", "rscd"), ("R_RESET", "reset")):
        assert hdr[key] == f"crds://{sub64.refs[reftype].name}", key
    assert hdr["S_RESET"] == "COMPLETE" and hdr["S_LINEAR"] == "COMPLETE"
    assert hdr["S_DARK"] == "COMPLETE" and hdr["S_RSCD"] == "COMPLETE"
    assert hdr["S_REFPIX"] == "SKIPPED"  # jwst: MIRI subarrays
    assert hdr["S_IPC"] == "SKIPPED"  # IPC is N/A in the cache

    catalog = json.loads(sub64.truth_catalog.read_text())
    found, wanted = jump_recovery(sub64_jwst["jump"], catalog)
    print(f"SUB64 jumps > 10 sigma recovered: {found}/{wanted}")
    assert wanted >= 20
    assert found >= 0.95 * wanted

    # Pixels the mask marks DO_NOT_USE come out unusable; saturating pixels are flagged.
    with fits.open(sub64_jwst["rate"]) as h:
        dq = h["DQ"].data
    for bad in catalog["bad_pixels"]:
        if bad["mask_flags"] & 1:
            assert dq[bad["y"], bad["x"]] & 1
    sat = [s for s in catalog["saturated"]
           if all(g is not None and g < sub64_jwst_usable_last(catalog) for g in
                  s["first_saturated_group"])]
    assert sat, "the saturating source should saturate part-way up the ramp"
    assert all(dq[s["y"], s["x"]] & 2 for s in sat)


def sub64_jwst_usable_last(catalog) -> int:
    """Index of the last group the default MIRI chain fits (lastframe flags the final one)."""
    return catalog["ngroups"] - 2 if catalog["ngroups"] > 2 else catalog["ngroups"] - 1


@pytest.mark.parity
def test_jwst_detector1_recovers_truth_full_frame_refpix(tmp_path):
    """FULL frame: jwst's refpix must remove the per-amplifier drift from the ramps."""
    if not HAVE_JWST:
        pytest.skip("jwst is not installed")
    res = simulate(tmp_path / "full", subarray="FULL", ngroups=10, nints=2, seed=2)
    files = run_jwst_detector1(res, tmp_path / "jwst")
    z, good, hdr = rate_statistics(files["rate"], res.truth_rate)
    med, rsig = robust(z[good])
    print(f"FULL 10x2: {good.sum()} good pixels, median z {med:.4f}, robust sigma {rsig:.4f}")
    assert hdr["S_REFPIX"] == "COMPLETE"
    assert abs(med) < 0.1
    assert 0.8 < rsig < 1.3
    # Per amplifier (column mod 4) and row parity, where the drift lives: no residual bias.
    rows, cols = np.indices(z.shape)
    for parity in (0, 1):
        for amp in range(4):
            sel = good & (rows % 2 == parity) & (cols % 4 == amp)
            m, _ = robust(z[sel])
            assert abs(m) < 0.1, (parity, amp, m)
    catalog = json.loads(res.truth_catalog.read_text())
    found, wanted = jump_recovery(files["jump"], catalog)
    print(f"FULL jumps > 10 sigma recovered: {found}/{wanted}")
    assert found >= 0.95 * wanted


# ---------------------------------------------------------------------------------------
# The same chain in plain numpy: the truth is recoverable without jwst (fast)
# ---------------------------------------------------------------------------------------


def test_truth_recoverable_with_numpy_chain(tmp_path):
    """Reset -> linearity -> dark subtraction -> least-squares slope gives the truth,
    with the scatter expected from the READNOISE and GAIN references."""
    res = simulate(tmp_path / "sim", subarray="SUB128", ngroups=10, nints=2, seed=4)
    cat = json.loads(res.truth_catalog.read_text())
    truth = fits.getdata(res.truth_rate).astype(np.float64)
    sub = SUBARRAYS["SUB128"]
    ys, xs = sub.full_frame_slices
    with fits.open(res.uncal) as h:
        raw = h["SCI"].data.astype(np.float64)
        tgroup = h[0].header["TGROUP"]
    nints, ngroups = raw.shape[:2]
    reset = fits.getdata(res.refs["reset"]).astype(np.float64)
    dark = fits.getdata(res.refs["dark"]).astype(np.float64)
    coeffs = fits.getdata(res.refs["linearity"], "COEFFS")[:, ys, xs].astype(np.float64)
    identity = np.isnan(coeffs).any(axis=0)
    coeffs[:, identity] = np.array([0.0, 1.0, 0.0, 0.0])[:, None]
    rn = fits.getdata(res.refs["readnoise"])[ys, xs].astype(np.float64)
    gain = fits.getdata(res.refs["gain"])[ys, xs].astype(np.float64)

    # Pixels touched by anything the simple chain does not handle.
    skip = np.zeros(truth.shape, bool)
    skip[:, cat["reference_columns"]] = True
    for j in cat["jumps"]:
        skip[j["y"], j["x"]] = True
    for s in cat["saturated"]:
        skip[max(0, s["y"] - 1):s["y"] + 2, max(0, s["x"] - 1):s["x"] + 2] = True
    for b in cat["bad_pixels"]:
        if b["flags"] & (1 | (1 << 30)):
            skip[b["y"], b["x"]] = True

    zs = []
    for i in range(nints):
        data = raw[i].copy()
        data[: reset.shape[1]] -= reset[min(i, reset.shape[0] - 1)]
        lin = coeffs[3] * data + coeffs[2]
        lin = (lin * data + coeffs[1]) * data + coeffs[0]
        lin -= dark[min(i, dark.shape[0] - 1)]
        first = cat["rscd_flagged_groups"]["int1" if i == 0 else "int2+"]
        g = np.arange(first, ngroups - 1)  # lastframe: the final group is not used
        n = g.size
        t = g * tgroup
        tc = t - t.mean()
        slope = np.tensordot(tc, lin[g], axes=(0, 0)) / np.sum(tc**2)
        # Variance of an unweighted least-squares slope: read noise + correlated Poisson.
        dt = tgroup
        var_r = 12.0 * (rn**2 / 2.0) / (n * (n**2 - 1) * dt**2)
        rate = np.clip(truth + cat["params"]["dark_current_dn_s"], 0, None)
        var_p = 6.0 * (n**2 + 1) / (5.0 * n * (n**2 - 1)) * rate / (gain * dt)
        zs.append(((slope - truth) / np.sqrt(var_r + var_p))[~skip])
    z = np.concatenate(zs)
    med, rsig = robust(z)
    print(f"numpy chain: {z.size} samples, median z {med:.4f}, robust sigma {rsig:.4f}")
    assert abs(med) < 0.05
    assert 0.93 < rsig < 1.07


# ---------------------------------------------------------------------------------------
# 2. CRDS: the cache resolves every type offline; two caches in one process
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_CRDS, reason="crds is not installed")
def test_crds_resolves_two_caches_in_one_process(sub64, tmp_path):
    other = simulate(tmp_path / "other", subarray="SUB128", ngroups=5, nints=1, seed=9,
                     params=SimParams(fullframe_refs=False))
    assert other.context != sub64.context
    cases = []
    for res in (sub64, other):
        cases.append({
            "env": res.env, "uncal": str(res.uncal), "context": res.context,
            "expected": {k: str(res.crds_path / "references" / "jwst" / "miri" / v.name)
                         for k, v in res.refs.items()},
        })
    code = f"""
    import json, os
    cases = json.loads({json.dumps(json.dumps(cases))})
    os.environ.update(cases[0]["env"])     # crds reads its configuration at import
    import crds
    from astropy.io import fits
    out = []
    for case in cases:
        os.environ.update(case["env"])
        header = dict(fits.getheader(case["uncal"]))
        # The context is passed explicitly: crds caches the CRDS_CONTEXT it saw first.
        refs = crds.getreferences(header, reftypes={FILE_TYPES + NA_TYPES!r},
                                  observatory="jwst", context=case["context"])
        out.append(refs)
    print(json.dumps(out))
    """
    out = last_json(run_python(code, sub64.env))
    for case, refs in zip(cases, out):
        for reftype in FILE_TYPES:
            assert refs[reftype] == case["expected"][reftype], reftype
            assert Path(refs[reftype]).is_file()
        for reftype in NA_TYPES:
            assert refs[reftype].upper().startswith("NOT FOUND N/A"), (reftype, refs[reftype])


@pytest.mark.skipif(not HAVE_CRDS, reason="crds is not installed")
def test_crds_cache_layout_and_checksums(sub64):
    root = sub64.crds_path
    assert (root / "config" / "jwst" / "server_config").is_file()
    assert (root / "config" / "jwst" / "ref_cache_subdir_mode").read_text().strip() == "instrument"
    maps = sorted((root / "mappings" / "jwst").iterdir())
    assert (root / "mappings" / "jwst" / sub64.context) in maps
    assert sub64.env["CRDS_PATH"] == str(root)
    assert sub64.env["CRDS_CONTEXT"] == sub64.context
    assert "serverless" in sub64.env["CRDS_SERVER_URL"]
    assert sub64.env == crds_env(root, sub64.context)
    # crds' own checksum verification (in a subprocess: crds configures itself at import).
    code = f"""
    import json
    from crds.core import rmap
    names = {[m.name for m in maps]!r}
    for name in names:
        rmap.load_mapping({str(root / 'mappings' / 'jwst')!r} + "/" + name)  # verifies sha1sum
    print(json.dumps(len(names)))
    """
    assert last_json(run_python(code, sub64.env)) == len(maps)


@pytest.mark.skipif(not HAVE_STDATAMODELS, reason="stdatamodels is not installed")
def test_files_validate_with_stdatamodels(sub64):
    """Level1bModel/RampModel read the exposure; every reference validates in its model."""
    code = f"""
    import json, warnings
    warnings.simplefilter("error")
    from stdatamodels.jwst import datamodels as dm
    out = {{}}
    for cls in (dm.Level1bModel, dm.RampModel):
        with cls({str(sub64.uncal)!r}) as m:
            m.validate()
            out[cls.__name__] = [list(m.data.shape), str(m.data.dtype), len(m.int_times)]
    models = dict(mask=dm.MaskModel, saturation=dm.SaturationModel, linearity=dm.LinearityModel,
                  rscd=dm.RSCDModel, dark=dm.DarkMIRIModel, gain=dm.GainModel,
                  readnoise=dm.ReadnoiseModel, reset=dm.ResetModel)
    refs = {json.dumps({k: str(v) for k, v in sub64.refs.items()})}
    for key, cls in models.items():
        with cls(refs[key]) as m:
            m.validate()
            arr = m.coeffs if key == "linearity" else getattr(m, "data", None)
            out[key] = None if arr is None else list(arr.shape)
            if key == "mask":
                out["mask_flags"] = int(__import__("numpy").bitwise_or.reduce(m.dq.ravel()))
    print(json.dumps(out))
    """
    out = last_json(run_python(code, sub64.env))
    assert out["Level1bModel"] == [[2, 10, 64, 72], "uint16", 2]
    assert out["RampModel"] == [[2, 10, 64, 72], "float32", 2]
    for key in ("saturation", "gain", "readnoise"):
        assert out[key] == list(FULL_SHAPE)
    assert out["linearity"] == [4, *FULL_SHAPE]
    assert out["dark"] == [2, 10, 64, 72]  # 2 dark integrations, science shape
    assert out["reset"] == [2, 10, 64, 72]
    # The compressed DQ_DEF bits decode to the JWST values (DEAD, HOT, REFERENCE_PIXEL ...).
    for bit in (0, 10, 11, 31):
        assert out["mask_flags"] & (1 << bit)


# ---------------------------------------------------------------------------------------
# The files themselves
# ---------------------------------------------------------------------------------------


def test_uncal_layout(sub64):
    with fits.open(sub64.uncal) as h:
        names = [hdu.name for hdu in h]
        assert names == ["PRIMARY", "SCI", "GROUP", "INT_TIMES", "ASDF"]
        p, s = h[0].header, h["SCI"].header
        assert s["BITPIX"] == 16 and s["BZERO"] == 32768
        assert h["SCI"].data.dtype == np.uint16
        assert h["SCI"].data.shape == (2, 10, 64, 72)
        for key, value in dict(TELESCOP="JWST", INSTRUME="MIRI", DETECTOR="MIRIMAGE",
                               EXP_TYPE="MIR_IMAGE", READPATT="FASTR1", SUBARRAY="SUB64",
                               NGROUPS=10, NINTS=2, NFRAMES=1, GROUPGAP=0, SUBSTRT1=1,
                               SUBSTRT2=779, SUBSIZE1=72, SUBSIZE2=64, FASTAXIS=1, SLOWAXIS=2,
                               DATAMODL="Level1bModel", INTSTART=1, INTEND=2).items():
            assert p[key] == value, key
        assert p["TFRAME"] == pytest.approx(0.08512) and p["TGROUP"] == p["TFRAME"]
        assert p["EXPSTART"] < p["EXPMID"] < p["EXPEND"]
        assert len(h["INT_TIMES"].data) == 2 and len(h["GROUP"].data) == 20
        raw = h["SCI"].data
    ped = raw[:, 0, :, 4:]
    assert 9000 < np.median(ped) < 16000  # the MIRI bias pedestal
    assert raw.max() <= 65535


def test_truth_catalog_content(sub64):
    cat = json.loads(sub64.truth_catalog.read_text())
    truth = fits.getdata(sub64.truth_rate)
    assert truth.shape == (64, 72) and np.all(truth[:, :4] == 0)  # reference columns
    sig = np.array([j["sigma"] for j in cat["jumps"]])
    assert (sig > 1000).any() and ((sig > 10) & (sig < 1000)).any() and (sig < 5).any()
    assert {s["kind"] for s in cat["sources"]} >= {"saturating", "bright", "medium", "faint"}
    # The saturating source saturates part-way up the ramp, not at the start.
    firsts = [g for s in cat["saturated"] for g in s["first_saturated_group"] if g is not None]
    assert firsts and 0 < min(firsts) < cat["ngroups"] - 1
    names = {n for b in cat["bad_pixels"] for n in b["names"]}
    assert {"HOT", "DO_NOT_USE"} <= names
    assert cat["rscd_flagged_groups"] == {"int1": 1, "int2+": 3}


def test_references_shapes(tmp_path):
    res = simulate(tmp_path / "one", subarray="SUB128", ngroups=4, nints=1, seed=3)
    assert fits.getdata(res.refs["dark"]).shape == (1, 4, 128, 136)  # one dark integration
    assert fits.getdata(res.refs["reset"]).shape == (1, 4, 128, 136)
    assert fits.getdata(res.refs["mask"], "DQ").shape == FULL_SHAPE
    res = simulate(tmp_path / "small", subarray="SUB128", ngroups=4, nints=3, seed=3,
                   params=SimParams(fullframe_refs=False, reset_ngroups=2))
    assert fits.getdata(res.refs["mask"], "DQ").shape == (128, 136)
    assert fits.getheader(res.refs["mask"])["SUBSTRT2"] == 889
    assert fits.getdata(res.refs["dark"]).shape == (2, 4, 128, 136)
    assert fits.getdata(res.refs["reset"]).shape == (2, 2, 128, 136)


@pytest.mark.parametrize("name", sorted(SUBARRAYS))
def test_every_subarray(name, tmp_path):
    sub = SUBARRAYS[name]
    ng = 3 if name != "FULL" else 2
    res = simulate(tmp_path / name, subarray=name, ngroups=ng, nints=1, seed=0)
    with fits.open(res.uncal) as h:
        assert h["SCI"].data.shape == (1, ng, sub.ysize, sub.xsize)
        assert h[0].header["SUBSTRT1"] == sub.xstart and h[0].header["SUBSTRT2"] == sub.ystart
        assert h[0].header["TFRAME"] == pytest.approx(sub.fast_frame_time)


def test_subarray_table():
    assert SUBARRAYS["FULL"].shape == FULL_SHAPE
    assert SUBARRAYS["FULL"].frame_time("FASTR1") == pytest.approx(2.77504)
    assert SUBARRAYS["FULL"].frame_time("SLOWR1") == pytest.approx(23.88992)
    assert (SUBARRAYS["SUB64"].xstart, SUBARRAYS["SUB64"].ystart) == (1, 779)
    assert (SUBARRAYS["BRIGHTSKY"].xstart, SUBARRAYS["BRIGHTSKY"].ystart) == (457, 51)
    for sub in SUBARRAYS.values():
        assert sub.xstart + sub.xsize - 1 <= FULL_SHAPE[1]
        assert sub.ystart + sub.ysize - 1 <= FULL_SHAPE[0]


# ---------------------------------------------------------------------------------------
# 3. Determinism
# ---------------------------------------------------------------------------------------


def test_same_seed_same_files_different_seed_different(tmp_path):
    kw = dict(subarray="SUB64", ngroups=4, nints=2)
    a = simulate(tmp_path / "a", seed=5, **kw)
    b = simulate(tmp_path / "b", seed=5, **kw)
    c = simulate(tmp_path / "c", seed=6, **kw)
    assert filecmp.cmp(a.uncal, b.uncal, shallow=False)  # the whole file, byte for byte
    with fits.open(a.uncal) as ha, fits.open(c.uncal) as hc:
        assert ha["SCI"].data.tobytes() != hc["SCI"].data.tobytes()
    assert a.truth_catalog.read_text() == b.truth_catalog.read_text()
    assert np.array_equal(fits.getdata(a.truth_rate), fits.getdata(b.truth_rate))
    for reftype in a.refs:
        with fits.open(a.refs[reftype]) as ra, fits.open(b.refs[reftype]) as rb:
            for ha_, hb_ in zip(ra[1:], rb[1:]):
                assert ha_.data.tobytes() == hb_.data.tobytes(), reftype
    # CRDS names are unique to each output (crds caches mappings by name per process).
    assert len({a.context, b.context, c.context}) == 3


# ---------------------------------------------------------------------------------------
# 4. Bad arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(subarray="SUB32"), "unknown subarray"),
    (dict(ngroups=0), "ngroups"),
    (dict(nints=0), "nints"),
    (dict(ngroups=2.5), "ngroups"),
    (dict(readpatt="FAST"), "read pattern"),
    (dict(subarray="SUB64", readpatt="SLOWR1"), "SLOWR1"),
    (dict(seed=-1), "seed"),
    (dict(name="a/b"), "name"),
])
def test_bad_arguments(tmp_path, kwargs, fragment):
    with pytest.raises(SimulationError) as exc:
        simulate(tmp_path / "out", **kwargs)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_outdir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SimulationError, match="not a directory"):
        simulate(f)


def test_existing_outdir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    first = simulate(out, ngroups=3, nints=1, seed=1)
    before = first.uncal.read_bytes()
    with pytest.raises(SimulationError) as exc:
        simulate(out, ngroups=3, nints=1, seed=2)
    assert "overwrite" in str(exc.value) and "\n" not in str(exc.value)
    assert first.uncal.read_bytes() == before  # untouched
    (out / "keep.txt").write_text("user file")
    second = simulate(out, ngroups=3, nints=1, seed=2, overwrite=True)
    assert second.uncal.read_bytes() != before
    assert (out / "keep.txt").read_text() == "user file"
    assert len(list((out / "refs").iterdir())) == len(second.refs)
    # An existing empty directory is fine without overwrite.
    empty = tmp_path / "empty"
    empty.mkdir()
    simulate(empty, ngroups=2, nints=1)


def test_python_m_streamdet_simulate_is_the_streamdet_simulate_command(tmp_path):
    """``python -m streamdet.simulate`` runs the typer command of ``streamdet simulate``
    (one CLI): its output lines, its files, and its one-line error with exit 2."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    args = ["--subarray", "SUB64", "--ngroups", "2", "--nints", "1", "--seed", "3"]
    done = subprocess.run([sys.executable, "-m", "streamdet.simulate", str(tmp_path / "cli"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    printed = dict(line.split(": ", 1) for line in lines[:2])
    assert lines[2].startswith("export CRDS_PATH=")
    direct = simulate(tmp_path / "direct", ngroups=2, nints=1, seed=3)
    assert Path(printed["uncal"]).read_bytes() == direct.uncal.read_bytes()
    assert Path(printed["truth"]).read_bytes() == direct.truth_rate.read_bytes()

    bad = subprocess.run([sys.executable, "-m", "streamdet.simulate", str(tmp_path / "bad"),
                          "--subarray", "SUB32"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown subarray" in bad.stderr
    assert not (tmp_path / "bad").exists()
