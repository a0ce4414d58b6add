"""Settings: defaults, .env, environment over .env, and errors that name the variable."""

from pathlib import Path

import pytest

from streamapp.settings import Settings, SettingsError


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({}, dotenv=None)
    assert (s.port, s.redis_port, s.window_count, s.window_seconds, s.dedupe_seconds) == (8000, 6379, 50000, 10.0, 3600)
    assert s.grace_seconds == 10.0
    assert (s.keep_metadata, s.orphan_min_age_seconds, s.orphan_interval_seconds) == (20, 3600.0, 3600.0)
    assert s.redis_url == "" and s.embedded_redis and s.embedded_redis_url == "redis://127.0.0.1:6379/0"
    assert s.redis_password_file == (tmp_path / "warehouse" / "redis" / "password").resolve()
    assert s.warehouse == (tmp_path / "warehouse").resolve()
    assert s.catalog_uri == f"sqlite:///{tmp_path / 'warehouse'}/catalog.db"


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "PORT=9001\nSTREAMAPP_WINDOW_COUNT=5\nSTREAMAPP_WAREHOUSE=/tmp/from-dotenv\nSTREAMAPP_GRACE_SECONDS=2.5\n"
    )
    s = Settings.from_env({"PORT": "9002"}, dotenv=env_file)
    assert s.port == 9002  # environment
    assert s.window_count == 5  # .env
    assert s.grace_seconds == 2.5
    assert s.warehouse == Path("/tmp/from-dotenv")
    assert s.catalog_uri == "sqlite:////tmp/from-dotenv/catalog.db"


def test_pyiceberg_configuration_is_consulted_only_without_a_catalog_uri():
    assert Settings.from_env({}, dotenv=None).catalog_from_pyiceberg
    given = Settings.from_env({"STREAMAPP_CATALOG_URI": "postgresql+psycopg://db/streamapp"}, dotenv=None)
    assert not given.catalog_from_pyiceberg and given.catalog_uri == "postgresql+psycopg://db/streamapp"
    assert not Settings().catalog_from_pyiceberg  # built in code (tests): what it says, nothing else


def test_redis_url_and_port():
    s = Settings.from_env({"STREAMAPP_REDIS_PORT": "7000", "REDIS_URL": ""}, dotenv=None)
    assert s.embedded_redis and s.embedded_redis_url == "redis://127.0.0.1:7000/0"
    s = Settings.from_env({"REDIS_URL": "redis://cache.internal:6379/2"}, dotenv=None)
    assert not s.embedded_redis and s.redis_url == "redis://cache.internal:6379/2"
    # A REDIS_URL is the user's server, with its own password, even at the embedded server's address.
    assert not Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}, dotenv=None).embedded_redis


def test_redis_cluster_and_wait():
    s = Settings.from_env({}, dotenv=None)
    assert (s.redis_cluster, s.redis_wait_replicas, s.redis_wait_ms) == (False, 0, 1000)
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://10.0.0.5:7000",
            "STREAMAPP_REDIS_CLUSTER": "1",
            "STREAMAPP_REDIS_WAIT_REPLICAS": "1",
            "STREAMAPP_REDIS_WAIT_MS": "250",
        },
        dotenv=None,
    )
    assert (s.redis_cluster, s.redis_wait_replicas, s.redis_wait_ms) == (True, 1, 250)
    assert not Settings.from_env(
        {"REDIS_URL": "redis://h:1", "STREAMAPP_REDIS_CLUSTER": "0"}, dotenv=None
    ).redis_cluster


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("PORT", "eighty", "PORT='eighty'"),
        ("STREAMAPP_WINDOW_COUNT", "0", "STREAMAPP_WINDOW_COUNT"),
        ("STREAMAPP_WINDOW_SECONDS", "-1", "STREAMAPP_WINDOW_SECONDS"),
        ("STREAMAPP_GRACE_SECONDS", "-1", "STREAMAPP_GRACE_SECONDS"),
        ("STREAMAPP_GRACE_SECONDS", "ten", "STREAMAPP_GRACE_SECONDS='ten'"),
        ("STREAMAPP_REDIS_APPENDFSYNC", "sometimes", "STREAMAPP_REDIS_APPENDFSYNC"),
        ("STREAMAPP_WEB_PROCESSES", "-1", "STREAMAPP_WEB_PROCESSES must be >= 0"),
        ("STREAMAPP_WEB_PROCESSES", "two", "STREAMAPP_WEB_PROCESSES='two'"),
        ("STREAMAPP_DASHBOARD_PORT", "0", "STREAMAPP_DASHBOARD_PORT must be a TCP port"),
        ("STREAMAPP_DASHBOARD_PORT", "70000", "STREAMAPP_DASHBOARD_PORT must be a TCP port"),
        ("STREAMAPP_KEEP_METADATA", "0", "STREAMAPP_KEEP_METADATA must be >= 1"),
        ("STREAMAPP_ORPHAN_MIN_AGE_SECONDS", "59", "STREAMAPP_ORPHAN_MIN_AGE_SECONDS must be >= 60"),
        ("STREAMAPP_ORPHAN_INTERVAL_SECONDS", "-1", "STREAMAPP_ORPHAN_INTERVAL_SECONDS must be >= 0"),
        ("STREAMAPP_TARGET_FILE_BYTES", "1000", "STREAMAPP_TARGET_FILE_BYTES must be >= 1048576"),
        ("STREAMAPP_REDIS_CLUSTER", "1", "STREAMAPP_REDIS_CLUSTER=1 needs REDIS_URL"),
        ("STREAMAPP_REDIS_CLUSTER", "maybe", "STREAMAPP_REDIS_CLUSTER='maybe' must be 1 or 0"),
        ("STREAMAPP_REDIS_WAIT_REPLICAS", "-1", "STREAMAPP_REDIS_WAIT_REPLICAS must be >= 0"),
        ("STREAMAPP_REDIS_WAIT_MS", "0", "STREAMAPP_REDIS_WAIT_MS must be 1..60000"),
    ],
)
def test_bad_values_name_the_variable(name, value, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env({name: value}, dotenv=None)
