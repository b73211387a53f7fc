"""The alpha search on synthetic reward curves; collapse marking; choice; hacking flags."""

import math

import pytest

from expo_eval.config import SearchConfig
from expo_eval.records import CandidateResult, ScoreStats
from expo_eval.search import (
    choose_alpha,
    coarse_grid,
    mark_collapse,
    repetition,
    reward_hacking_flags,
    search_alphas,
)
from expo_eval.selection import Selection

RM = "rm"
N = 100
PAPER = Selection(RM, "reward-max")


def candidate(alpha, means, split="select", stderr=0.05, cut=0.0, rep=0.02, tokens=100.0):
    """A CandidateResult with the given per-scorer means (a float means the selector only)."""
    means = means if isinstance(means, dict) else {RM: means}
    return CandidateResult(
        alpha=alpha,
        label="sft" if alpha is None else f"alpha={alpha:g}",
        split=split,
        n=N,
        scores={k: ScoreStats(mean=m, median=m, stderr=stderr) for k, m in means.items()},
        mean_tokens=tokens,
        length_cut_share=cut,
        repetition=rep,
    )


BASELINE = candidate(0.0, 1.0)


class Recorder:
    """An `evaluate` for search_alphas over a synthetic curve; remembers the order of calls."""

    def __init__(self, reward, collapse_at=math.inf):
        self.reward, self.collapse_at, self.calls = reward, collapse_at, []

    def __call__(self, alpha):
        self.calls.append(alpha)
        collapsed = alpha >= self.collapse_at
        result = candidate(alpha, self.reward(alpha), cut=0.9 if collapsed else 0.0)
        return mark_collapse(result, candidate(0.0, self.reward(0.0)), RM)


def peak_at(top):
    """Concave: 1 at alpha = 0, 2 at `top`, back to 1 at 2 * top."""
    return lambda alpha: 2.0 - (1.0 - alpha / top) ** 2


def test_finished_model_grid_finds_the_peak():
    """The paper's grid for fully trained models: 0.1..0.5 in 0.1 steps, then bisection."""
    config = SearchConfig(low=0.1, high=0.5, coarse_points=5, refine_rounds=2, min_step=0.05)
    evaluate = Recorder(peak_at(0.3))
    results = search_alphas(evaluate, config, PAPER, BASELINE)
    assert [r.alpha for r in results] == sorted(evaluate.calls)
    assert evaluate.calls[:5] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert choose_alpha(results, PAPER).alpha == pytest.approx(0.3, abs=config.min_step)


def test_under_trained_model_bisects_to_the_peak():
    """Appendix B, 20% of DPO steps: coarse points around 2 and 4, bisection lands on 2.5."""
    config = SearchConfig(low=1.0, high=4.0, coarse_points=4, refine_rounds=3, min_step=0.25)
    evaluate = Recorder(peak_at(2.5))
    results = search_alphas(evaluate, config, PAPER, BASELINE)
    assert choose_alpha(results, PAPER).alpha == pytest.approx(2.5, abs=config.min_step)
    alphas = sorted(evaluate.calls)
    assert min(b - a for a, b in zip(alphas, alphas[1:])) >= config.min_step - 1e-12
    assert len(set(evaluate.calls)) == len(evaluate.calls)


def test_no_alpha_beyond_a_collapsed_one_is_evaluated():
    config = SearchConfig(low=0.1, high=1.0, coarse_points=10, refine_rounds=3, min_step=0.05)
    evaluate = Recorder(lambda alpha: 1.0 + alpha, collapse_at=0.45)
    results = search_alphas(evaluate, config, PAPER, BASELINE)
    ceiling = math.inf
    for alpha in evaluate.calls:
        assert alpha < ceiling, f"{alpha} evaluated after alpha={ceiling} collapsed"
        if alpha >= evaluate.collapse_at:
            ceiling = min(ceiling, alpha)
    assert max(evaluate.calls) == 0.5  # the coarse walk stops at the first collapsed point
    assert {r.alpha for r in results if r.collapsed} == {0.45, 0.5}
    assert choose_alpha(results, PAPER).alpha == 0.4


def test_all_collapsed_stops_without_refinement():
    config = SearchConfig(low=0.1, high=0.5, coarse_points=5, refine_rounds=2)
    evaluate = Recorder(peak_at(0.3), collapse_at=0.0)
    assert [r.alpha for r in search_alphas(evaluate, config, PAPER, BASELINE)] == [0.1]


def test_coarse_grid_has_round_alphas():
    assert coarse_grid(SearchConfig(low=0.1, high=0.5, coarse_points=5)) == [
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
    ]


def test_search_range_must_be_positive():
    with pytest.raises(ValueError, match="0 < low < high"):
        search_alphas(Recorder(peak_at(0.3)), SearchConfig(low=0.0, high=0.5), PAPER, BASELINE)


