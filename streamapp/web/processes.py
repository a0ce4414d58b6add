"""Several web processes on one port: one Python process tops out below what Redis and the
machine can take, so `python -m streamapp web` starts `STREAMAPP_WEB_PROCESSES` of them.

Each child is a whole web server (its own writer, backlog sampler and event loop) listening on
the same address with SO_REUSEPORT, so the kernel spreads connections across them. The parent
serves nothing: it forwards SIGTERM/SIGINT to every child, each of which stops gracefully (stops
accepting, finishes its in-flight requests and their Redis writes), and exits once they all have.
A child that dies on its own takes the others down with it and the parent exits non-zero: the
process manager restarts the whole server, rather than this one running short of processes.

Metrics: the children count into prometheus-client's multiprocess files in a directory the parent
creates and removes, and `/metrics`, whichever child answers, reports the sums of all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

CHILD_FLAG = "--child"


def supervise(processes: int) -> int:
    """Run `processes` web children until a signal or a child's death; the exit code to use."""
    metrics_dir = tempfile.mkdtemp(prefix="streamapp-web-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "streamapp", "web", CHILD_FLAG]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False
    code = 0

    def stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for _ in range(processes):
            children.append(subprocess.Popen(command, env=env))
        log.info("web: %d processes started (pids %s)", processes, ", ".join(str(c.pid) for c in children))
        while any(child.poll() is None for child in children):
            for child in children:
                if not stopping and child.returncode is not None:
                    log.error("web: process %d exited with %d; stopping the others", child.pid, child.returncode)
                    code = 1
                    stop()
            time.sleep(0.1)
        # Killed by our SIGTERM: it was still starting (its handler was not installed yet) and had
        # not listened, so nothing of it was lost.
        if any(child.returncode not in (0, -signal.SIGTERM) for child in children):
            code = 1
    finally:
        stop()
        for child in children:
            child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("web: all processes stopped")
    return code
