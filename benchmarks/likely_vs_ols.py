"""Likelihood ramp fitting (streamdet-likely) against the built-in OLS, on simulated truth.

For each simulated MIRI exposure (known true rate per pixel) the full chain runs twice,
once with the built-in ``ramp_fit`` (jwst 3.0's OLS with optimal weighting) and once
with ``--use ramp_fit=likely``; everything upstream is identical, so the two rate
images differ only by the fit.  Reported:

* the scatter of ``(rate - truth) / truth`` over good pixels (rate DQ == 0 in both
  products) in bins of the true rate, for both fits, and the ratio likely / OLS.  The
  scatter is the robust sigma (1.4826 x median absolute deviation); the plain standard
  deviation is shown as well;
* the same for ramps split by a jump (rate DQ == JUMP_DET exactly), which the good-pixel
  rows leave out, separately for pixels where the simulator injected cosmic-ray charge
  and for pixels flagged without any (false positives of the jump step: noise
  excursions of a single read);
* a uniform-sky scan (``SimParams.sky_dn_s``): whole frames at one background level, so
  every regime from read-noise to photon-noise dominated has ~60 000 pixels;
* a controlled jump test on synthetic ramps (kernels only): one real, correctly
  flagged jump per pixel;
* the wall time of the ramp_fit step and of the whole run, per implementation;
* for context, the analytic standard deviation of jwst's OLS weighting relative to the
  optimal (generalised least squares) one on clean, unbroken ramps with the simulator's
  noise (``--theory``).

Needs streamdet and streamdet-likely installed
(``pip install -e ./plugins_contrib/streamdet-likely``).

    python benchmarks/likely_vs_ols.py          # the README tables (0.5-3 min on 2 cores)
    python benchmarks/likely_vs_ols.py --seeds 0 --ngroups 20 --no-sky     # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet.simulate import SUBARRAYS, SimParams, simulate
from streamdet.testing import run_chain

IMPLS = ("builtin", "likely")
LABEL = {"builtin": "OLS", "likely": "likely"}
#: true-rate bin edges, DN/s: for SUB256 (group time 0.3 s, gain 5.5 e/DN, CDS read noise
#: 6 DN) the photon variance of one group difference equals its read variance at ~660 DN/s;
#: below 50 DN/s it is < 8 % of it.
BINS = (("faint", 0.0, 50.0), ("medium", 50.0, 500.0), ("bright", 500.0, np.inf))
SKY_LEVELS = (2.0, 20.0, 200.0, 2000.0)


def robust_sigma(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


@dataclass
class Pool:
    """Relative errors gathered over runs, per implementation."""

    rel: dict = field(default_factory=lambda: {impl: [] for impl in IMPLS})

    def add(self, impl: str, values: np.ndarray) -> None:
        self.rel[impl].append(values)

    def stats(self):
        out = {}
        for impl in IMPLS:
            x = np.concatenate(self.rel[impl]) if self.rel[impl] else np.array([])
            out[impl] = (x.size, robust_sigma(x), float(np.std(x)) if x.size else float("nan"))
        return out


_WARMED = []


def run_pair(sim, workdir: Path, timings: dict) -> dict:
    """Run both implementations on one simulation; returns impl -> (sci, dq)."""
    if not _WARMED:  # imports and first-call costs stay out of the timings
        for impl in IMPLS:
            run_chain(sim.uncal, workdir / "warmup", sim=sim, use={"ramp_fit": impl})
        _WARMED.append(True)
    products = {}
    for impl in IMPLS:
        t0 = time.perf_counter()
        result = run_chain(sim.uncal, workdir / impl, sim=sim, use={"ramp_fit": impl})
        total = time.perf_counter() - t0
        timings.setdefault(impl, []).append((result.timings.get("ramp_fit", float("nan")), total))
        with fits.open(result.products["rate"]) as hdul:
            products[impl] = (hdul["SCI"].data.astype(np.float64), hdul["DQ"].data.copy())
    return products


def selections(products, truth):
    sci = {impl: products[impl][0] for impl in IMPLS}
    dq_b, dq_l = products["builtin"][1], products["likely"][1]
    finite = np.isfinite(sci["builtin"]) & np.isfinite(sci["likely"]) & (truth > 0)
    good = finite & (dq_b == 0) & (dq_l == 0)
    jumped = finite & (dq_b == 4) & (dq_l == 4)  # JUMP_DET and nothing else
    return sci, good, jumped


def injected_jumps(catalog_path, shape) -> np.ndarray:
    """Pixels where the simulator put cosmic-ray charge into groups the chain fits."""
    catalog = json.loads(Path(catalog_path).read_text())
    hit = np.zeros(shape, dtype=bool)
    for jump in catalog["jumps"]:
        if jump["usable"]:
            hit[jump["y"], jump["x"]] = True
    return hit


def jump_mc_row(ngroups, nints, true_rate, subarray, npix=40000, seed=4) -> str:
    """Both kernels on synthetic ramps with one correctly flagged jump each."""
    from streamdet.algorithms.ramp_fit import fit_ramps
    from streamdet_likely.kernel import fit_likely

    p = SimParams()
    dt = SUBARRAYS[subarray].fast_frame_time
    gain, rn = p.gain_e_per_dn, p.readnoise_cds_fast_dn
    rng = np.random.default_rng(seed)
    counts = rng.poisson(true_rate * dt * gain, (nints, ngroups, npix)) / gain
    ramps = np.cumsum(counts, axis=1) + rng.normal(0.0, rn / np.sqrt(2.0), counts.shape)
    ramps += 12000.0
    gdq = np.zeros(ramps.shape, np.uint8)
    gdq[:, 0] = gdq[:, -1] = 1
    gdq[1:, :3] = 1
    where = rng.integers(4, ngroups - 2, npix)
    later = np.arange(ngroups)[:, None] >= where[None, :]
    ramps[-1] += 300.0 * later
    gdq[-1][np.arange(ngroups)[:, None] == where[None, :]] = 4
    ramps = ramps.astype(np.float32)[:, :, None, :]
    gdq = gdq[:, :, None, :]
    kw = dict(readnoise=np.full((1, npix), rn, np.float32),
              gain=np.full((1, npix), gain, np.float32))
    pdq = np.zeros((1, npix), np.uint32)
    ols, _ = fit_ramps(ramps, gdq, pdq, frame_time=dt, group_time=dt, **kw)
    lik, _ = fit_likely(ramps, gdq, pdq, group_time=dt, **kw)
    err_o = ols.sci[0].astype(np.float64) - true_rate
    err_l = lik.sci[0].astype(np.float64) - true_rate
    return (f"| {ngroups} | {true_rate:g} | {err_o.std():.4f} | {err_l.std():.4f} | "
            f"**{err_l.std() / err_o.std():.3f}** | {np.std(err_o / ols.err[0]):.3f} | "
            f"{np.std(err_l / lik.err[0]):.3f} |")


def theory_table(ngroups_list, subarray="SUB256") -> list[str]:
    """Analytic sd of jwst's OLS weighting / optimal GLS on clean single-read ramps."""
    p = SimParams()
    dt = SUBARRAYS[subarray].fast_frame_time
    gain, rn = p.gain_e_per_dn, p.readnoise_cds_fast_dn
    read_var = rn * rn / 2.0
    rates = (2.0, 20.0, 50.0, 200.0, 660.0, 2000.0)
    lines = ["| groups fitted | " + " | ".join(f"{r:g} DN/s" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for n in ngroups_list:
        row = []
        for rate in rates:
            t = np.arange(n) * dt
            cov = rate * (np.minimum.outer(t, t)) / gain + read_var * np.eye(n)
            design = np.stack([np.ones(n), t], axis=1)
            v_opt = np.linalg.inv(design.T @ np.linalg.solve(cov, design))[1, 1]
            # jwst's ladder: exponent from the segment's signal-to-noise ratio
            rise = rate * dt * (n - 1)
            rn_e = rn * gain / np.sqrt(2.0)
            snr = rise * gain / np.sqrt(rn_e ** 2 + rise * gain)
            power = (0.0, 0.4, 1.0, 3.0, 6.0, 10.0)[sum(snr >= e for e in (5, 10, 20, 50, 100))]
            idx = np.arange(n, dtype=float)
            mid = (n - 1) / 2.0
            w = np.abs((idx - mid) / mid) ** power
            sw, sx, sxx = w.sum(), (idx * w).sum(), (idx * idx * w).sum()
            coeff = w * (sw * idx - sx) / (sw * sxx - sx * sx) / dt
            v_ols = coeff @ cov @ coeff
            row.append(f"{np.sqrt(v_opt / v_ols):.3f}")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return lines


def fmt_rows(name: str, edges: str, st: dict) -> str:
    nb, rb, sb = st["builtin"]
    nl, rl, sl = st["likely"]
    ratio_r = rl / rb if rb else float("nan")
    ratio_s = sl / sb if sb else float("nan")
    return (f"| {name} | {edges} | {nb} | {rb:.5f} | {rl:.5f} | **{ratio_r:.3f}** | "
            f"{sb:.5f} | {sl:.5f} | {ratio_s:.3f} |")


HEADER = ("| pixels | true rate (DN/s) | N | OLS robust σ | likely robust σ | likely/OLS | "
          "OLS std | likely std | likely/OLS (std) |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subarray", default="SUB256")
    ap.add_argument("--ngroups", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--nints", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sky", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the uniform-sky scan (seed 0, each ngroups)")
    ap.add_argument("--jump-mc", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the controlled jump test on synthetic ramps")
    ap.add_argument("--theory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep simulations and products here (default: a temporary directory)")
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="likely-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    out: list[str] = []
    try:
        # -- default scene -------------------------------------------------------------
        rows = [(name, lo, hi) for name, lo, hi in BINS] + [("jump", None, None),
                                                              ("false jump", None, None)]
        pools = {(ngroups, row[0]): Pool() for ngroups in args.ngroups for row in rows}
        for ngroups in args.ngroups:
            for seed in args.seeds:
                tag = f"{args.subarray}_g{ngroups}_i{args.nints}_s{seed}"
                print(f"simulating {tag} ...", file=sys.stderr, flush=True)
                sim = simulate(workdir / tag / "sim", subarray=args.subarray, ngroups=ngroups,
                               nints=args.nints, seed=seed, overwrite=True)
                truth = fits.getdata(sim.truth_rate).astype(np.float64)
                injected = injected_jumps(sim.truth_catalog, truth.shape)
                products = run_pair(sim, workdir / tag, timings)
                sci, good, jumped = selections(products, truth)
                picks = {name: good & (truth >= lo) & (truth < hi) for name, lo, hi in BINS}
                picks["jump"] = jumped & injected
                picks["false jump"] = jumped & ~injected
                for name, sel in picks.items():
                    for impl in IMPLS:
                        pools[(ngroups, name)].add(impl, ((sci[impl] - truth) / truth)[sel])
        out.append(f"Default scene (`SimParams()`: sky 20 DN/s plus point sources), "
                   f"{args.subarray} x {args.nints} integrations, seeds "
                   f"{', '.join(map(str, args.seeds))}; scatter of (rate - truth) / truth:\n")
        out.append(HEADER)
        for ngroups in args.ngroups:
            for name, lo, hi in BINS:
                edges = f"[{lo:g}, {hi:g})" if np.isfinite(hi) else f">= {lo:g}"
                out.append(fmt_rows(f"{ngroups} groups, good, {name}", edges,
                                    pools[(ngroups, name)].stats()))
            out.append(fmt_rows(f"{ngroups} groups, JUMP_DET, injected jump", "all",
                                pools[(ngroups, "jump")].stats()))
            out.append(fmt_rows(f"{ngroups} groups, JUMP_DET, no injected charge", "all",
                                pools[(ngroups, "false jump")].stats()))

        # -- uniform-sky scan ----------------------------------------------------------
        if args.sky:
            out.append(f"\nUniform-sky scan (`SimParams(sky_dn_s=...)`), {args.subarray} x "
                       f"{args.nints} integrations, seed {args.seeds[0]}; good pixels within "
                       "10 % of the sky level:\n")
            out.append(HEADER)
            for ngroups in args.ngroups:
                for sky in SKY_LEVELS:
                    pool = Pool()
                    tag = f"sky{sky:g}_g{ngroups}"
                    print(f"simulating {tag} ...", file=sys.stderr, flush=True)
                    sim = simulate(workdir / tag / "sim", subarray=args.subarray,
                                   ngroups=ngroups, nints=args.nints, seed=args.seeds[0],
                                   params=SimParams(sky_dn_s=sky), overwrite=True)
                    truth = fits.getdata(sim.truth_rate).astype(np.float64)
                    products = run_pair(sim, workdir / tag, timings)
                    sci, good, _ = selections(products, truth)
                    sel = good & (np.abs(truth - sky) < 0.1 * sky)
                    for impl in IMPLS:
                        pool.add(impl, ((sci[impl] - truth) / truth)[sel])
                    out.append(fmt_rows(f"{ngroups} groups, sky {sky:g}", f"~{sky:g}",
                                        pool.stats()))

        # -- controlled jumps ------------------------------------------------------------
        if args.jump_mc:
            out.append("\nControlled jump test (kernels only, no files): synthetic ramps with "
                       "the simulator's noise (Poisson charge, CDS read noise 6 DN, gain 5.5, "
                       f"{args.subarray} group time), {args.nints} integrations, groups "
                       "flagged as the MIRI chain does (first group, 3 RSCD groups in later "
                       "integrations, last group), and one 300 DN jump at a random group of the "
                       "last integration, correctly flagged JUMP_DET; 40 000 ramps per row:\n")
            out.append("| groups | true rate (DN/s) | OLS std | likely std | likely/OLS | "
                       "OLS pull sd | likely pull sd |\n|---|---|---|---|---|---|---|")
            for ngroups in args.ngroups:
                for true_rate in (20.0, 200.0, 2000.0):
                    out.append(jump_mc_row(ngroups, args.nints, true_rate, args.subarray))

        # -- timing ----------------------------------------------------------------------
        out.append(f"\nTiming (median over {len(timings['builtin'])} runs of "
                   f"{args.subarray} x {args.nints} integrations, NGROUPS "
                   f"{', '.join(map(str, args.ngroups))}; this machine):\n")
        out.append("| implementation | ramp_fit step (s) | whole run (s) |\n|---|---|---|")
        for impl in IMPLS:
            fit_s = statistics.median(t[0] for t in timings[impl])
            run_s = statistics.median(t[1] for t in timings[impl])
            out.append(f"| {LABEL[impl]} | {fit_s:.3f} | {run_s:.3f} |")

        if args.theory:
            out.append(f"\nAnalytic sd(optimal) / sd(jwst OLS weighting) on clean single-read "
                       f"ramps with the simulator's {args.subarray} noise (1.000 = no gain "
                       "possible):\n")
            out.extend(theory_table(sorted(set(args.ngroups) | {10})))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
