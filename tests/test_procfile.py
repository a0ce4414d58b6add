"""The README's first command: `honcho start` runs the embedded Redis, the web view and the worker
from the Procfile; the Redis needs the password the three share; a click and a keydown reach
Iceberg; SIGTERM stops all three losing nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from streamapp.settings import Settings
from tests.conftest import ROOT, clean_env, free_port, table_rows, wait_until
from tests.helpers import assert_exactly_once


def _post(port: int, events) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/events",
        data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


class Honcho:
    def __init__(self, cwd, log):
        env = clean_env()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "-d", str(cwd), "start"],
            cwd=cwd,
            env=env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def test_honcho_start_runs_the_whole_pipeline(tmp_path):
    port, redis_port, dashboard_port = free_port(), free_port(), free_port()
    (tmp_path / ".env").write_text(
        f"PORT={port}\nSTREAMAPP_REDIS_PORT={redis_port}\nSTREAMAPP_DASHBOARD_PORT={dashboard_port}\n"
        f"STREAMAPP_WAREHOUSE={tmp_path / 'wh'}\nSTREAMAPP_WINDOW_SECONDS=1\n"
    )
    settings = Settings.from_env({}, dotenv=tmp_path / ".env")
    stack = Honcho(tmp_path, tmp_path / "honcho.log")
    try:
        wait_until(lambda: _healthy(port), 60, 0.2, "web /readyz")
        wait_until(lambda: "agents clicks" in (tmp_path / "honcho.log").read_text(), 60, 0.2, "worker start")
        # Web (ready: it pings Redis) and worker (rows below) have the password; no one else does.
        assert stat.S_IMODE(settings.redis_password_file.stat().st_mode) == 0o600
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as unauthenticated:
            unauthenticated.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            assert unauthenticated.recv(1024).startswith(b"-NOAUTH")
        sent = time.monotonic()
        assert _post(port, {"type": "click", "x": 3, "y": 4, "event_id": "hc-1"})[0] == 202
        assert _post(port, {"type": "keydown", "key": "q", "event_id": "hk-1"})[0] == 202
        wait_until(
            lambda: table_rows(settings, "events.clicks") and table_rows(settings, "events.keydowns"),
            settings.window_seconds + 2,
            0.1,
            "both rows within STREAMAPP_WINDOW_SECONDS + 2 s",
        )
        print(f"click and keydown in Iceberg {time.monotonic() - sent:.2f}s after the POST")
        # the dashboard (its own process, with the embedded Redis's password) sees them
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/dashboard", timeout=30) as r:
            figures = json.loads(r.read())
        assert figures["redis_error"] is None and figures["events"]["totals"]["click"] == 1, figures

        # Stop the whole stack while requests are in flight: every 202 must survive.
        accepted: set[str] = set()

        def fire(i: int):
            events = [{"type": "click", "x": i, "y": j, "event_id": f"s{i}-{j}"} for j in range(20)]
            status, _ = _post(port, events)
            if status == 202:
                accepted.update(e["event_id"] for e in events)
            return status

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(fire, i) for i in range(200)]
            time.sleep(0.3)
            stack.stop()
            statuses = [f.exception() or f.result() for f in futures]
        assert accepted, statuses
    finally:
        if stack.proc.poll() is None:
            stack.stop()
    log = (tmp_path / "honcho.log").read_text()
    assert "Traceback" not in log, log[-3000:]

    # Restart: the worker resumes from the committed position and writes what was accepted, once.
    stack = Honcho(tmp_path, tmp_path / "honcho2.log")
    try:
        wait_until(
            lambda: len(table_rows(settings, "events.clicks")) >= 1 + len(accepted), 60, 0.3, "all accepted rows"
        )
        time.sleep(1.5)
        rows = [r for r in table_rows(settings, "events.clicks") if r["event_id"] != "hc-1"]
        assert_exactly_once(rows, accepted)
    finally:
        stack.stop()
