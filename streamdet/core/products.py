"""Products: the arrays a rate-producing step fills, and writing them as jwst does.

``_rate.fits`` (ImageModel), ``_rateints.fits`` (CubeModel) and the saved ramps
(``_ramp.fits``, ``_<step>.fits``: RampModel) are built through stdatamodels' JWST models,
so they carry the ASDF extension stpipe reads, validate against the schemas, and hold the
input's metadata the way jwst's ramp_fit carries it (``model.update(input)``: every
PRIMARY and SCI keyword the schema maps). The input's metadata model is built from its
headers alone, when the products are written (the schemas load then, once per process).

Arrays that grow with the number of integrations (rateints, ramps) stay in scratch files
(:class:`CubeStore`): stdatamodels writes every header and the ASDF extension while the
model holds untouched zero pages of the right shape; the data of those extensions is
then copied from the scratch files, which hold it in FITS form.

Files are written to a hidden temporary name in the output directory and renamed into
place, so a reader never sees a partial product.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import json
import mmap
import os
import pickle
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from astropy.io import fits

from .buffers import read_at, write_at
from .caches import cache_file
from .errors import BadInputError
from .exposure import ExposureMeta, product_base_name
from .fits_unsigned import bzero, from_stored, offset_signed, stored_dtype, to_stored
from .jwstparams import plain

#: the products every run writes (a saved ramp and a step's extra products come on top)
RATE_PRODUCTS = ("rate", "rateints")


def product_path(directory: str | os.PathLike, source: str | os.PathLike, kind: str) -> Path:
    """Where product ``kind`` (``rate``, ``rateints``, ``ramp``, a step's name for a
    ramp saved after it, ``fitopt``...) of the exposure file ``source`` goes in
    ``directory``: ``<base>_<kind>.fits``, jwst's naming."""
    return Path(directory) / f"{product_base_name(source)}_{kind}.fits"


def output_paths(source: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                 save_ramp: bool = False, save_after: Iterable[str] = (),
                 extra: Iterable[str] = ()) -> dict[str, Path]:
    """Product kind -> path for the exposure file ``source``: ``rate``, ``rateints``,
    ``ramp`` (with ``save_ramp``), one ramp for each step of ``save_after`` (keyed and
    suffixed by the step's name) and the ``extra`` kinds steps add; in ``output_dir``,
    else beside ``source``. The engine, the command line's name check and the daemon all
    name products through this function."""
    directory = Path(output_dir) if output_dir else Path(source).parent
    kinds = (*RATE_PRODUCTS, *(("ramp",) if save_ramp else ()), *save_after, *extra)
    return {kind: product_path(directory, source, kind) for kind in dict.fromkeys(kinds)}


@dataclass
class RateArrays:
    """Rate, its error and variances and DQ; 2-D for the exposure, 3-D per integration."""

    sci: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray

    EXTENSIONS = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")

    @classmethod
    def allocate(cls, shape: tuple[int, ...]) -> "RateArrays":
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                   np.zeros(shape, np.uint32), np.zeros(shape, np.float32),
                   np.zeros(shape, np.float32))

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, f.name) for f in fields(self)]

    def put(self, index, other: "RateArrays") -> None:
        for mine, theirs in zip(self.arrays(), other.arrays()):
            mine[index] = theirs


