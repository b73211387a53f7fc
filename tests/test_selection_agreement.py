"""The agreement rule (the default before trust-region): scale-free at the paper's scale.

The paper-scale cases are built from the paper's own numbers (arXiv 2404.16792): Table 2's
RM-Mistral-7B rewards at alpha 0 and at the optimal alpha, and Table 6's UltraFeedback dev
rewards, each a gain that the paper's independent judge (AlpacaEval 2 with GPT-4) confirmed
for the Table 2 models. Table 5 reports judge win rates only, no rewards, so it gives no
reward curve to feed. RM-Mistral-7B's per-response spread on UltraFeedback is about 2.58 and its
pairwise accuracy about 0.79 (RewardBench); the first-order KL of the path is
(1 + alpha)^2 KL(theta1 || theta0), with KL(theta1 || theta0) from 1 to 20 nats.
"""

import math

import pytest
from test_search import candidate

from expo_eval.search import choose_alpha
from expo_eval.selection import Selection

RM_MISTRAL, FSFAIRX = "weqweasdas/RM-Mistral-7B", "sfairXC/FsfairX-LLaMA3-RM-v0.1"
SPREAD = 2.58  # RM-Mistral-7B's per-response standard deviation
ACCURACY = 0.79
PROMPTS = 805  # AlpacaEval's instructions

# (model, reward at alpha 0, reward at the optimal alpha, the optimal alpha)
TABLE_2 = [
    ("DPO 10% steps", 3.97, 6.57, 8.0),
    ("DPO 20% steps", 4.70, 6.95, 2.5),
    ("DPO 40% steps", 5.77, 6.75, 0.5),
    ("zephyr-7b-dpo-full", 6.16, 6.52, 0.3),
]
TABLE_6 = [
    ("Mistral SLiC-HF", 4.90, 5.16, 0.4),
    ("Mistral IPO", 4.97, 5.44, 0.5),
    ("Mistral R-DPO", 5.53, 5.73, 0.3),
    ("LLaMA-3 SLiC-HF", 4.06, 4.68, 0.5),
    ("LLaMA-3 CPO", 4.04, 4.75, 0.5),
    ("LLaMA-3 SimPO", 4.89, 5.21, 0.4),
]


def paper_curve(r0, r_best, alpha_best, kl_theta1, scale=1.0, growth=1.0, scorers=(RM_MISTRAL,), alphas=None):
    """alpha 0 and `alphas` (default: the grid up to the paper's optimum and one step past it),
    the reward rising linearly to the paper's optimum, as the paper's curves do before their
    peak, and flat past it; the first-order KL times `growth`. Every scorer sees the same gain,
    each in its own units (`scale` multiplies the second one's)."""
    if alphas is None:
        alphas = [alpha_best * k / 4 for k in range(1, 5)] + [alpha_best * 1.25]
    stderr = SPREAD / math.sqrt(PROMPTS)
    results = []
    for alpha in [0.0, *alphas]:
        reward = r0 + (r_best - r0) * min(alpha / alpha_best, 1.0)
        means = {name: reward * (scale if i else 1.0) for i, name in enumerate(scorers)}
        result = candidate(alpha, means, stderr=stderr).model_copy(update={"n": PROMPTS})
        result.scores.update({name: result.scores[name].model_copy(update={"stderr": stderr * (scale if i else 1.0)})
                              for i, name in enumerate(scorers)})
        kl = (1 + alpha) ** 2 * kl_theta1 * (growth if alpha else 1.0)
        results.append(result.model_copy(update={"kl": kl, "kl_stderr": 0.03 * kl}))
    return results


