"""streamdet against jwst's Detector1Pipeline: wall time, peak memory, per-step seconds
and parity, on the same simulated exposures with the same references.

Every run is a fresh Python process (imports included), so the numbers are what a user
waits for. Runs alternate (jwst, streamdet, jwst, ...) so that a slow spell of a shared
machine hits both; the cases that give the thread scaling lines also run streamdet on one
thread, in rotation with the others (jwst, streamdet, streamdet on one thread; then
streamdet, one thread, jwst; ...). Before each run the parent calls ``sync``: the
previous run's products go to disk then, not during the next run. Per run the parent
takes the wall time, the child's user+system CPU time and its peak resident set
(``os.wait4``). streamdet runs as the ``streamdet process``
command itself, with its **built-in steps only** (``STREAMDET_DISABLE_PLUGIN_AUTOLOAD=1``):
installed third-party plugins (quicklook observers, alternative fits) are left out. jwst
runs with the simulation's CRDS cache and its step-spec defaults, as in the parity tests.

Per-step seconds: jwst's from its log ("Step X running" .. "Step X done", so they include
jwst's per-step fixed costs), streamdet's from the timings table the command prints. Parity: per extension,
the fraction of pixels where streamdet agrees with jwst within 1e-4 (DQ: bit-identical),
from ``streamdet.testing.compare_products``, for rate and rateints of the last run, so a
speed-up can never hide a wrong answer.

    python benchmarks/vs_jwst.py                 # all cases, 3 runs each (long: ~30+ min)
    python benchmarks/vs_jwst.py --quick         # a small case, 1 run each (< 1 min)
    python benchmarks/vs_jwst.py --cases full_50x2 --repeat 5
    python benchmarks/vs_jwst.py --no-jwst       # streamdet only (development)

Simulations are cached by their arguments under ``--workdir``
(default ``~/.cache/streamdet-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    name: str
    subarray: str
    ngroups: int
    nints: int
    seed: int = 1
    #: run jwst on it by default (the largest case would need ~15 GB and a long time)
    jwst: bool = True
    #: streamdet threads (None: its default, every usable CPU)
    threads: int | None = None
    #: also run streamdet on one thread, interleaved with the other runs of the case (the
    #: thread scaling lines compare runs made in the same minutes)
    one_thread: bool = False
    note: str = ""
    #: simulate MIRI showers and snowballs (``simulate(large_events=True)``)
    large_events: bool = False
    #: jump parameters given to both jwst and streamdet (e.g. shower flagging on)
    jump: tuple = ()


CASES = {
    c.name: c for c in (
        Case("full_50x2", "FULL", 50, 2, one_thread=True),
        Case("full_10x1", "FULL", 10, 1),
        Case("sub256_30x100", "SUB256", 30, 100, one_thread=True),
        Case("sub256_50x100", "SUB256", 50, 100),
        Case("sub64_5x2", "SUB64", 5, 2, note="fixed costs: imports, references"),
        Case("sub256_50x200", "SUB256", 50, 200, jwst=False,
             note="jwst not run by default (~15 GB, minutes; --jwst-all runs it)"),
        Case("sub256_60x500", "SUB256", 60, 500, jwst=False,
             note="jwst issue 5310's size (MemoryError at 7.2 GiB); jwst does not fit in 24 GB"),
        Case("full_250x5", "FULL", 250, 5, jwst=False,
             note="jwst issue 8679's size (2.6 GB uncal; 89 GB, killed after 24 h); "
                  "jwst does not fit in 24 GB"),
        Case("full_50x2_showers", "FULL", 50, 2, seed=22, large_events=True,
             jump=(("find_showers", True),), note="showers in the data, jump.find_showers on"),
    )
}
QUICK = Case("quick_sub256_10x2", "SUB256", 10, 2)
#: the runs of streamdet on one thread (``Case.one_thread``)
ONE_THREAD = "streamdet-1thread"

def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


# --- the child processes ------------------------------------------------------------------

JWST_RUNNER = r"""
import json, logging, re, sys, time
t0 = time.perf_counter()
marks = {}
class _Marks(logging.Handler):
    def emit(self, record):
        m = re.match(r"Step (\w+) (running|done)", record.getMessage())
        if m:
            marks.setdefault(m.group(1), {})[m.group(2)] = time.perf_counter()
