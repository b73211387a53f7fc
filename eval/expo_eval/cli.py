"""`mergekit-expo sweep`: flags mirror SweepConfig; a YAML config file can hold them all."""

import logging
from pathlib import Path
from typing import Optional

import click
import yaml
from pydantic import ValidationError

from mergekit_expo.cli import main

SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "max_new_tokens",
    "seed",
    "batch_size",
)


def _floats(text: str):
    return [float(x) for x in text.split(",") if x.strip()]


def build_config(config_file: Optional[str], flags: dict):
    """YAML config, then flags that were given on top of it."""
    from expo_eval.config import SweepConfig

    data = yaml.safe_load(Path(config_file).read_text()) if config_file else {}
    sampling = dict(data.get("sampling") or {})
    for name in SAMPLING_FLAGS:
        value = flags.pop(name)
        if value is not None:
            sampling[name] = value
    data.update({k: v for k, v in flags.items() if v not in (None, (), False)})
    if sampling:
        data["sampling"] = sampling
    return SweepConfig.model_validate(data)


@main.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML sweep config; flags given here override it.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (results, generations, plots, cache).")
@click.option("--alphas", help="Explicit grid, e.g. 0,0.1,0.2,0.3 (0 is always evaluated).")
@click.option("--search", "search_range", help="Automatic search over LOW,HIGH (paper, Appendix B).")
@click.option("--search-points", type=int, help="Coarse grid size of --search.")
@click.option("--refine-rounds", type=int, help="Bisection rounds of --search.")
@click.option("--min-step", type=float, help="Smallest alpha spacing of --search.")
@click.option("--prompts", help="smoke, ultrafeedback, alpaca_eval, a JSONL file or hf:NAME[:SPLIT].")
@click.option("--select-prompts", help="Prompts that choose alpha (default: a share of --prompts).")
@click.option("--report-prompts", help="Held-out prompts the result is reported on.")
@click.option("--select-fraction", type=float, help="Share of --prompts used to choose alpha.")
@click.option("--limit", type=int, help="Use at most N prompts.")
@click.option("--reward-model", "reward_models", multiple=True, help="Reward model folder or Hub ID, or module:function. Repeatable; the first chooses alpha.")
@click.option("--select-with", help="Which --reward-model chooses alpha.")
@click.option("--include-sft", is_flag=True, default=None, help="Also evaluate the SFT model (theta0).")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]))
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--tensor-parallel-size", type=int, help="vLLM tensor parallelism.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), help="Jinja chat template file for a tokenizer without one.")
@click.option("--materialize", is_flag=True, default=None, help="Write every candidate with mergekit and load it (slow; the paper's loop).")
@click.option("--keep-models", is_flag=True, default=None, help="Keep the checkpoints --materialize writes.")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--presence-penalty", type=float)
@click.option("--frequency-penalty", type=float)
@click.option("--max-new-tokens", type=int)
@click.option("--seed", type=int)
@click.option("--batch-size", type=int)
def sweep(recipe, config_file, alphas, search_range, search_points, refine_rounds, min_step, **flags):
    """Sweep alpha for an `expo` RECIPE: generate, score with reward models, report, pick alpha."""
    from expo_eval.candidates import RecipeError
    from expo_eval.prompts import PromptError
    from expo_eval.scoring import ScorerError
    from expo_eval.backends.hf import BackendError
    from expo_eval.sweep import Sweep

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags["recipe"] = recipe
    flags["alphas"] = _floats(alphas) if alphas else None
    if search_range:
        low, high = _floats(search_range)
        search = {"low": low, "high": high}
        for key, value in (("coarse_points", search_points), ("refine_rounds", refine_rounds), ("min_step", min_step)):
            if value is not None:
                search[key] = value
        flags["search"] = search
    flags["reward_models"] = list(flags["reward_models"]) or None
    try:
        config = build_config(config_file, flags)
        outcome = Sweep(config).run()
    except ValidationError as error:
        raise click.UsageError(str(error)) from None
    except (RecipeError, PromptError, ScorerError, BackendError) as error:
        raise click.ClickException(str(error)) from None
    if outcome.generated == 0:
        click.echo(f"Nothing generated: all {outcome.reused} candidate runs came from {config.out / 'cache'}.")
    else:
        click.echo(f"Generated {outcome.generated} candidate runs, reused {outcome.reused} from the cache.")
    click.echo(f"Chosen alpha: {outcome.chosen.alpha:g} (by {config.selector}); results in {config.out}")
    for flag in outcome.flags:
        click.echo(f"Warning: {flag}", err=True)


@main.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False), help="Folder for every artifact: models, recipes, sweeps, report.md.")
@click.option("--quick", is_flag=True, help="Shrink everything (about a minute; for tests): the numbers mean nothing.")
@click.option("--force", is_flag=True, help="Redo every stage, even those finished in DIR before.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, training and initialization.")
def demo(out, quick, force, seed):
    """Offline end-to-end demo: the paper's Table 2 experiment in miniature (needs the [demo] extra).

    Trains a tiny SFT model, a reward model and DPO checkpoints at 10/20/40/100% of
    an epoch with TRL, sweeps alpha for each with `mergekit-expo sweep`'s code, and
    writes DIR/report.md. Finished stages are reused on the next run.
    """
    import importlib.util
    import logging

    if importlib.util.find_spec("trl") is None:
        raise click.ClickException("the demo trains with TRL: pip install 'mergekit-expo[demo]'")
    from expo_eval.demo.pipeline import FULL, QUICK, run_demo
    from expo_eval.demo.report import print_summary

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = (QUICK if quick else FULL).model_copy(update={"seed": seed})
    summary = run_demo(Path(out), settings, force=force, echo=click.echo)
    print_summary(summary, echo=click.echo)
    click.echo(f"Report: {Path(out) / 'report.md'}")


if __name__ == "__main__":
    main()
