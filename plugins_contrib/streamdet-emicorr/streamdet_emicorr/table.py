"""Which EMI frequencies to correct, and the readout clocks: the built-in MIRI table, and
EMICORR reference files in jwst's format.

An EMICORR reference (jwst's ``EmiModel``, an ASDF file) holds

* ``frequencies``: name -> ``{"frequency": Hz, "phase_amplitudes": 1-D waveform}``, one
  cycle sampled at bin centres;
* ``subarray_cases``: subarray name (``FULL_FAST`` / ``FULL_SLOW`` for full frame) ->
  ``{"rowclocks", "frameclocks", "freqs": {"FAST": [names], "SLOW": {detector: [names]}}}``.

CRDS marks EMICORR not applicable in the caches ``streamdet simulate`` writes, and the
flight waveforms are not public in a form we can ship, so this package carries its own
table (:func:`builtin_table`):

* frequencies (Hz), as jwst's documentation lists the known MIRI EMI lines: 390.625 (the
  dominant one, +-4 DN; exactly 256 pixel-clock ticks per cycle), 218.52055, 218.520470,
  218.520665, 164.9305 and 10.039216 (a line seen in every readout);
* clocks: the row and frame clock counts of jwst 3.0's ``subarray_clocks``;
* frequency lists: 390.625 Hz and 10.039216 Hz for the subarrays whose frame time is not
  a whole number of 390.625 Hz cycles (SUB64, SUB128, SLITLESSPRISM, MASK1065/1140/1550,
  MASKLYOT), where that line drifts in phase from group to group and so leaks into the
  slopes; 10.039216 Hz only for FULL, BRIGHTSKY and SUB256, whose frame clocks (277504,
  86528, 29952) are multiples of 256, so the 390.625 Hz pattern repeats identically in
  every group and cancels in the slopes. This matches the cases jwst's documentation
  and tests show (FULL_FAST and BRIGHTSKY: Hz10; MASK1140 and MASK1550: Hz390, Hz10).
  SUB256 gets no default line: its frame (29952 ticks) is also within 0.7 % of three
  10.039216 Hz cycles, so that line drifts so little from group to group that the joint
  fit cannot tell it from the ramps' own slopes -- on EMI-free simulated SUB256 ramps
  of 10 groups it "finds" a 550 DN line from the reset transient (jwst's own
  ``emicorr`` does the same with such a table). Ask for it explicitly
  (``frequencies=Hz10``) with long ramps.
  The 218 Hz and 164 Hz lines are named here but in no default list; ask for them with
  ``--set emicorr.frequencies=Hz218a,Hz164``.
* waveforms: a unit sine cycle of 500 samples for every line (the fit scales and shifts
  it, so a sinusoidal interference is modelled exactly; a flight reference's measured
  waveform can be used through ``--set emicorr.reference=FILE``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .kernel import Component, sinusoid

#: MIRI EMI lines, Hz
FREQUENCIES_HZ = {
    "Hz390": 390.625,
    "Hz218a": 218.52055,
    "Hz218b": 218.520470,
    "Hz218c": 218.520665,
    "Hz164": 164.9305,
    "Hz10": 10.039216,
    "Hz10_slow_MIRIMAGE": 10.039216,
}

#: row clocks and frame clocks of each readout (jwst 3.0 ``subarray_clocks``)
CLOCKS = {
    "FULL_FAST": (271, 277504),
    "FULL_SLOW": (2333, 2388992),
    "BRIGHTSKY": (162, 86528),
    "SUB256": (96, 29952),
    "SUB128": (44, 11904),
    "SUB64": (28, 8512),
    "MASK1065": (82, 23968),
    "MASK1140": (82, 23968),
    "MASK1550": (82, 23968),
    "MASKLYOT": (90, 32400),
    "SLITLESSPRISM": (28, 15904),
}

#: frame clocks that are a whole number of 390.625 Hz cycles (256 ticks) see that line
#: in phase in every group
_IN_PHASE_390 = {name for name, (_, frame) in CLOCKS.items() if frame % 256 == 0}

WAVEFORM_SAMPLES = 500


#: readouts whose frame lasts (almost) a whole number of 10.039216 Hz cycles: SUB256's
#: 29952 ticks are 3.007 cycles, so that line moves by 0.7 % of a cycle per group
_IN_PHASE_10 = {"SUB256"}


def _builtin_cases() -> dict:
    cases = {}
    for name, (rows, frame) in CLOCKS.items():
        fast = ["Hz10"] if name in _IN_PHASE_390 else ["Hz390", "Hz10"]
        if name in _IN_PHASE_10:
            fast = [n for n in fast if n != "Hz10"]
        if name == "FULL_SLOW":
            freqs = {"SLOW": {"MIRIMAGE": ["Hz10_slow_MIRIMAGE"]}}
        else:
            freqs = {"FAST": fast}
        cases[name] = {"rowclocks": rows, "frameclocks": frame, "freqs": freqs}
    return cases


@dataclass
class Case:
    """The readout clocks and the frequencies to correct for one exposure."""

    subname: str
    rowclocks: int
    frameclocks: int
    names: list[str]


@dataclass
class EmiTable:
    """Frequencies with their waveforms, and subarray cases (an EMICORR reference)."""

    frequencies: dict[str, tuple[float, np.ndarray]]
    subarray_cases: dict
    #: where it came from (the R_EMICOR keyword)
    source: str = "streamdet-emicorr built-in table"
    meta: dict = field(default_factory=dict)

    def case(self, subarray: str, readpatt: str, detector: str) -> Case | None:
        """The case for this readout, found as jwst finds it: FULL becomes FULL_FAST or
        FULL_SLOW; FAST read patterns list their names directly, SLOW ones per detector.
        None when the table has no such case."""
        readpatt = readpatt.upper()
        speed = "SLOW" if "SLOW" in readpatt else "FAST" if "FAST" in readpatt else None
        if speed is None:
            return None
        subname = f"{subarray}_{speed}" if "FULL" in subarray else subarray
        entry = self.subarray_cases.get(subname)
        if not isinstance(entry, dict):
            return None
        names = (entry.get("freqs") or {}).get(speed)
        if speed == "SLOW" and isinstance(names, dict):
            names = names.get(detector)
        if names is None or "rowclocks" not in entry or "frameclocks" not in entry:
            return None
        return Case(subname, int(entry["rowclocks"]), int(entry["frameclocks"]), list(names))

    def component(self, name: str) -> Component:
        if name not in self.frequencies:
            raise KeyError(f"frequency {name!r} is not in the EMI table ({self.source}); "
                           f"it has {', '.join(self.frequencies)}")
        hz, wave = self.frequencies[name]
        return Component(name, float(hz), np.asarray(wave))

    def parse(self, text: str) -> list[Component]:
        """Components from ``"Hz10, 390.625"``: table names, or values in Hz (which get
        the table's waveform of that frequency if it has one, else a sine cycle)."""
        out = []
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            if item in self.frequencies:
                out.append(self.component(item))
                continue
            try:
                hz = float(item)
            except ValueError:
                raise KeyError(f"{item!r} is neither a frequency name of the EMI table "
                               f"({', '.join(self.frequencies)}) nor a number of Hz") from None
            if not hz > 0:
                raise KeyError(f"frequency {item!r} must be > 0 Hz")
            same = [n for n, (f, _) in self.frequencies.items() if f == hz]
            out.append(self.component(same[0]) if same
                       else Component(f"{hz:g}Hz", hz, sinusoid(WAVEFORM_SAMPLES)))
        return out


def builtin_table() -> EmiTable:
    wave = sinusoid(WAVEFORM_SAMPLES)
    return EmiTable({name: (hz, wave) for name, hz in FREQUENCIES_HZ.items()}, _builtin_cases())


def _plain(value):
    """An ASDF tree node as plain dicts, lists, floats and numpy arrays."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return np.array(value)
    return value


def read_reference(path: str | Path) -> EmiTable:
    """Read an EMICORR reference file (jwst's ASDF format)."""
    import asdf  # noqa: PLC0415 - only needed for reference files

    path = Path(path)
    try:
        with asdf.open(path, lazy_load=False, memmap=False) as af:
            tree = _plain({k: af.tree[k] for k in ("frequencies", "subarray_cases", "meta")
                           if k in af.tree})
    except Exception as exc:  # asdf raises many kinds of errors on a bad file
        raise ValueError(f"{path}: not a readable EMICORR reference ({type(exc).__name__}: "
                         f"{exc})") from None
    if "frequencies" not in tree or "subarray_cases" not in tree:
        raise ValueError(f"{path}: an EMICORR reference needs 'frequencies' and "
                         "'subarray_cases'")
    freqs = {}
    for name, entry in tree["frequencies"].items():
        try:
            freqs[name] = (float(entry["frequency"]), np.asarray(entry["phase_amplitudes"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: frequency {name!r} needs 'frequency' and "
                             "'phase_amplitudes'") from None
    return EmiTable(freqs, tree["subarray_cases"], str(path), tree.get("meta", {}))


def write_reference(table: EmiTable, path: str | Path, *, author: str = "streamdet-emicorr",
                    description: str = "MIRI EMI correction: streamdet-emicorr table") -> Path:
    """Write ``table`` as an EMICORR reference in jwst's ASDF format (what
    ``stdatamodels.jwst.datamodels.EmiModel`` and jwst's ``override_emicorr`` read)."""
    import asdf  # noqa: PLC0415

    path = Path(path)
    tree = {
        "meta": {
            "author": author,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
            "description": description,
            "instrument": {"name": "MIRI"},
            "model_type": "EmiModel",
            "pedigree": "GROUND",
            "reftype": "emicorr",
            "telescope": "JWST",
            "useafter": "2000-01-01T00:00:00",
        },
        "frequencies": {name: {"frequency": float(hz),
                               "phase_amplitudes": np.asarray(wave)}
                        for name, (hz, wave) in table.frequencies.items()},
        "subarray_cases": table.subarray_cases,
    }
    asdf.AsdfFile(tree).write_to(path)
    return path
