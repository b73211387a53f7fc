"""Guards on choosing alpha: a KL that is no measured distance, ties, and flags that name hardware
or a search interval the sweep cannot use (usage errors, never a traceback)."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, expo_recipe, run_cli, write_recipe
from test_search import BASELINE, candidate

from expo_eval.cli import build_config  # registers `mergekit-expo sweep` on main
from expo_eval.search import choose_alpha
from expo_eval.selection import Selection
from mergekit_expo.cli import main

RM = "rm"


def kl(result, value, stderr):
    return result.model_copy(update={"kl": value, "kl_stderr": stderr})


def test_a_kl_too_noisy_to_mean_anything_is_not_chosen_and_is_named():
    """`--alphas 0,1e30` on the tiny family: a model with all-zero logits, KL -0.21 ± 0.58 next to
    alpha 0's 0.00 ± 0.007. That is no measured distance, and a high reward does not buy it in."""
    theta1 = kl(BASELINE, 0.0, 0.007)
    degenerate = kl(candidate(1e30, 5.0), -0.21, 0.58)
    rule = Selection(RM, "kl-bound")
    assert choose_alpha([theta1, degenerate], rule).alpha == 0.0
    (warning,) = rule.problems([theta1, degenerate])
    assert warning.startswith("alpha=1e+30:") and "too noisy" in warning and "did not consider it" in warning
    from expo_eval.selection import kl_distance

    assert kl_distance(degenerate, theta1) is None


def test_a_distance_that_cannot_be_told_from_zero_counts_at_its_upper_bound():
    from expo_eval.selection import kl_distance

    theta1 = kl(BASELINE, 0.02, 0.01)
    assert kl_distance(theta1, theta1) == pytest.approx(0.04)
    assert kl_distance(kl(candidate(0.5, 1.2), 0.3, 0.05), theta1) == pytest.approx(0.4)
    noisy = kl(candidate(0.5, 1.02), -0.01, 0.035)  # its SE is below alpha 0's whole distance: rated
    assert kl_distance(noisy, theta1) == pytest.approx(0.07)
    # counted as zero distance, alpha 0.5's higher mean would beat alpha 0; at its upper bound it does not
    assert choose_alpha([theta1, noisy], Selection(RM, "kl-bound")).alpha == 0.0


@pytest.mark.parametrize("rule", ["reward-max", "kl-bound"])
def test_ties_go_to_alpha_zero_then_the_smaller_step(rule):
    tied = [kl(candidate(a, 1.0), 0.0, 0.0) for a in (-0.5, 0.0, 0.5, 1.0)]
    assert choose_alpha(tied, Selection(RM, rule)).alpha == 0.0
    assert Selection(RM, rule).best(tied[2:], tied[1]).alpha == 0.5
    assert Selection(RM, rule).best([tied[0], tied[2]], tied[1]).alpha == -0.5  # toward theta0, not past theta1


@pytest.fixture
def cuda_devices(monkeypatch):
    """Make torch see `n` CUDA devices in this process (0: a machine without them)."""

    def see(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return see


def sweep(recipe, tmp_path, *args):
    return CliRunner().invoke(main, ["sweep", str(recipe), "--out", str(tmp_path / "o"), "--prompts", "smoke",
                                     "--reward-model", "rewards:word_count", *args])


@pytest.mark.parametrize(
    "cuda, args, message",
    [
        (0, ["--alphas", "0.5", "--gpus", "0,1"], "--gpus (gpus): Value error, 0,1: torch sees no CUDA device"),
        (2, ["--alphas", "0.5", "--gpus", "0,5"], "--gpus (gpus): Value error, GPU 5: torch sees 2 CUDA device(s)"),
        (2, ["--alphas", "0.5", "--gpus", "0,1", "--device", "cuda:1"], "--gpus (gpus): Value error, each GPU group"),
        (0, ["--alphas", "0.5", "--device", "cuda"], "--device (device): Value error, cuda: torch sees no CUDA device"),
        (2, ["--alphas", "0.5", "--device", "cuda:2"], "--device (device): Value error, cuda:2: torch sees 2 CUDA device(s)"),
        (0, ["--search", "0,0.5"], "--search (search): Value error, the search interval needs 0 < low < high"),
        (0, ["--search=-0.5,0.5"], "--search (search): Value error, the search interval needs 0 < low < high"),
    ],
)
def test_hardware_and_search_flags_the_sweep_cannot_use_are_usage_errors(recipe, tmp_path, cuda_devices, cuda, args, message):
    cuda_devices(cuda)
    result = sweep(recipe, tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_gpus_on_the_cpu_when_asked_for_explicitly(recipe, tmp_path, cuda_devices):
    """--device cpu is a choice, not a silent fallback: each GPU group's engine runs on the CPU."""
    cuda_devices(0)
    config = build_config(recipe, None, {"alphas": (0.5,), "reward_models": ("rewards:word_count",),
                                         "out": tmp_path, "gpus": ["0", "1"], "device": "cpu"})
    assert config.gpus == ["0", "1"]


def test_a_model_with_all_zero_logits_is_not_chosen_end_to_end(family, tmp_path, monkeypatch):
    """alpha 1e30 zeroes the tiny model's logits: uniform text, which `rewards:shortness` prefers
    (it stops sooner), and a KL too noisy to be a distance. The default keeps alpha 0 and says why."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(family))
    out = tmp_path / "out"
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", out, "--prompts", "smoke", "--device", "cpu",
                     "--alphas", "0,1e30", "--reward-model", "rewards:shortness")
    assert "Chosen alpha: 0 (rule trust-region" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert any(w.startswith("Warning: trust-region left out alpha=1e+30:") and "too noisy" in w for w in warnings), warnings
    assert any(w.startswith("Warning: reward-max would choose alpha=1e+30") for w in warnings), warnings
    document = json.loads((out / "results.json").read_text())
    assert document["chosen_alpha"] == 0
    degenerate = next(c for c in document["candidates"] if c["alpha"] == 1e30 and c["split"] == "select")
    assert degenerate["selection_value"] is None


def test_prompts_that_differ_only_in_whitespace_stay_on_one_side_of_the_split():
    """attackA #14: "Describe the bird briefly." chose alpha and "Describe the bird briefly. " was
    reported on; an explicit --report-prompts file with the same two is refused."""
    from expo_eval.prompts import make_prompt, shared_prompts, split_prompts

    asked = [f"Describe the {animal} briefly." for animal in ("bird", "dog", "cat", "fish", "horse", "owl")]
    prompts = [make_prompt([{"role": "user", "content": text}]) for base in asked
               for text in (base, base + " ", base.replace(" ", "  "))]
    select, report = split_prompts(prompts, 0.5)
    assert select and report and len(select) + len(report) == len(prompts)
    assert shared_prompts(report, select) == 0
