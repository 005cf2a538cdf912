"""Plain-text tables for the terminal: a header, a rule, the rows, columns two spaces apart."""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence

import click

TABLE_WIDTH = 120
"""No table of a command is wider than this unless asked (``--wide``)."""

_NARROWEST = 12  # a wrapped column keeps at least this many characters

wide_option = click.option("--wide", is_flag=True, help="The full text of every cell, however wide the table gets.")


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = TABLE_WIDTH,
    wrap: Collection[str] = (),
) -> str:
    """The table as text. When it is wider than ``width``, the columns named in ``wrap`` are
    narrowed, the widest first, and their cells wrapped onto further lines; ``width=None`` never
    wraps (the full text on one line a row)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    wrap = [i for i, name in enumerate(header) if name in wrap]
    excess = sum(widths) + 2 * (len(widths) - 1) - (width or 0)
    while width is not None and excess > 0 and wrap:
        widest = max(wrap, key=lambda i: widths[i])
        if widths[widest] <= _NARROWEST:
            break
        widths[widest] -= 1
        excess -= 1
    lines: list[str] = []
    for cells in [header, ["-" * w for w in widths], *rows]:
        lines += _lines(cells, widths)
    return "\n".join(lines)


def _lines(cells: Sequence[str], widths: list[int]) -> list[str]:
    """One row as one or more lines, each cell wrapped to its column."""
    columns = [
        textwrap.wrap(cell, w, break_on_hyphens=False) or [""] if len(cell) > w else [cell]
        for cell, w in zip(cells, widths, strict=True)
    ]
    height = max(len(c) for c in columns)
    return [
        "  ".join((c[j] if j < len(c) else "").ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
        for j in range(height)
    ]
