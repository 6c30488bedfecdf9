"""Reference resolution: the one place that decides which reference file a step gets.

Order: an explicit per-type override (CLI ``--override`` / config) -> CRDS through the
real ``crds`` client (``CRDS_PATH`` cache, ``CRDS_CONTEXT``, serverless unless a
``CRDS_SERVER_URL`` says otherwise) -> a clear error naming the type. ``N/A`` (from an
override or from CRDS) means "not applicable": the step that needs it is skipped.
CRDS answers are remembered across processes (see below); the CRDS step-parameter
references (``pars-*``) are selected here too.

Reading the chosen files is :mod:`streamdet.core.reference_files` (:class:`References`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .caches import cache_file
from .errors import MissingModuleError, ReferenceError_, missing_module
from .exposure import ExposureMeta
# the reading side, under the names the steps have always imported from here
from .reference_files import ANY_IMAGE, CACHE_BYTES, IMAGE, References  # noqa: F401

NA = "N/A"

# Defaults that keep the crds client off the network and quick to fail; set only when the
# user has not chosen otherwise, and before crds is first imported (it reads them then).
_CRDS_DEFAULTS = {
    "CRDS_OBSERVATORY": "jwst",
    "CRDS_SERVER_URL": "https://jwst-serverless-mode.stsci.edu",
    "CRDS_MODE": "local",
    "CRDS_READONLY_CACHE": "1",
    "CRDS_CLIENT_RETRY_COUNT": "1",
    "CRDS_CLIENT_TIMEOUT_SECONDS": "5",
}


@dataclass(frozen=True)
class Resolved:
    reftype: str
    path: str | None          # None when not applicable
    source: str               # "override", "crds", or "none" (an optional type found nowhere)
    context: str | None = None

    @property
    def not_applicable(self) -> bool:
        return self.path is None

    @property
    def header_value(self) -> str:
        """What jwst writes in R_* keywords: crds://name for CRDS, the path for overrides."""
        if self.path is None:
            return NA
        if self.source == "crds":
            return f"crds://{Path(self.path).name}"
        return str(self.path)


_last_crds_path: str | None = None


def _apply_crds_defaults() -> None:
    for key, value in _CRDS_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _crds():
    """Import crds configured for offline use; clear its per-process caches when the
    cache directory changed since the last call (crds caches mappings by name)."""
    global _last_crds_path
    _apply_crds_defaults()
    import crds  # noqa: PLC0415 - heavy, imported only when CRDS is really consulted

    current = os.environ.get("CRDS_PATH")
    if _last_crds_path is not None and current != _last_crds_path:
        from crds.core import utils  # noqa: PLC0415

        utils.clear_function_caches()
    _last_crds_path = current
    return crds


def _unusable_cache(where) -> ReferenceError_:
    return ReferenceError_(
        f"{where}: the CRDS cache at CRDS_PATH={os.environ['CRDS_PATH']} has no usable "
        "configuration (config/jwst/server_config) and no server is reachable")


def crds_context() -> str | None:
    """The CRDS context in effect, or None when CRDS is not configured."""
    if "CRDS_PATH" not in os.environ:
        return None
    if os.environ.get("CRDS_CONTEXT"):
        return os.environ["CRDS_CONTEXT"]
    return _remembered("context", {}, [], _crds_context)


def _crds_context() -> str | None:
    try:
        from crds.core import heavy_client  # noqa: PLC0415

        _crds()
        return os.environ.get("CRDS_CONTEXT") or heavy_client.get_context_name("jwst")
    except (Exception, SystemExit):
        return os.environ.get("CRDS_CONTEXT")


@functools.lru_cache(maxsize=1)
def crds_version() -> str:
    """The installed crds' version (looked up once per process: each look-up scans every
    installed distribution)."""
    try:
        return importlib.metadata.version("crds")
    except Exception:
        return "unknown"


