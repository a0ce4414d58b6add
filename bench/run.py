"""Pipeline benchmark: ingest events/s (single events and 100-event arrays) and worker drain rows/s.

    uv run python bench/run.py [--seconds 10] [--drain 200000]

Everything runs on this machine on loopback: a valkey-server, the web view (one process), wrk as
the load generator (installed with apt-get when missing), and the worker. Each ingest figure is
paired with a baseline measured in the same run by the same wrk: a bare aiohttp handler that
parses nothing and answers 202, i.e. the ceiling of one aiohttp process on this machine. Report
ratios; absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamapp.redis_server import server_command  # noqa: E402

BARE = """
from aiohttp import web
async def h(request):
    await request.read()
    return web.json_response({"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}, status=202)
app = web.Application(); app.router.add_post("/api/events", h)
web.run_app(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), access_log=None, print=None)
"""

WRK_LUA = """
local counter = 0
local body_template = %s
local run = %s  -- unique per wrk run: wrk's math.random repeats across runs, and ids must not
request = function()
  counter = counter + 1
  local body = string.gsub(body_template, "ID", run .. "-" .. tostring(counter))
  return wrk.format("POST", "/api/events", {["Content-Type"] = "application/json"}, body)
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


def wrk(port: int, body: str, seconds: int, connections: int = 64) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % (json.dumps(body), json.dumps(uuid.uuid4().hex)))
    out = subprocess.run([ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", f.name,
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    return {"rps": rps, "errors": int(non2xx[1]) if non2xx else 0, "p50": lat.get("50"), "p99": lat.get("99")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--drain", type=int, default=200_000, help="events pre-filled for the drain test")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamapp-bench-"))
    redis_port, web_port, bare_port = free_port(), free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("STREAMAPP_", "REDIS_URL", "PORT"))},
           "PORT": str(web_port), "STREAMAPP_REDIS_PORT": str(redis_port), "STREAMAPP_WAREHOUSE": str(work / "wh"),
           "STREAMAPP_LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen(server_command(redis_port, work / "redis"), stdout=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([sys.executable, "-m", "streamapp", "web"], cwd=ROOT, env=env))
    procs.append(subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)]))
    rows = []
    try:
        wait_http(web_port)
        wait_http(bare_port)
        single = '{"type":"click","x":1,"y":2,"event_id":"ID","page_url":"https://example.test/"}'
        array = "[" + ",".join(single.replace("ID", f"ID-{i}") for i in range(100)) + "]"
        for name, body, per in (("single event", single, 1), ("100-event array", array, 100)):
            for _ in range(2):  # alternate so drift hits both sides alike
                base = wrk(bare_port, body, args.seconds)
                ours = wrk(web_port, body, args.seconds)
            rows.append((f"ingest, {name} (events/s)", ours["rps"] * per, base["rps"] * per,
                         f"p50 {ours['p50']} p99 {ours['p99']}, non-2xx {ours['errors']}"))

        # Drain: a pre-filled backlog, then one worker from cold start until all rows are committed.
        import redis

        r = redis.Redis(port=redis_port)
        stream = "streamapp:{streamapp}:events:click"
        already = r.xlen(stream)
        target = already + args.drain
        while r.xlen(stream) < target:
            wrk(web_port, array, 2)
        backlog = r.xlen(stream)
        started = time.monotonic()
        worker = subprocess.Popen([sys.executable, "-m", "streamapp", "worker"], cwd=ROOT, env=env)
        procs.append(worker)
        sys.path.insert(0, str(ROOT))
        from streamapp.catalog import open_catalog
        from streamapp.settings import Settings

        catalog = open_catalog(Settings.from_env(env, dotenv=None))
        while True:
            time.sleep(0.5)
            try:
                snap = catalog.load_table("events.clicks").current_snapshot()
            except Exception:  # noqa: BLE001 - not created yet
                continue
            if snap and int(snap.summary["total-records"]) >= backlog:
                break
        elapsed = time.monotonic() - started
        rows.append(("worker drain Redis->Iceberg (rows/s, incl. ~1.5 s start-up)", backlog / elapsed, None,
                     f"{backlog} rows in {elapsed:.1f}s, windows of 10000"))
    finally:
        for p in reversed(procs):  # web and worker before the Redis they use
            p.terminate()
        for p in procs:
            p.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'figure':<62} {'streamapp':>12} {'baseline':>12} {'ratio':>7}  notes")
    for name, ours, base, notes in rows:
        b = f"{base:12.0f}" if base else f"{'-':>12}"
        ratio = f"{ours / base:7.2f}" if base else f"{'-':>7}"
        print(f"{name:<62} {ours:12.0f} {b} {ratio}  {notes}")
    print("baseline: a bare aiohttp handler answering 202 without parsing or Redis, same wrk, same run")


if __name__ == "__main__":
    main()
