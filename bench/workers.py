"""Drain rows/s with 1, 2 and 4 workers sharing a sharded stream (issue 12's bench).

    uv run python bench/workers.py [--events 400000] [--shards 4] [--workers 1,2,4] [--rounds 2]

For each round and each line in turn (alternating order, so the machine's drift hits every line
alike): a fresh Redis and web, N clicks sent through POST /api/events as 100-event arrays, the web
stopped, then K processes of `python -m streamapp worker --agent clicks` started together on the
full backlog, timed until events.clicks holds all N rows. The first line is today's default, one
shard and one worker: the baseline of the ratios. Besides rows/s it prints how many of the
machine's cores the workers kept busy (their CPU seconds over the wall time), so a line that
stops scaling can be told apart as the cores' limit or the design's. `--all-agents` runs every
agent (the clicks_per_minute aggregate reads every shard from one worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import RowCount, fill_streamapp
from procs import ROOT, Procs, Streamapp, log, vm_hwm_mb

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / TICKS


def stream_events(system: Streamapp, shards: int) -> int:
    """Events in every shard's clicks stream (an entry holds `n` events)."""
    from streamapp import names

    r, total = system.redis.client, 0
    for key in names.streams("click", shards):
        after = "-"
        while page := r.xrange(key, min=after, count=10_000):
            total += sum(int(fields.get(b"n", 1)) for _, fields in page)
            after = "(" + page[-1][0].decode()
    return total


def line(
    procs: Procs, work: Path, n: int, shards: int, workers: int, agents: list[str], timeout: float, within: float
) -> dict:
    system = Streamapp(
        procs, work, STREAMAPP_SHARDS=str(shards), STREAMAPP_WEB_PROCESSES="1", STREAMAPP_WINDOW_SECONDS=str(within)
    )
    try:
        subprocess.run(  # the check of every shard, as a worker's start does, before the web takes events
            [sys.executable, "-m", "streamapp", "check-redis"],
            cwd=ROOT,
            env=system.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        asyncio.run(fill_streamapp(system.port, n))
        procs.stop(system.web)
        system.web = None
        backlog = stream_events(system, shards)
        if backlog != n:
            raise RuntimeError(f"{backlog} events in the streams, {n} sent")
        rows = RowCount(system.warehouse)
        started = time.monotonic()
        pids = [
            procs.start([sys.executable, "-m", "streamapp", "worker", *agents], cwd=ROOT, env=system.env)
            for _ in range(workers)
        ]
        done = 0
        while done < n and time.monotonic() - started < timeout:
            time.sleep(0.2)
            done = rows()
            for p in pids:
                if p.poll() is not None:
                    raise RuntimeError(f"a worker exited with {p.returncode}")
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(p.pid) for p in pids)
        rss = max(vm_hwm_mb(p.pid)[0] for p in pids)
        for p in pids:
            procs.stop(p)
        return {"rows": done, "seconds": elapsed, "rate": done / elapsed, "cores": cpu / elapsed, "rss": rss}
    finally:
        system.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--all-agents", action="store_true", help="every agent, not only the raw clicks sink")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=1.0,
        help="STREAMAPP_WINDOW_SECONDS: each shard's last window of a backlog is short of the count and "
        "closes this long after its first event, a wait that would dominate a drain of 4 shards at 10 s",
    )
    args = parser.parse_args()
    agents = [] if args.all_agents else ["--agent", "clicks"]
    lines = [(1, 1), *((args.shards, int(k)) for k in args.workers.split(","))]
    runs: dict[tuple[int, int], list[dict]] = {key: [] for key in lines}
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="streamapp-bench-workers-"))
    try:
        for rnd in range(args.rounds):
            for i, (shards, workers) in enumerate(lines if rnd % 2 == 0 else lines[::-1]):
                r = line(
                    procs, work / f"{rnd}-{i}", args.events, shards, workers, agents, args.timeout, args.window_seconds
                )
                runs[(shards, workers)].append(r)
                log(f"{shards} shards, {workers} workers: {r['rate']:,.0f} rows/s, {r['cores']:.2f} cores busy")
    finally:
        procs.stop_all()
    base = statistics.median(r["rate"] for r in runs[lines[0]])
    print(
        f"{args.events:,} clicks drained by `worker {' '.join(agents) or '(every agent)'}`, "
        f"STREAMAPP_WINDOW_SECONDS={args.window_seconds:g}, median of {args.rounds}"
    )
    print("| shards | workers | rows/s (each round) | x 1 shard 1 worker | cores busy | worker VmHWM MB |")
    print("|---|---|---|---|---|---|")
    for (shards, workers), rs in runs.items():
        rate = statistics.median(r["rate"] for r in rs)
        each = ", ".join(f"{r['rate']:,.0f}" for r in rs)
        cores = statistics.median(r["cores"] for r in rs)
        rss = max(r["rss"] for r in rs)
        incomplete = "" if all(r["rows"] >= args.events for r in rs) else " (timed out)"
        print(
            f"| {shards} | {workers} | {rate:,.0f} ({each}){incomplete} | {rate / base:.2f} | {cores:.2f} | {rss:.0f} |"
        )
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
