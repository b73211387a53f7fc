"""Choosing alpha: the kl-bound rule (the default) against the paper's reward-max."""

import csv
import io
import json
import math

import pytest
import yaml
from conftest import expo_recipe, write_recipe
from test_search import BASELINE, Recorder, candidate
from test_sweep import config

from expo_eval.config import SearchConfig
from expo_eval.search import choose_alpha, other_rule_flags, search_alphas
from expo_eval.records import CandidateResult
from expo_eval.selection import Selection, SelectionError, kl_distance, preference
from expo_eval.sweep import Sweep

RM = "rm"
SD = BASELINE.scores[RM].stderr * math.sqrt(BASELINE.n)  # 0.5 per response


def with_kl(result, kl):
    return result.model_copy(update={"kl": kl})


def test_kl_bound_value_is_reward_less_the_error_bound():
    rule = Selection(RM, "kl-bound", reward_accuracy=0.75)
    assert rule.error_sd(BASELINE) == pytest.approx(SD * math.cos(math.pi / 4))
    result = with_kl(candidate(1.0, 1.4), kl=0.5)
    assert rule.value(result, BASELINE) == pytest.approx(1.4 - SD / math.sqrt(2) * math.sqrt(2 * 0.5))
    # a slightly negative sampled KL estimate is neither an imaginary distance nor zero: it counts
    # at its upper confidence bound, max(KL, 0) + 2 SE
    near_zero = candidate(1.0, 1.4).model_copy(update={"kl": -0.01, "kl_stderr": 0.01})
    measured = BASELINE.model_copy(update={"kl": 0.02, "kl_stderr": 0.01})
    assert rule.value(near_zero, measured) == pytest.approx(1.4 - SD / math.sqrt(2) * math.sqrt(2 * 0.02))


@pytest.mark.parametrize("accuracy, share", [(0.5, 1.0), (0.75, math.sqrt(0.5)), (1.0, 0.0)])
def test_error_scale_follows_the_reward_models_accuracy(accuracy, share):
    """A coin-flip reward model is all error; a perfect one has none (kl-bound is then reward-max)."""
    assert Selection(RM, "kl-bound", reward_accuracy=accuracy).error_sd(BASELINE) == pytest.approx(share * SD, abs=1e-12)


def curve():
    """Reward keeps rising with alpha while the KL from theta0 explodes: the hacked shape."""
    return [
        with_kl(BASELINE, 0.1),
        with_kl(candidate(0.5, 1.15), 0.15),
        with_kl(candidate(1.0, 1.25), 0.3),
        with_kl(candidate(4.0, 1.6), 6.0),
    ]


def test_kl_bound_stops_where_reward_only_buys_kl():
    results = curve()
    assert choose_alpha(results, Selection(RM, "reward-max")).alpha == 4.0
    kl_bound = Selection(RM, "kl-bound")
    values = {r.alpha: kl_bound.value(r, BASELINE) for r in results}
    assert choose_alpha(results, kl_bound).alpha == max(values, key=values.get) == 1.0
    assert choose_alpha(results, Selection(RM, "kl-bound", reward_accuracy=1.0)).alpha == 4.0


def test_kl_bound_chooses_alpha_zero_when_nothing_beats_it():
    results = [with_kl(BASELINE, 0.0), with_kl(candidate(1.0, 1.05), 2.0)]
    assert choose_alpha(results, Selection(RM, "kl-bound")).alpha == 0.0


def test_kl_bound_needs_kl_and_says_so():
    with pytest.raises(ValueError, match=r"alpha=1 has no KL estimate.*--select reward-max"):
        choose_alpha([with_kl(BASELINE, 0.0), candidate(1.0, 1.2)], Selection(RM, "kl-bound"))


def test_choosing_needs_alpha_zero():
    with pytest.raises(SelectionError, match="alpha = 0"):
        choose_alpha([with_kl(candidate(1.0, 1.2), 0.1)], Selection(RM, "kl-bound"))