class CubeStore:
    """Arrays with an integration axis first (rateints ``[nints, ny, nx]``, a saved ramp
    ``[nints, ngroups, ny, nx]``) kept in raw scratch files, so that memory does not grow
    with the number of integrations: bands are written with positioned writes (a band's
    rows of one plane are one stretch of the file) and, at the end, each file's bytes are
    copied into the product by the kernel. The files hold the data in FITS form
    (big-endian, unsigned integers offset to signed as BZERO says): the band threads
    convert their own rows, in C without the GIL, so that writing the product is a copy
    rather than a serial byte swap of every value. (Memory maps would cost page faults
    and, when unmapped, TLB shootdowns that stall the other band threads.)"""

    def __init__(self, shape: tuple[int, ...], directory: Path | None,
                 extensions: tuple[tuple[str, type], ...] | None = None):
        self.shape = tuple(shape)
        self.extensions = extensions or tuple(zip(RateArrays.EXTENSIONS, RATE_DTYPES))
        self.files = []  # (open nameless file, dtype) per extension
        for extname, dtype in self.extensions:
            # nameless (O_TMPFILE, else unlinked at once): nothing is left behind however
            # the process ends; the space is freed when the file is closed
            f = tempfile.TemporaryFile(prefix=f"streamdet-{extname.lower()}-", dir=directory)
            f.truncate(int(np.prod(self.shape)) * np.dtype(dtype).itemsize)
            self.files.append((f, np.dtype(dtype)))

    def close(self) -> None:
        for f, _ in self.files:
            f.close()

    def put(self, index, other) -> None:
        """Store ``other`` (RateArrays, or arrays in the order of the extensions) at
        ``index``: every leading axis whole (the first may be one integration, an int)
        and a slice of rows (``np.s_[:, rows]``, ``np.s_[i, :, rows]``)."""
        arrays = other.arrays() if isinstance(other, RateArrays) else other
        index = index if isinstance(index, tuple) else (index,)
        rows = index[-1]
        first_plane = 0
        lead = index[:-1]
        if lead and isinstance(lead[0], (int, np.integer)):
            planes_per_int = int(np.prod(self.shape[1:-2], dtype=np.int64))
            first_plane, lead = int(lead[0]) * planes_per_int, (slice(None),) + lead[1:]
        if (len(index) != len(self.shape) - 1 or not isinstance(rows, slice)
                or any(i != slice(None) for i in lead)):
            raise ValueError(f"CubeStore.put takes whole leading axes and a row slice, not {index}")
        ny, nx = self.shape[-2:]
        r0, r1, step = rows.indices(ny)
        if step != 1:
            raise ValueError("CubeStore.put takes contiguous rows")
        from streamdet._ckernels import pointer  # noqa: PLC0415
        from streamdet._ckernels._scratch import ffi, lib  # noqa: PLC0415

        for (extname, _), (f, dtype), theirs in zip(self.extensions, self.files, arrays):
            # one piece per plane, each contiguous (a band's rows of a plane); a view of
            # the band's arrays when they allow it
            pieces = np.asarray(theirs, dtype=dtype).reshape(-1, (r1 - r0) * nx)
            if pieces.shape[1] > 1 and pieces.strides[1] != dtype.itemsize:
                pieces = np.ascontiguousarray(pieces)
            plane_bytes = ny * nx * dtype.itemsize
            status = lib.streamdet_write_pieces(
                f.fileno(), pointer(ffi, pieces), pieces.strides[0], pieces.shape[0],
                pieces.shape[1], dtype.itemsize, int(offset_signed(dtype)),
                first_plane * plane_bytes + r0 * nx * dtype.itemsize, plane_bytes)
            if status:
                raise OSError(-status, f"scratch file of {extname}: {os.strerror(-status)}")

    def plane(self, k: int, i: int) -> np.ndarray:
        """Extension ``k``'s integration ``i`` (a fresh array)."""
        f, dtype = self.files[k]
        stored = np.empty(self.shape[1:], stored_dtype(dtype))
        if not read_at(f.fileno(), stored, i * stored.nbytes):
            raise OSError(f"scratch file of {self.extensions[k][0]} ends before integration {i}")
        return from_stored(stored, dtype) if offset_signed(dtype) else stored.astype(dtype)

    def write_plane(self, k: int, i: int, plane: np.ndarray) -> None:
        """Extension ``k``'s integration ``i`` replaced by ``plane``."""
        f, dtype = self.files[k]
        stored = to_stored(plane, dtype)
        write_at(f.fileno(), stored, i * stored.nbytes)

    def copy_into(self, k: int, fd: int, offset: int) -> int:
        """Extension ``k``'s data, as FITS stores it, copied to ``fd`` at byte ``offset``
        by the kernel (copy_file_range; by reading and writing where the file systems
        do not allow it); returns the bytes copied."""
        f, dtype = self.files[k]
        size = int(np.prod(self.shape)) * dtype.itemsize
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(f.fileno(), fd, size - done, done, offset + done)
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY or done:
                    raise
                break
            if n == 0:
                raise OSError(f"scratch file of {self.extensions[k][0]} ends early")
            done += n
        chunk = np.empty(min(size - done, 16 * 1024**2), np.uint8)
        while done < size:
            piece = chunk[:min(chunk.size, size - done)]
            if not read_at(f.fileno(), piece, done):
                raise OSError(f"scratch file of {self.extensions[k][0]} ends early")
            write_at(fd, piece, offset + done)
            done += piece.size
        return size


#: why copy_file_range may refuse a copy the slow way can make (no such call, files on
#: two file systems, a file system without it)
_NO_KERNEL_COPY = {getattr(errno, name) for name in
                   ("ENOSYS", "EXDEV", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "EBADF")
                   if hasattr(errno, name)}


RATE_DTYPES = (np.float32, np.float32, np.uint32, np.float32, np.float32)


#: what astropy says for every long comment stdatamodels writes (jwst silences it too)
_LONG_CARD = "Card is too long, comment will be truncated"


_quiet_lock = threading.Lock()
_quiet_writes = 0
_quiet_scope: "warnings.catch_warnings | None" = None


@contextmanager
def quiet_long_cards():
    """Silence astropy's long-comment warning while products are written.

    Entered by the thread that runs a write, around the writer threads it starts and
    joins: the filter is in place for them, and once the last write in progress ends
    the process's filters are put back as they were before the first began (runs on
    several threads of one process, as on a Dask worker, share one scope, since
    ``warnings.catch_warnings`` blocks must not interleave). A filter set when this
    module is imported would be lost if that import happened inside someone's
    ``catch_warnings()`` block (a test's), and the writers' warnings would reach them."""
    global _quiet_writes, _quiet_scope
    with _quiet_lock:
        if _quiet_writes == 0:
            _quiet_scope = warnings.catch_warnings()
            _quiet_scope.__enter__()
            warnings.filterwarnings("ignore", message=_LONG_CARD)
        _quiet_writes += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_writes -= 1
            if _quiet_writes == 0:
                _quiet_scope.__exit__(None, None, None)
                _quiet_scope = None

#: bytes of a FITS block (a blank primary header is one)
_BLOCK = 2880

#: the products' model classes (stdatamodels.jwst.datamodels)
MODEL_OF = {"rate": "ImageModel", "rateints": "CubeModel", "ramp": "RampModel"}

#: FILETYPE of each product kind (the input's says "uncalibrated")
FILETYPE_OF = {"rate": "countrate", "rateints": "countrate per integration",
               "ramp": "calibrated ramp"}

