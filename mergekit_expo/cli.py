"""`mergekit-expo`: the project's command line (mergekit's click conventions)."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
