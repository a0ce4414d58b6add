"""The worker's peak memory on a drain, for one or more checkouts side by side.

    uv run python bench/worker_memory.py [--events N] [--rounds R] CHECKOUT [CHECKOUT ...]

For each round and each checkout in turn (alternating, so drift hits every side alike): start
its Redis and one web process, fill N clicks through POST /api/events (100-event arrays), start
its default worker on the full stream, poll events.clicks's row count until all N are committed,
and read the worker's VmHWM. Each checkout needs its own `uv sync`ed .venv. Prints a table.
Memory is the figure to compare; the drain seconds include start-up and move with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import RowCount, fill_streamapp
from procs import free_port, vm_hwm_mb, wait_port


def drain(checkout: Path, n: int) -> tuple[float, float]:
    """(seconds from the worker's start to the last row, worker VmHWM in MB)."""
    python = str(checkout / ".venv" / "bin" / "python")
    tmp = Path(tempfile.mkdtemp(prefix="worker-memory-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMAPP_", "REDIS_", "VIRTUAL_ENV"))}
    env.update(
        STREAMAPP_WAREHOUSE=str(tmp / "warehouse"),
        STREAMAPP_REDIS_PORT=str(free_port()),
        PORT=str(free_port()),
        STREAMAPP_WORKER_METRICS_PORT="0",
        STREAMAPP_WEB_PROCESSES="1",
        STREAMAPP_LOG_LEVEL="WARNING",
    )
    procs: list[subprocess.Popen[bytes]] = []

    def start(command: str) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{command}.log", "wb")
        procs.append(
            subprocess.Popen([python, "-m", "streamapp", command], cwd=checkout, env=env, stdout=log, stderr=log)
        )
        return procs[-1]

    def run(command: str) -> None:  # check-redis does not exist before issue 11: its failure is harmless there
        subprocess.run([python, "-m", "streamapp", command], cwd=checkout, env=env, capture_output=True)

    try:
        start("redis")
        wait_port(int(env["STREAMAPP_REDIS_PORT"]))
        run("create-tables")
        run("check-redis")  # ingest answers 503 until Redis was checked against the tables
        start("web")
        wait_port(int(env["PORT"]))
        asyncio.run(fill_streamapp(int(env["PORT"]), n))
        rows = RowCount(tmp / "warehouse")
        started = time.monotonic()
        worker = start("worker")
        while rows() < n:
            time.sleep(0.2)
            if worker.poll() is not None:
                raise RuntimeError(f"{checkout} worker exited: {(tmp / 'worker.log').read_text()[-2000:]}")
        return time.monotonic() - started, vm_hwm_mb(worker.pid)[0]
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[Path, list[tuple[float, float]]] = {c: [] for c in args.checkouts}
    for _ in range(args.rounds):
        for checkout in args.checkouts:
            results[checkout].append(drain(checkout.resolve(), args.events))
    print(f"| checkout | drain of {args.events:,} clicks (s) | worker VmHWM (MB) |")
    print("|---|---|---|")
    for checkout, runs in results.items():
        seconds = " / ".join(f"{s:.1f}" for s, _ in runs)
        print(f"| {checkout} | {seconds} | {' / '.join(f'{m:.0f}' for _, m in runs)} |")


if __name__ == "__main__":
    main()
