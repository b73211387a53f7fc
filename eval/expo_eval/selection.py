"""How a sweep chooses alpha: a named rule applied to the scorers' results.

`trust-region` (the default) rests on what ExPO is: one more step along theta1 - theta0, the
direction alignment already moved, taken on a model of the reward that is linear in alpha.
That model is only as good as the ground the step has covered, so the rule trusts it within a
region the size of the alignment step itself, and charges what it cannot explain:

- the region: to first order log pi_alpha - log pi_0 = (1 + alpha) (log pi_1 - log pi_0), so
  sqrt(KL(candidate || theta0)) is a distance that grows as (1 + alpha) sqrt(KL(theta1 || theta0)).
  A candidate is considered only while that distance is at most TRUST_RADIUS (1.5) times theta1's:
  half an alignment step beyond theta1 (KL at most 2.25x theta1's, its lower confidence bound
  against theta1's upper one). A ratio, so the same at 0.01 nats on short answers and 20 nats on
  long ones, where the KL measures length as much as change. Nor is a candidate considered that
  one scorer rates clearly (FALL_Z standard errors) below alpha = 0;
- the value: the scorers' mean standardized gain over alpha = 0 (each scorer's mean difference in
  units of its own per-response spread on theta1: reward models of any scale compare, independent
  errors average out) less kl-bound's worst-case error charge on the KL beyond first order only,
  sigma_e / sd * sqrt(2 * max(KL - (1 + alpha)^2 KL(theta1 || theta0), 0)), both KLs at their upper
  bounds: the part of the move that is not the step any more is where a reward model's errors can
  be exploited. That charge is in nats, as the Donsker-Varadhan bound is: zero along the
  first-order path at any scale, but a 10% faster growth at 20 nats is charged as 8 nats, and a
  candidate's estimate noisier than theta1's is charged its noise (more --kl-prompts narrow it).
  Charging only the lower bound's excess, or the excess as a share of first order, did worse in
  the demo's long-answer regime (the docs' "Choosing alpha" page has the figures).

What it gives up: gains beyond half a step more (alpha above about 0.5 at first order), which
under-trained checkpoints have (the paper's alpha 8 for DPO at 10% of an epoch). With one scorer
the same region holds; the sweep says so and suggests a second, independently trained scorer.

`agreement` walks out from alpha = 0 while every scorer keeps rising (none falls FALL_Z standard
errors below its best) and the KL grows at most KL_GROWTH times first order; it follows reward
models that are hacked together, and kept alpha 0 only because a biased KL estimate stopped it.
`reward-max` is the paper's rule: the highest mean reward, which a hacked reward model follows
off a cliff. `kl-bound` charges each candidate the most a reward model's errors could contribute
at its KL from theta0 (the Donsker-Varadhan bound):

    value = mean reward - sigma_e * sqrt(2 * KL(candidate || theta0))

safe, and blind to scale: sequence-level KL grows with answer length, so on 7B chat models
(nats to tens of nats) it keeps alpha 0. sigma_e follows from the reward model's pairwise
accuracy with Gaussian true rewards and errors: sigma_e = sd_scores * cos(pi * (accuracy - 1/2)).
KL is estimated from plain samples of each candidate: a rule charges its upper confidence bound
(`kl_distance`) and tests its lower one, so a distance the samples cannot tell from zero never
counts as zero.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

from expo_eval.records import CandidateResult
from mergekit_expo.errors import ExpoError

Rule = Literal["trust-region", "agreement", "kl-bound", "reward-max"]
RULES = ("trust-region", "agreement", "kl-bound", "reward-max")
DEFAULT_RULE: Rule = "trust-region"
DEFAULT_REWARD_ACCURACY = 0.75
# Standard errors in every confidence statement on a KL estimate: one this far below zero is not
# a distance (KL >= 0: the log-probabilities do not belong to the samples), and the distance
# charged is the estimate plus this many.
KL_Z = 2.0
# trust-region: how far from theta0 a candidate may be, as a multiple of theta1's distance
# sqrt(KL(theta1 || theta0)): 1.5 is half a step more. Of 1.5, 2 and 3 measured in the demo
# (3 seeds x 4 checkpoints x 2 regimes), 1.5 came nearest the oracle in both regimes; 2 and 3
# followed both reward models into a collapse at 7-30 nats.
TRUST_RADIUS = 1.5
# How much faster than the first-order (1 + alpha)^2 KL(theta1 || theta0) the KL may grow before
# the step is no longer along the direction alignment took: a factor, not a distance.
KL_GROWTH = 2.0
# A scorer has turned down when its mean is this many standard errors of the difference below
# its best on the way out from alpha = 0.
FALL_Z = 2.0


class SelectionError(ExpoError, ValueError):
    """The rule cannot choose from these results; the message says what to change."""


@dataclass(frozen=True)
class Selection:
    """The rule that chooses alpha; `scorer` is the reward model single-scorer rules use,
    `others` the further scorers `agreement` also asks; the reward model's accuracy (kl-bound);
    agreement's two tolerances (infinite: that test is off, as the demo's ablations need)."""

    scorer: str
    rule: Rule = DEFAULT_RULE
    reward_accuracy: float = DEFAULT_REWARD_ACCURACY
    others: Tuple[str, ...] = ()
    kl_growth: float = KL_GROWTH
    fall_z: float = FALL_Z
    radius: float = TRUST_RADIUS

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; the rules are {', '.join(RULES)}")
        accuracy = self.reward_accuracy
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0.5 <= accuracy <= 1:
            raise ValueError(f"reward_accuracy is a pairwise accuracy in [0.5, 1], got {self.reward_accuracy}")
        radius = self.radius
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 1 <= radius < math.inf:
            raise ValueError(f"radius is a finite multiple of theta1's distance, at least 1, got {self.radius!r}")

    @property
    def scorers(self) -> Tuple[str, ...]:
        """The scorers this rule reads."""
        many = self.rule in ("agreement", "trust-region")
        return tuple(dict.fromkeys((self.scorer, *self.others))) if many else (self.scorer,)

    def spread_scorers(self, baseline: CandidateResult) -> Tuple[str, ...]:
        """agreement's scorers that have a spread on alpha = 0 to measure gains in (all of them if
        none has: gains are then compared in the scorers' own units)."""
        spread_out = tuple(s for s in self.scorers if spread(baseline, s) > 0)
        return spread_out or self.scorers

    def error_sd(self, baseline: Optional[CandidateResult]) -> float:
        """sigma_e: the scorer's per-response spread on alpha = 0 (theta1), times the share
        of it that is error at the given pairwise accuracy."""
        if baseline is None:
            raise SelectionError(f"the {self.rule} rule needs alpha = 0 on the select prompts")
        return spread(baseline, self.scorer) * math.cos(math.pi * (self.reward_accuracy - 0.5))

    def value(self, result: CandidateResult, baseline: Optional[CandidateResult]) -> Optional[float]:
        """What the rule maximizes for one candidate (baseline: alpha = 0 on the same prompts);
        None for a candidate kl-bound cannot rate: its KL estimate is not a distance.
        For `agreement` the value is the mean standardized gain; whether the candidate is on
        the path at all is `path`'s to say."""
        mean = result.score(self.scorer)
        if self.rule == "reward-max":
            return mean
        if self.rule == "agreement":
            if baseline is None:
                raise SelectionError("choosing needs alpha = 0 on the select prompts")
            return standardized_gains(result, baseline, self.spread_scorers(baseline), statistics.fmean)
        if self.rule == "trust-region":
            return self._trusted_gain(result, baseline)
        distance = kl_distance(needs_kl(result, self.rule), baseline)
        if distance is None:
            return mean if result.alpha == 0 else None  # theta1 itself needs no distance to be chosen
        return mean - self.error_sd(baseline) * math.sqrt(2 * distance)

    def _trusted_gain(self, result: CandidateResult, baseline: Optional[CandidateResult]) -> Optional[float]:
        """trust-region's value: None outside the region (or where the KL cannot be placed)."""
        if baseline is None:
            raise SelectionError("choosing needs alpha = 0 on the select prompts")
        gain = standardized_gains(result, baseline, self.spread_scorers(baseline), statistics.fmean)
        if result.alpha == 0:
            return gain
        if result.collapsed or self.outside(result, baseline) is not None:
            return None
        distance, theta1 = kl_distance(result, baseline), kl_distance(baseline, baseline)
        excess = distance - (1 + result.alpha) ** 2 * theta1
        excess = excess if excess > 1e-9 * distance else 0.0  # on the first-order path up to rounding: none
        return gain - math.cos(math.pi * (self.reward_accuracy - 0.5)) * math.sqrt(2 * excess)

    def outside(self, result: CandidateResult, baseline: CandidateResult) -> Optional[str]:
        """Why a candidate lies outside trust-region's region (None: inside): its KL cannot be
        placed, it is too far from theta0, or a scorer rates it clearly below alpha = 0."""
        needs_kl(result, self.rule)
        problem = kl_problem(baseline, baseline) or kl_problem(result, baseline)
        if problem is not None:
            return problem
        theta1 = kl_distance(baseline, baseline)
        lower = result.kl - KL_Z * (result.kl_stderr or 0.0)
        if lower > self.radius ** 2 * theta1:
            return (f"KL(candidate || theta0) {result.kl:.3g} ± {result.kl_stderr or 0:.2g} is beyond {self.radius ** 2:g}x "
                    f"theta1's (at most {theta1:.3g} nats): further from theta0 than {self.radius:g} alignment steps")
        return stop_reason(result, {s: baseline for s in self.spread_scorers(baseline)}, baseline, math.inf, FALL_Z)

    def path(self, candidates: List[CandidateResult], baseline: Optional[CandidateResult]) -> Tuple[List[CandidateResult], List[str]]:
        """`agreement`'s walk out from alpha = 0 on each side: the candidates before the first that
        collapsed, had a scorer turn down, or grew its KL faster than first order; and why each
        side stopped."""
        if baseline is None:
            raise SelectionError(f"the {self.rule} rule needs alpha = 0 on the select prompts")
        needs_kl(baseline, self.rule)
        kept, stops = [baseline], []
        scorers = self.spread_scorers(baseline)
        growth = self.kl_growth
        unplaced = kl_problem(baseline, baseline)
        if unplaced is not None:  # no first-order KL to compare with
            if len(scorers) == 1:
                return kept, [f"{self.rule} kept alpha=0 ({unplaced}): with one scorer the KL test is all that guards"]
            growth = math.inf
            stops.append(f"{self.rule} ran without its KL test (alpha=0: {unplaced})")
        for side in (1, -1):
            best = {scorer: baseline for scorer in scorers}
            for result in sorted((r for r in candidates if r.alpha is not None and r.alpha * side > 0), key=lambda r: abs(r.alpha)):
                reason = stop_reason(needs_kl(result, self.rule), best, baseline, growth, self.fall_z)
                if reason is not None:
                    stops.append(f"{self.rule} stopped at {result.label}: {reason}")
                    break
                kept.append(result)
                best = {s: max(best[s], result, key=lambda r, s=s: r.score(s)) for s in scorers}
        return kept, stops

    def problems(self, results: List[CandidateResult]) -> List[str]:
        """Warnings where the rule could not do its job, or what it rests on: kl-bound's missing
        spread or unplaceable KL estimates, agreement's stops, trust-region's region, a single scorer."""
        baseline = baseline_of(results)
        if self.rule == "trust-region":
            if baseline is None:
                return []
            used = self.spread_scorers(baseline)
            notes = [
                f"{s} had no spread of scores on alpha=0 ({baseline.n} prompts), so trust-region left it out: "
                "it cannot say whether a candidate is better"
                for s in self.scorers
                if s not in used
            ]
            unplaced = kl_problem(needs_kl(baseline, self.rule), baseline)
            if unplaced is not None:
                notes.append(f"trust-region kept alpha=0: alpha=0's {unplaced}, so no candidate can be placed against it")
            else:
                if baseline.kl < KL_Z * (baseline.kl_stderr or 0.0):
                    notes.append(
                        f"alpha=0's KL {baseline.kl:.3g} ± {baseline.kl_stderr:.2g} cannot be told from zero, so the "
                        "region rests on its upper bound and is wider than it looks: give more --kl-prompts"
                    )
                select = sorted((r for r in results if r.split == "select" and r.alpha not in (None, 0)), key=lambda r: r.alpha)
                outside = [(r, why) for r in select for why in [self.outside(r, baseline)] if why is not None]
                notes += [f"trust-region left out {r.label}: {why}" for r, why in outside]
            if len(used) == 1:
                notes.append(
                    f"trust-region had one scorer ({used[0]}): within the region nothing checks it against another "
                    "reward model's view; add a second reward model trained on other data (--reward-model; with "
                    "--select-with, name it there too)"
                )
            return notes
        if self.rule == "agreement":
            select = [r for r in results if r.split == "select" and r.alpha is not None]
            if baseline is None:
                return []
            notes = [
                f"{s} had no spread of scores on alpha=0 ({baseline.n} prompts), so agreement left it out: "
                "it cannot say whether a candidate is better"
                for s in self.scorers
                if s not in self.spread_scorers(baseline)
            ]
            notes += self.path(select, baseline)[1]
            if len(self.spread_scorers(baseline)) == 1:
                notes.append(
                    f"agreement had one scorer ({self.scorer}): only the KL test guards against it being hacked along "
                    "the direction alignment took; add a second reward model trained on other data (--reward-model; "
                    "with --select-with, name it there too)"
                )
            return notes
        if self.rule != "kl-bound":
            return []
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
        """Copies of the results with `selection_value` set on the select-split alphas (None off
        agreement's path)."""
        baseline = baseline_of(results)
        select = [r for r in results if r.split == "select" and r.alpha is not None]
        on_path = {r.alpha for r in self.path(select, baseline)[0]} if self.rule == "agreement" else None
        return [
            r.model_copy(update={"selection_value": self.value(r, baseline) if on_path is None or r.alpha in on_path else None})
            if r.split == "select" and r.alpha is not None
            else r
            for r in results
        ]

    def best(self, candidates: List[CandidateResult], baseline: Optional[CandidateResult]) -> Optional[CandidateResult]:
        """The candidate `preference` ranks first by this rule's value; None when it rates none.
        Collapsed candidates are never chosen (and end agreement's walk)."""
        if self.rule == "agreement":
            candidates = self.path(candidates, baseline)[0]
        rated = [
            (value, r) for r in candidates if not r.collapsed for value in [self.value(r, baseline)] if value is not None
        ]
        return max(rated, key=lambda pair: preference(pair[0], pair[1].alpha), default=(None, None))[1]

    def describe(self) -> str:
        if self.rule == "trust-region":
            return (
                f"trust-region of {', '.join(self.scorers)} (candidates no further from theta0 than {self.radius:g}x "
                f"theta1's distance sqrt(KL) and no scorer {FALL_Z:g} SE below alpha 0; the highest mean standardized "
                "gain less the worst-case error charge on the KL beyond first order)"
            )
        if self.rule == "reward-max":
            return f"reward-max (the highest mean of {self.scorer})"
        if self.rule == "agreement":
            return (
                f"agreement of {', '.join(self.scorers)} (out from alpha 0 while no scorer falls more than {self.fall_z:g} SE "
                f"below its best and KL(candidate || theta0) stays within {self.kl_growth:g}x its first-order "
                "(1 + alpha)^2 KL(theta1 || theta0); then the highest mean standardized gain)"
            )
        return (
            f"kl-bound (the mean of {self.scorer} less sigma_e * sqrt(2 KL(candidate || theta0)), "
            f"KL at its upper confidence bound max(KL, 0) + {KL_Z:g} SE, "
            f"sigma_e for a pairwise accuracy of {self.reward_accuracy:g})"
        )