def test_a_kl_estimate_that_is_not_a_distance_is_left_out_and_named():
    """Sampled with temperature and penalties, the log-probability gap can come out clearly below
    zero; such a candidate is not a cheap one, it is one the rule could not measure."""
    biased = candidate(8.0, 2.0).model_copy(update={"kl": -0.2, "kl_stderr": 0.03})
    noisy = candidate(0.5, 1.1).model_copy(update={"kl": -0.01, "kl_stderr": 0.02})  # zero within noise
    nan = candidate(2.0, 3.0).model_copy(update={"kl": float("nan"), "kl_stderr": 0.1})
    results = [BASELINE.model_copy(update={"kl": 0.05, "kl_stderr": 0.02}), biased, noisy, nan]
    rule = Selection(RM, "kl-bound")
    assert choose_alpha(results, rule).alpha == 0.5
    problems = rule.problems(results)
    assert [p.split(":")[0] for p in problems] == ["alpha=8", "alpha=2"]
    assert "below zero by more than 2 standard errors" in problems[0]
    assert Selection(RM, "reward-max").problems(results) == []


def test_kl_bound_without_spread_says_it_chose_as_reward_max():
    flat = BASELINE.model_copy(update={"scores": {RM: BASELINE.scores[RM].model_copy(update={"stderr": 0.0})}})
    results = [with_kl(flat, 0.0), with_kl(candidate(8.0, 2.0), 50.0)]
    assert choose_alpha(results, Selection(RM, "kl-bound")).alpha == 8.0
    (warning,) = Selection(RM, "kl-bound").problems(results)
    assert "no spread" in warning and "as reward-max does" in warning
    assert Selection(RM, "kl-bound").problems(curve()) == []


def test_the_other_rules_choice_is_reported_when_it_differs():
    results = curve()
    chosen = choose_alpha(results, Selection(RM, "kl-bound"))
    (note,) = other_rule_flags(results, chosen, Selection(RM, "kl-bound"))
    assert note.startswith("reward-max would choose alpha=4") and "kl-bound chose alpha=1" in note
    paper = choose_alpha(results, Selection(RM, "reward-max"))
    assert other_rule_flags(results, paper, Selection(RM, "reward-max"))[0].startswith("trust-region would choose alpha=")
    assert other_rule_flags(results[:1], results[0], Selection(RM, "kl-bound")) == []


@pytest.mark.parametrize("rule, accuracy", [("best-guess", 0.75), ("kl-bound", 0.4), ("kl-bound", 1.5), ("kl-bound", "0.8"), ("kl-bound", True)])
def test_bad_selection_settings_are_refused(rule, accuracy):
    with pytest.raises(ValueError):
        Selection(RM, rule, accuracy)


def test_search_bisects_around_the_rules_choice():
    """The search refines around kl-bound's best, not around the reward's peak."""

    class WithKL(Recorder):
        def __call__(self, alpha):
            return with_kl(super().__call__(alpha), kl=alpha**3)

    config = SearchConfig(low=0.5, high=2.0, coarse_points=4, refine_rounds=2, min_step=0.1)
    evaluate = WithKL(lambda alpha: 1.0 + 0.6 * alpha)  # reward rises forever
    results = search_alphas(evaluate, config, Selection(RM, "kl-bound"), with_kl(BASELINE, 0.0))
    chosen = choose_alpha([with_kl(BASELINE, 0.0), *results], Selection(RM, "kl-bound"))
    assert chosen.alpha == 0.625  # kl-bound's optimum of 1 + 0.6 a - 0.354 sqrt(2 a^3) is at a = 0.64
    assert evaluate.calls[4:] and max(evaluate.calls[4:]) < 1.0  # refined next to 0.5, not next to 2
    paper = WithKL(lambda alpha: 1.0 + 0.6 * alpha)
    search_alphas(paper, config, Selection(RM, "reward-max"), with_kl(BASELINE, 0.0))
    assert min(paper.calls[4:]) > 1.5