@pytest.mark.parametrize("kl_theta1", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("model, r0, r_best, alpha_best", TABLE_2 + TABLE_6)
def test_agreement_takes_the_papers_gains_at_any_kl(model, r0, r_best, alpha_best, kl_theta1):
    results = paper_curve(r0, r_best, alpha_best, kl_theta1)
    chosen = choose_alpha(results, Selection(RM_MISTRAL, "agreement", reward_accuracy=ACCURACY))
    assert chosen.alpha == alpha_best, (model, kl_theta1)


@pytest.mark.parametrize("model, r0, r_best, alpha_best", TABLE_2)
def test_kl_bound_refuses_them_where_answers_are_long(model, r0, r_best, alpha_best):
    """The previous default, on the same numbers at 5 nats: alpha 0 for every Table 2 model."""
    results = paper_curve(r0, r_best, alpha_best, 5.0)
    assert choose_alpha(results, Selection(RM_MISTRAL, "kl-bound", ACCURACY)).alpha == 0.0


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_two_reward_models_of_any_scale_agree_on_the_papers_gain(scale):
    """FsfairX beside RM-Mistral-7B: the scorers' units do not matter, each gain is in its own spread."""
    results = paper_curve(4.70, 6.95, 2.5, 10.0, scale=scale, scorers=(RM_MISTRAL, FSFAIRX))
    assert choose_alpha(results, Selection(RM_MISTRAL, "agreement", others=(FSFAIRX,))).alpha == 2.5


def test_a_kl_that_outgrows_first_order_stops_the_walk_at_any_scale():
    """The same Table 2 gain, but the step leaves the direction (KL 3x first order): not taken."""
    for kl_theta1 in (0.01, 1.0, 20.0):
        results = paper_curve(4.70, 6.95, 2.5, kl_theta1, growth=3.0)
        rule = Selection(RM_MISTRAL, "agreement")
        assert choose_alpha(results, rule).alpha == 0.0
        assert any("first-order" in note for note in rule.problems(results))


def hacked():
    """The first reward model keeps rising; the second, trained on other data, turns down at 2."""
    rows = [(0.0, 1.0, 1.0), (0.5, 1.2, 1.2), (1.0, 1.4, 1.35), (2.0, 1.7, 1.0), (4.0, 2.2, 0.2)]
    return [
        candidate(alpha, {"rm_a": a, "rm_b": b}).model_copy(update={"kl": 0.1 * (1 + alpha) ** 2, "kl_stderr": 0.001})
        for alpha, a, b in rows
    ]


def test_a_second_scorer_that_turns_down_stops_the_walk():
    results = hacked()
    assert choose_alpha(results, Selection("rm_a", "reward-max")).alpha == 4.0
    rule = Selection("rm_a", "agreement", others=("rm_b",))
    assert choose_alpha(results, rule).alpha == 1.0
    (stop,) = rule.problems(results)
    assert stop.startswith("agreement stopped at alpha=2: rm_b fell from 1.35 at alpha=1 to 1")


def test_one_scorer_is_named_with_what_it_gives_up():
    results = hacked()
    rule = Selection("rm_a", "agreement")
    assert choose_alpha(results, rule).alpha == 4.0  # on the first-order path, one scorer cannot tell
    assert any("one scorer (rm_a)" in note and "add a second reward model" in note for note in rule.problems(results))


def test_the_walk_stops_at_a_collapse_even_if_a_later_alpha_looks_healthy():
    results = hacked()
    results[2] = results[2].model_copy(update={"collapsed": True, "collapse_reasons": ["never ends"]})
    rule = Selection("rm_a", "agreement", others=("rm_b",))
    assert choose_alpha(results, rule).alpha == 0.5
    assert rule.problems(results)[0].startswith("agreement stopped at alpha=1: collapsed (never ends)")


def test_the_walk_goes_out_on_each_side_of_zero():
    """Interpolation (alpha < 0) and extrapolation are walked separately from theta1."""
    results = hacked() + [
        candidate(-0.5, {"rm_a": 0.9, "rm_b": 1.5}).model_copy(update={"kl": 0.025, "kl_stderr": 0.001})
    ]
    rule = Selection("rm_a", "agreement", others=("rm_b",))
    values = {r.alpha: r.selection_value for r in rule.annotate(results)}
    assert values[2.0] is None and values[4.0] is None and values[-0.5] is not None
    assert choose_alpha(results, rule).alpha == 1.0  # -0.5 loses rm_a: its worst gain is below 0


def test_theta1_without_a_kl_distance_turns_the_kl_test_off_and_says_so():
    """alpha 0's KL clearly below zero: nothing to compare a candidate's KL with. One scorer keeps
    alpha 0 (nothing else guards); two walk on their agreement alone, with a warning either way."""
    results = [r.model_copy(update={"kl": 1000.0 if r.alpha else -5.0, "kl_stderr": 0.1}) for r in hacked()]
    alone = Selection("rm_a", "agreement")
    assert choose_alpha(results, alone).alpha == 0.0
    assert any("kept alpha=0" in note and "below zero" in note for note in alone.problems(results))
    both = Selection("rm_a", "agreement", others=("rm_b",))
    assert choose_alpha(results, both).alpha == 1.0
    assert any("without its KL test" in note for note in both.problems(results))


def test_a_scorer_without_spread_is_left_out_and_named():
    """A constant scorer cannot say a candidate is better; it must not veto every alpha."""
    flat = [r.model_copy(update={"scores": {**r.scores, "const": r.scores["rm_a"].model_copy(update={"mean": 1.0, "stderr": 0.0})}})
            for r in hacked()]
    rule = Selection("rm_a", "agreement", others=("rm_b", "const"))
    assert choose_alpha(flat, rule).alpha == 1.0
    assert any(note.startswith("const had no spread") for note in rule.problems(flat))


def test_a_search_refines_around_alpha_zero_when_it_wins():
    """The search's own alphas need not hold alpha 0; the rule's choice may be it."""
    from expo_eval.search import bisection_points

    results = hacked()
    baseline, searched = results[0], results[4:]  # alpha 4 only, where rm_b has turned down
    rule = Selection("rm_a", "agreement", others=("rm_b",))
    assert bisection_points(searched, rule, baseline, min_step=0.1) == [2.0]


def test_a_config_naming_one_selector_as_before_still_loads(tmp_path):
    from expo_eval.config import SweepConfig

    config = SweepConfig(recipe=tmp_path / "r.yaml", out=tmp_path / "out", alphas=[0.5],
                         reward_models=["a", "b"], select_with="b")
    assert config.selectors == ["b"] and config.selection.scorers == ("b",)
    assert SweepConfig(recipe=tmp_path / "r.yaml", out=tmp_path / "out", alphas=[0.5],
                       reward_models=["a", "b"]).selection.scorers == ("a", "b")
