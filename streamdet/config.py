"""Run configuration from a TOML file and command-line options, merged into a RunConfig.

File layout (every table optional)::

    [steps.jump]               # parameters of one step, as with --set jump.NAME=VALUE
    rejection_threshold = 5.0
    post_hooks = ["snowblind.SnowblindStep"]   # stpipe steps after jump (--post-hook)
    [steps.firstframe]
    skip = false
    [use]                      # implementation per step, as with --use ("stpipe:pkg.Class"
    ramp_fit = "likely"        # runs an stpipe step instead; for ramp_fit,
                               # [steps.ramp_fit] algorithm = "LIKELY" is the same choice)
    [override]                 # reference files, as with --override (a path or "N/A")
    dark = "/refs/my_dark.fits"
    [output]
    dir = "products"
    overwrite = false

The file may also be one of jwst's ASDF parameter files (what ``strun
--save-parameters`` and ``Step.export_config`` write, and CRDS ``pars-*`` references):
a Detector1Pipeline file's ``steps`` become ``[steps.X]``, its ``output_dir`` the output
directory and ``save_calibrated_ramp`` ``--save-ramp``; a single step's file sets that
step. jwst parameters streamdet does not implement are accepted at jwst's defaults and
refused otherwise (core/jwstparams.py).

On the command line, jwst's spelling ``--steps.jump.rejection_threshold=5`` is the same
as ``--set jump.rejection_threshold=5`` (see :func:`jwst_spelling`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core import jwstparams
from .core.engine import RunConfig
from .core.errors import BadInputError
from .core.step import RateProducer


def jwst_spelling(argv: list[str]) -> list[str]:
    """Command-line arguments with jwst's ``--steps.STEP.PARAM=VALUE`` (or
    ``--steps.STEP.PARAM VALUE``) rewritten as ``--set STEP.PARAM=VALUE``; everything
    else, and everything after ``--``, is left as it is."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            out.append(arg)
            out.extend(args)
            break
        if arg.startswith("--steps."):
            key, sep, value = arg[len("--steps."):].partition("=")
            if not sep:
                value = next(args, None)
                if value is None:
                    raise BadInputError(f"{arg}: expected {arg}=VALUE")
            out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
    return out


def _from_parameter_file(config_file: Path) -> tuple[dict[str, Any], bool | None]:
    """A jwst ASDF parameter file as this module's configuration tables, and its
    ``save_calibrated_ramp`` (None when absent)."""
    content = jwstparams.read_parameter_file(config_file)
    data: dict[str, Any] = {"steps": {k: dict(v) for k, v in content.steps.items()}}
    save_ramp = None
    for name, value in content.pipeline.items():
        if name == "save_calibrated_ramp":
            save_ramp = jwstparams.same_value(value, True)
        elif name == "output_dir":
            if value is not None and str(value).strip():
                data.setdefault("output", {})["dir"] = str(value)
        elif name in ("save_results", "skip"):
            continue  # streamdet always writes its products; a pipeline is not skipped
        elif name in jwstparams.COMMON:
            if not jwstparams.same_value(value, jwstparams.COMMON[name]):
                raise BadInputError(f"{config_file}: Detector1Pipeline parameter "
                                    f"{name}={value!r} is not supported (only jwst's "
                                    f"default {jwstparams.COMMON[name]!r})")
        else:
            raise BadInputError(f"{config_file}: Detector1Pipeline has no parameter {name!r}")
    return data, save_ramp


