"""Every setting streamapp reads, in one place: environment variables win over `.env`, then defaults.

Nothing else in the code base reads `os.environ`; components take a `Settings` object, so tests
build one explicitly and production builds one with `Settings.from_env()`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_port: int = 6379
    redis_url: str = ""  # empty: the embedded server on redis_port
    warehouse: Path = Path("warehouse")  # resolved against the working directory
    catalog_uri: str = ""  # empty: sqlite file inside the warehouse
    window_count: int = 10_000
    window_seconds: float = 10.0
    dedupe_seconds: int = 3600
    grace_seconds: float = 10.0  # event-time windows: allowed lateness behind the newest event
    redis_appendfsync: str = "everysec"
    max_body_bytes: int = 1024 * 1024
    max_events_per_request: int = 500
    max_event_bytes: int = 32 * 1024
    retry_after_seconds: int = 1
    shutdown_seconds: float = 25.0
    log_level: str = "INFO"
    # Test-only fault injection: comma-separated crash points where the worker SIGKILLs itself.
    crash_at: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.redis_url:
            object.__setattr__(self, "redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
        object.__setattr__(self, "warehouse", Path(self.warehouse).resolve())
        if not self.catalog_uri:
            object.__setattr__(self, "catalog_uri", f"sqlite:///{self.warehouse}/catalog.db")
        if self.window_count < 1:
            raise SettingsError("STREAMAPP_WINDOW_COUNT must be >= 1")
        if self.window_seconds <= 0:
            raise SettingsError("STREAMAPP_WINDOW_SECONDS must be > 0")
        if self.grace_seconds < 0:
            raise SettingsError("STREAMAPP_GRACE_SECONDS must be >= 0")
        if self.redis_appendfsync not in ("always", "everysec", "no"):
            raise SettingsError("STREAMAPP_REDIS_APPENDFSYNC must be always, everysec or no")

    @property
    def embedded_redis(self) -> bool:
        """True when REDIS_URL points at the server `python -m streamapp redis` runs."""
        return self.redis_url == f"redis://127.0.0.1:{self.redis_port}/0"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv: str | Path | None = ".env") -> Settings:
        """Build settings from `environ` (default: the process environment) over the `.env` file."""
        values: dict[str, str] = {}
        if dotenv is not None and Path(dotenv).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        def get(name: str, kind: type, field: str) -> dict:
            raw = values.get(name)
            if raw is None or raw == "":
                return {}
            try:
                return {field: kind(raw)}
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        kwargs: dict = {}
        for name, kind, field in (
            ("HOST", str, "host"),
            ("PORT", int, "port"),
            ("REDIS_URL", str, "redis_url"),
            ("STREAMAPP_REDIS_PORT", int, "redis_port"),
            ("STREAMAPP_WAREHOUSE", Path, "warehouse"),
            ("STREAMAPP_CATALOG_URI", str, "catalog_uri"),
            ("STREAMAPP_WINDOW_COUNT", int, "window_count"),
            ("STREAMAPP_WINDOW_SECONDS", float, "window_seconds"),
            ("STREAMAPP_DEDUPE_SECONDS", int, "dedupe_seconds"),
            ("STREAMAPP_GRACE_SECONDS", float, "grace_seconds"),
            ("STREAMAPP_REDIS_APPENDFSYNC", str, "redis_appendfsync"),
            ("STREAMAPP_MAX_BODY_BYTES", int, "max_body_bytes"),
            ("STREAMAPP_MAX_EVENTS_PER_REQUEST", int, "max_events_per_request"),
            ("STREAMAPP_MAX_EVENT_BYTES", int, "max_event_bytes"),
            ("STREAMAPP_SHUTDOWN_SECONDS", float, "shutdown_seconds"),
            ("STREAMAPP_LOG_LEVEL", str, "log_level"),
        ):
            kwargs.update(get(name, kind, field))
        crash = values.get("STREAMAPP_CRASH_AT", "")
        kwargs["crash_at"] = tuple(p.strip() for p in crash.split(",") if p.strip())
        return cls(**kwargs)
