"""The aiohttp.server filter: a client's malformed request is one INFO line, a server error stays."""

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from streamapp.logs import ClientErrorFilter


def _record(error: Exception) -> logging.LogRecord:
    try:
        raise error
    except Exception:  # noqa: BLE001 - any exception, as aiohttp's handler would catch it
        exc_info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), exc_info)


def test_a_malformed_request_is_logged_as_one_info_line():
    record = _record(BadHttpMessage("Invalid header value char"))
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "refused a malformed request (400): Invalid header value char"


def test_a_server_error_keeps_its_level_and_traceback():
    record = _record(RuntimeError("bug"))
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    plain = logging.LogRecord("aiohttp.server", logging.WARNING, __file__, 1, "no exception", (), None)
    assert ClientErrorFilter().filter(plain) and plain.levelno == logging.WARNING
