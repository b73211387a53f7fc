"""The demo's report: a table shaped like the paper's Table 2, the curves (its Figure 4), and
the paper's claims checked against the measured numbers.

Every sentence about a claim is computed from the results: a difference counts
only when it exceeds two standard errors, otherwise it is reported as a tie.
"""

import json
import math
from typing import Dict, List, Optional, Tuple

from expo_eval.demo import task
from expo_eval.demo.rules import DEFAULT, DESCRIPTIONS, GROUND_TRUTH, ORACLE, PAPER_RULE, RULE_ORDER, SENSITIVITY_NOTE, TALLIED
from expo_eval.demo.settings import DemoSettings, Layout
from expo_eval.files import write_atomic, write_text
from expo_eval.records import CandidateResult

# The paper's Table 2 (DPO with fewer steps + ExPO): RM-Mistral-7B mean reward, optimal alpha.
PAPER_SFT_REWARD = 3.42
PAPER = {0.1: (3.97, 6.57, 8.0), 0.2: (4.70, 6.95, 2.5), 0.4: (5.77, 6.75, 0.5), 1.0: (6.16, 6.52, 0.3)}
SIGNIFICANCE = 2.0  # standard errors
# The goal for the default rule (issue 18), per regime: never clearly below alpha 0, within one
# standard error of the oracle in at least this share of cases (10 of 12), and short of it by at most
# this much on average.
GOAL_WITHIN_SHARE = 10 / 12
GOAL_MEAN_SHORTFALL = 0.05


class Checkpoint:
    """One DPO checkpoint's sweep, as the demo summarized it."""

    def __init__(self, summary: dict, reward_models: List[str]):
        self.name = summary["checkpoint"]
        self.fraction = summary["fraction"]
        self.seed = summary["seed"]
        self.alphas: Dict[str, float] = summary["alphas"]  # by rule name
        self.alpha_rm = self.alphas[PAPER_RULE]  # the paper's rule: the reward model's best mean
        self.alpha_gt = self.alphas[ORACLE]
        self.alpha_default = self.alphas[DEFAULT]
        self.flags = summary["flags"]
        self.theta1_kl = summary["theta1_kl"]  # from plain samples of theta1, nats per response
        self.examples = summary.get("examples", {})
        self.reward_models = reward_models
        self.reward_model = reward_models[0]  # the one single-scorer rules choose with
        self.results = {
            (r.alpha, r.split): r for r in map(CandidateResult.model_validate, summary["results"])
        }

    def test(self, alpha: Optional[float]) -> CandidateResult:
        return self.results[(alpha, "report")]

    def dev_curve(self) -> List[CandidateResult]:
        return sorted(
            (r for (alpha, split), r in self.results.items() if split == "select" and alpha is not None),
            key=lambda r: r.alpha,
        )

    @property
    def title(self) -> str:
        return f"DPO {self.fraction:.0%} of an epoch"


def difference(a: CandidateResult, b: CandidateResult, scorer: str) -> Tuple[float, float]:
    """a - b and its standard error, as for independent samples (conservative: the prompts are shared)."""
    return a.score(scorer) - b.score(scorer), math.hypot(a.scores[scorer].stderr, b.scores[scorer].stderr)


def compared(a: CandidateResult, b: CandidateResult, scorer: str) -> str:
    """'higher (+0.41 ± 0.09)', 'lower (...)' or 'the same within noise (...)'."""
    diff, stderr = difference(a, b, scorer)
    word = {True: "higher", False: "lower", None: "the same within noise"}[better(a, b, scorer)]
    return f"{word} ({diff:+.2f} ± {stderr:.2f})"


def better(a: CandidateResult, b: CandidateResult, scorer: str) -> Optional[bool]:
    """True/False when a is clearly above/below b, None for a tie."""
    diff, stderr = difference(a, b, scorer)
    return None if abs(diff) <= SIGNIFICANCE * stderr else diff > 0


def verdict(flags: List[Optional[bool]], names: List[str]) -> str:
    """"holds" only when it holds for everything the claim speaks of; else for which it does."""
    if flags and all(flags):
        return "holds"
    held = [name for name, flag in zip(names, flags) if flag]
    if held:
        return f"holds for {', '.join(held)} only ({len(held)} of {len(flags)})"
    return "does not hold"


# -- the table ------------------------------------------------------------------------


