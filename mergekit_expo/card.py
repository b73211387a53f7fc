"""Model card for `expo` merges: mergekit's card plus an ExPO section.

Built offline: a model counts as a Hub ID only when it is not a local path and
looks like `owner/name`; the Hub is never asked.
"""

import logging
import os
from typing import Dict, List, Optional, Union

import yaml
from mergekit.config import MergeConfiguration
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import Annotated

from mergekit_expo import advice, stats
from mergekit_expo.compat import CARD_TEMPLATE, ModelReference
from mergekit_expo.checks import is_hub_id
from mergekit_expo.method import PAPER_URL

LOG = logging.getLogger("mergekit_expo")

BIBTEX = """@inproceedings{zheng2025model,
  title     = {Model Extrapolation Expedites Alignment},
  author    = {Zheng, Chujie and Wang, Ziqi and Ji, Heng and Huang, Minlie and Peng, Nanyun},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2025},
  eprint    = {2404.16792},
  archivePrefix = {arXiv}
}"""

EXPO_SECTION = """
## ExPO (model extrapolation)

This model was made with [ExPO]({url}) through the `expo` merge method of
[mergekit-expo](https://pypi.org/project/mergekit-expo/):
theta2 = theta1 + alpha * (theta1 - theta0), where theta0 is the SFT model and
theta1 the aligned model{plural}.

- SFT model (theta0): {theta0}
- Aligned model{plural} (theta1): {theta1}
- alpha: {alpha}
- Output dtype: {out_dtype} (computed in float32, rounded once)
{alpha_table}
{sweep}
{change_table}
### Citation

```bibtex
{bibtex}
```
"""


def model_md(model: ModelReference) -> str:
    path = model.model.path
    if is_hub_id(path):
        return f"[{path}](https://huggingface.co/{path})"
    return f"`{path}`"


def expo_card(
    config: MergeConfiguration,
    config_yaml: str,
    name: Optional[str] = None,
    summary: Optional[stats.Summary] = None,
) -> str:
    """mergekit's card for `config`, plus the ExPO section (with the run's statistics)."""
    theta0 = config.base_model or next((s.base_model for s in config.slices or [] if s.base_model), None)
    aligned = [m for m in _ordered_models(config) if m != theta0]
    hub_ids = [m.model.path for m in [theta0, *aligned] if is_hub_id(m.model.path)]
    section = EXPO_SECTION.format(
        url=PAPER_URL,
        plural="s" if len(aligned) > 1 else "",
        theta0=model_md(theta0),
        theta1=", ".join(model_md(m) for m in aligned),
        alpha=_alpha_text(summary),
        out_dtype=config.out_dtype or config.dtype or "as stored",
        change_table=_change_table(summary),
        alpha_table=_alpha_table(summary),
        sweep=sweep_section(config_yaml, config.parameters or {}),
        bibtex=BIBTEX,
    )
    body = CARD_TEMPLATE.format(
        metadata=yaml.dump(
            {
                "base_model": hub_ids,
                "tags": ["mergekit", "merge", "expo", "model-extrapolation"],
                "library_name": "transformers",
            }
        ),
        name=name or "Untitled Model (1)",
        merge_method=f"[ExPO]({PAPER_URL})",
        base_text=f" using {model_md(theta0)} as the SFT model (theta0)",
        model_list="\n".join(f"* {model_md(m)}" for m in aligned),
        config_yaml=config_yaml,
    )
    return body + section


def _ordered_models(config: MergeConfiguration) -> List[ModelReference]:
    if config.models:
        return [m.model for m in config.models]
    return sorted(config.referenced_models(), key=lambda m: m.model.path)


def _alpha_text(summary: Optional[stats.Summary]) -> str:
    if summary is None:
        return "n/a"
    low, high = summary.alpha_range
    return f"{low:g}" if low == high else f"{low:g} to {high:g} (varies by module, see below)"