#: jwst 3.0's Detector1 steps in MIRI order with the status keyword each writes; jwst
#: writes every one of them (SKIPPED when not run), so streamdet writes the same set.
#: Steps streamdet does not ship are SKIPPED unless a plugin of that name ran.
JWST_MIRI_STEPS = (("group_scale", "S_GRPSCL"), ("dq_init", "S_DQINIT"),
                   ("emicorr", "S_MIREMI"), ("saturation", "S_SATURA"), ("ipc", "S_IPC"),
                   ("firstframe", "S_FRSTFR"), ("lastframe", "S_LASTFR"),
                   ("reset", "S_RESET"), ("linearity", "S_LINEAR"), ("rscd", "S_RSCD"),
                   ("dark_current", "S_DARK"), ("refpix", "S_REFPIX"),
                   ("charge_migration", "S_CHGMIG"), ("jump", "S_JUMP"),
                   ("picture_frame", "S_PCTFRM"), ("clean_flicker_noise", "S_CLNFNS"),
                   ("persistence", "S_PERSIS"), ("ramp_fit", "S_RAMP"),
                   ("gain_scale", "S_GANSCL"))

#: reference keywords jwst's Detector1 writes for MIRI even when the type is N/A
JWST_MIRI_REFERENCES = ("R_DARK", "R_GAIN", "R_IPC", "R_LINEAR", "R_MASK", "R_READNO",
                        "R_RESET", "R_RSCD", "R_SATURA", "R_SUPERB")

#: the R_* keyword jwst writes for each reference type
REF_KEYWORDS = {"mask": "R_MASK", "saturation": "R_SATURA", "linearity": "R_LINEAR",
                "rscd": "R_RSCD", "dark": "R_DARK", "reset": "R_RESET", "gain": "R_GAIN",
                "readnoise": "R_READNO", "superbias": "R_SUPERB", "ipc": "R_IPC",
                "emicorr": "R_EMICOR", "refpix": "R_REFPIX"}


def ref_keyword(reftype: str) -> str:
    return REF_KEYWORDS.get(reftype, f"R_{reftype.upper()[:6]}")


def fits_safe(text: str) -> str:
    """``text`` in printable ASCII, the only characters a FITS string card holds: other
    characters become Python-style escapes (``\\xe9``, ``\\u2013``, ``\\n``), so a file
    name the filesystem allows can always be recorded, and read back unambiguously."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() and c != "\\" else
                   c.encode("unicode_escape").decode("ascii") if c != "\\" else "\\\\"
                   for c in text)


def rateints_by_integration(rateints: "RateArrays | CubeStore", whole: bool = False):
    """The rateints products piece by piece, for a step that modifies them in place:
    yields ``(first, RateArrays [n, ny, nx])``, one integration at a time (``whole``:
    every integration in one piece). Changes made before the next piece is asked for
    are kept (written back to the scratch files of a CubeStore)."""
    nints = (rateints.shape if isinstance(rateints, CubeStore) else rateints.sci.shape)[0]
    pieces = [(0, nints)] if whole else [(i, i + 1) for i in range(nints)]
    for a, b in pieces:
        if not isinstance(rateints, CubeStore):
            yield a, RateArrays(*(array[a:b] for array in rateints.arrays()))
            continue
        piece = RateArrays(*(np.stack([rateints.plane(k, i) for i in range(a, b)])
                             for k in range(len(rateints.files))))
        yield a, piece
        for k, array in enumerate(piece.arrays()):
            for j, i in enumerate(range(a, b)):
                rateints.write_plane(k, i, array[j])


def probe_writable(directory: Path) -> None:
    """Create a file in ``directory`` and remove it at once (OSError if that fails): the
    one test of writability that holds for root, read-only mounts, ACLs, immutable
    directories and network file systems alike."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".streamdet-probe-", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