def resolve(meta: ExposureMeta, reftypes: list[str], overrides: dict[str, str]) -> dict[str, Resolved]:
    """Resolve every type in ``reftypes`` for the exposure ``meta``."""
    out: dict[str, Resolved] = {}
    remaining: list[str] = []
    for reftype in reftypes:
        given = overrides.get(reftype)
        if given is None:
            remaining.append(reftype)
        elif given.strip().upper() == NA:
            out[reftype] = Resolved(reftype, None, "override")
        else:
            path = Path(given).expanduser().resolve()
            if not path.is_file():
                raise ReferenceError_(f"--override {reftype}={given}: no such file")
            out[reftype] = Resolved(reftype, str(path), "override")
    if remaining:
        out.update(_from_crds(meta, remaining))
    return {r: out[r] for r in reftypes}


def resolve_optional(meta: ExposureMeta, reftypes: list[str], overrides: dict[str, str]
                     ) -> dict[str, Resolved]:
    """Like :func:`resolve` for the types a step uses only when they exist
    (``Step.optional_reftypes``): an override still wins and a bad override path is still
    an error, but no CRDS configuration or no CRDS match means N/A rather than an error."""
    out: dict[str, Resolved] = {}
    for reftype in reftypes:
        if reftype in overrides:
            out.update(resolve(meta, [reftype], overrides))
            continue
        try:
            out.update(_from_crds(meta, [reftype]))
        except ReferenceError_:
            out[reftype] = Resolved(reftype, None, "none")
    return out


def _from_crds(meta: ExposureMeta, reftypes: list[str], params: dict | None = None
               ) -> dict[str, Resolved]:
    where = meta.path
    if "CRDS_PATH" not in os.environ:
        raise ReferenceError_(
            f"{where}: no reference for {', '.join(reftypes)}: set CRDS_PATH to a CRDS cache "
            "(streamdet simulate makes one) or pass --override REFTYPE=PATH")
    params = crds_parameters(meta.header) if params is None else params
    try:
        # the context is passed explicitly: crds caches the first CRDS_CONTEXT it sees
        best = _remembered("getreferences", params, reftypes, lambda: _crds().getreferences(
            params, reftypes=list(reftypes), observatory="jwst",
            context=os.environ.get("CRDS_CONTEXT")))
    except SystemExit:  # crds exits when it has neither a cache configuration nor a server
        raise _unusable_cache(where) from None
    except Exception as exc:
        module = missing_module(exc)
        if module is not None:  # crds reports a broken installation as a lookup failure
            raise MissingModuleError(module, needed_by="crds' JWST rules") from None
        _missing_from_cache(_crds(), meta, params, reftypes)
        message = " ".join(str(exc).split())
        bad = next((r for r in reftypes if r.upper() in message.upper()), None)
        what = f"reference type {bad!r}" if bad else f"reference types {', '.join(reftypes)}"
        raise ReferenceError_(f"{where}: CRDS found no {what}: {message}") from None
    context = crds_context()
    out = {}
    for reftype in reftypes:
        value = best.get(reftype, "NOT FOUND")
        if value.upper().startswith("NOT FOUND"):
            if NA in value.upper():
                out[reftype] = Resolved(reftype, None, "crds", context)
                continue
            raise ReferenceError_(f"{where}: CRDS found no reference type {reftype!r}: {value}")
        out[reftype] = Resolved(reftype, value, "crds", context)
    return out


# --- CRDS answers remembered across processes ---------------------------------------------
#
# Importing crds' JWST lookup costs more than a small exposure's whole processing (it pulls
# in large parts of astropy and asdf). Its answers depend only on the selectors, the
# context, the cache's rules and the crds version, so they are kept in a small JSON file
# (STREAMDET_CRDS_MEMO, default ~/.cache/streamdet/crds_lookups.json; "off" disables it)
# and used again while everything they depend on is unchanged: every CRDS_* variable (but
# the verbosity) and
# the crds version are part of the key, and a hit is only taken when the cache's
# configuration files (config/jwst: the context, the bad-files list), its mappings
# directory, the context's pmap, imaps and MIRI rmaps and the selected reference files
# still have the size, inode and modification time they had.
# Failures are never remembered.

