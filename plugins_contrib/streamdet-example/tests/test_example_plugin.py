"""The example of docs/plugins.md is this package's module, character for character, and
it works: inserted after dark_current, skipped by default, and doing its job when asked."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO = PACKAGE_ROOT.parents[1]
MODULE_FILE = PACKAGE_ROOT / "streamdet_example" / "row_median.py"
try:
    from streamdet_example import row_median
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(PACKAGE_ROOT))
    from streamdet_example import row_median

from streamdet.core.errors import BadInputError
from streamdet.core.plugins import build_registry


def doc_block(marker: str, language: str = "python") -> str:
    """The fenced block right after ``<!-- example: MARKER -->`` in docs/plugins.md."""
    text = (REPO / "docs" / "plugins.md").read_text()
    found = re.search(rf"<!-- example: {re.escape(marker)} -->\n```{language}\n(.*?)^```$",
                      text, re.S | re.M)
    assert found, f"docs/plugins.md has no {language} block marked {marker!r}"
    return found.group(1)


def test_the_doc_example_is_the_package_module():
    block = doc_block("plugins_contrib/streamdet-example/streamdet_example/row_median.py")
    assert block == MODULE_FILE.read_text(), (
        "docs/plugins.md's example and streamdet_example/row_median.py differ: "
        "change both together")
    assert len(block.splitlines()) <= 40


def test_entry_point_matches_the_doc():
    pyproject = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["streamdet.steps"] == {
        "row_median": "streamdet_example.row_median"}
    text = (REPO / "docs" / "plugins.md").read_text()
    assert '[project.entry-points."streamdet.steps"]\nrow_median = "streamdet_example.row_median"' in text


def test_inserted_right_after_dark_current_and_skipped_by_default():
    registry = build_registry((row_median,))
    order = registry.order
    # between dark_current and the built-in step that followed it (other installed plugins
    # anchored after dark_current may sit there too)
    assert order.index("dark_current") < order.index("row_median") < order.index("refpix")
    assert registry.implementation("row_median") is row_median.RowMedian
    # (if the package is also installed, registering the module again is refused: fine)
    problems = [m for m in registry.broken if re.search(r"streamdet[-_]example|row_median", m)]
    assert all("could not be registered" in m for m in problems), problems
    step = row_median.RowMedian()
    assert step.skip and step.params == {"statistic": "median"}
    with pytest.raises(BadInputError, match="not one of"):
        row_median.RowMedian({"statistic": "mode"})


def row_levels(path: Path) -> np.ndarray:
    rate = fits.getdata(path, "SCI")
    return np.nanmedian(rate, axis=1)


def test_runs_through_the_test_kit(streamdet_sim, streamdet_run):
    sim = streamdet_sim(subarray="SUB64", ngroups=8, nints=2, seed=5)
    default = streamdet_run(sim, plugins=[row_median])
    builtin = streamdet_run(sim)
    chain = {s.name: s for s in default.chain}
    assert chain["row_median"].skip and chain["row_median"].skip_reason == "skipped by default"
    for kind in ("rate", "rateints"):
        with fits.open(default.products[kind]) as a, fits.open(builtin.products[kind]) as b:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                assert a[ext].data.tobytes() == b[ext].data.tobytes(), f"{kind} {ext}"
            # a step jwst lacks records its status once it runs (jwst's S_* set stays exact)
            assert "S_ROWMED" not in a[0].header
            assert "ROWMEDST" not in a[0].header

    on = streamdet_run(sim, plugins=[row_median], steps={"row_median": {"skip": False}})
    assert not {s.name: s for s in on.chain}["row_median"].skip
    header = fits.getheader(on.products["rate"])
    assert header["S_ROWMED"] == "COMPLETE" and header["ROWMEDST"] == "median"
    history = [str(card) for card in header["HISTORY"]]
    # the installed distribution serves it, or (not installed) the module registered here
    assert any(re.fullmatch(r"streamdet: row_median=example \(streamdet[-_]example \S+\)", card)
               for card in history), history
    before, after = row_levels(builtin.products["rate"]), row_levels(on.products["rate"])
    assert np.median(np.abs(after)) < 0.5 * np.median(np.abs(before))

    mean = streamdet_run(sim, plugins=[row_median],
                         steps={"row_median": {"skip": "false", "statistic": "mean"}})
    assert fits.getheader(mean.products["rate"])["ROWMEDST"] == "mean"
    assert not np.array_equal(fits.getdata(mean.products["rate"], "SCI"),
                              fits.getdata(on.products["rate"], "SCI"), equal_nan=True)
