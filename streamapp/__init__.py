"""streamapp: a Faust-style stream processor, HTTP events -> Redis streams -> agents -> Iceberg.

The public surface is small: `app` (the project's `App`), `App`, `Event` for declaring models,
`Window`, `Rejected` (the stream of refused events), and `count`/`distinct` for windowed
aggregates (`stream.group_by(...).tumbling(...).aggregate(...)`).
"""

from streamapp.aggregate import count, distinct
from streamapp.app import App
from streamapp.model import Event, Int32
from streamapp.rejected import Rejected
from streamapp.stream import Stream, Window

app = App()

__all__ = ["App", "Event", "Int32", "Rejected", "Stream", "Window", "app", "count", "distinct"]
