"""Searching alpha: collapse detection, the paper's grid-then-bisect search, hacking flags.

Past its optimum ExPO does not degrade gently: the first-order approximation breaks,
reward drops sharply and responses get long, repetitive or never end (Zheng et al.,
arXiv 2404.16792). The search therefore never looks beyond a collapsed alpha, and the
choice is only among candidates that did not collapse.
"""

import math
from typing import Callable, Dict, List

from expo_eval.config import SearchConfig
from expo_eval.capability import LOWER_IS_BETTER
from expo_eval.judge import MIN_PARSED_SHARE
from expo_eval.records import CandidateResult, ScoreStats
from expo_eval.selection import DEFAULT_RULE, Selection, SelectionError, baseline_of

# Collapse thresholds, all relative to alpha = 0 (theta1) on the same prompts.
# A quarter of the prompts newly running into the length limit: the paper's "never emits
# EOS" failure, far outside sampling noise (a share's stderr on >= 100 prompts is <= 0.05).
CUT_SHARE_JUMP = 0.25
# Mean share of repeated word 4-grams: fluent prose repeats about 1% of its 4-grams (0.009 on
# this project's English reference text, measured once), a looping answer most; 0.2 more than theta1 is looping.
REPETITION_JUMP = 0.2
# The selector's mean falls by more than this many per-response standard deviations of
# theta1's scores: a standardized effect size, so independent of the reward model's scale
# (1.0 is a "large" effect by Cohen's convention) ...
REWARD_DROP_SD = 1.0
# ... and by more than this many standard errors of the difference, so that a handful of
# prompts cannot collapse a candidate on noise alone.
REWARD_DROP_Z = 3.0
# A reward-hacking flag needs the other scorer's fall to exceed one standard error of the
# difference: pure sampling noise does that 16% of the time, against 50% for any fall at all.
HACKING_DROP_Z = 1.0
# Grid points as a person writes them (0.3, not 0.30000000000000004): stable labels and cache keys.
ALPHA_DIGITS = 9
# Word n-gram length for `repetition`: long enough that ordinary phrasing rarely repeats.
REPETITION_NGRAM = 4


def repetition(text: str) -> float:
    """Share of the response's word 4-grams that repeat an earlier one, in [0, 1].

    Degenerate extrapolated models loop on a phrase; ordinary answers hardly repeat 4-grams.
    """
    words = text.lower().split()
    ngrams = [
        tuple(words[i : i + REPETITION_NGRAM]) for i in range(len(words) - REPETITION_NGRAM + 1)
    ]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def _stderr(stats: ScoreStats) -> float:
    return stats.stderr if math.isfinite(stats.stderr) else 0.0


def _difference_stderr(a: ScoreStats, b: ScoreStats) -> float:
    """Standard error of the difference of two means from independent samples."""
    return math.hypot(_stderr(a), _stderr(b))


def reward_drop_limit(
    candidate: CandidateResult, baseline: CandidateResult, selector: str
) -> float:
    """How far the selector's mean may fall below alpha = 0 before it counts as collapse.

    The per-response spread of theta1's scores is recovered from its stderr (sd / sqrt(n)).
    """
    base, cand = baseline.scores[selector], candidate.scores[selector]
    spread = _stderr(base) * math.sqrt(baseline.n)
    return max(REWARD_DROP_SD * spread, REWARD_DROP_Z * _difference_stderr(base, cand))


def collapse_reasons(
    candidate: CandidateResult, baseline: CandidateResult, selector: str
) -> List[str]:
    """Why the candidate looks collapsed next to alpha = 0; empty when it does not."""
    reasons = []
    if candidate.length_cut_share >= baseline.length_cut_share + CUT_SHARE_JUMP:
        reasons.append(
            f"{candidate.length_cut_share:.0%} of responses hit the length limit "
            f"(alpha=0: {baseline.length_cut_share:.0%})"
        )
    if candidate.repetition >= baseline.repetition + REPETITION_JUMP:
        reasons.append(
            f"repetition {candidate.repetition:.2f} (alpha=0: {baseline.repetition:.2f})"
        )
    drop = baseline.score(selector) - candidate.score(selector)
    limit = reward_drop_limit(candidate, baseline, selector)
    if drop > limit:
        reasons.append(
            f"{selector} mean fell from {baseline.score(selector):.3g} to "
            f"{candidate.score(selector):.3g} (more than {limit:.3g} below alpha=0)"
        )
    return reasons