@pytest.fixture(scope="module")
def swept(family, reward_model, tmp_path_factory):
    """Both rules on one sweep folder (the second run reuses every generation): what each
    run wrote, by rule; the kl-bound run's files stay in the folder."""
    root = tmp_path_factory.mktemp("selection")
    recipe = write_recipe(root / "recipe.yaml", expo_recipe(family))
    out, runs = root / "out", {}
    for rule in ("reward-max", "kl-bound"):
        outcome = Sweep(config(recipe, out, reward_model, select=rule, alphas=[0.5, 2.0, 8.0])).run()
        runs[rule] = {
            "outcome": outcome,
            "document": json.loads((out / "results.json").read_text()),
            "csv": (out / "results.csv").read_text(),
            "best": (out / "best.yaml").read_text(),
            "card_table": (out / "card_table.md").read_text(),
        }
    return {"out": out, "runs": runs, "reward_model": reward_model}


@pytest.mark.parametrize("rule", ["reward-max", "kl-bound"])
def test_sweep_records_the_rule_everywhere(swept, rule):
    """Each output names the rule, and the chosen alpha is the one its recorded values rank first."""
    run, reward_model = swept["runs"][rule], swept["reward_model"]
    document = run["document"]
    assert document["selection"]["rule"] == rule and document["selection"]["scorer"] == reward_model
    select = [c for c in document["candidates"] if c["split"] == "select" and c["alpha"] is not None]
    base = CandidateResult.model_validate(next(c for c in select if c["alpha"] == 0))
    distances = {c["alpha"]: kl_distance(CandidateResult.model_validate(c), base) for c in select}
    assert all(c["kl"] is not None for c in select)
    rated = [c for c in select if c["selection_value"] is not None]
    best = max(rated, key=lambda c: preference(c["selection_value"], c["alpha"]))
    assert document["chosen_alpha"] == best["alpha"] == run["outcome"].chosen.alpha
    if rule == "reward-max":
        assert rated == select and all(c["selection_value"] == c["scores"][reward_model]["mean"] for c in select)
    else:  # the distance charged is the KL's upper bound; a candidate without one is not rated, and named
        sd = base.scores[reward_model].stderr * math.sqrt(base.n) * math.cos(math.pi / 4)
        for c in select:
            distance = distances[c["alpha"]]
            if distance is None:
                assert c["selection_value"] is None
            else:
                expected = c["scores"][reward_model]["mean"] - sd * math.sqrt(2 * distance)
                assert c["selection_value"] == pytest.approx(expected)
        unrated = sorted(c["label"] for c in select if c["selection_value"] is None)
        assert sorted(f.split(":")[0] for f in document["flags"] if "did not consider it" in f) == unrated
    rows = list(csv.DictReader(io.StringIO(run["csv"])))
    assert {row["select_rule"] for row in rows} == {rule}
    assert rule in run["best"].splitlines()[0]
    recipe = yaml.safe_load(run["best"])
    assert recipe["parameters"]["alpha"] == best["alpha"]
    assert recipe["expo_sweep"]["rule"] == rule and recipe["expo_sweep"]["chosen_alpha"] == best["alpha"]
    assert rule in run["card_table"]


def test_alpaca_eval_outputs_for_alpha_zero_and_the_chosen_alpha(swept):
    out, chosen = swept["out"], swept["runs"]["kl-bound"]["outcome"].chosen
    files = sorted(p.name for p in (out / "alpaca_eval").iterdir())
    assert files == sorted({"alpha=0.json", f"{chosen.label}.json"})
    report = [json.loads(line) for line in (out / "generations" / "alpha=0.jsonl").read_text().splitlines()]
    report = [row for row in report if row["split"] == "report"]
    outputs = json.loads((out / "alpaca_eval" / "alpha=0.json").read_text())
    assert [(o["instruction"], o["output"]) for o in outputs] == [(r["prompt"], r["response"]) for r in report]
    assert {o["generator"] for o in outputs} == {"expo-alpha=0"}


