"""Every setting streamapp reads, in one place: environment variables win over `.env`, then defaults.

Nothing else in the code base reads `os.environ`; components take a `Settings` object, so tests
build one explicitly and production builds one with `Settings.from_env()`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


class CatalogError(SettingsError):
    """The catalog the settings name cannot be opened (a wrong URI, a database that does not
    answer, an incomplete pyiceberg configuration); the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # `python -m streamapp dashboard`: its own process and port, on `host` too.
    dashboard_port: int = 8001
    redis_port: int = 6379
    # Empty: the embedded server on redis_port, with the password in `redis_password_file`. Given
    # (REDIS_URL), it is used as it is, with its own password if any.
    redis_url: str = ""
    # REDIS_URL names a node of a Redis/Valkey Cluster (STREAMAPP_REDIS_CLUSTER=1).
    redis_cluster: bool = False
    # Ingest answers 202 only once this many replicas have the events (WAIT), 503 when they do not
    # within redis_wait_ms; the worker commits only entries that many replicas have.
    redis_wait_replicas: int = 0
    redis_wait_ms: int = 1000
    # Sub-streams per event type, each under its own hash tag (a cluster spreads them over its
    # primaries) and each owned by one worker at a time (see `streamapp.names.stream`).
    shards: int = 1
    # How long a worker's lease on a shard lasts unrenewed: a dead worker's shards wait at most
    # this long for a new owner.
    lease_seconds: float = 10.0
    # Where the tables' files go: a local directory (resolved against the working directory; a
    # Path after __post_init__) or an S3 URI, s3://bucket/prefix (a str), reached with the AWS_*
    # settings below.
    warehouse: Path | str = Path("warehouse")
    # What stays on local disk (the SQLite catalog, the embedded Redis's data and password). Empty:
    # the warehouse when it is local, ./state when it is on S3.
    state_dir: Path | str = ""
    catalog_uri: str = ""  # empty: sqlite file inside the state dir
    # True where STREAMAPP_CATALOG_URI is unset (from_env): a catalog named "streamapp" in
    # pyiceberg's own configuration (.pyiceberg.yaml, PYICEBERG_CATALOG__STREAMAPP__*), e.g. a REST
    # catalog, then wins over the SQLite file (see streamapp.lake.catalog.open_catalog).
    catalog_from_pyiceberg: bool = False
    # S3 storage, from the standard AWS variables. Empty: pyarrow's own default chain (the
    # ~/.aws files, an instance's role). The region defaults to us-east-1 with an endpoint (MinIO,
    # moto and the like ignore it, but the signature needs one).
    aws_endpoint_url: str = ""
    aws_region: str = ""
    aws_access_key_id: str = dataclasses.field(default="", repr=False)
    aws_secret_access_key: str = dataclasses.field(default="", repr=False)
    aws_session_token: str = dataclasses.field(default="", repr=False)
    window_count: int = 50_000  # a backlog drains ~20% faster than with 10,000 (fewer commits)
    window_seconds: float = 10.0
    # A window also closes once its events' JSON holds this many bytes: 50,000 events of 32 KiB
    # would be 1.6 GB in one worker.
    window_bytes: int = 64 * 1024 * 1024
    dedupe_seconds: int = 3600
    grace_seconds: float = 10.0  # event-time windows: allowed lateness behind the newest event
    redis_appendfsync: str = "everysec"
    max_body_bytes: int = 1024 * 1024
    max_events_per_request: int = 500
    max_event_bytes: int = 32 * 1024
    retry_after_seconds: int = 1
    # A request must deliver its headers, and then its body, within this long (slowloris); it is
    # also how long an idle keep-alive connection stays open.
    request_timeout_seconds: float = 15.0
    # Origins whose pages may POST events (CORS); "*" allows any. Only /api/events answers CORS.
    cors_origins: tuple[str, ...] = ("*",)
    # write key -> source name. Empty: no key needed and `source` stays null.
    write_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    # Ingest answers 429 while an event's stream holds more than this many events, or bytes of
    # events, that its slowest consumer has not handled (see streamapp.web.backlog). Bytes 0: half
    # of Redis's maxmemory (1 GiB where Redis has none).
    max_backlog: int = 1_000_000
    max_backlog_bytes: int = 0
    # Events timestamped further ahead of the server's clock than this are rejected.
    max_future_seconds: int = 86_400
    # The embedded server's memory cap. It evicts nothing (dedupe ids included): ingest answers 429
    # before Redis is that full (see streamapp.web.backlog).
    redis_maxmemory: str = "2gb"
    # Snapshots each table keeps (time travel reaches back this many commits); more makes every
    # commit slower (see streamapp.lake.upkeep).
    keep_snapshots: int = 10
    # Previous metadata JSON files each table keeps besides its current one (Iceberg's
    # write.metadata.previous-versions-max, which streamapp sets to this).
    keep_metadata: int = 20
    # Files no snapshot references are removed only when older than this: the longest a commit can
    # take (a commit in progress has written files no snapshot references yet). At least 60.
    orphan_min_age_seconds: float = 3600.0
    # How often the worker removes orphan files and old metadata (see streamapp.lake.orphans); 0: never.
    orphan_interval_seconds: float = 3600.0
    # Data files one commit of a raw sink writes at most: a window whose rows fall into more
    # partitions (days) is committed in several commits of even sizes (see streamapp.lake.split).
    # A file costs ~0.7-0.9 ms on 2 cores, so a commit stays under ~1 s plus its rows.
    max_files_per_commit: int = 1000
    # Compaction's target: data files under it are small, and a day partition holding more than 2
    # files, two of them small, has its small ones rewritten as one (files over it are split).
    target_file_bytes: int = 64 * 1024 * 1024
    # The worker's /metrics port; 0 turns it off.
    worker_metrics_port: int = 9100
    shutdown_seconds: float = 25.0
    # Web server processes sharing the port (SO_REUSEPORT); 0: one per CPU core. On 2 cores with
    # valkey and wrk, a second one measured +34% req/s on a quiet machine (19.7k -> 26.4k), for
    # ~10% more CPU per request and ~60 MB more memory per process (+56 MB for the parent).
    web_processes: int = 0
    log_level: str = "INFO"
    # "json", "text", or "auto": JSON lines unless stderr is a terminal.
    log_format: str = "auto"
    # Test-only fault injection: comma-separated crash points where the worker SIGKILLs itself.
    crash_at: tuple[str, ...] = ()
    # Retention: (table name or fnmatch pattern, days to keep; None: forever), as given in
    # STREAMAPP_RETENTION ("events.*=400d,events.rejected=30d"). Empty: every table kept forever.
    retention: tuple[tuple[str, int | None], ...] = ()

    def __post_init__(self) -> None:
        warehouse = str(self.warehouse)
        if "://" in warehouse:
            scheme, _, rest = warehouse.partition("://")
            if scheme != "s3" or not rest.split("/", 1)[0]:
                raise SettingsError(
                    f"STREAMAPP_WAREHOUSE={warehouse!r} is neither a local directory nor s3://bucket/prefix"
                )
            object.__setattr__(self, "warehouse", warehouse.rstrip("/"))
        else:
            object.__setattr__(self, "warehouse", Path(warehouse).resolve())
        state = self.state_dir or (self.warehouse if isinstance(self.warehouse, Path) else "state")
        object.__setattr__(self, "state_dir", Path(state).resolve())
        if not self.catalog_uri:
            object.__setattr__(self, "catalog_uri", self.default_catalog_uri)
        if self.window_count < 1:
            raise SettingsError("STREAMAPP_WINDOW_COUNT must be >= 1")
        if self.window_seconds <= 0:
            raise SettingsError("STREAMAPP_WINDOW_SECONDS must be > 0")
        if self.grace_seconds < 0:
            raise SettingsError("STREAMAPP_GRACE_SECONDS must be >= 0")
        if self.redis_appendfsync not in ("always", "everysec", "no"):
            raise SettingsError("STREAMAPP_REDIS_APPENDFSYNC must be always, everysec or no")
        if self.log_format not in ("auto", "json", "text"):
            raise SettingsError("STREAMAPP_LOG_FORMAT must be auto, json or text")
        if self.keep_snapshots < 1:
            raise SettingsError("STREAMAPP_KEEP_SNAPSHOTS must be >= 1")
        if self.keep_metadata < 1:
            raise SettingsError("STREAMAPP_KEEP_METADATA must be >= 1")
        if self.orphan_min_age_seconds < 60:
            raise SettingsError(
                "STREAMAPP_ORPHAN_MIN_AGE_SECONDS must be >= 60 (the longest a commit can take; "
                "a younger file may belong to a commit in progress)"
            )
        if self.orphan_interval_seconds < 0:
            raise SettingsError("STREAMAPP_ORPHAN_INTERVAL_SECONDS must be >= 0 (0: off)")
        if self.target_file_bytes < 1024 * 1024:
            raise SettingsError("STREAMAPP_TARGET_FILE_BYTES must be >= 1048576 (1 MiB)")
        if self.max_files_per_commit < 1:
            raise SettingsError("STREAMAPP_MAX_FILES_PER_COMMIT must be >= 1")
        if self.max_backlog < 1:
            raise SettingsError("STREAMAPP_MAX_BACKLOG must be >= 1")
        if self.max_backlog_bytes < 0:
            raise SettingsError("STREAMAPP_MAX_BACKLOG_BYTES must be >= 0 (0: half of Redis's maxmemory)")
        if self.window_bytes < 1:
            raise SettingsError("STREAMAPP_WINDOW_BYTES must be >= 1")
        if self.web_processes < 0:
            raise SettingsError("STREAMAPP_WEB_PROCESSES must be >= 0 (0: one per CPU core)")
        if not 0 < self.dashboard_port < 65536:
            raise SettingsError("STREAMAPP_DASHBOARD_PORT must be a TCP port, 1-65535")
        if self.redis_cluster and not self.redis_url:
            raise SettingsError("STREAMAPP_REDIS_CLUSTER=1 needs REDIS_URL: a node of the cluster")
        if self.redis_wait_replicas < 0:
            raise SettingsError("STREAMAPP_REDIS_WAIT_REPLICAS must be >= 0")
        if not 1 <= self.redis_wait_ms <= 60_000:
            raise SettingsError("STREAMAPP_REDIS_WAIT_MS must be 1..60000")
        if not 1 <= self.shards <= 1024:
            raise SettingsError("STREAMAPP_SHARDS must be 1..1024")
        if not 1 <= self.lease_seconds <= 3600:
            raise SettingsError("STREAMAPP_LEASE_SECONDS must be 1..3600")
        if self.request_timeout_seconds <= 0:
            raise SettingsError("STREAMAPP_REQUEST_TIMEOUT_SECONDS must be > 0")

    @property
    def default_catalog_uri(self) -> str:
        """The SQLite file inside the state dir (the warehouse, when it is local)."""
        return f"sqlite:///{self.state_dir}/catalog.db"

    @property
    def web_process_count(self) -> int:
        return self.web_processes or os.cpu_count() or 1

    @property
    def embedded_redis(self) -> bool:
        """True when REDIS_URL is unset: web and worker use the server `python -m streamapp redis`
        runs, and its password."""
        return not self.redis_url

    @property
    def embedded_redis_url(self) -> str:
        """The embedded server's address (its password is not in it)."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def warehouse_is_local(self) -> bool:
        return isinstance(self.warehouse, Path)

    @property
    def warehouse_uri(self) -> str:
        """The warehouse as pyiceberg takes it: file:///abs/dir or s3://bucket/prefix."""
        return f"file://{self.warehouse}" if isinstance(self.warehouse, Path) else self.warehouse

    @property
    def local_dir(self) -> Path:
        """Local state (`state_dir`), a Path."""
        assert isinstance(self.state_dir, Path)  # made one in __post_init__
        return self.state_dir

    @property
    def redis_dir(self) -> Path:
        """The embedded server's data (its append-only file) and password."""
        return self.local_dir / "redis"

    @property
    def redis_password_file(self) -> Path:
        return self.redis_dir / "password"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv: str | Path | None = ".env") -> Settings:
        """Build settings from `environ` (default: the process environment) over the `.env` file."""
        values: dict[str, str] = {}
        if dotenv is not None and Path(dotenv).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        def get(name: str, kind: type, field: str) -> dict[str, object]:
            raw = values.get(name)
            if raw is None or raw == "":
                return {}
            try:
                return {field: kind(raw)}
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        kwargs: dict[str, Any] = {}
        for name, kind, field in (
            ("HOST", str, "host"),
            ("PORT", int, "port"),
            ("STREAMAPP_DASHBOARD_PORT", int, "dashboard_port"),
            ("REDIS_URL", str, "redis_url"),
            ("STREAMAPP_REDIS_PORT", int, "redis_port"),
            ("STREAMAPP_REDIS_WAIT_REPLICAS", int, "redis_wait_replicas"),
            ("STREAMAPP_REDIS_WAIT_MS", int, "redis_wait_ms"),
            ("STREAMAPP_SHARDS", int, "shards"),
            ("STREAMAPP_LEASE_SECONDS", float, "lease_seconds"),
            ("STREAMAPP_WAREHOUSE", str, "warehouse"),
            ("STREAMAPP_STATE_DIR", str, "state_dir"),
            ("AWS_ENDPOINT_URL", str, "aws_endpoint_url"),
            ("AWS_ACCESS_KEY_ID", str, "aws_access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", str, "aws_secret_access_key"),
            ("AWS_SESSION_TOKEN", str, "aws_session_token"),
            ("STREAMAPP_CATALOG_URI", str, "catalog_uri"),
            ("STREAMAPP_WINDOW_COUNT", int, "window_count"),
            ("STREAMAPP_WINDOW_SECONDS", float, "window_seconds"),
            ("STREAMAPP_WINDOW_BYTES", int, "window_bytes"),
            ("STREAMAPP_DEDUPE_SECONDS", int, "dedupe_seconds"),
            ("STREAMAPP_GRACE_SECONDS", float, "grace_seconds"),
            ("STREAMAPP_REDIS_APPENDFSYNC", str, "redis_appendfsync"),
            ("STREAMAPP_MAX_BODY_BYTES", int, "max_body_bytes"),
            ("STREAMAPP_MAX_EVENTS_PER_REQUEST", int, "max_events_per_request"),
            ("STREAMAPP_MAX_EVENT_BYTES", int, "max_event_bytes"),
            ("STREAMAPP_REQUEST_TIMEOUT_SECONDS", float, "request_timeout_seconds"),
            ("STREAMAPP_MAX_BACKLOG", int, "max_backlog"),
            ("STREAMAPP_MAX_BACKLOG_BYTES", int, "max_backlog_bytes"),
            ("STREAMAPP_MAX_FUTURE_SECONDS", int, "max_future_seconds"),
            ("STREAMAPP_REDIS_MAXMEMORY", str, "redis_maxmemory"),
            ("STREAMAPP_WORKER_METRICS_PORT", int, "worker_metrics_port"),
            ("STREAMAPP_KEEP_SNAPSHOTS", int, "keep_snapshots"),
            ("STREAMAPP_KEEP_METADATA", int, "keep_metadata"),
            ("STREAMAPP_ORPHAN_MIN_AGE_SECONDS", float, "orphan_min_age_seconds"),
            ("STREAMAPP_ORPHAN_INTERVAL_SECONDS", float, "orphan_interval_seconds"),
            ("STREAMAPP_MAX_FILES_PER_COMMIT", int, "max_files_per_commit"),
            ("STREAMAPP_TARGET_FILE_BYTES", int, "target_file_bytes"),
            ("STREAMAPP_SHUTDOWN_SECONDS", float, "shutdown_seconds"),
            ("STREAMAPP_WEB_PROCESSES", int, "web_processes"),
            ("STREAMAPP_LOG_LEVEL", str, "log_level"),
            ("STREAMAPP_LOG_FORMAT", str, "log_format"),
        ):
            kwargs.update(get(name, kind, field))
        if origins := values.get("STREAMAPP_CORS_ORIGINS", "").strip():
            kwargs["cors_origins"] = tuple(o.strip().rstrip("/") for o in origins.split(",") if o.strip())
        if raw_keys := values.get("STREAMAPP_WRITE_KEYS", "").strip():
            kwargs["write_keys"] = _write_keys(raw_keys)
        if region := values.get("AWS_REGION") or values.get("AWS_DEFAULT_REGION"):  # the SDKs' order
            kwargs["aws_region"] = region
        if raw_retention := values.get("STREAMAPP_RETENTION", "").strip():
            kwargs["retention"] = parse_retention(raw_retention)
        kwargs["catalog_from_pyiceberg"] = not values.get("STREAMAPP_CATALOG_URI")
        cluster = values.get("STREAMAPP_REDIS_CLUSTER", "").strip().lower()
        if cluster not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"STREAMAPP_REDIS_CLUSTER={cluster!r} must be 1 or 0")
        kwargs["redis_cluster"] = cluster in ("1", "true", "yes")
        crash = values.get("STREAMAPP_CRASH_AT", "")
        kwargs["crash_at"] = tuple(p.strip() for p in crash.split(",") if p.strip())
        return cls(**kwargs)


