"""The command line as a user meets it: ``steps``, ``refs``, ``demo``, ``simulate``,
bad options of ``process``, and the Python API, each run as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from streamdet.simulate import simulate

TIMEOUT = 180
MIRI_ORDER = ["group_scale", "dq_init", "saturation", "firstframe", "lastframe", "reset", "linearity",
              "rscd", "dark_current", "refpix", "jump", "ramp_fit"]
CLI = [sys.executable, "-m", "streamdet.cli"]


def run_cli(args, env, cwd, cmd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or CLI), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a digest of its bytes and its mtime."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)):
            f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith("streamdet: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def env(sim):
    out = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    out.update(sim.env)
    return out


@pytest.fixture(scope="module")
def bare_env():
    """No CRDS configuration at all (what a fresh shell has)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}


# -- steps ---------------------------------------------------------------------------------

def test_steps_lists_the_chain_in_miri_order(env, tmp_path):
    script = shutil.which("streamdet")
    result = run_cli(["steps"], env, tmp_path, cmd=[script] if script else None)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["step", "implementation", "package"]
    rows = [line.split() for line in lines[1:]]
    builtin = [r for r in rows if r[1] == "builtin"]
    assert [r[0] for r in builtin] == MIRI_ORDER
    for r in builtin:
        assert r[2] == "streamdet", r  # the package that provides it (then its version)
    names = list(dict.fromkeys(r[0] for r in rows))
    assert [n for n in names if n in MIRI_ORDER] == MIRI_ORDER
    firstframe = next(r for r in builtin if r[0] == "firstframe")
    assert "True" in firstframe  # skipped by default, as in jwst 3.0


# -- refs ----------------------------------------------------------------------------------

def test_refs_prints_each_reference_from_the_crds_cache(sim, env, tmp_path):
    result = run_cli(["refs", sim.uncal], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    seen = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] in sim.refs:
            seen[parts[1]] = line
            path = Path(parts[2])
            assert path.is_file() and path.is_relative_to(sim.crds_path), line
            assert path.name == sim.refs[parts[1]].name, line
            assert "[crds " in line and sim.context in line, line
    assert set(seen) == set(sim.refs), result.stdout
    for step in MIRI_ORDER:
        assert any(line.split()[0] == step for line in result.stdout.splitlines()), step


