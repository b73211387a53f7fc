"""What a sweep leaves behind: tables, the chosen recipe, the curves, a terminal summary.

More than one number per alpha (several scorers, length, unfinished share, collapse),
because the selecting reward model is being optimized against.
"""

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import yaml

from expo_eval.files import replace_report, write_atomic, write_text
from expo_eval.records import CandidateResult, Generation
from expo_eval.scoring import FUNCTION_SPEC
from expo_eval.selection import Selection, kl_distance

if TYPE_CHECKING:
    from rich.console import Console


# Bumped when a key of results.json changes meaning or disappears.
SCHEMA_VERSION = 1
STAT_FIELDS = ("mean", "median", "stderr", "win_rate")
JUDGE_FIELDS = ("judge", "n", "win_rate", "win_rate_stderr", "lc_win_rate", "position_agreement")
SPLIT_ORDER = {"select": 0, "report": 1}


def ordered(results: List[CandidateResult]) -> List[CandidateResult]:
    """SFT first, then by alpha; the select split before the report split."""
    return sorted(
        results,
        key=lambda r: (r.alpha is not None, r.alpha or 0.0, SPLIT_ORDER[r.split]),
    )


def scorers(results: List[CandidateResult], selector: str) -> List[str]:
    """Every scorer present, the selector first, the rest in order of appearance."""
    names = {selector: None}
    for result in results:
        names.update(dict.fromkeys(result.scores))
    return list(names)


def short_names(names: Sequence[str]) -> Dict[str, str]:
    """Labels for a figure: a `module:function` scorer by its function, a folder or Hub ID by its
    last part (`#objective=K` kept; with its parent when it is only a letter or two), with more
    of the name wherever two would read the same, the whole name as the last resort."""
    def choices(name: str) -> List[str]:
        model, _, objective = name.partition("#")
        if FUNCTION_SPEC.match(model):
            module, _, function = model.partition(":")
            parts = module.split(".")
            return [function] + [f"{'.'.join(parts[-k:])}:{function}" for k in range(1, len(parts) + 1)] + [name]
        pieces = [p for p in model.replace("\\", "/").split("/") if p not in ("", ".")] or [model]
        suffix = f"#{objective}" if objective else ""
        labels = ["/".join(pieces[-k:]) + suffix for k in range(1, len(pieces) + 1)] + [name]
        return labels[1:] if len(pieces[-1]) < 3 and len(pieces) > 1 else labels  # not just "a"

    options = {name: choices(name) for name in dict.fromkeys(names)}
    depth = dict.fromkeys(options, 0)
    while True:
        labels = {name: options[name][depth[name]] for name in options}
        clashing = [n for n in options if list(labels.values()).count(labels[n]) > 1 and depth[n] < len(options[n]) - 1]
        if not clashing:
            return labels
        for name in clashing:
            depth[name] += 1


def recipe_subject(recipe) -> str:
    """What a sweep's figures are of: its aligned model(s) and theta0, by short names."""
    base = recipe.base_model.model.path
    aligned = [m.model.model.path for m in recipe.models or [] if m.model != recipe.base_model]
    short = short_names([base, *aligned])
    return f"ExPO of {', '.join(short[a] for a in aligned)} from {short[base]}"


def figure_title(subject: str, chosen: CandidateResult, selection: Selection) -> str:
    return f"{subject}: alpha {chosen.alpha:g} chosen by {selection.rule}"


def _spaced_labels(ax, points: List[tuple], min_gap: float = 0.05) -> None:
    """Alpha labels beside points (x, y, text, bold) that stay apart: each goes above its point,
    else below, else is left out when both would overlap a label already placed (by their
    widths across, `min_gap` of the axes up and down)."""
    ax.margins(x=0.05, y=0.15)  # room for the labels inside the frame
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed = []
    for x, y, text, bold in sorted(points, key=lambda p: (not p[3], p[0])):  # the chosen alpha first
        u, v = (x - x0) / ((x1 - x0) or 1), (y - y0) / ((y1 - y0) or 1)
        half = max(min_gap, 0.012 * len(text))  # about half a small label's width, as a share of the axes
        for dv, offset in ((0.04, (0, 6)), (-0.06, (0, -13))):
            spot = (u, v + dv, half)
            if all(abs(spot[0] - a) > half + w or abs(spot[1] - b) > min_gap for a, b, w in placed):
                placed.append(spot)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha="center",
                            fontsize="small", fontweight="bold" if bold else "normal")
                break