def _write_keys(raw: str) -> dict[str, str]:
    """Parse "key1:source1,key2:source2"; the message never echoes a key (they are secrets)."""
    return {key: source for _, key, source in _items(raw, "STREAMAPP_WRITE_KEYS", ":", "KEY:SOURCE", secret=True)}


def _items(raw: str, variable: str, separator: str, form: str, *, secret: bool) -> Iterator[tuple[str, str, str]]:
    """Each comma-separated LEFT<separator>RIGHT item of `raw`: (the item as messages name it,
    left, right), refusing one that is not of that `form` or repeats a left side. `secret`: the
    messages never echo an item."""
    seen: set[str] = set()
    for i, item in enumerate(raw.split(","), start=1):
        left, sep, right = (part.strip() for part in item.strip().partition(separator))
        named = f"item {i}" if secret else f"item {i} ({item.strip()!r})"
        if not sep or not left or not right:
            raise SettingsError(f"{variable}: {named} is not {form}")
        if left in seen:
            raise SettingsError(f"{variable}: item {i} repeats {'a key' if secret else repr(left)}")
        seen.add(left)
        yield named, left, right


def parse_retention(raw: str) -> tuple[tuple[str, int | None], ...]:
    """Parse "events.*=400d,events.rejected=30d,events.erasures=forever": a table name or an
    fnmatch pattern, then days (whole days: tables are partitioned by day) or "forever"."""
    rules: dict[str, int | None] = {}
    for named, pattern, value in _items(raw, "STREAMAPP_RETENTION", "=", "TABLE=DAYSd", secret=False):
        if value == "forever":
            rules[pattern] = None
            continue
        if not value.endswith("d") or not value[:-1].isdigit() or int(value[:-1]) < 1:
            raise SettingsError(f"STREAMAPP_RETENTION: {named}: keep whole days, e.g. 30d (>= 1), or forever")
        rules[pattern] = int(value[:-1])
    return tuple(rules.items())
