"""A real PostgreSQL for the catalog tests: Debian's server (installed by scripts/install-postgresql
when missing; the tests skip with the reason where it cannot be), one per test session, in a
temporary directory on a free loopback port, and a fresh database per test.

Registered as a plugin by conftest: `postgres` (the server) and `pg_uri` (a new database's
SQLAlchemy URI)."""

from __future__ import annotations

import getpass
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, free_port, wait_until

USER = "streamapp"


def bin_dir() -> Path | None:
    """The newest installed server's programs (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


class Postgres:
    """`postgres` on 127.0.0.1:port, its data in `root`; stoppable and restartable (the same data,
    the same port). Runs as the `postgres` user when the tests run as root: the server refuses root."""

    def __init__(self, bin_dir: Path, root: Path, port: int, *, fsync: bool = False) -> None:
        self.bin_dir = bin_dir
        self.fsync = fsync
        self.root = root
        self.data = root / "data"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "postgres.log"
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        self._databases = itertools.count(1)

    def _run_as(self) -> dict[str, object]:
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def init(self) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        done = subprocess.run(
            [self.bin_dir / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            cwd=self.root,
            **self._run_as(),
        )
        assert done.returncode == 0, f"initdb failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    def start(self) -> None:
        log = open(self.log, "ab")  # the server's output; the child keeps its own copy
        self.proc = subprocess.Popen(
            [
                self.bin_dir / "postgres",
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                "-c",
                "max_connections=300",  # every open_catalog is an engine with its own pool
                # Tests: no power cuts here, and 2 shared cores. A benchmark keeps them on.
                *([] if self.fsync else ["-c", "fsync=off", "-c", "full_page_writes=off"]),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            **self._run_as(),
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"postgres exited:\n{self.output()}"
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        wait_until(up, 30, 0.1, "PostgreSQL to accept connections")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are ended, as in a restart by an operator."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URI."""
        name = f"t{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server, installed first if missing."""
    if bin_dir() is None:
        done = subprocess.run([ROOT / "scripts" / "install-postgresql"], capture_output=True, text=True)
        if done.returncode == 3:
            pytest.skip(f"PostgreSQL is missing and cannot be installed here: {done.stderr.strip()}")
        assert done.returncode == 0, f"scripts/install-postgresql failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    programs = bin_dir()
    assert programs is not None, "scripts/install-postgresql succeeded but no initdb is found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root ({getpass.getuser()}) and there is no postgres user to run the server as")
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="streamapp-pg-"))
    os.chmod(root, 0o700)
    server = Postgres(programs, root, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_uri(postgres) -> str:
    """A fresh database of the session's server, as a STREAMAPP_CATALOG_URI."""
    return postgres.new_database()
