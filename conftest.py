"""The test suite's own per-user caches.

The suite makes hundreds of throwaway CRDS caches; their remembered lookups would push
the user's own out of ``~/.cache/streamdet/crds_lookups.json`` (it keeps the last 64),
and the user's next run of a real exposure would import crds and look up again (~0.45 s
each time). So the suite remembers its CRDS answers and products' schemas in a directory
of its own, unless the environment already names those files. Tests of the caches
themselves set the variables they need.
"""

from __future__ import annotations

import os

import pytest

#: environment variable -> file name of streamdet's per-user caches (streamdet.core.caches)
SUITE_CACHES = {"STREAMDET_CRDS_MEMO": "crds_lookups.json",
                "STREAMDET_SCHEMA_CACHE": "product_schemas.pickle"}


@pytest.fixture(scope="session", autouse=True)
def _suite_caches(tmp_path_factory):
    directory = tmp_path_factory.mktemp("streamdet-caches")
    patch = pytest.MonkeyPatch()
    for variable, name in SUITE_CACHES.items():
        if variable not in os.environ:
            patch.setenv(variable, str(directory / name))
    yield
    patch.undo()
