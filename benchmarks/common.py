"""Shared printing for the benchmark scripts."""

import argparse
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


def add_model_options(parser: argparse.ArgumentParser, size_gb: float, runs: str) -> None:
    """The synthetic-model options shared by the merge and inspect benchmarks."""
    parser.add_argument("--work-dir", help="models are cached here (default: a temp dir, removed)")
    parser.add_argument("--size-gb", type=float, default=size_gb, help="bf16 model size (1e9 bytes)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.1 GB, 1 repeat")
    parser.add_argument("--repeats", type=int, help=f"rounds of ({runs}) (default 3, quick 1)")
    parser.add_argument("--seed", type=int, default=0)
