"""Reference resolution and reading: the one place that decides which reference file a
step gets.

Order: an explicit per-type override (CLI ``--override`` / config) -> CRDS through the
real ``crds`` client (``CRDS_PATH`` cache, ``CRDS_CONTEXT``, serverless unless a
``CRDS_SERVER_URL`` says otherwise) -> a clear error naming the type. ``N/A`` (from an
override or from CRDS) means "not applicable": the step that needs it is skipped.

Reference arrays are memory-mapped and cut to the exposure's subarray on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet._ckernels import pointer
from streamdet._ckernels._convert import ffi as _convert_ffi, lib as _convert

from . import dqflags
from .buffers import ThreadBuffers, read_at
from .errors import MissingModuleError, ReferenceError_, missing_module
from .exposure import ExposureMeta

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


def crds_version() -> str:
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
# and used again while everything they depend on is unchanged: every CRDS_* variable and
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


def _memo_file() -> Path | None:
    chosen = os.environ.get("STREAMDET_CRDS_MEMO")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamdet" / "crds_lookups.json"


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


def _memo_key(kind: str, params: dict, reftypes: list[str]) -> str | None:
    _apply_crds_defaults()  # as crds will see them
    crds_env = {k: v for k, v in os.environ.items() if k.startswith("CRDS_")}
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
    answer = ask()
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


#: converted reference blocks kept for reuse (see :meth:`References.block`), at most
CACHE_BYTES = 64 * 1024**2

_FLOAT_BITPIX = {-32: np.float32, -64: np.float64, 8: np.uint8, 16: np.int16, 32: np.int32,
                 64: np.int64}


class References:
    """Lazy access to the resolved reference files of one exposure."""

    def __init__(self, meta: ExposureMeta, resolved: dict[str, Resolved],
                 cache_bytes: int = CACHE_BYTES):
        self.meta = meta
        self.resolved = resolved
        self._open: dict[str, fits.HDUList] = {}
        self._checked: set[tuple] = set()  # (reftype, extname, layout) found as expected
        self._fds: dict[str, int] = {}
        self._cache: dict[tuple, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._lock = threading.Lock()
        self._buffers = ThreadBuffers()  # each thread's read buffer and transient block

    def path(self, reftype: str) -> str | None:
        return self.resolved[reftype].path

    def hdul(self, reftype: str) -> fits.HDUList:
        if reftype not in self._open:
            path = self.path(reftype)
            if path is None:
                raise ReferenceError_(f"{self.meta.path}: reference {reftype!r} is N/A")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._open[reftype] = fits.open(path, memmap=True)
            except (OSError, ValueError) as exc:
                raise ReferenceError_(f"{path}: {reftype} reference is not readable FITS ({exc})") from None
        return self._open[reftype]

    def header(self, reftype: str, ext: int | str = 0) -> fits.Header:
        return self.hdul(reftype)[ext].header

    def has(self, reftype: str, extname: str) -> bool:
        return extname in self.hdul(reftype)

    def raw(self, reftype: str, extname: str):
        return self._hdu(reftype, extname).data

    def _hdu(self, reftype: str, extname: str):
        hdul = self.hdul(reftype)
        if extname not in hdul:
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} reference has no "
                                  f"{extname} extension")
        return hdul[extname]

    def number(self, reftype: str, key: str, default=None, kind=int):
        """Header keyword ``key`` of the reference's primary header as ``kind`` (``default``
        when absent or blank), or a one-line error naming the file when it is not a number."""
        value = self.header(reftype).get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} keyword "
                                  f"{key}={value!r} is not a number") from None

    def _cut(self, reftype: str, plane: tuple[int, int]) -> tuple[slice, slice] | None:
        """Rows and columns of a reference plane of shape ``plane`` that cover the
        exposure, or None when it does not cover it."""
        m = self.meta
        if tuple(plane) == (m.ny, m.nx):
            return slice(None), slice(None)
        x0 = m.substrt1 - self.number(reftype, "SUBSTRT1", 1)
        y0 = m.substrt2 - self.number(reftype, "SUBSTRT2", 1)
        if x0 < 0 or y0 < 0 or y0 + m.ny > plane[0] or x0 + m.nx > plane[1]:
            return None
        return slice(y0, y0 + m.ny), slice(x0, x0 + m.nx)

    def window(self, reftype: str, shape: tuple[int, int]) -> tuple[slice, slice]:
        """Rows and columns of a reference plane of ``shape`` that cover the exposure.

        A reference of the exposure's shape is used as it is; a larger one (full frame,
        or a subarray containing ours) is cut using both files' SUBSTRT keywords."""
        cut = self._cut(reftype, tuple(shape))
        if cut is None:
            raise self.shape_error(reftype, "plane", tuple(shape), IMAGE)
        return cut

    def shape(self, reftype: str, extname: str, layout: tuple[str, ...] | None = None, *,
              why: str | None = None) -> tuple[int, ...]:
        """The shape of a reference image extension, checked against the exposure.

        ``layout`` names the axes the caller expects, last two ``ny, nx`` (see
        :data:`IMAGE`): a name ending in ``?`` is a leading axis that may be absent, one
        ending in ``>=N`` needs at least N entries (``why`` then says why, in the error);
        without ``layout`` any leading axes are accepted. Always checked: the extension
        exists and is an image, no axis is empty, and the last two axes cover the
        exposure's subarray. Anything else is a one-line :class:`ReferenceError_` naming
        the file, the reference type and extension, the shape found and the one expected."""
        hdu = self._hdu(reftype, extname)
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)):
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} {extname} is a "
                                  f"{type(hdu).__name__}, not an image")
        shape = tuple(hdu.shape)
        layout = tuple(layout) if layout is not None else ANY_IMAGE
        key = (reftype, extname, layout)
        if key not in self._checked:
            if not _fits_layout(shape, layout):
                raise self.shape_error(reftype, extname, shape, layout, why)
            if self._cut(reftype, shape[-2:]) is None:
                raise self.shape_error(reftype, extname, shape, layout, self._placed(reftype))
            self._checked.add(key)
        return shape

    def shape_error(self, reftype: str, extname: str, shape: tuple[int, ...],
                    layout: tuple[str, ...], why: str | None = None) -> ReferenceError_:
        """The one-line error for a reference array of the wrong shape (``why``, if
        given, ends it)."""
        m = self.meta
        text = (f"{self.path(reftype)}: {reftype.upper()} {extname} has shape {shape}, expected "
                f"[{', '.join(layout)}] covering the exposure's {m.ny}x{m.nx} {m.subarray} "
                f"subarray at (row {m.substrt2}, column {m.substrt1})")
        if any(n == 0 for n in shape):
            why = why or "an axis is empty"
        return ReferenceError_(f"{text}; {why}" if why else text)

    def _placed(self, reftype: str) -> str | None:
        """Where a reference's SUBSTRT keywords put it, when they say it is a subarray."""
        hdr = self.header(reftype)
        if "SUBSTRT1" not in hdr and "SUBSTRT2" not in hdr:
            return None
        x0, y0 = self.number(reftype, "SUBSTRT1", 1), self.number(reftype, "SUBSTRT2", 1)
        if (x0, y0) in ((1, 1), (self.meta.substrt1, self.meta.substrt2)):
            return None
        return f"its SUBSTRT1/SUBSTRT2 place it at (row {y0}, column {x0})"

    def array(self, reftype: str, extname: str, dtype=np.float32, index: tuple = (), *,
              layout: tuple[str, ...] | None = None) -> np.ndarray:
        """A reference array cut to the exposure (the last two axes are cut); ``index``
        selects along the leading axes first, so that only those planes are read.
        ``layout``: the axes expected (see :meth:`shape`)."""
        shape = self.shape(reftype, extname, layout)
        hdu = self.hdul(reftype)[extname]
        if len(index) > len(shape) - 2:
            raise self.shape_error(reftype, extname, shape,
                                   ("n",) * len(index) + ANY_IMAGE)
        rows, cols = self.window(reftype, shape[-2:])
        index = tuple(index) + (slice(None),) * (len(shape) - 2 - len(index))
        bzero = float(hdu.header.get("BZERO", 0.0))
        bscale = float(hdu.header.get("BSCALE", 1.0))
        # positioned reads keep the file out of the process's resident memory
        stored = self._positioned(reftype, extname, index, slice(0, self.meta.ny))
        if stored is not None:
            if bzero == 0.0 and bscale == 1.0:
                return stored.astype(dtype, copy=False)
            return (stored.astype(np.float64) * bscale + bzero).astype(dtype)
        if bzero == 0.0 and bscale == 1.0:
            return np.array(hdu.data[(*index, rows, cols)], dtype=dtype)
        # scaled integers (uint32 DQ stored as int32 + BZERO) cannot be memory-mapped
        # scaled: map the stored integers and apply the scaling to the part read
        stored = self._unscaled(reftype)[extname].data[(*index, rows, cols)]
        return (stored.astype(np.float64) * bscale + bzero).astype(dtype)

    def shared(self, reftype: str, extname: str, *,
               layout: tuple[str, ...] | None = None) -> np.ndarray:
        """:meth:`array` (float32) read once and shared by every step that asks: a
        read-only array (gain and read noise serve both jump and ramp_fit)."""
        self.shape(reftype, extname, layout)
        key = ("shared", reftype, extname)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = self.array(reftype, extname)
            hit.setflags(write=False)
            with self._lock:
                hit = self._cache.setdefault(key, hit)
        return hit

    def block(self, reftype: str, extname: str, index: tuple = (), rows: slice = slice(None), *,
              nan_to_zero: bool = False, cache: bool = False, transient: bool = False
              ) -> np.ndarray:
        """Like :meth:`array` (float32, cut to the exposure, ``index`` selecting along the
        leading axes) restricted to the exposure's rows ``rows``, read with positioned
        reads rather than through a memory map, so that reading a large reference (a 4-D
        dark) a band at a time neither copies whole planes nor adds the file to the
        process's resident memory. ``nan_to_zero`` replaces NaN by 0 (for a reference
        that is subtracted with NaN meaning "no correction": ``x - 0`` is ``x`` exactly).
        ``cache`` keeps the result for the next identical call while the cache has room
        (for blocks used again and again, such as the last dark integration that every
        later science integration uses); the returned array must then not be modified.
        ``transient`` (without ``cache``) returns this thread's reusable block buffer,
        valid until the thread's next transient block: for a block used at once and
        dropped, which then costs no fresh memory (and its page faults) per call.
        Thread-safe."""
        rows = slice(*rows.indices(self.meta.ny))
        key = (reftype, extname, tuple(_index_key(i) for i in index), rows.start, rows.stop,
               nan_to_zero)
        if cache:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
        hdu = self._hdu(reftype, extname)
        scaled = (float(hdu.header.get("BZERO", 0.0)) != 0.0
                  or float(hdu.header.get("BSCALE", 1.0)) != 1.0)
        out = None if scaled else self._positioned(reftype, extname, tuple(index), rows,
                                                   nan_to_zero=nan_to_zero,
                                                   transient=transient and not cache)
        if out is None:
            out = self.array(reftype, extname, index=tuple(index))[..., rows, :]
            if nan_to_zero:
                out = np.where(np.isnan(out), 0, out)
        out = out.astype(np.float32, copy=False)
        if cache:
            with self._lock:
                if out.nbytes <= self._cache_left and key not in self._cache:
                    out.setflags(write=False)
                    self._cache[key] = out
                    self._cache_left -= out.nbytes
        return out

    def _positioned(self, reftype: str, extname: str, index: tuple, rows: slice, *,
                    nan_to_zero: bool = False, transient: bool = False) -> np.ndarray | None:
        """The stored values (native byte order, not scaled) of an uncompressed image
        extension, cut to the exposure's rows ``rows`` and columns, ``index`` selecting
        along the leading axes (ints drop an axis, slices keep it); read with positioned
        reads. None when the extension is not a plain image or ``index`` holds other
        selections. ``nan_to_zero`` replaces NaN by 0 on the way."""
        shape = self.shape(reftype, extname)
        hdu = self.hdul(reftype)[extname]
        nlead = len(shape) - 2
        native = _FLOAT_BITPIX.get(hdu.header.get("BITPIX"))
        if (native is None or len(shape) < 2 or len(index) > nlead
                or not isinstance(hdu, (fits.ImageHDU, fits.PrimaryHDU))
                or isinstance(hdu, fits.CompImageHDU)
                or not all(isinstance(i, (slice, int, np.integer)) for i in index)
                or any(isinstance(i, slice) and i.step not in (None, 1) for i in index)):
            return None
        ref_rows, ref_cols = self.window(reftype, shape[-2:])
        ny_ref, nx_ref = shape[-2:]
        y0 = (ref_rows.start or 0) + rows.start
        nrows = rows.stop - rows.start
        axes = []
        out_lead = []
        for axis, size in enumerate(shape[:nlead]):
            pick = index[axis] if axis < len(index) else slice(None)
            if isinstance(pick, slice):
                picked = range(*pick.indices(size))
                out_lead.append(len(picked))
            else:
                k = int(pick)
                if not -size <= k < size:
                    raise ReferenceError_(f"{self.path(reftype)}: {reftype} {extname} has no "
                                          f"plane {k} along axis {axis}")
                picked = range(k % size, k % size + 1)
            axes.append(picked)
        planes = [0]
        for axis, picked in enumerate(axes):
            planes = [p * shape[axis] + k for p in planes for k in picked]
        itemsize = np.dtype(native).itemsize
        raw = self._buffers.get("read", (len(planes), nrows, nx_ref),
                                np.dtype(native).newbyteorder(">"))
        fd = self._fd(reftype)
        start = hdu.fileinfo()["datLoc"]
        for j, plane in enumerate(planes):
            if not read_at(fd, raw[j], start + ((plane * ny_ref + y0) * nx_ref) * itemsize):
                raise ReferenceError_(f"{self.path(reftype)}: {reftype} {extname} is truncated")
        if ref_cols != slice(None) and (ref_cols.start, ref_cols.stop) != (0, nx_ref):
            raw = raw[:, :, ref_cols]
        # a copy either way (``raw`` is the reused read buffer): float32, the common case,
        # is swapped to native order with NaN replaced in one C pass outside the GIL
        if native is np.float32 and raw.flags.c_contiguous:
            out = (self._buffers.get("transient", raw.shape, np.float32) if transient
                   else np.empty(raw.shape, np.float32))
            _convert.streamdet_float32_from_big_endian(
                pointer(_convert_ffi, raw.view(np.uint32)), pointer(_convert_ffi, out), raw.size,
                nan_to_zero)
        else:
            out = raw.astype(native)  # (numpy releases the GIL for a casting copy)
            if nan_to_zero and out.dtype.kind == "f":
                np.copyto(out, 0, where=np.isnan(out))
        return out.reshape(*out_lead, nrows, out.shape[-1])

    def drop_buffers(self) -> None:
        """Free the threads' read and transient-block buffers (the integration pass is
        over: the band pass reads no blocks, and its memory should not carry them)."""
        self._buffers.drop()

    def _fd(self, reftype: str) -> int:
        with self._lock:
            fd = self._fds.get(reftype)
            if fd is None:
                fd = self._fds[reftype] = os.open(self.path(reftype), os.O_RDONLY)
            return fd

    def _unscaled(self, reftype: str) -> fits.HDUList:
        key = f"{reftype}:unscaled"
        if key not in self._open:
            self._open[key] = fits.open(self.path(reftype), memmap=True,
                                        do_not_scale_image_data=True)
        return self._open[key]

    def dq(self, reftype: str, extname: str = "DQ", index: tuple = (), *,
           layout: tuple[str, ...] | None = None) -> np.ndarray:
        """A reference DQ array decoded to JWST flag values and cut to the exposure."""
        raw = self.array(reftype, extname, dtype=np.uint32, index=index, layout=layout)
        dq_def = self.raw(reftype, "DQ_DEF") if self.has(reftype, "DQ_DEF") else None
        columns = {c.upper() for c in (getattr(getattr(dq_def, "dtype", None), "names", None)
                                       or ())}
        if dq_def is not None and not {"BIT", "NAME"} <= columns:
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} DQ_DEF is not a "
                                  "table with BIT and NAME columns")
        return dqflags.decode_with_dq_def(raw, dq_def)

    def close(self) -> None:
        for hdul in self._open.values():
            hdul.close()
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()


