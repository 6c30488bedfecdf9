"""The plugin manager: loads every plugin under the entry-point group ``streamdet.steps``
(the built-in steps included, the same way), collects their step implementations, and
decides the chain: which steps, in which order, served by which implementation.

For plugin authors: implement hooks from :mod:`streamdet.core.hookspecs` in a module,
mark them with :data:`hookimpl` (also importable as ``streamdet.hookimpl``), and name
the module in your ``pyproject.toml``::

    [project.entry-points."streamdet.steps"]
    my_jump = "my_package.my_jump"
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from .errors import BadInputError, PluginError, one_line

if TYPE_CHECKING:  # pragma: no cover - the step module (and numpy) load with the plugins
    from .step import Step

hookimpl = pluggy.HookimplMarker("streamdet")

ENTRY_POINT_GROUP = "streamdet.steps"
BUILTIN_PACKAGE = "streamdet"

#: the hooks that only watch a run (see :mod:`.hookspecs`); :class:`Observers` calls them
OBSERVER_HOOKS = ("streamdet_exposure_started", "streamdet_step_finished",
                  "streamdet_exposure_finished")


class PluginWarning(UserWarning):
    """A plugin misbehaved during a run (an observer raised), and the run went on. The
    message is one line that starts ``plugin package NAME:``, like the registry's broken
    plugins."""


@dataclass
class Registry:
    """Everything the installed plugins provide."""

    pm: pluggy.PluginManager
    #: step name -> implementations in registration order (built-in first)
    implementations: dict[str, list[type[Step]]] = field(default_factory=dict)
    #: step names in chain order
    order: list[str] = field(default_factory=list)
    #: one message per plugin that could not be loaded or used
    broken: list[str] = field(default_factory=list)
    #: plugin name -> (package, version, hook names)
    plugins: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)

    def implementation(self, name: str, use: dict[str, str] | None = None) -> type[Step]:
        """The implementation serving step ``name``: the one chosen with ``use``, else the
        built-in one, else the only one; two candidates and no choice is an error."""
        impls = self.implementations.get(name)
        if not impls:
            raise PluginError(f"no step named {name!r} (known: {', '.join(self.order)})")
        wanted = (use or {}).get(name)
        if wanted is not None:
            for impl in impls:
                if impl.implementation == wanted:
                    return impl
            have = ", ".join(f"{i.implementation} ({i.package})" for i in impls)
            raise PluginError(f"step {name!r} has no implementation {wanted!r} (installed: {have})")
        builtin = [i for i in impls if i.package == BUILTIN_PACKAGE]
        if builtin:
            return builtin[0]
        if len(impls) == 1:
            return impls[0]
        names = " and ".join(f"{i.implementation!r} from {i.package}" for i in impls)
        raise PluginError(
            f"step {name!r} is provided by {names}; choose one with --use {name}=IMPL")

    def resolve_use(self, use: dict[str, str] | None, params: dict[str, dict] | None,
                    origin: dict[tuple[str, ...], str] | None = None) -> dict[str, str]:
        """``use`` completed with the choices that step parameters make (a step's
        ``implementation_parameter``, e.g. ``ramp_fit.algorithm=LIKELY`` -> ``likely``).

        A value the parameter does not allow, a choice that contradicts ``use`` for the
        same step, or an implementation that is not installed is a one-line
        BadInputError; ``origin`` names where each setting came from (as
        :func:`streamdet.config.load` records it)."""
        from .errors import BadInputError

        chosen = dict(use or {})
        origin = origin or {}
        for name, given in (params or {}).items():
            impls = self.implementations.get(name, [])
            declaring = ([c for c in impls if c.package == BUILTIN_PACKAGE
                          and c.implementation_parameter]
                         or [c for c in impls if c.implementation_parameter])
            if not declaring:
                continue
            cls = declaring[0]
            pname, mapping = cls.implementation_parameter
            if pname not in given:
                continue
            where = origin.get(("param", name, pname), f"{name}.{pname}={given[pname]}")
            try:
                value = cls.all_params()[pname].coerce(name, pname, given[pname])
            except BadInputError as exc:
                near = [v for v in mapping if v.upper() == str(given[pname]).strip().upper()]
                hint = f" (values are case-sensitive, as in jwst: {near[0]})" if near else ""
                raise BadInputError(f"{where}: {exc}{hint}") from None
            impl = mapping[value]
            if name in chosen and chosen[name] != impl:
                other = origin.get(("use", name), f"use {name}={chosen[name]}")
                raise BadInputError(
                    f"{where} chooses the {name} implementation {impl!r}, but {other} "
                    f"chooses {chosen[name]!r}; give only one of them")
            if impl not in {c.implementation for c in impls}:
                source = cls.implementation_sources.get(impl, f"a package providing {impl!r}")
                raise BadInputError(
                    f"{where} needs the {name} implementation {impl!r}, which is not "
                    f"installed: install {source}")
            chosen[name] = impl
        return chosen

    def for_run(self, config) -> "Registry":
        """This registry with the steps that the run ``config`` adds
        (:func:`~streamdet.core.hookspecs.streamdet_run_steps`, e.g. stpipe hooks)
        placed in the chain; ``self`` when it adds none."""
        added = [cls for classes in self.pm.hook.streamdet_run_steps(config=config)
                 for cls in (classes or [])]
        if not added:
            return self
        implementations = {name: list(impls) for name, impls in self.implementations.items()}
        for cls in added:
            impls = implementations.setdefault(cls.name, [])
            if all(i.implementation != cls.implementation for i in impls):  # not yet added
                impls.append(cls)
        broken: list[str] = []
        order = _order([cls for impls in implementations.values() for cls in impls], broken)
        if broken:  # an anchor the configuration named does not exist
            raise BadInputError(broken[0].split(": ", 1)[1])
        return Registry(self.pm, {name: implementations[name] for name in order}, order,
                        self.broken, self.plugins)

    def chain(self, use: dict[str, str] | None = None) -> list[type[Step]]:
        for step_name in (use or {}):
            if step_name not in self.implementations:
                raise PluginError(
                    f"--use names unknown step {step_name!r} (known: {', '.join(self.order)})")
        return [self.implementation(name, use) for name in self.order]


class Observers:
    """The observer hooks of one run, each plugin's implementation called on its own.

    Through ``pm.hook`` pluggy stops at the first implementation that raises and hands
    the exception to the engine, so one broken observer (a quick-look writer, a monitor)
    would fail a good exposure and keep the observers after it from hearing of it. Here
    an observer's exception is reported once per plugin per run as a
    :class:`PluginWarning` naming the plugin, the hook and the error, and the other
    observers and the run go on (the plugin is still called for later events: a failure
    on one chunk need not mean the next fails). Exceptions of steps' own methods are not
    observers' and end the run as before.

    One run's calls come from one thread at a time (the engine calls
    ``streamdet_step_finished`` under its lock)."""

    def __init__(self, pm: pluggy.PluginManager, where: object = None):
        #: the input being processed, named in the warnings
        self.where = where
        #: plugins (pluggy names, ``package:entry point``) already reported in this run
        self.reported: set[str] = set()
        # in the order pluggy calls them: the last registered first, tryfirst/trylast kept
        self.impls = {hook: list(reversed(getattr(pm.hook, hook).get_hookimpls()))
                      for hook in OBSERVER_HOOKS}

    def notify(self, hook: str, **kwargs) -> None:
        """Call every implementation of observer ``hook`` with the ``kwargs`` it names."""
        for impl in self.impls[hook]:
            try:
                _call_one(impl, kwargs)
            except Exception as exc:  # an observer must not end the run
                self._report(impl.plugin_name, hook, exc)

    def _report(self, plugin_name: str, hook: str, exc: Exception) -> None:
        if plugin_name in self.reported:
            return
        self.reported.add(plugin_name)
        package, _, entry = plugin_name.partition(":")
        where = f" on {self.where}" if self.where is not None else ""
        warnings.warn(f"plugin package {package}: observer {entry or package!r} failed in "
                      f"{hook}{where}: {type(exc).__name__}: {one_line(exc)}; "
                      "the run goes on (reported once per run)", PluginWarning, stacklevel=3)


def _call_one(impl: pluggy.HookImpl, kwargs: dict) -> None:
    """Call one hook implementation the way pluggy does, with only the arguments it names."""
    args = [kwargs[name] for name in impl.argnames]
    if not (impl.wrapper or impl.hookwrapper):
        impl.function(*args)
        return
    # a wrapper called on its own wraps nothing: run it through its one yield
    wrapper = impl.function(*args)
    next(wrapper)
    try:
        wrapper.send(pluggy.Result([], None) if impl.hookwrapper else [])
    except StopIteration:
        return
    raise RuntimeError(f"hook wrapper {impl.function.__name__} did not stop after one yield")


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.module.split(".")[0], "?"
    metadata = dist.metadata  # parses the METADATA file anew at every call: once here
    return metadata["Name"], metadata["Version"]


def _order(steps: list[type[Step]], broken: list[str]) -> list[str]:
    """Chain order from ``after``/``before`` anchors.

    A new step goes right next to its anchor: ``after="dark_current"`` puts it between
    dark_current and the step that followed dark_current (steps of plugins anchored at
    the same place keep their registration order). Steps whose anchor never appears are
    reported in ``broken`` and left out."""
    anchor_of: dict[str, tuple[str | None, str | None]] = {}
    builtin: dict[str, bool] = {}
    for cls in steps:  # the first implementation that gives a place decides it
        if cls.name not in anchor_of or anchor_of[cls.name] == (None, None):
            anchor_of[cls.name] = (cls.after, cls.before)
            builtin[cls.name] = cls.package == BUILTIN_PACKAGE
    after_children: dict[str, list[str]] = {}
    before_children: dict[str, list[str]] = {}
    roots: list[str] = []
    for name, (after, before) in anchor_of.items():
        if after:
            after_children.setdefault(after, []).append(name)
        elif before:
            before_children.setdefault(before, []).append(name)
        else:
            roots.append(name)
    order: list[str] = []

    def emit(name: str) -> None:
        if name in order:
            return
        for child in before_children.get(name, []):
            emit(child)
        order.append(name)
        # inserted steps sit between their anchor and the built-in step that followed it
        children = after_children.get(name, [])
        for child in [c for c in children if not builtin[c]] + [c for c in children if builtin[c]]:
            emit(child)

    for root in roots[:1]:
        emit(root)
    for name, (after, before) in anchor_of.items():
        if name in order:
            continue
        package = next(c.package for c in steps if c.name == name)
        if after or before:
            broken.append(f"plugin package {package}: step {name!r} is declared to come "
                          f"{'after' if after else 'before'} unknown step {after or before!r}; "
                          "it is not used")
        else:
            broken.append(f"plugin package {package}: new step {name!r} declares neither "
                          "'after' nor 'before'; it is not used")
    return order


#: set (to anything but empty or 0) to load streamdet's own steps only, leaving installed
#: third-party plugins out (reproducing a plain run, benchmarks), like pytest's
#: PYTEST_DISABLE_PLUGIN_AUTOLOAD
DISABLE_AUTOLOAD_ENV = "STREAMDET_DISABLE_PLUGIN_AUTOLOAD"


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """Build the plugin manager and registry once per process (honouring $STREAMDET_DISABLE_PLUGIN_AUTOLOAD)."""
    value = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip()
    return build_registry(only_builtin=value not in ("", "0"))


def build_registry(extra_plugins: tuple = (), *, only_builtin: bool = False) -> Registry:
    """Load all entry points (built-ins first) plus ``extra_plugins`` (modules or objects
    registered directly, as the test kit does) into a fresh registry.

    ``only_builtin`` loads streamdet's own entry points only, leaving installed
    third-party plugins out (benchmarks, reproducing a plain run)."""
    from .step import RateProducer, Step  # noqa: PLC0415 - numpy only when plugins are loaded

    pm = pluggy.PluginManager("streamdet")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)
    # the entry points of one distribution share its Distribution object
    dist_names: dict[int, tuple[str, str]] = {}
    eps = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = id(getattr(ep, "dist", None) or ep)
        if key not in dist_names:
            dist_names[key] = _dist_of(ep)
        eps.append((ep, dist_names[key]))
    eps.sort(key=lambda pair: (pair[1][0] != BUILTIN_PACKAGE,))
    if only_builtin:
        eps = [pair for pair in eps if pair[1][0] == BUILTIN_PACKAGE]
    sources: list[tuple[object, str, str, str]] = []
    seen_modules: set[str] = set()
    for ep, (package, version) in eps:
        if ep.value in seen_modules:  # one distribution installed twice (e.g. editable + wheel)
            continue
        seen_modules.add(ep.value)
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            reg.broken.append(f"plugin package {package}: entry point {ep.name!r} "
                              f"({ep.value}) failed to import: {type(exc).__name__}: {exc}")
            continue
        sources.append((plugin, ep.name, package, version))
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", f"extra-{i}")
        sources.append((plugin, name, getattr(plugin, "__package__", None) or name, "local"))

    steps: list[type[Step]] = []
    for plugin, name, package, version in sources:
        try:
            pm.register(plugin, name=f"{package}:{name}")
        except Exception as exc:
            reg.broken.append(f"plugin package {package}: {name!r} could not be registered: {exc}")
            continue
        hooks = [h.name for h in pm.get_hookcallers(plugin) or []]
        reg.plugins[f"{package}:{name}"] = (package, version, hooks)
        impl = next((h for h in pm.hook.streamdet_steps.get_hookimpls() if h.plugin is plugin), None)
        if impl is None:
            continue
        try:
            provided = list(impl.function() or [])
            for cls in provided:
                if not (isinstance(cls, type) and issubclass(cls, Step)):
                    raise PluginError(f"{cls!r} is not a streamdet Step subclass")
                if not getattr(cls, "name", None):
                    raise PluginError(f"{cls.__name__} declares no step name")
                if hasattr(cls, "produces_rate") and not issubclass(cls, RateProducer):
                    # the flag of streamdet before the contract declared RateProducer
                    raise PluginError(f"{cls.__name__} sets produces_rate: a rate producer "
                                      "subclasses streamdet.core.step.RateProducer and "
                                      "returns a RateResult")
                for pname, p in cls.params_spec.items():
                    if (not isinstance(p.default, p.type)
                            and not (p.type is float and isinstance(p.default, int))
                            and not (p.optional and p.default is None)):
                        raise PluginError(f"{cls.__name__} parameter {pname!r}: default "
                                          f"{p.default!r} is not a {p.type.__name__}")
        except Exception as exc:
            reg.broken.append(f"plugin package {package}: streamdet_steps() failed: {exc}")
            pm.unregister(plugin)
            reg.plugins.pop(f"{package}:{name}", None)
            continue
        for cls in provided:
            cls.package, cls.package_version = package, version
            reg.implementations.setdefault(cls.name, []).append(cls)
            steps.append(cls)
    reg.order = _order(steps, reg.broken)
    for name in list(reg.implementations):
        if name not in reg.order:
            del reg.implementations[name]
    return reg
