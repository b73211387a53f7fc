"""The selection rules the demo measures against its ground truth.

The sweep ships four (`expo_eval.selection`): trust-region, its default; agreement, the one
before it; the paper's reward-max; kl-bound. The demo also measures the alternatives that were
considered for the default and not kept, so the report shows why: trust-region with one reward
model (what a user with a single scorer gets), the ensemble's worst case (Coste et al. 2023),
kl-bound charging only the KL beyond the first-order path, and DPO's own objective. The oracle
is the ground truth's own choice on the same dev prompts.
"""

import math
import statistics
from typing import Dict, List, Optional, Sequence

from expo_eval.records import CandidateResult
from expo_eval.search import choose_alpha
from expo_eval.selection import Selection, baseline_of, kl_distance, preference, standardized_gains

GROUND_TRUTH = "expo_eval.demo.task:ground_truth"  # the task's own scorer, as a sweep names it
DEFAULT = "trust-region"
PAPER_RULE = "reward-max"
ORACLE = "oracle"

DESCRIPTIONS = {
    "trust-region": "the sweep's default: within 1.5x theta1's distance sqrt(KL) from theta0, no reward model clearly below alpha 0, the highest mean standardized gain of both reward models less an error charge on the KL beyond first order",
    "trust-region, 1 RM": "the default given one reward model",
    "agreement": "the previous default: out from alpha 0 while both reward models rise and the KL grows at most 2x first order",
    "reward-max": "the paper's rule: the highest mean reward",
    "kl-bound": "reward less sigma_e * sqrt(2 KL) (accuracy 0.75)",
    "ensemble-min": "the highest worst standardized gain of the two reward models (Coste et al.)",
    "excess-kl": "one reward model less sigma_e * sqrt(2 (KL - (1 + alpha)^2 KL(theta1))), no region",
    "kl-penalty": "DPO's objective, reward - beta * KL, with the DPO beta",
    "oracle": "the ground truth's own choice on the dev prompts",
}
RULE_ORDER = tuple(DESCRIPTIONS)
# trust-region with other settings than its defaults (radius 1.5, the excess-KL charge): how much
# the choice rests on those. Tallied, not tabled per case.
SENSITIVITY = {
    "trust-region, radius 2": {"radius": 2.0},
    "trust-region, radius 3": {"radius": 3.0},
    "region only": {},  # no excess-KL charge: the region's highest mean standardized gain
}
SENSITIVITY_NOTE = (
    "`trust-region, radius 2`, `trust-region, radius 3`: the default with a larger region; "
    "`region only`: the default without its charge on the KL beyond first order"
)
TALLIED = RULE_ORDER + tuple(SENSITIVITY)


def _eligible(dev: List[CandidateResult]) -> List[CandidateResult]:
    return sorted(
        (r for r in dev if r.split == "select" and r.alpha is not None and not r.collapsed), key=lambda r: r.alpha
    )


def _argmax(dev: List[CandidateResult], value) -> float:
    rated = [(v, r) for r in _eligible(dev) for v in [value(r)] if v is not None]
    return max(rated, key=lambda pair: preference(pair[0], pair[1].alpha))[1].alpha


def kl_penalty(dev: List[CandidateResult], reward_model: str, beta: float) -> float:
    """argmax of mean reward - beta * KL: trusts the reward model's scale to be DPO's."""
    return _argmax(dev, lambda r: r.score(reward_model) - beta * max(r.kl, 0.0))


def ensemble_min(dev: List[CandidateResult], reward_models: Sequence[str]) -> float:
    """argmax of the worst standardized gain over the reward models, nothing else."""
    baseline = baseline_of(dev)
    return _argmax(dev, lambda r: standardized_gains(r, baseline, reward_models))


def excess_kl(dev: List[CandidateResult], reward_model: str) -> float:
    """kl-bound charging only the KL beyond the first-order (1 + alpha)^2 KL(theta1 || theta0)."""
    baseline = baseline_of(dev)
    rule = Selection(reward_model, "kl-bound")
    theta1 = kl_distance(baseline, baseline) or 0.0

    def value(r: CandidateResult) -> Optional[float]:
        distance = kl_distance(r, baseline)
        if distance is None:
            return r.score(reward_model) if r.alpha == 0 else None
        excess = max(distance - (1 + r.alpha) ** 2 * theta1, 0.0)
        return r.score(reward_model) - rule.error_sd(baseline) * math.sqrt(2 * excess)

    return _argmax(dev, value)


def region_only(dev: List[CandidateResult], reward_models: Sequence[str]) -> float:
    """trust-region without its excess-KL charge: the highest mean standardized gain in the region."""
    baseline = baseline_of(dev)
    rule = Selection(reward_models[0], "trust-region", others=tuple(reward_models[1:]))

    def value(r: CandidateResult) -> Optional[float]:
        if r.alpha != 0 and rule.outside(r, baseline) is not None:
            return None
        return standardized_gains(r, baseline, rule.spread_scorers(baseline), statistics.fmean)

    return _argmax(dev, value)


def choices(dev: List[CandidateResult], reward_models: Sequence[str], dpo_beta: float) -> Dict[str, float]:
    """Every measured rule's alpha on the dev prompts, by rule name."""
    first, others = reward_models[0], tuple(reward_models[1:])

    def chosen(selection: Selection) -> float:
        return choose_alpha(dev, selection).alpha

    return {
        DEFAULT: chosen(Selection(first, DEFAULT, others=others)),
        "trust-region, 1 RM": chosen(Selection(first, DEFAULT)),
        "agreement": chosen(Selection(first, "agreement", others=others)),
        PAPER_RULE: chosen(Selection(first, "reward-max")),
        "kl-bound": chosen(Selection(first, "kl-bound")),
        "ensemble-min": ensemble_min(dev, reward_models),
        "excess-kl": excess_kl(dev, first),
        "kl-penalty": kl_penalty(dev, first, dpo_beta),
        ORACLE: chosen(Selection(GROUND_TRUTH, "reward-max")),
        "trust-region, radius 2": chosen(Selection(first, DEFAULT, others=others, radius=2.0)),
        "trust-region, radius 3": chosen(Selection(first, DEFAULT, others=others, radius=3.0)),
        "region only": region_only(dev, reward_models),
    }
