"""The exposure model: the detector cut to the subarray, the scene, cosmic rays, showers
and snowballs, amplifier drift and EMI, and the raw ramps they make -- one object holding
everything the ramps and the reference files share."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from streamdet.core.dqflags import PIXEL

from .detector import make_detector
from .params import SimParams
from .readout import EMI_PIXEL_CLOCK_S, Subarray, emi_read_clocks
from .scene import make_scene

_RNG_STREAMS = ("detector", "scene", "cosmic", "ramps")


def _rng_streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams, each a fixed child of the seed."""
    names = _RNG_STREAMS
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.Generator(np.random.PCG64(c)) for n, c in zip(names, children)}


def _rscd_effective_skip(ngroups: int, nints: int, skip1: int, skip2p: int) -> tuple[int, int]:
    """Groups jwst 3.0's rscd step actually flags (int 1, ints >= 2), given the table values."""
    if ngroups < 3:
        return 0, 0
    if ngroups <= 5:
        skip1 = skip2p = 1
    if ngroups < skip1 + 3:
        skip1 = max(0, ngroups - 3)
    if nints > 1 and ngroups < skip2p + 3:
        skip2p = max(0, ngroups - 3)
    return skip1, skip2p


def _horner(coeffs: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    out = np.array(coeffs[-1], dtype=np.float64, copy=True)
    for c in coeffs[-2::-1]:
        out *= x
        out += c
    return out


def _newton_cubic(x, y, c2, c3, c2x2, c3x3, t, fp, max_iter=8, tol=0.01) -> None:
    """Solve x (1 + x (c2 + c3 x)) = y for x, in place (float32 buffers ``t`` and ``fp``).

    On return ``fp`` holds dL/dx at the last iterate, which the caller uses to warm-start
    the next group. ``tol`` is in DN (float32 resolves ~0.004 DN at 60 kDN).
    """
    for _ in range(max_iter):
        np.multiply(c3, x, out=t)
        t += c2
        t *= x
        t += 1.0
        t *= x
        t -= y  # L(x) - y
        np.multiply(c3x3, x, out=fp)
        fp += c2x2
        fp *= x
        fp += 1.0  # L'(x)
        t /= fp
        x -= t
        if max(float(t.max()), -float(t.min())) < tol:
            break



class ExposureModel:
    """One exposure's detector (cut to the subarray), scene, truth, cosmic rays, drift and
    EMI, from which both the raw ramps and the reference files are written."""

    def __init__(self, p: SimParams, sub: Subarray, ngroups: int, nints: int, readpatt: str,
                 seed: int):
        self.p, self.sub, self.ngroups, self.nints, self.readpatt = p, sub, ngroups, nints, readpatt
        self.tframe = sub.frame_time(readpatt)
        self.tgroup = self.tframe  # NFRAMES = 1, GROUPGAP = 0
        self.t = (np.arange(ngroups) + 1.0) * self.tgroup  # time of each read since reset
        self.rngs = _rng_streams(seed)
        self.seed = seed
        self.det = make_detector(p, self.rngs["detector"])
        ys, xs = sub.full_frame_slices
        self.ys, self.xs = ys, xs
        det = self.det
        cut = lambda a: np.ascontiguousarray(a[ys, xs])  # noqa: E731
        self.ped = cut(det.pedestal)
        self.gain = cut(det.gain)
        self.rn = cut(det.rn_slow if readpatt == "SLOWR1" else det.rn_fast)
        self.sat = cut(det.sat)
        self.sat_ref = np.where(cut(det.no_sat), np.nan, self.sat).astype(np.float32)
        no_lin = cut(det.no_lin)
        self.no_lin = no_lin
        self.c2 = np.where(no_lin, 0.0, cut(det.c2))
        self.c3 = np.where(no_lin, 0.0, cut(det.c3))
        self.dark_rate = cut(det.dark_rate)
        self.dark_amp = cut(det.dark_amp)
        self.reset_amp = cut(det.reset_amp)
        self.rscd_amp = cut(det.rscd_amp)
        self.refcol = det.refcol[xs]
        self.mask_bits = cut(det.mask_bits)
        self.telegraph = cut(det.telegraph)
        self.qe = cut(det.qe)
        self.extra_rate = cut(det.extra_rate)
        self.unreliable_dark = cut(det.unreliable_dark)
        self.shape = sub.shape

        # Float32 coefficient planes exactly as they go into the LINEARITY file: the ramps
        # invert L(x) = x + c2 x^2 + c3 x^3 with these numbers (identity where no_lin).
        self.c2_32 = self.c2.astype(np.float32)
        self.c3_32 = self.c3.astype(np.float32)
        self.lin_coeffs = [np.zeros(self.shape), np.ones(self.shape),
                           self.c2_32.astype(np.float64), self.c3_32.astype(np.float64)]
        # Raw DN where the pixel stops responding, and its linearized value.
        self.full_well = np.where(np.isnan(self.sat_ref), 65535.0 - 1000.0,
                                  self.sat + p.full_well_margin_dn)
        self.full_well_lin = _horner(self.lin_coeffs, self.full_well)

        t_ramp = float(self.t[-1])
        self.scene, self.sources = make_scene(p, sub, det, t_ramp, self.rngs["scene"])
        # The truth: the slope of the linearized, dark-subtracted ramp.
        self.truth = self.scene * self.qe + self.extra_rate
        self.truth[:, self.refcol] = 0.0
        # Charge rate (electrons/s): signal + dark current.
        self.e_rate = (self.truth + self.dark_rate) * self.gain
        # Noise of one group difference as jwst's jump step estimates it (DN).
        self.diff_sigma = np.sqrt(self.rn**2 + (self.truth + self.dark_rate) * self.tgroup / self.gain)

        self.skip1, self.skip2p = _rscd_effective_skip(ngroups, nints, p.rscd_skip_int1,
                                                       p.rscd_skip_int2p)
        self.ndark = 2 if nints >= 2 else 1
        self.nreset = 2 if nints >= 2 else 1
        self.reset_ngroups = max(1, min(ngroups, int(p.reset_ngroups)))
        self.is_full = sub.name == "FULL"
        self._make_drift()
        self._make_cosmic_rays()
        self._make_emi()

    # --- deterministic reference planes (used by the refs AND the ramps) --------------
    def dark_anomaly_scale(self, i_dark: int, g: int) -> float:
        """Dark anomaly of group ``g`` (DN) for a pixel of relative amplitude 1."""
        p = self.p
        amp = p.dark_anomaly_dn * (1.0 if i_dark == 0 else p.dark_anomaly_int2_factor)
        return amp * (1.0 - math.exp(-(g + 1) / p.dark_anomaly_tau_groups))

    def dark_plane(self, i_dark: int, g: int) -> np.ndarray:
        """DARK reference plane (float32): mean dark charge + dark anomaly."""
        f32 = np.float32
        plane = self.dark_rate.astype(f32) * f32(self.t[g])
        plane += self.dark_amp.astype(f32) * f32(self.dark_anomaly_scale(i_dark, g))
        return plane

    def reset_scale(self, i_reset: int, g: int) -> float:
        """Reset transient of group ``g`` (raw DN) for a pixel of relative amplitude 1."""
        p = self.p
        amp = p.reset_anomaly_dn * (1.0 if i_reset == 0 else p.reset_int2_factor)
        return amp * math.exp(-g / p.reset_tau_groups)

    def reset_plane(self, i_reset: int, g: int) -> np.ndarray:
        """RESET reference plane (float32, raw DN); the ramps add exactly these numbers."""
        return self.reset_amp.astype(np.float32) * np.float32(self.reset_scale(i_reset, g))

    # --- amplifier drift (FULL only) -------------------------------------------------
    def _make_drift(self):
        rng = self.rngs["cosmic"]  # drawn before the cosmic rays, fixed order
        self.drift = None
        if not self.is_full or self.p.amplifier_drift_step_dn <= 0:
            return
        steps = rng.normal(0.0, self.p.amplifier_drift_step_dn, (self.nints, self.ngroups, 2, 4))
        offsets = rng.normal(0.0, 3 * self.p.amplifier_drift_step_dn, (self.nints, 1, 2, 4))
        self.drift = np.cumsum(steps, axis=1) + offsets  # [int, group, row parity, amp]
        # Index of each pixel into the 8 (row parity, amplifier) values of a group.
        rows = np.arange(self.shape[0]) % 2
        cols = np.arange(self.shape[1]) % 4
        self._drift_index = (rows[:, None] * 4 + cols[None, :]).astype(np.intp)

    def drift_plane(self, i: int, g: int) -> np.ndarray | float:
        """Amplifier drift added to group ``g`` of integration ``i`` (DN); 0 off FULL."""
        if self.drift is None:
            return 0.0
        return np.take(self.drift[i, g].reshape(8).astype(np.float32), self._drift_index)

    # --- electromagnetic interference ----------------------------------------------------
    def _make_emi(self):
        """EMI terms (frequency Hz, amplitude DN, phase rad) and the read clocks they need."""
        p = self.p
        self.emi_terms = [
            (float(f), float(a), float(p.emi_phases_rad[k]) if k < len(p.emi_phases_rad) else 0.0)
            for k, (f, a) in enumerate(zip(p.emi_frequencies_hz, p.emi_amplitudes_dn))]
        self.emi_clocks = None
        if self.emi_terms:
            self.emi_clocks = emi_read_clocks(self.sub.name, self.readpatt, self.ngroups)

    def emi_plane(self, i: int, g: int) -> np.ndarray:
        """EMI (raw DN, float64) added to every read of group ``g`` of integration ``i``."""
        spatial, frame, integration = self.emi_clocks
        offset = i * integration + g * frame  # clocks from the first read to this frame
        out = np.zeros(self.shape)
        for freq, amp, phase in self.emi_terms:
            cycles_per_clock = freq * EMI_PIXEL_CLOCK_S
            # whole cycles of the frame offset dropped first, so the phase keeps its digits
            base = math.fmod(offset * cycles_per_clock, 1.0)
            out += amp * np.sin(2.0 * math.pi * (spatial * cycles_per_clock + base) + phase)
        return out

    # --- cosmic rays ---------------------------------------------------------------------
    def _make_cosmic_rays(self):
        p, rng = self.p, self.rngs["cosmic"]
        ny, nx = self.shape
        light_cols = np.flatnonzero(~self.refcol)
        n_light = ny * light_cols.size
        area_cm2 = (p.pixel_pitch_um * 1e-4) ** 2
        t_int = float(self.t[-1])
        lo, hi = p.cosmic_ray_sigma_range
        self.cr_events: list[list[tuple[int, int, int, float, bool, int]]] = []
        self.jumps: list[dict] = []
        if self.ngroups < 2:
            self.cr_events = [[] for _ in range(self.nints)]
            return
        for i in range(self.nints):
            n = int(rng.poisson(p.cosmic_ray_rate_cm2_s * area_cm2 * n_light * t_int))
            n = max(n, int(p.min_cosmic_rays_per_int))
            ys = rng.integers(0, ny, n)
            xs = light_cols[rng.integers(0, light_cols.size, n)]
            gs = rng.integers(1, self.ngroups, n)
            levels = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
            events = []
            for y, x, g, lev in zip(ys.tolist(), xs.tolist(), gs.tolist(), levels.tolist()):
                amp = lev * float(self.diff_sigma[y, x])
                parent = len(self.jumps)
                self._add_jump(events, i, g, y, x, amp, True, parent)
                if p.cosmic_ray_neighbor_fraction > 0:
                    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < ny and 0 <= xx < nx and not self.refcol[xx]:
                            self._add_jump(events, i, g, yy, xx,
                                           amp * p.cosmic_ray_neighbor_fraction, False, parent)
            if p.has_large_events:
                self._add_large_events(events, i)
            events.sort(key=lambda e: e[0])
            self.cr_events.append(events)

    def _add_large_events(self, events, i):
        """Showers and snowballs of integration ``i``, from their own random stream (so
        the other effects stay as they are), listed in ``self.large_events``; their
        pixel deposits join the integration's events without a catalogue entry."""
        p = self.p
        if not hasattr(self, "large_rng"):
            self.large_rng = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence(self.seed).spawn(len(_RNG_STREAMS) + 1)[-1]))
            self.large_events = []
        rng = self.large_rng
        ny, nx = self.shape
        linear_range = np.maximum(np.nan_to_num(self.sat_ref, nan=60000.0) - self.ped, 1000.0)

        def deposit(kind, g, yc, xc, radius, amplitude_of):
            y0, y1 = max(0, int(math.floor(yc - radius))), min(ny, int(math.ceil(yc + radius)) + 1)
            x0, x1 = max(0, int(math.floor(xc - radius))), min(nx, int(math.ceil(xc + radius)) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r = np.hypot(yy - yc, xx - xc)
            inside = (r <= radius) & ~self.refcol[xx]
            for y, x, rr in zip(yy[inside].tolist(), xx[inside].tolist(), r[inside].tolist()):
                events.append((g, y, x, float(amplitude_of(y, x, rr)), False, -1))
            self.large_events.append({"kind": kind, "int": i, "group": g, "y": round(yc, 2),
                                      "x": round(xc, 2), "radius": round(radius, 2),
                                      "pixels": int(inside.sum())})

        for _ in range(int(rng.poisson(p.showers_per_int))):
            g = int(rng.integers(1, self.ngroups))
            yc, xc = rng.uniform(0, ny), rng.uniform(0, nx)
            radius = rng.uniform(*p.shower_radius_px)
            level = rng.uniform(*p.shower_sigma_range)
            deposit("shower", g, yc, xc, radius,
                    lambda y, x, r, R=radius, lev=level:
                    lev * (1 - 0.5 * (r / R) ** 2) * float(self.diff_sigma[y, x]))
        for _ in range(int(rng.poisson(p.snowballs_per_int))):
            g = int(rng.integers(1, self.ngroups))
            yc, xc = rng.uniform(0, ny), rng.uniform(0, nx)
            core = rng.uniform(*p.snowball_core_radius_px)
            halo = core * p.snowball_halo_radii
            core_charge = p.snowball_core_fill
            deposit("snowball", g, yc, xc, halo,
                    lambda y, x, r, c=core:
                    float(linear_range[y, x]) * core_charge
                    * (1.0 if r <= c else p.snowball_halo_fraction))

    def _add_jump(self, events, i, g, y, x, amp, primary, parent):
        idx = len(self.jumps)
        last_usable = self.ngroups - 2 if self.ngroups > 2 else self.ngroups - 1
        first_usable = self.skip1 if i == 0 else self.skip2p
        self.jumps.append({
            "id": idx, "int": i, "group": g, "y": y, "x": x,
            "amplitude_dn": round(amp, 3),
            "sigma": round(amp / float(self.diff_sigma[y, x]), 3),
            "primary": primary, "parent": parent,
            # Both groups of the difference g-1 -> g are used by the default MIRI chain
            # (not flagged by rscd or lastframe); saturation and bad pixels are separate.
            "usable": bool(g - 1 >= first_usable and g <= last_usable),
            "bad_pixel": bool(self.mask_bits[y, x] & PIXEL["DO_NOT_USE"]),
            "saturated": False, "saturated_3x3": False,
        })
        events.append((g, y, x, amp, primary, idx))

    # --- the ramps ------------------------------------------------------------------------
    def ramp_planes(self, first_sat: np.ndarray) -> Iterator[np.ndarray]:
        """Yield the raw uint16 planes in file order (integration by integration, group by
        group). ``first_sat[i]`` (int16, -1 = never) is filled with the first group whose raw
        value reaches the SATURATION threshold.

        Works on float32 planes with preallocated buffers (float32 resolution, ~0.004 DN
        at 60 kDN, is far below the 0.29 DN rms of the final rounding to integers).
        """
        p = self.p
        ny, nx = self.shape
        f32 = np.float32
        children = np.random.SeedSequence(
            int(self.rngs["ramps"].integers(0, 2**63 - 1))).spawn(self.nints)
        lam = self.e_rate * self.tgroup  # electrons per group
        lo_idx = np.flatnonzero(lam.ravel() < 30.0)  # exact Poisson where the Gaussian is poor
        lam_lo = lam.ravel()[lo_idx]
        sq_lam = np.sqrt(lam).astype(f32)
        lam32 = lam.astype(f32)
        inv_gain = (1.0 / self.gain).astype(f32)
        ped = self.ped.astype(f32)
        dark_amp = self.dark_amp.astype(f32)
        rscd_amp = self.rscd_amp.astype(f32)
        reset_amp = self.reset_amp.astype(f32)
        read_sigma = (self.rn / math.sqrt(2.0)).astype(f32)
        c2, c3 = self.c2_32, self.c3_32
        c2x2, c3x3 = (2 * c2).astype(f32), (3 * c3).astype(f32)
        fw = self.full_well.astype(f32)
        fw_lin = self.full_well_lin.astype(f32)
        sat_thr = np.where(np.isnan(self.sat_ref), np.inf, self.sat_ref).astype(f32)
        tel_idx = np.flatnonzero(self.telegraph.ravel())
        last_offset = f32(p.last_frame_offset_dn) if self.ngroups > 2 else f32(0.0)

        charge = np.empty((ny, nx), f32)  # accumulated charge, DN
        lin = np.empty((ny, nx), f32)
        lin_prev = np.empty((ny, nx), f32)
        x = np.empty((ny, nx), f32)  # raw solution (warm start for the next group)
        fp = np.empty((ny, nx), f32)  # dL/dx at x
        tmp = np.empty((ny, nx), f32)
        rawf = np.empty((ny, nx), f32)
        satb = np.empty((ny, nx), bool)

        for i in range(self.nints):
            rng = np.random.Generator(np.random.PCG64(children[i]))
            i_dark = min(i, self.ndark - 1)
            i_reset = min(i, self.nreset - 1)
            charge.fill(0.0)
            tel_state = rng.integers(0, 2, tel_idx.size).astype(f32)
            ev = self.cr_events[i]
            ev_g = np.array([e[0] for e in ev], dtype=np.int64)
            ev_y = np.array([e[1] for e in ev], dtype=np.intp)
            ev_x = np.array([e[2] for e in ev], dtype=np.intp)
            ev_a = np.array([e[3] for e in ev], dtype=f32)
            ev_id = [e[5] for e in ev]
            bounds = np.searchsorted(ev_g, np.arange(self.ngroups + 1))
            fs = first_sat[i]
            for g in range(self.ngroups):
                # Photo + dark charge of this group (Poisson), in DN.
                inc = rng.standard_normal((ny, nx), dtype=f32)
                inc *= sq_lam
                inc += lam32
                if lo_idx.size:
                    inc.reshape(-1)[lo_idx] = rng.poisson(lam_lo)
                inc *= inv_gain
                charge += inc
                b0, b1 = bounds[g], bounds[g + 1]
                if b1 > b0:  # cosmic rays: charge from this group on
                    np.add.at(charge, (ev_y[b0:b1], ev_x[b0:b1]), ev_a[b0:b1])
                # Linearized signal.
                np.add(charge, ped, out=lin)
                np.multiply(dark_amp, f32(self.dark_anomaly_scale(i_dark, g)), out=tmp)
                lin += tmp
                if i >= 1 and g < self.skip2p:
                    np.multiply(rscd_amp, f32(p.rscd_anomaly_dn * math.exp(-g / p.rscd_tau_groups)), out=tmp)
                    lin += tmp
                if g == self.ngroups - 1 and last_offset:
                    lin += last_offset
                if self.drift is not None:
                    lin += self.drift_plane(i, g)
                noise = rng.standard_normal((ny, nx), dtype=f32)
                noise *= read_sigma
                lin += noise
                if tel_idx.size:
                    flips = rng.random(tel_idx.size) < p.telegraph_switch_prob
                    tel_state[flips] = 1.0 - tel_state[flips]
                    lin.reshape(-1)[tel_idx] += f32(p.telegraph_amplitude_dn) * tel_state
                np.minimum(lin, fw_lin, out=lin)
                # Raw = L^-1(lin): Newton, warm-started from the previous group.
                if g == 0:
                    np.copyto(x, lin)
                else:
                    np.subtract(lin, lin_prev, out=tmp)
                    tmp /= fp
                    x += tmp
                _newton_cubic(x, lin, c2, c3, c2x2, c3x3, tmp, fp)
                np.copyto(lin_prev, lin)
                np.minimum(x, fw, out=rawf)
                if g < self.reset_ngroups:
                    np.multiply(reset_amp, f32(self.reset_scale(i_reset, g)), out=tmp)
                    rawf += tmp
                if self.emi_terms:  # electronic pickup: on the raw reads, after the full well
                    rawf += self.emi_plane(i, g).astype(f32)
                np.rint(rawf, out=rawf)
                np.clip(rawf, 0.0, 65535.0, out=rawf)
                np.greater_equal(rawf, sat_thr, out=satb)
                fs[satb & (fs < 0)] = g
                for k in range(b0, b1):
                    if ev_id[k] < 0:  # a pixel of a shower or snowball
                        continue
                    y, xx = int(ev_y[k]), int(ev_x[k])
                    j = self.jumps[ev_id[k]]
                    j["saturated"] = bool(satb[y, xx])
                    j["saturated_3x3"] = bool(satb[max(0, y - 1):y + 2, max(0, xx - 1):xx + 2].any())
                yield rawf.astype(np.uint16)