def test_card_of_a_merge_of_best_yaml_says_how_alpha_was_chosen(swept, tmp_path):
    """The record travels in best.yaml: the card holds when the sweep folder is gone, and says
    so when the alpha was edited after the sweep."""
    from click.testing import CliRunner
    from mergekit.scripts import run_yaml

    import mergekit_expo  # noqa: F401  (registers `expo` in this process)

    best = yaml.safe_load(swept["runs"]["kl-bound"]["best"])
    chosen = best["parameters"]["alpha"]
    (swept["out"] / "results.json").rename(tmp_path / "moved.json")
    try:
        for alpha, name in ((chosen, "as-chosen"), (chosen + 0.25, "edited")):
            recipe = tmp_path / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump({**best, "parameters": {"alpha": alpha}}, sort_keys=False))
            result = CliRunner().invoke(run_yaml.main, [str(recipe), str(tmp_path / name)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            card = (tmp_path / name / "README.md").read_text()
            assert "### How alpha was chosen" in card and "kl-bound" in card
            assert f"chose alpha = {chosen:g} among 0, 0.5, 2, 8" in card
            assert swept["reward_model"] in card and "| alpha=0.5 |" in card and "Held-out prompts" in card
            assert ("not the" in card) == (name == "edited")
    finally:
        (tmp_path / "moved.json").rename(swept["out"] / "results.json")


def test_a_damaged_sweep_record_does_not_stop_the_merge(swept):
    from mergekit_expo.card import sweep_section

    assert sweep_section("merge_method: expo\n", {"alpha": 0.3}) == ""
    damaged = sweep_section("expo_sweep: {rule: kl-bound}\n", {"alpha": 0.3})
    assert "could not be read" in damaged
    best = yaml.safe_load(swept["runs"]["kl-bound"]["best"])
    record = best["expo_sweep"]
    record["select"][0]["judge"] = {"model": "j", "win_rate": 50}  # lc_win_rate deleted by hand
    assert "could not be read" in sweep_section(yaml.safe_dump(best), {"alpha": record["chosen_alpha"]})
    record["select"][0].pop("judge")
    text = yaml.safe_dump(best)
    assert "not the" not in sweep_section(text, {"alpha": str(float(record["chosen_alpha"]))})  # "2.0" is 2


def card_record(**changes):
    """A best.yaml text with a valid `expo_sweep` record, changed as given."""
    record = {
        "results": "/nowhere/results.json", "results_sha256": "ab" * 32, "rule": "kl-bound",
        "rule_description": "kl-bound", "scorers": ["rm"], "alphas": [0.0, 0.5], "chosen_alpha": 0.5,
        "select": [{"candidate": "alpha=0", "n": 2, "rm": [1.0, 0.5]}, {"candidate": "alpha=0.5", "n": 2, "rm": [2.0, 0.5]}],
    }
    return yaml.safe_dump({"merge_method": "expo", "expo_sweep": {**record, **changes}})


def test_card_refuses_a_non_finite_alpha_in_the_sweep_record():
    from mergekit_expo.card import sweep_section

    text = sweep_section(card_record(chosen_alpha=math.nan, alphas=[0.0, math.nan]), {"alpha": 0.5})
    assert "could not be read" in text and "nan" not in text


def test_card_warns_when_the_select_rows_lack_the_chosen_alpha():
    from mergekit_expo.card import sweep_section

    text = sweep_section(card_record(select=[{"candidate": "alpha=0", "n": 2, "rm": [1.0, 0.5]}]), {"alpha": 0.5})
    assert "no select-prompt row" in text and "### How alpha was chosen" not in text
    assert "### How alpha was chosen" in sweep_section(card_record(), {"alpha": 0.5})


def test_card_escapes_markdown_in_names_and_says_the_results_file_is_gone():
    from mergekit_expo.card import sweep_section

    name = "a|b\n# injected"
    rows = [{"candidate": "alpha=0.5", "n": 2, name: [2.0, 0.5]}]
    text = sweep_section(
        card_record(scorers=[name], select=rows, rule_description="x\n\n## Fake\n<script>"), {"alpha": 0.5}
    )
    assert "\n# injected" not in text and "\n## Fake" not in text and "<script>" not in text
    assert "| a\\|b # injected |" in text and "not present where this merge ran" in text