def results_document(
    results: List[CandidateResult],
    chosen: CandidateResult,
    selection: Selection,
    flags: List[str],
    timing: Optional[dict] = None,
    inputs: Optional[dict] = None,
) -> dict:
    """timing: the sweep's own costs apart from any candidate (model or engine start-up);
    inputs: the fingerprints of what the results came from, by input name, so a report
    from an earlier sweep can be told from the current one."""
    return {
        "schema_version": SCHEMA_VERSION,
        "selector": selection.scorer,
        "selection": {
            "rule": selection.rule,
            "scorer": selection.scorer,
            "scorers": list(selection.scorers),
            "reward_accuracy": selection.reward_accuracy,
            "description": selection.describe(),
        },
        "chosen_alpha": chosen.alpha,
        "chosen_label": chosen.label,
        "flags": list(flags),
        "timing": dict(timing or {}),
        "inputs": dict(inputs or {}),
        "candidates": [r.model_dump(mode="json") for r in ordered(results)],
    }


def results_csv(results: List[CandidateResult], selection: Selection) -> str:
    """One row per candidate and split; scorer statistics flattened to `<scorer>:<stat>`;
    `selection_value` is what the rule in `select_rule` maximized."""
    names = scorers(results, selection.scorer)
    timings = list(dict.fromkeys(key for r in results for key in r.timing))
    header = ["alpha", "label", "split", "n"]
    header += [f"{name}:{stat}" for name in names for stat in STAT_FIELDS]
    header += ["mean_tokens", "length_cut_share", "repetition", "kl", "kl_stderr", "select_rule", "selection_value"]
    header += ["collapsed", "collapse_reasons"]
    judged = any(r.judge is not None for r in results)
    header += [f"judge:{key}" for key in JUDGE_FIELDS] if judged else []
    capabilities = capability_columns(results)
    header += [f"lm_eval:{task}:{metric}" for task, metric in capabilities]
    header += [f"timing:{key}" for key in timings]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in ordered(results):
        row = ["" if r.alpha is None else r.alpha, r.label, r.split, r.n]
        for name in names:
            stats = r.scores.get(name)
            row += [_blank(getattr(stats, stat, None)) for stat in STAT_FIELDS]
        row += [r.mean_tokens, r.length_cut_share, r.repetition, _blank(r.kl), _blank(r.kl_stderr), selection.rule]
        row += [_blank(r.selection_value), r.collapsed]
        row += ["; ".join(r.collapse_reasons)]
        row += [_blank(getattr(r.judge, key, None)) for key in JUDGE_FIELDS] if judged else []
        row += [_blank(r.capability.get(task, {}).get(metric)) for task, metric in capabilities]
        row += [_blank(r.timing.get(key)) for key in timings]
        writer.writerow(row)
    return buffer.getvalue()


def capability_columns(results: List[CandidateResult]) -> List[tuple]:
    """(task, metric) for every lm-eval figure any candidate has, in order of appearance."""
    return list(dict.fromkeys((task, metric) for r in results for task, metrics in r.capability.items() for metric in metrics))


def _blank(value):
    return "" if value is None else value


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(f"{value:.4g}")


def sweep_record(
    results: List[CandidateResult], chosen: CandidateResult, selection: Selection, results_path: Path, results_text: str
) -> dict:
    """How alpha was chosen, compact enough for best.yaml, so the card of a merge of it can
    say so without the sweep folder (the results file is named, with its hash, for provenance)."""
    names = scorers(results, selection.scorer)

    def row(r: CandidateResult) -> dict:
        entry = {"candidate": r.label, "n": r.n}
        entry.update({name: [_rounded(r.scores[name].mean), _rounded(r.scores[name].stderr)] for name in names if name in r.scores})
        if r.split == "select":
            entry.update(kl=_rounded(r.kl), selection_value=_rounded(r.selection_value), collapsed=r.collapsed)
        if r.judge is not None:
            entry["judge"] = {"model": r.judge.judge, "win_rate": _rounded(r.judge.win_rate), "lc_win_rate": _rounded(r.judge.lc_win_rate)}
        if r.capability:
            entry["lm_eval"] = {task: {k: _rounded(v) for k, v in metrics.items()} for task, metrics in r.capability.items()}
        return entry

    split = card_split(results)
    return {
        "results": str(results_path.resolve()),
        "results_sha256": hashlib.sha256(results_text.encode()).hexdigest(),
        "rule": selection.rule,
        "rule_description": selection.describe(),
        "scorers": names,
        "alphas": [r.alpha for r in _alpha_series(results, "select")],
        "chosen_alpha": chosen.alpha,
        "select": [row(r) for r in ordered(results) if r.split == "select"],
        "held_out": [row(r) for r in ordered(results) if r.split == split] if split == "report" else [],
    }