def name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory``, or of its nearest
    existing parent, allows (255 if it does not say)."""
    directory = Path(directory)
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_writable(paths: Iterable[Path], overwrite: bool, source: Path) -> None:
    """Refuse (bad input) product paths that are directories, that exist without
    ``overwrite``, or that are the input itself: a product never replaces its input."""
    try:
        source_stat = os.stat(source)
    except OSError:
        source_stat = None
    for path in paths:
        if path.is_dir():
            raise BadInputError(f"{source}: product path {path} is a directory")
        if source_stat is not None and path.exists():
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (source_stat.st_dev, source_stat.st_ino):
                raise BadInputError(
                    f"{source}: the product {path.name} would replace the input itself; "
                    "write the products elsewhere (-o DIR) or rename the input")
        if path.exists() and not overwrite:
            raise BadInputError(f"{source}: product {path} exists; use --overwrite to replace it")


# -- the input's metadata, as jwst's models see it ------------------------------------------

#: the module of each product model class in ``stdatamodels.jwst.datamodels``
_MODEL_MODULE = {"ImageModel": "image", "CubeModel": "cube", "RampModel": "ramp"}

#: packages whose ``__init__`` the products do not need (see :mod:`.deferred_import`)
_DEFERRED_PACKAGES = ("astropy.nddata", "stdatamodels.jwst.datamodels")


def _defer_unneeded_inits() -> None:
    from .deferred_import import defer_package_init  # noqa: PLC0415

    for package in _DEFERRED_PACKAGES:
        defer_package_init(package)


def model_class(name: str) -> type:
    """The ``stdatamodels.jwst.datamodels`` class ``name``, imported from its own module
    only: the package's ``__init__`` (every JWST model, astropy.modeling, and through
    astropy.nddata scipy.sparse and astropy.table: about 0.3 s of CPU) is left for
    whoever needs it."""
    _defer_unneeded_inits()
    module = importlib.import_module(
        f"stdatamodels.jwst.datamodels.{_MODEL_MODULE[name]}")
    return getattr(module, name)


#: the asdf plugins (entry points) the products need: asdf's core extensions and the
#: schemas of the ASDF standard and of the JWST datamodels. No value in the products'
#: trees is an astropy, gwcs or transform object, which would need other extensions.
_ASDF_PLUGINS = {"asdf.extensions": ("asdf._core._integration:get_extensions",),
                 "asdf.resource_mappings": (
                     "asdf_standard.integration:get_resource_mappings",
                     "stdatamodels.jwst.datamodels.integration:get_resource_mappings",
                     "asdf._core._integration:get_json_schema_resource_mappings")}
_plugins: dict | None = None
_plugins_lock = threading.Lock()


def _product_plugins() -> dict | None:
    """The extensions and the resource manager of :data:`_ASDF_PLUGINS`, loaded once;
    None if that fails (then asdf's own configuration serves).

    asdf otherwise loads every installed package's plugins when a model is first made
    (asdf-astropy, gwcs and, through it, scipy.optimize: about 0.5 s of CPU in a
    one-shot run). The schema cache, read first, gives the entry points' distributions
    and asdf's parsed core manifests, which otherwise cost a scan of every installed
    distribution's entry points and ~0.03 s of YAML parsing."""
    global _plugins
    with _plugins_lock:
        if _plugins is None:
            _defer_unneeded_inits()  # before the JWST schemas' entry point is loaded
            try:
                from importlib.metadata import EntryPoint  # noqa: PLC0415

                from asdf.extension import ExtensionProxy  # noqa: PLC0415
                from asdf.resource import ResourceManager, ResourceMappingProxy  # noqa: PLC0415

                import asdf  # noqa: PLC0415

                _read_schema_cache()
                with _kept_lock:
                    if not _plugin_dists:
                        _plugin_dists.update(_find_plugin_dists())
                    dists = dict(_plugin_dists)

                def load(group, proxy) -> list:
                    found = []
                    for value in _ASDF_PLUGINS[group]:
                        package, version = dists[value]
                        elements = EntryPoint(package, value, group).load()()
                        for element in elements if isinstance(elements, list) else [elements]:
                            found.append(proxy(element, package_name=package,
                                               package_version=version))
                    return found

                mappings = load("asdf.resource_mappings", ResourceMappingProxy)
                manager = ResourceManager(mappings)
                with asdf.config_context() as config, _manifests_kept():
                    # the core extensions read their manifests through this manager
                    config._resource_mappings, config._resource_manager = mappings, manager
                    extensions = load("asdf.extensions", ExtensionProxy)
                _plugins = {"extensions": extensions, "resource_mappings": mappings,
                            "resource_manager": manager}
                _parse_schemas_once(manager)
            except Exception:  # an asdf without these internals: its own full configuration
                _plugins = {}
    return _plugins or None


def _find_plugin_dists() -> dict[str, tuple[str, str]]:
    """Entry point of :data:`_ASDF_PLUGINS` -> (distribution name, version), as the
    installed packages declare them (KeyError when one is not declared)."""
    from importlib.metadata import entry_points  # noqa: PLC0415

    found = {}
    for group, values in _ASDF_PLUGINS.items():
        points = {p.value: p for p in entry_points(group=group)}
        for value in values:
            found[value] = (points[value].dist.name, points[value].dist.version)
    return found


class _ManifestLoader:
    """Stands for the ``yaml`` module in asdf's manifest reader while the products'
    extensions load: a manifest whose text was parsed before (by this process or, through
    the schema cache, an earlier one) is not parsed again. Keyed by the text itself, so
    what it returns is what parsing that text gives."""

    def __init__(self, yaml):
        self._yaml = yaml

    def safe_load(self, text):
        key = hashlib.sha256(text.encode() if isinstance(text, str) else bytes(text)).hexdigest()
        with _kept_lock:
            kept = _manifests.get(key)
        if kept is not None:
            return pickle.loads(kept)  # a fresh copy, as parsing would give
        parsed = self._yaml.safe_load(text)
        with contextlib.suppress(Exception), _kept_lock:
            _manifests.setdefault(key, pickle.dumps(parsed, protocol=pickle.HIGHEST_PROTOCOL))
        return parsed

    def __getattr__(self, name):
        return getattr(self._yaml, name)


@contextmanager
def _manifests_kept():
    """asdf's extension manifests read through :class:`_ManifestLoader` for the duration
    (other threads reading manifests meanwhile get the same results as from yaml)."""
    try:
        from asdf.extension import _manifest  # noqa: PLC0415
    except ImportError:
        yield
        return
    real = getattr(_manifest, "yaml", None)
    if real is None or isinstance(real, _ManifestLoader):
        yield
        return
    _manifest.yaml = _ManifestLoader(real)
    try:
        yield
    finally:
        _manifest.yaml = real


def _parse_schemas_once(manager) -> None:
    """Make asdf parse each schema of ``manager`` once per process.

    asdf gives every validator it makes (one per product written, per history entry,
    per input value checked) a fresh reference resolver whose loader parses the YAML
    of every schema a ``$ref`` names again: about 25 schemas per product. The schemas
    of the products' resource manager are package files that do not change, and
    validators only read them, so the parsed documents are kept and shared. Only
    loads made under the products' configuration (:func:`_asdf_scope`) are cached;
    any other asdf user in the process loads as asdf does."""
    import asdf.schema as asdf_schema  # noqa: PLC0415

    original = asdf_schema._make_schema_loader
    if getattr(original, "_streamdet", False):
        return

    def make_loader():
        load = original()

        def cached(url):
            if asdf_schema.get_config().resource_manager is not manager:
                return load(url)
            with _parsed_lock:
                found = _parsed.get(url)
            if found is None:
                found = load(url)
                with _parsed_lock:
                    _parsed.setdefault(url, found)
            return found

        return cached

    make_loader._streamdet = True
    asdf_schema._make_schema_loader = make_loader


@contextmanager
def _asdf_scope():
    """This thread's asdf configuration while it makes or writes products: only the
    extensions the products need (asdf keeps one configuration stack per thread)."""
    plugins = _product_plugins()
    if plugins is None:
        yield
        return
    import asdf  # noqa: PLC0415

    with asdf.config_context() as config:
        config._extensions = list(plugins["extensions"])
        config._resource_mappings = list(plugins["resource_mappings"])
        config._resource_manager = plugins["resource_manager"]
        yield


#: keywords that describe the data layout of an HDU, not the exposure
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4", "EXTEND",
               "BZERO", "BSCALE", "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME", "EXTVER",
               "CHECKSUM", "DATASUM"}

