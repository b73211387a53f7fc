"""Terminal tables (rich) for `mergekit-expo inspect`."""

from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergekit_expo import advice
from mergekit_expo.diagnostics import Report
from mergekit_expo.stats import Change


def _number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def change_table(title: str, label: str, rows) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(label)
    for column in ("params", "norm", "rms", "rel", "1 - cos", "changed"):
        table.add_column(column, justify="right")
    for name, change in rows:
        table.add_row(name, *_change_cells(change), style="bold" if name == "all" else None)
    return table


def _change_cells(change: Change):
    return (
        _count(change.numel),
        f"{change.frobenius:.3g}",
        f"{change.normalized_frobenius:.2e}",
        _number(change.relative, ".2e"),
        _number(change.one_minus_cosine, ".1e"),
        f"{100 * change.changed_fraction:.1f}%",
    )


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def rounding_table(report: Report) -> Table:
    table = Table(
        title="Rounding loss: theta2 = theta1 + alpha * delta stored in each dtype "
        "(round to nearest)",
        title_justify="left",
    )
    table.add_column("dtype")
    for column in ("alpha", "rounds back to theta1", "kept ||.||", "kept along delta"):
        table.add_column(column, justify="right")
    for dtype in report.dtypes:
        for alpha in report.alphas:
            loss = report.summary.total.loss(dtype, alpha)
            table.add_row(
                dtype,
                f"{alpha:g}",
                _number(loss.rounded_back_fraction, ".1%"),
                _number(loss.kept, ".1%"),
                _number(loss.kept_along_delta, ".1%"),
            )
    return table


def print_report(report: Report, console: Optional[Console] = None) -> None:
    console = console or Console()
    summary = report.summary
    console.print(f"[bold]theta0[/] (SFT) {report.sft}\n[bold]theta1[/] (aligned) {report.aligned}")
    summary_rows = [*summary.kinds.items(), ("all", summary.total)]
    console.print(change_table("Weight change theta1 - theta0 per module", "module", summary_rows))
    if summary.layers:
        layers = [(str(i), change) for i, change in summary.layers.items()]
        console.print(change_table("Per layer", "layer", layers))
    console.print(rounding_table(report))
    console.print(
        "norm: ||delta||; rms: sqrt(mean(delta^2)), the paper's normalized norm (Table 1, "
        f"zephyr-7b: SFT -> DPO {advice.SFT_TO_DPO:g}, pretrained -> SFT "
        f"{advice.PRETRAINED_TO_SFT:g}); rel: ||delta|| / ||theta0||. Rounds back: share of the changed elements stored as theta1. Kept: "
        "||stored(theta2) - stored(theta1)|| / ||alpha * delta||, and its projection "
        "on alpha * delta."
    )
    low, high = report.suggested_alphas
    console.print(
        f"Suggested alpha search range: [bold]{low:.2g} to {high:.2g}[/] (heuristic from "
        "the size of the change and the paper's Tables 2 and 7)"
    )
    if report.skipped:
        names = ", ".join(report.skipped[:5]) + (", ..." if len(report.skipped) > 5 else "")
        console.print(f"Skipped {len(report.skipped)} tensors that are not floating point: {names}", markup=False)
    for message in report.config_warnings:
        console.print(f"[yellow]Warning (config):[/] {escape(message)}")
    for alert in report.alerts:
        console.print(f"[yellow]Warning ({alert.code}):[/] {alert.message}")
