"""How a sweep chooses alpha: a named rule applied to one scorer's results.

`reward-max` is the paper's rule: the highest mean reward. Past a point, extrapolation
raises a learned reward model's score while true quality falls (reward hacking; the
demo shows it on its under-trained checkpoints), so the default, `kl-bound`, charges
each candidate for how far it moved from theta0:

    value = mean reward - sigma_e * sqrt(2 * KL(candidate || theta0))

The reward model is r = r_true + e with an error e of standard deviation sigma_e per
response. A policy whose KL from the reference is D can raise the mean of e by at most
sigma_e * sqrt(2 D) (the Donsker-Varadhan bound, exact for Gaussian e), so the value is
a lower bound on the true gain: what the reward model reports, less the most its errors
could have contributed at that KL. It is read off the reward-KL curve and needs nothing
a user lacks: the scores, and the log-probabilities of the sampled responses under the
candidate and under theta0. KL is a sampled estimate, so the distance charged is its upper
confidence bound (`kl_distance`): a distance the samples cannot tell from zero is not zero.
sigma_e follows from the reward model's pairwise accuracy
with Gaussian true rewards and errors: accuracy = 1/2 + arctan(sd_true / sigma_e) / pi,
and sd_true^2 + sigma_e^2 is the variance of its scores, so
sigma_e = sd_scores * cos(pi * (accuracy - 1/2)). The default accuracy, 0.75, is about
what open 7B reward models reach on held-out preference pairs; set your own measured one.
"""

import math
from dataclasses import dataclass
from typing import List, Literal, Optional

from expo_eval.records import CandidateResult
from mergekit_expo.errors import ExpoError

Rule = Literal["kl-bound", "reward-max"]
RULES = ("kl-bound", "reward-max")
DEFAULT_REWARD_ACCURACY = 0.75
# Standard errors in every confidence statement on a KL estimate: one this far below zero is not
# a distance (KL >= 0; the responses sampled with temperature, top-k/top-p and penalties are not
# draws from the models scored), and the distance charged is the estimate plus this many.
KL_Z = 2.0


class SelectionError(ExpoError, ValueError):
    """The rule cannot choose from these results; the message says what to change."""


@dataclass(frozen=True)
class Selection:
    """The rule that chooses alpha, on which scorer, with the reward model's accuracy."""

    scorer: str
    rule: Rule = "kl-bound"
    reward_accuracy: float = DEFAULT_REWARD_ACCURACY

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; the rules are {', '.join(RULES)}")
        accuracy = self.reward_accuracy
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0.5 <= accuracy <= 1:
            raise ValueError(f"reward_accuracy is a pairwise accuracy in [0.5, 1], got {self.reward_accuracy}")

    def error_sd(self, baseline: Optional[CandidateResult]) -> float:
        """sigma_e: the scorer's per-response spread on alpha = 0 (theta1), times the share
        of it that is error at the given pairwise accuracy."""
        if baseline is None:
            raise SelectionError("the kl-bound rule needs alpha = 0 on the select prompts")
        spread = baseline.scores[self.scorer].stderr * math.sqrt(baseline.n)
        return spread * math.cos(math.pi * (self.reward_accuracy - 0.5))

    def value(self, result: CandidateResult, baseline: Optional[CandidateResult]) -> Optional[float]:
        """What the rule maximizes for one candidate (baseline: alpha = 0 on the same prompts);
        None for a candidate kl-bound cannot rate: its KL estimate is not a distance."""
        mean = result.score(self.scorer)
        if self.rule == "reward-max":
            return mean
        if result.kl is None:
            raise SelectionError(
                f"{result.label} has no KL estimate (log-probabilities missing); "
                "the kl-bound rule needs one, or choose with --select reward-max"
            )
        distance = kl_distance(result, baseline)
        if distance is None:
            return mean if result.alpha == 0 else None  # theta1 itself needs no distance to be chosen
        return mean - self.error_sd(baseline) * math.sqrt(2 * distance)

    def problems(self, results: List[CandidateResult]) -> List[str]:
        """Warnings where kl-bound could not do its job: no spread of scores to scale its penalty
        (it then chose as reward-max does), or candidates whose KL estimate is not a distance
        (each named, with why)."""
        if self.rule != "kl-bound":
            return []
        baseline = baseline_of(results)
        flat = [] if baseline is None or self.error_sd(baseline) > 0 else [
            f"kl-bound had no spread of {self.scorer}'s scores on alpha=0 ({baseline.n} prompts) to scale its "
            "KL penalty, so it chose as reward-max does: give more prompts"
        ]
        return flat + [
            f"{r.label}: {problem}; kl-bound did not consider it "
            "(it does not choose a candidate whose distance from theta0 it could not measure)"
            for r in results
            if r.split == "select" and r.alpha not in (None, 0) and r.kl is not None
            for problem in [kl_problem(r, baseline)]
            if problem is not None
        ]

    def annotate(self, results: List[CandidateResult]) -> List[CandidateResult]:
        """Copies of the results with `selection_value` set on the select-split alphas."""
        baseline = baseline_of(results)
        return [
            r.model_copy(update={"selection_value": self.value(r, baseline)})
            if r.split == "select" and r.alpha is not None
            else r
            for r in results
        ]

    def best(self, candidates: List[CandidateResult], baseline: Optional[CandidateResult]) -> Optional[CandidateResult]:
        """The candidate `preference` ranks first by this rule's value; None when it rates none."""
        rated = [(value, r) for r in candidates for value in [self.value(r, baseline)] if value is not None]
        return max(rated, key=lambda pair: preference(pair[0], pair[1].alpha), default=(None, None))[1]

    def describe(self) -> str:
        if self.rule == "reward-max":
            return f"reward-max (the highest mean of {self.scorer})"
        return (
            f"kl-bound (the mean of {self.scorer} less sigma_e * sqrt(2 KL(candidate || theta0)), "
            f"KL at its upper confidence bound max(KL, 0) + {KL_Z:g} SE, "
            f"sigma_e for a pairwise accuracy of {self.reward_accuracy:g})"
        )


