"""Settings: defaults, .env, environment over .env, and errors that name the variable."""

from pathlib import Path

import pytest

from streamapp.settings import Settings, SettingsError


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({}, dotenv=None)
    assert (s.port, s.redis_port, s.window_count, s.window_seconds, s.dedupe_seconds) == (8000, 6379, 50000, 10.0, 3600)
    assert s.grace_seconds == 10.0
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


def test_redis_url_and_port():
    s = Settings.from_env({"STREAMAPP_REDIS_PORT": "7000", "REDIS_URL": ""}, dotenv=None)
    assert s.embedded_redis and s.embedded_redis_url == "redis://127.0.0.1:7000/0"
    s = Settings.from_env({"REDIS_URL": "redis://cache.internal:6379/2"}, dotenv=None)
    assert not s.embedded_redis and s.redis_url == "redis://cache.internal:6379/2"
    # A REDIS_URL is the user's server, with its own password, even at the embedded server's address.
    assert not Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}, dotenv=None).embedded_redis


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
    ],
)
def test_bad_values_name_the_variable(name, value, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env({name: value}, dotenv=None)
