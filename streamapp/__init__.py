"""streamapp: a Faust-style stream processor, HTTP events -> Redis streams -> agents -> Iceberg.

The public surface is small: `app` (the project's `App`), `App`, `Event` and `Int32` for declaring
models, `Stream` and `Window` (what an agent reads and takes), `Rejected` (the stream of refused
events), and `count`, `distinct`, `sum`, `min`, `max` for windowed aggregates
(`stream.group_by(...).tumbling(...).aggregate(...)`, see `streamapp.engine.aggregations`).

The packages follow an event's way: `streamapp.web` (the HTTP edge: validate, append to Redis),
`streamapp.engine` (agents read the streams and window them), `streamapp.lake` (the Iceberg
tables they sink into); the modules beside them are shared by all three.

Imported on first use (PEP 562), so that `python -m streamapp web`'s supervising process, which
only starts and stops the web processes, does not load what they need (~35 MB of RSS).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamapp.engine.aggregations import count, distinct, max, min, sum  # noqa: A004 - the aggregations' names
    from streamapp.engine.app import App
    from streamapp.engine.stream import Stream
    from streamapp.entries import Window
    from streamapp.model import Event, Int32
    from streamapp.rejected import Rejected

    app: App

_AGGREGATIONS = "streamapp.engine.aggregations"
_HOMES = {
    "count": _AGGREGATIONS,
    "distinct": _AGGREGATIONS,
    "sum": _AGGREGATIONS,
    "min": _AGGREGATIONS,
    "max": _AGGREGATIONS,
    "App": "streamapp.engine.app",
    "Event": "streamapp.model",
    "Int32": "streamapp.model",
    "Rejected": "streamapp.rejected",
    "Stream": "streamapp.engine.stream",
    "Window": "streamapp.entries",
}

__all__ = ["App", "Event", "Int32", "Rejected", "Stream", "Window", "app", "count", "distinct", "max", "min", "sum"]


def __getattr__(name: str) -> Any:
    if name == "app":  # the one App of the project, made on first use
        value: Any = __getattr__("App")()
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"module 'streamapp' has no attribute {name!r}")
    globals()[name] = value
    return value
