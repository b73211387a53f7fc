"""The sweep end to end on tiny local models: outputs, cache, resume, errors."""

import json
import os

import pytest
import yaml
from conftest import expo_recipe, run_cli, write_recipe

from expo_eval.backends import make_backend
from expo_eval.candidates import load_recipe
from expo_eval.config import SweepConfig
from expo_eval.sweep import Sweep

TESTS = os.path.dirname(__file__)



def config(recipe, out, reward_model, **overrides):
    data = {
        "recipe": recipe,
        "out": out,
        "prompts": "smoke",
        "limit": 6,
        "alphas": [0.5, 2.0],
        "reward_models": [reward_model, "rewards:word_count"],
        "sampling": {"max_new_tokens": 8, "batch_size": 4},
        **overrides,
    }
    return SweepConfig.model_validate(data)


class CountingBackend:
    """Wraps the real backend; fails after `fail_after` generate calls when asked."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls = inner, fail_after, 0

    def load_candidate(self, alpha):
        self.inner.load_candidate(alpha)

    def generate(self, prompts, sampling):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.generate(prompts, sampling)

    def response_logprobs(self, prompts, responses):
        return self.inner.response_logprobs(prompts, responses)

    def close(self):
        pass


def test_cli_sweep_writes_every_output(recipe, reward_model, tmp_path):
    out = tmp_path / "out"
    env_flags = ["--alphas", "0,0.5,2", "--prompts", "smoke", "--limit", "6", "--max-new-tokens", "8",
                 "--reward-model", reward_model, "--reward-model", "rewards:word_count", "--include-sft"]
    os.environ["PYTHONPATH"] = TESTS
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", out, *env_flags)
    assert "Chosen alpha" in result.stdout
    summary = json.loads((out / "results.json").read_text())
    candidates = summary["candidates"]
    assert {c["label"] for c in candidates if c["split"] == "select"} == {"alpha=0", "alpha=0.5", "alpha=2", "sft"}
    assert any(c["split"] == "report" for c in candidates)
    for candidate in candidates:
        assert set(candidate["scores"]) == {reward_model, "rewards:word_count"}
        assert 0 <= candidate["length_cut_share"] <= 1
    rows = [json.loads(l) for l in (out / "generations" / "alpha=0.5.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "response", "tokens", "finish_reason", "scores"} <= set(rows[0])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["merge_method"] == "expo" and best["parameters"]["alpha"] == summary["chosen_alpha"]
    for name in ("results.csv", "card_table.md", "reward_vs_alpha.png", "reward_distributions.png"):
        assert (out / name).stat().st_size > 0, name

    again = run_cli("mergekit-expo", "sweep", recipe, "--out", out, *env_flags)
    assert "Nothing generated" in again.stdout


def counting_backend(sweep_config, fail_after=None):
    recipe_text = sweep_config.recipe.read_text()
    return CountingBackend(make_backend(sweep_config, recipe_text, load_recipe(recipe_text)), fail_after)


def test_interrupted_sweep_resumes_without_redoing_work(recipe, reward_model, tmp_path):
    out = tmp_path / "out"
    interrupted = counting_backend(config(recipe, out, reward_model), fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        Sweep(config(recipe, out, reward_model), backend=interrupted).run()
    assert interrupted.calls == 2
    assert not (out / "results.json").exists()

    resumed = counting_backend(config(recipe, out, reward_model))
    outcome = Sweep(config(recipe, out, reward_model), backend=resumed).run()
    assert resumed.calls == outcome.generated
    assert outcome.reused >= 2
    select_alphas = sorted(r.alpha for r in outcome.results if r.split == "select")
    assert select_alphas == [0.0, 0.5, 2.0]


def test_search_mode_runs_through_the_sweep(recipe, reward_model, tmp_path):
    search = {"low": 0.5, "high": 1.5, "coarse_points": 3, "refine_rounds": 1, "min_step": 0.25}
    outcome = Sweep(config(recipe, tmp_path / "out", reward_model, alphas=None, search=search)).run()
    evaluated = [r.alpha for r in outcome.results if r.split == "select"]
    assert 0.0 in evaluated and 0.5 in evaluated and len(evaluated) >= 3


def test_bad_inputs_give_clear_errors(family, reward_model, tmp_path):
    linear = write_recipe(tmp_path / "linear.yaml", {"merge_method": "linear", "models": [{"model": str(family["dpo"])}]})
    result = run_cli("mergekit-expo", "sweep", linear, "--out", tmp_path / "o", "--alphas", "0.1",
                     "--reward-model", reward_model, "--prompts", "smoke", check=False)
    assert result.returncode != 0 and "merge_method: linear" in result.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"nothing": 1}\n')
    recipe = write_recipe(tmp_path / "r.yaml", expo_recipe(family))
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", tmp_path / "o", "--alphas", "0.1",
                     "--reward-model", reward_model, "--prompts", empty, check=False)
    assert result.returncode != 0 and "no usable prompts" in result.stderr
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", tmp_path / "o", "--prompts", "smoke",
                     "--reward-model", reward_model, check=False)
    assert result.returncode != 0 and "alphas" in result.stderr
