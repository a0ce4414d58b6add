"""The benchmark suite of issue 5: streamapp against the seed's design and the machine's limits.

    uv run python bench/run.py            # the full suite (long: 1M-event drains, 10,000 commits)
    uv run python bench/run.py --quick    # the same figures, smaller, in ~3 minutes
    uv run python bench/run.py --only ingest,fresh --commits 2000   # a subset; see --help

Prints a table and appends a dated section to bench/RESULTS.md (--no-write to skip). Everything
runs on this machine, on loopback, and every figure is measured in the same run for:

- streamapp: `python -m streamapp redis` (valkey, append-only), `... web`, `... worker`;
- seed: the seed's original design in ../shared/peers/seed_baseline (FastAPI + one XADD per
  request, a polling loader into pyiceberg), in its own venv (bench/.work/seed-venv, built with its
  setup.sh when missing), against its own valkey started the same way as streamapp's;
- the limits: a bare aiohttp handler that parses the JSON body (msgspec) and answers 202 without
  Redis, and `redis-benchmark` XADD against the same valkey build.

Ingest rounds alternate bare, streamapp, seed (rotating who goes first) and report the median
round, so the machine's drift hits every side alike. wrk and redis-benchmark are installed with
apt-get when missing. Every process started here is stopped before exit. A figure that fails
(say, a runtime change the harness does not follow) is reported under the table and the others
are still measured. BENCH_LOG_LEVEL=INFO shows streamapp's own logs (default WARNING).

The code, by job: run.py (this script) parses the command line, runs the figures asked for,
prints the table and appends it to RESULTS.md; procs.py starts and stops every process
(valkey, streamapp, the seed, the tools); figures.py measures, one fig_* function per figure;
report.py turns the results into the table. bench/commit_latency.py is the child process of the
commit figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import FIGURES
from procs import ROOT, WORK, Procs, ensure_seed_venv, ensure_tool, log
from report import git_rev, machine, render, table

RESULTS = ROOT / "bench" / "RESULTS.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for iteration (~3 min): 2 rounds of 3 s, 200k drain, 10 s freshness, 200 commits",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile web and worker with py-spy (after the figures)"
    )
    parser.add_argument(
        "--only", default="ingest,drain,backfill,fresh,commits", help=f"comma-separated subset of {','.join(FIGURES)}"
    )
    parser.add_argument("--seconds", type=int, help="seconds per wrk round (10)")
    parser.add_argument("--rounds", type=int, help="alternating ingest rounds per side (3)")
    parser.add_argument("--drain", type=int, help="backlog for the drain and backfill figures (1,000,000)")
    parser.add_argument(
        "--drain-rounds", type=int, help="alternating drains per system (2: streamapp, seed, seed, streamapp)"
    )
    parser.add_argument("--drain-timeout", type=float, help="give up waiting for a drain after this (600 s)")
    parser.add_argument("--fresh-seconds", type=float, help="seconds of paced sending per system (30)")
    parser.add_argument("--fresh-rate", type=float, default=200, help="events/s for freshness (200)")
    parser.add_argument("--commits", type=int, help="commits per system for the commit-latency figure (10,000)")
    parser.add_argument("--commit-rows", type=int, default=10, help="rows per commit (10)")
    parser.add_argument("--xadd-requests", type=int, default=400_000, help="redis-benchmark -n for -P 16 (400,000)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    defaults = (
        {
            "seconds": 3,
            "rounds": 2,
            "drain": 200_000,
            "drain_rounds": 1,
            "drain_timeout": 60,
            "fresh_seconds": 10,
            "commits": 200,
        }
        if args.quick
        else {
            "seconds": 10,
            "rounds": 3,
            "drain": 1_000_000,
            "drain_rounds": 2,
            "drain_timeout": 600,
            "fresh_seconds": 30,
            "commits": 10_000,
        }
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    only = [f.strip() for f in args.only.split(",") if f.strip()] + (["profile"] if args.profile else [])
    if unknown := set(only) - set(FIGURES):
        parser.error(f"unknown figures {unknown}")

    ensure_tool(("wrk",), "wrk")
    ensure_tool(("valkey-benchmark", "redis-benchmark"), "redis-tools")
    ensure_seed_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    procs = Procs()
    results: dict = {}
    started = time.monotonic()

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    failed: list[str] = []
    try:
        for name in only:
            log(f"--- {name}")
            part: dict = {}
            try:
                FIGURES[name](procs, work, args, part)
                results.update(part)
            except (RuntimeError, OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
                # e.g. a runtime change the harness does not follow yet: report it, measure the rest
                import traceback

                traceback.print_exc()
                failed.append(f"{name}: {type(e).__name__}: {e}")
                log(f"{name} failed; going on with the other figures")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: the figures measured so far follow; bench/RESULTS.md is left alone")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - started

    command = "uv run python bench/run.py " + " ".join(sys.argv[1:])
    rows = table(results, args)
    text = render(rows) if len(rows) > 1 else ""
    text += "".join(f"\nFAILED {f}" for f in failed)
    for name, top in results.get("profiles", {}).items():
        text += (
            f"\n\npy-spy, {name}: inclusive% self% function (most self time first, then more of "
            f"streamapp's own functions; start-up imports left out)\n"
        ) + "\n".join(f"{a:5.1f} {b:5.1f}  {f}" for a, b, f in top)
    print(f"\n{command}\nmachine: {machine()}; took {took / 60:.1f} min\n\n{text}")
    if not args.no_write and not interrupted:
        with RESULTS.open("a") as f:
            f.write(
                f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, issue 5 suite"
                f"{' (--quick)' if args.quick else ''}\n\nCommand: `{command.strip()}` (took {took / 60:.1f} min)  \n"
                f"Machine: {machine()}; streamapp at {git_rev()}\n\n```\n{text}\n```\n"
            )
        log(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