def best_recipe(recipe_text: str, chosen: CandidateResult, selection: Selection, record: Optional[dict] = None) -> str:
    """The swept recipe with `parameters.alpha` set to the chosen alpha, ready for mergekit-yaml.

    The sweep evaluated one alpha for every tensor, so a per-module alpha list in the
    recipe is replaced by that scalar: the file is what was measured. Comments of the
    original recipe do not survive the YAML round trip. `record` (sweep_record) goes under
    the top-level key `expo_sweep`, which mergekit ignores and the `expo` card reads.
    """
    recipe = yaml.safe_load(recipe_text)
    recipe["parameters"] = {**(recipe.get("parameters") or {}), "alpha": chosen.alpha}
    if record is not None:
        recipe["expo_sweep"] = record
    stats = chosen.scores[selection.scorer]
    header = [
        f"# alpha = {chosen.alpha:g}, chosen by the expo_eval sweep with the rule {selection.describe()}",
        f"# ({selection.scorer}: mean {stats.mean:.4g} ± {stats.stderr:.2g} on {chosen.n} {chosen.split} prompts),",
        "# the best value among the alphas that did not collapse. The rest is the swept recipe.",
    ]
    if chosen.alpha == 0:
        header.append("# alpha = 0 is the aligned model itself: extrapolation did not help here.")
    return "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False)


def _mean_stderr(result: CandidateResult, scorer: str) -> str:
    stats = result.scores.get(scorer)
    return "" if stats is None else f"{stats.mean:.3f} ± {stats.stderr:.3f}"


def card_split(results: List[CandidateResult]) -> str:
    """The held-out report split where there is one: the honest numbers for a model card
    (the sweep refuses report prompts that share a prompt with the select prompts)."""
    return "report" if any(r.split == "report" for r in results) else "select"


def _scored_prompts(split: str, count: int) -> str:
    """What the card's numbers were measured on, said so that select prompts never pass as held out."""
    if split == "report":
        return f"held-out report prompts ({count}, none of them a select prompt)"
    return f"select prompts ({count}), the ones alpha was chosen on: no prompts were held out"


