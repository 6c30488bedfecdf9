"""CRDS answers remembered across processes (streamdet.core.references._remembered):
a repeated lookup does not import crds, and anything the answer depends on that changes
makes it ask crds again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamdet.simulate import simulate

# one fresh process: resolve the exposure's references, report whether crds was imported
LOOKUP = """
import json, sys
from streamdet.core.exposure import Exposure
from streamdet.core import references
with Exposure(sys.argv[1]) as exposure:
    found = references.resolve(exposure.meta, ["gain", "readnoise", "mask"], {})
print(json.dumps({"paths": {k: v.path for k, v in found.items()},
                  "context": references.crds_context(),
                  "asked_crds": "crds" in sys.modules}))
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("memo-sim"), subarray="SUB64", ngroups=4, nints=1)


def lookup(sim, memo: Path, **env_changes):
    # a user's fresh environment: crds, once used in this process (by jwst), exports its
    # whole configuration as CRDS_* variables
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env = {**clean, **sim.env, "STREAMDET_CRDS_MEMO": str(memo), **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", LOOKUP, str(sim.uncal)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_lookup_skips_crds_and_agrees(sim, tmp_path):
    memo = tmp_path / "memo.json"
    first = lookup(sim, memo)
    second = lookup(sim, memo)
    assert first["asked_crds"] and not second["asked_crds"]
    assert second["paths"] == first["paths"]
    assert Path(first["paths"]["gain"]).is_file()
    off = lookup(sim, tmp_path / "unused.json", STREAMDET_CRDS_MEMO="off")
    assert off["asked_crds"] and off["paths"] == first["paths"]


# two lookups in one process, as a run makes them (step parameters, then references)
TWO_LOOKUPS = """
import json, sys
from streamdet.core.exposure import Exposure
from streamdet.core import references
with Exposure(sys.argv[1]) as exposure:
    first = references.resolve(exposure.meta, ["gain"], {})
    second = references.resolve(exposure.meta, ["mask", "readnoise"], {})
print(json.dumps({"asked_crds": "crds" in sys.modules}))
"""


def test_one_run_remembers_every_lookup_it_made(sim, tmp_path):
    """Importing crds exports its whole configuration as CRDS_* variables: a lookup made
    after that in the same process must still be remembered under the key a fresh
    process computes, or each run would ask crds again for it."""
    memo = tmp_path / "memo.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env = {**clean, **sim.env, "STREAMDET_CRDS_MEMO": str(memo)}

    def run():
        done = subprocess.run([sys.executable, "-c", TWO_LOOKUPS, str(sim.uncal)], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["asked_crds"]

    assert run() and not run()


def test_crds_verbosity_does_not_change_the_answer(sim, tmp_path):
    """The command line quiets crds (CRDS_VERBOSITY=-3) unless -v; the Python API does
    not: both find what the other remembered."""
    memo = tmp_path / "memo.json"
    first = lookup(sim, memo, CRDS_VERBOSITY=None)
    quiet = lookup(sim, memo, CRDS_VERBOSITY="-3")
    assert first["asked_crds"] and not quiet["asked_crds"]
    assert quiet["paths"] == first["paths"]
    assert lookup(sim, memo, CRDS_CLIENT_RETRY_COUNT="2")["asked_crds"]  # any other: asked


def test_changed_rules_reference_or_environment_ask_crds_again(sim, tmp_path):
    memo = tmp_path / "memo.json"
    first = lookup(sim, memo)
    assert not lookup(sim, memo)["asked_crds"]
    mappings = Path(sim.env["CRDS_PATH"]) / "mappings" / "jwst"
    gain_rules = next(mappings.glob("*_miri_gain_*.rmap"))
    gain_file = Path(first["paths"]["gain"])
    server_config = Path(sim.env["CRDS_PATH"]) / "config" / "jwst" / "server_config"
    for changed in (gain_rules, gain_file, mappings / sim.env["CRDS_CONTEXT"], server_config):
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        again = lookup(sim, memo)
        assert again["asked_crds"], changed
        assert again["paths"] == first["paths"]
        assert not lookup(sim, memo)["asked_crds"]
    # another context (even one crds resolves the same way) is another key
    other = lookup(sim, memo, CRDS_CONTEXT=None)
    assert other["asked_crds"] and other["paths"] == first["paths"]
    # a selected file that is gone is not answered from memory
    gain_file.rename(gain_file.with_suffix(".moved"))
    try:
        with pytest.raises(subprocess.CalledProcessError):
            lookup(sim, memo)
    finally:
        gain_file.with_suffix(".moved").rename(gain_file)


def test_unreadable_memo_is_ignored(sim, tmp_path):
    memo = tmp_path / "memo.json"
    memo.write_text("{not json")
    first = lookup(sim, memo)
    assert first["asked_crds"]
    assert not lookup(sim, memo)["asked_crds"]
    assert len(json.loads(memo.read_text())) >= 1


def test_the_suite_keeps_its_answers_out_of_the_users_memo():
    """(conftest.py) the suite's throwaway CRDS caches would push the user's remembered
    answers out of ~/.cache/streamdet/crds_lookups.json."""
    from streamdet.core import references

    users = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamdet"
             / "crds_lookups.json")
    assert references._memo_file() not in (None, users)
