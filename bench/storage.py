"""Commit latency of small appends with the warehouse on local disk against S3 (moto_server on
loopback): `uv run python bench/storage.py [--commits 100] [--rows 100] [--rounds 2]`.

Each round runs bench/commit_latency.py (the raw sink's `append`, snapshot expiry and compaction
included) once per storage, on a fresh warehouse, alternating, so that the load of a shared
machine hits both alike. moto keeps objects in memory and answers over loopback HTTP: the S3
figure is the cost of the S3 protocol (requests, signing, no local file system), not of a
network or of a real object store's latency (add ~10-30 ms per request for AWS S3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import S3Server, clean_env  # noqa: E402 - the test fixture's server, as the tests run it


def series(env: dict[str, str], commits: int, rows: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "commit_latency.py"), "streamapp", str(commits), str(rows)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


def describe(name: str, durations: list[float]) -> str:
    ms = sorted(d * 1000 for d in durations)
    p90 = ms[int(len(ms) * 0.9) - 1]
    return (
        f"{name:<10} {len(ms):>5} {statistics.median(ms):>8.1f} {p90:>8.1f} {statistics.fmean(ms):>8.1f} {ms[-1]:>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = S3Server()
    results: dict[str, list[float]] = {"local": [], "s3 (moto)": []}
    try:
        with tempfile.TemporaryDirectory() as work:
            for r in range(args.rounds):
                bucket = f"bench-{r}-{int(time.time())}"
                server.client().create_bucket(Bucket=bucket)
                base = {**clean_env(), "STREAMAPP_LOG_LEVEL": "WARNING"}
                local = {**base, "STREAMAPP_WAREHOUSE": os.path.join(work, f"local-{r}")}
                s3 = {
                    **base,
                    "STREAMAPP_WAREHOUSE": f"s3://{bucket}/lake",
                    "STREAMAPP_STATE_DIR": os.path.join(work, f"state-{r}"),
                    "AWS_ENDPOINT_URL": server.endpoint,
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                }
                results["local"] += series(local, args.commits, args.rows)
                results["s3 (moto)"] += series(s3, args.commits, args.rows)
    finally:
        server.stop()
    print(f"{args.rows}-row appends, {args.rounds} rounds of {args.commits} commits per storage, alternating")
    print(f"{'storage':<10} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'max ms':>8}")
    for name, durations in results.items():
        print(describe(name, durations))


if __name__ == "__main__":
    main()
