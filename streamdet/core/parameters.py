"""The parameters a run applies to one exposure, and where each came from.

Precedence, as stpipe's ``Step.call``/``strun`` apply them: step defaults < CRDS
parameter references (``pars-<step class>`` for each step, then
``pars-detector1pipeline``, whose ``steps`` section wins) < configuration file <
command line. CRDS parameters depend on the exposure, so they are resolved per file
(core/references.py finds them); ``RunConfig.crds_pars=False`` (``--no-crds-pars``) or
``STPIPE_DISABLE_CRDS_STEPPARS=true`` leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import jwstparams
from . import references as refmod
from .errors import BadInputError


@dataclass(frozen=True)
class Setting:
    """One parameter value that differs from the step's default in this run."""

    step: str
    name: str
    value: Any
    #: "crds", "config" or "command line"
    source: str
    #: the file or option it came from (``crds://jwst_miri_pars-jumpstep_0001.asdf``,
    #: ``run.toml``, ``--set jump.rejection_threshold=5``)
    origin: str


@dataclass
class Parameters:
    """What :func:`effective` decided: per step the parameters to build it with, the
    record of every value not left at the default, and the CRDS parameter references
    that were selected (applied or not)."""

    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: list[Setting] = field(default_factory=list)
    pars: list[refmod.ParsReference] = field(default_factory=list)
    #: thread count asked for through jwst's ``maximum_cores`` (None: not set)
    threads: int | None = None
    #: Detector1Pipeline's ``save_calibrated_ramp`` when a CRDS reference sets it
    save_ramp: bool | None = None

    def lines(self) -> list[str]:
        """One line per setting: ``step.name = value  [origin]``."""
        return [f"{s.step}.{s.name} = {s.value!r}  [{s.origin}]" for s in self.settings]


def effective(config, meta, registry, cpus: int = 1) -> Parameters:
    """The parameters for exposure ``meta``: CRDS references under ``config.params``.

    A CRDS parameter that names a step or parameter streamdet does not have (or a jwst
    parameter it does not implement, set to another value than jwst's default) is a
    one-line BadInputError naming the reference file and the parameter."""
    out = Parameters()
    # the run's own steps (stpipe hooks) included: their parameters are the run's too
    installed = {cls.name: cls for cls in registry.for_run(config).chain(config.use)}
    crds_values: dict[str, dict[str, Any]] = {}
    crds_origin: dict[tuple[str, str], str] = {}
    use_crds = getattr(config, "crds_pars", True) and not refmod.crds_pars_disabled()
    if use_crds:
        out.pars = refmod.resolve_pars(meta)
    for ref in out.pars:
        content = ref.parameters
        where = f"{ref.path} ({ref.reftype} from CRDS)"
        for name, value in content.pipeline.items():
            if name == "save_calibrated_ramp":
                out.save_ramp = bool(value) if isinstance(value, bool) else \
                    jwstparams.same_value(value, True)
                continue
            known, default = (name in jwstparams.COMMON or name == "skip",
                              jwstparams.COMMON.get(name, False))
            if not known:
                raise BadInputError(f"{where}: Detector1Pipeline has no parameter {name!r}")
            if name not in ("save_results", "output_dir", "skip") and \
                    not jwstparams.same_value(value, default):
                raise BadInputError(f"{where}: parameter {name}={value!r} is not supported "
                                    f"(only jwst's default {default!r})")
        for step, values in content.steps.items():
            for name, value in values.items():
                crds_values.setdefault(step, {})[name] = value
                crds_origin[(step, name)] = ref.header_value
    for step, values in crds_values.items():
        try:
            if step in installed:
                installed[step].validate_params(values)
            elif step in jwstparams.STEP_CLASSES:
                jwstparams.check_missing_step(step, values)
            else:
                raise BadInputError(f"no step named {step!r}")
        except BadInputError as exc:
            origin = next(iter({crds_origin[(step, n)] for n in values}))
            raise BadInputError(f"{_path_of(out.pars, origin)} (CRDS parameter reference): "
                                f"{exc}") from None
    origins = getattr(config, "param_origins", {}) or {}
    merged: dict[str, dict[str, Any]] = {}
    source_of: dict[tuple[str, str], tuple[str, str]] = {}
    for step, values in crds_values.items():
        for name, value in values.items():
            merged.setdefault(step, {})[name] = value
            source_of[(step, name)] = ("crds", crds_origin[(step, name)])
    for step, values in (config.params or {}).items():
        for name, value in values.items():
            merged.setdefault(step, {})[name] = value
            origin = origins.get((step, name), "parameters given to the run")
            kind = "command line" if origin.startswith("--") else "config"
            source_of[(step, name)] = (kind, origin)
    threads = []
    for step, values in merged.items():
        if step not in installed:  # a jwst step streamdet does not have: checked, inert
            if step not in jwstparams.STEP_CLASSES:
                raise BadInputError(f"unknown step {step!r} in parameters (steps: "
                                    f"{', '.join(installed)})")
            jwstparams.check_missing_step(step, values)
            continue
        spec = installed[step].all_params()
        kept = {}
        for name, value in values.items():
            if name in jwstparams.ENGINE_PARAMS and step in jwstparams.ENGINE_PARAMS[name] \
                    and name not in spec:
                if not jwstparams.same_value(value, jwstparams.STEP_PARAMS[step][name]):
                    threads.append(jwstparams.threads_for(value, cpus))
                    kind, origin = source_of[(step, name)]
                    out.settings.append(Setting(step, name, value, kind, origin))
                continue
            kept[name] = value
        out.steps[step] = kept
        typed = installed[step].validate_params(kept)
        for name in kept:
            if name in spec and typed.get(name) != spec[name].default:
                kind, origin = source_of[(step, name)]
                out.settings.append(Setting(step, name, typed[name], kind, origin))
    out.threads = max(threads) if threads else None
    return out


def _path_of(pars: list[refmod.ParsReference], header_value: str) -> str:
    return next((p.path for p in pars if p.header_value == header_value), header_value)