def spread(result: CandidateResult, scorer: str) -> float:
    """A scorer's per-response standard deviation on one candidate."""
    return result.scores[scorer].stderr * math.sqrt(result.n)


def needs_kl(result: CandidateResult, rule: str) -> CandidateResult:
    if result.kl is None:
        raise SelectionError(
            f"{result.label} has no KL estimate (log-probabilities missing); "
            f"the {rule} rule needs one, or choose with --select reward-max"
        )
    return result


def standardized_gains(
    result: CandidateResult, baseline: Optional[CandidateResult], scorers: Sequence[str], combine: Callable = min
) -> float:
    """The scorers' gains over alpha = 0, each in units of that scorer's per-response spread on
    alpha = 0 (a scorer with no spread counts in its own units), combined (min: the worst)."""
    if baseline is None:
        raise SelectionError("choosing needs alpha = 0 on the select prompts")
    return combine([(result.score(s) - baseline.score(s)) / (spread(baseline, s) or 1.0) for s in scorers])


def stop_reason(
    result: CandidateResult, best: Dict[str, CandidateResult], baseline: CandidateResult, growth: float, fall_z: float
) -> Optional[str]:
    """Why `agreement` goes no further than `result` (None: it may): a collapse, a KL estimate that
    cannot be placed (`kl_problem`), a scorer falling below its best so far (`best`, by scorer), or
    a KL above `growth` times first order."""
    if result.collapsed:
        return "collapsed (" + "; ".join(result.collapse_reasons) + ")"
    problem = kl_problem(result, baseline)
    if problem is not None:
        return problem
    for scorer, top in best.items():
        drop = top.score(scorer) - result.score(scorer)
        stderr = math.hypot(result.scores[scorer].stderr, top.scores[scorer].stderr)
        if drop > fall_z * stderr and drop > 0:
            return f"{scorer} fell from {top.score(scorer):.3g} at {top.label} to {result.score(scorer):.3g} ({drop / stderr if stderr else math.inf:.1f} SE)"
    theta1 = kl_distance(baseline, baseline)
    ratio = kl_growth(result, theta1)
    if ratio is not None and ratio > growth:
        expected = (1 + result.alpha) ** 2 * theta1
        times = f"{ratio:.1f}x" if math.isfinite(ratio) else "above"
        return (
            f"KL(candidate || theta0) {result.kl:.3g} ± {result.kl_stderr or 0:.2g} is {times} the first-order "
            f"(1 + alpha)^2 KL(theta1 || theta0) (at most {expected:.3g} nats)"
        )
    return None


def kl_growth(result: CandidateResult, theta1: Optional[float]) -> Optional[float]:
    """The candidate's KL from theta0 at its lower confidence bound, over the first-order
    (1 + alpha)^2 times theta1's at its upper bound; None where there is nothing to compare
    (no finite estimate, or both sides zero)."""
    kl, stderr = result.kl, result.kl_stderr or 0.0
    if theta1 is None or kl is None or not (math.isfinite(kl) and math.isfinite(stderr)):
        return None
    lower, expected = kl - KL_Z * stderr, (1 + result.alpha) ** 2 * theta1
    if lower <= 0:
        return 0.0
    return lower / expected if expected > 0 else math.inf


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
            f"{estimate} is below zero by more than {KL_Z:g} standard errors, which a KL never is: the "
            "log-probabilities do not belong to the samples they were taken on"
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