def card_table(results: List[CandidateResult], chosen: CandidateResult, selection: Selection) -> str:
    """A Markdown table for the model card, one row per candidate."""
    selector = selection.scorer
    split = card_split(results)
    rows = [r for r in ordered(results) if r.split == split]
    names = scorers(rows, selector)
    header = ["candidate", *(f"{name} (mean ± stderr)" for name in names)]
    header += ["mean tokens", "cut by length", "collapsed"]
    judged = any(r.judge is not None for r in rows)
    header += ["judge win rate vs alpha 0 (LC)"] if judged else []
    guarded = {r.alpha: r.capability for r in results if r.split == "select" and r.capability}
    capabilities = [c for c in capability_columns(results) if "stderr" not in c[1] and c[1] != "sample_len"]
    header += [f"{task} {metric} (lm-eval)" for task, metric in capabilities]
    lines = [
        f"Scores on the {_scored_prompts(split, rows[0].n if rows else 0)}; alpha chosen on the select "
        f"prompts by the rule {selection.describe()}. Bold: the chosen alpha.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        label = f"**{r.label}**" if r.alpha == chosen.alpha and r.alpha is not None else r.label
        cells = [label, *(_mean_stderr(r, name) for name in names)]
        cells += [
            f"{r.mean_tokens:.0f}",
            f"{r.length_cut_share:.0%}",
            "yes" if r.collapsed else "no",
        ]
        if judged:
            cells.append("" if r.judge is None else f"{r.judge.win_rate:.1f}% ({r.judge.lc_win_rate:.1f}%)")
        cells += [_number(guarded.get(r.alpha, {}).get(task, {}).get(metric)) for task, metric in capabilities]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def _alpha_series(results: List[CandidateResult], split: str) -> List[CandidateResult]:
    return [r for r in ordered(results) if r.split == split and r.alpha is not None]


def reward_figure(results: List[CandidateResult], chosen: CandidateResult, selection: Selection, subject: str):
    """Mean ± stderr of every scorer against alpha, length below (the paper's Figure 4).

    One panel per scorer, since reward models do not share a scale; crosses mark
    collapsed alphas, the dotted line the SFT model, the vertical line the choice.
    """
    from matplotlib.figure import Figure

    selector = selection.scorer
    names = scorers(results, selector)
    short = short_names(names)
    fig = Figure(figsize=(7, 2.6 * (len(names) + 1)), layout="constrained")
    fig.suptitle(figure_title(subject, chosen, selection))
    axes = fig.subplots(len(names) + 1, 1, sharex=True, squeeze=False)[:, 0]
    splits = [s for s in SPLIT_ORDER if any(r.split == s for r in results)]
    for ax, name in zip(axes, names):
        for split in splits:
            series = [r for r in _alpha_series(results, split) if name in r.scores]
            alphas = [r.alpha for r in series]
            ax.errorbar(
                alphas,
                [r.score(name) for r in series],
                yerr=[r.scores[name].stderr for r in series],
                marker="o",
                capsize=3,
                linestyle="-" if split == "select" else "--",
                label=f"{split} prompts",
            )
            collapsed = [r for r in series if r.collapsed]
            if collapsed:
                ax.scatter(
                    [r.alpha for r in collapsed],
                    [r.score(name) for r in collapsed],
                    marker="x",
                    s=80,
                    color="red",
                    zorder=3,
                    label="collapsed",
                )
            sft = [r for r in results if r.alpha is None and r.split == split and name in r.scores]
            if sft:
                ax.axhline(sft[0].score(name), color="grey", linestyle=":", label="SFT model")
        ax.axvline(chosen.alpha, color="green", alpha=0.4, label=f"chosen alpha={chosen.alpha:g}")
        ax.set_ylabel(short[name] + (" (chooses)" if name in selection.scorers else ""))
    length = axes[-1]
    cut_share = length.twinx()
    length_panels = (
        (length, "mean_tokens", "mean tokens", "o", "tab:blue"),
        (cut_share, "length_cut_share", "share cut by length", "s", "tab:orange"),
    )
    for split in splits:
        series = _alpha_series(results, split)
        for ax, field, name, marker, color in length_panels:
            ax.plot(
                [r.alpha for r in series],
                [getattr(r, field) for r in series],
                "-" if split == "select" else "--",
                marker=marker,
                color=color,
                label=f"{name}, {split}",
            )
    for ax, _, name, _, _ in length_panels:
        ax.set_ylabel(name)
    cut_share.set_ylim(0, 1.05)
    length.set_xlabel("alpha")
    fig.legend(
        *_legend_entries(*axes, cut_share), loc="outside lower center", ncols=3, fontsize="small"
    )
    return fig


def _legend_entries(*axes):
    """One legend entry per label across all panels."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _select_scores(rows: List[Generation], selector: str) -> List[float]:
    return [g.scores[selector] for g in rows if g.split == "select" and selector in g.scores]


def distribution_figure(
    results: List[CandidateResult],
    chosen: CandidateResult,
    selector: str,
    generations: Dict[str, List[Generation]],
):
    """Per-alpha box plot of the selector's per-response scores (the paper's Figure 3).

    Select-split responses, the ones alpha was chosen on; red labels are collapsed alphas.
    """
    from matplotlib.figure import Figure

    candidates = [r for r in ordered(results) if r.split == "select"]
    boxes = [(r, _select_scores(generations.get(r.label, []), selector)) for r in candidates]
    boxes = [(r, scores) for r, scores in boxes if scores]
    fig = Figure(figsize=(max(5, 0.8 * len(boxes) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.set_ylabel(f"{short_names([selector])[selector]} per response")
    ax.set_title(f"{selector}: score per response on the select prompts", fontsize="medium")
    if not boxes:
        ax.text(
            0.5, 0.5, "no per-response scores", ha="center", va="center", transform=ax.transAxes
        )
        return fig
    ax.boxplot([scores for _, scores in boxes], showmeans=True)
    ax.set_xticks(range(1, len(boxes) + 1), [r.label for r, _ in boxes], rotation=45, ha="right")
    for tick, (r, _) in zip(ax.get_xticklabels(), boxes):
        if r.collapsed:
            tick.set_color("red")
        if r.label == chosen.label:
            tick.set_fontweight("bold")
    return fig


def kl_figure(results: List[CandidateResult], chosen: CandidateResult, selection: Selection, subject: str):
    """Every scorer against sqrt(KL(candidate || theta0)) on the select prompts: the picture
    of reward-model overoptimization (a proxy keeps rising while true quality peaks and
    falls), each point labelled by its alpha, the chosen one ringed; for trust-region, the
    region's edge."""
    from matplotlib.figure import Figure

    names = scorers(results, selection.scorer)
    short = short_names(names)
    fig = Figure(figsize=(7, 2.6 * len(names) + 0.6), layout="constrained")
    fig.suptitle(figure_title(subject, chosen, selection))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    series = [r for r in _alpha_series(results, "select") if r.kl is not None and math.isfinite(r.kl)]
    distance = {r.alpha: max(r.kl, 0.0) ** 0.5 for r in series}
    theta1 = next((r for r in series if r.alpha == 0), None)
    reach = kl_distance(theta1, theta1) if selection.rule == "trust-region" and theta1 is not None else None
    edge = selection.radius * reach ** 0.5 if reach is not None else None
    for ax, name in zip(axes, names):
        points = [r for r in series if name in r.scores]
        ax.errorbar([distance[r.alpha] for r in points], [r.score(name) for r in points],
                    yerr=[r.scores[name].stderr for r in points], marker="o", capsize=3, zorder=2)
        picked = [r for r in points if r.alpha == chosen.alpha]
        ax.scatter([distance[r.alpha] for r in picked], [r.score(name) for r in picked], s=160, facecolors="none",
                   edgecolors="green", linewidths=2, zorder=3, label=f"chosen alpha={chosen.alpha:g}")
        if edge is not None:
            ax.axvline(edge, color="grey", linestyle="--", label=f"trust region's edge: {selection.radius:g}x theta1's distance "
                       "at its upper bound (a point counts by its lower bound)")
        _spaced_labels(ax, [(distance[r.alpha], r.score(name), f"{r.alpha:g}", r.alpha == chosen.alpha) for r in points])
        ax.set_ylabel(short[name] + (" (chooses)" if name in selection.scorers else ""))
    left_out = [r.label for r in _alpha_series(results, "select") if r.kl is None or not math.isfinite(r.kl)]
    axes[-1].set_xlabel("sqrt(KL(candidate || theta0)), nats^0.5 per response (labels: alpha)"
                        + (f"\nnot shown, no finite KL: {', '.join(left_out)}" if left_out else ""))
    fig.legend(*_legend_entries(*axes), loc="outside lower center", ncols=1, fontsize="small")
    return fig


