"""The offline CRDS cache: ``.pmap``/``.imap``/``.rmap`` mappings with valid checksums,
optional step-parameter (``pars-*``) references, ``config/jwst``, and the environment that
makes the real ``crds`` client use it and nothing else."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .model import ExposureModel
from .params import SimParams, SimulationError

#: crds treats any server URL containing "serverless" as "never connect" (no socket).
SERVERLESS_URL = "https://jwst-serverless-mode.stsci.edu"


def crds_env(crds_path: str | os.PathLike, context: str) -> dict[str, str]:
    """Environment variables that make the ``crds`` client (and jwst) use this cache only.

    They must be in ``os.environ`` before ``crds`` is first imported in a process (crds
    reads the server URL at import), so run jwst in a subprocess with them.
    """
    return {
        "CRDS_PATH": str(Path(crds_path).resolve()),
        "CRDS_CONTEXT": context,
        "CRDS_SERVER_URL": SERVERLESS_URL,
        "CRDS_MODE": "local",
        "CRDS_OBSERVATORY": "jwst",
        "CRDS_READONLY_CACHE": "1",
        "CRDS_CLIENT_RETRY_COUNT": "1",
        "CRDS_CLIENT_TIMEOUT_SECONDS": "5",
    }


#: Reference types that resolve to files in the generated cache.
REFTYPES = ("mask", "saturation", "linearity", "rscd", "dark", "gain", "readnoise", "reset")

#: Reference types the jwst 3.0 Detector1 steps (and a few neighbours) may ask for that
#: this cache declares not applicable, so the steps skip themselves instead of failing.
NA_REFTYPES = (
    "ipc", "superbias", "refpix", "sirskernel", "emicorr", "pictureframe", "persat",
    "trapdensity", "trappars", "flat", "pastasoss", "area", "drizpars",
)

#: Step classes of calwebb_detector1 whose ``pars-<class>`` parameter references are N/A
#: (the step-spec defaults apply, as in the parity tests).
PARS_STEPS = (
    "Detector1Pipeline", "GroupScaleStep", "DQInitStep", "EmiCorrStep", "SaturationStep",
    "IPCStep", "SuperBiasStep", "RefPixStep", "RscdStep", "FirstFrameStep", "LastFrameStep",
    "LinearityStep", "DarkCurrentStep", "ResetStep", "PersistenceStep", "ChargeMigrationStep",
    "JumpStep", "PictureFrameStep", "CleanFlickerNoiseStep", "RampFitStep", "GainScaleStep",
)

_CRDS_PARKEYS = {
    # reftype: (match keys, values for this exposure); 'N/A' means "don't care"
    "mask": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "saturation": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "linearity": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "gain": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "readnoise": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
    "rscd": ("META.INSTRUMENT.DETECTOR",),
    "dark": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
    "reset": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
}


def _write_pars_file(path: Path, step: str, reftype: str, parameters: dict[str, Any],
                     date_obs: str) -> None:
    """An stpipe parameter reference: ``class``, ``name``, ``parameters`` (only the values
    that differ from the step's defaults; a pipeline's ``steps`` as a list of such
    trees) and the CRDS ``meta`` that ``Step.export_config(include_metadata=True)``
    writes."""
    import asdf  # noqa: PLC0415 - only caches that ship parameter references need it

    from streamdet.core import jwstparams  # noqa: PLC0415

    alias = jwstparams.alias_of(step)
    if step == jwstparams.PIPELINE_NAME:
        full = jwstparams.PIPELINE_CLASS
    elif alias is not None:
        full = jwstparams.STEP_CLASSES[alias]
    else:
        raise SimulationError(f"crds_pars: {step!r} is not a jwst Detector1 step class")
    params = dict(parameters)
    tree: dict[str, Any] = {"class": full, "name": step if alias is None else alias}
    substeps = params.pop("steps", None)
    tree["parameters"] = params
    if substeps:
        tree["steps"] = [{"class": jwstparams.STEP_CLASSES[a], "name": a,
                          "parameters": dict(v)} for a, v in substeps.items()]
    tree["meta"] = {
        "author": "streamdet.simulate", "date": f"{date_obs}T00:00:00",
        "description": f"Parameters for calibration step {full}",
        "instrument": {"name": "MIRI"}, "origin": "streamdet", "pedigree": "GROUND",
        "reftype": reftype, "telescope": "JWST", "useafter": "2000-01-01T00:00:00",
    }
    asdf.AsdfFile(tree).write_to(str(path))


def mapping_text(header: dict, selector_text: str) -> str:
    """Mapping file text with a correct sha1sum (crds: sha1 of the text without the lines
    that contain 'sha1sum')."""
    lines = ["header = {"]
    for k in sorted(list(header) + ["sha1sum"]):
        v = "@SHA1@" if k == "sha1sum" else header[k]
        lines.append(f"    {k!r} : {v!r},")
    lines.append("}")
    text = "\n".join(lines) + "\n\nselector = " + selector_text + "\n"
    kept = "".join(ln for ln in text.splitlines(True) if "sha1sum" not in ln)
    return text.replace("@SHA1@", hashlib.sha1(kept.encode("utf-8")).hexdigest())


def write_crds_cache(m: ExposureModel, p: SimParams, root: Path, serial: str, ref_files: dict[str, Path]
                      ) -> str:
    """Write mappings + config; the reference files are already in references/jwst/miri."""
    mapdir = root / "mappings" / "jwst"
    cfgdir = root / "config" / "jwst"
    mapdir.mkdir(parents=True, exist_ok=True)
    cfgdir.mkdir(parents=True, exist_ok=True)
    context = f"jwst_{serial}.pmap"
    imap = f"jwst_miri_{serial}.imap"
    derived = "generated by streamdet.simulate"
    ff = p.fullframe_refs
    values = {
        "META.INSTRUMENT.DETECTOR": "MIRIMAGE",
        "META.SUBARRAY.NAME": m.sub.name,
        "META.EXPOSURE.READPATT": m.readpatt,
    }
    imap_sel = {}
    for reftype in REFTYPES:
        keys = _CRDS_PARKEYS[reftype]
        match = []
        for k in keys:
            v = values[k]
            if k == "META.SUBARRAY.NAME" and ff and reftype in ("mask", "saturation", "linearity",
                                                                "gain", "readnoise"):
                v = "N/A"  # a full-frame reference serves every subarray
            match.append(v)
        rmap = f"jwst_miri_{reftype}_{serial}.rmap"
        header = {
            "classes": ("Match", "UseAfter"),
            "derived_from": derived,
            "filekind": reftype.upper(),
            "instrument": "MIRI",
            "mapping": "REFERENCE",
            "name": rmap,
            "observatory": "JWST",
            "parkey": (tuple(keys), ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME")),
        }
        sel = ("Match({\n    " + repr(tuple(match)) + " : UseAfter({\n        "
               + repr("2000-01-01 00:00:00") + " : " + repr(ref_files[reftype].name)
               + ",\n    }),\n})")
        (mapdir / rmap).write_text(mapping_text(header, sel))
        imap_sel[reftype] = rmap
    for reftype in NA_REFTYPES:
        imap_sel[reftype] = "N/A"
    for step in PARS_STEPS:
        imap_sel["pars-" + step.lower()] = "N/A"
    for step, parameters in sorted(p.crds_pars.items()):
        reftype = "pars-" + step.lower()
        asdf_name = f"jwst_miri_{reftype}_{serial}.asdf"
        _write_pars_file(root / "references" / "jwst" / "miri" / asdf_name, step,
                         reftype, parameters, p.date_obs)
        rmap = f"jwst_miri_{reftype}_{serial}.rmap"
        header = {
            "classes": ("Match", "UseAfter"),
            "derived_from": derived,
            "file_ext": ".asdf",
            "filekind": reftype.upper(),
            "instrument": "MIRI",
            "mapping": "REFERENCE",
            "name": rmap,
            "observatory": "JWST",
            "parkey": (("META.INSTRUMENT.DETECTOR",),
                       ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME")),
        }
        sel = ("Match({\n    ('MIRIMAGE',) : UseAfter({\n        "
               + repr("2000-01-01 00:00:00") + " : " + repr(asdf_name) + ",\n    }),\n})")
        (mapdir / rmap).write_text(mapping_text(header, sel))
        imap_sel[reftype] = rmap
    header = {"derived_from": derived, "instrument": "MIRI", "mapping": "INSTRUMENT",
              "name": imap, "observatory": "JWST", "parkey": ("REFTYPE",)}
    sel = "{\n" + "".join(f"    {k!r} : {v!r},\n" for k, v in sorted(imap_sel.items())) + "}"
    (mapdir / imap).write_text(mapping_text(header, sel))
    header = {"derived_from": derived, "mapping": "PIPELINE", "name": context,
              "observatory": "JWST", "parkey": ("META.INSTRUMENT.NAME",)}
    (mapdir / context).write_text(mapping_text(header, "{\n    'MIRI' : " + repr(imap) + ",\n}"))

    server_config = {
        "observatory": "jwst",
        "operational_context": context,
        "latest_context": context,
        "edit_context": context,
        "build_context": context,
        "bad_files_list": [],
        "force_remote_mode": False,
        "last_synced": f"{p.date_obs} 00:00:00",
        "mappings": sorted(x.name for x in mapdir.iterdir()),
        "connected": False,
        "crds_version": {"str": "streamdet offline cache"},
    }
    (cfgdir / "server_config").write_text(repr(server_config) + "\n")
    (cfgdir / "ref_cache_subdir_mode").write_text("instrument\n")
    (cfgdir / "bad_files.txt").write_text("")
    return context
