"""The plugin manager: ordering, replacement, insertion, conflicts, broken plugins,
observers that raise, parameter validation and the HISTORY record, with real Step classes
registered like plugins."""

from __future__ import annotations

import types
import warnings

import pytest
from astropy.io import fits

from streamdet import hookimpl
from streamdet.core.record import HISTORY_WIDTH, history_line
from streamdet.core.errors import BadInputError, PluginError
from streamdet.core.plugins import Observers, PluginWarning, build_registry
from streamdet.core.step import Granularity, Param, RateProducer, Step
from streamdet.plugins import MIRI_ORDER


def plugin(*steps, name="testplugin"):
    module = types.ModuleType(name)

    @hookimpl
    def streamdet_steps():
        return list(steps)

    module.streamdet_steps = streamdet_steps
    return module


def test_builtin_chain_is_the_miri_order():
    registry = build_registry(only_builtin=True)
    assert registry.order == list(MIRI_ORDER)
    assert all(impl.package == "streamdet" for impl in registry.chain())
    assert registry.broken == []


def test_inserted_step_goes_right_after_its_anchor():
    class Stripe(Step):
        name = "destripe"
        after = "dark_current"

    class Early(Step):
        name = "early"
        before = "saturation"

    registry = build_registry((plugin(Stripe, Early),), only_builtin=True)
    order = registry.order
    assert order.index("destripe") == order.index("dark_current") + 1
    assert order.index("refpix") == order.index("destripe") + 1
    assert order.index("early") == order.index("saturation") - 1


def test_replacement_needs_use_and_use_selects_it():
    class FastJump(Step):
        name = "jump"
        implementation = "fast"

    registry = build_registry((plugin(FastJump),), only_builtin=True)
    assert registry.implementation("jump").implementation == "builtin"
    assert registry.implementation("jump", {"jump": "fast"}) is FastJump
    with pytest.raises(PluginError, match="no implementation 'slow'"):
        registry.implementation("jump", {"jump": "slow"})
    with pytest.raises(PluginError, match="unknown step 'jmp'"):
        registry.chain({"jmp": "fast"})


def test_two_plugins_claiming_a_new_step_is_an_error_naming_both():
    class A(Step):
        name = "destripe"
        implementation = "a"
        after = "dark_current"

    class B(Step):
        name = "destripe"
        implementation = "b"
        after = "dark_current"

    registry = build_registry((plugin(A, name="pkg_a"), plugin(B, name="pkg_b")), only_builtin=True)
    with pytest.raises(PluginError) as info:
        registry.chain()
    assert "'a' from pkg_a" in str(info.value) and "'b' from pkg_b" in str(info.value)
    assert registry.chain({"destripe": "b"})[registry.order.index("destripe")] is B


def test_broken_plugins_are_reported_and_do_not_take_others_down():
    class Lost(Step):
        name = "lost"
        after = "no_such_step"

    class BadDefault(Step):
        name = "bad"
        after = "jump"
        params_spec = {"width": Param(int, "wide")}

    raising = types.ModuleType("raising")

    @hookimpl
    def streamdet_steps():
        raise RuntimeError("boom")

    raising.streamdet_steps = streamdet_steps
    registry = build_registry((plugin(Lost, name="lostpkg"), plugin(BadDefault, name="badpkg"), raising),
                              only_builtin=True)
    text = "\n".join(registry.broken)
    assert "lostpkg" in text and "unknown step 'no_such_step'" in text
    assert "badpkg" in text and "'width'" in text
    assert "raising" in text and "boom" in text
    assert registry.order == list(MIRI_ORDER)


def test_parameters_are_validated_with_clear_messages():
    class Tunable(Step):
        name = "tunable"
        params_spec = {"sigma": Param(float, 4.0, min=0), "mode": Param(str, "a", choices=("a", "b")),
                       "grow": Param(int, 1), "flag": Param(bool, True)}

    step = Tunable({"sigma": "5.5", "grow": "2", "flag": "false"})
    assert step.params == {"sigma": 5.5, "mode": "a", "grow": 2, "flag": False}
    assert step.skip is False
    assert Tunable({"skip": "yes"}).skip is True
    for given, message in [({"sigma": "x"}, "not a valid float"), ({"sigma": -1}, "below the minimum"),
                           ({"mode": "c"}, "not one of"), ({"grow": 1.5}, "not a valid int"),
                           ({"flag": "maybe"}, "not a valid bool"), ({"nope": 1}, "no parameter 'nope'")]:
        with pytest.raises(BadInputError, match=message):
            Tunable(given)