#: the products' schemas: resolved, by model class name, and as asdf's loader parses them
#: for validation, by URL; filled once per process, or from the schema cache
_schemas: dict[str, dict] = {}
_parsed: dict[str, Any] = {}
_schemas_lock = threading.Lock()
_parsed_lock = threading.Lock()
#: asdf's parsed extension manifests (pickled, by the SHA-256 of their text) and the
#: distribution (name, version) of each entry point of :data:`_ASDF_PLUGINS`
_manifests: dict[str, bytes] = {}
_plugin_dists: dict[str, tuple[str, str]] = {}
_kept_lock = threading.Lock()

# -- the schemas kept between processes ----------------------------------------------------
#
# Parsing the products' YAML schemas and resolving their references costs about 0.1 s of
# CPU in every process, for a result that changes only with the installed asdf,
# asdf-standard and stdatamodels. So it is kept in a pickle (STREAMDET_SCHEMA_CACHE,
# default ~/.cache/streamdet/product_schemas.pickle; "off" disables it), keyed by those
# versions, Python's, and the name, size and modification time of every JWST schema file
# (an editable stdatamodels changes them under one version). A file with another key is
# ignored and replaced; one that cannot be read or written costs only the time saved.
# The same file keeps asdf's parsed core manifests (by their text) and the distributions
# of the asdf entry points the products use (which are those three packages').

_SCHEMA_CACHE_FORMAT = 1
_schema_cache_state = {"key": None, "loaded": 0}


def _schema_cache_file() -> Path | None:
    return cache_file("STREAMDET_SCHEMA_CACHE", "product_schemas.pickle")


def _schema_sources_key() -> str:
    import asdf  # noqa: PLC0415
    import asdf_standard  # noqa: PLC0415
    import stdatamodels  # noqa: PLC0415

    jwst_schemas = Path(stdatamodels.__file__).parent / "jwst" / "datamodels" / "schemas"
    files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                   for e in os.scandir(jwst_schemas) if e.is_file())
    blob = json.dumps([_SCHEMA_CACHE_FORMAT, sys.version, asdf.__version__,
                       getattr(asdf_standard, "__version__", "?"), stdatamodels.__version__,
                       files])
    return hashlib.sha256(blob.encode()).hexdigest()


def _kept_count() -> int:
    return len(_schemas) + len(_parsed) + len(_manifests) + len(_plugin_dists)


def _read_schema_cache() -> None:
    """Fill :data:`_schemas`, :data:`_parsed`, :data:`_manifests` and
    :data:`_plugin_dists` from the schema cache when its key is current (called once,
    when the products' asdf configuration is made)."""
    path = _schema_cache_file()
    if path is None:
        return
    key = _schema_sources_key()
    _schema_cache_state["key"] = key
    try:
        with open(path, "rb") as f:
            kept = pickle.load(f)
    except Exception:  # absent, unreadable or from another format: parsed anew
        return
    if not isinstance(kept, dict) or kept.get("key") != key:
        return
    with _schemas_lock, _parsed_lock, _kept_lock:
        _schemas.update(kept["resolved"])
        _parsed.update(kept["parsed"])
        _manifests.update(kept.get("manifests", {}))
        _plugin_dists.update(kept.get("plugin_dists", {}))
        _schema_cache_state["loaded"] = _kept_count()


