"""The products' schemas kept between processes (streamdet.core.products, schema cache):
a process that finds a current cache uses its schemas, which are the ones asdf would
have parsed and resolved; a cache from other package versions is ignored and replaced."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

#: in a fresh interpreter: make and validate the three products' models as the writer
#: does, keep the schemas, and report what came from the cache
_FRESH_PROCESS = """
import json, pickle, sys
import numpy as np
from stdatamodels import fits_support
from streamdet.core import products
with products._asdf_scope():
    for name in ("ImageModel", "CubeModel", "RampModel"):
        model = products.new_model(name)
        model.data = np.zeros((2, 2) if name == "ImageModel" else (1, 2, 2) if name ==
                              "CubeModel" else (1, 1, 2, 2), np.float32)
        fits_support.to_fits(model._instance, model._schema)  # validates: parses schemas
products._write_schema_cache()
with open(sys.argv[1], "wb") as out:
    pickle.dump({"resolved": products._schemas, "parsed": products._parsed}, out)
print(json.dumps({"loaded": products._schema_cache_state["loaded"],
                  "key": products._schema_cache_state["key"]}))
"""


def _run(tmp_path, cache: str, dump_name: str) -> tuple[dict, dict]:
    dump = tmp_path / dump_name
    env = {**os.environ, "STREAMDET_SCHEMA_CACHE": cache}
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(dump)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(dump, "rb") as f:
        return json.loads(done.stdout.strip().splitlines()[-1]), pickle.load(f)


def test_a_second_process_takes_the_schemas_from_the_cache(tmp_path):
    cache = tmp_path / "schemas.pickle"
    first, fresh = _run(tmp_path, str(cache), "first.pickle")
    assert first["loaded"] > 0 and cache.is_file()  # written, after parsing anew
    second, cached = _run(tmp_path, str(cache), "second.pickle")
    assert second["key"] == first["key"]
    assert second["loaded"] == len(cached["resolved"]) + len(cached["parsed"])
    assert set(cached["resolved"]) == {"ImageModel", "CubeModel", "RampModel"}
    uncached, plain = _run(tmp_path, "off", "plain.pickle")
    assert uncached["key"] is None and not (tmp_path / "off").exists()
    assert cached["resolved"] == plain["resolved"] == fresh["resolved"]
    assert cached["parsed"] == plain["parsed"]


def test_a_cache_from_other_sources_is_ignored_and_replaced(tmp_path):
    cache = tmp_path / "schemas.pickle"
    bogus = {"ImageModel": {"title": "not the ImageModel schema"}}
    with open(cache, "wb") as f:
        pickle.dump({"key": "other versions", "resolved": bogus, "parsed": {}}, f)
    report, seen = _run(tmp_path, str(cache), "seen.pickle")
    assert seen["resolved"]["ImageModel"] != bogus["ImageModel"]
    with open(cache, "rb") as f:
        kept = pickle.load(f)
    assert kept["key"] == report["key"] != "other versions"
    assert kept["resolved"] == seen["resolved"]


def test_an_unreadable_cache_costs_nothing_but_time(tmp_path):
    cache = tmp_path / "schemas.pickle"
    cache.write_bytes(b"not a pickle")
    _, seen = _run(tmp_path, str(cache), "seen.pickle")
    assert set(seen["resolved"]) == {"ImageModel", "CubeModel", "RampModel"}
