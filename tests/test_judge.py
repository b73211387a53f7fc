"""The LLM judge against a stand-in OpenAI-compatible server on 127.0.0.1: both orders, retries,
the win rates, its cache, and the sweep's use of it."""

import json
import os
import socket

import pytest
from judge_server import HTML_PAGE, MALFORMED_CHAT, MODEL, JudgeServer, always_first, longer
from test_sweep import config

from expo_eval.judge import CANDIDATE_WINS, TIE, Judge, JudgeConfig, JudgeError, length_controlled_win_rate, summarize

pytest.importorskip("alpaca_eval")


@pytest.fixture
def server(request):
    rule, failures = getattr(request, "param", (longer, 0))
    server = JudgeServer(rule, failures=failures)
    yield server
    server.close()


def judge(server, **overrides):
    return Judge(JudgeConfig(base_url=server.url, model=MODEL, **overrides))


def test_both_orders_and_a_win_only_when_they_agree(server):
    instructions = ["a", "b", "c"]
    baseline, candidate = ["short", "a much longer one", "same"], ["a longer answer", "tiny", "same"]
    preferences = judge(server).preferences(instructions, baseline, candidate)
    assert len(server.requests) == 6
    # longer wins in both orders; equal lengths: "m" both times, i.e. each side wins once: a tie
    assert preferences == [CANDIDATE_WINS, 1.0, TIE]
    stats = summarize(preferences, baseline, candidate, MODEL)
    assert stats.n == 3 and stats.win_rate == pytest.approx(50.0) and stats.position_agreement == pytest.approx(2 / 3)


@pytest.mark.parametrize("server", [(always_first, 0)], indirect=True)
def test_a_judge_that_only_sees_position_gives_ties(server):
    preferences = judge(server).preferences(["a", "b"], ["x", "y"], ["xx", "yy"])
    assert preferences == [TIE, TIE]
    assert summarize(preferences, ["x", "y"], ["xx", "yy"], MODEL).position_agreement == 0


@pytest.mark.parametrize("server", [(longer, 3)], indirect=True)
def test_server_errors_are_retried(server):
    assert judge(server, max_retries=4).preferences(["a"], ["x"], ["xxxx"]) == [CANDIDATE_WINS]
    assert len(server.requests) == 2 + 3


@pytest.mark.parametrize("server", [(longer, 10)], indirect=True)
def test_a_judge_that_keeps_failing_is_a_clear_error(server):
    with pytest.raises(JudgeError, match=r"failed \(up to 1 retries.*InternalServerError"):
        judge(server, max_retries=1).preferences(["a"], ["x"], ["xxxx"])


def test_the_key_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge(server, api_key_env="JUDGE_KEY").preferences(["a"], ["x"], ["xx"])
    assert server.keys == {"Bearer secret"}


def test_unreachable_or_wrong_model_is_found_before_any_work(server):
    with pytest.raises(JudgeError, match="does not serve 'other'"):
        Judge(JudgeConfig(base_url=server.url, model="other")).check()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}"):
        Judge(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, max_retries=0)).check()


def test_length_control_discounts_a_length_biased_judge():
    """Wins that length explains entirely: the raw win rate is 70%, the length-controlled one ~50%."""
    rows = [(CANDIDATE_WINS if i < 70 else 1.0, "b" * 50, "c" * (60 + i) if i < 70 else "c" * (40 - i % 30)) for i in range(100)]
    raw = summarize([p for p, _, _ in rows], [b for _, b, _ in rows], [c for _, _, c in rows], MODEL)
    assert raw.win_rate == pytest.approx(70.0)
    assert 40 <= length_controlled_win_rate(rows) <= 60
    assert length_controlled_win_rate([(CANDIDATE_WINS, "b", "cc")] * 3) == 100.0


def test_the_sweep_judges_the_choice_against_alpha_zero_and_caches_it(recipe, reward_model, tmp_path, server):
    from expo_eval.sweep import Sweep

    out = tmp_path / "out"
    settings = dict(judge={"base_url": server.url, "model": MODEL}, alphas=[0.5, 2.0], include_sft=True)
    outcome = Sweep(config(recipe, out, reward_model, **settings)).run()
    document = json.loads((out / "results.json").read_text())
    judged = [c for c in document["candidates"] if c["judge"] is not None]
    assert {(c["label"], c["split"]) for c in judged} == {("sft", "report"), (outcome.chosen.label, "report")} - {("alpha=0", "report")}
    report_n = next(c["n"] for c in document["candidates"] if c["split"] == "report")
    assert all(c["judge"]["n"] == report_n and c["judge"]["judge"] == MODEL for c in judged)
    requests = len(server.requests)
    assert requests == 2 * report_n * len(judged)
    Sweep(config(recipe, out, reward_model, **settings)).run()
    assert len(server.requests) == requests  # every verdict came from the cache
    assert "judge" in (out / "results.csv").read_text().splitlines()[0]


