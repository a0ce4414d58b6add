"""Crash points for the exactly-once tests: `STREAMAPP_CRASH_AT=after_commit:2` makes the worker
SIGKILL itself the 2nd time it reaches `after_commit`. Unset in production, where each call is a
tuple lookup."""

from __future__ import annotations

import collections
import os
import signal

_seen: collections.Counter[str] = collections.Counter()


def crashpoint(configured: tuple[str, ...], name: str) -> None:
    if not configured:
        return
    _seen[name] += 1
    for spec in configured:
        point, _, nth = spec.partition(":")
        if point == name and _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