handler = _Marks(level=logging.DEBUG)
logging.getLogger().addHandler(handler)
from jwst.pipeline import Detector1Pipeline
for name in ("stpipe", "jwst", "stcal", "stpipe.Detector1Pipeline"):
    logging.getLogger(name).addHandler(handler)
t1 = time.perf_counter()
Detector1Pipeline.call(UNCAL, output_dir=OUT, save_results=True,
                       steps={"jump": JUMP} if JUMP else {})
t2 = time.perf_counter()
steps = {k: v["done"] - v["running"] for k, v in marks.items() if "done" in v and "running" in v}
steps.pop("Detector1Pipeline", None)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("BENCH " + json.dumps({"import": t1 - t0, "run": t2 - t1, "steps": steps, "hwm": hwm}))
"""

STREAMDET_RUNNER = r"""
# the streamdet command itself, as a user runs it (``streamdet process``), with
# third-party plugins left out; the high-water mark is reported from an atexit handler,
# which the command runs before it ends
import atexit, json, sys
def _report():
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print("BENCH " + json.dumps({"hwm": hwm}), flush=True)
atexit.register(_report)
sys.argv = ["streamdet", "process", "--overwrite", "-o", OUT, UNCAL]
if THREADS is not None:
    sys.argv += ["--threads", str(THREADS)]
for name, value in JUMP.items():
    sys.argv += ["--set", f"jump.{name}={value}"]
from streamdet.cli import main
main()
"""


@dataclass
class Run:
    wall: float
    cpu: float
    rss: int            # bytes
    report: dict


def run_child(code: str, env: dict[str, str], logfile: Path, timeout: float) -> Run:
    """Run ``code`` in a fresh interpreter; its wall, CPU and peak RSS from wait4."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    full_env.update(env)
    with open(logfile, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise TimeoutError(f"timed out after {timeout:.0f} s (log: {logfile})")
            time.sleep(0.02)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = logfile.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}); log {logfile}:\n{text[-3000:]}")
    line = next(l for l in reversed(text.splitlines()) if l.startswith("BENCH "))
    report = json.loads(line[len("BENCH "):])
    if "steps" not in report:  # the streamdet command: its printed run time and table
        report.update(_streamdet_printed(text, wall))
    # the child's own high-water mark (VmHWM): wait4's ru_maxrss would also count the
    # parent's memory, which a vfork()ed child carries until it execs
    return Run(wall, usage.ru_utime + usage.ru_stime, report["hwm"], report)


def _streamdet_printed(text: str, wall: float) -> dict:
    """The run seconds (``NAME: 1.23 s``) and the per-step table that ``streamdet
    process`` prints; 'import' is the rest of the wall time (interpreter, imports, exit)."""
    run = next(float(m.group(1)) for m in map(_RUN_LINE.match, text.splitlines()) if m)
    steps = {m.group(1): float(m.group(2)) for m in map(_STEP_ROW.match, text.splitlines())
             if m and m.group(1) != "total"}
    return {"run": run, "import": wall - run, "steps": steps}


_RUN_LINE = re.compile(r"^\S+\.fits: ([0-9.]+) s$")
_STEP_ROW = re.compile(r"^\s*([a-z_0-9]+)\s+│\s+([0-9.]+)\s*$")


def code_for(template: str, **values) -> str:
    head = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    return head + textwrap.dedent(template)


# --- simulations ----------------------------------------------------------------------------

