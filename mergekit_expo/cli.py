"""`mergekit-expo`: the project's command line (mergekit's click conventions)."""

import click

from mergekit_expo.errors import ReportingGroup


@click.group(cls=ReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ExPO (model extrapolation) tools around the `expo` mergekit method."""


@main.command("tiny-models")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--scale",
    type=float,
    default=0.02,
    show_default=True,
    help="Size of the aligned models' change, relative to each tensor's std.",
)
def tiny_models(out_dir: str, seed: int, scale: float) -> None:
    """Build a tiny SFT model and two aligned variants locally (no hub)."""
    from mergekit_expo.tiny import build_family

    for name, path in build_family(out_dir, seed=seed, scale=scale).items():
        click.echo(f"{name}: {path}")


@main.command("inspect")
@click.argument("sft")
@click.argument("aligned")
@click.option(
    "--alpha", "alphas", type=float, multiple=True, default=(0.3,), show_default=True,
    help="alpha to measure the rounding loss at (repeatable).",
)
@click.option(
    "--out-dtype", "dtypes", multiple=True, default=("bfloat16", "float16", "float32"),
    type=click.Choice(["bfloat16", "float16", "float32"]), show_default=True,
    help="Output dtype to measure the rounding loss for (repeatable).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all figures here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Per-layer PNG.")
def inspect_pair_command(sft, aligned, alphas, dtypes, json_path, plot_path) -> None:
    """How far ALIGNED moved from SFT (paper, Table 1), and what each dtype keeps.

    SFT and ALIGNED are local model folders or Hub IDs; tensors are streamed.
    """
    import os
    import sys

    from mergekit_expo.diagnostics import InspectError, inspect_pair
    from mergekit_expo.plot import plot_layers
    from mergekit_expo.report import print_report

    from mergekit_expo.rules import check_alpha

    for alpha in alphas:
        try:
            check_alpha(alpha)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--alpha") from None
    if plot_path:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        suffix = os.path.splitext(plot_path)[1].lstrip(".").lower()
        if suffix and suffix not in formats:  # no suffix: savefig writes PNG
            raise click.BadParameter(
                f"{plot_path}: matplotlib cannot write .{suffix} files; use one of: {', '.join(sorted(formats))}",
                param_hint="--plot",
            )
    try:
        report = inspect_pair(sft, aligned, alphas, dtypes, progress=sys.stderr.isatty())
        print_report(report)
        if json_path:
            report.write_json(json_path)
        if plot_path:
            plot_layers(report, plot_path)
    except InspectError as error:
        raise click.ClickException(str(error)) from None


@main.command("adapter")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--alpha", type=float, required=True, help="Extrapolation strength: every lora_B times 1 + alpha.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="New folder for the extrapolated adapter.")
@click.option("--base", "theta0", help="theta0, the model the adapter was trained on (default: the one its config names).")
def adapter_command(adapter, alpha, out_dir, theta0) -> None:
    """ExPO on a LoRA ADAPTER, exactly, as an adapter: theta0 + (1 + alpha) * s * B A.

    Whole tensors the adapter carries (modules_to_save, trained biases) are extrapolated
    against theta0's; DoRA and other non-linear adapters are refused.
    """
    from mergekit_expo.adapter import extrapolate_adapter
    from mergekit_expo.diagnostics import InspectError
    from mergekit_expo.rules import check_alpha

    try:
        check_alpha(alpha)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--alpha") from None
    try:
        extrapolate_adapter(adapter, theta0, alpha, out_dir)
    except InspectError as error:  # theta0 not found or unreadable
        raise click.ClickException(str(error)) from None
    click.echo(f"Wrote the adapter at alpha {alpha:g} (lora_B x {1 + alpha:g}) to {out_dir}")