def table_rows(checkpoints: List[Checkpoint], sft: CandidateResult) -> List[Dict[str, str]]:
    """Rows of the Table 2 analogue, on the test prompts."""
    reward_model = checkpoints[0].reward_model

    def row(model: str, result: CandidateResult, alpha: str, paper_reward, paper_alpha) -> Dict[str, str]:
        return {
            "model": model,
            "alpha": alpha,
            "reward model": f"{result.score(reward_model):.2f} ± {result.scores[reward_model].stderr:.2f}",
            "ground truth": f"{result.score(GROUND_TRUTH):.2f} ± {result.scores[GROUND_TRUTH].stderr:.2f}",
            "tokens": f"{result.mean_tokens:.1f}",
            "never ends": f"{result.length_cut_share:.0%}",
            "paper reward": "" if paper_reward is None else f"{paper_reward:.2f}",
            "paper alpha": "" if paper_alpha is None else f"{paper_alpha:g}",
        }

    rows = [row("SFT", sft, "-", PAPER_SFT_REWARD, None)]
    for c in checkpoints:
        paper = PAPER.get(c.fraction, (None, None, None))
        rows.append(row(f"DPO {c.fraction:.0%}", c.test(0.0), "0", paper[0], None))
        rows.append(row("  + ExPO, alpha by RM", c.test(c.alpha_rm), f"{c.alpha_rm:g}", paper[1], paper[2]))
        rows.append(row(f"  + ExPO, alpha by {DEFAULT}", c.test(c.alpha_default), f"{c.alpha_default:g}", None, None))
        rows.append(row("  + ExPO, alpha by truth", c.test(c.alpha_gt), f"{c.alpha_gt:g}", None, None))
    return rows



