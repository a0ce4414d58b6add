"""Rows as an aligned text table, for the commands that print figures (`query`, `status`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def text_table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, count: bool = True) -> str:
    """`columns` over `rows` (already text), separated by " | ", and "(N rows)" under them."""
    rows = list(rows)
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
        *(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows),
    ]
    if count:
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(line.rstrip() for line in lines) + "\n"
