"""The command line's one error boundary (mergekit_expo.errors): bad input, a broken judge or
lm-eval task and a failed write are one line and a non-zero exit; a bug says it is one, with its
traceback once and where to report it; Ctrl-C says what survives."""

import os
import stat

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


# -- inputs that are refused up front, one line naming them (adversarial pass B) -------------


BAD_SCORER_MODULES = {  # module source -> what the message names
    None: "cannot import module nosuch_scorer_module (ModuleNotFoundError",
    "raise ValueError('no config')\ndef f(prompt, response):\n    return 1.0\n": "(ValueError: no config)",
    "def f(prompt, response)\n    return 1.0\n": "(SyntaxError",
    "f = 3\n": "f = 3 is not a function",
    "def f(text):\n    return 1.0\n": "f(text) cannot be called as f(prompt, response)",
}


@pytest.mark.parametrize("source", list(BAD_SCORER_MODULES), ids=["missing", "raises", "syntax", "not_callable", "arity"])
def test_a_scorer_function_that_cannot_score_is_refused_before_generating(recipe, tmp_path, monkeypatch, source):
    module = "nosuch_scorer_module" if source is None else f"bad_scorer_{abs(hash(source))}"
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO / 'tests'}")
    out = tmp_path / "out"
    result = sweep(recipe, out, f"{module}:f")
    assert result.returncode == 1
    refused(result, f"scorer {module}:f", BAD_SCORER_MODULES[source])
    assert not list(out.glob("cache/*.jsonl"))


BAD_CHAT_TEMPLATES = {
    "syntax": b"{% for %}",
    "raises": b'{{ raise_exception("no system role") }}',
    "undefined": b"{{ foo.bar.baz }}",
    "not_utf8": b"\xff{{ messages }}",
}


@pytest.mark.parametrize("kind", list(BAD_CHAT_TEMPLATES))
def test_a_chat_template_that_cannot_render_a_prompt_is_one_line(recipe, tmp_path, monkeypatch, kind):
    template = tmp_path / "t.jinja"
    template.write_bytes(BAD_CHAT_TEMPLATES[kind])
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    result = sweep(recipe, tmp_path / "out", "rewards:word_count", "--chat-template", template)
    assert result.returncode == 1
    message = refused(result, str(template))
    assert ("not UTF-8" if kind == "not_utf8" else "cannot render a prompt") in message


def test_a_recipe_that_is_not_text_is_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"\xff\xfe")
    result = sweep(recipe, tmp_path / "out", "rewards:word_count")
    assert result.returncode == 1
    refused(result, f"{recipe}: not UTF-8 text")


def test_an_output_folder_under_a_file_says_it_is_a_file(recipe, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    result = sweep(recipe, tmp_path / "afile" / "sub", "rewards:word_count")
    assert result.returncode == 1
    refused(result, f"{tmp_path / 'afile'}, where the output folder", "is a file, not a folder")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    from expo_eval.files import write_text

    previous = os.umask(umask)
    try:
        write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o666 & ~umask


def test_python_api_errors_are_expo_errors(recipe, tmp_path):
    """What Sweep(...) refuses is an ExpoError naming it (pydantic's ValidationError from
    SweepConfig(...) itself is the config's own contract)."""
    from expo_eval.config import SweepConfig
    from expo_eval.scoring import ScorerError
    from expo_eval.sweep import Sweep
    from mergekit_expo.run import MergeError

    assert issubclass(MergeError, ExpoError)

    def config(**extra):
        return SweepConfig(**{**dict(recipe=recipe, out=tmp_path / "out", alphas=[0.5], prompts="smoke", limit=4,
                                     reward_models=["rewards:word_count"]), **extra})

    class Nameless:
        def score(self, prompts, responses):
            return [1.0] * len(responses)

    class Fingerprint(Nameless):
        name = "rewards:word_count"

        @property
        def fingerprint(self):
            raise RuntimeError("boom")

    with pytest.raises(ScorerError, match="needs a `name`"):
        Sweep(config(), scorers=[Nameless()])
    with pytest.raises(ScorerError, match="rewards:word_count: reading its `fingerprint` raised RuntimeError: boom"):
        Sweep(config(), scorers=[Fingerprint()])
    with pytest.raises(ScorerError, match="cannot import module nosuch_scorer_module"):
        Sweep(config(reward_models=["nosuch_scorer_module:f"]))
    with pytest.raises(ExpoError, match="nope.yaml: cannot be read"):
        Sweep(config(recipe=tmp_path / "nope.yaml"))
    with pytest.raises(ExpoError, match="cannot be read"):
        Sweep(config(recipe=tmp_path))


def test_a_config_file_that_is_not_text_is_a_usage_error_naming_config(recipe, tmp_path):
    """attackA #10: a UnicodeDecodeError traceback and exit 70."""
    import expo_eval.cli  # noqa: F401  (adds `sweep` to the group)

    config = tmp_path / "bin.yaml"
    config.write_bytes(b"\xff\xfealphas: 1\n")
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--out", str(tmp_path / "o"), "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "--config" in result.stderr and f"{config}: not UTF-8 text" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "inf"], "--temperature (sampling.temperature): Input should be a finite number"),
        (["--top-p", "-inf"], "--top-p (sampling.top_p): Input should be a finite number"),
        (["--kv-cache-gib", "inf"], "--kv-cache-gib (engine.kv_cache_gib): Input should be a finite number"),
        (["--reward-accuracy", "nan"], "--reward-accuracy (reward_accuracy): Input should be a finite number"),
        (["--search", "nan,1"], "Input should be a finite number"),
    ],
)
def test_non_finite_sampling_engine_and_selection_values_are_refused_by_flag(recipe, tmp_path, flags, message):
    """attackA #18/#22: `--temperature inf` ran; `--search nan,1` said "alpha <= -1", and
    `--reward-accuracy nan` "less than or equal to 1"."""
    import expo_eval.cli  # noqa: F401  (adds `sweep` to the group)

    args = [] if "--search" in flags else ["--alphas", "0.5"]
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--out", str(tmp_path / "o"), "--prompts", "smoke",
                                       "--reward-model", "rm", *args, *flags])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "alpha <= -1" not in result.stderr, result.stderr


def test_a_non_finite_alpha_is_named_as_such():
    """attackA #22: NaN was told that alpha <= -1 moves past theta0."""
    from mergekit_expo.rules import check_alpha

    with pytest.raises(ValueError, match=r"\(got nan\): NaN is not a number") as nan:
        check_alpha(float("nan"))
    with pytest.raises(ValueError, match="infinite") as inf:
        check_alpha(float("inf"))
    assert "<= -1" not in str(nan.value) + str(inf.value)