#: the image axes every reference array ends with
IMAGE = ("ny", "nx")
#: any leading axes, then the image axes
ANY_IMAGE = ("...", *IMAGE)


def _fits_layout(shape: tuple[int, ...], layout: tuple[str, ...]) -> bool:
    """Whether ``shape`` has the axes ``layout`` names (see :meth:`References.shape`):
    ``name?`` is an optional leading axis, ``...`` any number of them, ``name>=N`` an
    axis of at least N entries; no axis may be empty."""
    if len(shape) < 2 or any(n <= 0 for n in shape):
        return False
    lead, names = shape[:-2], list(layout[:-2])
    if "..." in names:
        return len(lead) >= len([a for a in names if a not in ("...",) and not a.endswith("?")])
    # optional axes are dropped from the front, as many as the shape lacks
    drop = len(names) - len(lead)
    optional = [i for i, a in enumerate(names) if a.endswith("?")]
    if drop < 0 or drop > len(optional):
        return False
    kept = [a for i, a in enumerate(names) if i not in optional[:drop]]
    for size, name in zip(lead, kept):
        if ">=" in name and size < int(name.split(">=", 1)[1]):
            return False
    return True


def _index_key(pick):
    return (pick.start, pick.stop, pick.step) if isinstance(pick, slice) else int(pick)
