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
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT.parent / "shared" / "peers" / "seed_baseline"  # ../shared/peers/seed_baseline
WORK = ROOT / "bench" / ".work"  # gitignored
SEED_VENV = Path(os.environ.get("SEED_BASELINE_VENV", WORK / "seed-venv"))
RESULTS = ROOT / "bench" / "RESULTS.md"

TARGETS = {
    "single": "≥35k and ≥8x seed",
    "array": "≥300k",
    "drain": "≥200k",
    "fresh": "p99 ≤1.5 s",
    "rss_web": "≤120 MB",
    "rss_worker": "bounded by window",
    "commits": "≤2x",
}

BARE = """
import sys, msgspec
from aiohttp import web
try:
    import uvloop; uvloop.install()
except ImportError:
    pass
decode, reply = msgspec.json.decode, msgspec.json.encode({"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []})
async def h(request):
    body = decode(await request.read())  # parse, as the collector must; no validation, no Redis
    return web.Response(body=reply, status=202, content_type="application/json")
app = web.Application(); app.router.add_post("/api/events", h)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
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

SINGLE = '{"type":"click","x":1,"y":2,"event_id":"ID","page_url":"https://example.test/"}'
ARRAY = "[" + ",".join(SINGLE.replace("ID", f"ID-{i}") for i in range(100)) + "]"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


class Procs:
    """Every process this run starts, so that all of them are stopped, whatever fails."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)  # own group: its children go with it
        self.all.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 30) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        try:  # anything the process left in its group
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for p in reversed(self.all):  # web and workers before the Redis they use
            self.stop(p)


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (a web command may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def vm_hwm_mb(pid: int) -> tuple[float, int]:
    """Peak RSS (VmHWM) summed over the process and its descendants, in MB; and how many."""
    total, n = 0.0, 0
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            total += int(m[1]) / 1024
            n += 1
    return total, n


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMAPP_", "REDIS_URL", "PORT", "HOST", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


class Redis:
    """A valkey-server started as streamapp starts it (`python -m streamapp redis` execs it)."""

    def __init__(self, procs: Procs, warehouse: Path) -> None:
        self.port = free_port()
        env = clean_env(STREAMAPP_REDIS_PORT=str(self.port), STREAMAPP_WAREHOUSE=str(warehouse),
                        STREAMAPP_REDIS_MAXMEMORY="8gb")
        self.proc = procs.start([sys.executable, "-m", "streamapp", "redis"], cwd=ROOT, env=env)
        wait_port(self.port, self.proc)
        import redis

        self.client = redis.Redis(port=self.port)

    def flush(self) -> None:
        self.client.flushall()  # synchronous; the next round starts on an empty server
        try:
            self.client.bgrewriteaof()  # and a small append-only file
            while self.client.info("persistence").get("aof_rewrite_in_progress"):
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - a rewrite already scheduled
            time.sleep(0.5)


class Streamapp:
    name = "streamapp"

    def __init__(self, procs: Procs, work: Path, spy: Path | None = None, **settings: str) -> None:
        """spy: run web and worker under `py-spy record` (attaching to a running process is not
        allowed on machines with ptrace_scope=1; a child is), raw stacks written under that dir."""
        self.procs, self.warehouse, self.spy = procs, work / "streamapp", spy
        self.redis = Redis(procs, self.warehouse)
        self.port = free_port()
        self.env = clean_env(PORT=str(self.port), HOST="127.0.0.1", STREAMAPP_REDIS_PORT=str(self.redis.port),
                             STREAMAPP_WAREHOUSE=str(self.warehouse), STREAMAPP_LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                             STREAMAPP_MAX_BACKLOG=str(10**9), STREAMAPP_REDIS_MAXMEMORY="8gb",
                             STREAMAPP_WORKER_METRICS_PORT="0", **settings)
        self.web = procs.start(self.spied("web") + [sys.executable, "-m", "streamapp", "web"], cwd=ROOT, env=self.env,
                               stderr=subprocess.DEVNULL if spy else None)
        wait_port(self.port, self.web)
        self.worker: subprocess.Popen | None = None

    def spied(self, name: str) -> list[str]:
        if self.spy is None:
            return []
        return [ensure_py_spy(), "record", "--nonblocking", "-r", "100", "-f", "raw", "-o", str(self.spy / f"{name}.txt"), "--"]

    def start_worker(self) -> subprocess.Popen:
        self.worker = self.procs.start(self.spied("worker") + [sys.executable, "-m", "streamapp", "worker"], cwd=ROOT,
                                       env=self.env, stderr=subprocess.DEVNULL if self.spy else None)
        return self.worker

    def catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        uri = self.env.get("STREAMAPP_CATALOG_URI", f"sqlite:///{self.warehouse}/catalog.db")
        return SqlCatalog("streamapp", uri=uri, warehouse=f"file://{self.warehouse}")

    def stream_len(self) -> int:
        """Events in the clicks stream: an entry holds one request's events (field n, else one)."""
        r, key, after, events = self.redis.client, "streamapp:{streamapp}:events:click", "-", 0
        while page := r.xrange(key, min=after, count=10_000):
            events += sum(int(fields.get(b"n", 1)) for _, fields in page)
            after = "(" + page[-1][0].decode()
        return events

    def stop(self) -> None:
        for p in (self.worker, self.web, self.redis.proc):
            if p is not None:
                self.procs.stop(p)


class Seed:
    name = "seed"

    def __init__(self, procs: Procs, work: Path) -> None:
        self.procs, self.warehouse = procs, work / "seed"
        self.warehouse.mkdir(parents=True, exist_ok=True)
        self.redis = Redis(procs, self.warehouse)
        self.port = free_port()
        self.python = str(SEED_VENV / "bin" / "python")
        self.env = clean_env(PORT=str(self.port), REDIS_URL=f"redis://127.0.0.1:{self.redis.port}/0",
                             STREAMAPP_WAREHOUSE=str(self.warehouse), PYTHONPATH=str(SEED_DIR))
        subprocess.run([self.python, "scripts/create_tables.py"], cwd=SEED_DIR, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.web = procs.start([self.python, "main.py"], cwd=SEED_DIR, env=self.env, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.web)
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> subprocess.Popen:
        self.worker = self.procs.start([self.python, "-m", "services.event_loader"], cwd=SEED_DIR, env=self.env)
        return self.worker

    def catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        return SqlCatalog("streamapp", uri=f"sqlite:///{self.warehouse}/catalog.db",
                          warehouse=f"file://{self.warehouse}")

    def stream_len(self) -> int:
        return self.redis.client.xlen("events")

    def stop(self) -> None:
        for p in (self.worker, self.web, self.redis.proc):
            if p is not None:
                self.procs.stop(p)


def ensure_seed_venv() -> None:
    if not (SEED_DIR / "main.py").is_file():
        sys.exit(f"the seed baseline is not at {SEED_DIR}")
    if not (SEED_VENV / "bin" / "python").exists():
        log(f"building the seed's venv in {SEED_VENV} (its setup.sh, from PyPI)")
        subprocess.run(["bash", str(SEED_DIR / "setup.sh")], env={**os.environ, "SEED_BASELINE_VENV": str(SEED_VENV)},
                       check=True)


def ensure_py_spy() -> str:
    found = shutil.which("py-spy")
    if not found:
        sys.exit("--profile needs py-spy on PATH (pip install py-spy)")
    return found


def ensure_tool(names: tuple[str, ...], package: str) -> str:
    for name in names:
        if found := shutil.which(name):
            return found
    log(f"installing {package} with apt-get")
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, stdout=subprocess.DEVNULL)
    for name in names:
        if found := shutil.which(name):
            return found
    sys.exit(f"{package} could not be installed")


# ---------------------------------------------------------------------------------------------
# load generators


def parse_ms(s: str | None) -> float | None:
    if not s:
        return None
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    return float(m[1]) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m[2]] if m else None