def write_plots(
    out_dir: Path,
    results: List[CandidateResult],
    chosen: CandidateResult,
    selection: Selection,
    generations: Dict[str, List[Generation]],
    subject: str,
) -> None:
    """reward_vs_alpha.png, reward_distributions.png and reward_vs_kl.png."""
    figures = {
        "reward_vs_alpha.png": reward_figure(results, chosen, selection, subject),
        "reward_distributions.png": distribution_figure(results, chosen, selection.scorer, generations),
    }
    if any(r.kl is not None and r.alpha == 0 and r.split == "select" for r in results):
        figures["reward_vs_kl.png"] = kl_figure(results, chosen, selection, subject)
    for name, fig in figures.items():
        write_atomic(out_dir / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120))


def alpaca_eval_outputs(rows: List[Generation], generator: str) -> str:
    """alpaca_eval's model_outputs format: `alpaca_eval --model_outputs FILE` reads it as is."""
    outputs = [{"instruction": g.prompt, "output": g.response, "generator": generator} for g in rows]
    return json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"


def write_alpaca_eval(
    out_dir: Path, results: List[CandidateResult], chosen: CandidateResult, generations: Dict[str, List[Generation]]
) -> None:
    """alpaca_eval/<label>.json for alpha = 0 and the chosen alpha, on the held-out prompts
    where there are some (the select prompts otherwise)."""
    split = card_split(results)
    for label in dict.fromkeys(["alpha=0", chosen.label]):
        rows = [g for g in generations.get(label, []) if g.split == split]
        if rows:
            write_text(out_dir / ALPACA_EVAL_DIR / f"{label}.json", alpaca_eval_outputs(rows, f"expo-{label}"))


# Everything write_report writes at the top of the output folder (outdir accepts these names).
ALPACA_EVAL_DIR = "alpaca_eval"
GENERATIONS_DIR = "generations"
REPORT_FILES = ("results.json", "results.csv", "best.yaml", "card_table.md",
                "reward_vs_alpha.png", "reward_distributions.png", "reward_vs_kl.png")