_MEMO_ENTRIES = 64
_QUOTED = re.compile(r"'([A-Za-z0-9_.-]+)'")
#: layouts the file checks below cannot follow: crds alone is asked then
_UNFOLLOWED_CRDS_VARIABLES = ("CRDS_MAPPATH", "CRDS_REFPATH", "CRDS_CFGPATH", "CRDS_CONFIG_URI")
_memo_lock = threading.Lock()
#: the CRDS_* variables crds set itself (importing it exports its whole configuration,
#: a lookup a few paths more), with the values it gave them: not the user's choice, so
#: left out of the memo's key while they keep those values, and a lookup made after
#: crds's import finds what a fresh process remembers
_crds_exports: dict[str, str] = {}


def _memo_file() -> Path | None:
    return cache_file("STREAMDET_CRDS_MEMO", "crds_lookups.json")


def _file_state(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _mapping_names(path: Path, pattern: str) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return sorted({name for name in _QUOTED.findall(text) if name.endswith(pattern)})


def _watched_files(context: str | None, answer) -> list[str]:
    """The files whose change must invalidate a remembered answer."""
    root = Path(os.environ["CRDS_PATH"])
    mappings = root / "mappings" / "jwst"
    config = root / "config" / "jwst"  # server_config (the context), bad_files.txt, ...
    files = [config, mappings, *sorted(config.glob("*"))]
    if context and context.endswith(".pmap"):
        pmap = mappings / context
        files.append(pmap)
        for imap in _mapping_names(pmap, ".imap"):
            files.append(mappings / imap)
            if "_miri_" in imap:
                files.extend(mappings / rmap for rmap in _mapping_names(mappings / imap, ".rmap"))
    if isinstance(answer, dict):
        files.extend(Path(v) for v in answer.values() if isinstance(v, str) and os.path.isabs(v))
    return [str(f) for f in files]


#: CRDS_* variables that do not change crds' answers: left out of the memo's key (the
#: command line sets CRDS_VERBOSITY=-3 unless -v or --debug; the Python API does not)
_NOT_IN_MEMO_KEY = ("CRDS_VERBOSITY",)


def _memo_key(kind: str, params: dict, reftypes: list[str]) -> str | None:
    _apply_crds_defaults()  # as crds will see them
    crds_env = {k: v for k, v in os.environ.items()
                if k.startswith("CRDS_") and k not in _NOT_IN_MEMO_KEY
                and _crds_exports.get(k) != v}
    if "CRDS_PATH" not in crds_env or any(crds_env.get(k, "None") not in ("", "None")
                                          for k in _UNFOLLOWED_CRDS_VARIABLES):
        return None
    blob = json.dumps([kind, sorted(params.items()), sorted(reftypes), sorted(crds_env.items()),
                       crds_version()])
    return hashlib.sha256(blob.encode()).hexdigest()


def _memo_read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _remembered(kind: str, params: dict, reftypes: list[str], ask):
    """``ask()`` (a crds lookup), or its remembered answer while nothing it depends on
    has changed."""
    path = _memo_file()
    key = _memo_key(kind, params, reftypes) if path is not None else None
    if key is None:
        return ask()
    entry = _memo_read(path).get(key)
    if (isinstance(entry, dict) and entry.get("files")
            and all(_file_state(Path(f)) == state for f, state in entry["files"].items())):
        return entry["answer"]
    before = set(os.environ)
    answer = ask()
    _crds_exports.update({k: v for k, v in os.environ.items()
                          if k.startswith("CRDS_") and k not in before})
    context = answer if kind == "context" else crds_context()
    files = {f: _file_state(Path(f)) for f in _watched_files(context, answer)}
    with _memo_lock:
        entries = _memo_read(path)
        entries.pop(key, None)
        entries[key] = {"answer": answer, "files": files}
        for old in list(entries)[:-_MEMO_ENTRIES]:
            del entries[old]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".crds_lookups.",
                                             suffix=".tmp", delete=False) as out:
                json.dump(entries, out)
            os.replace(out.name, path)
        except OSError:  # a read-only home: no memory, same answers
            with contextlib.suppress(OSError, NameError):
                os.unlink(out.name)
    return answer


