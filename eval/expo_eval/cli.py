"""`mergekit-expo sweep` and `mergekit-expo demo`: the sweep's flags are generated from SweepConfig."""

import logging
import typing
from pathlib import Path
from typing import Optional

import click
import yaml
from pydantic import BaseModel, ValidationError

from expo_eval.config import SweepConfig
from expo_eval.files import read_text
from mergekit_expo.cli import main
from mergekit_expo.errors import ExpoError, Interrupted
from mergekit_expo.signals import terminate_cleanly

class CommaList(click.ParamType):
    """A comma-separated list, e.g. `0,0.1,0.3`: a bad item is a usage error naming the flag."""

    def __init__(self, item: type, count: Optional[int] = None, metavar: Optional[str] = None):
        self.item, self.count = item, count
        self.name = metavar or f"{item.__name__.upper()},..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [part.strip() for part in str(value).split(",") if part.strip()]
        try:
            result = [self.item(part) for part in items]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__} values", param, ctx)
        if not result or (self.count is not None and len(result) != self.count):
            self.fail(f"{value!r}: expected {self.count or 'one or more'} values", param, ctx)
        return result


# Fields with a command-line form of their own; every other field gets --field-name.
SPECIAL = {
    ("recipe",): None,  # the RECIPE argument
    ("search",): dict(decls=["--search", "search_range"], type=CommaList(float, count=2, metavar="LOW,HIGH"), help="Search alpha over LOW,HIGH (paper, Appendix B): a coarse grid, then bisection."),
    ("reward_models",): dict(decls=["--reward-model", "reward_models"], multiple=True),
    ("select_with",): dict(multiple=True),
    ("alphas",): dict(type=CommaList(float)),
    ("gpus",): dict(type=CommaList(str, metavar="GPU,...")),
    ("lm_eval", "tasks"): dict(decls=["--lm-eval-task", "lm_eval_tasks"], multiple=True, help="lm-eval task to run on alpha 0 and the chosen alpha (repeatable; local ones need --lm-eval-include-path)."),
}
PREFIXED = {"search", "judge", "lm_eval"}  # nested models whose flags carry the field name: --search-low, --judge-model ...


def _unwrap(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def _click_type(annotation):
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)])
    if annotation is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, str: str}.get(annotation, str)


