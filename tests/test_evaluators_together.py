"""The README's full evaluation sweep, offline: a remote-code (ArmoRM-shaped) reward model, an LLM
judge behind a local OpenAI-compatible server, an lm-eval task, then `mergekit-yaml best.yaml` and
the card it leads to."""

import json
import os

import pytest
from click.testing import CliRunner
from conftest import expo_recipe, run_cli, write_recipe
from judge_server import MODEL, JudgeServer, longer
from test_capability import TASK, task_dir, tiny  # noqa: F401  (fixtures)
from test_remote_reward_models import models, modules_cache  # noqa: F401  (fixtures)

pytest.importorskip("alpaca_eval")
pytest.importorskip("lm_eval")


def test_one_sweep_with_every_evaluator_and_its_card(models, task_dir, family, tmp_path):  # noqa: F811
    from mergekit.scripts import run_yaml

    import mergekit_expo  # noqa: F401  (registers `expo` in this process)

    judge = JudgeServer(longer)
    try:
        recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(family))
        out = tmp_path / "sweep"
        os.environ["PYTHONPATH"] = os.path.dirname(__file__)
        run_cli(
            "mergekit-expo", "sweep", recipe, "--out", out, "--alphas", "0.5,2", "--prompts", "smoke", "--limit", "6",
            "--max-new-tokens", "6", "--include-sft", "--reward-model", models["gated"], "--trust-remote-code",
            "--judge-base-url", judge.url, "--judge-model", MODEL,
            "--lm-eval-task", TASK, "--lm-eval-include-path", task_dir,
        )
    finally:
        judge.close()
    document = json.loads((out / "results.json").read_text())
    chosen = next(c for c in document["candidates"] if c["alpha"] == document["chosen_alpha"] and c["split"] == "select")
    assert chosen["capability"][TASK]["acc"] >= 0
    judged = [c for c in document["candidates"] if c["judge"]]
    assert judged and all(c["split"] == "report" for c in judged)

    result = CliRunner().invoke(run_yaml.main, [str(out / "best.yaml"), str(tmp_path / "merged")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "merged" / "README.md").read_text()
    section = card[card.index("### How alpha was chosen"):card.index("### Weight change")]
    assert models["gated"] in section and f"{TASK} acc (lm-eval)" in section
    assert f"chose alpha = {document['chosen_alpha']:g}" in section
    assert "judge win rate vs alpha 0 (LC)" in section  # the SFT model, at least, was judged
    (tmp_path / "card_section.md").write_text(section)
