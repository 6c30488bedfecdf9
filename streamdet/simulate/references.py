"""Writing the reference files (mask, saturation, linearity, gain, readnoise, rscd, dark,
reset) that describe exactly the detector of the simulated exposure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet.core.dqflags import PIXEL

from .fitsio import append_hdus, float_to_fits, image_header, stream_image
from .model import ExposureModel
from .params import SimParams
from .readout import SUBARRAYS

#: The MASK reference numbers its bits its own way and explains them in DQ_DEF, as the
#: CRDS MIRI masks do; jwst (and streamdet) translate them to the JWST values of
#: :mod:`streamdet.core.dqflags`.
#: (bit in the file, JWST flag name, description)
MASK_DQ_DEF = (
    (0, "DO_NOT_USE", "Bad pixel, do not use"),
    (1, "DEAD", "Dead pixel: no photo-response"),
    (2, "HOT", "Hot pixel: dark current far above the median"),
    (3, "WARM", "Warm pixel: dark current above the median"),
    (4, "LOW_QE", "Low quantum efficiency"),
    (5, "OTHER_BAD_PIXEL", "Random telegraph noise"),
    (6, "REFERENCE_PIXEL", "Reference pixel (no light)"),
)


def _dq_def_hdu(rows) -> fits.BinTableHDU:
    """DQ_DEF table from (bit, name, description) rows."""
    bits = np.array([r[0] for r in rows], dtype=np.int32)
    return fits.BinTableHDU.from_columns(
        [
            fits.Column("BIT", "J", array=bits),
            fits.Column("VALUE", "J", bzero=2**31, array=(np.uint32(1) << bits.astype(np.uint32))),
            fits.Column("NAME", "40A", array=np.array([r[1] for r in rows])),
            fits.Column("DESCRIPTION", "80A", array=np.array([r[2] for r in rows])),
        ],
        name="DQ_DEF",
    )


def _standard_dq_def(names: list[str]) -> fits.BinTableHDU:
    rows = []
    for n in names:
        bit = int(PIXEL[n]).bit_length() - 1
        rows.append((bit, n, n.replace("_", " ").capitalize()))
    return _dq_def_hdu(rows)


def _ref_primary(m: ExposureModel, p: SimParams, reftype: str, datamodel: str, filename: str,
                 descrip: str, fullframe: bool, extra: dict | None = None) -> fits.PrimaryHDU:
    h = fits.Header()
    h["DATE"] = (f"{p.date_obs}T{p.time_obs}", "= obs. start, for reproducibility")
    h["FILENAME"] = filename
    h["DATAMODL"] = datamodel
    h["TELESCOP"] = "JWST"
    h["INSTRUME"] = "MIRI"
    h["DETECTOR"] = "MIRIMAGE"
    h["REFTYPE"] = reftype.upper()
    h["PEDIGREE"] = "SIMULATION"
    h["DESCRIP"] = descrip
    h["AUTHOR"] = "streamdet.simulate"
    h["USEAFTER"] = "2000-01-01T00:00:00"
    sub = SUBARRAYS["FULL"] if fullframe else m.sub
    # Full-frame references serve every subarray (the steps cut them by SUBSTRT/SUBSIZE).
    h["SUBARRAY"] = "GENERIC" if fullframe else sub.name
    h["SUBSTRT1"] = sub.xstart
    h["SUBSTRT2"] = sub.ystart
    h["SUBSIZE1"] = sub.xsize
    h["SUBSIZE2"] = sub.ysize
    h["FASTAXIS"] = 1
    h["SLOWAXIS"] = 2
    for k, v in (extra or {}).items():
        h[k] = v
    h["HISTORY"] = "Simulated reference file written by streamdet.simulate; it describes "
    h["HISTORY"] = "exactly the detector that produced the matching simulated exposure."
    return fits.PrimaryHDU(header=h)


def _image_hdu(data: np.ndarray, name: str, bunit: str | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(data=data, name=name)
    if bunit:
        hdu.header["BUNIT"] = bunit
    return hdu


def write_references(m: ExposureModel, p: SimParams, refdir: Path, serial: str) -> dict[str, Path]:
    det = m.det
    ff = p.fullframe_refs
    ys, xs = (slice(None), slice(None)) if ff else m.sub.full_frame_slices
    out: dict[str, Path] = {}

    def path_for(reftype):
        pth = refdir / f"jwst_miri_{reftype}_{serial}.fits"
        out[reftype] = pth
        return pth

    # MASK: compressed bits + DQ_DEF.
    jwst_bits = det.mask_bits[ys, xs]
    compressed = np.zeros(jwst_bits.shape, dtype=np.uint32)
    for bit, nm, _ in MASK_DQ_DEF:
        compressed[(jwst_bits & np.uint32(PIXEL[nm])) != 0] |= np.uint32(1 << bit)
    pth = path_for("mask")
    fits.HDUList([
        _ref_primary(m, p, "mask", "MaskModel", pth.name, "Simulated MIRI imager bad pixel mask", ff,
                     {"EXP_TYPE": "MIR_IMAGE", "READPATT": "ANY"}),
        _image_hdu(compressed, "DQ"),
        _dq_def_hdu(MASK_DQ_DEF),
    ]).writeto(pth)

    # SATURATION: raw DN threshold, NaN + NO_SAT_CHECK where not checked.
    sat = np.where(det.no_sat, np.nan, det.sat)[ys, xs].astype(np.float32)
    sat_dq = np.where(det.no_sat[ys, xs], PIXEL["NO_SAT_CHECK"], 0).astype(np.uint32)
    pth = path_for("saturation")
    fits.HDUList([
        _ref_primary(m, p, "saturation", "SaturationModel", pth.name,
                     "Simulated MIRI imager saturation thresholds (raw DN)", ff),
        _image_hdu(sat, "SCI", "DN"), _image_hdu(sat_dq, "DQ"),
        _standard_dq_def(["NO_SAT_CHECK"]),
    ]).writeto(pth)

    # LINEARITY: corrected = c0 + c1 x + c2 x^2 + c3 x^3, x = raw DN (incl. pedestal).
    ny_r, nx_r = sat.shape
    coeffs = np.zeros((4, ny_r, nx_r), dtype=np.float32)
    coeffs[1] = 1.0
    coeffs[2] = det.c2[ys, xs]
    coeffs[3] = det.c3[ys, xs]
    coeffs[:, det.no_lin[ys, xs]] = np.nan
    lin_dq = np.where(det.no_lin[ys, xs], PIXEL["NO_LIN_CORR"], 0).astype(np.uint32)
    pth = path_for("linearity")
    fits.HDUList([
        _ref_primary(m, p, "linearity", "LinearityModel", pth.name,
                     "Simulated MIRI imager linearity correction (raw DN incl. pedestal)", ff,
                     {"FILTER": "N/A", "BAND": "N/A"}),
        _image_hdu(coeffs, "COEFFS"), _image_hdu(lin_dq, "DQ"),
        _standard_dq_def(["NO_LIN_CORR"]),
    ]).writeto(pth)

    # GAIN (e-/DN) and READNOISE (CDS, DN) for this read pattern.
    pth = path_for("gain")
    fits.HDUList([
        _ref_primary(m, p, "gain", "GainModel", pth.name, "Simulated MIRI imager gain", ff,
                     {"FILTER": "N/A", "BAND": "N/A"}),
        _image_hdu(det.gain[ys, xs].astype(np.float32), "SCI", "electrons/DN"),
    ]).writeto(pth)
    rn = (det.rn_slow if m.readpatt == "SLOWR1" else det.rn_fast)[ys, xs].astype(np.float32)
    pth = path_for("readnoise")
    fits.HDUList([
        _ref_primary(m, p, "readnoise", "ReadnoiseModel", pth.name,
                     "Simulated MIRI imager read noise of a frame difference (CDS)", ff,
                     {"READPATT": m.readpatt}),
        _image_hdu(rn, "SCI", "DN"),
    ]).writeto(pth)

    # RSCD: groups to flag, for every subarray and read pattern.
    rows = [(s.name, rp) for s in SUBARRAYS.values() for rp in s.readpatts]
    table = fits.BinTableHDU.from_columns([
        fits.Column("subarray", "17A", array=np.array([r[0] for r in rows])),
        fits.Column("readpatt", "12A", array=np.array([r[1] for r in rows])),
        fits.Column("group_skip1", "J", array=np.full(len(rows), p.rscd_skip_int1, np.int32)),
        fits.Column("group_skip", "J", array=np.full(len(rows), p.rscd_skip_int2p, np.int32)),
    ], name="RSCD_GROUP_SKIP")
    pth = path_for("rscd")
    fits.HDUList([
        _ref_primary(m, p, "rscd", "RSCDModel", pth.name,
                     "Simulated MIRI RSCD groups to flag", False,
                     {"SUBARRAY": "GENERIC", "READPATT": "ANY"}),
        table,
    ]).writeto(pth)

    # DARK: [ndark, ngroups, ny, nx] in the science subarray, streamed plane by plane.
    # The mean dark current goes into the scalar AVDRKCUR keyword (DN/s, jwst adds it to the
    # median rate in the Poisson variance). jwst 3.0 would ignore a 2-D AVDRKCUR plane for
    # a RampModel read from a file (it compares the plane's shape with the model's unset
    # array, warns and skips it), so no plane is written.
    light = ~m.refcol
    avdrk = float(np.mean(m.dark_rate[:, light])) if light.any() else 0.0
    sub_kw = {"EXP_TYPE": "MIR_IMAGE", "READPATT": m.readpatt, "NFRAMES": 1, "GROUPGAP": 0,
              "NGROUPS": m.ngroups, "NINTS": m.ndark,
              "AVDRKCUR": (round(avdrk, 6), "[DN/s] mean dark current (Poisson variance)")}
    pth = path_for("dark")
    _ref_primary(m, p, "dark", "DarkMIRIModel", pth.name,
                 "Simulated MIRI integration-dependent dark", False, sub_kw).writeto(pth)
    planes = (float_to_fits(m.dark_plane(i, g)) for i in range(m.ndark) for g in range(m.ngroups))
    stream_image(pth, image_header("SCI", -32, (m.ndark, m.ngroups) + m.shape), planes)
    dark_dq = np.zeros((m.ndark, 1) + m.shape, dtype=np.uint32)
    dark_dq[:, 0][:, m.unreliable_dark] = PIXEL["UNRELIABLE_DARK"]
    append_hdus(pth, [_image_hdu(dark_dq, "DQ"), _standard_dq_def(["UNRELIABLE_DARK"])])

    # RESET: [nreset, reset_ngroups, ny, nx] raw-DN transient; 2-D DQ.
    pth = path_for("reset")
    _ref_primary(m, p, "reset", "ResetModel", pth.name, "Simulated MIRI reset transient", False,
                 {"READPATT": m.readpatt, "NGROUPS": m.reset_ngroups, "NINTS": m.nreset}
                 ).writeto(pth)
    planes = (float_to_fits(m.reset_plane(i, g)) for i in range(m.nreset)
              for g in range(m.reset_ngroups))
    stream_image(pth, image_header("SCI", -32, (m.nreset, m.reset_ngroups) + m.shape), planes)
    append_hdus(pth, [_image_hdu(np.zeros(m.shape, np.uint32), "DQ")])
    return out
