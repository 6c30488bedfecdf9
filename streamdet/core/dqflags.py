"""The JWST data-quality bit table: the one place streamdet defines DQ bits.

Values are those of ``stdatamodels.jwst.datamodels.dqflags`` so that products carry
flags the rest of the JWST ecosystem reads as its own.  ``groupdq`` is uint8 and uses
only the low byte (``GROUP``); ``pixeldq`` and product DQ are uint32 (``PIXEL``).
"""

from __future__ import annotations

import numpy as np

PIXEL: dict[str, int] = {
    "GOOD": 0,
    "DO_NOT_USE": 1 << 0,
    "SATURATED": 1 << 1,
    "JUMP_DET": 1 << 2,
    "DROPOUT": 1 << 3,
    "OUTLIER": 1 << 4,
    "PERSISTENCE": 1 << 5,
    "AD_FLOOR": 1 << 6,
    "CHARGELOSS": 1 << 7,
    "RESERVED": 1 << 8,
    "NON_SCIENCE": 1 << 9,
    "DEAD": 1 << 10,
    "HOT": 1 << 11,
    "WARM": 1 << 12,
    "LOW_QE": 1 << 13,
    "RC": 1 << 14,
    "TELEGRAPH": 1 << 15,
    "NONLINEAR": 1 << 16,
    "BAD_REF_PIXEL": 1 << 17,
    "NO_FLAT_FIELD": 1 << 18,
    "NO_GAIN_VALUE": 1 << 19,
    "NO_LIN_CORR": 1 << 20,
    "NO_SAT_CHECK": 1 << 21,
    "UNRELIABLE_BIAS": 1 << 22,
    "UNRELIABLE_DARK": 1 << 23,
    "UNRELIABLE_SLOPE": 1 << 24,
    "UNRELIABLE_FLAT": 1 << 25,
    "OPEN": 1 << 26,
    "ADJ_OPEN": 1 << 27,
    "FLUX_ESTIMATED": 1 << 28,
    "MSA_FAILED_OPEN": 1 << 29,
    "OTHER_BAD_PIXEL": 1 << 30,
    "REFERENCE_PIXEL": 1 << 31,
}

GROUP: dict[str, int] = {name: PIXEL[name] for name in (
    "GOOD", "DO_NOT_USE", "SATURATED", "JUMP_DET", "DROPOUT", "PERSISTENCE", "AD_FLOOR",
    "CHARGELOSS",
)}

GOOD = PIXEL["GOOD"]
DO_NOT_USE = PIXEL["DO_NOT_USE"]
SATURATED = PIXEL["SATURATED"]
JUMP_DET = PIXEL["JUMP_DET"]
DROPOUT = PIXEL["DROPOUT"]
AD_FLOOR = PIXEL["AD_FLOOR"]
CHARGELOSS = PIXEL["CHARGELOSS"]
DEAD = PIXEL["DEAD"]
HOT = PIXEL["HOT"]
NONLINEAR = PIXEL["NONLINEAR"]
NO_GAIN_VALUE = PIXEL["NO_GAIN_VALUE"]
NO_LIN_CORR = PIXEL["NO_LIN_CORR"]
NO_SAT_CHECK = PIXEL["NO_SAT_CHECK"]
UNRELIABLE_DARK = PIXEL["UNRELIABLE_DARK"]
FLUX_ESTIMATED = PIXEL["FLUX_ESTIMATED"]
REFERENCE_PIXEL = PIXEL["REFERENCE_PIXEL"]


def decode_with_dq_def(dq: np.ndarray, dq_def) -> np.ndarray:
    """Translate a reference file's DQ array to JWST pixel flag values.

    CRDS reference files may number their bits freely and describe them in a ``DQ_DEF``
    table (columns BIT and NAME); a file without the table already uses JWST values.
    Bits whose name is not a JWST flag are dropped, as jwst's dynamic-mask decoding does.
    """
    dq = np.asarray(dq)
    if dq_def is None or len(dq_def) == 0:
        return dq.astype(np.uint32, copy=False)
    dq_u = dq.astype(np.uint32, copy=False)
    # the bits a file numbers as JWST does (the usual case) are kept in one pass
    same, moved = 0, []
    for row in dq_def:
        bit, value = int(row["BIT"]), PIXEL.get(str(row["NAME"]).strip().upper())
        if not value:  # not a JWST flag, or GOOD (no bit)
            continue
        if value == 1 << bit:
            same |= value
        else:
            moved.append((bit, value))
    out = np.bitwise_and(dq_u, np.uint32(same))
    for bit, value in moved:
        out[(dq_u & np.uint32(1 << bit)) != 0] |= np.uint32(value)
    return out


def names_of(value: int) -> list[str]:
    """The flag names set in one DQ value (for messages and summaries)."""
    return [name for name, bit in PIXEL.items() if bit and value & bit]
