"""Published stpipe steps, unmodified, inside the streaming chain.

MIRI users add third-party stpipe ``Step`` classes to jwst's Detector1 (snowblind's
``SnowblindStep`` after jump, ExoTiC-MIRI's steps...) with ``pre_hooks``/``post_hooks``.
This built-in plugin runs any such class as a streamdet step:

* ``--post-hook jump=snowblind.SnowblindStep`` / ``--pre-hook STEP=pkg.Class`` (or
  ``post_hooks``/``pre_hooks`` lists under ``[steps.STEP]`` in the configuration file)
  insert it after/before a chain step, hooks of one step in the order given;
* ``--use refpix=stpipe:jwst.refpix.RefPixStep`` replaces a chain step by it.

The step's chain name is its ``class_alias`` (else its lower-case class name; a
replacement keeps the name of the step it replaces), and its parameters come from its
``spec`` (``--set snowblind.min_radius=2``), checked by stpipe's own validator.

**What the step is handed.** A stdatamodels ``RampModel`` whose meta is the exposure's
(made from the Level 1B primary header, see :func:`meta_template`), holding one
whole integration by default (``meta.exposure.integration_start``/``integration_end``
say which, as in a segmented file): memory stays one integration, whatever the number
of integrations. The engine gives such an INTEGRATION step a pass of its own when it
follows jump (each integration is read back whole from the band pass's scratch: see
core/engine.py ``stages``). ``ALIAS.granularity=exposure`` hands it the whole exposure
in one model instead (the memory of the whole ramp, several times: the model, the
step's copy of it), for steps that need every integration at once.

**What is taken back.** data, groupdq and pixeldq of the model the step returns; the
status (``meta.cal_step.ALIAS``) as its ``S_*`` keyword; primary-header keywords it set
(through the datamodel schema or ``extra_fits``). Keywords that are rates per unit
exposure (PRIMECRS, EXTNCRS: counts per pixel per second of usable groups) are
combined over the integrations as the step would have computed them on the whole
exposure: each piece's value weighted by the group time it counted.

A post-hook of ramp_fit is handed the rate products instead: an ImageModel of the rate,
then CubeModels of rateints, one integration at a time (engine: ``Step.on_products``).

**References.** The types in the class's ``reference_file_types`` are resolved by
streamdet (``--override``, then CRDS; N/A when neither has one) and handed to the step
as its ``override_<reftype>`` parameters, so its ``get_reference_file`` returns them.

**Logging.** While the step runs, its records (its package's loggers, stpipe's, jwst's
and stcal's) go to the ``streamdet.ALIAS`` logger instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import threading
import warnings
from typing import Any, ClassVar

import numpy as np

from streamdet import hookimpl
from streamdet.core import dqflags
from streamdet.core.errors import BadInputError, PluginError, one_line
from streamdet.core.products import rateints_by_integration
from streamdet.core.step import Granularity, Param, Step

#: ``--use STEP=stpipe:pkg.Class``
PREFIX = "stpipe:"

#: stpipe's and jwst's own parameters of every step, which streamdet decides itself
_FRAMEWORK_PARAMS = {"pre_hooks", "post_hooks", "output_file", "output_dir", "output_ext",
                     "output_use_model", "output_use_index", "save_results", "skip", "suffix",
                     "search_output_file", "input_dir"}

#: primary-header keywords that are counts per pixel per second of counted group time
#: (jwst's jump normalization, which snowblind's EXTNCRS follows): over pieces, the
#: whole exposure's value is the pieces' values weighted by the group time each counted
RATE_KEYWORDS = ("PRIMECRS", "EXTNCRS")

def load_class(path: str, option: str):
    """The stpipe Step class named ``pkg.Class`` (a one-line BadInputError otherwise)."""
    module_name, _, class_name = path.strip().rpartition(".")
    if not module_name or not class_name:
        raise BadInputError(f"{option}: {path!r} is not a class name (pkg.Class)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BadInputError(f"{option}: stpipe step class {path!r} cannot be imported: "
                            f"{type(exc).__name__}: {one_line(exc)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BadInputError(f"{option}: stpipe step class {path!r} cannot be imported: "
                            f"module {module_name!r} has no {class_name!r}")
    try:
        from stpipe import Pipeline, Step as StpipeStep  # noqa: PLC0415
    except ImportError:  # pragma: no cover - stpipe comes with any step class
        raise BadInputError(f"{option}: {path!r}: stpipe is not installed") from None
    if not (isinstance(cls, type) and issubclass(cls, StpipeStep)):
        raise BadInputError(f"{option}: {path!r} is not an stpipe Step class")
    if issubclass(cls, Pipeline):
        raise BadInputError(f"{option}: {path!r} is an stpipe Pipeline, not a Step; "
                            "hook its steps one by one")
    return cls


def alias_of(cls) -> str:
    return getattr(cls, "class_alias", None) or cls.__name__.lower()


def _distribution(cls) -> tuple[str, str]:
    top = cls.__module__.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top) or [top]
    try:
        return names[0], importlib.metadata.version(names[0])
    except importlib.metadata.PackageNotFoundError:
        return names[0], "?"


class SpecParam(Param):
    """A parameter declared in an stpipe ``spec``: coerced and checked by stpipe's own
    validator (``integer(min=1)``, ``option("a", "b")``, lists...)."""

    def coerce(self, step: str, name: str, value: Any) -> Any:
        from stpipe import config_parser  # noqa: PLC0415

        spec = config_parser.ConfigObj([f"{name} = {self.help}"], list_values=False)
        try:
            if isinstance(value, str):  # from the command line: as strun parses it
                is_list = self.help.split("(", 1)[0].endswith("list")
                text = value.strip().strip("[]") if is_list else value
                value = config_parser.ConfigObj([f"{name} = {text}"])[name]
                if is_list and isinstance(value, str):
                    value = [value] if value.strip() else []
            return config_parser.config_from_dict({name: value}, spec)[name]
        except Exception as exc:
            raise BadInputError(f"parameter {step}.{name}: {value!r} is not valid for "
                                f"{self.help} ({one_line(exc)})") from None


def _spec_params(cls) -> dict[str, Param]:
    """The class's own parameters (not stpipe's framework ones), with their defaults."""
    from stpipe import config_parser  # noqa: PLC0415

    spec = cls.load_spec_file()
    defaults = config_parser.config_from_dict({}, spec)
    return {key: SpecParam(object, defaults.get(key), str(spec[key])) for key in spec
            if key not in _FRAMEWORK_PARAMS and not key.startswith("override_")}


def _status_keyword(cls) -> str:
    """The S_* keyword of the step: its own ``fits_keyword`` (snowblind's convention),
    the one jwst's schema gives ``meta.cal_step.ALIAS``, else S_ + the alias."""
    own = getattr(cls, "fits_keyword", None)
    if isinstance(own, str) and own.startswith("S_"):
        return own
    keyword = _schema_keywords().get(f"meta.cal_step.{alias_of(cls)}")
    return keyword or f"S_{alias_of(cls).upper()[:6]}"


_keywords_lock = threading.Lock()
_keywords_cache: dict[str, str] = {}


def _schema_keywords() -> dict[str, str]:
    """Datamodel path -> primary-header FITS keyword, from the RampModel schema."""
    with _keywords_lock:
        if not _keywords_cache:
            from stdatamodels import schema  # noqa: PLC0415
            from stdatamodels.jwst.datamodels import RampModel  # noqa: PLC0415

            def visit(sub, path, combiner, ctx, recurse):
                if isinstance(sub, dict) and "fits_keyword" in sub \
                        and sub.get("fits_hdu", "PRIMARY") == "PRIMARY":
                    _keywords_cache[".".join(str(p) for p in path)] = sub["fits_keyword"]

            schema.walk_schema(RampModel().schema, visit)
        return _keywords_cache


def meta_template(meta, model_class):
    """A datamodel of ``model_class`` (RampModel; ImageModel/CubeModel for a hook after
    ramp_fit) without arrays, whose meta is the exposure's, made from its Level 1B
    primary header by stdatamodels' own FITS reading (keywords the schema does not know
    stay in ``extra_fits``, as when jwst opens the file). The product writer builds the
    same kind of tree for the rate products; this one is kept small on purpose."""
    from astropy.io import fits  # noqa: PLC0415

    header = meta.header.copy()
    for key in ("NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4"):
        header.remove(key, ignore_missing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(fits.HDUList([fits.PrimaryHDU(header=header)]))
    model.meta.filename = meta.path.name
    if meta.int_times is not None and model_class.__name__ != "ImageModel":
        model.int_times = np.asarray(meta.int_times.data)
    return model


def _flat(tree: dict, prefix: str = "meta") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path))
        elif not isinstance(value, (list, np.ndarray)):
            out[path] = value
    return out


