"""Golden exposures: a refactoring check that products stay byte-identical.

Simulates a fixed set of exposures (seeded, covering every step, the shower search, the
sigma-clip path of jump, the intermediate products and the contrib plugins), runs
``streamdet process`` on each and records the sha256 of the data of every extension of
every product (the ASDF extension is left out: it holds the run's date).

    python benchmarks/golden_products.py --record before.json   # on the old code
    python benchmarks/golden_products.py --compare before.json  # on the new code

``--compare`` prints every extension that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from astropy.io import fits

from streamdet.simulate import simulate

#: name -> (simulate arguments, extra ``streamdet process`` arguments, needs this module)
CASES: dict[str, tuple[dict, list[str], str | None]] = {
    "full_10x1": (dict(subarray="FULL", ngroups=10, nints=1, seed=1), [], None),
    "full_slowr1_6x1": (dict(subarray="FULL", ngroups=6, nints=1, seed=7, readpatt="SLOWR1"),
                        [], None),
    "sub256_10x5": (dict(subarray="SUB256", ngroups=10, nints=5, seed=2), [], None),
    "sub64_5x2": (dict(subarray="SUB64", ngroups=5, nints=2, seed=3), [], None),
    "brightsky_8x3": (dict(subarray="BRIGHTSKY", ngroups=8, nints=3, seed=4), [], None),
    "sub256_showers_20x3": (dict(subarray="SUB256", ngroups=20, nints=3, seed=5,
                                 large_events=True), [], None),
    "sub64_sigclip_6x120": (dict(subarray="SUB64", ngroups=6, nints=120, seed=6), [], None),
    "sub128_saves_12x3": (dict(subarray="SUB128", ngroups=12, nints=3, seed=8),
                          ["--save-ramp", "--save-after", "jump", "--set",
                           "ramp_fit.save_opt=true"], None),
    "sub128_no_pars_skips_9x2": (dict(subarray="SUB128", ngroups=9, nints=2, seed=9),
                                 ["--no-crds-pars", "--skip", "rscd", "--skip", "refpix"],
                                 None),
    "sub256_emicorr_10x2": (dict(subarray="SUB256", ngroups=10, nints=2, seed=10),
                            ["--set", "emicorr.skip=false"], "streamdet_emicorr"),
    "sub64_likely_10x2": (dict(subarray="SUB64", ngroups=10, nints=2, seed=11),
                          ["--set", "ramp_fit.algorithm=LIKELY"], "streamdet_likely"),
}


def hashes(product: Path) -> dict[str, str]:
    out = {}
    with fits.open(product) as hdul:
        for index, hdu in enumerate(hdul):
            if hdu.name == "ASDF" or hdu.data is None:
                continue
            data = hdu.data
            raw = data.tobytes() if not hasattr(data, "_get_raw_data") else bytes(data)
            out[f"{index}:{hdu.name}"] = hashlib.sha256(raw).hexdigest()
    return out


def run(case: str, workdir: Path) -> dict[str, dict[str, str]]:
    sim_args, process_args, module = CASES[case]
    sim = simulate(workdir / case, name=case, **sim_args)
    products = workdir / case / "out"
    env = {**os.environ, **sim.env}
    command = [sys.executable, "-m", "streamdet.cli", "process", str(sim.uncal), "-o",
               str(products), "-q", *process_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{case}: streamdet process failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return {p.name.removeprefix(case + "_mirimage_"): hashes(p)
            for p in sorted(products.glob("*.fits"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    mode.add_argument("--compare", type=Path, help="compare with hashes recorded earlier")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    args = parser.parse_args()
    cases = args.case or list(CASES)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            module = CASES[case][2]
            if module and find_spec(module) is None:
                print(f"{case}: skipped ({module} is not installed)")
                continue
            start = time.perf_counter()
            found[case] = run(case, Path(tmp))
            print(f"{case}: {sum(len(v) for v in found[case].values())} extensions in "
                  f"{len(found[case])} products ({time.perf_counter() - start:.1f} s)")
    if args.record:
        args.record.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(found)} exposures in {args.record}")
        return 0
    recorded = json.loads(args.compare.read_text())
    differ = []
    for case, products in found.items():
        if case not in recorded:
            differ.append(f"{case}: not recorded")
            continue
        for product in sorted(set(products) | set(recorded[case])):
            ours, theirs = products.get(product, {}), recorded[case].get(product, {})
            for ext in sorted(set(ours) | set(theirs)):
                if ours.get(ext) != theirs.get(ext):
                    differ.append(f"{case} {product} {ext}: "
                                  f"{theirs.get(ext, 'absent')[:12]} -> {ours.get(ext, 'absent')[:12]}")
    for line in differ:
        print("DIFFERS", line)
    total = sum(len(e) for p in found.values() for e in p.values())
    print(f"{len(found)} exposures, {total} extensions: "
          + ("all byte-identical" if not differ else f"{len(differ)} differ"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
