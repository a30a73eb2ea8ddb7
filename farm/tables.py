"""Plain-text tables for the console (leaderboards, device lists)."""
from __future__ import annotations


def fmt_number(value, digits: int = 4) -> str:
    """A metric for a table cell: fixed digits, or '-' when there is none."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def format_table(table: list[list[str]]) -> str:
    """Rows of cells, columns left-aligned to their widest cell, two spaces apart."""
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
