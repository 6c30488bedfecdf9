"""Throughput of ``streamdet watch``: files per minute for the local process pool at 1 and
2 workers (and 1 worker on one band thread: the default gives a lone worker every core),
and for a Dask LocalCluster with 2 worker processes.

One exposure is simulated (default SUB256, 10 groups, 2 integrations) with its CRDS
cache; for each executor a fresh daemon (a real ``streamdet watch`` subprocess) is
started, and once its workers are up the same file is dropped into its inbox under N
names at once (written under a temporary name and renamed, as a transfer tool does). The
clock runs from the first file taken to the last one done (from the daemon's journal);
start-up (interpreter, imports, worker warm-up) is reported separately.

    python benchmarks/watch_throughput.py                # 16 SUB256 x 10 groups x 2 ints
    python benchmarks/watch_throughput.py --files 32 --subarray FULL --ngroups 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def streamdet_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("streamdet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "streamdet.cli"]


def wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise TimeoutError(what)


def journal(state: Path) -> list[dict]:
    path = state / "journal.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM files")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def run_case(label: str, uncal: Path, n: int, work: Path, env: dict, args: list[str]) -> dict:
    inbox, outbox = work / label / "inbox", work / label / "outbox"
    inbox.mkdir(parents=True)
    state = outbox / ".streamdet"
    log = work / label / "watch.log"
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(streamdet_cmd() + ["watch", str(inbox), "--output", str(outbox),
                                                   "--settle", "1", *args],
                                env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "workers ready" in log.read_text(errors="replace"), 300,
                     "workers ready", proc)
            startup = time.monotonic() - t0
            data = uncal.read_bytes()
            for i in range(n):
                name = f"jw{i:05d}001001_01101_00001_mirimage_uncal.fits"
                tmp = inbox / f".{name}.part"
                tmp.write_bytes(data)
                os.replace(tmp, inbox / name)
            wait_for(lambda: sum(r["state"] == "done" for r in journal(state)) >= n, 3600,
                     "all files done", proc)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
    rows = journal(state)
    bad = [r for r in rows if r["state"] != "done"]
    if bad:
        raise RuntimeError(f"{label}: {len(bad)} files not done: {bad[0]['error']}")
    # the clock runs from the first file a worker took: before that the files only wait
    # out --settle (a latency the same for any number of workers, not throughput)
    first = min(r["started_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    span = last - first
    return {"label": label, "files": n, "startup_s": startup, "span_s": span,
            "settle_s": first - min(r["seen_at"] for r in rows),
            "files_per_min": n / span * 60,
            "mean_file_s": sum(r["seconds"] for r in rows) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--subarray", default="SUB256")
    ap.add_argument("--ngroups", type=int, default=10)
    ap.add_argument("--nints", type=int, default=2)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--with-observers", action="store_true",
                    help="leave installed observer plugins on (e.g. the quick-look PNG)")
    ap.add_argument("--keep", type=Path, help="work here and keep everything")
    args = ap.parse_args(argv)

    from streamdet.simulate import simulate

    work = args.keep or Path(tempfile.mkdtemp(prefix="streamdet-watch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sim = simulate(work / "sim", subarray=args.subarray, ngroups=args.ngroups,
                       nints=args.nints, seed=0, overwrite=True)
        env = dict(os.environ)
        env.update(sim.env)
        if not args.with_observers:
            env["STREAMDET_QUICKLOOK"] = "off"
        size_mb = sim.uncal.stat().st_size / 1e6
        print(f"{args.files} x {args.subarray} {args.ngroups} groups x {args.nints} ints "
              f"({size_mb:.1f} MB each), {os.cpu_count()} CPUs", flush=True)

        results = []
        for workers in (1, 2):
            results.append(run_case(f"local-{workers}", sim.uncal, args.files, work, env,
                                    ["--workers", str(workers)]))
            print(f"  done: {results[-1]['label']}", flush=True)
        # the default single worker runs each file on both cores' band threads, so the
        # ratio above also holds what threads gain on one file; this row keeps one
        # thread per worker, for what the workers alone gain
        results.append(run_case("local-1-one-thread", sim.uncal, args.files, work,
                                {**env, "STREAMDET_THREADS": "1"}, ["--workers", "1"]))
        print(f"  done: {results[-1]['label']}", flush=True)
        if not args.no_dask:
            results.append(run_dask(sim, args.files, work, env))
            print(f"  done: {results[-1]['label']}", flush=True)

        print()
        print(f"{'executor':<22} {'files':>5} {'start-up s':>10} {'wall s':>8} "
              f"{'files/min':>9} {'s/file (worker)':>15} {'first wait s':>12}")
        for r in results:
            print(f"{r['label']:<22} {r['files']:>5} {r['startup_s']:>10.1f} {r['span_s']:>8.1f} "
                  f"{r['files_per_min']:>9.1f} {r['mean_file_s']:>15.2f} {r['settle_s']:>12.1f}")
        rate = {r["label"]: r["files_per_min"] for r in results}
        print(f"2 workers: {rate['local-2'] / rate['local-1']:.2f}x of 1 worker with its default "
              f"threads, {rate['local-2'] / rate['local-1-one-thread']:.2f}x of 1 worker on one "
              "thread")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run_dask(sim, n: int, work: Path, env: dict) -> dict:
    import distributed

    from streamdet.daemon.worker import warm_up

    saved = dict(os.environ)
    os.environ.update(env)        # the cluster's worker processes inherit it
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            client.run(warm_up)   # a long-running cluster is warm
            return run_case("dask-localcluster-2", sim.uncal, n, work, env,
                            ["--dask-scheduler", cluster.scheduler_address])
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":
    sys.exit(main())