def test_refs_names_an_override(sim, env, tmp_path):
    mask = sim.refs["mask"]
    result = run_cli(["refs", sim.uncal, "--override", f"mask={mask}",
                      "--override", "dark=N/A"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {ln.split()[1]: ln for ln in result.stdout.splitlines() if len(ln.split()) > 2}
    assert str(mask) in lines["mask"] and "[override]" in lines["mask"]
    assert "N/A" in lines["dark"] and "[override]" in lines["dark"]


def test_refs_without_crds(sim, bare_env, tmp_path):
    result = run_cli(["refs", sim.uncal], bare_env, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert sim.uncal.name in line and "CRDS_PATH" in line
    assert result.stdout == ""  # no half listing before the error


# -- demo and the Python API -------------------------------------------------------------

def test_demo_prints_where_the_products_are(bare_env, tmp_path):
    result = run_cli(["demo", tmp_path / "demo"], bare_env, tmp_path)
    assert result.returncode == 0, result.stderr
    printed = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        printed[key.strip()] = value.strip()
    for kind in ("rate", "rateints", "quicklook"):
        assert kind in printed, result.stdout
        assert Path(printed[kind]).is_file(), printed[kind]
    assert printed["rate"].endswith("_rate.fits")
    assert printed["rateints"].endswith("_rateints.fits")
    assert Path(printed["quicklook"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quicklook_png_is_the_log_stretched_image_bottom_row_first(tmp_path):
    from skimage.io import imread

    from streamdet.quicklook import to_gray, write_png

    image = np.array([[np.nan, 1.0, 2.0], [3.0, 4.0, 1000.0]])
    gray = to_gray(image)
    assert gray[0, 0] == 0 and gray[1, 2] == 255          # NaN black, the top percentile white
    assert 0 < gray[0, 2] < gray[1, 0] < gray[1, 1] < 255  # monotonic in between
    # logarithmic: 2 and 3 (of 1..1000) are far above their linear share of the range
    assert gray[0, 2] > 20 * 255 * (2 - 1) / (1000 - 1)
    assert to_gray(np.full((4, 4), 7.0)).tolist() == [[0] * 4] * 4   # flat: no division by 0
    png = write_png(tmp_path / "q.png", gray)
    assert np.array_equal(imread(png), gray[::-1])          # row 0 at the bottom


_API = """
import json, pathlib, sys
import streamdet
result = streamdet.process(sys.argv[1], output_dir=sys.argv[2],
                           steps={"jump": {"rejection_threshold": 5}})
print(result)
assert set(result) == {"rate", "rateints"}, result
assert all(isinstance(p, pathlib.Path) for p in result.values()), result
print(json.dumps({k: str(v) for k, v in result.items()}))
"""


def test_a_missing_module_is_an_internal_error_naming_the_install_command(sim, env, tmp_path):
    """An installation without stdatamodels (which crds' JWST rules import) is not bad
    input: exit 1, one line naming the module and how to install it. The module is made
    missing for real: a package of that name on the path that fails as an absent one does."""
    shadow = tmp_path / "shadow" / "stdatamodels"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'stdatamodels'\", name='stdatamodels')\n")
    env = {**env, "PYTHONPATH": os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")])}
    result = run_cli(["process", sim.uncal, "-o", tmp_path / "out"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result)
    assert "'stdatamodels' is not installed" in line, line
    assert "pip install stdatamodels" in line, line
    assert "CRDS found no" not in line  # not blamed on CRDS
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_python_api_returns_the_product_paths(sim, env, tmp_path):
    result = run_cli([sim.uncal, tmp_path / "api"], env, tmp_path,
                     cmd=[sys.executable, "-c", _API])
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.splitlines()[-1])
    assert Path(paths["rate"]) == tmp_path / "api" / sim.uncal.name.replace("_uncal", "_rate")
    for path in paths.values():
        assert Path(path).is_file()


def test_python_api_raises_bad_input(tmp_path):
    import streamdet
    from streamdet.core.errors import BadInputError

    bad = tmp_path / "text_uncal.fits"
    bad.write_text("not a FITS file\n")
    with pytest.raises(BadInputError, match="text_uncal.fits: not a readable FITS file"):
        streamdet.process(bad, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad options of process ----------------------------------------------------------------

#: run through the command line: the option, and what the error line must say
BAD_OPTIONS = {
    "set_not_a_float": (["--set", "jump.rejection_threshold=abc"],
                        ["jump.rejection_threshold", "'abc'", "float"]),
    "set_unknown_step": (["--set", "nosuchstep.x=1"], ["--set nosuchstep.x=1", "no step named"]),
    "use_unknown_impl": (["--use", "ramp_fit=nope"],
                         ["--use ramp_fit=nope", "no implementation 'nope'"]),
    "skip_rate_step": (["--skip", "ramp_fit"], ["--skip ramp_fit", "cannot be skipped"]),
    "algorithm_spelling": (["--set", "ramp_fit.algorithm=likely"],
                           ["--set ramp_fit.algorithm=likely", "'likely'", "case-sensitive",
                            "LIKELY"]),
    "algorithm_and_use_disagree": (["--set", "ramp_fit.algorithm=LIKELY", "--use",
                                    "ramp_fit=builtin"],
                                   ["--set ramp_fit.algorithm=LIKELY", "--use ramp_fit=builtin",
                                    "give only one"]),
    "output_dir_is_a_file": (["-o", "@FILE@"], ["a_file", "not a directory"]),
}

#: the same configuration checks, in process (config.load): keyword arguments, message
BAD_SETTINGS = [
    ({"sets": ["jump.nosuch=1"]}, "step 'jump' has no parameter 'nosuch'"),
    ({"sets": ["jump=3"]}, "expected STEP.PARAM=VALUE"),
    ({"sets": ["jump.minimum_groups=2.5"]}, "not a valid int"),
    ({"use": ["nosuch=x"]}, "--use nosuch=x: no step named 'nosuch'"),
    ({"use": ["ramp_fit"]}, "expected NAME=VALUE"),
    ({"skip": ["nosuch"]}, "--skip nosuch: no step named 'nosuch'"),
    ({"overrides": ["nosuch=x.fits"]}, "no step reads a reference of type 'nosuch'"),
    ({"output_dir": "@FILE@/sub"}, "cannot be made: .*a_file is a file"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_bad_settings_are_bad_input(tmp_path, kwargs, message):
    from streamdet import config
    from streamdet.core.errors import BadInputError

    (tmp_path / "a_file").write_text("x")
    kwargs = {k: (Path(str(v).replace("@FILE@", str(tmp_path / "a_file")))
                  if k == "output_dir" else v) for k, v in kwargs.items()}
    with pytest.raises(BadInputError, match=message):
        config.load(**kwargs)


def test_bad_config_file_is_bad_input(tmp_path):
    from streamdet import config
    from streamdet.core.errors import BadInputError

    with pytest.raises(BadInputError, match="nosuch.toml: no such configuration file"):
        config.load(tmp_path / "nosuch.toml")
    bad = tmp_path / "run.toml"
    bad.write_text("[steps.jump]\nrejection_threshold = 'high'\n")
    with pytest.raises(BadInputError, match=r"run.toml: parameter jump.rejection_threshold"):
        config.load(bad)
    bad.write_text("[steps.jump\n")
    with pytest.raises(BadInputError, match="run.toml: not valid TOML"):
        config.load(bad)
    good = tmp_path / "good.toml"
    good.write_text("[steps.jump]\nrejection_threshold = 5\n[use]\nramp_fit = 'builtin'\n")
    run = config.load(good, sets=["jump.rejection_threshold=6"])
    assert run.params["jump"]["rejection_threshold"] == "6"  # the command line wins


@pytest.fixture(scope="module")
def bad_option_runs(sim, env, tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_options")
    (work / "a_file").write_text("I am a file\n")
    before = tree(sim.uncal.parent)

    def one(name):
        args = [str(work / "a_file") if a == "@FILE@" else a for a in BAD_OPTIONS[name][0]]
        out = [] if "-o" in args else ["-o", work / f"out_{name}"]
        return name, run_cli(["process", sim.uncal, *out, *args], env, work)

    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(pool.map(one, BAD_OPTIONS))
    return work, runs, before


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option_is_one_line_exit_2(sim, bad_option_runs, name):
    work, runs, before = bad_option_runs
    result = runs[name]
    assert result.returncode == 2, (result.returncode, result.stderr)
    line = one_error_line(result)
    for fragment in BAD_OPTIONS[name][1]:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert result.stdout == ""
    assert not (work / f"out_{name}").exists()
    assert (work / "a_file").read_text() == "I am a file\n"
    assert tree(sim.uncal.parent) == before


# -- simulate ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--subarray", "NOPE"], "unknown subarray 'NOPE'"),
    (["--ngroups", "0"], "ngroups must be an integer >= 1"),
])
def test_simulate_bad_arguments(bare_env, tmp_path, args, fragment):
    outdir = tmp_path / "sim"
    result = run_cli(["simulate", outdir, *args], bare_env, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert fragment in line and "sim" in line, line
    assert not outdir.exists()


def test_simulate_outdir_is_a_file(bare_env, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me\n")
    result = run_cli(["simulate", target], bare_env, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "taken" in line and "not a directory" in line
    assert target.read_text() == "keep me\n"


def test_simulate_writes_and_says_where(bare_env, tmp_path):
    outdir = tmp_path / "sim"
    result = run_cli(["simulate", outdir, "--ngroups", "3", "--nints", "1"], bare_env, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    printed = dict(line.split(": ", 1) for line in lines[:2])
    assert Path(printed["uncal"]).is_file() and Path(printed["truth"]).is_file()
    assert lines[2].startswith("export CRDS_PATH=")


def test_simulate_does_not_overwrite_without_overwrite(sim, bare_env, tmp_path):
    before = tree(sim.outdir)
    result = run_cli(["simulate", sim.outdir, "--ngroups", "5"], bare_env, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(sim.outdir) in line and "--overwrite" in line
    assert tree(sim.outdir) == before


_WITH_ATEXIT = """
import atexit, sys
atexit.register(lambda: print("atexit handler ran", flush=True))
sys.argv = ["streamdet", *sys.argv[1:]]
from streamdet.cli import main
main()
"""


def test_process_ends_quickly_but_runs_atexit_handlers(sim, env, tmp_path):
    """``process`` skips the interpreter's teardown once its work is on disk, but what
    was registered with atexit (by a plugin, say) still runs, and the exit code holds."""
    cmd = [sys.executable, "-c", _WITH_ATEXIT]
    ok = run_cli(["process", sim.uncal, "-o", tmp_path / "out"], env, tmp_path, cmd=cmd)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "atexit handler ran"
    assert f"{sim.uncal.name}: " in ok.stdout  # the run's seconds, before the table
    for kind in ("rate", "rateints"):
        assert (tmp_path / "out" / sim.uncal.name.replace("_uncal", f"_{kind}")).is_file()
    bad = run_cli(["process", tmp_path / "none_uncal.fits"], env, tmp_path, cmd=cmd)
    assert bad.returncode == 2
    assert bad.stdout.splitlines() == ["atexit handler ran"]


def test_quicklook_png_needs_no_matplotlib(tmp_path):
    """matplotlib is not a dependency: the demo's PNG must be drawn without it (a fresh
    install has none; astropy's ImageNormalize would need it)."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import numpy as np\n"
            "from streamdet.quicklook import to_gray, write_png\n"
            f"write_png({str(tmp_path / 'q.png')!r}, to_gray(np.arange(12.0).reshape(3, 4)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