def _write_schema_cache() -> None:
    """Keep the schemas parsed so far when the cache lacks some of them (called after
    products are written, when validation has parsed what it needs)."""
    path = _schema_cache_file()
    key = _schema_cache_state["key"]
    if path is None or key is None:
        return
    with _schemas_lock, _parsed_lock, _kept_lock:
        if _kept_count() <= _schema_cache_state["loaded"]:
            return
        kept = {"key": key, "resolved": dict(_schemas), "parsed": dict(_parsed),
                "manifests": dict(_manifests), "plugin_dists": dict(_plugin_dists)}
        _schema_cache_state["loaded"] = _kept_count()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=".product_schemas.",
                                         suffix=".tmp", delete=False) as out:
            pickle.dump(kept, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(out.name, path)
    except Exception:  # a read-only home: the next process parses them again
        with contextlib.suppress(OSError, NameError):
            os.unlink(out.name)


def new_model(name: str, *args, **kwargs):
    """A new ``stdatamodels.jwst.datamodels`` model of class ``name``, given its
    resolved schema loaded once per process: a model made without one deep-copies the
    whole resolved schema (~15 ms of CPU each). The model's schema tree is only read
    (stdatamodels merges it into a new tree with shallow copies), so sharing it is
    safe."""
    cls = model_class(name)
    with _schemas_lock:
        schema = _schemas.get(name)
        if schema is None:
            import asdf.schema  # noqa: PLC0415

            schema = _schemas[name] = asdf.schema.load_schema(cls.schema_url,
                                                              resolve_references=True)
    return cls(*args, schema=schema, **kwargs)


class InputMetadata:
    """The input's metadata as a stdatamodels RampModel (what jwst's ramp_fit carries
    over), built from copies of its headers and small tables, never from its SCI.

    The model is built on first use, by the writing thread, so that the schema's
    complaints about the input's values can be caught (``warnings.catch_warnings`` is
    not thread-safe): a value the schema refuses is not carried over, as in jwst, and is
    listed in :attr:`rejected` (recorded in the products' provenance) rather than
    printed."""

    def __init__(self, meta: ExposureMeta):
        primary = fits.PrimaryHDU(header=_layout_free(meta.header))
        sci = fits.ImageHDU(header=_layout_free(meta.extra.get("sci_header", fits.Header())),
                            name="SCI")
        hdus = [primary, sci]
        for name in ("GROUP", "INT_TIMES"):
            table = meta.int_times if name == "INT_TIMES" else meta.extra.get("group")
            if table is not None and table.data is not None:
                hdus.append(fits.BinTableHDU(data=table.data.copy(), header=table.header.copy(),
                                             name=name))
        self._hdulist = fits.HDUList(hdus)
        self._model = None
        self.rejected: list[str] = []
        self._asdf = meta.extra.get("asdf")

    @classmethod
    def beside(cls, meta: ExposureMeta) -> Future:
        """The :class:`InputMetadata` of ``meta``, built on a thread of its own (a future
        to take it from at writing). A table HDU's constructor imports astropy.table
        (~0.08 s, once per process; stdatamodels needs it at writing anyway), which then
        overlaps the run's set-up: reading references is mostly file reads and C outside
        the GIL. The thread does not read the input: opening it read and checked the
        tables (:class:`~.exposure.Exposure`)."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="streamdet-metadata")
        try:
            return pool.submit(cls, meta)
        finally:
            pool.shutdown(wait=False)

    def earlier_provenance(self) -> Any:
        """The ``streamdet`` section of a saved ramp's metadata tree (the run that made
        it), or None."""
        if not self._asdf:
            return None
        if not hasattr(self, "_earlier"):
            self._earlier = self._read_earlier()
        return self._earlier

    def _read_earlier(self) -> Any:
        try:
            import asdf  # noqa: PLC0415

            with _asdf_scope(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with asdf.open(io.BytesIO(self._asdf), lazy_load=False, memmap=False,
                               _force_raw_types=True) as tree:
                    found = tree.tree.get("streamdet")
                    return plain(found) if found is not None else None
        except Exception:  # a foreign or damaged tree: nothing to carry on
            return None

    def model(self):
        if self._model is None:
            from stdatamodels.validate import ValidationWarning  # noqa: PLC0415

            with _asdf_scope(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ValidationWarning)
                try:
                    self._model = new_model("RampModel", self._hdulist)
                except Exception as exc:  # metadata must not cost the products
                    self._model = self._without_unreadable_cards(exc)
            self.rejected += [" ".join(str(w.message).split())[:300] for w in caught
                              if issubclass(w.category, ValidationWarning)]
            for w in caught:  # anything else is shown as usual
                if not issubclass(w.category, ValidationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return self._model

    def _without_unreadable_cards(self, error: Exception):
        """The model from the cards whose values astropy can read, or an empty one;
        what was lost is listed in :attr:`rejected`."""
        self.rejected.append(f"input metadata: {' '.join(str(error).split())[:300]}")
        hdus = []
        for hdu in self._hdulist[:2]:
            header = fits.Header()
            for card in hdu.header.cards:
                try:
                    card.verify("exception")
                    header.append((card.keyword, card.value, card.comment), end=True)
                except Exception:
                    self.rejected.append(f"unreadable card {card.keyword!r}")
            hdus.append(type(hdu)(header=header, name=hdu.name) if hdus else
                        fits.PrimaryHDU(header=header))
        try:
            return new_model("RampModel", fits.HDUList(hdus))
        except Exception:
            return new_model("RampModel")


def _layout_free(header: fits.Header) -> fits.Header:
    out = fits.Header()
    for card in header.cards:
        if card.keyword not in _STRUCTURAL:
            out.append(card, end=True)
    return out


# -- what a product records --------------------------------------------------------------

@dataclass
class ProductRecord:
    """What every product of a run records besides its arrays."""

    keywords: dict[str, Any]       # FITS keyword -> value (S_*, R_*, CRDS_*, step results)
    history: list[str]             # HISTORY lines, one a step that ran
    provenance: dict[str, Any]     # the ASDF tree's ``streamdet`` section
    log: list[str]                 # cal_logs["streamdet"]
    #: keywords written only where the input's metadata has none (jwst's steps streamdet
    #: does not run: SKIPPED; its reference types that are not applicable: N/A)
    defaults: dict[str, Any] = field(default_factory=dict)


def _schema_keywords(model) -> dict[str, tuple[str, ...]]:
    """FITS keyword of the PRIMARY header -> the path in ``model``'s tree."""
    from stdatamodels import schema as mschema  # noqa: PLC0415

    found: dict[str, tuple[str, ...]] = {}

    def visit(subschema, path, combiner, ctx, recurse):
        keyword = subschema.get("fits_keyword")
        if keyword and subschema.get("fits_hdu", "PRIMARY") == "PRIMARY":
            found.setdefault(keyword, tuple(path))

    mschema.walk_schema(model._schema, visit)
    return found