def test_repetition():
    assert repetition("") == 0.0
    assert repetition("too short") == 0.0
    assert repetition("the cat sat on the mat and then it slept") == 0.0
    looping = " ".join(["the dog is nice"] * 25)
    assert repetition(looping) > 0.9
    assert repetition("The Dog is nice the dog is nice") == pytest.approx(1 / 5)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"cut": 0.3}, "length limit"),
        ({"rep": 0.5}, "repetition"),
        ({"means": 0.2}, "rm mean fell"),
    ],
)
def test_collapse_marking(changes, reason):
    base = dict(alpha=0.7, means=1.0)
    marked = mark_collapse(candidate(**{**base, **changes}), BASELINE, RM)
    assert marked.collapsed
    assert len(marked.collapse_reasons) == 1 and reason in marked.collapse_reasons[0]


def test_healthy_changes_are_not_collapse():
    # Per-response sd of the baseline is 0.05 * sqrt(100) = 0.5: a 0.4 drop is within it.
    for healthy in (
        candidate(0.3, 1.5, cut=0.2, rep=0.2, tokens=300.0),
        candidate(0.3, 0.6),
        BASELINE,
    ):
        marked = mark_collapse(healthy, BASELINE, RM)
        assert not marked.collapsed and marked.collapse_reasons == []


def test_reward_drop_needs_more_than_noise_on_few_prompts():
    """With 4 prompts the standard error, not the spread, sets how far the mean may fall."""
    few = BASELINE.model_copy(
        update={"n": 4, "scores": {RM: ScoreStats(mean=1.0, median=1.0, stderr=0.3)}}
    )
    noisy = candidate(0.3, 0.2, stderr=0.3).model_copy(update={"n": 4})
    assert not mark_collapse(noisy, few, RM).collapsed
    assert mark_collapse(candidate(0.3, -0.5, stderr=0.3), few, RM).collapsed


def test_mark_collapse_returns_a_copy_and_checks_splits():
    original = candidate(0.9, 1.0, cut=1.0)
    marked = mark_collapse(original, BASELINE, RM)
    assert marked.collapsed and not original.collapsed
    with pytest.raises(ValueError, match="same prompts"):
        mark_collapse(candidate(0.9, 1.0, split="report"), BASELINE, RM)


def test_choose_alpha_skips_collapsed_and_prefers_smaller_alpha_on_ties():
    results = [
        candidate(None, 5.0),
        BASELINE,
        candidate(0.2, 1.5),
        candidate(0.3, 1.5),
        candidate(0.4, 3.0).model_copy(update={"collapsed": True}),
        candidate(0.3, 9.0, split="report"),
    ]
    assert choose_alpha(results, PAPER).alpha == 0.2
    assert choose_alpha([BASELINE, candidate(0.2, 0.5)], PAPER).alpha == 0.0
    with pytest.raises(ValueError):
        choose_alpha([candidate(0.2, 1.0).model_copy(update={"collapsed": True})], PAPER)


def sweep(rm_gain, other_gain, split="report"):
    """alpha 0 and 0.5 on both splits; scores rise by the given gains at alpha = 0.5."""
    results = []
    for s in ("select", split):
        results += [
            candidate(0.0, {RM: 1.0, "other": 1.0}, split=s),
            candidate(0.5, {RM: 1.0 + rm_gain, "other": 1.0 + other_gain}, split=s),
        ]
    return results


def test_hacking_flag_fires_when_the_other_scorer_falls():
    results = sweep(rm_gain=0.5, other_gain=-0.4)
    chosen = choose_alpha(results, PAPER)
    flags = reward_hacking_flags(results, chosen, RM)
    assert len(flags) == 1
    assert "other falls" in flags[0] and "report split" in flags[0]


def test_hacking_flag_uses_the_select_split_without_a_report_split():
    results = sweep(rm_gain=0.5, other_gain=-0.4, split="select")
    flags = reward_hacking_flags(results, choose_alpha(results, PAPER), RM)
    assert len(flags) == 1 and "select split" in flags[0]


@pytest.mark.parametrize(
    "rm_gain, other_gain",
    [(0.5, 0.3), (0.5, -0.01), (-0.2, -0.4)],  # agreement; noise-sized fall; selector fell too
)
def test_no_hacking_flag_otherwise(rm_gain, other_gain):
    results = sweep(rm_gain, other_gain)
    chosen = next(r for r in results if r.alpha == 0.5 and r.split == "select")
    assert reward_hacking_flags(results, chosen, RM) == []


def test_no_hacking_flag_when_alpha_zero_is_chosen():
    results = sweep(rm_gain=-0.5, other_gain=-0.4)
    assert reward_hacking_flags(results, choose_alpha(results, PAPER), RM) == []
