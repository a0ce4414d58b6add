"""What a table's model provides, as Protocols: the interfaces between the models (`Event`
subclasses, `Rejected`, an aggregate's table spec) and the code that reads their streams and
writes their tables. A module of its own, importing nothing of streamapp, so that every layer can
name them without importing the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.schema import Schema


class TableSchema(Protocol):
    """What `streamapp.lake.catalog.ensure_table` needs to create and evolve a table: a model class
    (`ClickEvent`, `Rejected`) or a table spec (an aggregate's)."""

    @property
    def table(self) -> str:
        """ "namespace.table"."""
        ...

    @property
    def partition_column(self) -> str:
        """The table is partitioned by the day of this timestamp column."""
        ...

    def iceberg_schema(self) -> Schema: ...


class TableModel(TableSchema, Protocol):
    """A model class whose events have a Redis stream and a table: every `Event` subclass, and
    `Rejected`. The reader reads its stream (`type_name`), a raw sink builds its rows (`to_arrow`,
    through `streamapp.lake.columns`)."""

    def type_name(self) -> str:
        """Its `type` on the wire, which names its Redis stream."""
        ...

    def stored_type(self) -> type:
        """The type its stream entries decode into, tolerant of changes to the model since they
        were written (see `Event.stored_type`)."""
        ...

    def to_arrow(self, payloads: list[bytes], received_us: list[int]) -> pa.Table:
        """The rows of these stream payloads (NDJSON, see `streamapp.entries`) in the table's
        schema; `received_us` holds one receive time per event."""
        ...
