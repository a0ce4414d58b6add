"""The measurements of the benchmark suite: the load generators (wrk, redis-benchmark, backlog
fillers, a paced sender) and one fig_* function per figure family, each filling its part of the
results dict. FIGURES names them for --only.

Kept apart from process control (procs) and from the report, so that how each figure is measured
can be read, and changed, on its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from procs import (
    ROOT,
    SEED_DIR,
    SEED_VENV,
    WORK,
    Procs,
    Seed,
    Streamapp,
    clean_env,
    ensure_tool,
    free_port,
    log,
    vm_hwm_mb,
    wait_port,
)

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
        out = subprocess.run(
            [
                ensure_tool(("wrk",), "wrk"),
                "-t1",
                f"-c{connections}",
                f"-d{int(seconds)}s",
                "--latency",
                "-s",
                f.name,
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    return {
        "rps": rps,
        "errors": int(non2xx[1]) if non2xx else 0,
        "socket": sock[1] if sock else "",
        "p50": parse_ms(lat.get("50")),
        "p99": parse_ms(lat.get("99")),
    }


def redis_benchmark(port: int, password: str, pipeline: int, n: int) -> float:
    exe = ensure_tool(("valkey-benchmark", "redis-benchmark"), "redis-tools")
    out = subprocess.run(
        [
            exe,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-a",  # on the command line: a throwaway server of the benchmark's own
            password,
            "-c",
            "64",
            "-n",
            str(n),
            "-P",
            str(pipeline),
            "-q",
            "XADD",
            "bench",
            "*",
            "e",
            SINGLE,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
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
        for figure, body, per, sides in (
            ("single", SINGLE, 1, ("bare", "streamapp", "seed")),
            ("array", ARRAY, 100, ("bare", "streamapp")),
        ):
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for rnd in range(args.rounds):
                order = sides[rnd % len(sides) :] + sides[: rnd % len(sides)]  # rotate who goes first
                for side in order:
                    if side == "streamapp":
                        ours.redis.flush(check=True)
                    elif side == "seed":
                        seed.redis.flush()
                    port = {"bare": bare_port, "streamapp": ours.port, "seed": seed.port}[side]
                    r = wrk(port, body, args.seconds)
                    runs[side].append(r)
                    log(
                        f"ingest {figure} round {rnd + 1}/{args.rounds} {side}: {r['rps'] * per:,.0f} events/s, "
                        f"p50 {r['p50']} ms p99 {r['p99']} ms, non-2xx {r['errors']} {r['socket']}"
                    )
            results[figure] = {
                s: {**median_run(rs), "events": median_run(rs)["rps"] * per, "all": [round(x["rps"] * per) for x in rs]}
                for s, rs in runs.items()
            }
        results["rss_web"] = {"streamapp": vm_hwm_mb(ours.web.pid), "seed": vm_hwm_mb(seed.web.pid)}
        results["rss_redis_ingest"] = {"streamapp": vm_hwm_mb(ours.redis.proc.pid)}
        # The Redis limit, on a fresh server of the same build and configuration.
        ours.redis.flush()
        n = args.xadd_requests
        results["xadd"] = {"P1": redis_benchmark(ours.redis.port, ours.redis.password, 1, n // 4)}
        ours.redis.flush()
        results["xadd"]["P16"] = redis_benchmark(ours.redis.port, ours.redis.password, 16, n)
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
                row = con.execute(
                    "SELECT metadata_location FROM iceberg_tables WHERE table_namespace = 'events' "
                    "AND table_name = 'clicks'"
                ).fetchone()
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
    out = {
        "rows": rows,
        "backlog": backlog,
        "seconds": elapsed,
        "rate": rows / elapsed,
        "rss": rss,
        "done": rows >= backlog,
    }
    if first and elapsed > first[0]:
        out["first_commit_s"] = first[0]
        out["steady_rate"] = (rows - first[1]) / (elapsed - first[0])
    return out


async def fill_streamapp(port: int, n: int, concurrency: int = 32, stamp=None) -> None:
    """Exactly n events, as 100-event arrays with unique ids (the last array may be shorter);
    `stamp(i)`: event i's `timestamp` in epoch ms (None: none, the server's receive time)."""
    import aiohttp

    run = uuid.uuid4().hex[:8]
    bodies = iter(range(0, n, 100))

    def event(i: int) -> str:
        one = SINGLE.replace("ID", f"d-{run}-{i}")
        return one if stamp is None else f'{one[:-1]},"timestamp":{stamp(i)}}}'

    async def sender(session) -> None:
        for start in bodies:
            body = "[" + ",".join(event(i) for i in range(start, min(n, start + 100))) + "]"
            for _ in range(100):  # 429/503 under a full Redis: wait and resend (ids dedupe)
                async with session.post(
                    f"http://127.0.0.1:{port}/api/events", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
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
    now = dt.datetime.now(dt.UTC).isoformat()
    for start in range(0, n, 5000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            data = json.dumps(
                {
                    "event_id": f"d-{i}",
                    "timestamp": now,
                    "user_id": None,
                    "session_id": None,
                    "page_url": "https://example.test/",
                    "target": None,
                    "properties": None,
                    "type": "click",
                    "x": 1,
                    "y": i % 1000,
                    "button": 0,
                },
                separators=(",", ":"),
            )
            pipe.xadd("events", {"type": "click", "received_at": now, "data": data})
        pipe.execute()


def fig_drain(procs: Procs, work: Path, args, results: dict) -> None:
    """streamapp's default worker runs every agent, the clicks_per_minute aggregate included, which
    reads the same stream; "raw" is a worker running only the raw clicks sink (`--agent clicks`)."""
    sides = ("streamapp", "raw", "seed")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order = [n for rnd in range(args.drain_rounds) for n in (sides if rnd % 2 == 0 else sides[::-1])]
    for i, name in enumerate(order):
        system = (
            Seed(procs, work / f"drain-{i}")
            if name == "seed"
            else Streamapp(procs, work / f"drain-{i}", worker_args=["--agent", "clicks"] if name == "raw" else [])
        )
        try:
            t = time.monotonic()
            if name != "seed":  # through the public API: 100-event arrays, as clients send them
                asyncio.run(fill_streamapp(system.port, args.drain))
            else:
                fill_seed(system, args.drain)
            procs.stop(system.web)  # in-flight requests are written first; then the worker runs alone
            system.web = None
            backlog = system.stream_len()
            log(f"drain {name}: backlog of {backlog:,} filled in {time.monotonic() - t:.1f}s; starting the worker")
            r = time_drain(system, backlog, args.drain_timeout)
            runs[name].append(r)
            log(
                f"drain {name}: {r['rows']:,} rows in {r['seconds']:.1f}s = {r['rate']:,.0f} rows/s"
                f"{'' if r['done'] else ' (timed out)'}; worker VmHWM {r['rss'][0]:.0f} MB"
            )
        finally:
            system.stop()
    results["drain"] = {
        n: {
            **median_run(rs, "rate"),
            "all": [round(r["rate"]) for r in rs],
            "rss": max((r["rss"] for r in rs), key=lambda x: x[0]),
        }
        for n, rs in runs.items()
    }


BACKFILL_DAYS = 3 * 365


def backfill_stamps(spread_ms: int, seed: int):
    """Event i's timestamp in epoch ms: spread evenly over the `spread_ms` before it is sent (a
    multiplicative hash of i: every day of three years gets its share, in no order)."""
    return lambda i: int(time.time() * 1000) - ((i + seed * 7919) * 2654435761) % spread_ms


def fig_backfill(procs: Procs, work: Path, args, results: dict) -> None:
    """The same worker (the raw clicks sink alone: the aggregate would route 3-year-old events to
    events.late, another figure) drains N events stamped within the last minute ("live") and N
    spread uniformly over three years ("backfill", ~1,100 day partitions), alternating, each from a
    fresh start; rows/s incl. start-up, as the drain figure."""
    sides = ("live", "backfill")
    spreads = {"live": 60_000, "backfill": BACKFILL_DAYS * 86_400_000}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order = [n for rnd in range(args.drain_rounds) for n in (sides if rnd % 2 == 0 else sides[::-1])]
    for i, name in enumerate(order):
        system = Streamapp(procs, work / f"backfill-{i}", worker_args=["--agent", "clicks"])
        try:
            t = time.monotonic()
            asyncio.run(fill_streamapp(system.port, args.drain, stamp=backfill_stamps(spreads[name], i)))
            procs.stop(system.web)
            system.web = None
            backlog = system.stream_len()
            log(f"{name}: backlog of {backlog:,} filled in {time.monotonic() - t:.1f}s; starting the worker")
            r = time_drain(system, backlog, args.drain_timeout)
            r.update(files_per_partition(system))
            runs[name].append(r)
            log(
                f"{name}: {r['rows']:,} rows in {r['seconds']:.1f}s = {r['rate']:,.0f} rows/s"
                f"{'' if r['done'] else ' (timed out)'}; worker VmHWM {r['rss'][0]:.0f} MB; "
                f"{r['partitions']} partitions, {r['files']} files at the end of the drain"
            )
        finally:
            system.stop()
    results["backfill"] = {
        n: {
            **median_run(rs, "rate"),
            "all": [round(r["rate"]) for r in rs],
            "rss": max((r["rss"] for r in rs), key=lambda x: x[0]),
        }
        for n, rs in runs.items()
    }


def files_per_partition(system) -> dict:
    """Data files and partitions of events.clicks when the drain ended (upkeep may still run)."""
    table = system.catalog().load_table("events.clicks")
    per: dict = {}
    for task in table.scan().plan_files():
        per[task.file.partition[0]] = per.get(task.file.partition[0], 0) + 1
    return {"partitions": len(per), "files": sum(per.values()), "max_files": max(per.values(), default=0)}


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
        async with session.post(
            f"http://127.0.0.1:{port}/api/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
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
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def fig_fresh(procs: Procs, work: Path, args, results: dict) -> None:
    results["fresh"] = {}
    for name in ("streamapp", "seed"):
        system = (
            Streamapp(procs, work / f"fresh-{name}", STREAMAPP_WINDOW_SECONDS="1")
            if name == "streamapp"
            else Seed(procs, work / f"fresh-{name}")
        )
        try:
            system.start_worker()
            time.sleep(3)  # start-up (table creation) is not freshness
            seen: dict[str, float] = {}
            stop = threading.Event()
            poller = threading.Thread(target=visible_ids, args=(system.catalog(), "events.clicks", stop, seen, 0.05))
            poller.start()
            try:
                sent = asyncio.run(
                    paced_sender(system.port, args.fresh_rate, args.fresh_seconds, f"f-{uuid.uuid4().hex[:8]}")
                )
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not all(e in seen for e in sent):
                    time.sleep(0.2)
            finally:
                stop.set()
                poller.join()
            lat = [seen[e] - t for e, t in sent.items() if e in seen]
            r = {
                "sent": len(sent),
                "visible": len(lat),
                "p50": pct(lat, 0.5) if lat else None,
                "p99": pct(lat, 0.99) if lat else None,
                "max": max(lat) if lat else None,
            }
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
    return procs.start(
        [*cmd, str(n), str(rows), "--stepped"],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def fig_commits(procs: Procs, work: Path, args, results: dict) -> None:
    """Both series at once, one commit at a time, alternating which goes first: one process per
    system keeps its table object, as a worker does; drift hits both alike."""
    log(f"commit latency: {args.commits} commits of {args.commit_rows} rows each, streamapp and seed alternating")
    names = ("streamapp", "seed")
    children = {n: commit_child(procs, n, args.commits, args.commit_rows, work) for n in names}
    series: dict[str, list[float]] = {n: [] for n in names}
    t = time.monotonic()
    for i in range(args.commits):
        for name in names if i % 2 == 0 else names[::-1]:
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
        results["commits"][name] = {
            "n": len(d),
            "first": first,
            "last": last,
            "ratio": last / first,
            "seconds": sum(d),
            "slope": slope,
            "at10k": first + slope * (10_000 - k),
        }
        log(
            f"commit latency {name}: median of commits 1-{k} {first * 1000:.0f} ms, "
            f"{len(d) - k + 1}-{len(d)} {last * 1000:.0f} ms ({last / first:.1f}x)"
        )
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
    skip = (
        "<module>",
        "_run_code",
        "run (",
        "_run_module",
        "run_forever",
        "_run_once",
        "_run (asyncio/events",
        "main (",
        "run_until",
        "_bootstrap",
        "_worker (concurrent",
        "run (concurrent",
        "start_server",
        "run_app",
        "cli.py",
        "__main__",
    )
    if not total:
        return []
    rows = [
        (100 * v / total, 100 * own.get(f, 0) / total, f)
        for f, v in incl.items()
        if f.strip() and not any(k in f for k in skip)
    ]
    by_self = sorted(rows, key=lambda r: -r[1])[:n]  # where the CPU is spent
    ours = sorted(
        (r for r in rows if r not in by_self and ("streamapp/" in r[2] or "agents/" in r[2])), key=lambda r: -r[0]
    )[:6]  # and which of streamapp's functions it is spent under
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


FIGURES = {
    "ingest": fig_ingest,
    "drain": fig_drain,
    "backfill": fig_backfill,
    "fresh": fig_fresh,
    "commits": fig_commits,
    "profile": fig_profile,
}