def _change_table(summary: Optional[stats.Summary]) -> str:
    """Table 1's quantities per module kind, and what the output dtype kept."""
    if summary is None:
        return ""
    dtype = summary.total.dtypes[0]
    rows = [*summary.kinds.items(), ("**all**", summary.total)]
    lines = [
        f"### Weight change theta1 - theta0, and what {dtype} keeps of alpha * delta\n",
        "| module | tensors | normalized norm | relative to theta0 | changed "
        "| rounds back to theta1 | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, change in rows:
        loss = change.loss(dtype)
        lines.append(
            f"| {label} | {change.tensors} | {change.normalized_frobenius:.3e} "
            f"| {_number(change.relative, '.3e')} | {100 * change.changed_fraction:.1f}% "
            f"| {_number(loss.rounded_back_fraction, '.1%')} | {_number(loss.kept, '.1%')} |"
        )
    lines.append(
        "\nNormalized norm: sqrt(sum(delta^2) / |P|), as in the paper's Table 1 "
        f"(zephyr-7b: SFT -> DPO {advice.SFT_TO_DPO:g}, pretrained -> SFT "
        f"{advice.PRETRAINED_TO_SFT:g}). Rounds back: "
        "changed elements whose theta2 is stored as theta1. Kept: "
        "||stored(theta2) - stored(theta1)|| / ||alpha * delta||.\n"
    )
    lines += [f"> **Warning:** {a.message}\n" for a in advice.alerts(summary.total, [dtype])]
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _alpha_table(summary: Optional[stats.Summary]) -> str:
    if summary is None:
        return ""
    low, high = summary.alpha_range
    if low == high:
        return ""
    rows = "\n".join(
        f"| {kind} | {a:g} | {b:g} |" for kind, (a, b) in summary.alphas.items()
    )
    return f"\n| module | min alpha | max alpha |\n|---|---|---|\n{rows}\n"


class JudgeCell(BaseModel):
    """An LLM judge's win rates (%) against alpha 0, as the record holds them."""

    model: str
    win_rate: float
    lc_win_rate: float


class SweepRow(BaseModel):
    """One candidate of a sweep, as best.yaml's `expo_sweep` record holds it."""

    model_config = {"extra": "allow"}  # one [mean, stderr] pair per scorer, by name
    candidate: str
    n: int
    kl: Optional[float] = None
    selection_value: Optional[float] = None
    collapsed: bool = False
    judge: Optional[JudgeCell] = None  # an LLM judge against alpha 0
    lm_eval: Optional[Dict[str, Dict[str, float]]] = None  # lm-evaluation-harness, {task: {metric: value}}


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SweepRecord(BaseModel):
    """What `mergekit-expo sweep` writes under `expo_sweep` in best.yaml (mergekit ignores the key)."""

    results: str
    results_sha256: str
    rule: str
    rule_description: str
    scorers: List[str]
    alphas: List[FiniteFloat]
    chosen_alpha: FiniteFloat
    select: List[SweepRow]
    held_out: List[SweepRow] = []


def sweep_section(config_yaml: str, parameters: Dict[str, object]) -> str:
    """How alpha was chosen, when the recipe is a sweep's best.yaml: from the record it carries,
    so the card needs neither the sweep folder nor its results file."""
    try:
        raw = (yaml.safe_load(config_yaml) or {}).get("expo_sweep")
    except (yaml.YAMLError, AttributeError):
        return ""
    if raw is None:
        return ""
    try:
        record = SweepRecord.model_validate(raw)
    except ValidationError as error:
        LOG.warning("Model card: the recipe's `expo_sweep` record could not be read: %s", error)
        return f"\n> The recipe's `expo_sweep` record could not be read ({error.error_count()} problems), so how alpha was chosen is not stated.\n"
    swept = ", ".join(f"{a:g}" for a in record.alphas)
    if record.chosen_alpha not in record.alphas:  # edited by hand: the table would back an alpha never tried
        message = (
            f"the recipe's `expo_sweep` record says the sweep chose alpha = {record.chosen_alpha:g}, which is not "
            f"among the alphas it swept ({swept}); how alpha was chosen is not stated"
        )
        LOG.warning("Model card: %s", message)
        return f"\n> **Warning:** {message}.\n"
    if not any(_row_alpha(row) == record.chosen_alpha for row in record.select):
        message = (
            f"the recipe's `expo_sweep` record has no select-prompt row for the alpha it says the sweep "
            f"chose ({record.chosen_alpha:g}); how alpha was chosen is not stated"
        )
        LOG.warning("Model card: %s", message)
        return f"\n> **Warning:** {message}.\n"
    gone = "" if os.path.exists(record.results) else ", not present where this merge ran"
    lines = [
        "### How alpha was chosen\n",
        f"`mergekit-expo sweep` chose alpha = {record.chosen_alpha:g} among {swept} "
        f"with the rule {markdown_text(record.rule_description)}; scorers: "
        f"{', '.join(f'`{markdown_text(s)}`' for s in record.scorers)}. "
        f"Sweep results: `{markdown_text(record.results)}`{gone} "
        f"(sha256 {markdown_text(record.results_sha256[:16])}).",
    ]
    alpha = parameters.get("alpha")
    try:
        same = float(alpha) == record.chosen_alpha
    except (TypeError, ValueError):  # a per-module list, or no alpha
        same = False
    if not same:
        note = f"this merge uses alpha = {alpha}, not the {record.chosen_alpha:g} the sweep chose"
        LOG.warning("Model card: %s (recipe edited after the sweep?)", note)
        lines.append(f"\n> **Note:** {note}.")
    lines += ["", *_sweep_table("Select prompts (alpha was chosen here)", record.select, record.scorers, True)]
    if record.held_out:
        lines += ["", *_sweep_table("Held-out prompts", record.held_out, record.scorers, False)]
    return "\n".join(lines) + "\n"


def _row_alpha(row: SweepRow) -> Optional[float]:
    """The alpha of a row labelled `alpha=0.3` (the sweep's label), None for another label."""
    try:
        return float(row.candidate.removeprefix("alpha="))
    except ValueError:
        return None


def markdown_text(text: str) -> str:
    """`text` as one line of inert markdown, safe in a table cell: no line breaks (no injected
    headings or rows), `|` escaped, no HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _sweep_table(title: str, rows: List[SweepRow], scorers: List[str], select: bool) -> List[str]:
    judged = any(row.judge for row in rows)
    header = ["candidate", *scorers] + (["KL (nats)", "rule value", "collapsed"] if select else [])
    header += ["judge win rate vs alpha 0 (LC)"] if judged else []
    capabilities = list(dict.fromkeys(
        (task, metric) for row in rows for task, metrics in (row.lm_eval or {}).items()
        for metric in metrics if "stderr" not in metric and metric != "sample_len"
    ))
    header += [f"{task} {metric} (lm-eval)" for task, metric in capabilities]
    lines = [f"{title}, mean ± standard error over {rows[0].n if rows else 0} prompts:", "",
             "| " + " | ".join(map(markdown_text, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.candidate, *(_mean_stderr((row.model_extra or {}).get(name)) for name in scorers)]
        if select:
            cells += [_number(row.kl, ".3g"), _number(row.selection_value, ".4g"), "yes" if row.collapsed else "no"]
        if judged:
            cells.append(f"{row.judge.win_rate:.1f}% ({row.judge.lc_win_rate:.1f}%)" if row.judge else "")
        cells += [_number((row.lm_eval or {}).get(task, {}).get(metric), ".4g") for task, metric in capabilities]
        lines.append("| " + " | ".join(map(markdown_text, cells)) + " |")
    return lines


def _mean_stderr(pair: Union[List[float], None]) -> str:
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair):
        return f"{pair[0]:.4g} ± {pair[1]:.2g}"
    return "n/a"