_keyword_paths: dict[str, dict[str, tuple[str, ...]]] = {}
_keyword_lock = threading.Lock()


def _keyword_path(model, keyword: str) -> tuple[str, ...] | None:
    kind = type(model).__name__
    with _keyword_lock:
        if kind not in _keyword_paths:
            _keyword_paths[kind] = _schema_keywords(model)
    return _keyword_paths[kind].get(keyword)


def _has_keyword(model, keyword: str) -> bool:
    path = _keyword_path(model, keyword)
    if path is None:
        return any(c[0] == keyword for c in
                   model._instance.get("extra_fits", {}).get("PRIMARY", {}).get("header", []))
    node = model._instance
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
    return node is not None


def _set_keyword(model, keyword: str, value: Any, comment: str = "") -> None:
    if isinstance(value, str):  # e.g. an --override path: a FITS card holds ASCII only
        value = fits_safe(value)
    path = _keyword_path(model, keyword)
    if path is None:  # not in the schema (a plugin step's status...): carried as extra FITS
        extra = model._instance.setdefault("extra_fits", {}).setdefault("PRIMARY", {})
        cards = [c for c in extra.setdefault("header", []) if c[0] != keyword]
        cards.append([keyword, value, comment])
        extra["header"] = cards
        return
    node = model
    for name in path[:-1]:
        node = getattr(node, name)
    setattr(node, path[-1], value.item() if isinstance(value, np.generic) else value)


def build_model(kind: str, source, record: ProductRecord, arrays: dict[str, np.ndarray],
                tables: dict[str, Any] | None = None):
    """A product model: the input's metadata carried over as jwst's ramp_fit does,
    then this run's keywords, history and provenance, then ``arrays``."""
    with _asdf_scope():
        return _build_model(kind, source, record, arrays, tables)


def _build_model(kind, source, record, arrays, tables):
    # validated once, as a whole, when written (to_fits), not at every assignment
    model = new_model(MODEL_OF[kind], validate_on_assignment=False)
    model.update(source)
    for name, value in (tables or {}).items():
        if value is not None:
            setattr(model, name, value)
    for keyword, value in record.keywords.items():
        _set_keyword(model, keyword, value)
    for keyword, value in record.defaults.items():
        if not _has_keyword(model, keyword):
            _set_keyword(model, keyword, value)
    if kind in ("rate", "rateints"):
        model.meta.bunit_data = model.meta.bunit_err = "DN/s"
    import streamdet  # noqa: PLC0415

    model.meta.calibration_software_version = f"streamdet {streamdet.__version__}"
    model.meta.calibration_software_revision = f"streamdet {streamdet.__version__}"
    _set_keyword(model, "FILETYPE", FILETYPE_OF[kind], "type of data in the file")
    for line in record.history:
        model.add_history_entry(line)
    model.streamdet = record.provenance
    model.cal_logs = {"streamdet": list(record.log)}
    for name, array in arrays.items():
        setattr(model, name, array)
    return model


def _note_input(record: ProductRecord, source: InputMetadata) -> None:
    """What the provenance says of the input: values not carried, and the record of the
    run that saved a ramp this run resumed from."""
    if source.rejected:
        record.provenance["input_values_not_carried"] = list(source.rejected)
    earlier = source.earlier_provenance()
    if earlier is not None and "resumed_from" not in record.provenance:
        record.provenance["resumed_from"] = earlier


def _zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A C-contiguous zero array whose pages are never touched: it stands for a stored
    array while stdatamodels makes the headers and the ASDF tree, and costs no memory."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=dtype,
                         count=int(np.prod(shape, dtype=np.int64))).reshape(shape)


#: model attribute of each stored extension
_ATTRIBUTE = {"SCI": "data", "ERR": "err", "DQ": "dq", "VAR_POISSON": "var_poisson",
              "VAR_RNOISE": "var_rnoise", "GROUPDQ": "groupdq", "PIXELDQ": "pixeldq"}


def _write_model(model, final: Path, tmp: Path, store: "CubeStore | None" = None) -> None:
    """Write ``model`` to ``tmp`` as stdatamodels would save it as ``final``; the
    extensions of ``store`` are copied from it (the model holds placeholders)."""
    from stdatamodels import fits_support  # noqa: PLC0415

    with _asdf_scope():
        model.on_save(str(final))
        model.meta.filename = fits_safe(final.name)
        hdulist = fits_support.to_fits(model._instance, model._schema)
        if store is None:
            hdulist.writeto(tmp, overwrite=True)
            return
        stored = {name: k for k, (name, _) in enumerate(store.extensions)}
        pending: list = []

        def flush() -> None:
            if not pending:
                return
            if tmp.stat().st_size == 0:
                fits.HDUList(pending).writeto(tmp, overwrite=True)
            else:  # small extensions after a streamed one: written behind a blank
                # primary header (one block) that is left out
                buffer = io.BytesIO()
                fits.HDUList([fits.PrimaryHDU(), *pending]).writeto(buffer)
                with open(tmp, "ab") as out:
                    out.write(buffer.getbuffer()[_BLOCK:])
            pending.clear()

        for hdu in hdulist:
            if hdu.name in stored and isinstance(hdu, fits.ImageHDU):
                flush()
                _stream_extension(tmp, hdu.header, store, stored[hdu.name])
            else:
                pending.append(hdu)
        flush()