def _pair(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BadInputError(f"{option} {text!r}: expected NAME=VALUE")
    return key.strip(), value.strip()


def load(config_file: Path | None = None, *, skip: list[str] = (), sets: list[str] = (),
         overrides: list[str] = (), use: list[str] = (), output_dir: Path | None = None,
         overwrite: bool = False, registry=None, whole_chain: bool = True,
         crds_pars: bool = True, pre_hooks: list[str] = (),
         post_hooks: list[str] = ()) -> RunConfig:
    """Build a RunConfig: the file first, command-line options on top.

    Everything is checked against the installed steps (``registry``, the process's own
    by default) before any file is touched: unknown steps, parameters, implementations
    and reference types, values of the wrong type, a chain left without its rate step,
    an output directory that cannot be one. Each problem is a one-line BadInputError
    naming the option (or the configuration file) it came from. ``whole_chain=False``
    leaves out the checks that need the whole chain decided (for ``streamdet steps``,
    which shows an undecided chain)."""
    data: dict[str, Any] = {}
    save_ramp = None
    if config_file is not None and jwstparams.is_asdf(Path(config_file)):
        data, save_ramp = _from_parameter_file(Path(config_file))
    elif config_file is not None:
        import tomllib  # noqa: PLC0415 - ~0.01 s (its regexes), for a TOML file only

        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise BadInputError(f"{config_file}: no such configuration file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{config_file}: not valid TOML ({exc})") from None
        unknown = set(data) - {"steps", "use", "override", "output"}
        if unknown:
            raise BadInputError(f"{config_file}: unknown table [{sorted(unknown)[0]}] "
                                "(expected steps, use, override, output)")
    for table in ("steps", "use", "override", "output"):
        if table in data and not isinstance(data[table], dict):
            raise BadInputError(f"{config_file}: [{table}] must be a table")
    # where each setting came from, for the messages: (kind, key) -> option text
    origin: dict[tuple[str, ...], str] = {}
    params: dict[str, dict[str, Any]] = {}
    hooks: list[tuple[str, str, str]] = []
    for step, values in (data.get("steps") or {}).items():
        if not isinstance(values, dict):
            raise BadInputError(f"{config_file}: [steps.{step}] must be a table of parameters")
        params[step] = dict(values)
        for name in values:
            origin[("param", step, name)] = f"{config_file}: [steps.{step}] {name}"
    for name in skip:
        params.setdefault(name, {})["skip"] = True
        origin[("param", name, "skip")] = f"--skip {name}"
    for text in sets:
        key, value = _pair("--set", text)
        step, dot, param = key.partition(".")
        if not dot or not param.strip() or not step.strip():
            raise BadInputError(f"--set {text!r}: expected STEP.PARAM=VALUE")
        step, param = step.strip(), param.strip()
        params.setdefault(step, {})[param] = value
        origin[("param", step, param)] = f"--set {text}"
    # jwst's spelling, from the file or --set STEP.post_hooks=...: stpipe step classes to
    # run around a step; then the options', after them
    hooks += take_hooks(params, where=str(config_file) if config_file else "--set")
    for when, given in (("pre", pre_hooks), ("post", post_hooks)):
        for text in given:
            step, path = _pair(f"--{when}-hook", text)
            hooks.append((when, step, path))
    chosen: dict[str, str] = {}
    for k, v in (data.get("use") or {}).items():
        chosen[k] = str(v)
        origin[("use", k)] = f"{config_file}: [use] {k}"
    for text in use:
        k, v = _pair("--use", text)
        chosen[k] = v
        origin[("use", k)] = f"--use {text}"
    refs: dict[str, str] = {}
    for k, v in (data.get("override") or {}).items():
        refs[k.lower()] = str(v)
        origin[("override", k.lower())] = f"{config_file}: [override] {k}"
    for text in overrides:
        k, v = _pair("--override", text)
        refs[k.lower()] = v
        origin[("override", k.lower())] = f"--override {text}"
    out = data.get("output") or {}
    if output_dir:
        directory, where = Path(output_dir), f"--output-dir {output_dir}"
    elif "dir" in out:
        directory, where = Path(str(out["dir"])), f"{config_file}: [output] dir"
    else:
        directory, where = None, ""
    if directory is not None:
        _check_output_dir(directory, where)
    if not isinstance(out.get("overwrite", False), bool):
        raise BadInputError(f"{config_file}: [output] overwrite must be true or false, "
                            f"not {out['overwrite']!r}")
    run = RunConfig(
        params=params, use=chosen, overrides=refs, output_dir=directory,
        overwrite=overwrite or bool(out.get("overwrite", False)),
        save_ramp=bool(save_ramp), crds_pars=crds_pars, hooks=hooks,
        param_origins={key[1:]: where for key, where in origin.items() if key[0] == "param"},
    )
    _validate(run, origin, registry, whole_chain)
    return run


def _file_or_option(where: str) -> str:
    """The configuration file of an origin text (``run.toml: [steps.jump] x``), or the
    option text itself."""
    return where if where.startswith("--") else where.split(": [", 1)[0]


def take_hooks(params: dict[str, dict[str, Any]], where: str = "steps"
               ) -> list[tuple[str, str, str]]:
    """Remove jwst's ``pre_hooks``/``post_hooks`` step parameters from ``params`` and
    return them as :attr:`RunConfig.hooks` entries ``(when, step, "pkg.Class")``, in order.
    A value is a list of class names, or one string of them (``"a.B, c.D"``, ``"[a.B]"``,
    as strun takes them)."""
    hooks = []
    for step, values in params.items():
        for when in ("pre", "post"):
            listed = values.pop(f"{when}_hooks", [])
            if isinstance(listed, str):
                listed = [p.strip(" '\"") for p in listed.strip().strip("[]").split(",")]
            if not isinstance(listed, (list, tuple)) or not all(isinstance(v, str) for v in listed):
                raise BadInputError(f"{where}: {step}.{when}_hooks must be a list of class "
                                    "names (\"pkg.Class\")")
            hooks += [(when, step, path) for path in listed if path]
    return hooks


def _check_output_dir(directory: Path, where: str) -> None:
    """The output directory, or its nearest existing ancestor, must be a directory."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "exists and is not a directory" if probe == directory else f"cannot be made: {probe} is a file"
        raise BadInputError(f"{where}: {directory} {what}")


def _validate(run: RunConfig, origin: dict[tuple[str, ...], str], registry=None,
              whole_chain: bool = True) -> None:
    """Check the settings against the installed steps (see :func:`load`)."""
    from .core.engine import build_chain
    from .core.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    registry = registry.for_run(run)  # with the stpipe steps the run hooks in
    _params_by_alias(run, registry)
    known = ", ".join(registry.order)
    # a parameter that chooses the implementation (ramp_fit.algorithm) joins --use
    run.use = registry.resolve_use(run.use, run.params, origin)
    for step, impl in run.use.items():
        where = origin.get(("use", step), f"--use {step}={impl}")
        if step not in registry.implementations:
            raise BadInputError(f"{where}: no step named {step!r} (steps: {known})")
        have = [cls.implementation for cls in registry.implementations[step]]
        if impl not in have:
            raise BadInputError(f"{where}: step {step!r} has no implementation {impl!r} "
                                f"(installed: {', '.join(have)})")
    for step, values in run.params.items():
        if step not in registry.implementations:
            where = origin.get(("param", step, next(iter(values), "")), f"step {step}")
            if step in jwstparams.STEP_CLASSES:  # jwst has it, streamdet does not
                try:
                    jwstparams.check_missing_step(step, values)
                except BadInputError as exc:
                    raise BadInputError(f"{_file_or_option(where)}: {exc}") from None
                continue
            raise BadInputError(f"{where}: no step named {step!r} (steps: {known})")
    if not whole_chain:
        return
    try:
        classes = {cls.name: cls for cls in registry.chain(run.use)}
    except BadInputError:
        raise
    except Exception as exc:  # two implementations and no choice: the user must choose
        raise BadInputError(str(exc)) from None
    for step, values in run.params.items():
        if step not in classes:
            continue  # a jwst step streamdet does not have, checked above
        cls = classes[step]
        for name, value in values.items():
            try:
                cls.validate_params({name: value})
            except BadInputError as exc:
                where = origin.get(("param", step, name), "")
                if where and not where.startswith("--"):  # from the configuration file
                    raise BadInputError(f"{_file_or_option(where)}: {exc}") from None
                raise
    reftypes = sorted({r for impls in registry.implementations.values() for cls in impls
                       for r in (*cls.reftypes, *cls.optional_reftypes)})
    for reftype in run.overrides:
        if reftype not in reftypes:
            raise BadInputError(f"{origin.get(('override', reftype), '--override ' + reftype)}: "
                                f"no step reads a reference of type {reftype!r} "
                                f"(types: {', '.join(reftypes)})")
    chain = build_chain(registry, run)
    active = [s for s in chain if not s.skip and not s.on_products]
    producers = [s for s in active if isinstance(s, RateProducer)]
    if not producers or producers[-1] is not active[-1]:
        skipped = [s.name for s in chain if s.skip and isinstance(s, RateProducer)]
        if skipped:
            where = origin.get(("param", skipped[0], "skip"), f"--skip {skipped[0]}")
            raise BadInputError(f"{where}: step {skipped[0]!r} makes the rate images and "
                                "cannot be skipped")
        # otherwise an installed plugin put a step after the rate: the engine reports it


def save_parameters(path: Path, run: RunConfig, registry=None) -> None:
    """Write the run's settings as a jwst Detector1Pipeline ASDF parameter file, which
    ``strun calwebb_detector1 --config FILE`` and ``--config FILE`` here both read.

    Every jwst parameter is written, the run's values over jwst's defaults. A setting
    jwst has no name for (a plugin's step or parameter) cannot be expressed there: it is
    a one-line error naming it, not a file that silently differs."""
    from .core.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    classes = {cls.name: cls for cls in registry.chain(run.use)}
    steps: dict[str, dict[str, Any]] = {}
    for step, values in run.params.items():
        if step not in jwstparams.STEP_CLASSES:
            raise BadInputError(f"--save-parameters {path}: step {step!r} has no jwst "
                                "equivalent and cannot be written to a jwst parameter file")
        typed = classes[step].validate_params(values) if step in classes else {}
        for name, value in values.items():
            known, default = jwstparams.jwst_default(step, name)
            if not known:
                raise BadInputError(f"--save-parameters {path}: parameter {step}.{name} has "
                                    "no jwst equivalent")
            if name in typed:
                value = typed[name]
            elif isinstance(default, bool):
                value = jwstparams.same_value(value, True)
            elif isinstance(default, str) and default:
                value = str(value)
            steps.setdefault(step, {})[name] = value
    pipeline: dict[str, Any] = {"save_calibrated_ramp": bool(run.save_ramp)}
    if run.output_dir is not None:
        pipeline["output_dir"] = str(run.output_dir)
    try:
        jwstparams.write_parameter_file(path, pipeline, steps)
    except OSError as exc:
        raise BadInputError(f"--save-parameters {path}: cannot write ({exc.strerror})") from None


def _params_by_alias(run: RunConfig, registry) -> None:
    """Parameters given under an stpipe class's alias (``--set jump_plus.x=1``) for the
    step it replaces (``--use jump=stpipe:snowblind.JumpPlusStep``) go to that step."""
    for step, impl in run.use.items():
        cls = next((c for c in registry.implementations.get(step, [])
                    if c.implementation == impl), None)
        alias = getattr(getattr(cls, "stpipe_class", None), "class_alias", None)
        if alias and alias != step and alias in run.params and alias not in registry.implementations:
            run.params.setdefault(step, {}).update(run.params.pop(alias))
