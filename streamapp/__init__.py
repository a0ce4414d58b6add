"""streamapp: a Faust-style stream processor, HTTP events -> Redis streams -> agents -> Iceberg.

The public surface is small: `app` (the project's `App`), `App`, `Event` for declaring models,
`Window`, `Rejected` (the stream of refused events), and `count`/`distinct` for windowed
aggregates (`stream.group_by(...).tumbling(...).aggregate(...)`).

Imported on first use (PEP 562), so that `python -m streamapp web`'s supervising process, which
only starts and stops the web processes, does not load what they need (~35 MB of RSS).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamapp.aggregate import count, distinct
    from streamapp.app import App
    from streamapp.model import Event, Int32
    from streamapp.rejected import Rejected
    from streamapp.stream import Stream, Window

    app: App

_HOMES = {"count": "streamapp.aggregate", "distinct": "streamapp.aggregate", "App": "streamapp.app",
          "Event": "streamapp.model", "Int32": "streamapp.model", "Rejected": "streamapp.rejected",
          "Stream": "streamapp.stream", "Window": "streamapp.stream"}

__all__ = ["App", "Event", "Int32", "Rejected", "Stream", "Window", "app", "count", "distinct"]


def __getattr__(name: str) -> Any:
    if name == "app":  # the one App of the project, made on first use
        value: Any = __getattr__("App")()
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"module 'streamapp' has no attribute {name!r}")
    globals()[name] = value
    return value