def test_observers_are_called_one_by_one_and_a_raising_one_is_reported_once():
    heard = []

    def observer(name, fail=False):
        module = types.ModuleType(name)

        @hookimpl
        def streamdet_step_finished(step, seconds):  # fewer arguments than the spec
            heard.append((name, step, seconds))
            if fail:
                raise ValueError(f"{name} fails\non two lines")

        module.streamdet_step_finished = streamdet_step_finished
        return module

    wrapper = types.ModuleType("wrapping")

    @hookimpl(wrapper=True)
    def streamdet_step_finished(step):
        heard.append(("wrapping", step, "before"))
        yield
        heard.append(("wrapping", step, "after"))

    wrapper.streamdet_step_finished = streamdet_step_finished
    registry = build_registry((observer("first"), observer("failing", fail=True), wrapper,
                               observer("last")), only_builtin=True)
    observers = Observers(registry.pm, where="x_uncal.fits")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in ("jump", "ramp_fit"):
            observers.notify("streamdet_step_finished", exposure=None, step=step, chunk=None,
                             seconds=1.5)
        observers.notify("streamdet_exposure_finished", exposure=None, products={}, timings={})
    # pluggy's order (the last registered first); the one after the failing one still called
    assert heard == [(name, step, when) for step in ("jump", "ramp_fit")
                     for name, when in (("wrapping", "before"), ("wrapping", "after"),
                                        ("last", 1.5), ("failing", 1.5), ("first", 1.5))]
    assert [w.category for w in caught] == [PluginWarning]
    assert str(caught[0].message) == (
        "plugin package failing: observer 'failing' failed in streamdet_step_finished on "
        "x_uncal.fits: ValueError: failing fails on two lines; the run goes on (reported "
        "once per run)")
    # a new run reports again
    with pytest.warns(PluginWarning, match="plugin package failing"):
        Observers(registry.pm).notify("streamdet_step_finished", exposure=None, step="jump",
                                      chunk=None, seconds=0.0)


@pytest.mark.parametrize("name, implementation, package, version, expected", [
    ("jump", "builtin", "streamdet", "0.1.0", "streamdet: jump=builtin (streamdet 0.1.0)"),
    ("ramp_fit", "likely", "streamdet-likely", "0.1.0",
     "streamdet: ramp_fit=likely (streamdet-likely 0.1.0)"),
    # a development version from a VCS checkout: the version gives way
    ("ramp_fit", "likely", "streamdet-likely", "0.1.dev123+g1234567.d20240101",
     "streamdet: ramp_fit=likely (streamdet-likely 0.1.dev123+g1234567.d20...)"),
    # a long distribution name: the name gives way
    ("destripe", "fast", "streamdet-some-really-long-distribution-name-for-stripes", "2.0.1",
     "streamdet: destripe=fast (streamdet-some-really-long-distribut... 2.0.1)"),
    # both long: they share the room
    ("destripe", "fast", "streamdet-some-really-long-distribution-name", "0.1.dev123+g1234567.d20240101",
     "streamdet: destripe=fast (streamdet-some-real... 0.1.dev123+g1234567...)"),
    # step and implementation names too long for the distribution: the line is cut
    ("a_really_long_step_name_for_testing", "an_equally_long_implementation_name", "pkg", "1.0",
     "streamdet: a_really_long_step_name_for_testing=an_equally_long_implem..."),
])
def test_history_line_is_one_card(name, implementation, package, version, expected):
    step = types.SimpleNamespace(name=name, implementation=implementation, package=package,
                                 package_version=version)
    line = history_line(step)
    assert line == expected and len(line) <= HISTORY_WIDTH
    header = fits.Header()
    header.add_history(line)
    assert [str(card) for card in header["HISTORY"]] == [line]  # not continued on a 2nd card


