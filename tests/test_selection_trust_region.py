"""The default rule, trust-region: the paper's gains at any KL, and no hacking beyond one more step.

The paper-scale cases are the paper's own numbers (arXiv 2404.16792), as in
test_selection_agreement.py: Table 2's and Table 6's RM-Mistral-7B rewards at alpha 0 and at
the paper's alpha, each a gain the paper's independent judge confirmed, on a sweep's grid
(0.1 to the paper's alpha and past it), the KL growing at first order from 1 to 20 nats.
"""

import math

import pytest
from test_search import candidate
from test_selection_agreement import ACCURACY, FSFAIRX, RM_MISTRAL, TABLE_2, TABLE_6, paper_curve

from expo_eval.search import choose_alpha
from expo_eval.selection import Selection

GRID = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)


def sweep(r0, r_best, alpha_best, kl_theta1, growth=1.0, scorers=(RM_MISTRAL,), scale=1.0):
    """Every grid alpha on the paper's curve (test_selection_agreement.paper_curve)."""
    return paper_curve(r0, r_best, alpha_best, kl_theta1, scale, growth, scorers, alphas=GRID)


@pytest.mark.parametrize("kl_theta1", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("model, r0, r_best, alpha_best", TABLE_2 + TABLE_6)
def test_the_default_takes_the_papers_gains_at_any_kl(model, r0, r_best, alpha_best, kl_theta1):
    """alpha > 0 with a gain wherever the judge confirmed one: the paper's alpha where it is half
    a step more or less, else the farthest grid alpha in the region (about 0.5, at first order)."""
    results = sweep(r0, r_best, alpha_best, kl_theta1)
    rule = Selection(RM_MISTRAL, reward_accuracy=ACCURACY)
    chosen = choose_alpha(results, rule)
    reaches = min(a for a in GRID if a >= alpha_best)  # the first grid alpha at the paper's reward
    assert chosen.alpha == (reaches if alpha_best <= 0.5 else 0.5), (model, kl_theta1)
    assert chosen.score(RM_MISTRAL) > r0
    if alpha_best > 0.5:  # what the region gives up, named
        assert any(note.startswith("trust-region left out alpha=1:") for note in rule.problems(results))


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_two_reward_models_of_any_scale_give_the_same_choice(scale):
    results = sweep(4.70, 6.95, 2.5, 10.0, scorers=(RM_MISTRAL, FSFAIRX), scale=scale)
    assert choose_alpha(results, Selection(RM_MISTRAL, others=(FSFAIRX,))).alpha == 0.5


def test_a_kl_that_outgrows_first_order_is_charged_at_any_scale():
    """The same Table 2 gain, but the move leaves the direction (KL 3x first order): not taken."""
    for kl_theta1 in (0.01, 1.0, 20.0):
        results = sweep(4.70, 6.95, 2.5, kl_theta1, growth=3.0)
        rule = Selection(RM_MISTRAL, reward_accuracy=ACCURACY)
        assert choose_alpha(results, rule).alpha == 0.0, kl_theta1
        assert any("beyond 2.25x theta1's" in note for note in rule.problems(results))


def test_reward_models_hacked_together_are_not_followed_past_the_region():
    """The demo's short answers: both reward models keep rising to alpha 8 while the KL grows
    slower than first order; only the region stops them."""
    rows = [(0.0, 1.0, 1.0, 0.05), (0.5, 1.1, 1.05, 0.08), (1.0, 1.2, 1.1, 0.11), (2.0, 1.3, 1.15, 0.4),
            (4.0, 1.5, 1.2, 0.6), (8.0, 1.9, 1.3, 1.8)]  # first order: 0.05 (1 + alpha)^2, 4.05 at 8
    results = [candidate(a, {"rm_a": x, "rm_b": y}).model_copy(update={"kl": kl, "kl_stderr": 0.1 * kl})
               for a, x, y, kl in rows]
    assert choose_alpha(results, Selection("rm_a", "reward-max")).alpha == 8.0
    rule = Selection("rm_a", others=("rm_b",))
    assert choose_alpha(results, rule).alpha == 1.0
    assert [n.split(":")[0] for n in rule.problems(results)] == [
        "trust-region left out alpha=2", "trust-region left out alpha=4", "trust-region left out alpha=8"]


def test_one_scorer_is_told_what_it_gives_up_and_a_theta1_without_distance_keeps_alpha_zero():
    results = sweep(4.70, 6.95, 2.5, 1.0)
    rule = Selection(RM_MISTRAL)
    assert any("one scorer" in note and "add a second reward model" in note for note in rule.problems(results))
    unplaced = [r.model_copy(update={"kl": -5.0, "kl_stderr": 0.1}) if r.alpha == 0 else r for r in results]
    assert choose_alpha(unplaced, rule).alpha == 0.0
    assert any("below zero" in note for note in rule.problems(unplaced))


def test_a_candidate_one_scorer_rates_clearly_below_alpha_zero_is_left_out():
    """rm_b's rise does not buy rm_a's clear fall: the mean gain would take alpha 0.5, whatever
    the order the scorers are named in."""
    rows = [(0.0, 1.0, 1.0), (0.25, 1.01, 1.1), (0.5, 0.2, 3.5)]  # rm_a falls 8 SE at 0.5
    results = [candidate(a, {"rm_a": x, "rm_b": y}).model_copy(update={"kl": 0.1 * (1 + a) ** 2, "kl_stderr": 0.001})
               for a, x, y in rows]
    for first, other in (("rm_a", "rm_b"), ("rm_b", "rm_a")):
        rule = Selection(first, others=(other,))
        assert choose_alpha(results, rule).alpha == 0.25
        assert any(note.startswith("trust-region left out alpha=0.5: rm_a fell") for note in rule.problems(results))


def test_standardizing_decides_between_scorers_of_other_scales():
    """rm_b, in units 1000x rm_a's, falls by a tenth of its spread where rm_a rises by one spread:
    in raw units rm_b's fall would outweigh everything; standardized, alpha 0.5 gains."""
    def at(alpha, a, b):
        result = candidate(alpha, {"rm_a": a, "rm_b": b}).model_copy(update={"kl": 0.1 * (1 + alpha) ** 2, "kl_stderr": 0.001})
        result.scores["rm_b"] = result.scores["rm_b"].model_copy(update={"stderr": 1000 * result.scores["rm_a"].stderr})
        return result

    spread_a = candidate(0.0, {"x": 0}).scores["x"].stderr * math.sqrt(candidate(0.0, {"x": 0}).n)
    results = [at(0.0, 1.0, 5000.0), at(0.5, 1.0 + spread_a, 5000.0 - 0.1 * 1000 * spread_a)]
    assert choose_alpha(results, Selection("rm_a", others=("rm_b",))).alpha == 0.5
    assert choose_alpha(results, Selection("rm_b", others=("rm_a",))).alpha == 0.5


def test_what_the_rule_could_not_use_is_said_once():
    results = sweep(4.70, 6.95, 2.5, 1.0, scorers=(RM_MISTRAL, FSFAIRX))
    flat = [r.model_copy(update={"scores": {**r.scores, FSFAIRX: r.scores[FSFAIRX].model_copy(update={"stderr": 0.0})}})
            if r.alpha == 0 else r for r in results]
    notes = Selection(FSFAIRX, others=(RM_MISTRAL,)).problems(flat)
    assert any(note.startswith(f"{FSFAIRX} had no spread") for note in notes)
    assert any(f"one scorer ({RM_MISTRAL})" in note for note in notes)  # the one it used, not the one named first
    unplaced = [r.model_copy(update={"kl": -5.0, "kl_stderr": 0.1}) if r.alpha == 0 else r for r in results]
    notes = Selection(RM_MISTRAL, others=(FSFAIRX,)).problems(unplaced)
    assert [n for n in notes if "alpha=0's" in n] == [n for n in notes if n.startswith("trust-region kept alpha=0")]
    assert not any(n.startswith("trust-region left out") for n in notes)  # not blamed on each candidate
    noisy = [r.model_copy(update={"kl": 1.0, "kl_stderr": 100.0}) if r.alpha == 0 else r for r in results]
    assert any("cannot be told from zero" in n for n in Selection(RM_MISTRAL).problems(noisy))


@pytest.mark.parametrize("radius", [0.5, -2, math.nan, math.inf, "2", True])
def test_a_radius_that_is_no_region_is_refused(radius):
    with pytest.raises(ValueError, match="radius"):
        Selection(RM_MISTRAL, radius=radius)