def _extra_cards(model) -> dict[str, Any]:
    cards = model._instance.get("extra_fits", {}).get("PRIMARY", {}).get("header", [])
    return {card[0]: card[1] for card in cards if len(card) >= 2}


def counted_group_time(groupdq: np.ndarray, group_time: float) -> float:
    """Seconds of group time that jwst's jump normalization counts in ``groupdq``
    ``[nints, ngroups, ny, nx]``: groups not DO_NOT_USE in every pixel, less one group
    per integration."""
    nints, ngroups = groupdq.shape[:2]
    common = np.bitwise_and.reduce(groupdq.reshape(nints, ngroups, -1), axis=2)
    unusable = np.count_nonzero(common & np.uint8(dqflags.DO_NOT_USE))
    return group_time * max(0, nints * ngroups - unusable - nints)


_ROUTED = ("stpipe", "jwst", "stcal")

#: meta the step's run sets that streamdet records itself: which integrations a piece
#: holds, and stpipe's finalize_result records (R_* from the override_ parameters
#: streamdet passed, CRDS_CTX, CAL_VER): streamdet's resolver knows where each
#: reference came from, and the products are streamdet's
_NOT_TAKEN_BACK = ("meta.exposure.integration_start", "meta.exposure.integration_end",
                   "meta.ref_file.", "meta.calibration_software_")