def markdown_table(rows: List[Dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -- the claims ------------------------------------------------------------------------


def peak_and_fall(curve: List[CandidateResult], scorer: str) -> Tuple[CandidateResult, bool, bool]:
    """The best alpha on `scorer`, whether it is clearly above alpha 0, and whether the
    largest alpha is clearly below it (or collapsed)."""
    peak = max(curve, key=lambda r: r.score(scorer))
    rises = peak.alpha > 0 and better(peak, curve[0], scorer) is True
    falls = curve[-1].collapsed or better(curve[-1], peak, scorer) is False
    return peak, rises, falls


def curve_text(curve: List[CandidateResult], scorer: str, name: str) -> Tuple[str, bool]:
    """'reward model 1.45 at alpha 0, peak 1.85 at alpha 8 (clearly higher), ...' and whether it rose and fell."""
    peak, rises, falls = peak_and_fall(curve, scorer)
    text = f"{name} {curve[0].score(scorer):.2f} at alpha 0"
    if peak.alpha == 0:
        text += " (its best)"
    else:
        rise = "clearly higher" if rises else "within noise"
        text += f", peak {peak.score(scorer):.2f} at alpha {peak.alpha:g} ({rise})"
    if curve[-1] is not peak:
        text += f", {curve[-1].score(scorer):.2f} at alpha {curve[-1].alpha:g}"
    elif peak.alpha != 0:
        text += ", no fall within the grid"
    return text, rises and falls


def claim_rise_and_collapse(checkpoints: List[Checkpoint]) -> Tuple[str, List[str]]:
    """Figure 4: reward rises with alpha, then drops sharply once the approximation breaks."""
    lines, flags = [], []
    for c in checkpoints:
        curve = c.dev_curve()
        reward, rose_and_fell = curve_text(curve, c.reward_model, "reward model")
        truth, _ = curve_text(curve, GROUND_TRUTH, "ground truth")
        flags.append(rose_and_fell)
        collapsed = [r.alpha for r in curve if r.collapsed]
        marked = f"marked collapsed from alpha {min(collapsed):g} on" if collapsed else "no alpha marked collapsed"
        lines.append(f"{c.title}: {reward}; {truth}; {marked}.")
    return verdict(flags, [c.title for c in checkpoints]), lines


def non_increasing(values: List[float]) -> bool:
    return all(a >= b for a, b in zip(values, values[1:])) and values[0] > values[-1]


def claim_alpha_shrinks(checkpoints: List[Checkpoint]) -> Tuple[str, List[str]]:
    """Table 7: the optimal alpha shrinks as training goes on (8, 2.5, 0.5, 0.3)."""
    by_rm = [c.alpha_rm for c in checkpoints]
    by_gt = [c.alpha_gt for c in checkpoints]
    flags = [non_increasing(by_rm), non_increasing(by_gt)]
    lines = [
        "chosen by the reward model: " + ", ".join(f"{c.name} {c.alpha_rm:g}" for c in checkpoints)
        + (" (shrinks)" if flags[0] else " (does not shrink steadily)"),
        "chosen by the ground truth: " + ", ".join(f"{c.name} {c.alpha_gt:g}" for c in checkpoints)
        + (" (shrinks)" if flags[1] else " (does not shrink steadily)"),
    ]
    return verdict(flags, ["the reward model's choice", "the ground truth's choice"]), lines


REWARD_MODEL = "reward model"  # stands for the run's reward model folder in the claim checks


def picked(c: Checkpoint, by: str) -> float:
    return c.alpha_rm if by == "rm" else c.alpha_gt


def scorer_of(c: Checkpoint, scorer: str) -> str:
    return c.reward_model if scorer == REWARD_MODEL else scorer


def improves(by: str, scorer: str):
    """A claim check: each checkpoint + ExPO (alpha picked `by` "rm" or "gt") beats alpha 0 on `scorer`."""

    def check(checkpoints: List[Checkpoint]) -> Tuple[str, List[str]]:
        lines, flags = [], []
        for c in checkpoints:
            alpha, name = picked(c, by), scorer_of(c, scorer)
            flags.append(better(c.test(alpha), c.test(0.0), name) is True)
            lines.append(f"{c.title}: alpha {alpha:g} against alpha 0: {compared(c.test(alpha), c.test(0.0), name)}")
        return verdict(flags, [c.title for c in checkpoints]), lines

    return check


def gap_text(closed: float) -> str:
    """What ExPO did to the gap between a checkpoint and full DPO (closed: the share gained)."""
    if closed < 0:
        return f"widens the gap to full DPO by {-closed:.0%} of it"
    if closed > 1:
        return f"closes the gap to full DPO and passes it by {closed - 1:.0%} of the gap"
    return f"closes {closed:.0%} of the gap to full DPO"


def rivals_full(by: str, scorer: str):
    """A claim check: some partially trained checkpoint + ExPO is no worse than full DPO on `scorer`."""

    def check(checkpoints: List[Checkpoint]) -> Tuple[str, List[str]]:
        full = max(checkpoints, key=lambda c: c.fraction)
        lines, flags, names = [], [], []
        for c in checkpoints:
            if c is full:
                continue
            names.append(c.title)
            alpha = picked(c, by)
            flags.append(better(c.test(alpha), full.test(0.0), scorer) is not False)
            lines.append(
                f"{c.title} + ExPO (alpha {alpha:g}) against {full.title}: "
                f"{compared(c.test(alpha), full.test(0.0), scorer)}"
            )
            gap = full.test(0.0).score(scorer) - c.test(0.0).score(scorer)
            if gap > 0:
                lines[-1] += "; " + gap_text((c.test(alpha).score(scorer) - c.test(0.0).score(scorer)) / gap)
        return verdict(flags, names), lines

    return check


def claim_reward_hacking(checkpoints: List[Checkpoint]) -> Tuple[str, List[str]]:
    """The learned reward model is optimized against: its alpha wins by itself, loses by the ground truth."""
    lines, flags = [], []
    for c in checkpoints:
        larger = c.alpha_rm > c.alpha_gt
        hurt = larger and better(c.test(c.alpha_rm), c.test(c.alpha_gt), GROUND_TRUTH) is False
        flags.append(hurt)
        lines.append(
            f"{c.title}: the reward model chose alpha {c.alpha_rm:g}, the ground truth {c.alpha_gt:g}"
            + (
                f"; on test prompts the reward model's choice is "
                f"{compared(c.test(c.alpha_rm), c.test(c.alpha_gt), GROUND_TRUTH)} by the ground truth."
                if larger
                else "."
            )
        )
        lines += [f"  sweep warning: {flag}" for flag in c.flags]
    return ("seen" if any(flags) else "not seen"), lines


CLAIMS = (
    ("The reward model's score rises with alpha, then falls (paper, Figure 4)", claim_rise_and_collapse),
    ("The optimal alpha shrinks as DPO trains longer (paper: 8, 2.5, 0.5, 0.3)", claim_alpha_shrinks),
    (
        "ExPO with the reward model's alpha raises every checkpoint's reward (paper, Table 2: the selection metric)",
        improves("rm", REWARD_MODEL),
    ),
    (
        "ExPO with the reward model's alpha improves every checkpoint by the ground truth "
        "(paper, Table 2: AlpacaEval, an independent judge)",
        improves("rm", GROUND_TRUTH),
    ),
    (
        "ExPO with the ground truth's alpha (an oracle) improves every checkpoint by the ground truth",
        improves("gt", GROUND_TRUTH),
    ),
    (
        "A partially trained checkpoint + ExPO (reward model's alpha) matches full DPO by the ground truth "
        "(paper: 20% + ExPO beats full DPO)",
        rivals_full("rm", GROUND_TRUTH),
    ),
    (
        "A partially trained checkpoint + ExPO (ground truth's alpha) matches full DPO by the ground truth",
        rivals_full("gt", GROUND_TRUTH),
    ),
    (
        "Reward hacking: the reward model's alpha is larger and worse by the ground truth",
        claim_reward_hacking,
    ),
)


def claims(checkpoints: List[Checkpoint]) -> List[dict]:
    return [
        {"claim": title, "verdict": result[0], "details": result[1]}
        for title, check in CLAIMS
        for result in [check(checkpoints)]
    ]


# -- choosing alpha, over seeds ----------------------------------------------------------

def tally(rule: str, checkpoints: List[Checkpoint]) -> dict:
    """How often `rule`'s alpha fell clearly below alpha 0, how often it came within one
    standard error of the oracle's, and how far below the oracle it was on average."""
    below, within, shortfalls, misses = 0, 0, [], []
    for c in checkpoints:
        pick = c.test(c.alphas[rule])
        if better(pick, c.test(0.0), GROUND_TRUTH) is False:
            below += 1
        shortfall, stderr = difference(c.test(c.alpha_gt), pick, GROUND_TRUTH)
        if shortfall <= stderr:
            within += 1
        else:
            misses.append(f"seed {c.seed}, {c.title}: alpha {c.alphas[rule]:g}, {shortfall:.2f} below the oracle's alpha {c.alpha_gt:g} (± {stderr:.2f})")
        shortfalls.append(shortfall)
    return {
        "cases": len(shortfalls),
        "below_alpha_0": below,
        "within_one_se_of_oracle": within,
        "mean_shortfall": sum(shortfalls) / len(shortfalls),
        "misses": misses,
    }


def rule_outcomes(runs: List[List[Checkpoint]]) -> Dict[str, dict]:
    """Per rule, by the ground truth on the test prompts, the `tally` over every seed and
    checkpoint and, in `by_seed`, each seed's: the spread from one training run to the next,
    which is also about what a run with other library versions or CPU kernels differs by."""
    outcomes = {}
    for rule in TALLIED:
        outcomes[rule] = tally(rule, [c for checkpoints in runs for c in checkpoints])
        outcomes[rule]["by_seed"] = {
            str(checkpoints[0].seed): {k: v for k, v in tally(rule, checkpoints).items() if k != "misses"}
            for checkpoints in runs
        }
    return outcomes


def goal_met(outcome: dict) -> bool:
    return (
        outcome["below_alpha_0"] == 0
        and outcome["within_one_se_of_oracle"] >= GOAL_WITHIN_SHARE * outcome["cases"] - 1e-9
        and outcome["mean_shortfall"] <= GOAL_MEAN_SHORTFALL
    )


def by_seed(outcome: dict, field: str, form: str = "{}") -> str:
    """' (3, 3, 2)': `field` per seed, when there is more than one."""
    seeds = outcome["by_seed"].values()
    return f" ({', '.join(form.format(seed[field]) for seed in seeds)})" if len(seeds) > 1 else ""


def evidence_rows(runs: List[List[Checkpoint]]) -> List[Dict[str, str]]:
    """One row per seed and checkpoint: the ground truth on test prompts at each rule's alpha."""
    rows = []
    for checkpoints in runs:
        for c in checkpoints:
            row = {
                "seed": str(c.seed),
                "checkpoint": c.title,
                "KL(theta1 || theta0)": f"{c.theta1_kl['mean']:.2f} ± {c.theta1_kl['stderr']:.2f}",
                "alpha 0": _truth(c, 0.0),
            }
            for rule in RULE_ORDER:
                row[rule] = f"{c.alphas[rule]:g}: {_truth(c, c.alphas[rule])}"
            rows.append(row)
    return rows


def _truth(c: Checkpoint, alpha: float) -> str:
    result = c.test(alpha)
    return f"{result.score(GROUND_TRUTH):.2f} ± {result.scores[GROUND_TRUTH].stderr:.2f}"


def evidence_lines(runs: List[List[Checkpoint]], outcomes: Dict[str, dict]) -> List[str]:
    seeds = ", ".join(str(checkpoints[0].seed) for checkpoints in runs)
    lines = [
        "## Choosing alpha: each rule against the ground truth, over seeds",
        "",
        f"Seeds {seeds}: each seed trains its own SFT model, reward models and DPO checkpoints and samples "
        "with its own stream. Every rule chooses on the dev prompts from the same sweep; each cell is "
        "`alpha: ground truth on the test prompts` (mean ± standard error). KL(theta1 || theta0): the "
        "checkpoint's KL from the SFT model in nats per response, as the sweep measures it for every "
        "candidate: from plain samples (temperature 1, no top-k/top-p, no penalties) on 128 dev prompts, "
        "since the paper's sampling settings draw from another distribution. The rules:",
        "",
        *(f"- `{rule}`: {DESCRIPTIONS[rule]}" for rule in RULE_ORDER),
        f"- {SENSITIVITY_NOTE} (tallied below)",
        "",
        markdown_table(evidence_rows(runs)),
        f"Goal for the default: never below alpha 0 by more than noise ({SIGNIFICANCE:g} standard errors of "
        f"the difference), within one standard error (of the difference) of the oracle in at least "
        f"{GOAL_WITHIN_SHARE:.0%} of the cases, and short of the oracle by at most {GOAL_MEAN_SHORTFALL:g} on average.",
        "",
        *(
            [f"In parentheses: seeds {seeds} one by one, the spread from one training run to the next.", ""]
            if len(runs) > 1
            else []
        ),
        *outcome_table(outcomes),
    ]
    default = outcomes[DEFAULT]
    lines += ["", f"The default `{DEFAULT}` {'meets' if goal_met(default) else 'does not meet'} the goal here."]
    lines += [f"- missed: {miss}" for miss in default["misses"]]
    return [*lines, ""]


# -- plots -----------------------------------------------------------------------------


def figure(checkpoints: List[Checkpoint], sft_dev: CandidateResult, panels):
    """One panel per (value, label[, y limits]); a line per checkpoint over alpha, dev prompts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (value, label, *limits) in zip(axes, panels):
        for c in checkpoints:
            curve = c.dev_curve()
            xs, ys = [r.alpha for r in curve], [value(r) for r in curve]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=c.title)
            for alpha, marker, size in ((c.alpha_rm, "*", 180), (c.alpha_default, "s", 70), (c.alpha_gt, "D", 60)):
                chosen = next(r for r in curve if r.alpha == alpha)
                ax.scatter([alpha], [value(chosen)], marker=marker, s=size, color=line.get_color(), zorder=3)
        ax.axhline(value(sft_dev), color="grey", linestyle=":", label="SFT")
        ax.set_xscale("symlog", linthresh=1.0)
        alphas = sorted({r.alpha for c in checkpoints for r in c.dev_curve()})
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas], fontsize="small")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        if limits:
            ax.set_ylim(*limits[0])
    axes[0].scatter([], [], marker="*", s=120, color="black", label="alpha chosen by reward model (paper)")
    axes[0].scatter([], [], marker="s", s=50, color="black", label=f"alpha chosen by {DEFAULT} (default)")
    axes[0].scatter([], [], marker="D", s=40, color="black", label="alpha chosen by ground truth")
    axes[0].legend(fontsize="small")
    fig.suptitle("ExPO on DPO checkpoints (dev prompts)")
    return fig


def write_plots(layout: Layout, checkpoints: List[Checkpoint], sft_dev: CandidateResult) -> List[str]:
    rm = checkpoints[0].reward_model
    figures = {
        "reward_vs_alpha.png": [
            (lambda r: r.score(rm), "reward model mean"),
            (lambda r: r.score(GROUND_TRUTH), "ground truth mean"),
        ],
        "length_vs_alpha.png": [
            (lambda r: r.mean_tokens, "mean response tokens"),
            (lambda r: r.length_cut_share, "share of responses that never end", (-0.02, 1.02)),
        ],
    }
    layout.plots.mkdir(parents=True, exist_ok=True)
    for name, panels in figures.items():
        fig = figure(checkpoints, sft_dev, panels)
        write_atomic(layout.plots / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
    return list(figures)


# -- the report ------------------------------------------------------------------------


def timing_lines(timings: Dict[str, dict]) -> List[str]:
    lines = ["| stage | wall s | CPU s | this run |", "|---|---|---|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {'reused' if t['reused'] else 'ran'} |")
    total = sum(t["wall_s"] for t in timings.values())
    lines.append(f"| total (when made) | {total:.1f} | {sum(t['cpu_s'] for t in timings.values()):.1f} | |")
    return lines


def environment_text(environment: Dict[str, str]) -> str:
    """'torch 2.13.0, ..., datasets 5.2.0, AVX2 CPU kernels, 1 thread' from `pipeline.environment()`."""
    libraries = ", ".join(f"{k} {v}" for k, v in environment.items() if k not in ("threads", "cpu_kernels"))
    threads = environment["threads"]
    return f"{libraries}, {environment['cpu_kernels']} CPU kernels, {threads} thread{'' if threads == '1' else 's'}"


def task_text(settings: DemoSettings) -> str:
    shape = task.SHAPES[settings.shape]
    low, high = shape.nouns
    if shape.aspects:
        sentences = (
            f"an opening `the NOUN is ADJECTIVE .` and then `its ASPECT is ADJECTIVE .` for "
            f"{', '.join(shape.aspects)}, in that order"
        )
    else:
        sentences = "one sentence `the NOUN is ADJECTIVE .` each"
    return (
        f"`{shape.verb}` {low}-{high} nouns: {sentences}; ground truth +1/0/-1 per positive/neutral/negative "
        "adjective, -1 per missing noun or aspect and per malformed, misplaced, repeated or off-topic sentence "
        f"(`{GROUND_TRUTH}`)"
    )


def setup_lines(settings: DemoSettings, layout: Layout, sampling, environment: Dict[str, str]) -> List[str]:
    pairs = sum(1 for _ in (layout.pairs / "preference.jsonl").open())
    reward_pairs = [sum(1 for _ in layout.reward_pairs(i).open()) for i in range(len(layout.reward_models))]
    width, layers, ffn = settings.model_size
    copy = (
        f", {settings.copy_examples} short `describe` ones mixed in, after a first epoch on "
        f"{settings.curriculum_examples} short ones (copying the prompt's nouns is learned from them)"
        if settings.curriculum_examples
        else ""
    )
    return [
        f"- Task ({settings.shape} answers): {task_text(settings)}.",
        f"- Model: llama, width {width}, {layers} layers, feed-forward {ffn}; word-level tokenizer "
        "with a chat template. Everything trained here with TRL, on CPU.",
        f"- SFT: {settings.sft_examples} examples{copy}, 1 epoch, lr {settings.sft_learning_rate:g}.",
        f"- Preference pairs: two SFT samples per prompt, labelled by the ground truth, ties dropped: {pairs}.",
        f"- Reward models a and b (TRL RewardTrainer, sequence classifiers, seeds {settings.seed} and "
        f"{settings.seed + 1}): {' and '.join(map(str, reward_pairs))} pairs, each from its own quarter of the "
        "preference pairs (no pair in common), plus well-formed answers against truncated, rambling, duplicated, "
        f"shuffled or reordered copies of themselves; 1 epoch, lr {settings.reward_learning_rate:g}. `a` is the "
        "reward model the single-scorer rules choose with.",
        f"- DPO (sigmoid loss, beta {settings.dpo_beta:g}, lr {settings.dpo_learning_rate:g}, batch "
        f"{settings.dpo_batch_size}) on {min(pairs, settings.dpo_pairs)} pairs, one epoch, saved at "
        + ", ".join(f"{f:.0%}" for f in settings.fractions) + ".",
        "- Sweep (`mergekit-expo sweep`'s code, the `expo` merge method): alphas 0, "
        + ", ".join(f"{a:g}" for a in settings.alphas)
        + f"; alpha chosen on {settings.dev_prompts} dev prompts; numbers below on {settings.test_prompts} "
        f"test prompts. Sampling as in the paper (temperature {sampling.temperature:g}, top-k {sampling.top_k}, "
        f"top-p {sampling.top_p:g}, presence penalty {sampling.presence_penalty:g}, frequency penalty "
        f"{sampling.frequency_penalty:g}, seed {sampling.seed}), at most {sampling.max_new_tokens} new tokens.",
        "- Reproducibility: every stage seeded, with deterministic kernels, on a fixed thread count. "
        f"These figures come back bit for bit with {environment_text(environment)}; other CPU kernels "
        "or library versions train slightly different models, whose figures can differ as much as one "
        "seed's from another's.",
    ]


def example_lines(c: Checkpoint) -> List[str]:
    """Responses to the first test prompts at alpha 0 and at the chosen alphas."""
    picked_by = {0.0: []}
    for alpha, who in ((c.alpha_rm, "reward model's"), (c.alpha_default, f"{DEFAULT}'s"), (c.alpha_gt, "ground truth's")):
        picked_by.setdefault(alpha, []).append(who)
    alphas = list(picked_by)
    picks = {a: f" ({' and '.join(names)} choice)" if names else "" for a, names in picked_by.items()}
    header = ["prompt", *(f"alpha {a:g}{picks[a]}" for a in alphas)]
    lines = [
        f"## Examples: {c.title}, test prompts",
        "",
        "Each cell: the response, then (reward model, ground truth).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    columns = [c.examples.get(f"{a:g}", []) for a in alphas]
    for row in zip(*columns):
        cells = [row[0]["prompt"]]
        for example in row:
            rm, gt = example["scores"][c.reward_model], example["scores"][GROUND_TRUTH]
            cells.append(f"{example['response'] or '(empty)'} ({rm:.2f}, {gt:g})")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def document(settings, checkpoints, layout, rows, claim_list, plots, timings, sampling, environment, evidence) -> str:
    parts = [
        f"# ExPO demo, {settings.shape} answers: the paper's controlled experiment (Table 2) in miniature",
        "",
        "Made by `mergekit-expo demo`. ExPO: theta2 = theta1 + alpha * (theta1 - theta0), theta0 the SFT "
        "model, theta1 a DPO checkpoint (arXiv 2404.16792).",
        "",
        *setup_lines(settings, layout, sampling, environment),
        "",
        f"## Results on the test prompts (seed {checkpoints[0].seed})",
        "",
        "`reward model`: mean score of reward model `a`, which chose alpha by the paper's rule "
        f"(its highest mean, as RM-Mistral-7B did in the paper) and by the sweep's default `{DEFAULT}`. `ground truth`: the task's true reward, which the paper cannot measure. "
        "`never ends`: share of responses cut at the token limit. `paper`: Table 2 (RM-Mistral-7B reward, "
        "optimal alpha), for the shape only: the scales differ. Mean ± standard error.",
        "",
        markdown_table(rows),
        *evidence,
        f"## The paper's claims at this scale (seed {checkpoints[0].seed})",
        "",
        f"Differences count when larger than {SIGNIFICANCE:g} standard errors.",
        "",
    ]
    for claim in claim_list:
        parts.append(f"- **{claim['claim']}: {claim['verdict']}.**")
        parts += [f"  - {line.strip()}" for line in claim["details"]]
    parts += ["", *example_lines(checkpoints[0]), "## Curves", ""]
    parts += [f"![{name}](plots/{name})" for name in plots]
    parts += [
        "",
        "## Files",
        "",
        "- Here the first seed's run; `seeds/<seed>/` holds each further seed's, laid out the same way.",
        "- `task/`: prompts (SFT, pair sampling, dev, test) and the tokenizer",
        "- `sft/`, `reward_models/a`, `reward_models/b`, `dpo/p10` ... `dpo/p100`: the trained models",
        "- `pairs/`: preference pairs (DPO) and reward-model pairs",
        "- `recipes/`: one `expo` recipe per checkpoint; `sweeps/<checkpoint>/`: each sweep's "
        "results, generations, plots and `best.yaml`",
        "- `summary.json`: this report's numbers",
        "",
        "## Stage timings",
        "",
        *timing_lines(timings),
        "",
    ]
    return "\n".join(parts)


def build(layout: Layout, summaries: List[dict]) -> Tuple[List[Checkpoint], CandidateResult, CandidateResult]:
    reward_models = [str(path) for path in layout.reward_models]
    checkpoints = [Checkpoint(s, reward_models) for s in summaries]
    first = checkpoints[0]
    return checkpoints, first.results[(None, "report")], first.results[(None, "select")]


def write(
    layouts: List[Layout],
    settings: DemoSettings,
    timings: Dict[str, dict],
    runs: List[List[dict]],
    sampling,
    environment: Dict[str, str],
) -> None:
    """report.md, summary.json and plots/ under the first seed's DIR, from every seed's
    sweep summaries (runs, in the order of layouts); the table, claims and plots are the
    first seed's, the evidence on choosing alpha spans them all.

    sampling: the first seed's sweep sampling settings (reported in the set-up section).
    environment: what else decides the figures bit for bit (`pipeline.environment`).
    """
    layout = layouts[0]
    checkpoints, sft_test, sft_dev = build(layout, runs[0])
    every_seed = [build(other, summaries)[0] for other, summaries in zip(layouts, runs)]
    rows = table_rows(checkpoints, sft_test)
    claim_list = claims(checkpoints)
    outcomes = rule_outcomes(every_seed)
    plots = write_plots(layout, checkpoints, sft_dev)
    summary = {
        "settings": settings.model_dump(mode="json"),
        "environment": environment,
        "table": rows,
        "claims": claim_list,
        "alphas": {c.name: c.alphas for c in checkpoints},
        "selection": {"rows": evidence_rows(every_seed), "outcomes": outcomes},
    }
    write_text(layout.summary, json.dumps(summary, indent=2) + "\n")
    evidence = evidence_lines(every_seed, outcomes)
    write_text(
        layout.report, document(
            settings, checkpoints, layout, rows, claim_list, plots, timings, sampling, environment, evidence
        ),
    )


def outcome_table(outcomes: Dict[str, dict]) -> List[str]:
    """Per rule: clearly below alpha 0, within one SE of the oracle, mean shortfall (per seed in parentheses)."""
    lines = [
        "| rule | clearly below alpha 0 | within one SE of the oracle | mean shortfall from the oracle |",
        "|---|---|---|---|",
    ]
    for rule in TALLIED:
        o = outcomes[rule]
        lines.append(
            f"| `{rule}` | {o['below_alpha_0']} of {o['cases']}{by_seed(o, 'below_alpha_0')} "
            f"| {o['within_one_se_of_oracle']} of {o['cases']}{by_seed(o, 'within_one_se_of_oracle')} "
            f"| {o['mean_shortfall']:.3f}{by_seed(o, 'mean_shortfall', '{:.3f}')} |"
        )
    return lines


def write_overview(out, summaries: Dict[str, dict]) -> None:
    """DIR/report.md and DIR/summary.json over the regimes: each one's evidence on choosing alpha,
    the KL of its checkpoints, and where its full report is."""
    from pathlib import Path

    out = Path(out)
    parts = [
        "# ExPO demo: choosing alpha with short answers and with long ones",
        "",
        "Made by `mergekit-expo demo`. Each regime trains its own SFT model, two reward models and DPO "
        "checkpoints, sweeps alpha with `mergekit-expo sweep`'s code, and measures every selection rule "
        "against the task's ground truth on held-out test prompts. The full reports: "
        + ", ".join(f"[{name}]({name}/report.md)" for name in summaries)
        + ".",
        "",
        "The rules:",
        "",
        *(f"- `{rule}`: {DESCRIPTIONS[rule]}" for rule in RULE_ORDER),
        f"- {SENSITIVITY_NOTE}",
        "",
    ]
    for name, summary in summaries.items():
        outcomes = summary["selection"]["outcomes"]
        rows = summary["selection"]["rows"]
        seeds = list(outcomes[DEFAULT]["by_seed"])
        parts += [
            f"## {name.capitalize()} answers (seeds {', '.join(seeds)})",
            "",
            "KL(theta1 || theta0) per checkpoint, nats per response: "
            + "; ".join(f"seed {row['seed']} {row['checkpoint'].removeprefix('DPO ').removesuffix(' of an epoch')} "
                        f"{row['KL(theta1 || theta0)']}" for row in rows)
            + ".",
            "",
            *(
                [f"In parentheses: seeds {', '.join(seeds)} one by one.", ""] if len(seeds) > 1 else []
            ),
            *outcome_table(outcomes),
            "",
            f"The default `{DEFAULT}` {'meets' if goal_met(outcomes[DEFAULT]) else 'does not meet'} the goal here "
            f"(never clearly below alpha 0, within one SE of the oracle in at least {GOAL_WITHIN_SHARE:.0%} of the "
            f"cases, a mean shortfall of at most {GOAL_MEAN_SHORTFALL:g}).",
            "",
        ]
    write_text(out / "report.md", "\n".join(parts))
    overview = {name: {"selection": summary["selection"], "settings": summary["settings"]} for name, summary in summaries.items()}
    write_text(out / "summary.json", json.dumps(overview, indent=2) + "\n")


def print_summary(summaries: Dict[str, dict], echo=print) -> None:
    """Per regime: the Table 2 analogue, the claims' verdicts, the rules against the ground truth
    and the stage timings, for the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    for name, summary in summaries.items():
        table = Table(title=f"ExPO demo, {name} answers: test prompts (cf. the paper's Table 2)")
        for column in summary["table"][0]:
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in summary["table"]:
            table.add_row(*row.values(), style=None if row["model"].startswith(" ") else "bold")
        console.print(table)
        for claim in summary["claims"]:
            echo(f"- {claim['claim']}: {claim['verdict']}")
        outcomes = summary["selection"]["outcomes"]
        seeds = list(next(iter(outcomes.values()))["by_seed"])
        spread = f" (in parentheses: seeds {', '.join(seeds)} one by one)" if len(seeds) > 1 else ""
        echo(f"Choosing alpha ({name} answers), by the ground truth on test prompts over every seed and checkpoint{spread}:")
        for rule, o in outcomes.items():
            echo(
                f"  {rule}: clearly below alpha 0 in {o['below_alpha_0']} of {o['cases']}{by_seed(o, 'below_alpha_0')}, "
                f"within one SE of the oracle in {o['within_one_se_of_oracle']} of {o['cases']}"
                f"{by_seed(o, 'within_one_se_of_oracle')}, mean shortfall {o['mean_shortfall']:.3f}"
                f"{by_seed(o, 'mean_shortfall', '{:.3f}')}"
            )
        echo("  KL(theta1 || theta0): " + ", ".join(f"{row['checkpoint'].removeprefix('DPO ').removesuffix(' of an epoch')} {row['KL(theta1 || theta0)']}" for row in summary["selection"]["rows"] if row["seed"] == seeds[0]))
        timings = summary.get("timings", {})
        ran = {stage: t for stage, t in timings.items() if not t["reused"]}
        echo(
            f"Stage timings, {name} (wall s): "
            + ", ".join(f"{stage} {t['wall_s']:.0f}{'' if stage in ran else ' (reused)'}" for stage, t in timings.items())
        )
    echo(f"Reproducible bit for bit with {environment_text(next(iter(summaries.values()))['environment'])}.")
