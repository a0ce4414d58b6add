"""What a windowed aggregate computes per (window, key): `count()`, `distinct(fn)`, `sum(fn)`,
`min(fn)`, `max(fn)`, or any class of your own that has the `Aggregation` methods.

    stream.group_by(lambda e: e.page_url, column="page_url").tumbling(60).aggregate(
        "events.clicks_per_minute", clicks=count(), users=distinct(lambda e: e.user_id),
        max_x=max(lambda e: e.x, type=int))

Each aggregation keeps an accumulator per window and key; the aggregate table gets one column per
aggregation, typed by `column_type` (int: Iceberg `long`, float: `double`). Accumulators of session
windows are snapshotted to JSON with each commit (`dump`/`load`), so they must be JSON values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

A = TypeVar("A")
Number = int | float


class Aggregation(Protocol[A]):
    """One column of an aggregate table. `A` is its accumulator's type."""

    column_type: type[int] | type[float]  # the column's type: int -> long, float -> double
    nullable: bool  # whether `result` may be None (e.g. min over events that all lack the value)

    def new(self) -> A:
        """The accumulator of a window that holds no event yet."""
        ...

    def add(self, acc: A, event: Any) -> A:
        """`acc` with `event` added (it may update `acc` in place and return it)."""
        ...

    def merge(self, a: A, b: A) -> A:
        """One accumulator for the events of both (session windows that an event bridged)."""
        ...

    def result(self, acc: A) -> Number | None:
        """The column's value for the window."""
        ...

    def dump(self, acc: A) -> Any:
        """`acc` as a JSON value, for the session snapshot."""
        ...

    def load(self, value: Any) -> A:
        """The accumulator `dump` wrote."""
        ...


class Count:
    """How many events the window holds."""

    column_type = int
    nullable = False

    def new(self) -> int:
        return 0

    def add(self, acc: int, event: Any) -> int:
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, acc: int) -> int:
        return acc

    def dump(self, acc: int) -> int:
        return acc

    def load(self, value: int) -> int:
        return value


class Distinct:
    """How many distinct non-null `fn(event)` values the window holds (e.g. unique users)."""

    column_type = int
    nullable = False

    def __init__(self, fn: Callable[[Any], Hashable | None]) -> None:
        self.fn = fn

    def new(self) -> set[Hashable]:
        return set()

    def add(self, acc: set[Hashable], event: Any) -> set[Hashable]:
        value = self.fn(event)
        if value is not None:
            acc.add(value)
        return acc

    def merge(self, a: set[Hashable], b: set[Hashable]) -> set[Hashable]:
        return a | b

    def result(self, acc: set[Hashable]) -> int:
        return len(acc)

    def dump(self, acc: set[Hashable]) -> list[Hashable]:
        return sorted(acc, key=str)  # values must be JSON (str, int) to be snapshotted

    def load(self, value: list[Hashable]) -> set[Hashable]:
        return set(value)


class _OfValues(Generic[A]):
    """An aggregation of the numbers `fn(event)` returns; None (a missing value) is skipped."""

    nullable: bool

    def __init__(self, fn: Callable[[Any], Number | None], column_type: type[int] | type[float]) -> None:
        if column_type not in (int, float):
            raise TypeError(f"type must be int (a long column) or float (a double column), not {column_type!r}")
        self.fn = fn
        self.column_type = column_type

    def _value(self, event: Any) -> Number | None:
        value = self.fn(event)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{type(self).__name__.lower()}(): fn returned {value!r}, not a number")
        if self.column_type is int and not isinstance(value, int):
            raise TypeError(
                f"{type(self).__name__.lower()}(): fn returned {value!r} for a long column; "
                "pass type=float for a double column"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise TypeError(f"{type(self).__name__.lower()}(): fn returned {value!r}, not a finite number")
        return value


class Sum(_OfValues[Number]):
    """The sum of the window's non-null `fn(event)` values; 0 when there is none."""

    nullable = False

    def new(self) -> Number:
        return self.column_type(0)

    def add(self, acc: Number, event: Any) -> Number:
        value = self._value(event)
        return acc if value is None else acc + value

    def merge(self, a: Number, b: Number) -> Number:
        return a + b

    def result(self, acc: Number) -> Number:
        return self.column_type(acc)

    def dump(self, acc: Number) -> Number:
        return acc

    def load(self, value: Number) -> Number:
        return value


class _Extreme(_OfValues[Number | None]):
    """The value `_pick` keeps of any two; None until a window has one."""

    nullable = True

    def _pick(self, a: Number, b: Number) -> Number:
        raise NotImplementedError

    def new(self) -> Number | None:
        return None

    def add(self, acc: Number | None, event: Any) -> Number | None:
        value = self._value(event)
        if value is None:
            return acc
        return value if acc is None else self._pick(acc, value)

    def merge(self, a: Number | None, b: Number | None) -> Number | None:
        if a is None or b is None:
            return b if a is None else a
        return self._pick(a, b)

    def result(self, acc: Number | None) -> Number | None:
        return None if acc is None else self.column_type(acc)

    def dump(self, acc: Number | None) -> Number | None:
        return acc

    def load(self, value: Number | None) -> Number | None:
        return value


class Min(_Extreme):
    """The smallest non-null `fn(event)` value of the window; null when there is none."""

    def _pick(self, a: Number, b: Number) -> Number:
        return b if b < a else a


class Max(_Extreme):
    """The largest non-null `fn(event)` value of the window; null when there is none."""

    def _pick(self, a: Number, b: Number) -> Number:
        return b if b > a else a


def count() -> Count:
    """How many events each window holds."""
    return Count()


def distinct(fn: Callable[[Any], Hashable | None]) -> Distinct:
    """How many distinct non-null `fn(event)` values each window holds, e.g. `distinct(lambda e: e.user_id)`."""
    return Distinct(fn)


def sum(fn: Callable[[Any], Number | None], *, type: type[int] | type[float] = float) -> Sum:  # noqa: A001, A002
    """The sum of `fn(event)` over each window's events (None skipped), a double column, or a
    long one with `type=int`."""
    return Sum(fn, type)


def min(fn: Callable[[Any], Number | None], *, type: type[int] | type[float] = float) -> Min:  # noqa: A001, A002
    """The least `fn(event)` of each window (None skipped; null if every value is None)."""
    return Min(fn, type)


def max(fn: Callable[[Any], Number | None], *, type: type[int] | type[float] = float) -> Max:  # noqa: A001, A002
    """The greatest `fn(event)` of each window (None skipped; null if every value is None)."""
    return Max(fn, type)