class _Forward(logging.Handler):
    def __init__(self, target: logging.Logger):
        super().__init__(logging.NOTSET)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.log(record.levelno, "%s", record.getMessage())


@contextlib.contextmanager
def _logs_to(target: logging.Logger, packages: tuple[str, ...]):
    """Records of ``packages``' loggers go to ``target`` only, while the step runs."""
    handler = _Forward(target)
    saved = []
    for name in packages:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(min(target.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)


class StpipeStep(Step):
    """A streamdet step running the stpipe Step class ``stpipe_class`` (subclasses are
    made by :func:`make_step`)."""

    stpipe_class: ClassVar[type]
    stpipe_path: ClassVar[str]
    granularity = Granularity.INTEGRATION
    thread_safe = False  # stpipe steps keep state on the instance; one piece at a time

    def __init__(self, params=None):
        super().__init__(params)
        self.mode = self.params.pop("granularity")
        if self.mode == "exposure" and not self.on_products:
            self.granularity = Granularity.EXPOSURE
            self.needs_whole_exposure = True
        self.logger = logging.getLogger(f"streamdet.{self.name}")

    def prepare(self, meta, refs, pixeldq):
        if self.mode == "exposure":
            planes = meta.ngroups * 5 if not self.on_products else 4 * 5
            self.logger.warning(
                "%s.granularity=exposure: the whole %s is in memory at once "
                "(%.0f MB, and the step's copies of it)", self.name,
                "rateints cube" if self.on_products else "exposure",
                meta.nints * planes * meta.ny * meta.nx / 1e6)
        self.meta = meta
        from stdatamodels.jwst.datamodels import CubeModel, ImageModel, RampModel  # noqa: PLC0415

        self.templates = ({"rate": meta_template(meta, ImageModel),
                           "rateints": meta_template(meta, CubeModel)} if self.on_products
                          else {"ramp": meta_template(meta, RampModel)})
        self.overrides = {f"override_{r}": (refs.resolved[r].path or "N/A")
                          for r in self.optional_reftypes if r in refs.resolved}
        # the keywords the step set, per piece, with the group time each piece counted
        self.pieces: list[tuple[dict[str, Any], float]] = []
        self.statuses: list[str] = []
        with self._running("setting up"):
            self.stpipe = self.stpipe_class(**self.params, **self.overrides)
            self.stpipe.save_results = False
        return None

    @contextlib.contextmanager
    def _running(self, what: str):
        packages = tuple(dict.fromkeys((self.stpipe_class.__module__.split(".")[0], *_ROUTED)))
        try:
            with _logs_to(self.logger, packages):
                yield
        except (BadInputError, PluginError):
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(f"stpipe step {self.stpipe_path} failed {what}: "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc

    def process(self, chunk):
        first, last = int(chunk.int_index[0]) + 1, int(chunk.int_index[-1]) + 1
        result = self._run_on("ramp", first, last, {"data": chunk.data, "groupdq": chunk.groupdq,
                                                    "pixeldq": chunk.pixeldq})
        self._keep(result[0], result[1], chunk.groupdq)

    def process_products(self, rate, rateints):
        """A hook after ramp_fit: the rate image as an ImageModel, then rateints as
        CubeModels of one integration at a time (the whole cube with granularity
        exposure), as jwst hands the rate and rateints models to a step run on them."""
        names = ("data", "err", "dq", "var_poisson", "var_rnoise")
        changed, status = self._run_on("rate", None, None, dict(zip(names, rate.arrays())))
        self._keep(changed, status, None)
        for first, piece in rateints_by_integration(rateints, whole=self.mode == "exposure"):
            n = piece.sci.shape[0]
            start = int(self.meta.int_index[first]) + 1
            self._run_on("rateints", start, start + n - 1, dict(zip(names, piece.arrays())))

    def _run_on(self, kind: str, first: int | None, last: int | None,
                arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], str | None]:
        """Run the step on a model of ``kind`` holding ``arrays`` (views of the engine's),
        copy back what it returns; the keywords it changed and its status."""
        model = self.templates[kind].copy()
        if first is not None:
            model.meta.exposure.integration_start = first
            model.meta.exposure.integration_end = last
        for name, array in arrays.items():
            setattr(model, name, array)
        before = _flat(model.meta.instance)
        cards_before = _extra_cards(model)
        where = ("on the rate image" if first is None
                 else f"on integration {first}" if first == last
                 else f"on integrations {first}-{last}")
        with self._running(where):
            result = self.stpipe.run(model)
        if result is None:
            result = model
        for name, mine in arrays.items():
            theirs = getattr(result, name, None)
            if theirs is None or np.shape(theirs) != mine.shape:
                raise PluginError(
                    f"stpipe step {self.stpipe_path} returned no {name} of shape {mine.shape} "
                    f"{where} (got {type(result).__name__} with "
                    f"{None if theirs is None else np.shape(theirs)})")
            if theirs is not mine:  # the step returned a copy
                np.copyto(mine, theirs, casting="unsafe")
        after = _flat(result.meta.instance)
        schema = _schema_keywords()
        changed = {schema[path]: value for path, value in after.items()
                   if path in schema and before.get(path) != value
                   and not path.startswith(_NOT_TAKEN_BACK)}
        changed.update({k: v for k, v in _extra_cards(result).items()
                        if cards_before.get(k) != v})
        changed.pop(self.status_keyword, None)
        status = after.get(f"meta.cal_step.{alias_of(self.stpipe_class)}")
        if result is not model:
            result.close()
        model.close()
        return changed, None if status is None else str(status)

    def _keep(self, changed: dict[str, Any], status: str | None, groupdq) -> None:
        if status is not None:
            self.statuses.append(status)
        weight = (counted_group_time(groupdq, self.meta.group_time)
                  if groupdq is not None and any(k in changed for k in RATE_KEYWORDS) else 0.0)
        self.pieces.append((changed, weight))

    def finish(self):
        out: dict[str, Any] = {}
        for changed, _ in self.pieces:  # the last piece's value, unless combined below
            out.update(changed)
        for key in RATE_KEYWORDS:
            values = [(c[key], w) for c, w in self.pieces if key in c]
            total = sum(w for _, w in values)
            if values and total > 0:
                out[key] = float(sum(v * w for v, w in values) / total)
        if self.statuses:
            out[self.status_keyword] = ("COMPLETE" if "COMPLETE" in self.statuses
                                        else self.statuses[-1])
        return out


def _after_rate(step: str, when: str) -> bool:
    """A post-hook of the rate producer works on the rate products."""
    return when == "post" and step == "ramp_fit"


def make_step(cls, path: str, *, name: str, after: str | None = None,
              before: str | None = None, on_products: bool = False) -> type[StpipeStep]:
    """A streamdet Step class running the stpipe class ``cls`` (named ``path``)."""
    package, version = _distribution(cls)
    params = {"granularity": Param(
        str, "integration",
        "what the step is handed: one integration at a time (memory: one integration), or "
        "the whole exposure at once (memory: the whole ramp, several times over)",
        choices=("integration", "exposure")), **_spec_params(cls)}
    attrs = dict(name=name, implementation=PREFIX + path, after=after, before=before,
                 stpipe_class=cls, stpipe_path=path, params_spec=params,
                 optional_reftypes=tuple(getattr(cls, "reference_file_types", ()) or ()),
                 status_keyword=_status_keyword(cls), package=package, on_products=on_products,
                 package_version=version, __doc__=f"stpipe step {path}, through the adapter")
    return type(f"Stpipe_{cls.__name__}", (StpipeStep,), attrs)


@hookimpl
def streamdet_run_steps(config):
    hooks = list(getattr(config, "hooks", []) or [])
    chosen = {step: impl for step, impl in (config.use or {}).items()
              if str(impl).startswith(PREFIX)}
    if not hooks and not chosen:
        return []
    out = []
    names: set[str] = set()
    for when, step, path in hooks:
        cls = load_class(path, f"--{when}-hook {step}={path}")
        name = alias_of(cls)
        if name in names:
            n = 2
            while f"{name}_{n}" in names:
                n += 1
            name = f"{name}_{n}"
        names.add(name)
        where = {"after": step} if when == "post" else {"before": step}
        out.append(make_step(cls, path, name=name, on_products=_after_rate(step, when),
                             **where))
    for step, impl in chosen.items():
        path = impl[len(PREFIX):]
        cls = load_class(path, f"--use {step}={impl}")
        out.append(make_step(cls, path, name=step))
    return out
