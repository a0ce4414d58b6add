"""The embedded valkey's password: made once by whichever process needs it first, kept 0600 in the
warehouse, given to valkey on no command line; the server refuses a client without it, and web and
worker have it. (The tests' own valkey fixture is a REDIS_URL, used as it is, without a password;
test_procfile.py runs the embedded server under honcho.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis as redis_sync

from streamapp import names
from streamapp.redis_server import RedisPasswordError, embedded_password, server_launch
from streamapp.settings import Settings
from tests.conftest import ROOT, free_port, running_web, settings_env, wait_until
from tests.helpers import wait_rows

HEX64 = re.compile(r"[0-9a-f]{64}")


def command(port: int, *args: str) -> bytes:
    """One command over a plain socket, as any local user could send it; the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args))
        return s.recv(4096)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def embedded(tmp_path: Path) -> Settings:
    """Settings without REDIS_URL: the embedded server, on a port of its own."""
    return Settings(
        port=free_port(),
        redis_port=free_port(),
        warehouse=tmp_path / "warehouse",
        window_count=1000,
        window_seconds=0.3,
        shutdown_seconds=10,
        worker_metrics_port=free_port(),
        web_processes=1,
    )


def _racer(settings: Settings, barrier, out) -> None:
    barrier.wait()
    try:
        out.put(embedded_password(settings))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(repr(e))


def _watch(path: Path, racing: threading.Event, seen: set[tuple[int, int]]) -> None:
    """Every (mode, size) the file is seen with while the racers run."""
    while racing.is_set():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        seen.add((stat.S_IMODE(st.st_mode), st.st_size))


def test_the_password_is_made_once_whoever_asks_first(tmp_path):
    """Processes asking at the same instant, under the most permissive umask, all get one password;
    the file is never seen with another mode or partly written."""
    ctx = multiprocessing.get_context("fork")
    umask = os.umask(0)
    try:
        for round_ in range(5):
            settings = Settings(warehouse=tmp_path / f"warehouse{round_}")
            path = settings.redis_password_file
            seen: set[tuple[int, int]] = set()
            racing = threading.Event()
            racing.set()
            watcher = threading.Thread(target=_watch, args=(path, racing, seen))
            watcher.start()
            barrier, out = ctx.Barrier(6), ctx.Queue()
            procs = [ctx.Process(target=_racer, args=(settings, barrier, out)) for _ in range(6)]
            for p in procs:
                p.start()
            got = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(10)
            racing.clear()
            watcher.join()
            assert len(set(got)) == 1 and HEX64.fullmatch(got[0]), got
            assert path.read_text() == got[0] + "\n"
            assert seen <= {(0o600, 65)}, seen
            assert (mode(path), mode(path.parent)) == (0o600, 0o700)
            assert os.listdir(path.parent) == ["password"]  # no candidate left behind
    finally:
        os.umask(umask)


def test_a_password_file_that_is_not_private_or_not_a_password_is_refused(tmp_path):
    settings = Settings(warehouse=tmp_path / "warehouse", redis_port=free_port())
    path = settings.redis_password_file
    password = embedded_password(settings)
    assert embedded_password(settings) == password  # read, not made again
    path.chmod(0o644)
    with pytest.raises(RedisPasswordError, match=r"has mode -rw-r--r--: other users may have read"):
        embedded_password(settings)
    # The commands that use it stop at once, saying why.
    for cmd in ("redis", "web", "worker"):
        done = subprocess.run(
            [sys.executable, "-m", "streamapp", cmd],
            cwd=ROOT,
            env=settings_env(settings),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and "has mode -rw-r--r--" in done.stderr, (cmd, done.stderr)
        assert password not in done.stderr
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(RedisPasswordError, match="does not hold a password"):
        embedded_password(settings)
    path.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(password)
    elsewhere.chmod(0o600)
    path.symlink_to(elsewhere)  # a link another user could have planted
    with pytest.raises(RedisPasswordError, match="cannot read"):
        embedded_password(settings)


async def test_the_embedded_server_refuses_clients_without_its_password(tmp_path, spawn, http):
    settings = embedded(tmp_path)
    assert settings.embedded_redis
    # Worker and web start first: the first of them makes the password, the server started last uses it.
    spawn("worker", settings)
    async with running_web(settings) as web:
        await asyncio.to_thread(wait_until, settings.redis_password_file.exists, 20, 0.05, "the password file")
        settings.redis_dir.chmod(0o755)  # as an older version left it
        server = spawn("redis", settings)

        def answers() -> bytes | None:
            try:
                return command(settings.redis_port, "PING")
            except OSError:
                return None

        assert (await asyncio.to_thread(wait_until, answers, 20, 0.05, "valkey")).startswith(b"-NOAUTH")
        password = settings.redis_password_file.read_text().strip()
        assert mode(settings.redis_password_file) == 0o600 and mode(settings.redis_dir) == 0o700
        aof = list((settings.redis_dir / "appendonlydir").iterdir())  # every event, in clear
        assert aof and {mode(f) for f in aof} == {0o600}
        for args in (["XADD", names.stream("click"), "*", "e", "{}"], ["FLUSHALL"], ["KEYS", "*"]):
            assert command(settings.redis_port, *args).startswith(b"-NOAUTH"), args
        assert command(settings.redis_port, "AUTH", "guessed-password").startswith(b"-WRONGPASS")
        # Not on valkey's command line (what `ps` shows every local user; valkey retitles itself
        # once started, so the test reads the command it was given) but on its standard input.
        cmd, config = server_launch(settings)
        assert password not in " ".join(cmd) and config == f"requirepass {password}\n".encode()
        assert password.encode() not in Path(f"/proc/{server.proc.pid}/environ").read_bytes()

        # Web and worker have it: an event goes all the way into Iceberg.
        async def ready() -> bool:
            async with http.get(web + "/readyz") as r:
                return r.status == 200

        for _ in range(100):
            if await ready():
                break
            await asyncio.sleep(0.1)
        async with http.post(web + "/api/events", json={"type": "click", "x": 1, "y": 2, "event_id": "pw-1"}) as r:
            assert r.status == 202, await r.text()
        [row] = await wait_rows(settings, "events.clicks", 1)
        assert row["event_id"] == "pw-1"
        assert redis_sync.Redis(port=settings.redis_port, password=password).ping()