@dataclass(frozen=True)
class ParsReference:
    """A CRDS step-parameter reference (``pars-jumpstep``) selected for an exposure."""

    reftype: str
    step: str | None          # the step alias, None for the pipeline's
    path: str
    context: str | None
    #: the file's contents (see streamdet.core.jwstparams.ParameterFile)
    parameters: object

    @property
    def header_value(self) -> str:
        return f"crds://{Path(self.path).name}"


#: values of STPIPE_DISABLE_CRDS_STEPPARS that switch the lookup off (stpipe's own list)
_STPIPE_TRUE = ("true", "True", "t", "yes", "y")


def crds_pars_disabled() -> bool:
    """Whether the environment switches CRDS parameter references off, as it does for
    stpipe (``STPIPE_DISABLE_CRDS_STEPPARS``)."""
    return os.environ.get("STPIPE_DISABLE_CRDS_STEPPARS", "") in _STPIPE_TRUE


def resolve_pars(meta: ExposureMeta) -> list[ParsReference]:
    """The CRDS step-parameter references for the exposure, as stpipe's ``Step.call``
    looks them up: ``pars-<class>`` for every jwst Detector1 step and then for the
    pipeline (whose ``steps`` section wins over the steps' own files), with the
    exposure's selectors. None when CRDS is not configured, a type the context does not
    know or declares N/A is simply absent (stpipe goes on without it too); a selected
    file missing from the cache or unreadable is an error naming it."""
    from . import jwstparams  # noqa: PLC0415

    if "CRDS_PATH" not in os.environ:
        return []
    params = crds_parameters(meta.header)
    wanted = {jwstparams.pars_reftype(a): a for a in jwstparams.STEP_CLASSES}
    wanted[jwstparams.pars_reftype(None)] = None
    try:
        chosen = _remembered("getrecommendations", params, list(wanted), lambda: _crds().getrecommendations(
            params, reftypes=list(wanted), observatory="jwst",
            context=os.environ.get("CRDS_CONTEXT")))
    except SystemExit:
        raise _unusable_cache(meta.path) from None
    except Exception:  # the rules select nothing for this exposure: no parameters
        return []
    if any("UNDEFINED" in str(v) for v in chosen.values()):
        # a rule selects on a header value outside CRDS_KEYWORDS: ask again with the whole
        # header, as stpipe (which passes the whole model's metadata) would (crds then
        # translates the FITS keywords, which costs a second, so only in this case)
        params = {**_whole_header(meta), **params}
        try:
            chosen = _remembered("getrecommendations", params, list(wanted), lambda: _crds().getrecommendations(
                params, reftypes=list(wanted), observatory="jwst",
                context=os.environ.get("CRDS_CONTEXT")))
        except Exception:
            return []
    found = [r for r in wanted if not str(chosen.get(r, "NOT FOUND")).upper().startswith("NOT FOUND")]
    if not found:
        return []
    try:
        paths = _from_crds(meta, found, params)
    except ReferenceError_ as exc:
        # stpipe would go on with the step defaults, silently changing the results
        raise ReferenceError_(f"{exc} (step-parameter references; --no-crds-pars or "
                              "STPIPE_DISABLE_CRDS_STEPPARS=true goes without them)") from None
    out = []
    for reftype in found:
        res = paths[reftype]
        if res.path is None:
            continue
        try:
            content = jwstparams.read_parameter_file(res.path)
        except Exception as exc:
            raise ReferenceError_(f"{meta.path}: CRDS {reftype} reference: {exc}") from None
        out.append(ParsReference(reftype, wanted[reftype], res.path, res.context, content))
    return out