def write_generations(out_dir: Path, generations: Dict[str, List[Generation]]) -> None:
    """generations/<label>.jsonl: every response of each candidate, one JSON line each."""
    for label, rows in generations.items():
        write_text(out_dir / GENERATIONS_DIR / f"{label}.jsonl", "".join(row.model_dump_json() + "\n" for row in rows))


def write_report(
    out_dir: Path,
    results: List[CandidateResult],
    chosen: CandidateResult,
    recipe_text: str,
    selection: Selection,
    flags: List[str],
    generations: Dict[str, List[Generation]],
    timing: Optional[dict] = None,
    inputs: Optional[dict] = None,
    subject: str = "ExPO",
) -> None:
    """results.json, results.csv, best.yaml, card_table.md, generations/, alpaca_eval/ and the
    plots, written aside and swapped in once all are (files.replace_report): the folder holds
    one whole report, this one or the one before, and files of the one before that this one
    does not have (other alphas' generations) are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = json.dumps(results_document(results, chosen, selection, flags, timing, inputs), indent=2) + "\n"
    record = sweep_record(results, chosen, selection, out_dir / "results.json", document)  # where it will be

    def write(folder: Path) -> None:
        write_text(folder / "results.json", document)
        write_text(folder / "results.csv", results_csv(results, selection))
        write_text(folder / "best.yaml", best_recipe(recipe_text, chosen, selection, record))
        write_text(folder / "card_table.md", card_table(results, chosen, selection))
        write_generations(folder, generations)
        write_alpaca_eval(folder, results, chosen, generations)
        write_plots(folder, results, chosen, selection, generations, subject)

    replace_report(out_dir, write)


def _capability_cell(result: CandidateResult) -> str:
    return "; ".join(
        f"{task} {metric} {value:.3g}"
        for task, metrics in result.capability.items()
        for metric, value in metrics.items()
        if "stderr" not in metric and metric != "sample_len"
    )


def _judge_cell(result: CandidateResult) -> str:
    if result.judge is None:
        return ""
    return f"{result.judge.win_rate:.0f}% / {result.judge.lc_win_rate:.0f}%"


def _status(result: CandidateResult, is_chosen: bool) -> str:
    """Chosen and/or why collapsed: a chosen alpha can still collapse on held-out prompts."""
    parts = ["chosen"] if is_chosen else []
    if result.collapsed:
        parts.append("collapsed: " + "; ".join(result.collapse_reasons))
    return "; ".join(parts)


def print_table(
    results: List[CandidateResult],
    chosen: CandidateResult,
    selection: Selection,
    console: Optional["Console"] = None,
) -> None:
    """The sweep at a glance: the chosen alpha in bold green, collapsed rows in red."""
    from rich.console import Console
    from rich.table import Table

    selector = selection.scorer
    names = scorers(results, selector)
    table = Table(title=f"ExPO sweep: {selection.rule} on {', '.join(selection.scorers)} chooses {chosen.label}")
    for column in (
        "candidate",
        "split",
        "n",
        *names,
        f"win rate ({selector})",
        "tokens",
        "cut",
        "repetition",
        "KL (nats)",
        selection.rule,
        *(["judge win / LC"] if any(r.judge is not None for r in results) else []),
        *(["lm-eval"] if any(r.capability for r in results) else []),
        "status",
    ):
        table.add_column(
            column, justify="left" if column in ("candidate", "split", "status") else "right"
        )
    for r in ordered(results):
        win_rate = r.scores[selector].win_rate if selector in r.scores else None
        is_chosen = r.alpha is not None and r.alpha == chosen.alpha
        table.add_row(
            r.label,
            r.split,
            str(r.n),
            *(_mean_stderr(r, name) for name in names),
            "" if win_rate is None else f"{win_rate:.0%}",
            f"{r.mean_tokens:.0f}",
            f"{r.length_cut_share:.0%}",
            f"{r.repetition:.2f}",
            "" if r.kl is None else f"{r.kl:.3g}",
            "" if r.selection_value is None else f"{r.selection_value:.3f}",
            *([_judge_cell(r)] if any(x.judge is not None for x in results) else []),
            *([_capability_cell(r)] if any(x.capability for x in results) else []),
            _status(r, is_chosen),
            style="red" if r.collapsed else "bold green" if is_chosen else None,
        )
    (console or Console()).print(table)