def preference(value: float, alpha: float) -> tuple:
    """How every rule ranks candidates (a max key): the higher value; on a tie the alpha nearest 0
    (theta1, the model that was trained), and between alpha and -alpha the one that interpolates
    toward theta0 rather than extrapolating past theta1."""
    return (value, -abs(alpha), -alpha)


def kl_problem(result: CandidateResult, baseline: Optional[CandidateResult]) -> Optional[str]:
    """Why the result's KL estimate cannot stand for its distance from theta0; None when it can.

    Beside an estimate that is no number or is clearly below zero, one that cannot be told from
    zero and whose standard error exceeds theta1's whole distance from theta0 (alpha = 0's upper
    bound, on the same prompts) is left out: it cannot tell a candidate nearer theta0 than theta1
    is from one far beyond it. theta1 itself is never left out for noise.
    """
    kl, stderr = result.kl, result.kl_stderr or 0.0
    if kl is None:
        return "there is no KL estimate (log-probabilities missing)"
    estimate = f"the KL estimate {kl:.3g} ± {stderr:.2g}"
    if not (math.isfinite(kl) and math.isfinite(stderr)):
        return f"{estimate} is not a finite number"
    if kl + KL_Z * stderr < 0:
        return (
            f"{estimate} is below zero by more than {KL_Z:g} standard errors (the responses were sampled with "
            "temperature, top-k/top-p and penalties, the log-probabilities are the models' own)"
        )
    if result.alpha != 0 and kl < KL_Z * stderr:
        theta1 = (kl_distance(baseline, baseline) if baseline is not None else None) or 0.0
        if stderr > theta1:
            return (
                f"{estimate} cannot be told from zero and its standard error exceeds alpha=0's whole distance "
                f"from theta0 (at most {theta1:.2g} nats): too noisy to place it against theta1 (give more prompts)"
            )
    return None


def kl_distance(result: CandidateResult, baseline: Optional[CandidateResult]) -> Optional[float]:
    """The distance from theta0, in nats per response, that a KL-aware rule charges the candidate:
    the estimate's upper confidence bound max(KL, 0) + KL_Z * SE, so that a distance the samples
    cannot tell from zero never counts as zero. None where `kl_problem` names a reason."""
    if kl_problem(result, baseline) is not None:
        return None
    return max(result.kl, 0.0) + KL_Z * (result.kl_stderr or 0.0)


def baseline_of(results: List[CandidateResult]) -> Optional[CandidateResult]:
    """alpha = 0 on the select prompts: theta1, what every candidate is compared with."""
    return next((r for r in results if r.alpha == 0 and r.split == "select"), None)
