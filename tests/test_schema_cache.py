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
import yaml
parsed_yaml = []  # what asdf parses with yaml.safe_load (its extension manifests)
_safe_load = yaml.safe_load
yaml.safe_load = lambda text: parsed_yaml.append(1) or _safe_load(text)
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
    pickle.dump({"resolved": products._schemas, "parsed": products._parsed,
                 "manifests": products._manifests, "plugin_dists": products._plugin_dists}, out)
extensions = products._product_plugins()["extensions"]
print(json.dumps({"loaded": products._schema_cache_state["loaded"],
                  "key": products._schema_cache_state["key"],
                  "parsed_yaml": len(parsed_yaml),
                  "manifests": [e.delegate._manifest for e in extensions],
                  "extension_packages": [[e.package_name, e.package_version]
                                         for e in extensions]}, default=str))
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
    assert second["loaded"] == sum(len(cached[part]) for part in
                                   ("resolved", "parsed", "manifests", "plugin_dists"))
    assert set(cached["resolved"]) == {"ImageModel", "CubeModel", "RampModel"}
    uncached, plain = _run(tmp_path, "off", "plain.pickle")
    assert uncached["key"] is None and not (tmp_path / "off").exists()
    assert cached["resolved"] == plain["resolved"] == fresh["resolved"]
    assert cached["parsed"] == plain["parsed"]


def test_a_second_process_takes_asdfs_manifests_and_plugin_packages_from_the_cache(tmp_path):
    """asdf's core extensions parse their manifests (YAML) when first loaded, and finding
    the asdf entry points scans every installed distribution: both are kept too."""
    from importlib.metadata import entry_points

    cache = tmp_path / "schemas.pickle"
    first, _ = _run(tmp_path, str(cache), "first.pickle")
    second, _ = _run(tmp_path, str(cache), "second.pickle")
    plain, _ = _run(tmp_path, "off", "plain.pickle")
    assert first["parsed_yaml"] >= 1 and plain["parsed_yaml"] == first["parsed_yaml"]
    assert second["parsed_yaml"] == 0
    assert second["manifests"] == plain["manifests"] == first["manifests"]
    core = next(p for p in entry_points(group="asdf.extensions")
                if p.value == "asdf._core._integration:get_extensions")
    assert second["extension_packages"] == plain["extension_packages"]
    assert {tuple(p) for p in second["extension_packages"]} == {(core.dist.name,
                                                                 core.dist.version)}


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