def wrk(port: int, body: str, seconds: float, connections: int = 64) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % (json.dumps(body), json.dumps(uuid.uuid4().hex)))
    try:
        out = subprocess.run([ensure_tool(("wrk",), "wrk"), "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
                              "-s", f.name, f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    return {"rps": rps, "errors": int(non2xx[1]) if non2xx else 0, "socket": sock[1] if sock else "",
            "p50": parse_ms(lat.get("50")), "p99": parse_ms(lat.get("99"))}


def redis_benchmark(port: int, pipeline: int, n: int) -> float:
    exe = ensure_tool(("valkey-benchmark", "redis-benchmark"), "redis-tools")
    out = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), "-c", "64", "-n", str(n), "-P", str(pipeline),
                          "-q", "XADD", "bench", "*", "e", SINGLE], capture_output=True, text=True, check=True).stdout
    rates = re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))
    return float(rates[-1])


def median_run(runs: list[dict], key: str = "rps") -> dict:
    """The round at the median (the mean of the middle two for an even count), its latencies
    from the round closest to it."""
    mid = statistics.median(r[key] for r in runs)
    return {**min(runs, key=lambda r: abs(r[key] - mid)), key: mid}


# ---------------------------------------------------------------------------------------------
# figures


def fig_ingest(procs: Procs, work: Path, args, results: dict) -> None:
    bare_port = free_port()
    bare = procs.start([sys.executable, "-c", BARE, str(bare_port)], cwd=ROOT)
    wait_port(bare_port, bare)
    ours = Streamapp(procs, work / "ingest")
    seed = Seed(procs, work / "ingest")
    try:
        for figure, body, per, sides in (("single", SINGLE, 1, ("bare", "streamapp", "seed")),
                                         ("array", ARRAY, 100, ("bare", "streamapp"))):
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for rnd in range(args.rounds):
                order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]  # rotate who goes first
                for side in order:
                    if side == "streamapp":
                        ours.redis.flush()
                    elif side == "seed":
                        seed.redis.flush()
                    port = {"bare": bare_port, "streamapp": ours.port, "seed": seed.port}[side]
                    r = wrk(port, body, args.seconds)
                    runs[side].append(r)
                    log(f"ingest {figure} round {rnd + 1}/{args.rounds} {side}: {r['rps'] * per:,.0f} events/s, "
                        f"p50 {r['p50']} ms p99 {r['p99']} ms, non-2xx {r['errors']} {r['socket']}")
            results[figure] = {s: {**median_run(rs), "events": median_run(rs)["rps"] * per,
                                   "all": [round(x["rps"] * per) for x in rs]} for s, rs in runs.items()}
        results["rss_web"] = {"streamapp": vm_hwm_mb(ours.web.pid), "seed": vm_hwm_mb(seed.web.pid)}
        results["rss_redis_ingest"] = {"streamapp": vm_hwm_mb(ours.redis.proc.pid)}
        # The Redis limit, on a fresh server of the same build and configuration.
        ours.redis.flush()
        n = args.xadd_requests
        results["xadd"] = {"P1": redis_benchmark(ours.redis.port, 1, n // 4)}
        ours.redis.flush()
        results["xadd"]["P16"] = redis_benchmark(ours.redis.port, 16, n)
        log(f"redis-benchmark XADD: {results['xadd']['P1']:,.0f}/s unpipelined, {results['xadd']['P16']:,.0f}/s -P 16")
    finally:
        ours.stop()
        seed.stop()
        procs.stop(bare)


class RowCount:
    """events.clicks's committed row count, read cheaply: the SQLite catalog's metadata location,
    then `total-records` of the current snapshot in that JSON file, parsed only when it changed.
    (pyiceberg's load_table on a table of 1,000 snapshots costs the polling process enough CPU to
    slow down the loader it measures on 2 cores.)"""

    def __init__(self, warehouse: Path) -> None:
        self.db, self.location, self.rows = warehouse / "catalog.db", None, 0

    def __call__(self) -> int:
        import sqlite3

        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as con:
                row = con.execute("SELECT metadata_location FROM iceberg_tables WHERE table_namespace = 'events' "
                                  "AND table_name = 'clicks'").fetchone()
        except sqlite3.Error:  # not created yet, or locked for a moment
            return self.rows
        if row is None or row[0] == self.location:
            return self.rows
        path = row[0].removeprefix("file://")
        data = Path(path).read_bytes()
        if path.endswith(".gz") or data[:2] == b"\x1f\x8b":
            import gzip

            data = gzip.decompress(data)
        meta = json.loads(data)
        current = meta.get("current-snapshot-id")
        for snap in meta.get("snapshots", []):
            if snap["snapshot-id"] == current:
                self.rows = int(snap["summary"]["total-records"])
        self.location = row[0]
        return self.rows


def time_drain(system, backlog: int, timeout: float) -> dict:
    """Start the worker/loader on a full stream; poll the table until every row is committed."""
    committed_rows = RowCount(system.warehouse)
    before = committed_rows()
    started = time.monotonic()
    worker = system.start_worker()
    first = None
    rows = 0
    while rows < backlog and time.monotonic() - started < timeout:
        time.sleep(0.2)
        rows = committed_rows() - before
        if rows and first is None:
            first = (time.monotonic() - started, rows)
        if worker.poll() is not None:
            raise RuntimeError(f"{system.name} worker exited with {worker.returncode}")
    elapsed = time.monotonic() - started
    rss = vm_hwm_mb(worker.pid)
    out = {"rows": rows, "backlog": backlog, "seconds": elapsed, "rate": rows / elapsed, "rss": rss,
           "done": rows >= backlog}
    if first and elapsed > first[0]:
        out["first_commit_s"] = first[0]
        out["steady_rate"] = (rows - first[1]) / (elapsed - first[0])
    return out


async def fill_streamapp(port: int, n: int, concurrency: int = 32) -> None:
    """Exactly n events, as 100-event arrays with unique ids (the last array may be shorter)."""
    import aiohttp

    run = uuid.uuid4().hex[:8]
    bodies = iter(range(0, n, 100))

    async def sender(session) -> None:
        for start in bodies:
            body = "[" + ",".join(SINGLE.replace("ID", f"d-{run}-{i}") for i in range(start, min(n, start + 100))) + "]"
            for _ in range(100):  # 429/503 under a full Redis: wait and resend (ids dedupe)
                async with session.post(f"http://127.0.0.1:{port}/api/events", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status == 202:
                        break
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"filling the backlog: {resp.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))


def fill_seed(seed: Seed, n: int) -> None:
    """The seed's stream format (services/stream_writer.py): type, received_at, data = the event's
    pydantic JSON. Written with pipelined XADDs, as the seed's web would, only faster."""
    r = seed.redis.client
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    for start in range(0, n, 5000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            data = json.dumps({"event_id": f"d-{i}", "timestamp": now, "user_id": None, "session_id": None,
                               "page_url": "https://example.test/", "target": None, "properties": None,
                               "type": "click", "x": 1, "y": i % 1000, "button": 0}, separators=(",", ":"))
            pipe.xadd("events", {"type": "click", "received_at": now, "data": data})
        pipe.execute()


def fig_drain(procs: Procs, work: Path, args, results: dict) -> None:
    runs: dict[str, list[dict]] = {"streamapp": [], "seed": []}
    order = [n for rnd in range(args.drain_rounds) for n in (("streamapp", "seed") if rnd % 2 == 0 else ("seed", "streamapp"))]
    for i, name in enumerate(order):
        system = (Streamapp(procs, work / f"drain-{i}") if name == "streamapp" else Seed(procs, work / f"drain-{i}"))
        try:
            t = time.monotonic()
            if name == "streamapp":  # through the public API: 100-event arrays, as clients send them
                asyncio.run(fill_streamapp(system.port, args.drain))
            else:
                fill_seed(system, args.drain)
            procs.stop(system.web)  # in-flight requests are written first; then the worker runs alone
            system.web = None
            backlog = system.stream_len()
            log(f"drain {name}: backlog of {backlog:,} filled in {time.monotonic() - t:.1f}s; starting the worker")
            r = time_drain(system, backlog, args.drain_timeout)
            runs[name].append(r)
            log(f"drain {name}: {r['rows']:,} rows in {r['seconds']:.1f}s = {r['rate']:,.0f} rows/s"
                f"{'' if r['done'] else ' (timed out)'}; worker VmHWM {r['rss'][0]:.0f} MB")
        finally:
            system.stop()
    results["drain"] = {n: {**median_run(rs, "rate"), "all": [round(r["rate"]) for r in rs],
                            "rss": max((r["rss"] for r in rs), key=lambda x: x[0])} for n, rs in runs.items()}


def visible_ids(catalog, table: str, stop: threading.Event, seen: dict[str, float], interval: float) -> None:
    """Poll the table; when its snapshot changes, read the event ids of data files not seen before
    and record when they became visible. Works whatever the writer does to manifests or old
    snapshots (merging, expiry): only the current snapshot's files are read."""
    import pyarrow.parquet as pq

    last, files, manifests = None, set(), set()
    while not stop.is_set():
        try:
            tbl = catalog.load_table(table)
            snap = tbl.current_snapshot()
        except Exception:  # noqa: BLE001 - not created yet
            snap = None
        if snap is None or snap.snapshot_id == last:
            time.sleep(interval)
            continue
        now, last = time.time(), snap.snapshot_id
        for m in snap.manifests(tbl.io):
            if m.manifest_path in manifests:
                continue
            manifests.add(m.manifest_path)
            for entry in m.fetch_manifest_entry(tbl.io, discard_deleted=True):
                path = entry.data_file.file_path
                if path in files:
                    continue
                files.add(path)
                for eid in pq.read_table(path.removeprefix("file://"), columns=["event_id"])["event_id"].to_pylist():
                    seen.setdefault(eid, now)


async def paced_sender(port: int, rate: float, seconds: float, prefix: str) -> dict[str, float]:
    import aiohttp

    sent: dict[str, float] = {}
    failures = 0

    async def post(session, i: int) -> None:
        nonlocal failures
        eid = f"{prefix}-{i}"
        body = SINGLE.replace("ID", eid)
        t = time.time()
        async with session.post(f"http://127.0.0.1:{port}/api/events", data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status == 202:
                sent[eid] = t
            else:
                failures += 1

    async with aiohttp.ClientSession() as session:
        start, tasks = time.monotonic(), []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(session, i)))
        await asyncio.gather(*tasks, return_exceptions=True)
    if failures:
        log(f"freshness sender: {failures} posts not answered 202")
    return sent


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fig_fresh(procs: Procs, work: Path, args, results: dict) -> None:
    results["fresh"] = {}
    for name in ("streamapp", "seed"):
        system = (Streamapp(procs, work / f"fresh-{name}", STREAMAPP_WINDOW_SECONDS="1") if name == "streamapp"
                  else Seed(procs, work / f"fresh-{name}"))
        try:
            system.start_worker()
            time.sleep(3)  # start-up (table creation) is not freshness
            seen: dict[str, float] = {}
            stop = threading.Event()
            poller = threading.Thread(target=visible_ids, args=(system.catalog(), "events.clicks", stop, seen, 0.05))
            poller.start()
            try:
                sent = asyncio.run(paced_sender(system.port, args.fresh_rate, args.fresh_seconds, f"f-{uuid.uuid4().hex[:8]}"))
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not all(e in seen for e in sent):
                    time.sleep(0.2)
            finally:
                stop.set()
                poller.join()
            lat = [seen[e] - t for e, t in sent.items() if e in seen]
            r = {"sent": len(sent), "visible": len(lat), "p50": pct(lat, 0.5) if lat else None,
                 "p99": pct(lat, 0.99) if lat else None, "max": max(lat) if lat else None}
            results["fresh"][name] = r
            log(f"freshness {name}: {r['visible']}/{r['sent']} visible, p50 {r['p50']:.3f}s p99 {r['p99']:.3f}s")
        finally:
            system.stop()


def commit_child(procs: Procs, system: str, n: int, rows: int, work: Path) -> subprocess.Popen:
    if system == "streamapp":
        cmd, cwd = [sys.executable, str(ROOT / "bench" / "commit_latency.py"), "streamapp"], ROOT
        env = clean_env(STREAMAPP_WAREHOUSE=str(work / "commits-streamapp"), STREAMAPP_LOG_LEVEL="WARNING")
    else:
        cmd, cwd = [str(SEED_VENV / "bin" / "python"), str(ROOT / "bench" / "commit_latency.py"), "seed"], SEED_DIR
        env = clean_env(STREAMAPP_WAREHOUSE=str(work / "commits-seed"))
    return procs.start([*cmd, str(n), str(rows), "--stepped"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)


def fig_commits(procs: Procs, work: Path, args, results: dict) -> None:
    """Both series at once, one commit at a time, alternating which goes first: one process per
    system keeps its table object, as a worker does; drift hits both alike."""
    log(f"commit latency: {args.commits} commits of {args.commit_rows} rows each, streamapp and seed alternating")
    names = ("streamapp", "seed")
    children = {n: commit_child(procs, n, args.commits, args.commit_rows, work) for n in names}
    series: dict[str, list[float]] = {n: [] for n in names}
    t = time.monotonic()
    for i in range(args.commits):
        for name in (names if i % 2 == 0 else names[::-1]):
            child = children[name]
            child.stdin.write("\n")
            child.stdin.flush()
            line = child.stdout.readline()
            if not line:
                raise RuntimeError(f"commit latency child for {name} exited with {child.wait()}")
            series[name].append(float(line))
    took = time.monotonic() - t
    for child in children.values():
        child.stdin.close()
        child.wait(60)
    results["commits"] = {}
    for name, d in series.items():
        k = min(10, len(d) // 2)
        first, last = statistics.median(d[:k]), statistics.median(d[-k:])
        slope = statistics.linear_regression(range(len(d)), d).slope if len(d) > 2 else 0.0
        results["commits"][name] = {"n": len(d), "first": first, "last": last, "ratio": last / first,
                                    "seconds": sum(d), "slope": slope, "at10k": first + slope * (10_000 - k)}
        log(f"commit latency {name}: median of commits 1-{k} {first * 1000:.0f} ms, "
            f"{len(d) - k + 1}-{len(d)} {last * 1000:.0f} ms ({last / first:.1f}x)")
    log(f"commit latency: {took:.0f}s")


def top_functions(raw: Path, n: int = 14) -> list[tuple[float, float, str]]:
    """(inclusive %, self %, function) from py-spy's raw (collapsed) stacks, most inclusive first."""
    incl: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        c = int(count)
        if "_find_and_load" in stack or "_get_module_details" in stack:
            continue  # start-up imports: not the steady state
        total += c
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not per line
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
        own[frames[-1]] = own.get(frames[-1], 0) + c
    skip = ("<module>", "_run_code", "run (", "_run_module", "run_forever", "_run_once", "_run (asyncio/events", "main (", "run_until",
            "_bootstrap", "_worker (concurrent", "run (concurrent", "start_server", "run_app", "cli.py", "__main__")
    if not total:
        return []
    rows = [(100 * v / total, 100 * own.get(f, 0) / total, f) for f, v in incl.items()
            if f.strip() and not any(k in f for k in skip)]
    by_self = sorted(rows, key=lambda r: -r[1])[:n]  # where the CPU is spent
    ours = sorted((r for r in rows if r not in by_self and ("streamapp/" in r[2] or "agents/" in r[2])),
                  key=lambda r: -r[0])[:6]  # and which of streamapp's functions it is spent under
    return by_self + ours


def fig_profile(procs: Procs, work: Path, args, results: dict) -> None:
    """Where streamapp's time goes: py-spy (100 Hz) on the web under single events and under arrays,
    and on the worker draining a backlog. Not a figure: py-spy's sampling costs CPU on 2 cores."""
    spy_dir = WORK / "profiles"
    spy_dir.mkdir(parents=True, exist_ok=True)
    results["profiles"] = {}
    for name, body in (("web-single", SINGLE), ("web-array", ARRAY)):
        system = Streamapp(procs, work / f"profile-{name}", spy=spy_dir / name)
        try:
            (spy_dir / name).mkdir(exist_ok=True)
            time.sleep(1)
            r = wrk(system.port, body, args.seconds)
            log(f"profile {name}: {r['rps'] * (100 if body is ARRAY else 1):,.0f} events/s under py-spy")
            os.kill(system.web.pid, signal.SIGINT)  # py-spy writes its file and exits
            system.web.wait(30)
        finally:
            system.stop()
        results["profiles"][name] = top_functions(spy_dir / name / "web.txt")
    system = Streamapp(procs, work / "profile-drain", spy=spy_dir / "worker-drain")
    try:
        (spy_dir / "worker-drain").mkdir(exist_ok=True)
        n = min(args.drain, 300_000)
        asyncio.run(fill_streamapp(system.port, n))
        procs.stop(system.web)
        system.web = None
        r = time_drain(system, n, args.drain_timeout)
        log(f"profile worker-drain: {r['rows']:,} rows in {r['seconds']:.1f}s under py-spy")
        os.kill(system.worker.pid, signal.SIGINT)
        system.worker.wait(30)
    finally:
        system.stop()
    results["profiles"]["worker-drain"] = top_functions(spy_dir / "worker-drain" / "worker.txt")
    log(f"raw stacks in {spy_dir.relative_to(ROOT)} (flamegraph.pl or speedscope read them)")


FIGURES = {"ingest": fig_ingest, "drain": fig_drain, "fresh": fig_fresh, "commits": fig_commits, "profile": fig_profile}


# ---------------------------------------------------------------------------------------------
# report


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "ms":
        return f"{v * 1000:.0f} ms"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:,.0f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(results: dict, args) -> list[list[str]]:
    rows = [["figure", "streamapp", "seed", "limit", "vs seed", "vs limit", "target", "met", "notes"]]
    if "single" in results:
        s, sd, b = results["single"]["streamapp"], results["single"]["seed"], results["single"]["bare"]
        met = s["events"] >= 35_000 and s["events"] >= 8 * sd["events"]
        rows.append(["1. single-event ingest (events/s)", fmt(s["events"]), fmt(sd["events"]), fmt(b["events"]),
                     ratio(s["events"], sd["events"]), ratio(s["events"], b["events"]), TARGETS["single"],
                     "yes" if met else "no",
                     f"limit: bare aiohttp+msgspec parse; median of {args.rounds} alternating {args.seconds}s wrk "
                     f"-t1 -c64 rounds; non-2xx {s['errors']}/{sd['errors']}; rounds s {s['all']} seed {sd['all']}"])
        rows.append(["   p50 latency (ms)", f"{s['p50']:.2f}", f"{sd['p50']:.2f}", f"{b['p50']:.2f}",
                     "", "", "", "", "of the median round"])
        rows.append(["   p99 latency (ms)", f"{s['p99']:.2f}", f"{sd['p99']:.2f}", f"{b['p99']:.2f}",
                     "", "", "", "", ""])
    if "array" in results:
        s, b = results["array"]["streamapp"], results["array"]["bare"]
        rows.append(["2. 100-event arrays (events/s)", fmt(s["events"]), "n/a", fmt(b["events"]), "-",
                     ratio(s["events"], b["events"]), TARGETS["array"], "yes" if s["events"] >= 300_000 else "no",
                     f"the seed takes one event per request, no arrays; p50 {s['p50']:.1f} ms p99 {s['p99']:.1f} ms; "
                     f"rounds {s['all']}"])
    if "xadd" in results:
        x = results["xadd"]
        rows.append(["   Redis XADD limit (redis-benchmark, /s)", "", "", f"{x['P1']:,.0f} / {x['P16']:,.0f}", "",
                     "", "", "", "-c64, unpipelined / -P 16, same valkey build and config, one ~80 B event each"])
    if "drain" in results:
        d = results["drain"]
        s, sd = d.get("streamapp"), d.get("seed")
        rows.append(["3. worker drain Redis->Iceberg (rows/s)", fmt(s and s["rate"]), fmt(sd and sd["rate"]), "-",
                     ratio(s and s["rate"], sd and sd["rate"]), "-", TARGETS["drain"],
                     "yes" if s and s["rate"] >= 200_000 else "no",
                     f"median of {args.drain_rounds} alternating drains each, rounds s {s and s['all']} seed {sd and sd['all']}; "
                     + "; ".join(f"{n}: {r['rows']:,}/{r['backlog']:,} rows in {r['seconds']:.1f}s incl. start-up"
                               f"{', first commit at %.1fs, %s rows/s after' % (r['first_commit_s'], fmt(r['steady_rate'])) if 'steady_rate' in r else ''}"
                               f"{'' if r['done'] else ' (TIMED OUT: rate of what it committed)'}"
                               for n, r in d.items())])
    if "fresh" in results:
        f = results["fresh"]
        s, sd = f.get("streamapp"), f.get("seed")
        rows.append([f"4. freshness p50 at {args.fresh_rate:.0f} ev/s (s)", fmt(s and s["p50"], "s"),
                     fmt(sd and sd["p50"], "s"), "-", "", "", "", "",
                     f"POST sent -> row's data file in the table's current snapshot (50 ms poll); "
                     f"streamapp STREAMAPP_WINDOW_SECONDS=1; {args.fresh_seconds}s each"])
        rows.append(["   freshness p99 (s)", fmt(s and s["p99"], "s"), fmt(sd and sd["p99"], "s"), "-",
                     ratio(s and s["p99"], sd and sd["p99"]), "", TARGETS["fresh"],
                     "yes" if s and s["p99"] is not None and s["p99"] <= 1.5 else "no",
                     "; ".join(f"{n}: {r['visible']}/{r['sent']} visible, max {fmt(r['max'], 's')}" for n, r in f.items())])
    if "rss_web" in results:
        w = results["rss_web"]
        rows.append(["5. web peak RSS (VmHWM)", fmt(w["streamapp"][0], "MB"), fmt(w["seed"][0], "MB"), "-",
                     ratio(w["streamapp"][0], w["seed"][0]), "", TARGETS["rss_web"],
                     "yes" if w["streamapp"][0] <= 120 else "no",
                     f"after the ingest rounds; summed over {w['streamapp'][1]}/{w['seed'][1]} processes; "
                     f"streamapp's valkey {results['rss_redis_ingest']['streamapp'][0]:.0f} MB"])
    if "drain" in results:
        d = results["drain"]
        s, sd = d.get("streamapp"), d.get("seed")
        rows.append(["   worker peak RSS (VmHWM)", fmt(s and s["rss"][0], "MB"), fmt(sd and sd["rss"][0], "MB"), "-",
                     "", "", TARGETS["rss_worker"], "",
                     f"highest at the end of a drain of {args.drain:,} events (streamapp: default windows of 10,000)"])
    if "commits" in results:
        c = results["commits"]
        s, sd = c["streamapp"], c["seed"]
        k = min(10, s["n"] // 2)
        rows.append([f"6. commit latency, commit 1-{k} median (ms)", fmt(s["first"], "ms"), fmt(sd["first"], "ms"),
                     "-", "", "", "", "", f"{args.commit_rows}-row windows, one table, one process"])
        rows.append([f"   commit {s['n'] - k + 1}-{s['n']} median (ms)", fmt(s["last"], "ms"), fmt(sd["last"], "ms"),
                     "-", "", "", "", "", f"sum of commit times {s['seconds']:.0f}s / {sd['seconds']:.0f}s; the two alternate commit by commit"])
        rows.append(["   growth, last/first", f"{s['ratio']:.2f}x", f"{sd['ratio']:.2f}x", "-", "", "",
                     TARGETS["commits"], ("yes" if s["ratio"] <= 2 else "no") if s["n"] >= 10_000 else "?" if s["n"] < 100 else
                     ("no (extrap.)" if s["at10k"] > 2 * s["first"] else "likely (extrap.)"),
                     f"linear fit: +{s['slope'] * 1e6:.0f}/+{sd['slope'] * 1e6:.0f} ms per 1,000 commits"
                     + ("" if s["n"] >= 10_000 or s["n"] < 100 else
                        f"; only {s['n']} commits (--commits): 10,000th extrapolated "
                        f"{fmt(s['at10k'], 'ms')}/{fmt(sd['at10k'], 'ms')} = {s['at10k'] / s['first']:.0f}x/"
                        f"{sd['at10k'] / sd['first']:.0f}x the first")])
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1])
    return "\n".join(lines)


def machine() -> str:
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024**2
    return (f"{platform.uname().machine}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for iteration (~3 min): 2 rounds of 3 s, 200k drain, 10 s freshness, 200 commits")
    parser.add_argument("--profile", action="store_true", help="also profile web and worker with py-spy (after the figures)")
    parser.add_argument("--only", default="ingest,drain,fresh,commits", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--seconds", type=int, help="seconds per wrk round (10)")
    parser.add_argument("--rounds", type=int, help="alternating ingest rounds per side (3)")
    parser.add_argument("--drain", type=int, help="backlog for the drain figure (1,000,000)")
    parser.add_argument("--drain-rounds", type=int, help="alternating drains per system (2: streamapp, seed, seed, streamapp)")
    parser.add_argument("--drain-timeout", type=float, help="give up waiting for a drain after this (600 s)")
    parser.add_argument("--fresh-seconds", type=float, help="seconds of paced sending per system (30)")
    parser.add_argument("--fresh-rate", type=float, default=200, help="events/s for freshness (200)")
    parser.add_argument("--commits", type=int, help="commits per system for the commit-latency figure (10,000)")
    parser.add_argument("--commit-rows", type=int, default=10, help="rows per commit (10)")
    parser.add_argument("--xadd-requests", type=int, default=400_000, help="redis-benchmark -n for -P 16 (400,000)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    defaults = ({"seconds": 3, "rounds": 2, "drain": 200_000, "drain_rounds": 1, "drain_timeout": 60, "fresh_seconds": 10, "commits": 200}
                if args.quick else
                {"seconds": 10, "rounds": 3, "drain": 1_000_000, "drain_rounds": 2, "drain_timeout": 600, "fresh_seconds": 30,
                 "commits": 10_000})
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
        text += (f"\n\npy-spy, {name}: inclusive% self% function (most self time first, then more of "
                 f"streamapp's own functions; start-up imports left out)\n") + "\n".join(
            f"{a:5.1f} {b:5.1f}  {f}" for a, b, f in top)
    print(f"\n{command}\nmachine: {machine()}; took {took / 60:.1f} min\n\n{text}")
    if not args.no_write and not interrupted:
        with RESULTS.open("a") as f:
            f.write(f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, issue 5 suite"
                    f"{' (--quick)' if args.quick else ''}\n\nCommand: `{command.strip()}` (took {took / 60:.1f} min)  \n"
                    f"Machine: {machine()}; streamapp at {git_rev()}\n\n```\n{text}\n```\n")
        log(f"appended to {RESULTS.relative_to(ROOT)}")


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "streamapp"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + (" (streamapp/ modified)" if dirty else "")
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
