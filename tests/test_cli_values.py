"""The command line's option values converted without pydantic (streamdet.cli_values):
every command gets, for every value, what typer's own (pydantic) conversion gives, the
same error for a bad one. (That a run does not import pydantic: test_startup_imports.)"""

from __future__ import annotations

import pytest
import typer.main

from streamdet import cli_values
from streamdet.cli import app

pytestmark = pytest.mark.skipif(cli_values.RuntimeParam is None,
                                reason="this typer converts without pydantic already")

CASES = [
    ("process", ["a_uncal.fits"]),
    ("process", ["a_uncal.fits", "b_uncal.fits", "-o", "out", "--config", "c.toml",
                 "--skip", "jump", "--set", "jump.rejection_threshold=5", "--set",
                 "ramp_fit.x=1", "--override", "dark=N/A", "--use", "jump=builtin",
                 "--save-after", "linearity", "--threads", "2", "--overwrite", "-q", "-v",
                 "--save-ramp", "--no-crds-pars", "--save-parameters", "p.asdf", "--debug",
                 "--pre-hook", "jump=pkg.Step", "--post-hook", "jump=pkg.Other"]),
    ("process", ["a_uncal.fits", "--threads", "0"]),
    ("process", ["a_uncal.fits", "--threads", "x"]),
    ("process", ["a_uncal.fits", "--threads", "1.5"]),
    ("process", ["a_uncal.fits", "--threads", "007"]),
    ("process", ["a_uncal.fits", "--threads", " 3"]),
    ("process", ["a_uncal.fits", "--threads", "99999999999999999999999"]),
    ("process", ["a_uncal.fits", "-o", ""]),
    ("process", ["", "--set", ""]),
    ("process", []),
    ("refs", ["a_uncal.fits", "--override", "mask=m.fits"]),
    ("steps", ["--use", "jump=builtin"]),
    ("simulate", ["out", "--ngroups", "5", "--nints", "2", "--seed", "-3", "--subarray",
                  "SUB64", "--readpatt", "SLOWR1"]),
    ("simulate", ["out", "--ngroups", "five"]),
    ("watch", ["inbox", "--output", "out", "--settle", "0.5", "--grace", "2",
               "--workers", "2", "--retries", "0", "--pattern", "*_uncal.fits"]),
    ("watch", ["inbox", "-o", "out", "--settle", "-1"]),
    ("watch", ["inbox", "-o", "out", "--settle", "1e-3"]),
    ("watch", ["inbox", "-o", "out", "--settle", "0.30000000000000004", "--grace", "1."]),
    ("watch", ["inbox", "-o", "out", "--workers", "0"]),
]


def _parse(name: str, args: list[str], plain: bool):
    """What the command ``name`` makes of ``args``: its parameters (values and types)
    or the error typer reports."""
    from typer._coercion import build_runtime_param

    group = typer.main.get_command(app)
    parent = group.make_context("streamdet", [name])
    command = group.commands[name]
    if plain:
        cli_values.convert_plainly(command, parent)
    for param in command.get_params(parent):
        if getattr(param, "_runtime_param", "unknown") is None:  # typer's own
            param._runtime_param = build_runtime_param(param.type_descriptor)
    try:
        ctx = command.make_context(name, list(args), parent=parent)
    except Exception as exc:
        return type(exc).__name__, exc.format_message()
    return {k: (v, type(v), [type(x) for x in v] if isinstance(v, list) else None)
            for k, v in ctx.params.items()}


@pytest.mark.parametrize("name,args", CASES)
def test_plain_conversion_gives_what_typer_gives(name, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _parse(name, args, plain=True) == _parse(name, args, plain=False)


def test_the_plain_conversion_is_used_for_the_options_of_a_run():
    group = typer.main.get_command(app)
    parent = group.make_context("streamdet", ["process"])
    command = group.commands["process"]
    cli_values.convert_plainly(command, parent)
    kinds = {p.name: type(p._runtime_param).__name__ for p in command.get_params(parent)}
    assert set(kinds.values()) == {"_PlainValues"}, kinds