def test_cli_refuses_an_unreachable_judge_before_generating(recipe, reward_model, tmp_path):
    from conftest import run_cli

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    os.environ["PYTHONPATH"] = os.path.dirname(__file__)
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", out, "--alphas", "0.5", "--prompts", "smoke",
                     "--limit", "2", "--reward-model", reward_model, "--judge-base-url", f"http://127.0.0.1:{port}/v1",
                     "--judge-model", MODEL, "--judge-max-retries", "0", check=False)
    assert result.returncode != 0 and "judge endpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "cache").exists() or not list((out / "cache").glob("*.jsonl"))


def test_only_exactly_m_or_M_counts_and_a_thin_verdict_is_flagged():
    from expo_eval.records import CandidateResult
    from expo_eval.search import judge_flags

    answers = iter(["Maybe", "m", "M", "M"] * 10)
    server = JudgeServer(lambda first, second: next(answers))
    try:
        preferences = judge(server, concurrency=1).preferences(["a", "b"], ["x", "y"], ["xx", "yy"])
    finally:
        server.close()
    assert preferences[0] is None  # "Maybe" is no vote
    stats = summarize(preferences, ["x", "y"], ["xx", "yy"], MODEL)
    assert (stats.n, stats.unparsed) == (1, 1)
    result = CandidateResult(alpha=0.5, label="alpha=0.5", split="report", n=2, scores={}, mean_tokens=1,
                             length_cut_share=0, repetition=0, judge=stats)
    (flag,) = [f for f in judge_flags([result], result) if "outside the template" in f]
    assert "1 of 2 prompts" in flag


def test_a_verdict_that_cannot_be_summarized_is_not_cached(recipe, reward_model, tmp_path):
    from expo_eval.sweep import Sweep

    out = tmp_path / "out"
    mute = JudgeServer(lambda first, second: "")
    try:
        settings = dict(judge={"base_url": mute.url, "model": MODEL}, alphas=[0.5], include_sft=True)
        with pytest.raises(JudgeError, match="no answer in the template's format"):
            Sweep(config(recipe, out, reward_model, **settings)).run()
    finally:
        mute.close()
    assert (out / "results.json").exists()  # the scores' report was written before the judge ran
    assert not list((out / "cache").glob("*.judge.json"))
    good = JudgeServer(longer)
    try:
        settings["judge"]["base_url"] = good.url  # another endpoint: a verdict of its own
        Sweep(config(recipe, out, reward_model, **settings)).run()
        assert good.requests
    finally:
        good.close()


def test_an_annotator_the_judge_cannot_read_is_refused(server):
    with pytest.raises(JudgeError, match="does not answer with one token"):
        judge(server, template="alpaca_eval_cot_gpt4_turbo_fn")


# What each malformed chat reply is called in the error.
MALFORMED_PROBLEMS = {
    "not UTF-8": "is not UTF-8 text",
    "plain text": "is not JSON",
    "no choices": "has no `choices` list",
    "empty choices": "has an empty `choices` list",
    "null message": "has no `message` in its first choice",
}


@pytest.mark.parametrize("mode", list(MALFORMED_CHAT))
def test_a_malformed_reply_is_named_with_the_endpoint_and_the_body(mode):
    body, _ = MALFORMED_CHAT[mode]
    server = JudgeServer(longer, chat_body=MALFORMED_CHAT[mode])
    try:
        with pytest.raises(JudgeError) as caught:
            judge(server, max_retries=0).preferences(["a"], ["x"], ["xx"])
    finally:
        server.close()
    message = str(caught.value)
    assert f"judge endpoint {server.url}: its reply to /chat/completions {MALFORMED_PROBLEMS[mode]}" in message
    assert repr(body.decode("utf-8", errors="replace")[:200]) in message


def test_a_web_page_at_models_is_named_before_any_work():
    server = JudgeServer(longer, models_body=HTML_PAGE)
    try:
        with pytest.raises(JudgeError, match=r"its reply to /models is not JSON \(is --judge-base-url the API's root") as caught:
            judge(server).check()
    finally:
        server.close()
    assert "<!doctype html>" in str(caught.value) and "\n" not in str(caught.value)


def test_a_refused_request_names_the_unset_key_variable(monkeypatch):
    server = JudgeServer(longer, key="secret")
    try:
        monkeypatch.delenv("JUDGE_KEY", raising=False)
        with pytest.raises(JudgeError, match="--judge-api-key-env JUDGE_KEY is not set"):
            judge(server, api_key_env="JUDGE_KEY").check()
        monkeypatch.setenv("JUDGE_KEY", "wrong")
        with pytest.raises(JudgeError, match="refused the key in JUDGE_KEY"):
            judge(server, api_key_env="JUDGE_KEY").check()
        monkeypatch.setenv("JUDGE_KEY", "secret")
        judge(server, api_key_env="JUDGE_KEY").check()
    finally:
        server.close()