def simulation(workdir: Path, case: Case) -> tuple[Path, dict[str, str]]:
    """The case's exposure (simulated once, then taken from the cache)."""
    where = workdir / (f"{case.subarray}_g{case.ngroups}_n{case.nints}_s{case.seed}"
                       + ("_large" if case.large_events else ""))
    manifest = where / "simulation.json"
    if not manifest.exists():
        from streamdet.simulate import simulate
        print(f"  simulating {where.name} ...", flush=True)
        t0 = time.perf_counter()
        simulate(where, subarray=case.subarray, ngroups=case.ngroups, nints=case.nints,
                 seed=case.seed, overwrite=True, large_events=case.large_events)
        print(f"  simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    info = json.loads(manifest.read_text())
    return Path(info["uncal"]), info["env"]


# --- one case -------------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    runs: dict[str, list[Run]] = field(default_factory=dict)
    parity: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_case(case: Case, workdir: Path, repeat: int, with_jwst: bool, timeout: float) -> Result:
    uncal, env = simulation(workdir, case)
    result = Result(case)
    tools = ((["jwst"] if with_jwst else []) + ["streamdet"]
             + ([ONE_THREAD] if case.one_thread else []))
    out_root = Path(tempfile.mkdtemp(prefix=f"bench-{case.name}-", dir=workdir))
    try:
        for k in range(repeat):
            # in rotation (two tools: alternating), so that no tool always runs after
            # the same one
            order = tools[k % len(tools):] + tools[:k % len(tools)]
            for tool in order:
                out = out_root / tool
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if tool == "jwst":
                    code = code_for(JWST_RUNNER, UNCAL=str(uncal), OUT=str(out), JUMP=dict(case.jump))
                else:
                    code = code_for(STREAMDET_RUNNER, UNCAL=str(uncal), OUT=str(out),
                                    THREADS=1 if tool == ONE_THREAD else case.threads,
                                    JUMP=dict(case.jump))
                run_env = env if tool == "jwst" else {**env, "STREAMDET_DISABLE_PLUGIN_AUTOLOAD": "1"}
                # the previous run's products (jwst's: hundreds of MB) are written back
                # to disk now, not during this run, which they would slow down
                os.sync()
                try:
                    run = run_child(code, run_env, out_root / f"{tool}-{k}.log", timeout)
                except (TimeoutError, RuntimeError) as exc:
                    result.notes.append(f"{tool} run {k + 1} failed: {str(exc)[:300]}")
                    if tool == "jwst":
                        tools = [t for t in tools if t != "jwst"]
                    continue
                result.runs.setdefault(tool, []).append(run)
                print(f"  {case.name} {tool:<16} run {k + 1}: wall {run.wall:6.2f} s  "
                      f"cpu {run.cpu:6.2f} s  rss {run.rss / 2**20:7.0f} MB", flush=True)
        if "jwst" in result.runs and "streamdet" in result.runs:
            from streamdet.testing import compare_products
            stem = uncal.name.replace("_uncal.fits", "")
            for kind in ("rate", "rateints"):
                result.parity[kind] = compare_products(out_root / "streamdet" / f"{stem}_{kind}.fits",
                                                       out_root / "jwst" / f"{stem}_{kind}.fits")
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    return result


# --- the report -----------------------------------------------------------------------------

def _median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def _steps(runs: list[Run]) -> dict[str, float]:
    names = list(dict.fromkeys(k for r in runs for k in r.report["steps"]))
    return {n: statistics.median(r.report["steps"].get(n, 0.0) for r in runs) for n in names}


MACHINE_PROBE = r"""
# what the machine itself gives two threads: two numpy streams over arrays far larger
# than the caches against one, and the cost of memory the process touches first (on a
# VM whose host takes back freed memory, every fresh page is a fault on the host too)
import json, statistics, threading, time
import numpy as np
def stream(a, b, n=8):
    for _ in range(n):
        np.add(a, b, out=a)
pairs = [(np.ones(32 * 2**20, np.float32), np.ones(32 * 2**20, np.float32)) for _ in range(2)]
ratios = []
for _ in range(5):
    t = time.perf_counter(); stream(*pairs[0]); one = time.perf_counter() - t
    threads = [threading.Thread(target=stream, args=pair) for pair in pairs]
    t = time.perf_counter()
    for th in threads: th.start()
    for th in threads: th.join()
    ratios.append(2 * one / (time.perf_counter() - t))
t = time.perf_counter(); fresh = np.ones(256 * 2**20, np.uint8); touched = time.perf_counter() - t
print("BENCH " + json.dumps({"streams": statistics.median(ratios),
                              "fresh_ms_per_mb": 1000 * touched / 256}))
"""


def machine_probe() -> dict[str, float] | None:
    """Two memory streams against one, and fresh memory's cost, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True,
                         text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH ")), None)
    return json.loads(line[len("BENCH "):]) if line else None


def help_seconds(repeat: int = 7) -> dict[str, float]:
    """Median wall seconds of the ``--help`` commands, each in a fresh process."""
    out = {}
    for args in (["--help"], ["process", "--help"]):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "streamdet.cli", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - start)
        out["streamdet " + " ".join(args)] = statistics.median(times)
    return out


def report(results: list[Result], repeat: int, helps: dict[str, float] | None = None,
           probes: list[dict] = ()) -> str:
    lines = []
    add = lines.append
    add(f"streamdet (built-in steps only: installed third-party plugins not loaded) vs "
        f"jwst {_version('jwst')} Detector1Pipeline; fresh process per run, medians of "
        f"{repeat} alternating runs; {os.cpu_count()} CPUs; peak RSS = the process's VmHWM")
    add("")
    add(f"{'case':<20} {'jwst wall':>9} {'sd wall':>8} {'ratio':>6} {'jwst cpu':>9} "
        f"{'sd cpu':>7} {'jwst RSS':>9} {'sd RSS':>8} {'ratio':>6}  note")
    for res in results:
        sd, jw = res.runs.get("streamdet"), res.runs.get("jwst")
        if not sd:
            add(f"{res.case.name:<20} (no streamdet run) {'; '.join(res.notes)}")
            continue
        sd_wall, sd_cpu, sd_rss = _median(sd, "wall"), _median(sd, "cpu"), _median(sd, "rss")
        if jw:
            jw_wall, jw_cpu, jw_rss = _median(jw, "wall"), _median(jw, "cpu"), _median(jw, "rss")
            cols = (f"{jw_wall:8.2f}s {sd_wall:7.2f}s {jw_wall / sd_wall:5.1f}x {jw_cpu:8.2f}s "
                    f"{sd_cpu:6.2f}s {jw_rss / 2**20:7.0f}MB {sd_rss / 2**20:6.0f}MB "
                    f"{jw_rss / sd_rss:5.1f}x")
        else:
            cols = (f"{'-':>9} {sd_wall:7.2f}s {'-':>6} {'-':>9} {sd_cpu:6.2f}s {'-':>9} "
                    f"{sd_rss / 2**20:6.0f}MB {'-':>6}")
        add(f"{res.case.name:<20} {cols}  {'; '.join([res.case.note] + res.notes).strip('; ')}")
        if res.runs.get(ONE_THREAD):
            one = res.runs[ONE_THREAD]
            add(f"{res.case.name + '_1thread':<20} {'-':>9} {_median(one, 'wall'):7.2f}s {'-':>6} "
                f"{'-':>9} {_median(one, 'cpu'):6.2f}s {'-':>9} "
                f"{_median(one, 'rss') / 2**20:6.0f}MB {'-':>6}  streamdet on one thread, "
                f"its runs interleaved with the case's")
    by_name = {r.case.name: r for r in results}
    threaded = by_name.get("full_50x2")
    if threaded and threaded.runs.get("streamdet") and threaded.runs.get(ONE_THREAD):
        one = _median(threaded.runs[ONE_THREAD], "wall")
        many = _median(threaded.runs["streamdet"], "wall")
        add(f"threads: full_50x2 streamdet 1 thread {one:.2f} s, {_usable_cpus()} threads "
            f"(default) {many:.2f} s: {one / many:.2f}x")
    threaded = by_name.get("sub256_30x100")
    if threaded and threaded.runs.get("streamdet") and threaded.runs.get(ONE_THREAD):
        base, runs = threaded.runs[ONE_THREAD], threaded.runs["streamdet"]
        # inside the engine: streamdet's own run seconds (the file's processing, products
        # written), without the interpreter's start and the imports
        one, many = _median_report(base, "run"), _median_report(runs, "run")
        add(f"threads inside the engine: sub256_30x100 run 1 thread {one:.2f} s, "
            f"{_usable_cpus()} threads {many:.2f} s: {one / many:.2f}x")
        # the same without the products' writing, which is serial (the run's own table
        # gives its seconds): the passes and their set-up
        one, many = (statistics.median(r.report["run"] - r.report["steps"].get("write", 0.0)
                                       for r in group)
                     for group in (base, runs))
        add(f"threads inside the engine, products' writing left out: 1 thread {one:.2f} s, "
            f"{_usable_cpus()} threads {many:.2f} s: {one / many:.2f}x")
    small, large = by_name.get("sub256_50x100"), by_name.get("sub256_50x200")
    if small and large and small.runs.get("streamdet") and large.runs.get("streamdet"):
        a, b = _median(small.runs["streamdet"], "rss"), _median(large.runs["streamdet"], "rss")
        add(f"memory vs nints: SUB256 50 groups, 100 ints {a / 2**20:.0f} MB, 200 ints "
            f"{b / 2**20:.0f} MB: {b / a:.2f}x")
    probes = [p for p in probes if p]
    if probes:
        add("machine, before and after the cases: two memory streams "
            + " and ".join(f"{p['streams']:.2f}x" for p in probes) + " one; fresh memory "
            + " and ".join(f"{p['fresh_ms_per_mb']:.2f}" for p in probes) + " ms per MB")
    if helps:
        add("fixed cost: " + ", ".join(f"{k} {v:.2f} s" for k, v in helps.items())
            + " (medians of 7 fresh processes)")
    add("")
    add("per-step seconds (medians; jwst's include its per-step overheads; "
        "'import' is interpreter start to first step)")
    for res in results:
        sd, jw = res.runs.get("streamdet"), res.runs.get("jwst")
        if not sd:
            continue
        s_steps = _steps(sd)
        j_steps = _steps(jw) if jw else {}
        names = list(dict.fromkeys([*j_steps, *s_steps]))
        add(f"  {res.case.name}:")
        add(f"    {'step':<14} {'jwst':>8} {'streamdet':>10}")
        add(f"    {'import':<14} {(_median_report(jw, 'import') if jw else float('nan')):8.2f} "
            f"{_median_report(sd, 'import'):10.2f}")
        for n in names:
            j = f"{j_steps[n]:8.2f}" if n in j_steps else f"{'-':>8}"
            s = f"{s_steps[n]:10.2f}" if n in s_steps else f"{'-':>10}"
            add(f"    {n:<14} {j} {s}")
        add(f"    {'run total':<14} {(_median_report(jw, 'run') if jw else float('nan')):8.2f} "
            f"{_median_report(sd, 'run'):10.2f}")
    add("")
    add("parity with jwst (last run): fraction of pixels within 1e-4 (DQ: identical), "
        "NaN mismatches")
    for res in results:
        if not res.parity:
            add(f"  {res.case.name}: not compared (jwst not run)")
            continue
        for kind, agreements in res.parity.items():
            cells = "  ".join(f"{a.extension} {100 * a.fraction:.4f}%"
                              + (f" ({a.nan_mismatch} NaN)" if a.nan_mismatch else "")
                              for a in agreements)
            add(f"  {res.case.name:<20} {kind:<9} {cells}")
    return "\n".join(lines)


def _median_report(runs, key) -> float:
    return statistics.median(r.report[key] for r in runs)


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "streamdet-bench")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool per case")
    ap.add_argument("--cases", nargs="*", choices=sorted(CASES), help="default: all")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK.name}, 1 run each")
    ap.add_argument("--no-jwst", action="store_true", help="streamdet only")
    ap.add_argument("--jwst-all", action="store_true", help="run jwst on every case")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--output", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        cases, repeat = [QUICK], (args.repeat if "--repeat" in (argv or sys.argv) else 1)
    else:
        cases, repeat = [CASES[n] for n in (args.cases or CASES)], args.repeat
    probes = [machine_probe()]
    results = []
    for case in cases:
        print(f"{case.name}: {case.subarray} {case.ngroups} groups x {case.nints} ints, "
              f"streamdet threads {case.threads or f'{_usable_cpus()} (default)'}"
              + (", and 1" if case.one_thread else ""), flush=True)
        with_jwst = not args.no_jwst and (case.jwst or args.jwst_all)
        results.append(run_case(case, args.workdir, repeat, with_jwst, args.timeout))
    probes.append(machine_probe())
    text = report(results, repeat, help_seconds(), probes)
    print()
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
