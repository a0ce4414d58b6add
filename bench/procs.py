"""Process control for the benchmark suite: every process it starts (valkey, streamapp's web and
worker, the seed's web and loader, the tools) is started and stopped here, with the paths they use.

Kept apart from the figures so that what a figure measures reads without the plumbing, and so that
the one rule that matters here (whatever fails, every process started is stopped) lives in one place.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT.parent / "shared" / "peers" / "seed_baseline"  # ../shared/peers/seed_baseline
WORK = ROOT / "bench" / ".work"  # gitignored
SEED_VENV = Path(os.environ.get("SEED_BASELINE_VENV", WORK / "seed-venv"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    """This environment without streamapp's settings, but `STREAMAPP_SHARDS`: the one a run takes
    from outside (`STREAMAPP_SHARDS=4 uv run python bench/run.py --only ingest`: 4 shards on one
    valkey, checked and written by every streamapp process the run starts)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STREAMAPP_", "REDIS_URL", "PORT", "HOST", "VIRTUAL_ENV")) or k == "STREAMAPP_SHARDS"
    }
    env.update(extra)
    return env


class Redis:
    """A valkey-server started as streamapp starts it (`python -m streamapp redis` execs it)."""

    def __init__(self, procs: Procs, warehouse: Path) -> None:
        self.port = free_port()
        env = clean_env(
            STREAMAPP_REDIS_PORT=str(self.port), STREAMAPP_WAREHOUSE=str(warehouse), STREAMAPP_REDIS_MAXMEMORY="8gb"
        )
        self.proc = procs.start([sys.executable, "-m", "streamapp", "redis"], cwd=ROOT, env=env)
        wait_port(self.port, self.proc)
        import redis

        from streamapp.redis_server import embedded_password
        from streamapp.settings import Settings

        # The password the server made at its start, in the warehouse.
        self.password = embedded_password(Settings(redis_port=self.port, warehouse=warehouse))
        self.client = redis.Redis(port=self.port, password=self.password)
        self.env = env

    def check(self) -> None:
        """What a worker does after each start of Redis: check it against the tables. streamapp's
        web takes no event (503) from a server nobody checked, and the figures fill streams before
        any worker runs."""
        subprocess.run(
            [sys.executable, "-m", "streamapp", "check-redis"],
            cwd=ROOT,
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def flush(self, check: bool = False) -> None:
        self.client.flushall()  # synchronous; the next round starts on an empty server
        try:
            self.client.bgrewriteaof()  # and a small append-only file
            while self.client.info("persistence").get("aof_rewrite_in_progress"):
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - a rewrite already scheduled
            time.sleep(0.5)
        if check:  # FLUSHALL dropped the marker of the check too
            self.check()


class Streamapp:
    name = "streamapp"

    def __init__(
        self, procs: Procs, work: Path, spy: Path | None = None, worker_args: list[str] | None = None, **settings: str
    ) -> None:
        """spy: run web and worker under `py-spy record` (attaching to a running process is not
        allowed on machines with ptrace_scope=1; a child is), raw stacks written under that dir."""
        self.procs, self.warehouse, self.spy = procs, work / "streamapp", spy
        self.redis = Redis(procs, self.warehouse)
        self.redis.check()
        self.port = free_port()
        self.env = clean_env(
            PORT=str(self.port),
            HOST="127.0.0.1",
            STREAMAPP_REDIS_PORT=str(self.redis.port),
            STREAMAPP_WAREHOUSE=str(self.warehouse),
            STREAMAPP_LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            STREAMAPP_MAX_BACKLOG=str(10**9),
            STREAMAPP_REDIS_MAXMEMORY="8gb",
            STREAMAPP_WORKER_METRICS_PORT="0",
            **settings,
        )
        self.web = procs.start(
            [*self.spied("web"), sys.executable, "-m", "streamapp", "web"],
            cwd=ROOT,
            env=self.env,
            stderr=subprocess.DEVNULL if spy else None,
        )
        wait_port(self.port, self.web)
        self.worker: subprocess.Popen | None = None
        self.worker_args = worker_args or []

    def spied(self, name: str) -> list[str]:
        if self.spy is None:
            return []
        return [
            ensure_py_spy(),
            "record",
            "--nonblocking",
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(self.spy / f"{name}.txt"),
            "--",
        ]

    def start_worker(self) -> subprocess.Popen:
        self.worker = self.procs.start(
            [*self.spied("worker"), sys.executable, "-m", "streamapp", "worker", *self.worker_args],
            cwd=ROOT,
            env=self.env,
            stderr=subprocess.DEVNULL if self.spy else None,
        )
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
        self.env = clean_env(
            PORT=str(self.port),
            REDIS_URL=f"redis://:{self.redis.password}@127.0.0.1:{self.redis.port}/0",
            STREAMAPP_WAREHOUSE=str(self.warehouse),
            PYTHONPATH=str(SEED_DIR),
        )
        subprocess.run(
            [self.python, "scripts/create_tables.py"], cwd=SEED_DIR, env=self.env, check=True, stdout=subprocess.DEVNULL
        )
        self.web = procs.start([self.python, "main.py"], cwd=SEED_DIR, env=self.env, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.web)
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> subprocess.Popen:
        self.worker = self.procs.start([self.python, "-m", "services.event_loader"], cwd=SEED_DIR, env=self.env)
        return self.worker

    def catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        return SqlCatalog(
            "streamapp", uri=f"sqlite:///{self.warehouse}/catalog.db", warehouse=f"file://{self.warehouse}"
        )

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
        subprocess.run(
            ["bash", str(SEED_DIR / "setup.sh")], env={**os.environ, "SEED_BASELINE_VENV": str(SEED_VENV)}, check=True
        )


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
