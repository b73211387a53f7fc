"""The command line's one error boundary (mergekit_expo.errors): bad input, a broken judge or
lm-eval task and a failed write are one line and a non-zero exit; a bug says it is one, with its
traceback once and where to report it; Ctrl-C says what survives."""

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, run_cli
from judge_server import HTML_PAGE, MALFORMED_CHAT, MODEL, JudgeServer, longer
from test_capability import TASK, QUESTIONS, task_dir, tiny  # noqa: F401  (fixtures)
from test_judge import MALFORMED_PROBLEMS

from mergekit_expo.cli import main
from mergekit_expo.errors import EXIT_BUG, EXIT_INTERRUPTED, ISSUES_URL, ExpoError, report_errors


def sweep(recipe, out, reward_model, *flags):
    return run_cli("mergekit-expo", "sweep", recipe, "--out", out, "--alphas", "0.5", "--prompts", "smoke",
                   "--limit", "4", "--max-new-tokens", "4", "--reward-model", reward_model, *flags, check=False)


def refused(result, *named):
    """A one-line refusal: non-zero exit, no traceback, every name in the message."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and all(name in error[0] for name in named), result.stderr
    return error[0]


# -- lm-eval ---------------------------------------------------------------------------------


def test_more_few_shot_examples_than_the_task_has(recipe, reward_model, task_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = sweep(recipe, out, reward_model, "--lm-eval-task", TASK, "--lm-eval-include-path", task_dir,
                   "--lm-eval-num-fewshot", "10")
    refused(result, TASK, "num_fewshot 10", f"the {len(QUESTIONS)} documents")
    assert not list(out.glob("cache/*.jsonl"))  # refused before generating


def test_a_task_yaml_with_a_syntax_error(recipe, reward_model, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  test_split: [test\n")
    result = sweep(recipe, tmp_path / "out", reward_model, "--lm-eval-task", "broken", "--lm-eval-include-path", tasks)
    refused(result, f"{tasks / 'broken.yaml'}, line 3: YAML syntax error")


# -- the judge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judged_out(tmp_path_factory):
    """One output folder for the malformed-reply sweeps: the first generates, the others reuse it."""
    return tmp_path_factory.mktemp("judged") / "out"


@pytest.mark.parametrize("mode", list(MALFORMED_CHAT))
def test_a_malformed_judge_reply(recipe, reward_model, judged_out, mode):
    server = JudgeServer(longer, chat_body=MALFORMED_CHAT[mode])
    try:
        result = sweep(recipe, judged_out, reward_model, "--include-sft", "--judge-base-url", server.url,
                       "--judge-model", MODEL, "--judge-max-retries", "0")  # the SFT model is judged whatever is chosen
    finally:
        server.close()
    refused(result, server.url, "/chat/completions", MALFORMED_PROBLEMS[mode])


def test_a_web_page_where_the_judge_api_should_be(recipe, reward_model, tmp_path):
    server = JudgeServer(longer, models_body=HTML_PAGE)
    try:
        result = sweep(recipe, tmp_path / "out", reward_model, "--judge-base-url", server.url, "--judge-model", MODEL)
    finally:
        server.close()
    refused(result, server.url, "/models is not JSON", "<!doctype html>")


def test_an_unset_judge_key_variable(recipe, reward_model, tmp_path, monkeypatch):
    monkeypatch.delenv("EXPO_TEST_JUDGE_KEY", raising=False)
    server = JudgeServer(longer, key="secret")
    try:
        result = sweep(recipe, tmp_path / "out", reward_model, "--judge-base-url", server.url, "--judge-model", MODEL,
                       "--judge-api-key-env", "EXPO_TEST_JUDGE_KEY")
    finally:
        server.close()
    refused(result, "--judge-api-key-env EXPO_TEST_JUDGE_KEY is not set")


# -- every subcommand: OSError, bugs, Ctrl-C -------------------------------------------------


def test_a_failed_write_names_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(run_cli("mergekit-expo", "tiny-models", blocker / "models", check=False), str(blocker))


def test_a_bug_says_so_once_with_its_traceback_and_where_to_report_it(capsys):
    def broken():
        raise TypeError("unsupported operand")

    with pytest.raises(click.exceptions.Exit) as caught:
        report_errors(broken)
    assert caught.value.exit_code == EXIT_BUG
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "TypeError: unsupported operand" in err
    assert "mergekit-expo: unexpected error (a bug): TypeError: unsupported operand" in err and ISSUES_URL in err


def test_known_errors_and_os_errors_are_one_line():
    def refuse():
        raise ExpoError("recipe.yaml: no base_model")

    def full_disk():
        raise OSError(28, "No space left on device", "out/results.json")

    for command, message in [(refuse, "recipe.yaml: no base_model"), (full_disk, "out/results.json: No space left on device")]:
        with pytest.raises(click.ClickException) as caught:
            report_errors(command)
        assert caught.value.message == message and caught.value.exit_code == 1


def test_every_subcommand_is_behind_the_boundary(monkeypatch, tmp_path):
    import mergekit_expo.tiny

    def bug(*args, **kwargs):
        raise KeyError("sft")

    monkeypatch.setattr(mergekit_expo.tiny, "build_family", bug)
    result = CliRunner().invoke(main, ["tiny-models", str(tmp_path / "m")])
    assert result.exit_code == EXIT_BUG and result.stderr.count("Traceback") == 1 and ISSUES_URL in result.stderr

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mergekit_expo.tiny, "build_family", interrupt)
    result = CliRunner().invoke(main, ["tiny-models", str(tmp_path / "m")])
    assert result.exit_code == EXIT_INTERRUPTED and "Error: interrupted" in result.stderr


def test_ctrl_c_in_a_sweep_says_where_its_candidates_are(recipe, monkeypatch, tmp_path):
    import expo_eval.cli  # noqa: F401  (adds `sweep` to the group)
    import expo_eval.sweep

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(expo_eval.sweep.Sweep, "run", interrupt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--out", str(out), "--alphas", "0.5", "--prompts", "smoke",
                                        "--reward-model", "rm"])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert f"interrupted; finished candidates are cached in {out / 'cache'}" in result.stderr


def test_the_issue_url_is_the_projects():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Issues"] == ISSUES_URL