def _fields(model, path=(), prefix=""):
    """(config path, option name, field info) for every leaf field of a config model."""
    for name, info in model.model_fields.items():
        nested = _unwrap(info.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            if (name,) in SPECIAL:
                yield (*path, name), name, info
            inner = f"{prefix}{name}_" if name in PREFIXED else prefix
            yield from _fields(nested, (*path, name), inner)
        else:
            yield (*path, name), prefix + name, info


FLAGS = {}  # click parameter name -> config path


def sweep_options(command):
    """One option per SweepConfig field (nested ones flattened), as mergekit's
    add_merge_options derives its flags from MergeOptions. Every default is None:
    only flags that were given override the YAML config, and 0 or --no-x are values."""
    for path, name, info in reversed(list(_fields(SweepConfig))):
        special = SPECIAL.get(path, {})
        if special is None:
            continue
        flag = "--" + name.replace("_", "-")
        decls = special.get("decls", [f"{flag}/--no-{flag[2:]}" if _unwrap(info.annotation) is bool else flag, name])
        FLAGS[decls[-1]] = path
        command = click.option(
            *decls,
            type=special.get("type") or (None if _unwrap(info.annotation) is bool else _click_type(info.annotation)),
            default=None,
            multiple=special.get("multiple", False),
            help=special.get("help", info.description),
        )(command)
    return command


def _set(data: dict, path, value) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = value


def build_config(recipe: Path, config_file: Optional[str], flags: dict) -> SweepConfig:
    """The YAML config, then every flag that was given on top of it."""
    data = {}
    if config_file:
        try:
            data = yaml.safe_load(read_text(Path(config_file), ExpoError)) or {}
        except ExpoError as error:
            raise click.BadParameter(str(error), param_hint="--config") from None
        except yaml.YAMLError as error:
            raise click.BadParameter(f"{config_file}: not valid YAML ({error})", param_hint="--config") from None
        if not isinstance(data, dict):
            raise click.BadParameter(f"{config_file}: expected a mapping of sweep settings", param_hint="--config")
    if "recipe" in data:
        raise click.BadParameter(f"{config_file}: `recipe` is the command's RECIPE argument; remove it from the file", param_hint="--config")
    data["recipe"] = recipe
    given = {name for name, value in flags.items() if value is not None}
    if "search_range" in given and given & {"search_low", "search_high"}:
        raise click.UsageError("give the search interval once: --search LOW,HIGH or --search-low/--search-high")
    for name, value in flags.items():
        if value is None or (isinstance(value, tuple) and not value):
            continue
        if name == "search_range":
            _set(data, ("search", "low"), value[0])
            _set(data, ("search", "high"), value[1])
            continue
        _set(data, FLAGS[name], list(value) if isinstance(value, tuple) else value)
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as error:
        raise click.UsageError(_describe(error, config_file)) from None


def _describe(error: ValidationError, config_file: Optional[str]) -> str:
    """Validation errors named by flag (and YAML key): `--kv-cache-gib (engine.kv_cache_gib): ...`."""
    by_path = {path: name for name, path in FLAGS.items()}
    lines = []
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"] if not isinstance(part, int))
        name = by_path.get(location)
        where = ".".join(location) or (config_file or "sweep config")
        label = f"--{name.replace('_', '-')} ({where})" if name else where
        if name == "reward_models":
            label = f"--reward-model ({where})"
        if name == "lm_eval_tasks":
            label = f"--lm-eval-task ({where})"
        if name == "search_range":
            label = f"--search ({where})"
        lines.append(f"{label}: {problem['msg']}")
    return "\n".join(lines)


@main.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML sweep config (SweepConfig fields); flags given here override it.")
@sweep_options
def sweep(recipe, config_file, **flags):
    """Sweep alpha for an `expo` RECIPE: generate, score with reward models, report, pick alpha."""
    from expo_eval.sweep import Sweep

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = build_config(recipe, config_file, flags)
    stopped = f"interrupted; finished candidates are cached in {config.out / 'cache'}"
    try:  # any other error: the group's boundary (mergekit_expo.errors.report_errors)
        with terminate_cleanly():  # SIGTERM unwinds too: the lock and a staged report are removed
            outcome = Sweep(config).run()
    except KeyboardInterrupt:
        raise Interrupted(stopped) from None
    except SystemExit as stop:  # terminate_cleanly's, 128 + SIGTERM
        error = Interrupted(stopped.replace("interrupted", "terminated", 1))
        error.exit_code = stop.code
        raise error from None
    if outcome.chosen is None:
        click.echo(f"Generated {outcome.generated} sample sets, reused {outcome.reused}; nothing scored (generate_only).")
        return
    if outcome.generated == 0:
        click.echo(f"Nothing generated: all {outcome.reused} sample sets came from {config.out / 'cache'}.")
    else:
        click.echo(f"Generated {outcome.generated} sample sets (a candidate's responses on a split, or its plain samples for KL), "
                   f"reused {outcome.reused} from the cache.")
    click.echo(f"Chosen alpha: {outcome.chosen.alpha:g} (rule {config.select} on {', '.join(config.selection.scorers)}); results in {config.out}")
    for flag in outcome.flags:
        click.echo(f"Warning: {flag}", err=True)


@main.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False), help="Folder for every artifact: models, recipes, sweeps, report.md.")
@click.option("--quick", is_flag=True, help="Shrink everything (about a minute; for tests): the numbers mean nothing.")
@click.option("--force", is_flag=True, help="Redo every stage, even those finished in DIR before.")
@click.option("--seeds", type=CommaList(int, metavar="SEED,..."), default=None, help="Seeds of data, training and sampling, one full run each (default: 0; the evidence: 0,1,2).")
@click.option("--regime", "regimes", type=click.Choice(["short", "long"]), multiple=True, help="Run only this regime (repeatable; default: both).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Regimes run at once, one process and one torch thread each.")
def demo(out, quick, force, seeds, regimes, workers):
    """Offline end-to-end demo: the paper's Table 2 experiment in miniature (needs the [demo] extra).

    For short answers and for long ones, trains a tiny SFT model, two reward models
    and DPO checkpoints at 10/20/40/100% of an epoch with TRL, sweeps alpha for each
    with `mergekit-expo sweep`'s code, and writes DIR/<regime>/report.md; each further
    seed repeats it under DIR/<regime>/seeds/SEED. DIR/report.md measures the selection
    rules over all of them. Finished stages are reused.
    """
    import importlib.util
    import logging

    if importlib.util.find_spec("trl") is None:
        raise click.ClickException("the demo trains with TRL: pip install 'mergekit-expo[demo]'")
    from expo_eval.demo.pipeline import run_demo
    from expo_eval.demo.settings import QUICK, REGIMES
    from expo_eval.demo.report import print_summary

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"each seed once, got {seeds}", param_hint="--seeds")
    chosen = QUICK if quick else REGIMES
    chosen = {name: settings for name, settings in chosen.items() if not regimes or name in regimes}
    with terminate_cleanly():  # SIGTERM unwinds too: the regimes' worker processes are ended with it
        summaries = run_demo(Path(out), chosen, seeds=seeds or (0,), force=force, echo=click.echo, workers=workers)
    print_summary(summaries, echo=click.echo)
    click.echo(f"Report: {Path(out) / 'report.md'}")


if __name__ == "__main__":
    main()
