"""The plugin manager: ordering, replacement, insertion, conflicts, broken plugins and
parameter validation, with real Step classes registered like plugins."""

from __future__ import annotations

import types

import pytest

from streamdet import hookimpl
from streamdet.core.errors import BadInputError, PluginError
from streamdet.core.plugins import build_registry
from streamdet.core.step import Param, Step
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
