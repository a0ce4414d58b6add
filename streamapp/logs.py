"""Logging set-up: JSON lines for log collectors, plain text for people at a terminal.

A record's `extra={...}` fields become keys of its JSON line (the sink logs rows, bytes, lag and
duration per commit that way), so they can be queried without parsing the message.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import msgspec

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode()


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (the client's fault, answered 400) as an ERROR with a
    traceback: anyone could fill the error log. Keep it as one INFO line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        # Imported here: a record of aiohttp.server means aiohttp is loaded; the processes that
        # never serve HTTP (the web supervisor, commands) need not load it for this filter (RSS).
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1]
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            reason = (error.message or "").strip().splitlines()
            record.msg, record.args = "refused a malformed request (%d): %s", (error.code, reason[0] if reason else "")
            record.exc_info = record.exc_text = None
        return True


def setup(level: str, fmt: str = "auto") -> None:
    """`fmt` "auto" means JSON unless stderr is a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("pyiceberg").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientErrorFilter())
