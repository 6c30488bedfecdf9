"""The truth: the true count rate per pixel and a JSON catalogue of what was injected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet.core import dqflags
from streamdet.core.dqflags import PIXEL

from .model import ExposureModel
from .params import SimParams
from .readout import EMI_PIXEL_CLOCK_S


def _json_lines(obj: dict) -> str:
    """JSON with one list item per line (readable, and fast: the C encoder does the items)."""
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            body = ",\n  ".join(json.dumps(item) for item in v)
            parts.append(f"{json.dumps(k)}: [\n  {body}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def write_truth(m: ExposureModel, p: SimParams, truthdir: Path, name: str, first_sat: np.ndarray,
                 meta: dict) -> tuple[Path, Path]:
    rate_path = truthdir / f"{name}_truth_rate.fits"
    h = fits.Header()
    h["BUNIT"] = ("DN/s", "linearized DN per second, dark subtracted")
    h["SUBARRAY"] = m.sub.name
    h["SUBSTRT1"] = m.sub.xstart
    h["SUBSTRT2"] = m.sub.ystart
    h["SEED"] = meta["seed"]
    h["COMMENT"] = "True count rate: the slope a perfect Detector1 chain recovers per pixel."
    fits.PrimaryHDU(data=m.truth.astype(np.float32), header=h).writeto(rate_path)

    sat_pix = np.flatnonzero(np.any(first_sat >= 0, axis=0).ravel())
    ny, nx = m.shape
    saturated = []
    for k in sat_pix.tolist():
        y, x = divmod(k, nx)
        fsg = [int(v) if v >= 0 else None for v in first_sat[:, y, x].tolist()]
        saturated.append({"y": y, "x": x, "first_saturated_group": fsg})
    bad = []
    flagged = np.flatnonzero((m.mask_bits & ~np.uint32(PIXEL["REFERENCE_PIXEL"])).ravel()
                             | m.no_lin.ravel() | np.isnan(m.sat_ref).ravel()
                             | m.unreliable_dark.ravel())
    for k in flagged.tolist():
        y, x = divmod(k, nx)
        flags = int(m.mask_bits[y, x]) & ~PIXEL["REFERENCE_PIXEL"]
        extra = 0
        if m.no_lin[y, x]:
            extra |= PIXEL["NO_LIN_CORR"]
        if np.isnan(m.sat_ref[y, x]):
            extra |= PIXEL["NO_SAT_CHECK"]
        if m.unreliable_dark[y, x]:
            extra |= PIXEL["UNRELIABLE_DARK"]
        bad.append({"y": y, "x": x, "flags": flags | extra, "names": dqflags.names_of(flags | extra),
                    "mask_flags": flags,
                    "extra_rate_dn_s": round(float(m.extra_rate[y, x]), 4)})
    catalog = {
        "description": "Effects injected by streamdet.simulate. Pixel coordinates (y, x) are "
                       "0-based in the subarray; add SUBSTRT-1 for full-frame positions. "
                       "Jump 'group' is the first group containing the charge (the jump is in "
                       "the difference group-1 -> group); 'sigma' is the amplitude over the "
                       "noise of one group difference; 'usable' says both groups are fitted by "
                       "the default MIRI chain (not flagged by rscd/lastframe); 'saturated' / "
                       "'saturated_3x3' say the pixel / its 3x3 neighbourhood (which jwst's "
                       "saturation step also flags) had reached the SATURATION threshold at that "
                       "group; 'primary' false marks charge shared with a neighbour of hit "
                       "'parent'. 'saturated' lists each pixel's first saturated group per "
                       "integration (null: never).",
        **meta,
        "frame_time_s": m.tframe,
        "group_time_s": m.tgroup,
        "rscd_flagged_groups": {"int1": m.skip1, "int2+": m.skip2p},
        "reference_columns": np.flatnonzero(m.refcol).tolist(),
        "params": p.to_dict(),
        "sources": m.sources,
        "jumps": m.jumps,
        **({"large_events": getattr(m, "large_events", [])} if p.has_large_events else {}),
        "saturated": saturated,
        "bad_pixels": bad,
    }
    if m.emi_terms:
        spatial, frame, integration = m.emi_clocks
        catalog["emi"] = {
            "description": "Sinusoidal EMI added to every raw read: amplitude_dn * sin(2 pi "
                           "frequency_hz * t + phase_rad), t = clocks * clock_s counted from the "
                           "first read of the exposure; a pixel (y, x) of group g of integration "
                           "i is read at clocks = i * integration_clocks + g * frame_clocks + "
                           "y * row_clocks + (x // 4) * nsamples.",
            "clock_s": EMI_PIXEL_CLOCK_S,
            "row_clocks": int(spatial[1, 0]) if spatial.shape[0] > 1 else None,
            "nsamples": int(spatial[0, 4]) if spatial.shape[1] > 4 else 1,
            "frame_clocks": int(frame),
            "integration_clocks": int(integration),
            "components": [{"frequency_hz": f, "amplitude_dn": a, "phase_rad": ph}
                           for f, a, ph in m.emi_terms],
        }
    cat_path = truthdir / f"{name}_truth_catalog.json"
    cat_path.write_text(_json_lines(catalog))
    return rate_path, cat_path