def _stream_extension(path: Path, header: fits.Header, store: "CubeStore", k: int) -> None:
    """Append one image extension whose data is the store's extension ``k`` (kept in
    FITS form, see :class:`CubeStore`): the header as astropy streams it, then the
    data copied from the store's file and the padding to a whole FITS block."""
    dtype = np.dtype(store.extensions[k][1])
    header = header.copy()
    if offset_signed(dtype):  # unsigned integers are stored signed with BZERO, as FITS requires
        header["BSCALE"] = 1
        header["BZERO"] = bzero(dtype)
    fits.StreamingHDU(str(path), header).close()  # writes the header alone
    fd = os.open(path, os.O_WRONLY)
    try:
        start = os.fstat(fd).st_size
        size = store.copy_into(k, fd, start)
        padding = -size % _BLOCK
        if padding:
            write_at(fd, np.zeros(padding, np.uint8), start + size)
    finally:
        os.close(fd)


#: bytes a temporary name adds to its product's name (``.NAME.XXXXXXXX.tmp``: mkstemp's
#: eight random characters, see :func:`_temporary`); the command line refuses an input
#: whose product names leave no room for it
TEMP_NAME_EXTRA = len(".") + len(".XXXXXXXX.tmp")


def _temporary(path: Path) -> Path:
    """A new empty file with a hidden unique name beside ``path`` (mode 0600 until
    :func:`_publish` renames it into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _publish(pairs: list[tuple[Path, Path]], placed: list | None = None) -> None:
    """Give the temporary files the mode of an ordinary new file (mkstemp makes them
    0600) and rename them into place; each file placed is appended to ``placed`` as
    ``(path, st_dev, st_ino)``."""
    umask = os.umask(0)
    os.umask(umask)
    for tmp, _ in pairs:
        os.chmod(tmp, 0o666 & ~umask)
    for tmp, path in pairs:
        st = os.stat(tmp)
        os.replace(tmp, path)
        if placed is not None:
            placed.append((path, st.st_dev, st.st_ino))


def write_products(meta: ExposureMeta, outputs: dict[str, Path], rate: RateArrays,
                   rateints: "RateArrays | CubeStore", record: ProductRecord,
                   source: InputMetadata, placed: list | None = None) -> None:
    """Write ``outputs['rate']`` and ``outputs['rateints']``: both go to temporary names
    first and are renamed into place only when both are complete. Each product renamed
    into place is appended to ``placed`` as ``(path, st_dev, st_ino)``, so that a caller
    whose run fails later can withdraw exactly the files it wrote."""
    written: list[tuple[Path, Path]] = []
    try:
        with quiet_long_cards():
            src = source.model()
            _note_input(record, source)
            jobs = []
            for kind, arrays in (("rate", rate), ("rateints", rateints)):
                streamed = isinstance(arrays, CubeStore)
                data = {_ATTRIBUTE[name]: (_zeros(arrays.shape, dtype) if streamed else array)
                        for (name, dtype), array in zip(
                            zip(RateArrays.EXTENSIONS, RATE_DTYPES),
                            [None] * 5 if streamed else arrays.arrays())}
                tables = {"int_times": src.int_times} if kind == "rateints" else {}
                model = build_model(kind, src, record, data, tables)
                tmp = _temporary(outputs[kind])
                written.append((tmp, outputs[kind]))
                jobs.append((model, outputs[kind], tmp, arrays if streamed else None))
            # the two files at once: much of writing is byte-swapping and file I/O, which
            # release the GIL
            with ThreadPoolExecutor(len(jobs)) as pool:
                for done in [pool.submit(_write_model, *job) for job in jobs]:
                    done.result()
        _publish(written, placed)
        _write_schema_cache()
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()


def write_ramp(meta: ExposureMeta, path: Path, store: "CubeStore", pixeldq: np.ndarray,
               record: ProductRecord, source: InputMetadata,
               average_dark_current: np.ndarray | None = None,
               placed: list | None = None) -> None:
    """A ramp as the chain left it (RampModel, like jwst's ``_ramp.fits`` and the files
    its steps' ``save_results`` write): SCI, PIXELDQ, GROUPDQ, AVDRKCUR, GROUP,
    INT_TIMES."""
    tmp = _temporary(path)
    try:
        src = source.model()
        _note_input(record, source)
        avdrk = (np.zeros((meta.ny, meta.nx), np.float32) if average_dark_current is None
                 else np.asarray(average_dark_current, np.float32))
        arrays = {"data": _zeros(store.shape, np.float32),
                  "groupdq": _zeros(store.shape, np.uint8),
                  "pixeldq": np.asarray(pixeldq, np.uint32),
                  "average_dark_current": avdrk}
        model = build_model("ramp", src, record, arrays,
                            {"group": getattr(src, "group", None),
                             "int_times": src.int_times})
        with quiet_long_cards():
            _write_model(model, path, tmp, store)
        _publish([(tmp, path)], placed)
    finally:
        if tmp.exists():
            tmp.unlink()
