"""Shared printing for the benchmark scripts."""

from typing import List


def table(headers: List[str], rows: List[List[str]]) -> str:
    """A plain aligned text table: first column left, the rest right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])
