"""Tables for the command-line tools that never cut a value (ids are copied from them).

Why not a plain rich Table: when its columns do not fit the terminal, rich shortens cells with
"…" (``batch_c11565446…`` at 80 columns), and an id with an ellipsis is useless. Here a table is
printed as a table only when every cell fits whole; otherwise as plain rows, columns two spaces
apart, one line per row that the terminal wraps but nothing shortens.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table


def whole_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                right: Sequence[str] = ()) -> Table:
    """A compact table whose cells never wrap (``right``: right-aligned columns, for numbers)."""
    table = Table(*(Column(h, no_wrap=True, justify="right" if h in right else "left") for h in headers),
                  title=title, box=box.SIMPLE_HEAD)
    for row in rows:
        table.add_row(*row)
    return table


def print_rows(console: Console, headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
               right: Sequence[str] = ()) -> None:
    """Print ``rows`` under ``headers``: a table if it fits ``console.width``, else plain rows."""
    table = whole_table(headers, rows, title, right)
    unbounded = console.options.update_width(1_000_000)  # Measurement clamps to the width it is given
    if Measurement.get(console, unbounded, table).maximum <= console.width:
        console.print(table)
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    if title:
        console.print(title, soft_wrap=True, markup=False, highlight=False)
    for r in [headers, *rows]:
        line = "  ".join(str(c).rjust(w) if h in right else str(c).ljust(w) for c, w, h in zip(r, widths, headers))
        console.print(line.rstrip(), soft_wrap=True, markup=False, highlight=False)