def test_plugin_autoload_can_be_switched_off(monkeypatch):
    """$STREAMDET_DISABLE_PLUGIN_AUTOLOAD leaves the installed third-party packages out
    (the repository's contrib plugins are installed in the test environment)."""
    pytest.importorskip("streamdet_likely")  # an installed third party to leave out
    from streamdet.core.plugins import DISABLE_AUTOLOAD_ENV, get_registry

    def packages():
        get_registry.cache_clear()
        return {package for package, _, _ in get_registry().plugins.values()}

    try:
        monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
        everything = packages()
        monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
        assert packages() == everything
        monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
        builtin = packages()
    finally:
        get_registry.cache_clear()
    assert builtin == {"streamdet"}
    assert "streamdet-likely" in everything and everything > builtin


# -- a parameter that chooses the implementation (jwst's ramp_fit.algorithm) ---------------

class _OtherFit(RateProducer):
    """A second ramp_fit implementation, as the streamdet-likely package provides one."""

    name = "ramp_fit"
    implementation = "likely"
    granularity = Granularity.EXPOSURE
    params_spec = {"algorithm": Param(str, "LIKELY", "", choices=("OLS_C", "OLS", "LIKELY"))}


def test_algorithm_parameter_chooses_the_implementation():
    registry = build_registry((plugin(_OtherFit),), only_builtin=True)
    resolve = registry.resolve_use
    assert resolve({}, {"ramp_fit": {"algorithm": "LIKELY"}}) == {"ramp_fit": "likely"}
    assert resolve({}, {"ramp_fit": {"algorithm": "OLS_C"}}) == {"ramp_fit": "builtin"}
    assert resolve({}, {"ramp_fit": {"algorithm": "OLS"}}) == {"ramp_fit": "builtin"}
    assert resolve({"ramp_fit": "likely"}, {"ramp_fit": {"algorithm": "LIKELY"}}) == {
        "ramp_fit": "likely"}
    assert resolve({"ramp_fit": "likely"}, {}) == {"ramp_fit": "likely"}
    with pytest.raises(BadInputError, match="case-sensitive, as in jwst: LIKELY"):
        resolve({}, {"ramp_fit": {"algorithm": "Likely"}})
    with pytest.raises(BadInputError, match="'CAS22' is not one of"):
        resolve({}, {"ramp_fit": {"algorithm": "CAS22"}})
    with pytest.raises(BadInputError, match="chooses 'builtin'; give only one of them"):
        resolve({"ramp_fit": "builtin"}, {"ramp_fit": {"algorithm": "LIKELY"}})
    with pytest.raises(BadInputError, match="chooses 'likely'; give only one of them"):
        resolve({"ramp_fit": "likely"}, {"ramp_fit": {"algorithm": "OLS_C"}})
    # the engine's chain and the configuration reach the same choice
    from streamdet import config
    from streamdet.core.engine import RunConfig, build_chain

    chain = build_chain(registry, RunConfig(params={"ramp_fit": {"algorithm": "LIKELY"}}))
    assert type(chain[-1]) is _OtherFit
    assert config.load(sets=["ramp_fit.algorithm=LIKELY"], registry=registry).use == {
        "ramp_fit": "likely"}


def test_algorithm_from_a_config_file_and_conflicts_name_their_origin(tmp_path):
    from streamdet import config

    registry = build_registry((plugin(_OtherFit),), only_builtin=True)
    run = tmp_path / "run.toml"
    run.write_text('[steps.ramp_fit]\nalgorithm = "LIKELY"\n')
    assert config.load(run, registry=registry).use == {"ramp_fit": "likely"}
    with pytest.raises(BadInputError, match=r"run.toml: \[steps.ramp_fit\] algorithm chooses "
                                            r"the ramp_fit implementation 'likely', but --use "
                                            r"ramp_fit=builtin chooses 'builtin'"):
        config.load(run, use=["ramp_fit=builtin"], registry=registry)
    # the command line's --set wins over the file, and then agrees with --use
    assert config.load(run, sets=["ramp_fit.algorithm=OLS_C"], use=["ramp_fit=builtin"],
                       registry=registry).use == {"ramp_fit": "builtin"}


def test_algorithm_naming_a_missing_implementation_says_what_to_install():
    registry = build_registry(only_builtin=True)
    with pytest.raises(BadInputError, match=r"ramp_fit.algorithm=LIKELY needs the ramp_fit "
                                            r"implementation 'likely', which is not installed: "
                                            r"install streamdet-likely"):
        registry.resolve_use({}, {"ramp_fit": {"algorithm": "LIKELY"}})