def mark_collapse(
    candidate: CandidateResult, baseline: CandidateResult, selector: str
) -> CandidateResult:
    """A copy of `candidate` with `collapsed` and `collapse_reasons` set against alpha = 0."""
    if candidate.split != baseline.split:
        raise ValueError(
            f"compare candidates on the same prompts: {candidate.split} vs {baseline.split}"
        )
    reasons = collapse_reasons(candidate, baseline, selector)
    return candidate.model_copy(update={"collapsed": bool(reasons), "collapse_reasons": reasons})


def coarse_grid(config: SearchConfig) -> List[float]:
    """`coarse_points` alphas evenly spaced over [low, high]."""
    step = (config.high - config.low) / (config.coarse_points - 1)
    return [round(config.low + i * step, ALPHA_DIGITS) for i in range(config.coarse_points)]


def _collapse_ceiling(results: Dict[float, CandidateResult]) -> float:
    """The smallest collapsed alpha: nothing at or beyond it is worth sampling."""
    return min((alpha for alpha, r in results.items() if r.collapsed), default=math.inf)


def bisection_points(
    results: List[CandidateResult], selection: Selection, baseline: CandidateResult, min_step: float
) -> List[float]:
    """Midpoints between the best healthy alpha (by the selection rule) and its evaluated neighbours.

    A midpoint is proposed only when it lies at least `min_step` from both ends,
    so refinement stops by itself once the grid is fine enough.
    """
    if all(r.collapsed for r in results):
        return []
    with_baseline = results if any(r.alpha == 0 for r in results) else [baseline, *results]
    ordered = sorted(with_baseline, key=lambda r: r.alpha)
    alphas = [r.alpha for r in ordered]
    chosen = selection.best(ordered, baseline)  # it passes over collapsed candidates (agreement stops at them)
    if chosen is None:  # the rule rates none of them (their KL is no distance): nothing to refine around
        return []
    best = chosen.alpha
    index = alphas.index(best)
    neighbours = [alphas[i] for i in (index - 1, index + 1) if 0 <= i < len(alphas)]
    tolerance = min_step * 1e-9
    return [
        round((best + neighbour) / 2, ALPHA_DIGITS)
        for neighbour in neighbours
        if abs(neighbour - best) / 2 >= min_step - tolerance
    ]


def search_alphas(
    evaluate: Callable[[float], CandidateResult],
    config: SearchConfig,
    selection: Selection,
    baseline: CandidateResult,
) -> List[CandidateResult]:
    """The paper's Appendix B search: a coarse grid, then bisection around the best alpha.

    The grid is walked upwards and abandoned at the first collapsed alpha: larger
    ones only collapse harder and cost the most (every response runs to the length
    limit). `evaluate` returns results with collapse (and, for the kl-bound rule, KL)
    already marked; alpha = 0 is the sweep's (`baseline`), not the search's. Returns
    every evaluated result, by alpha (SearchConfig holds 0 < low < high).
    """
    results: Dict[float, CandidateResult] = {}
    for alpha in coarse_grid(config):
        results[alpha] = evaluate(alpha)
        if results[alpha].collapsed:
            break
    for _ in range(config.refine_rounds):
        proposals = bisection_points(list(results.values()), selection, baseline, config.min_step)
        if not proposals:
            break
        for alpha in proposals:
            if alpha < _collapse_ceiling(results):
                results[alpha] = evaluate(alpha)
    return [results[alpha] for alpha in sorted(results)]


def choose_alpha(results: List[CandidateResult], selection: Selection) -> CandidateResult:
    """The select-split candidate the selection rule rates highest, among those that did not collapse.

    alpha = 0 (theta1 itself) competes, so a sweep where extrapolation does not help
    chooses theta1; the SFT model (alpha None) is a reference, never a choice.
    """
    select = [r for r in results if r.split == "select" and r.alpha is not None]
    if all(r.collapsed for r in select):
        raise SelectionError("no candidate on the select split is left after collapse detection")
    chosen = selection.best(select, baseline_of(results))
    if chosen is None:
        raise SelectionError(f"{selection.rule} rates no candidate on the select split: " + "; ".join(selection.problems(results)))
    return chosen


