"""What a Redis Cluster and `STREAMAPP_REDIS_WAIT_REPLICAS=1` cost ingest: wrk against one web
process on one valkey (no cluster), then on a Valkey Cluster of 3 primaries + 3 replicas
(tests/cluster.py) with WAIT 0 and 1, in rotating order within each round of the same run (the
shared machine drifts; each side meets it alike).

    uv run python bench/cluster.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import redis
from figures import ARRAY, SINGLE, wrk
from procs import ROOT, Procs, clean_env, free_port, log, wait_port

sys.path.insert(0, str(ROOT))
from streamapp.redis_server import server_command
from tests.cluster import Cluster

SIDES = (("plain", 0), ("cluster", 0), ("cluster", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamapp-cluster-bench-"))
    cluster = Cluster(work / "cluster")
    procs = Procs()
    runs: dict[tuple[str, str, int], list[float]] = {}
    plain_port = free_port()
    try:
        cluster.start()
        plain = procs.start(server_command(plain_port, work / "plain"))
        wait_port(plain_port, plain)
        for rnd in range(args.rounds):
            for side, wait in SIDES[rnd % 3 :] + SIDES[: rnd % 3]:
                port = free_port()
                if side == "plain":
                    redis.Redis(port=plain_port).flushall()
                else:
                    cluster.flush()
                env = clean_env(
                    REDIS_URL=cluster.url if side == "cluster" else f"redis://127.0.0.1:{plain_port}",
                    STREAMAPP_REDIS_CLUSTER="1" if side == "cluster" else "0",
                    STREAMAPP_REDIS_WAIT_REPLICAS=str(wait),
                    STREAMAPP_WAREHOUSE=str(work / "warehouse"),
                    STREAMAPP_WEB_PROCESSES="1",
                    STREAMAPP_LOG_LEVEL="WARNING",
                    PORT=str(port),
                )
                subprocess.run([sys.executable, "-m", "streamapp", "check-redis"], env=env, cwd=ROOT, check=True)
                web = procs.start([sys.executable, "-m", "streamapp", "web"], env=env, cwd=ROOT)
                wait_port(port, web)
                try:
                    for figure, body, per in (("single", SINGLE, 1), ("array", ARRAY, 100)):
                        r = wrk(port, body, args.seconds)
                        runs.setdefault((figure, side, wait), []).append(r["rps"] * per)
                        log(
                            f"round {rnd + 1} {figure} {side} WAIT={wait}: {r['rps'] * per:,.0f} events/s, "
                            f"p50 {r['p50']} ms p99 {r['p99']} ms, non-2xx {r['errors']}"
                        )
                finally:
                    procs.stop(web)
    finally:
        procs.stop_all()
        cluster.stop()
    print("events/s (median)   one valkey   cluster WAIT=0   cluster WAIT=1   WAIT=1/WAIT=0   cluster/one")
    for figure in ("single", "array"):
        plain_, zero, one = (statistics.median(runs[(figure, *s)]) for s in SIDES)
        ratios = f"{one / zero:>13.2f}   {zero / plain_:>11.2f}"
        print(f"{figure:<19} {plain_:>10,.0f}   {zero:>14,.0f}   {one:>14,.0f}   {ratios}")


if __name__ == "__main__":
    main()
