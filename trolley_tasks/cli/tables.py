"""Tables that fit the terminal without splitting an identifier.

A UID split over lines cannot be copied, searched for or pasted into a cohort, and at 80 columns rich folds each of a
search's three UIDs over several lines. So identifiers (UIDs, job ids) are never wrapped: when they fit side by side
they get columns of their full width; when they do not, they are stacked in one cell, one identifier per line (a UID
is at most 64 characters, PS3.5 9.1, so one always fits 80 columns). The other columns share what is left, in the
order given; a column that would get less than a few characters is left out, and the caller is told which, so it can
say ``--columns`` or ``--format csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

BORDER = 3
"""What a column costs beyond its text in rich's default box: one space each side and one rule."""
MIN_TEXT = 10
"""The narrowest a foldable column is worth showing."""


@dataclass(frozen=True)
class Fitted:
    table: Table
    left_out: list[str]


def fit_table(
    columns: Sequence[str],
    rows: Sequence[dict[str, str]],
    width: int,
    whole: Sequence[str],
    caption: str = "",
) -> Fitted:
    """A table of ``rows`` under ``columns`` at most ``width`` wide; the ``whole`` columns are never wrapped.

    Parameters
    ----------
    columns
        Column names in the order to show them (and to give up on them: the last ones go first).
    rows
        One dict per row, keyed by column name.
    width
        The console's width.
    whole
        The columns whose values must stay on one line (identifiers).
    """

    def longest(column: str) -> int:
        return max([len(column), *(len(row.get(column, "")) for row in rows)])

    ids = [column for column in columns if column in whole]  # stacked, their header is stacked too
    others = [column for column in columns if column not in whole]
    side_by_side = sum(longest(column) + BORDER for column in ids) + 1
    stacked = len(ids) > 1 and side_by_side + BORDER + MIN_TEXT > width
    id_width = max((longest(column) for column in ids), default=0) + BORDER if stacked else side_by_side - 1
    room = width - 1 - id_width
    shown: list[str] = []
    for column in others:
        need = min(longest(column), MIN_TEXT) + BORDER
        if need <= room:
            shown.append(column)
            room -= need
    table = Table(caption=caption or None, caption_justify="left")
    if stacked:
        table.add_column("\n".join(ids), no_wrap=True, min_width=id_width - BORDER)
    else:
        for column in ids:
            table.add_column(column, no_wrap=True, min_width=longest(column))
    for column in shown:
        table.add_column(column, overflow="fold", min_width=min(longest(column), MIN_TEXT))
    for row in rows:
        first = ["\n".join(row.get(column, "") for column in ids)] if stacked else [row.get(c, "") for c in ids]
        table.add_row(*first, *(row.get(column, "") for column in shown))
    return Fitted(table, [column for column in others if column not in shown])