def reward_hacking_flags(
    results: List[CandidateResult], chosen: CandidateResult, selector: str
) -> List[str]:
    """Warnings where the chosen alpha pleases the selector but another scorer disagrees.

    The selector is being optimized against; a second scorer that falls while it rises
    is the sign of reward hacking (the tiny demo shows it). Compared on the held-out
    report split where there is one.
    """
    split = "report" if any(r.split == "report" for r in results) else "select"
    by_alpha = {r.alpha: r for r in results if r.split == split}
    base, pick = by_alpha.get(0.0), by_alpha.get(chosen.alpha)
    if base is None or pick is None:
        return []
    if pick.score(selector) <= base.score(selector):
        return []
    flags = []
    for scorer, stats in pick.scores.items():
        if scorer == selector or scorer not in base.scores:
            continue
        drop = base.score(scorer) - stats.mean
        stderr = _difference_stderr(base.scores[scorer], stats)
        if drop > HACKING_DROP_Z * stderr:
            flags.append(
                f"{selector} rises from {base.score(selector):.3g} at alpha=0 to "
                f"{pick.score(selector):.3g} at {pick.label} on the {split} split, but "
                f"{scorer} falls from {base.score(scorer):.3g} to {stats.mean:.3g} "
                f"({drop / stderr if stderr else math.inf:.1f} standard errors): "
                f"the choice may be reward hacking of {selector}"
            )
    return flags


def other_rule_flags(results: List[CandidateResult], chosen: CandidateResult, selection: Selection) -> List[str]:
    """A note when the paper's reward-max (or, when it chose, the default rule) would have chosen
    differently: the trade-off, in the open."""
    rule = DEFAULT_RULE if selection.rule == "reward-max" else "reward-max"
    other = Selection(selection.scorer, rule, selection.reward_accuracy, selection.others)
    try:
        alternative = choose_alpha(results, other)
    except SelectionError:
        return []
    if alternative.alpha == chosen.alpha:
        return []
    return [
        f"{other.rule} would choose {alternative.label} ({selection.scorer} mean {alternative.score(selection.scorer):.3g}, "
        f"KL {alternative.kl if alternative.kl is not None else float('nan'):.3g}) where {selection.rule} chose "
        f"{chosen.label} (mean {chosen.score(selection.scorer):.3g}, KL {chosen.kl if chosen.kl is not None else float('nan'):.3g})"
    ]


# The judge's win rate against alpha = 0 must fall below 50% by this many standard errors to warn.
JUDGE_LOSS_Z = 2.0


def judge_flags(results: List[CandidateResult], chosen: CandidateResult) -> List[str]:
    """A warning when the LLM judge prefers alpha = 0 to the chosen alpha on the same prompts."""
    judged = [r for r in results if r.alpha == chosen.alpha and r.judge is not None]
    flags = []
    for r in results:
        stats = r.judge
        if stats is not None and stats.unparsed > (1 - MIN_PARSED_SHARE) * (stats.n + stats.unparsed):
            flags.append(
                f"the judge {stats.judge} answered outside the template's format (m or M) on {stats.unparsed} of "
                f"{stats.n + stats.unparsed} prompts for {r.label}: its win rate rests on {stats.n}"
            )
    for r in judged:
        stats = r.judge
        if 50 - stats.win_rate > JUDGE_LOSS_Z * stats.win_rate_stderr:
            flags.append(
                f"the judge {stats.judge} prefers alpha=0 to the chosen {r.label} on the {r.split} prompts: "
                f"win rate {stats.win_rate:.1f}% ± {stats.win_rate_stderr:.1f} (length-controlled {stats.lc_win_rate:.1f}%)"
            )
    return flags


# A capability metric must fall by this many standard errors of the difference to warn.
CAPABILITY_DROP_Z = 2.0


def capability_flags(results: List[CandidateResult], chosen: CandidateResult) -> List[str]:
    """Warnings where the chosen alpha does worse than alpha = 0 on an lm-eval metric by more than
    CAPABILITY_DROP_Z standard errors of the difference; a metric without a stderr is not judged."""
    base = next((r for r in results if r.split == "select" and r.alpha == 0 and r.capability), None)
    if base is None or chosen.alpha == 0 or not chosen.capability:
        return []
    flags = []
    for task, metrics in chosen.capability.items():
        for metric, value in metrics.items():
            plain = metric.removesuffix(LOWER_IS_BETTER)
            if "_stderr" in plain or plain == "sample_len" or metric not in base.capability.get(task, {}):
                continue
            name, _, filter_name = plain.partition("/")
            stderr_key = f"{name}_stderr" + (f"/{filter_name}" if filter_name else "") + metric[len(plain):]
            if stderr_key not in metrics or stderr_key not in base.capability[task]:
                continue
            stderr = math.hypot(metrics[stderr_key], base.capability[task][stderr_key])
            worse = value - base.capability[task][metric] if metric.endswith(LOWER_IS_BETTER) else base.capability[task][metric] - value
            if worse > 0 and worse > CAPABILITY_DROP_Z * stderr:
                flags.append(
                    f"{task} {metric} goes from {base.capability[task][metric]:.3g} at alpha=0 to {value:.3g} at "
                    f"{chosen.label} (± {stderr:.2g}): extrapolation may cost this capability"
                )
    return flags