def _whole_header(meta: ExposureMeta) -> dict[str, str]:
    """Every scalar card of the exposure's primary and SCI headers, as crds takes FITS
    keywords."""
    out: dict[str, str] = {}
    for header in (meta.extra.get("sci_header") or {}, meta.header):
        for key in header:
            value = header[key]
            if key and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[str(key)] = str(value)
    return out


def _missing_from_cache(crds, meta: ExposureMeta, params: dict, reftypes: list[str]) -> None:
    """After ``crds.getreferences`` failed: if it was because a file the rules select is
    not in the local cache (crds then tries to download it, which fails offline), raise
    an error naming that file and the cache. Returns quietly when that is not the cause."""
    try:
        from crds.core import config  # noqa: PLC0415

        chosen = crds.getrecommendations(params, reftypes=list(reftypes), observatory="jwst",
                                         context=os.environ.get("CRDS_CONTEXT"))
        missing = [(reftype, name, Path(config.locate_file(name, "jwst")))
                   for reftype, name in chosen.items()
                   if not str(name).upper().startswith("NOT FOUND")]
        missing = [m for m in missing if not m[2].is_file()]
    except (Exception, SystemExit):
        return
    if missing:
        reftype, name, where = missing[0]
        more = f" (also missing: {', '.join(m[1] for m in missing[1:])})" if missing[1:] else ""
        raise ReferenceError_(
            f"{meta.path}: CRDS selects {name} as the {reftype} reference, but the file is "
            f"missing from the CRDS cache (no {where}; CRDS_PATH={os.environ.get('CRDS_PATH')})"
            f"{more}")


#: FITS keyword -> JWST datamodel path for the header values CRDS rules select on.
#: Given in datamodel form, crds matches them directly; bare FITS keywords would make it
#: import the whole JWST datamodel schema to translate them (seconds per process).
CRDS_KEYWORDS = {
    "TELESCOP": "META.TELESCOPE", "INSTRUME": "META.INSTRUMENT.NAME",
    "DETECTOR": "META.INSTRUMENT.DETECTOR", "FILTER": "META.INSTRUMENT.FILTER",
    "BAND": "META.INSTRUMENT.BAND", "CHANNEL": "META.INSTRUMENT.CHANNEL",
    "CORONMSK": "META.INSTRUMENT.CORONAGRAPH", "LAMP": "META.INSTRUMENT.LAMP_STATE",
    "MODULE": "META.INSTRUMENT.MODULE", "PUPIL": "META.INSTRUMENT.PUPIL",
    "GRATING": "META.INSTRUMENT.GRATING", "EXP_TYPE": "META.EXPOSURE.TYPE",
    "READPATT": "META.EXPOSURE.READPATT", "NOUTPUTS": "META.EXPOSURE.NOUTPUTS",
    "NINTS": "META.EXPOSURE.NINTS", "NGROUPS": "META.EXPOSURE.NGROUPS",
    "NFRAMES": "META.EXPOSURE.NFRAMES", "GROUPGAP": "META.EXPOSURE.GROUPGAP",
    "DRPFRMS1": "META.EXPOSURE.DROP_FRAMES1", "SUBARRAY": "META.SUBARRAY.NAME",
    "SUBSTRT1": "META.SUBARRAY.XSTART", "SUBSTRT2": "META.SUBARRAY.YSTART",
    "SUBSIZE1": "META.SUBARRAY.XSIZE", "SUBSIZE2": "META.SUBARRAY.YSIZE",
    "FASTAXIS": "META.SUBARRAY.FASTAXIS", "SLOWAXIS": "META.SUBARRAY.SLOWAXIS",
    "DATE-OBS": "META.OBSERVATION.DATE", "TIME-OBS": "META.OBSERVATION.TIME",
    "TSOVISIT": "META.VISIT.TSOVISIT", "PATT_NUM": "META.DITHER.POSITION_NUMBER",
}


def crds_parameters(header) -> dict[str, str]:
    """The exposure's CRDS selection parameters, keyed as JWST datamodel paths."""
    return {path: str(header[key]) for key, path in CRDS_KEYWORDS.items()
            if key in header and header[key] is not None}
