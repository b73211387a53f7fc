"""One candidate on one split, summarized: each scorer's mean, spread and win rate against
alpha 0, length and repetition, and its KL from theta0 (select prompts)."""

import statistics
from typing import List, Optional

from expo_eval.phases.kl import kl_stats
from expo_eval.records import CandidateResult, Generation, ScoreStats, Split
from expo_eval.search import repetition


def label(alpha: Optional[float]) -> str:
    """`sft`, or `alpha=0.3`: short where that is exact, the float's full repr where not,
    so two different alphas never share a label (or a generations file)."""
    if alpha is None:
        return "sft"
    short = f"{alpha:g}"
    return f"alpha={short if float(short) == alpha else repr(alpha)}"


def order(alpha: Optional[float]) -> float:
    """SFT (None) first, then alphas ascending."""
    return -2.0 if alpha is None else alpha


def summarize(
    alpha: Optional[float],
    split: Split,
    rows: List[Generation],
    baseline_rows: Optional[List[Generation]] = None,
    kl_rows: Optional[List[Generation]] = None,
) -> CandidateResult:
    baseline = {(r.prompt_id, r.split): r for r in baseline_rows or []}
    scores = {}
    for name in rows[0].scores:
        values = [r.scores[name] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        paired = [(r.scores[name], baseline[(r.prompt_id, split)].scores[name]) for r in rows if (r.prompt_id, split) in baseline]
        win_rate = (
            sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in paired) / len(paired) if paired else None
        )
        scores[name] = ScoreStats(
            mean=statistics.fmean(values),
            median=statistics.median(values),
            stderr=spread / len(values) ** 0.5,
            win_rate=win_rate,
        )
    return CandidateResult(
        alpha=alpha,
        label=label(alpha),
        split=split,
        n=len(rows),
        scores=scores,
        mean_tokens=statistics.fmean(r.tokens for r in rows),
        length_cut_share=sum(r.finish_reason == "length" for r in rows) / len(rows),
        repetition=statistics.fmean(repetition(r.response) for r in rows),
        **kl_stats(kl_rows or []),
    )
