"""The selection rules the demo measures against its ground truth.

The sweep ships two (`expo_eval.selection`): kl-bound, its default, and the paper's
reward-max. The demo also measures two simple alternatives that were considered and
not kept, so the report shows why: DPO's own objective with its beta as the exchange
rate between reward-model units and nats, and the one-standard-error rule toward a
smaller alpha. The oracle is the ground truth's own choice on the same dev prompts.
"""

from typing import Dict, List

from expo_eval.records import CandidateResult
from expo_eval.search import choose_alpha
from expo_eval.selection import Selection

GROUND_TRUTH = "expo_eval.demo.task:ground_truth"  # the task's own scorer, as a sweep names it
DEFAULT = "kl-bound"
PAPER_RULE = "reward-max"
ORACLE = "oracle"

DESCRIPTIONS = {
    "kl-bound": "the sweep's default: reward less sigma_e * sqrt(2 KL) (accuracy 0.75)",
    "reward-max": "the paper's rule: the highest mean reward",
    "kl-penalty": "DPO's objective, reward - beta * KL, with the DPO beta",
    "one-se": "the smallest alpha within one standard error of the highest mean reward",
    "oracle": "the ground truth's own choice on the dev prompts",
}


def _eligible(dev: List[CandidateResult]) -> List[CandidateResult]:
    return sorted(
        (r for r in dev if r.split == "select" and r.alpha is not None and not r.collapsed), key=lambda r: r.alpha
    )


def kl_penalty(dev: List[CandidateResult], reward_model: str, beta: float) -> float:
    """argmax of mean reward - beta * KL: trusts the reward model's scale to be DPO's."""
    return max(_eligible(dev), key=lambda r: (r.score(reward_model) - beta * max(r.kl, 0.0), -r.alpha)).alpha


def one_standard_error(dev: List[CandidateResult], reward_model: str) -> float:
    """The smallest alpha whose mean reward is within one standard error of the best."""
    eligible = _eligible(dev)
    best = max(eligible, key=lambda r: r.score(reward_model))
    floor = best.score(reward_model) - best.scores[reward_model].stderr
    return next(r.alpha for r in eligible if r.score(reward_model) >= floor)


def choices(dev: List[CandidateResult], reward_model: str, dpo_beta: float) -> Dict[str, float]:
    """Every measured rule's alpha on the dev prompts, by rule name."""
    return {
        DEFAULT: choose_alpha(dev, Selection(reward_model, "kl-bound")).alpha,
        PAPER_RULE: choose_alpha(dev, Selection(reward_model, "reward-max")).alpha,
        "kl-penalty": kl_penalty(dev, reward_model, dpo_beta),
        "one-se": one_standard_error(dev, reward_model),
        ORACLE: choose_alpha(dev, Selection(GROUND_TRUTH, "reward-max")).alpha,
    }
