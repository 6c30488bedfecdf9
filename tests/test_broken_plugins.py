"""Broken plugins, end to end: fake *installed* distributions (``*.dist-info`` with
METADATA and entry_points.txt on PYTHONPATH, as pip leaves them) next to a good one, and
the real command line in a subprocess: ``streamdet steps``, ``streamdet plugins`` and
``streamdet process`` succeed, name each broken package on a line of its own, list the
good plugin and keep the built-in chain.

And observers that raise, in process and through the command line: the run goes on, the
products are those of a run without them, the other observers hear every event, and the
failure is one warning naming the plugin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from streamdet import hookimpl
from streamdet.core.plugins import PluginWarning
from streamdet.plugins import MIRI_ORDER
from streamdet.testing import metadata_tree_text, run_chain

#: distribution name -> (module name, module source)
FAKES = {
    "sd-broken-import": ("sd_broken_import", """
        raise RuntimeError("sd_broken_import is broken on purpose")
    """),
    "sd-lost-anchor": ("sd_lost_anchor", """
        from streamdet import hookimpl
        from streamdet.core.step import Step

        class Lost(Step):
            name = "lost_step"
            implementation = "lost"
            after = "no_such_step"

            def process(self, chunk):
                pass

        @hookimpl
        def streamdet_steps():
            return [Lost]
    """),
    "sd-bad-param": ("sd_bad_param", """
        from streamdet import hookimpl
        from streamdet.core.step import Param, Step

        class BadParam(Step):
            name = "bad_param_step"
            implementation = "bad"
            after = "jump"
            params_spec = {"width": Param(int, "wide", "a default of the wrong type")}

            def process(self, chunk):
                pass

        @hookimpl
        def streamdet_steps():
            return [BadParam]
    """),
    # loads fine (it is not in the registry's broken list) but fails in every run
    "sd-bad-observer": ("sd_bad_observer", """
        from streamdet import hookimpl

        @hookimpl
        def streamdet_step_finished(step):
            raise RuntimeError("sd_bad_observer is broken on purpose")
    """),
    "sd-good-step": ("sd_good_step", """
        from streamdet import hookimpl
        from streamdet.core.step import Param, Step

        class GoodStep(Step):
            name = "good_step"
            implementation = "good"
            after = "rscd"
            default_skip = True
            params_spec = {"factor": Param(float, 1.0, "multiplies nothing")}

            def process(self, chunk):
                pass

        @hookimpl
        def streamdet_steps():
            return [GoodStep]
    """),
}

GOOD_ORDER = [*MIRI_ORDER[: MIRI_ORDER.index("rscd") + 1], "good_step",
              *MIRI_ORDER[MIRI_ORDER.index("rscd") + 1:]]

#: a complete HISTORY record of one step (see streamdet.core.record.history_line)
HISTORY_RECORD = re.compile(r"streamdet: (?P<step>\w+)=(?P<implementation>\S+) "
                            r"\((?P<package>\S+) (?P<version>\S+)\)")


def install_fakes(site: Path) -> None:
    """Write each fake distribution the way pip installs one: module + dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    for dist, (module, source) in FAKES.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source).lstrip())
        info = site / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        entry = module.removeprefix("sd_")
        (info / "entry_points.txt").write_text(f"[streamdet.steps]\n{entry} = {module}\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("fake-site")
    install_fakes(site)
    out = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    out["COLUMNS"] = "400"  # rich tables are not cut to 80 columns
    out["STREAMDET_QUICKLOOK"] = "off"  # if that plugin is installed, spare its figure
    return out


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamdet.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def broken_lines(text: str) -> dict[str, str]:
    """The one line that names each fake package (failing if there are several)."""
    found = {}
    for dist in FAKES:
        lines = [line for line in text.splitlines() if f"plugin package {dist}:" in line]
        assert len(lines) <= 1, f"{dist} reported more than once:\n" + "\n".join(lines)
        if lines:
            found[dist] = lines[0]
    return found


def check_broken_reports(text: str) -> None:
    lines = broken_lines(text)
    assert set(lines) == {"sd-broken-import", "sd-lost-anchor", "sd-bad-param"}, text
    assert re.search(r"entry point 'broken_import' \(sd_broken_import\) failed to import: "
                     r"RuntimeError: sd_broken_import is broken on purpose", lines["sd-broken-import"])
    assert "step 'lost_step' is declared to come after unknown step 'no_such_step'" \
        in lines["sd-lost-anchor"]
    assert "BadParam parameter 'width'" in lines["sd-bad-param"]
    assert "'wide'" in lines["sd-bad-param"] and "int" in lines["sd-bad-param"]


def table_rows(stdout: str) -> list[list[str]]:
    """Rows of ``streamdet steps``'s table (columns separated by 2+ blanks)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]
    assert rows and rows[0][:4] == ["step", "implementation", "package", "active"], stdout
    return rows[1:]


def test_steps_lists_the_good_plugin_and_names_each_broken_one(env):
    done = cli(env, "steps")
    assert done.returncode == 0, done.stderr
    check_broken_reports(done.stderr)
    assert all(line.startswith("streamdet: warning: ") for line in done.stderr.splitlines()
               if "plugin package sd-" in line)
    rows = table_rows(done.stdout)
    order = list(dict.fromkeys(row[0] for row in rows))
    # other contrib plugins may be installed in this environment: look at ours and the built-ins
    assert [name for name in order if name in GOOD_ORDER] == GOOD_ORDER
    assert not {"lost_step", "bad_param_step"} & set(order)
    active = {row[0]: row for row in rows if row[3] == "yes"}
    assert active["good_step"][1:3] == ["good", "sd-good-step 1.0"]
    assert active["good_step"][4] == "True"  # skipped by default
    for name in MIRI_ORDER:
        assert active[name][1:3] == ["builtin", "streamdet 0.1.0"], active[name]


def test_plugins_lists_the_good_plugin_and_names_each_broken_one(env):
    done = cli(env, "plugins")
    assert done.returncode == 0, done.stderr
    check_broken_reports(done.stdout)
    for line in broken_lines(done.stdout).values():
        assert line.startswith("broken: plugin package ")
    lines = done.stdout.splitlines()
    assert "sd-good-step 1.0  good_step: streamdet_steps" in lines
    for name in MIRI_ORDER:
        assert f"streamdet 0.1.0  {name}: streamdet_steps" in lines
    # a plugin that failed to import or to declare its steps is not listed as loaded
    assert not [l for l in lines if l.startswith(("sd-broken-import ", "sd-bad-param "))]
    assert "sd-bad-observer 1.0  bad_observer: streamdet_step_finished" in lines


def history_records(header) -> dict[str, tuple[str, str, str]]:
    """step -> (implementation, package, version) from a product's HISTORY cards, each of
    which must be one complete record (none continued on the next card)."""
    records = {}
    for text in header["HISTORY"]:
        record = HISTORY_RECORD.fullmatch(str(text))
        assert record, f"HISTORY card is not one complete record: {str(text)!r}"
        assert record["step"] not in records, f"two HISTORY cards for {record['step']}"
        records[record["step"]] = (record["implementation"], record["package"], record["version"])
    return records


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_process_runs_with_broken_plugins_installed(env, streamdet_sim, tmp_path, quiet):
    from astropy.io import fits

    sim = streamdet_sim(subarray="SUB64", ngroups=6, nints=1)
    out = tmp_path / "products"
    done = cli({**env, **sim.env}, "process", str(sim.uncal), "-o", str(out),
               "--set", "good_step.skip=false", *(["-q"] if quiet else []))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    if quiet:  # -q prints only errors
        assert "plugin package" not in done.stderr, done.stderr
    else:  # each broken plugin on one line, then the observer that raised, once
        reported = broken_lines(done.stderr)
        observer = reported.pop("sd-bad-observer")
        check_broken_reports("\n".join(reported.values()))
        assert all(line.startswith("streamdet: warning: plugin package sd-")
                   for line in [*reported.values(), observer])
        assert re.search(r"observer 'bad_observer' failed in streamdet_step_finished on "
                         r".*_uncal\.fits: RuntimeError: sd_bad_observer is broken on purpose",
                         observer), observer
    rate = out / sim.uncal.name.replace("_uncal.fits", "_rate.fits")
    records = history_records(fits.getheader(rate))
    assert records["good_step"] == ("good", "sd-good-step", "1.0")
    for name in ("dq_init", "jump", "ramp_fit"):
        assert records[name] == ("builtin", "streamdet", "0.1.0")
    assert [name for name in records if name in GOOD_ORDER] == list(records)  # chain order


# -- observers that raise, in process ---------------------------------------------------

def test_an_observer_that_raises_does_not_end_the_run(streamdet_sim, tmp_path):
    from astropy.io import fits

    sim = streamdet_sim(subarray="SUB64", ngroups=6, nints=2)
    heard: list[tuple] = []  # both observers', in the order they were called

    class Recorder:
        """A good observer: notes every event."""

        @hookimpl
        def streamdet_exposure_started(self, chain):
            heard.append(("good", "started", len(chain)))

        @hookimpl
        def streamdet_step_finished(self, step, chunk):
            heard.append(("good", "step", step.name, chunk.rows.start, chunk.rows.stop,
                          tuple(chunk.int_index)))

        @hookimpl
        def streamdet_exposure_finished(self, products):
            heard.append(("good", "finished", tuple(sorted(products))))

    bad = types.ModuleType("sd_test_bad_observer")

    @hookimpl
    def streamdet_step_finished(step):
        heard.append(("bad", "step", step.name))
        raise RuntimeError("broken on purpose")

    bad.streamdet_step_finished = streamdet_step_finished

    plain = run_chain(sim.uncal, tmp_path / "plain", sim=sim, plugins=[Recorder()],
                      only_builtin=True)
    expected = Counter(heard)
    heard.clear()
    # registered after the recorder, so pluggy calls it first for each event
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_chain(sim.uncal, tmp_path / "broken", sim=sim,
                           plugins=[Recorder(), bad], only_builtin=True)

    reports = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert len(reports) == 1, reports  # once per plugin per run, not once per chunk
    assert reports[0].startswith("plugin package sd_test_bad_observer: observer "
                                 "'sd_test_bad_observer' failed in streamdet_step_finished "
                                 f"on {sim.uncal}: RuntimeError: broken on purpose")
    assert "\n" not in reports[0]
    # the bad observer was called for every step, each time before the good one
    steps = [e for e in heard if e[1] == "step"]
    assert steps and [who for who, *_ in steps] == ["bad", "good"] * (len(steps) // 2)
    assert Counter(e for e in heard if e[0] == "good") == expected
    assert expected[("good", "finished", ("rate", "rateints"))] == 1

    for kind in ("rate", "rateints"):
        assert result.products[kind].exists()
        with fits.open(result.products[kind]) as a, fits.open(plain.products[kind]) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ours, theirs in zip(a[1:], b[1:]):
                if ours.name == "ASDF":  # the metadata tree holds the time of writing
                    assert metadata_tree_text(ours) == metadata_tree_text(theirs)
                    continue
                assert ours.data.tobytes() == theirs.data.tobytes(), f"{kind} {ours.name}"
            records = history_records(a[0].header)
            assert list(records) == [s.name for s in result.chain if not s.skip]
            assert history_records(b[0].header) == records


def test_watch_reports_an_observer_that_raises_with_the_file(env, streamdet_sim, tmp_path):
    """In the daemon the observer runs in a worker process: its warning comes back with
    the job and is logged against the file, which is still done."""
    import shutil

    sim = streamdet_sim(subarray="SUB64", ngroups=6, nints=1)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    shutil.copy(sim.uncal, inbox / sim.uncal.name)
    done = cli({**env, **sim.env}, "watch", str(inbox), "--output", str(outbox), "--once",
               "--workers", "1", "--settle", "0.2", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    assert (outbox / sim.uncal.name.replace("_uncal.fits", "_rate.fits")).is_file()
    import json

    events = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()
              if line.startswith("{")]
    warned = [e for e in events if e.get("event") == "plugin"]
    assert len(warned) == 1, events
    assert warned[0]["file"] == sim.uncal.name
    assert "sd-bad-observer" in warned[0]["message"]
    assert "streamdet_step_finished" in warned[0]["message"]
