"""Writing the Level 1B exposure (``*_uncal.fits``): primary and SCI headers, the raw
ramps streamed a group plane at a time, the GROUP and INT_TIMES tables and the ASDF
extension jwst reads the metadata through."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time

from .fitsio import append_hdus, image_header, raw_to_fits_int16, stream_image
from .model import ExposureModel
from .params import SimParams

#: EXP_TYPE written for each subarray (imaging, coronagraphy, slitless spectroscopy).
_EXP_TYPES = {
    "MASK1065": "MIR_4QPM", "MASK1140": "MIR_4QPM", "MASK1550": "MIR_4QPM",
    "MASKLYOT": "MIR_LYOT", "SLITLESSPRISM": "MIR_LRS-SLITLESS",
}
_FILTERS = {
    "MASK1065": "F1065C", "MASK1140": "F1140C", "MASK1550": "F1550C", "MASKLYOT": "F2300C",
    "SLITLESSPRISM": "P750L",
}


def _times(m: ExposureModel, p: SimParams) -> dict[str, Any]:
    start = Time(f"{p.date_obs}T{p.time_obs}", format="isot", scale="utc")
    # Each integration: a reset frame, then NGROUPS frames.
    int_dur = (m.ngroups + 1) * m.tframe
    starts = start.mjd + np.arange(m.nints) * int_dur / 86400.0
    ends = starts + int_dur / 86400.0
    return {"start": start, "starts": starts, "ends": ends, "int_dur": int_dur,
            "end": Time(ends[-1], format="mjd", scale="utc")}


def _primary_header(m: ExposureModel, p: SimParams, name: str, filename: str) -> fits.Header:
    sub = m.sub
    tm = _times(m, p)
    start, end = tm["start"], tm["end"]
    exp_type = _EXP_TYPES.get(sub.name, "MIR_IMAGE")
    filt = _FILTERS.get(sub.name, p.filter)
    h = fits.Header()
    h["DATE"] = (f"{p.date_obs}T{p.time_obs}", "= obs. start, for reproducibility")
    h["ORIGIN"] = ("streamdet", "institution responsible for creating FITS file")
    h["TIMESYS"] = ("UTC", "principal time system for time-related keywords")
    h["TIMEUNIT"] = ("s", "default unit applicable to all time values")
    h["FILENAME"] = (filename, "name of the file")
    h["FILETYPE"] = ("uncalibrated", "type of data in the file")
    h["DATAMODL"] = ("Level1bModel", "type of data model")
    h["TELESCOP"] = ("JWST", "telescope used to acquire the data")
    h["HISTORY"] = "Simulated MIRI exposure written by streamdet.simulate"
    # Program / observation
    h["TITLE"] = ("streamdet simulated MIRI imaging", "proposal title")
    h["PI_NAME"] = ("Simulation", "principal investigator name")
    h["CATEGORY"] = ("CAL", "program category")
    h["DATE-OBS"] = (p.date_obs, "[yyyy-mm-dd] UTC date at start of exposure")
    h["TIME-OBS"] = (p.time_obs, "[hh:mm:ss.sss] UTC time at start of exposure")
    h["DATE-BEG"] = (start.isot, "date-time start of exposure")
    h["DATE-END"] = (end.isot, "date-time end of exposure")
    prog, obs, visit = name[2:7], name[7:10], name[10:13]
    ok = name.startswith("jw") and len(name) >= 25 and name[2:13].isdigit()
    prog, obs, visit = (prog, obs, visit) if ok else ("09999", "001", "001")
    h["OBS_ID"] = (f"V{prog}{obs}{visit}P0000000001101", "programmatic observation identifier")
    h["VISIT_ID"] = (f"{prog}{obs}{visit}", "visit identifier")
    h["PROGRAM"] = (prog, "program number")
    h["OBSERVTN"] = (obs, "observation number")
    h["VISIT"] = (visit, "visit number")
    h["VISITGRP"] = ("01", "visit group identifier")
    h["SEQ_ID"] = ("1", "parallel sequence identifier")
    h["ACT_ID"] = ("01", "activity identifier")
    h["EXPOSURE"] = ("1", "exposure request number")
    h["TEMPLATE"] = ("MIRI Imaging", "observation template used")
    h["OBSLABEL"] = ("streamdet simulation", "proposer label for the observation")
    h["VISITYPE"] = ("PRIME_TARGETED_FIXED", "visit type")
    h["VISITSTA"] = ("SUCCESSFUL", "status of a visit")
    h["TSOVISIT"] = (False, "time series observation visit indicator")
    h["ENG_QUAL"] = ("OK", "engineering data quality indicator")
    h["TARGPROP"] = ("SIMFIELD", "proposer's name for the target")
    h["TARGNAME"] = ("SIMFIELD", "standard astronomical catalog name for target")
    h["TARGTYPE"] = ("FIXED", "type of target (fixed, moving, generic)")
    h["TARG_RA"] = (p.target_ra, "target RA at mid time of exposure (deg)")
    h["TARG_DEC"] = (p.target_dec, "target Dec at mid time of exposure (deg)")
    # Instrument
    h["INSTRUME"] = ("MIRI", "instrument used to acquire the data")
    h["DETECTOR"] = ("MIRIMAGE", "name of detector used to acquire the data")
    h["FILTER"] = (filt, "name of the filter element used")
    if exp_type in ("MIR_4QPM", "MIR_LYOT"):
        h["CORONMSK"] = ({"MASK1065": "4QPM_1065", "MASK1140": "4QPM_1140",
                          "MASK1550": "4QPM_1550"}.get(sub.name, "LYOT_2300"),
                         "coronagraph mask used")
    # Exposure
    h["EXP_TYPE"] = (exp_type, "type of data in the exposure")
    h["EXPSTART"] = (start.mjd, "UTC exposure start time (MJD)")
    h["EXPMID"] = ((start.mjd + end.mjd) / 2.0, "UTC exposure mid time (MJD)")
    h["EXPEND"] = (end.mjd, "UTC exposure end time (MJD)")
    h["READPATT"] = (m.readpatt, "readout pattern")
    h["NOUTPUTS"] = (1, "number of detector outputs used")
    h["NINTS"] = (m.nints, "number of integrations in exposure")
    h["INTSTART"] = (1, "starting integration number in this segment")
    h["INTEND"] = (m.nints, "ending integration number in this segment")
    h["NGROUPS"] = (m.ngroups, "number of groups in integration")
    h["NFRAMES"] = (1, "number of frames per group")
    h["GROUPGAP"] = (0, "number of frames dropped between groups")
    h["MIRNGRPS"] = (m.ngroups, "MIRI flight software number of groups")
    h["MIRNFRMS"] = (1, "MIRI flight software number of frames")
    h["NSAMPLES"] = (1, "number of A/D samples per pixel")
    h["FRMDIVSR"] = (1, "divisor applied to frame-averaged groups")
    h["DRPFRMS1"] = (0, "frames dropped prior to first integration")
    h["DRPFRMS3"] = (0, "frames dropped between integrations")
    h["TSAMPLE"] = (10.0, "[us] time between samples")
    h["TFRAME"] = (m.tframe, "[s] time between frames")
    h["TGROUP"] = (m.tgroup, "[s] time between groups")
    h["EFFINTTM"] = ((m.ngroups - 1) * m.tgroup, "[s] effective integration time")
    h["EFFEXPTM"] = ((m.ngroups - 1) * m.tgroup * m.nints, "[s] effective exposure time")
    h["TMEASURE"] = ((m.ngroups - 1) * m.tgroup * m.nints, "[s] measurement time")
    h["DURATION"] = (tm["int_dur"] * m.nints, "[s] total duration of exposure")
    h["NRSTSTRT"] = (1, "number of resets at start of exposure")
    h["NRESETS"] = (1, "number of resets between integrations")
    h["ZEROFRAM"] = (False, "zero frame was downlinked separately")
    h["DATAPROB"] = (False, "science telemetry indicated a problem")
    h["SCA_NUM"] = (493, "sensor chip assembly number")
    # Subarray
    h["SUBARRAY"] = (sub.name, "subarray used")
    h["SUBSTRT1"] = (sub.xstart, "starting pixel in axis 1 direction")
    h["SUBSTRT2"] = (sub.ystart, "starting pixel in axis 2 direction")
    h["SUBSIZE1"] = (sub.xsize, "number of pixels in axis 1 direction")
    h["SUBSIZE2"] = (sub.ysize, "number of pixels in axis 2 direction")
    h["FASTAXIS"] = (1, "fast readout axis direction")
    h["SLOWAXIS"] = (2, "slow readout axis direction")
    # Dither
    h["PATTTYPE"] = ("NONE", "primary dither pattern type")
    h["NUMDTHPT"] = (1, "total number of points in pattern")
    h["PATT_NUM"] = (1, "position number in primary pattern")
    return h


def _sci_header(m: ExposureModel, p: SimParams) -> fits.Header:
    h = image_header("SCI", 16, (m.nints, m.ngroups) + m.shape, bzero=32768)
    h["BUNIT"] = ("DN", "physical units of the array values")
    # Pointing and a simple TAN WCS at the subarray centre (0.11"/pixel, V3 at PA_V3).
    scale = 0.11 / 3600.0
    roll = math.radians(p.pa_v3)
    h["RA_V1"] = (p.target_ra, "[deg] RA of telescope V1 axis")
    h["DEC_V1"] = (p.target_dec, "[deg] Dec of telescope V1 axis")
    h["PA_V3"] = (p.pa_v3, "[deg] position angle of V3-axis of JWST")
    h["WCSAXES"] = (2, "number of World Coordinate System axes")
    h["CRPIX1"] = ((m.shape[1] + 1) / 2.0, "axis 1 coordinate of the reference pixel")
    h["CRPIX2"] = ((m.shape[0] + 1) / 2.0, "axis 2 coordinate of the reference pixel")
    h["CRVAL1"] = (p.target_ra, "first axis value at the reference pixel")
    h["CRVAL2"] = (p.target_dec, "second axis value at the reference pixel")
    h["CTYPE1"] = ("RA---TAN", "first axis coordinate type")
    h["CTYPE2"] = ("DEC--TAN", "second axis coordinate type")
    h["CUNIT1"] = ("deg", "first axis units")
    h["CUNIT2"] = ("deg", "second axis units")
    h["CDELT1"] = (scale, "first axis increment per pixel")
    h["CDELT2"] = (scale, "second axis increment per pixel")
    h["PC1_1"] = (-math.cos(roll), "linear transformation matrix element")
    h["PC1_2"] = (math.sin(roll), "linear transformation matrix element")
    h["PC2_1"] = (math.sin(roll), "linear transformation matrix element")
    h["PC2_2"] = (math.cos(roll), "linear transformation matrix element")
    h["V2_REF"] = (-453.36, "[arcsec] V2 of the reference point (approx.)")
    h["V3_REF"] = (-374.07, "[arcsec] V3 of the reference point (approx.)")
    h["VPARITY"] = (-1, "sense of rotation Ideal xy vs V2V3")
    h["V3I_YANG"] = (4.45, "[deg] V3 to Ideal y angle (approx.)")
    h["RA_REF"] = (p.target_ra, "[deg] right ascension of the reference point")
    h["DEC_REF"] = (p.target_dec, "[deg] declination of the reference point")
    h["ROLL_REF"] = (p.pa_v3, "[deg] V3 roll angle at the reference point")
    h["XREF_SCI"] = ((m.shape[1] + 1) / 2.0, "aperture reference x in science frame")
    h["YREF_SCI"] = ((m.shape[0] + 1) / 2.0, "aperture reference y in science frame")
    return h


def _int_times_hdu(m: ExposureModel, p: SimParams) -> fits.BinTableHDU:
    tm = _times(m, p)
    starts, ends = tm["starts"], tm["ends"]
    mids = (starts + ends) / 2.0
    # TDB offset (no barycentric light-time correction: the spacecraft position is not
    # simulated).
    tdb = lambda mjd: Time(mjd, format="mjd", scale="utc").tdb.mjd  # noqa: E731
    cols = [
        fits.Column("integration_number", "J", array=np.arange(1, m.nints + 1, dtype=np.int32)),
        fits.Column("int_start_MJD_UTC", "D", array=starts),
        fits.Column("int_mid_MJD_UTC", "D", array=mids),
        fits.Column("int_end_MJD_UTC", "D", array=ends),
        fits.Column("int_start_BJD_TDB", "D", array=tdb(starts)),
        fits.Column("int_mid_BJD_TDB", "D", array=tdb(mids)),
        fits.Column("int_end_BJD_TDB", "D", array=tdb(ends)),
    ]
    return fits.BinTableHDU.from_columns(cols, name="INT_TIMES")


def _group_hdu(m: ExposureModel, p: SimParams) -> fits.BinTableHDU:
    tm = _times(m, p)
    n = m.nints * m.ngroups
    ints = np.repeat(np.arange(1, m.nints + 1), m.ngroups).astype(np.int32)
    groups = np.tile(np.arange(1, m.ngroups + 1), m.nints).astype(np.int16)
    # Group g of integration i ends after the reset frame and g+1 frames.
    end_mjd = tm["starts"][ints - 1] + (groups.astype(np.float64) + 1) * m.tframe / 86400.0
    t = Time(end_mjd, format="mjd", scale="utc")
    dts = t.to_datetime()
    day = np.array([d.timetuple().tm_yday for d in dts], dtype=np.int16)
    ms = np.array([(d.hour * 3600 + d.minute * 60 + d.second) * 1000 + d.microsecond // 1000
                   for d in dts], dtype=np.int32)
    sub_ms = np.array([d.microsecond % 1000 for d in dts], dtype=np.int16)
    iso = np.array([d.strftime("%Y-%m-%dT%H:%M:%S.%f") for d in dts])
    cols = [
        fits.Column("integration_number", "J", array=ints),
        fits.Column("group_number", "I", array=groups),
        fits.Column("end_day", "I", array=day),
        fits.Column("end_milliseconds", "J", array=ms),
        fits.Column("end_submilliseconds", "I", array=sub_ms),
        fits.Column("group_end_time", "26A", array=iso),
        fits.Column("number_of_columns", "I", array=np.full(n, m.shape[1], np.int16)),
        fits.Column("number_of_rows", "I", array=np.full(n, m.shape[0], np.int16)),
        fits.Column("number_of_gaps", "I", array=np.zeros(n, np.int16)),
        fits.Column("completion_code_number", "I", array=np.zeros(n, np.int16)),
        fits.Column("completion_code_text", "36A", array=np.array(["COMPLETE"] * n)),
        fits.Column("bary_end_time", "D", array=end_mjd),
        fits.Column("helio_end_time", "D", array=end_mjd),
    ]
    return fits.BinTableHDU.from_columns(cols, name="GROUP")


def write_uncal(m: ExposureModel, p: SimParams, path: Path, name: str) -> np.ndarray:
    """Write the Level 1B file; returns first_sat [nints, ny, nx] (int16, -1 = never)."""
    prim = fits.PrimaryHDU(header=_primary_header(m, p, name, path.name))
    prim.writeto(path)
    first_sat = np.full((m.nints,) + m.shape, -1, dtype=np.int16)
    stream_image(path, _sci_header(m, p),
                  (raw_to_fits_int16(pl) for pl in m.ramp_planes(first_sat)))
    append_hdus(path, [_group_hdu(m, p), _int_times_hdu(m, p), asdf_hdu()])
    return first_sat


def asdf_hdu() -> fits.BinTableHDU:
    """A minimal embedded-ASDF extension (what stdatamodels writes as ``ASDF``).

    jwst's ``Step.call(filename)`` reads the metadata through that extension and fails
    without it; with an (almost) empty tree the metadata come from the FITS keywords.
    The bytes are a complete ASDF 1.5 file written by hand, so no asdf package is needed.
    """
    text = (
        "#ASDF 1.0.0\n"
        "#ASDF_STANDARD 1.5.0\n"
        "%YAML 1.1\n"
        "%TAG ! tag:stsci.edu:asdf/\n"
        "--- !core/asdf-1.1.0\n"
        "asdf_library: !core/software-1.0.0 {author: streamdet, name: streamdet.simulate,\n"
        "  version: 0.1.0}\n"
        "...\n"
    )
    data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)[None, :]
    column = fits.Column(name="ASDF_METADATA", format=f"{data.shape[1]}B", array=data)
    return fits.BinTableHDU.from_columns([column], name="ASDF")

